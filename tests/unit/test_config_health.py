# ruff: noqa: RUF001 -- expected messages write ranges with an en dash (U+2013)
"""Tests of ``[health]`` and each gateway's ``probe_address`` (tunneld.config_health).

Like test_config: each test runs in its own directory with an explicit ``environ``, so messages
carry the label "tunneld.toml" as a user would type it.
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from tunneld import config
from tunneld.config import Config, load_config, render_config
from tunneld.config_health import HealthConfig, default_probe_address
from tunneld.errors import ConfigError

KEY_A = base64.b64encode(bytes(range(32))).decode()
KEY_B = base64.b64encode(bytes(range(100, 132))).decode()
DELETE = object()  # in a change dict: remove the key
SECONDS = "(expected seconds, more than 0 and at most 31536000)"
GATEWAY: dict[str, Any] = {
    "public_key": KEY_A,
    "endpoints": ["gw1.example.net:51820"],
    "allowed_ips": ["10.44.0.1/32"],
}


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", tmp_path / "absent" / "tunneld.toml")
    return tmp_path


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(value)


def write(
    health: dict[str, Any] | None = None,
    gateways: list[dict[str, Any]] | None = None,
    address: str = "10.44.0.2/24",
) -> Path:
    text = f'[interface]\naddress = ["{address}"]\n'
    for changes in [{}] if gateways is None else gateways:
        gateway = {**GATEWAY, **changes}
        text += "\n[[gateway]]\n"
        text += "".join(f"{k} = {toml_value(v)}\n" for k, v in gateway.items() if v is not DELETE)
    if health is not None:
        text += "\n[health]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in health.items())
    path = Path("tunneld.toml")
    path.write_text(text)
    return path


def problems(path: Path | None = None, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={} if environ is None else environ)
    return info.value.problems


def round_trips(path: Path | None = None, environ: dict[str, str] | None = None) -> Config:
    loaded = load_config(path, environ={} if environ is None else environ)
    Path("rendered.toml").write_text(render_config(loaded))
    reread = load_config(Path("rendered.toml"), environ={})
    assert reread == dataclasses.replace(loaded, source="rendered.toml")
    return loaded


# --- valid configurations -------------------------------------------------------------------


def test_defaults() -> None:
    loaded = round_trips(write())
    assert loaded.health == HealthConfig()
    health = loaded.health
    assert (health.probe, health.probe_port, health.probe_spec) == ("icmp", None, "icmp")
    assert (health.interval_seconds, health.failures, health.probe_timeout_seconds) == (5, 3, 2)
    assert health.reresolve_interval_seconds == 60.0
    assert health.stale_handshake_seconds == 180.0
    assert loaded.gateways[0].probe_address == ipaddress.IPv4Address("10.44.0.1")


def test_every_key() -> None:
    health = {
        "probe": "tcp:22",
        "interval": 2.5,
        "failures": 5,
        "probe_timeout": 1,
        "reresolve_interval": 300,
        "stale_handshake": 240,
    }
    loaded = round_trips(write(health))
    assert loaded.health == HealthConfig(
        probe="tcp",
        probe_port=22,
        interval_seconds=2.5,
        failures=5,
        probe_timeout_seconds=1.0,
        reresolve_interval_seconds=300.0,
        stale_handshake_seconds=240.0,
    )
    assert loaded.health.probe_spec == "tcp:22"


@pytest.mark.parametrize(
    ("probe", "kind", "port"),
    [
        ("icmp", "icmp", None),
        ("none", "none", None),
        ("tcp:1", "tcp", 1),
        ("tcp:65535", "tcp", 65535),
    ],
)
def test_probe_forms(probe: str, kind: str, port: int | None) -> None:
    health = round_trips(write({"probe": probe})).health
    assert (health.probe, health.probe_port, health.probe_spec) == (kind, port, probe)


def test_default_probe_timeout_shrinks_with_a_short_interval() -> None:
    assert round_trips(write({"interval": 1})).health.probe_timeout_seconds == 0.5
    assert round_trips(write({"interval": 2})).health.probe_timeout_seconds == 1.0
    assert round_trips(write({"interval": 3})).health.probe_timeout_seconds == 2.0


@pytest.mark.parametrize(
    ("allowed_ips", "expected"),
    [
        (["10.44.0.1/32"], "10.44.0.1"),
        (["10.45.0.0/24", "fd44::1/128", "10.44.0.1/32"], "fd44::1"),  # the first single address
        (["10.44.0.9"], "10.44.0.9"),  # a bare address is a /32
    ],
)
def test_probe_address_defaults_to_the_first_single_address(
    allowed_ips: list[str], expected: str
) -> None:
    loaded = round_trips(write(gateways=[{"allowed_ips": allowed_ips}]))
    assert loaded.gateways[0].probe_address == ipaddress.ip_address(expected)


def test_default_probe_address_of_networks_alone_is_none() -> None:
    networks = [ipaddress.ip_network("10.44.0.0/24"), ipaddress.ip_network("fd44::/64")]
    assert default_probe_address(networks) is None
    assert default_probe_address([]) is None


@pytest.mark.parametrize(
    ("allowed_ips", "probe_address"),
    [
        (["10.44.1.0/24"], "10.44.1.1"),
        (["10.44.1.0/24", "fd44::/64"], "fd44::1"),
        (["10.44.0.1/32", "10.45.0.0/16"], "10.45.7.7"),  # overrides the default
        (["10.44.0.0/24"], "10.44.0.1"),  # the network holds this host's address too
    ],
)
def test_probe_address_inside_allowed_ips(allowed_ips: list[str], probe_address: str) -> None:
    changes = {"allowed_ips": allowed_ips, "probe_address": probe_address}
    loaded = round_trips(write(gateways=[changes]))
    assert loaded.gateways[0].probe_address == ipaddress.ip_address(probe_address)


def test_probe_address_none_judges_by_handshake_alone() -> None:
    loaded = round_trips(write(gateways=[{"probe_address": "none"}]))
    assert loaded.gateways[0].probe_address is None
    assert 'probe_address = "none"' in render_config(loaded)


def test_networks_alone_need_no_probe_address_when_probing_is_off() -> None:
    loaded = round_trips(write({"probe": "none"}, gateways=[{"allowed_ips": ["10.44.1.0/24"]}]))
    assert loaded.gateways[0].probe_address is None


def test_keepalive_may_be_off_when_a_probe_keeps_the_tunnel_busy() -> None:
    loaded = round_trips(write(gateways=[{"persistent_keepalive": 0}]))
    assert loaded.gateways[0].persistent_keepalive_seconds == 0


def test_two_gateways_each_with_its_own_probe_address() -> None:
    second = {"public_key": KEY_B, "allowed_ips": ["10.44.1.0/24"], "probe_address": "10.44.1.1"}
    first, other = round_trips(write(gateways=[{}, second])).gateways
    assert first.probe_address == ipaddress.IPv4Address("10.44.0.1")
    assert other.probe_address == ipaddress.IPv4Address("10.44.1.1")


# --- one bad value at a time ----------------------------------------------------------------

HEALTH_ERRORS = [
    ({"probe": "tcp"}, 'health.probe: "tcp" needs a port: "tcp:PORT", e.g. "tcp:22"'),
    ({"probe": "tcp:0"}, 'health.probe: "tcp:0" has port 0; expected tcp:1–65535'),
    ({"probe": "tcp:65536"}, 'health.probe: "tcp:65536" has port 65536; expected tcp:1–65535'),
    (
        {"probe": "tcp:ssh"},
        'health.probe: "tcp:ssh" is not one of "icmp", "tcp:PORT" or "none"',
    ),
    ({"probe": "ICMP"}, 'health.probe: "ICMP" is not one of "icmp", "tcp:PORT" or "none"'),
    ({"probe": "udp:53"}, 'health.probe: "udp:53" is not one of "icmp", "tcp:PORT" or "none"'),
    ({"probe": ""}, 'health.probe: "" is not one of "icmp", "tcp:PORT" or "none"'),
    ({"probe": 22}, "health.probe: expected a string, got integer 22"),
    ({"probe": False}, "health.probe: expected a string, got boolean false"),
    ({"interval": 0}, f"health.interval: 0 is out of range {SECONDS}"),
    ({"interval": "5s"}, 'health.interval: expected a number of seconds, got string "5s"'),
    ({"failures": 0}, "health.failures: 0 is out of range (expected 1–100)"),
    ({"failures": 101}, "health.failures: 101 is out of range (expected 1–100)"),
    ({"failures": 2.5}, "health.failures: expected an integer, got float 2.5"),
    (
        {"probe_timeout": 5},
        "health.probe_timeout: 5 is not less than health.interval (5);"
        " a probe must end before the next one starts",
    ),
    (
        {"probe_timeout": 3, "interval": 2.5},
        "health.probe_timeout: 3 is not less than health.interval (2.5);"
        " a probe must end before the next one starts",
    ),
    ({"probe_timeout": -1}, f"health.probe_timeout: -1 is out of range {SECONDS}"),
    ({"reresolve_interval": 0}, f"health.reresolve_interval: 0 is out of range {SECONDS}"),
    (
        {"stale_handshake": 60},
        "health.stale_handshake: 60 is less than 180, WireGuard's reject-after time:"
        " a healthy tunnel renews its handshake only every 2–3 minutes",
    ),
    (
        {"stale_handshake": 179.5},
        "health.stale_handshake: 179.5 is less than 180, WireGuard's reject-after time:"
        " a healthy tunnel renews its handshake only every 2–3 minutes",
    ),
    ({"intervall": 5}, 'health.intervall: unknown key; did you mean "interval"?'),
    ({"timeout": 1}, 'health.timeout: unknown key; did you mean "probe_timeout"?'),
]


@pytest.mark.parametrize(("changes", "expected"), HEALTH_ERRORS)
def test_health_errors(changes: dict[str, Any], expected: str) -> None:
    assert problems(write(changes)) == [f"tunneld.toml: {expected}"]


PROBE_ADDRESS_ERRORS = [
    (
        {"probe_address": "gw.example.net"},
        'gateway[0].probe_address: "gw.example.net" is not an IP address, e.g. "10.44.0.1",'
        ' or "none"',
    ),
    (
        {"probe_address": "10.44.0.1/32"},
        'gateway[0].probe_address: "10.44.0.1/32" is not an IP address, e.g. "10.44.0.1",'
        ' or "none"',
    ),
    (
        {"allowed_ips": ["fe80::1/128"], "probe_address": "fe80::1%wg0"},
        'gateway[0].probe_address: "fe80::1%wg0" is not an IP address, e.g. "10.44.0.1", or "none"',
    ),
    (
        {"probe_address": "None"},
        'gateway[0].probe_address: "None" is not an IP address, e.g. "10.44.0.1", or "none"',
    ),
    ({"probe_address": 7}, "gateway[0].probe_address: expected a string, got integer 7"),
    (
        {"probe_address": "10.44.0.3"},
        "gateway[0].probe_address: 10.44.0.3 is not inside allowed_ips (10.44.0.1/32);"
        " the probe must reach the gateway through its tunnel",
    ),
    (
        {"allowed_ips": ["10.44.0.1/32", "fd44::/64"], "probe_address": "fd45::1"},
        "gateway[0].probe_address: fd45::1 is not inside allowed_ips (10.44.0.1/32, fd44::/64);"
        " the probe must reach the gateway through its tunnel",
    ),
    (
        {"allowed_ips": ["10.44.0.0/24"], "probe_address": "10.44.0.2"},
        "gateway[0].probe_address: 10.44.0.2 is this host's own tunnel address"
        " (interface.address[0]); probe the gateway's",
    ),
    (
        {"probe_address": "none", "persistent_keepalive": 0},
        "gateway[0].persistent_keepalive: 0 turns keepalives off, and this gateway has no probe"
        ' (probe_address = "none"): nothing would renew the handshake of an idle tunnel, so it'
        " would be judged down; set persistent_keepalive, e.g. 25",
    ),
    (
        {"probe_adress": "10.44.0.1"},
        'gateway[0].probe_adress: unknown key; did you mean "probe_address"?',
    ),
]


@pytest.mark.parametrize(("changes", "expected"), PROBE_ADDRESS_ERRORS)
def test_probe_address_errors(changes: dict[str, Any], expected: str) -> None:
    assert problems(write(gateways=[changes])) == [f"tunneld.toml: {expected}"]


def test_keepalive_off_without_any_probe() -> None:
    assert problems(write({"probe": "none"}, gateways=[{"persistent_keepalive": 0}])) == [
        "tunneld.toml: gateway[0].persistent_keepalive: 0 turns keepalives off, and this gateway"
        ' has no probe (health.probe = "none"): nothing would renew the handshake of an idle'
        " tunnel, so it would be judged down; set persistent_keepalive, e.g. 25"
    ]


def test_networks_only_mean_no_probe_for_that_gateway() -> None:
    # No guess at which host of a network answers: judged by its handshake alone.
    for allowed in (["10.44.1.0/24"], ["fd44::/64", "10.44.1.0/24"]):
        config = load_config(write(gateways=[{"allowed_ips": allowed}]), {})
        assert config.gateways[0].probe_address is None
    # ... which needs keepalives to renew an idle tunnel's handshake.
    changes = {"allowed_ips": ["10.44.1.0/24"], "persistent_keepalive": 0}
    (line,) = problems(write(gateways=[changes]))
    assert line.startswith("tunneld.toml: gateway[0].persistent_keepalive: 0 turns keepalives off")


def test_health_of_the_wrong_type() -> None:
    path = write()
    path.write_text(path.read_text() + "health = 5\n")
    # a top-level key after [[gateway]] belongs to that gateway in TOML
    assert problems(path) == ["tunneld.toml: gateway[0].health: unknown key"]
    path.write_text('health = "icmp"\n' + path.read_text().replace("health = 5\n", ""))
    assert problems(path) == ['tunneld.toml: health: expected a table [health], got string "icmp"']


def test_every_problem_is_reported_at_once() -> None:
    path = write(
        {"probe": "ping", "failures": 0, "probe_timeout": 9, "stale_handshake": 1},
        gateways=[{"probe_address": "10.9.9.9"}],
    )
    assert problems(path) == [
        'tunneld.toml: health.probe: "ping" is not one of "icmp", "tcp:PORT" or "none"',
        "tunneld.toml: health.failures: 0 is out of range (expected 1–100)",
        "tunneld.toml: health.probe_timeout: 9 is not less than health.interval (5);"
        " a probe must end before the next one starts",
        "tunneld.toml: health.stale_handshake: 1 is less than 180, WireGuard's reject-after"
        " time: a healthy tunnel renews its handshake only every 2–3 minutes",
        "tunneld.toml: gateway[0].probe_address: 10.9.9.9 is not inside allowed_ips"
        " (10.44.0.1/32); the probe must reach the gateway through its tunnel",
    ]


# --- environment ----------------------------------------------------------------------------


def test_environment_sets_health_and_probe_address() -> None:
    environ = {
        "TUNNELD_HEALTH_PROBE": "tcp:443",
        "TUNNELD_HEALTH_INTERVAL": "10",
        "TUNNELD_HEALTH_FAILURES": "0x2",
        "TUNNELD_HEALTH_PROBE_TIMEOUT": ".5",
        "TUNNELD_HEALTH_RERESOLVE_INTERVAL": "30",
        "TUNNELD_HEALTH_STALE_HANDSHAKE": "200",
        "TUNNELD_GATEWAY_0_ALLOWED_IPS": "10.44.1.0/24",
        "TUNNELD_GATEWAY_0_PROBE_ADDRESS": "10.44.1.254",
    }
    loaded = round_trips(write(), environ)
    assert loaded.health == HealthConfig("tcp", 443, 10.0, 2, 0.5, 30.0, 200.0)
    assert loaded.gateways[0].probe_address == ipaddress.IPv4Address("10.44.1.254")


def test_environment_overrides_the_file() -> None:
    environ = {"TUNNELD_HEALTH_PROBE": "none", "TUNNELD_GATEWAY_0_PROBE_ADDRESS": "none"}
    loaded = round_trips(write({"probe": "tcp:22", "failures": 4}), environ)
    assert (loaded.health.probe, loaded.health.failures) == ("none", 4)
    assert loaded.gateways[0].probe_address is None


def test_bad_environment_values_name_the_variable() -> None:
    environ = {
        "TUNNELD_HEALTH_PROBE": "tcp",
        "TUNNELD_HEALTH_FAILURES": "three",
        "TUNNELD_HEALTH_INTERVAL": "1",
        "TUNNELD_HEALTH_PROBE_TIMEOUT": "1",
        "TUNNELD_HEALTH_STALE_HANDSHAKE": "3m",
        "TUNNELD_GATEWAY_0_PROBE_ADDRESS": "10.44.0.7",
    }
    assert problems(write(), environ) == [
        'environment: TUNNELD_HEALTH_PROBE: "tcp" needs a port: "tcp:PORT", e.g. "tcp:22"',
        'environment: TUNNELD_HEALTH_FAILURES: "three" is not an integer (decimal or 0x-hex)',
        "environment: TUNNELD_HEALTH_PROBE_TIMEOUT: 1 is not less than health.interval (1);"
        " a probe must end before the next one starts",
        'environment: TUNNELD_HEALTH_STALE_HANDSHAKE: "3m" is not a number of seconds,'
        " e.g. 10 or 0.5",
        "environment: TUNNELD_GATEWAY_0_PROBE_ADDRESS: 10.44.0.7 is not inside allowed_ips"
        " (10.44.0.1/32); the probe must reach the gateway through its tunnel",
    ]


def test_unknown_health_variable() -> None:
    assert problems(write(), {"TUNNELD_HEALTH_INTERVALL": "5"}) == [
        "environment: TUNNELD_HEALTH_INTERVALL: unknown variable;"
        " did you mean TUNNELD_HEALTH_INTERVAL?"
    ]


def test_environment_alone_with_a_network_probes_only_when_told_where() -> None:
    environ = {
        "TUNNELD_INTERFACE_ADDRESS": "10.44.0.2/24",
        "TUNNELD_INTERFACE_PRIVATE_KEY_FILE": "/k",
        "TUNNELD_GATEWAY_0_PUBLIC_KEY": KEY_A,
        "TUNNELD_GATEWAY_0_ENDPOINTS": "gw.example:51820",
        "TUNNELD_GATEWAY_0_ALLOWED_IPS": "10.44.1.0/24",
    }
    assert round_trips(environ=environ).gateways[0].probe_address is None
    loaded = round_trips(environ={**environ, "TUNNELD_GATEWAY_0_PROBE_ADDRESS": "10.44.1.1"})
    assert loaded.source == "environment"


# --- render ---------------------------------------------------------------------------------


def test_render_shows_every_health_key_and_each_probe_address() -> None:
    second = {"public_key": KEY_B, "allowed_ips": ["fd44::/64"], "probe_address": "none"}
    text = render_config(
        load_config(write({"probe": "tcp:8443", "interval": 0.5}, [{}, second]), environ={})
    )
    assert text.count('probe_address = "10.44.0.1"') == 1
    assert text.count('probe_address = "none"') == 1
    health = text[text.index("[health]") :].split("\n\n")[0].splitlines()
    assert health == [
        "[health]",
        'probe = "tcp:8443"',
        "interval = 0.5",
        "failures = 3",
        "probe_timeout = 0.25",
        "reresolve_interval = 60",
        "stale_handshake = 180",
    ]
