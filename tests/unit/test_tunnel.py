"""Tunnel logic without I/O: a fake device, a fake resolver, trio's autojump clock."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from tunneld import keys, tunnel
from tunneld.config import Config, HostPort, load_config
from tunneld.errors import BackendError, KeyFileError
from tunneld.tunnel import ResolveError, Tunnel, TunnelKeys, load_tunnel_keys
from tunneld.wireguard.model import DeviceConfig, DeviceStats, Endpoint, PeerStats

GATEWAY_PUBLIC = keys.public_key(keys.generate_private_key())


def make_config(
    tmp_path: Path,
    *,
    extra_interface: str = "",
    extra_sections: str = "",
    environ: dict[str, str] | None = None,
) -> Config:
    path = tmp_path / "tunneld.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            [interface]
            name = "tdunit0"
            address = ["10.44.0.2/24", "fd44::2/64"]
            {extra_interface}

            [[gateway]]
            name = "edge-1"
            public_key = "{keys.encode_key(GATEWAY_PUBLIC)}"
            endpoints = ["gw1.example.net:51820", "198.18.0.9:51820"]
            allowed_ips = ["10.44.0.1/32", "10.45.0.0/24"]
            """
        )
        + extra_sections
    )
    return load_config(path, environ or {})


class FakeDevice:
    backend_name = "fake"
    ifname = "tdunit0"

    def __init__(self) -> None:
        self.applied: list[DeviceConfig] = []
        self.handshake: float | None = None

    async def configure(self, config: DeviceConfig) -> None:
        self.applied.append(config)

    async def stats(self) -> DeviceStats:
        return DeviceStats(
            peers=(PeerStats(GATEWAY_PUBLIC, last_handshake_unix_seconds=self.handshake),)
        )


def test_link_plan_routes_only_what_the_addresses_do_not_cover(tmp_path: Path) -> None:
    t = Tunnel(make_config(tmp_path), TunnelKeys(keys.generate_private_key()))
    plan = t.link_plan()
    # 10.44.0.1/32 is on-link through 10.44.0.2/24; 10.45.0.0/24 needs a route.
    assert plan.routes == (ipaddress.ip_network("10.45.0.0/24"),)
    assert plan.mtu == 1420


async def test_an_unresolvable_name_is_retried_each_tick_until_dns_has_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    dns_up = False
    calls: list[str] = []

    async def fake_resolve(endpoint: HostPort) -> Endpoint:
        calls.append(endpoint.host)
        if endpoint.host == "gw1.example.net" and dns_up:
            return Endpoint(ipaddress.ip_address("198.18.0.1"), endpoint.port)
        raise ResolveError(f"{endpoint}: not known")

    monkeypatch.setattr(tunnel, "resolve", fake_resolve)
    monkeypatch.setattr(tunnel, "converge_link", _no_link)
    device = FakeDevice()
    config = make_config(tmp_path, extra_sections='[health]\nprobe = "none"\n')
    t = Tunnel(config, TunnelKeys(keys.generate_private_key()))
    with trio.fail_after(600):
        await t.bring_up(device)
        assert device.applied[-1].peers[0].endpoint is None
        for _ in range(3):
            await trio.sleep(5)
            await t.tick(device)
        assert len(device.applied) == 1  # nothing resolved, nothing re-applied
        dns_up = True
        await trio.sleep(5)
        await t.tick(device)
    assert device.applied[-1].peers[0].endpoint == Endpoint(
        ipaddress.ip_address("198.18.0.1"), 51820
    )
    # Bring-up, three failed ticks, the RERESOLVE of going down, then the one that worked.
    assert calls.count("gw1.example.net") == 6


async def test_recovery_actions_fail_over_and_reapply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    async def fake_resolve(endpoint: HostPort) -> Endpoint:
        return Endpoint(
            ipaddress.ip_address(endpoint.host if endpoint.host[0].isdigit() else "198.18.0.1"),
            endpoint.port,
        )

    monkeypatch.setattr(tunnel, "resolve", fake_resolve)
    monkeypatch.setattr(tunnel, "converge_link", _no_link)
    device = FakeDevice()  # never reports a handshake: the gateway stays down
    config = make_config(
        tmp_path, extra_sections='[health]\nprobe = "none"\ninterval = 1\nfailures = 2\n'
    )
    t = Tunnel(config, TunnelKeys(keys.generate_private_key()))
    with trio.fail_after(600):
        await t.bring_up(device)
        endpoints_seen = set()
        peer_counts = set()
        for _ in range(60):
            await trio.sleep(1)
            await t.tick(device)
            endpoints_seen.add(
                str(device.applied[-1].peers[0].endpoint) if device.applied[-1].peers else None
            )
            peer_counts.update(len(config.peers) for config in device.applied)
    runtime = t.gateways["edge-1"]
    assert runtime.health.state is tunnel.PeerState.RECOVERING
    assert {"198.18.0.1:51820", "198.18.0.9:51820"} <= endpoints_seen  # failed over and back
    assert 0 in peer_counts  # re-applied: the peer was removed once to force a new handshake
    assert t.status_line().startswith("down: edge-1 recovering")


async def _no_link(ifname: str, plan: object) -> None:
    return None


async def test_ip_literal_endpoints_resolve_without_dns() -> None:
    with trio.fail_after(5):
        endpoint = await tunnel.resolve(HostPort("2001:db8::1", 51820))
    assert str(endpoint) == "[2001:db8::1]:51820"


async def test_resolver_failure_is_a_resolve_error_not_a_crash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No real DNS query: test traffic stays on this machine.
    async def no_such_name(*args: object, **kwargs: object) -> list[object]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(trio.socket, "getaddrinfo", no_such_name)
    with trio.fail_after(10), pytest.raises(ResolveError, match=r"gw\.example\.net:51820: Name"):
        await tunnel.resolve(HostPort("gw.example.net", 51820))


async def test_slow_resolver_times_out(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    async def hangs(*args: object, **kwargs: object) -> list[object]:
        await trio.sleep_forever()
        raise AssertionError

    monkeypatch.setattr(trio.socket, "getaddrinfo", hangs)
    with trio.fail_after(60), pytest.raises(ResolveError, match="no DNS answer"):
        await tunnel.resolve(HostPort("gw.example.net", 51820))


def test_private_key_is_created_once_and_reused(tmp_path: Path) -> None:
    config = make_config(tmp_path, extra_interface='private_key_file = "keys/private.key"')
    first = load_tunnel_keys(config, create_missing=True)
    second = load_tunnel_keys(config, create_missing=True)
    assert first.private_key == second.private_key
    assert (tmp_path / "keys" / "private.key").stat().st_mode & 0o777 == 0o600
    assert keys.encode_key(first.private_key) not in repr(first)


def test_systemd_credential_is_read_never_created(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    config = make_config(
        tmp_path,
        extra_interface='private_key_credential = "tunneld.key"',
        environ={"CREDENTIALS_DIRECTORY": str(credentials)},
    )
    with pytest.raises(KeyFileError, match=r"tunneld\.key"):
        load_tunnel_keys(config, create_missing=True)
    assert not (credentials / "tunneld.key").exists()

    private = keys.generate_private_key()
    (credentials / "tunneld.key").write_text(keys.encode_key(private) + "\n")
    (credentials / "tunneld.key").chmod(0o400)
    assert load_tunnel_keys(config, create_missing=True).private_key == private


# -- out of file descriptors: the tick is skipped, never fatal ---------------------------------


def _emfile() -> OSError:
    return OSError(errno.EMFILE, "Too many open files")


def _exhausted_link() -> BaseException:
    return _emfile()  # what pyroute2 raised when it could not make its event loop


def _exhausted_uapi() -> BaseException:
    error = BackendError("cannot talk to userspace WireGuard: Too many open files")
    error.__cause__ = _emfile()
    return error


def _exhausted_probe() -> BaseException:
    return ExceptionGroup("from a probe's nursery", [_emfile()])


@pytest.mark.parametrize("make_error", [_exhausted_link, _exhausted_uapi, _exhausted_probe])
async def test_a_tick_out_of_descriptors_is_skipped_and_retried(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    make_error: Callable[[], BaseException],
) -> None:
    exhausted = False
    builds = 0

    async def link(ifname: str, plan: object) -> None:
        if exhausted:
            raise make_error()

    async def fake_resolve(endpoint: HostPort) -> Endpoint:
        return Endpoint(ipaddress.ip_address("198.18.0.1"), endpoint.port)

    device = FakeDevice()
    device.handshake = time.time()

    @contextlib.asynccontextmanager
    async def fake_open_device(*args: object) -> AsyncIterator[FakeDevice]:
        nonlocal builds
        builds += 1
        yield device

    async def no_watch(changed: object, *, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()

    monkeypatch.setattr(tunnel, "converge_link", link)
    monkeypatch.setattr(tunnel, "resolve", fake_resolve)
    monkeypatch.setattr(tunnel, "open_device", fake_open_device)
    monkeypatch.setattr(tunnel, "watch_network", no_watch)
    config = make_config(tmp_path, extra_sections='[health]\nprobe = "none"\ninterval = 1\n')
    t = Tunnel(config, TunnelKeys(keys.generate_private_key()))
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            await nursery.start(t.run)
            await trio.sleep(5.5)
            runtime = t.gateways["edge-1"]
            assert runtime.health.is_up
            observed = runtime.health.counters.probes + len(runtime.health.counters.transitions)
            exhausted = True
            stalled_at = t.last_tick
            await trio.sleep(30)
            # No progress claimed (the watchdog's measure), no rebuild, no verdict on the gateway.
            assert t.last_tick == stalled_at
            assert builds == 1
            assert runtime.health.is_up
            assert runtime.health.counters.probes + len(runtime.health.counters.transitions) == (
                observed
            )
            applied = len(device.applied)
            exhausted = False
            await trio.sleep(1.5)
            assert t.last_tick > stalled_at
            # A skipped tick may have stopped mid-recovery: the next one applies the device.
            assert len(device.applied) == applied + 1 and device.applied[-1].peers
            nursery.cancel_scope.cancel()
    reports = [r for r in caplog.records if "the health tick failed" in r.getMessage()]
    # Thirty skipped ticks in 30 s, said at most every 10 s.
    assert 2 <= len(reports) <= 4, [r.getMessage() for r in reports]
    assert "EMFILE" in reports[0].getMessage()
    assert any("works again after 30 failure(s)" in r.getMessage() for r in caplog.records)
