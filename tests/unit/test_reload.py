"""Reload without I/O: the diff, the restart-only settings, and the Reloader's all-or-nothing."""

from __future__ import annotations

import dataclasses
import ipaddress
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.unit.test_tunnel import FakeDevice, _no_link, make_config
from tunneld import keys, tunnel
from tunneld.config import Config, HostPort
from tunneld.errors import ConfigError, ProxyError
from tunneld.health import PeerState
from tunneld.reload import Reloader, describe_changes, needs_restart
from tunneld.tunnel import Tunnel, TunnelKeys
from tunneld.wireguard.model import Endpoint

SERVICE = """
[[service]]
name = "billing"
hosts = ["billing"]
upstream = "http://127.0.0.1:8081"
"""
SECOND_GATEWAY = f"""
[[gateway]]
name = "edge-2"
public_key = "{keys.encode_key(keys.public_key(keys.generate_private_key()))}"
endpoints = ["198.18.0.7:51820"]
allowed_ips = ["10.46.0.1/32"]
"""


def test_changes_are_described_by_section_and_name(tmp_path: Path) -> None:
    old = make_config(tmp_path, extra_sections=SERVICE)
    new = make_config(
        tmp_path,
        extra_sections=SERVICE.replace("8081", "8082") + SECOND_GATEWAY + "[health]\ninterval=2\n",
    )
    assert describe_changes(old, new) == [
        "[health] changed",
        "gateway edge-2 added",
        "service billing changed",
    ]
    assert describe_changes(new, old) == [
        "[health] changed",
        "gateway edge-2 removed",
        "service billing changed",
    ]
    assert describe_changes(old, old) == []


def test_interface_name_and_backend_need_a_restart(tmp_path: Path) -> None:
    old = make_config(tmp_path)
    renamed = make_config(tmp_path, extra_interface='backend = "userspace"')
    assert needs_restart(old, renamed) == ["interface.backend"]
    moved = dataclasses.replace(
        old, interface=dataclasses.replace(old.interface, name="tdother0", mtu=1280)
    )
    assert needs_restart(old, moved) == ["interface.name"]  # the MTU can change in place
    assert needs_restart(old, old) == []


class FakeProxy:
    def __init__(self, fail: bool = False) -> None:
        self.applied: list[tuple[Config, Mapping[str, bytes]]] = []
        self.fail = fail

    async def reconfigure(self, config: Config, secrets: Mapping[str, bytes]) -> None:
        if self.fail:
            raise ProxyError("cannot listen on 10.44.0.2:5432: address in use")
        self.applied.append((config, secrets))


class FakeTunnel:
    def __init__(self) -> None:
        self.applied: list[Config] = []

    async def reconfigure(self, config: Config, tunnel_keys: TunnelKeys) -> None:
        self.applied.append(config)


class Notifications:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def reloading(self, status: str | None = None) -> None:
        self.sent.append("RELOADING")

    def ready_after_reload(self, status: str | None = None) -> None:
        self.sent.append(f"READY {status}")


def reloader_for(
    tmp_path: Path, loads: list[Config | Exception], proxy: FakeProxy | None = None
) -> tuple[Reloader, FakeTunnel, FakeProxy, Notifications]:
    def load() -> Config:
        result = loads.pop(0)
        if isinstance(result, Exception):
            raise result
        return result

    running = make_config(tmp_path, extra_interface=f'private_key_file = "{tmp_path}/k"')
    keys.ensure_private_key_file(tmp_path / "k")
    fakes = FakeTunnel(), proxy or FakeProxy(), Notifications()
    reloader = Reloader(
        running,
        load_config=load,
        load_secrets=lambda config: {},
        tunnel=fakes[0],
        proxy=fakes[1],
        notifier=fakes[2],
        status_line=lambda: "up: edge-1",
    )
    return reloader, *fakes


async def test_a_valid_config_is_applied_to_the_tunnel_then_the_proxy(tmp_path: Path) -> None:
    new = make_config(tmp_path, extra_interface=f'private_key_file = "{tmp_path}/k"',
                      extra_sections=SERVICE)  # fmt: skip
    reloader, tunnel_, proxy, notifications = reloader_for(tmp_path, [new])
    assert await reloader.reload()
    assert tunnel_.applied == [new] and proxy.applied == [(new, {})]
    assert reloader.config is new
    assert reloader.results.succeeded == 1
    assert notifications.sent == ["RELOADING", "READY up: edge-1"]


async def test_rejected_configs_change_nothing(tmp_path: Path) -> None:
    running_name = make_config(tmp_path).interface.name
    renamed = make_config(tmp_path, extra_interface=f'private_key_file = "{tmp_path}/k"')
    renamed = dataclasses.replace(
        renamed, interface=dataclasses.replace(renamed.interface, name="tdother0")
    )
    missing_key = make_config(tmp_path, extra_interface=f'private_key_file = "{tmp_path}/nokey"')
    loads: list[Config | Exception] = [
        ConfigError("tunneld.toml: gateway[0].endpoints: expected a list"),
        renamed,
        missing_key,  # a reload never creates a key: that would be a new identity
    ]
    reloader, tunnel_, proxy, notifications = reloader_for(tmp_path, loads)
    before = reloader.config
    for _ in range(3):
        assert not await reloader.reload()
    assert tunnel_.applied == [] and proxy.applied == []
    assert reloader.config is before and before.interface.name == running_name
    assert reloader.results.failed == 3
    assert "nokey" in (reloader.results.last_error or "")
    assert not (tmp_path / "nokey").exists()
    assert notifications.sent == ["RELOADING", "READY up: edge-1"] * 3  # systemd is told each time


async def test_a_proxy_that_cannot_apply_is_reported_as_partly_applied(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    new = make_config(tmp_path, extra_interface=f'private_key_file = "{tmp_path}/k"')
    reloader, tunnel_, _, _ = reloader_for(tmp_path, [new], proxy=FakeProxy(fail=True))
    assert not await reloader.reload()
    assert tunnel_.applied == [new]
    assert "only partly applied" in caplog.text and "address in use" in caplog.text


async def test_tunnel_reconfigure_keeps_unchanged_gateways_and_applies_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    async def fake_resolve(endpoint: HostPort) -> Endpoint:
        host = endpoint.host if endpoint.host[0].isdigit() else "198.18.0.1"
        return Endpoint(ipaddress.ip_address(host), endpoint.port)

    monkeypatch.setattr(tunnel, "resolve", fake_resolve)
    monkeypatch.setattr(tunnel, "converge_link", _no_link)
    device = FakeDevice()
    device.handshake = time.time()  # a fresh handshake (wall clock, as WireGuard reports it)
    config = make_config(tmp_path, extra_sections='[health]\nprobe = "none"\n')
    t = Tunnel(config, TunnelKeys(keys.generate_private_key()))
    with trio.fail_after(600):
        await t.bring_up(device)
        t._device = device  # as while the supervisor runs
        await t.tick(device)
        edge_1 = t.gateways["edge-1"]
        assert edge_1.health.state is PeerState.UP
        machine = edge_1.health

        with_second = make_config(
            tmp_path, extra_sections='[health]\nprobe = "none"\n' + SECOND_GATEWAY
        )
        await t.reconfigure(with_second, TunnelKeys(keys.generate_private_key()))
        assert set(t.gateways) == {"edge-1", "edge-2"}
        assert t.gateways["edge-1"] is edge_1 and edge_1.health is machine  # untouched
        assert edge_1.config is with_second.gateways[0]  # but the config object is the new one
        peers = device.applied[-1].peers
        assert [str(peer.endpoint) for peer in peers] == ["198.18.0.1:51820", "198.18.0.7:51820"]

        changed_health = make_config(
            tmp_path, extra_sections='[health]\nprobe = "none"\ninterval = 3\n'
        )
        await t.reconfigure(changed_health, TunnelKeys(keys.generate_private_key()))
        assert set(t.gateways) == {"edge-1"}
        assert len(device.applied[-1].peers) == 1
        fresh = t.gateways["edge-1"].health
        assert fresh is not machine and fresh.counters is machine.counters
        await t.tick(device)
        assert fresh.state is PeerState.UP  # a fresh handshake: straight back to up
