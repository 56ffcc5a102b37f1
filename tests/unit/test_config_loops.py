"""Upstreams that lead back into tunneld: its metrics listener, or its own proxy listeners.

A service whose upstream is ``[metrics] listen`` would serve /metrics and /status (peers,
endpoints, services) to the gateway; one whose upstream is a tunnel address at a port the proxy
listens on can never reach an origin. Config validation refuses both, naming the key.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from tunneld import config
from tunneld.config import load_config
from tunneld.errors import ConfigError

KEY = base64.b64encode(bytes(range(32))).decode()


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", tmp_path / "absent" / "tunneld.toml")
    return tmp_path


def load(
    upstream: str,
    *,
    metrics_listen: str | None = None,
    protocol: str = "http",
    extra: str = "",
    environ: dict[str, str] | None = None,
) -> list[str]:
    """The problems of a config with one service of ``upstream`` ([] if it loads)."""
    service = 'protocol = "tcp"\nlisten_port = 6000\n' if protocol == "tcp" else 'hosts = ["web"]\n'
    metrics = f'[metrics]\nlisten = "{metrics_listen}"\n' if metrics_listen else ""
    Path("tunneld.toml").write_text(f"""
[interface]
address = ["10.44.0.2/24", "fd44::2/64"]
[[gateway]]
public_key = "{KEY}"
endpoints = ["gw:51820"]
allowed_ips = ["10.44.0.1/32"]
[[service]]
name = "svc"
{service}upstream = "{upstream}"
{extra}
{metrics}""")
    try:
        load_config(Path("tunneld.toml"), environ=environ or {})
    except ConfigError as exc:
        return exc.problems
    return []


@pytest.mark.parametrize(
    ("metrics_listen", "upstream"),
    [
        (None, "http://127.0.0.1:9477"),  # the default listener
        (None, "http://localhost:9477"),
        (None, "http://LocalHost.:9477"),
        (None, "http://metrics.localhost:9477"),  # RFC 6761: all of .localhost is loopback
        (None, "http://0.0.0.0:9477"),  # connecting to 0.0.0.0 reaches 127.0.0.1
        (None, "http://[::ffff:127.0.0.1]:9477"),  # IPv4-mapped: the IPv4 address
        ("127.0.0.1:9100", "https://127.0.0.1:9100"),
        ("0.0.0.0:9477", "http://127.0.0.2:9477"),  # a wildcard takes all of 127.0.0.0/8
        ("0.0.0.0:9477", "http://10.44.0.2:9477"),  # ... and the tunnel address
        ("10.0.0.5:9477", "http://10.0.0.5:9477"),  # a pod IP
        ("[::1]:9477", "http://[::1]:9477"),
        ("[::1]:9477", "http://localhost:9477"),
        ("[::1]:9477", "http://[::]:9477"),
        ("[::]:9477", "http://[::1]:9477"),
        ("[::]:9477", "http://[fd44::2]:9477"),
    ],
)
def test_an_upstream_at_the_metrics_listener_is_refused(
    metrics_listen: str | None, upstream: str
) -> None:
    found = load(upstream, metrics_listen=metrics_listen)
    assert len(found) == 1, found
    assert found[0].startswith("tunneld.toml: service[0].upstream: ")
    assert "tunneld's own metrics listener" in found[0]
    assert f'metrics.listen = "{metrics_listen or "127.0.0.1:9477"}"' in found[0]


def test_a_tcp_upstream_at_the_metrics_listener_is_refused() -> None:
    found = load("tcp://127.0.0.1:9477", protocol="tcp")
    assert len(found) == 1 and "metrics listener" in found[0], found


def test_an_upstream_from_the_environment_is_named_by_its_variable() -> None:
    found = load("http://127.0.0.1:8080", environ={"TUNNELD_SERVICE_0_UPSTREAM": "http://[::1]:9"},
                 metrics_listen="[::1]:9")  # fmt: skip
    assert len(found) == 1 and found[0].startswith("environment: TUNNELD_SERVICE_0_UPSTREAM: ")


@pytest.mark.parametrize(
    ("metrics_listen", "upstream"),
    [
        (None, "http://127.0.0.1:9478"),  # another port
        (None, "http://127.0.0.2:9477"),  # another loopback address: not what 127.0.0.1 binds
        (None, "http://[::1]:9477"),
        (None, "http://metrics.internal:9477"),  # names other than localhost are not resolved
        ("off", "http://127.0.0.1:9477"),
        ("[::]:9477", "http://127.0.0.1:9477"),  # tunneld's IPv6 listeners are IPv6-only
        ("[::1]:9477", "http://127.0.0.1:9477"),
        ("0.0.0.0:9477", "http://[::1]:9477"),
        ("10.0.0.5:9477", "http://127.0.0.1:9477"),
    ],
)
def test_other_upstreams_are_accepted(metrics_listen: str | None, upstream: str) -> None:
    assert load(upstream, metrics_listen=metrics_listen) == []


@pytest.mark.parametrize(
    ("upstream", "protocol", "listener"),
    [
        ("http://10.44.0.2:80", "http", "proxy.http_port 80"),
        ("http://[fd44::2]:80", "http", "proxy.http_port 80"),
        ("tcp://10.44.0.2:6000", "tcp", 'service[0] ("svc"), its listen_port 6000'),
        ("http://10.44.0.2:5432", "http", 'service[1] ("pg"), its listen_port 5432'),
    ],
)
def test_an_upstream_at_a_proxy_listener_is_refused(
    upstream: str, protocol: str, listener: str
) -> None:
    pg = '[[service]]\nname = "pg"\nprotocol = "tcp"\nlisten_port = 5432\nupstream = "tcp://127.0.0.1:5432"'
    found = load(upstream, protocol=protocol, extra=pg)
    assert len(found) == 1, found
    assert found[0].startswith("tunneld.toml: service[0].upstream: ")
    assert "tunneld's own listener" in found[0] and listener in found[0], found


@pytest.mark.parametrize(
    ("upstream", "protocol"),
    [
        ("http://10.44.0.2:8080", "http"),  # an origin on the host's tunnel address
        ("tcp://127.0.0.1:6000", "tcp"),  # the usual: the same port on loopback
        ("tcp://10.44.0.2:80", "tcp"),  # no http service: nothing of tunneld's listens on 80
        ("http://0.0.0.0:80", "http"),  # 0.0.0.0 is loopback, not the tunnel address
    ],
)
def test_origins_beside_the_proxy_listeners_are_accepted(upstream: str, protocol: str) -> None:
    assert load(upstream, protocol=protocol) == []
