# ruff: noqa: RUF001 -- expected messages write ranges with an en dash (U+2013)
"""Tests of tunneld.config: every rule, every message shape, env overlay, render round trip.

Each test runs in its own directory (``chdir``) with an explicit ``environ`` dict, so messages
carry the label "tunneld.toml" exactly as a user would type it and the host environment never
leaks in. ``DEFAULT_CONFIG_PATH`` points at a file that does not exist unless a test says so.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunneld import config, config_reader
from tunneld.config import (
    RESERVED_ENV,
    Config,
    GatewayConfig,
    HostPort,
    InterfaceConfig,
    KeySource,
    load_config,
    render_config,
)
from tunneld.errors import ConfigError

KEY_A = base64.b64encode(bytes(range(32))).decode()
KEY_B = base64.b64encode(bytes(range(100, 132))).decode()
DELETE = object()  # in a change dict: remove the key

BASE_INTERFACE: dict[str, Any] = {"address": ["10.44.0.2/24"]}
BASE_GATEWAY: dict[str, Any] = {
    "public_key": KEY_A,
    "endpoints": ["gw1.example.net:51820"],
    "allowed_ips": ["10.44.0.1/32"],
}
FUZZ_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


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
    if isinstance(value, str):  # JSON escapes are valid TOML; TOML also wants DEL escaped
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(value)


def toml_table(header: str, table: dict[str, Any]) -> str:
    lines = [header] + [f"{key} = {toml_value(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


def changed(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = {**base, **changes}
    return {key: value for key, value in merged.items() if value is not DELETE}


def write(
    interface: dict[str, Any] | None = None,
    gateways: list[dict[str, Any]] | None = None,
    extra: str = "",
    name: str = "tunneld.toml",
) -> Path:
    """A config file from BASE_* with changes applied; returns the path as a user would type it."""
    text = toml_table("[interface]", changed(BASE_INTERFACE, interface or {}))
    for gateway in [{}] if gateways is None else gateways:
        text += "\n" + toml_table("[[gateway]]", changed(BASE_GATEWAY, gateway))
    path = Path(name)
    path.write_text(text + extra)
    return path


def problems(path: Path | None = None, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={} if environ is None else environ)
    assert str(info.value) == "\n".join(info.value.problems)
    assert info.value.exit_code == 2
    return info.value.problems


def problems_in_subprocess(path: Path, *, wrapper: tuple[str, ...] = ()) -> list[str]:
    """``problems(path)`` in a fresh interpreter started through ``wrapper``; a hang fails it.

    For what a test cannot do in its own process: drop capabilities, or be killed if it hangs
    (a signal cannot interrupt a read that loops in C, as ``read_bytes()`` on /dev/zero does).
    """
    script = (
        "import pathlib\n"
        "from tunneld.config import load_config\n"
        "from tunneld.errors import ConfigError\n"
        "try:\n"
        f"    load_config(pathlib.Path({str(path)!r}), environ={{}})\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    print('loaded without error')\n"
    )
    result = subprocess.run(
        [*wrapper, sys.executable, "-c", script],
        capture_output=True, text=True, timeout=20, check=True,
    )  # fmt: skip
    return result.stdout.splitlines()


# --- valid configurations -----------------------------------------------------------------


def test_full_valid_config(isolated: Path) -> None:
    path = Path("tunneld.toml")
    path.write_text(f"""
[interface]
name = "wg-edge.0"
private_key_file = "/etc/tunneld/private.key"
address = ["10.44.0.2/24", "fd44::2/64"]
listen_port = 51820
fwmark = 0xca6c
mtu = 1380
backend = "userspace"
userspace_binary = "/usr/bin/boringtun"

[[gateway]]
name = "edge-1"
public_key = "{KEY_A}"
endpoints = ["gw1.example.net:51820", "203.0.113.7:51820", "[2001:DB8::1]:51820"]
allowed_ips = ["10.44.0.1/32", "fd44::1/128"]
persistent_keepalive = 15
preshared_key_file = "edge-1.psk"

[[gateway]]
public_key = "{KEY_B}"
endpoints = ["gw2.example.net.:4500"]
allowed_ips = ["10.44.1.0/24"]
probe_address = "10.44.1.1"
""")
    assert load_config(path, environ={}) == Config(
        source="tunneld.toml",
        interface=InterfaceConfig(
            private_key=KeySource(Path("/etc/tunneld/private.key")),
            addresses=(
                ipaddress.IPv4Interface("10.44.0.2/24"),
                ipaddress.IPv6Interface("fd44::2/64"),
            ),
            name="wg-edge.0",
            listen_port=51820,
            fwmark=0xCA6C,
            mtu=1380,
            backend="userspace",
            userspace_binary="/usr/bin/boringtun",
        ),
        gateways=(
            GatewayConfig(
                name="edge-1",
                public_key=bytes(range(32)),
                endpoints=(
                    HostPort("gw1.example.net", 51820),
                    HostPort("203.0.113.7", 51820),
                    HostPort("2001:db8::1", 51820),
                ),
                allowed_ips=(
                    ipaddress.IPv4Network("10.44.0.1/32"),
                    ipaddress.IPv6Network("fd44::1/128"),
                ),
                persistent_keepalive_seconds=15,
                preshared_key=KeySource(isolated / "edge-1.psk"),
                probe_address=ipaddress.IPv4Address("10.44.0.1"),  # the first /32
            ),
            GatewayConfig(
                name="gateway-1",
                public_key=bytes(range(100, 132)),
                endpoints=(HostPort("gw2.example.net.", 4500),),
                allowed_ips=(ipaddress.IPv4Network("10.44.1.0/24"),),
                probe_address=ipaddress.IPv4Address("10.44.1.1"),
            ),
        ),
    )


def test_defaults() -> None:
    loaded = load_config(write(), environ={})
    assert loaded.interface == InterfaceConfig(
        private_key=KeySource(Path("/var/lib/tunneld/private.key")),
        addresses=(ipaddress.IPv4Interface("10.44.0.2/24"),),
    )
    assert loaded.interface.name == "tunneld0"
    assert loaded.interface.mtu == 1420
    assert loaded.interface.backend == "auto"
    assert loaded.interface.listen_port is None
    (gateway,) = loaded.gateways
    assert gateway.name == "gateway-0"
    assert gateway.persistent_keepalive_seconds == 25
    assert gateway.preshared_key is None


def test_allowed_ips_host_bits_are_masked_and_bare_addresses_are_hosts() -> None:
    loaded = load_config(write(gateways=[{"allowed_ips": ["10.44.0.9/24", "fd44::1"]}]), environ={})
    assert loaded.gateways[0].allowed_ips == (
        ipaddress.IPv4Network("10.44.0.0/24"),
        ipaddress.IPv6Network("fd44::1/128"),
    )


def test_relative_key_paths_are_relative_to_the_config_directory(isolated: Path) -> None:
    (isolated / "etc").mkdir()
    path = write(interface={"private_key_file": "keys/private.key"}, name="etc/tunneld.toml")
    loaded = load_config(path, environ={})
    assert loaded.interface.private_key == KeySource(isolated / "etc" / "keys" / "private.key")
    assert loaded.interface.private_key.describe() == f"file {isolated}/etc/keys/private.key"


def test_systemd_credential_resolves_under_credentials_directory() -> None:
    path = write(
        interface={"private_key_credential": "tunneld.key"},
        gateways=[{"preshared_key_credential": "edge.psk"}],
    )
    environ = {"CREDENTIALS_DIRECTORY": "/run/credentials/tunneld.service"}
    loaded = load_config(path, environ=environ)
    key = loaded.interface.private_key
    assert key == KeySource(Path("/run/credentials/tunneld.service/tunneld.key"), "tunneld.key")
    assert key.describe() == (
        "systemd credential tunneld.key (/run/credentials/tunneld.service/tunneld.key)"
    )
    assert loaded.gateways[0].preshared_key == KeySource(
        Path("/run/credentials/tunneld.service/edge.psk"), "edge.psk"
    )


@pytest.mark.parametrize(
    ("host_port", "text"),
    [
        (HostPort("gw.example", 51820), "gw.example:51820"),
        (HostPort("203.0.113.7", 1), "203.0.113.7:1"),
        (HostPort("2001:db8::1", 65535), "[2001:db8::1]:65535"),
    ],
)
def test_host_port_str_and_parse(host_port: HostPort, text: str) -> None:
    assert str(host_port) == text
    assert HostPort.parse(text) == host_port


# --- one bad value at a time: the exact line a user sees ----------------------------------

INTERFACE_ERRORS = [
    (
        {"address": ["10.44.0.2"]},
        'interface.address[0]: "10.44.0.2" has no prefix length; write it as 10.44.0.2/24',
    ),
    (
        {"address": ["10.44.0.2/24", "fd44::2"]},
        'interface.address[1]: "fd44::2" has no prefix length; write it as fd44::2/64',
    ),
    (
        {"address": ["10.44.0.300/24"]},
        'interface.address[0]: "10.44.0.300/24" is not an IP address/prefix, e.g. 10.44.0.2/24',
    ),
    (
        {"address": ["10.44.0.2/33"]},
        'interface.address[0]: "10.44.0.2/33" is not an IP address/prefix, e.g. 10.44.0.2/24',
    ),
    (
        {"address": ["10.44.0.2/24", "10.44.0.2/16"]},
        'interface.address[1]: "10.44.0.2/16" repeats interface.address[0]',
    ),
    (
        {"address": []},
        "interface.address: must not be empty;"
        ' expected addresses with prefix, e.g. ["10.44.0.2/24"]',
    ),
    (
        {"address": DELETE},
        'interface.address: missing; expected addresses with prefix, e.g. ["10.44.0.2/24"]'
        " (in the file or as TUNNELD_INTERFACE_ADDRESS)",
    ),
    (
        {"address": "10.44.0.2/24"},
        'interface.address: expected a list of addresses with prefix, e.g. ["10.44.0.2/24"],'
        ' got string "10.44.0.2/24"',
    ),
    ({"address": [5]}, "interface.address[0]: expected a string, got integer 5"),
    ({"name": "a" * 16}, f'interface.name: "{"a" * 16}" is 16 bytes long; Linux allows 1–15'),
    ({"name": ""}, 'interface.name: "" is 0 bytes long; Linux allows 1–15'),
    ({"name": "tün" * 5}, f'interface.name: "{"tün" * 5}" is 20 bytes long; Linux allows 1–15'),
    ({"name": "tun/0"}, 'interface.name: "tun/0" is not an interface name (A-Z a-z 0-9 _ . = + -)'),
    ({"name": "tun 0"}, 'interface.name: "tun 0" is not an interface name (A-Z a-z 0-9 _ . = + -)'),
    ({"name": ".."}, 'interface.name: ".." is not an interface name (A-Z a-z 0-9 _ . = + -)'),
    ({"name": 7}, "interface.name: expected a string, got integer 7"),
    ({"mtu": "1420"}, 'interface.mtu: expected an integer, got string "1420"'),
    ({"mtu": True}, "interface.mtu: expected an integer, got boolean true"),
    ({"mtu": 1420.0}, "interface.mtu: expected an integer, got float 1420.0"),
    ({"mtu": 1279}, "interface.mtu: 1279 is out of range (expected 1280–65535)"),
    ({"mtu": 65536}, "interface.mtu: 65536 is out of range (expected 1280–65535)"),
    ({"listen_port": 0}, "interface.listen_port: 0 is out of range (expected 1–65535)"),
    ({"listen_port": 65536}, "interface.listen_port: 65536 is out of range (expected 1–65535)"),
    ({"fwmark": -1}, "interface.fwmark: -1 is out of range (expected 0–4294967295)"),
    ({"fwmark": 2**32}, "interface.fwmark: 4294967296 is out of range (expected 0–4294967295)"),
    ({"backend": "wg"}, 'interface.backend: "wg" is not one of "auto", "kernel", "userspace"'),
    (
        {"userspace_binary": ""},
        "interface.userspace_binary: must not be empty; expected a command or path",
    ),
    (
        {"private_key_file": ""},
        "interface.private_key_file: must not be empty; expected a file path",
    ),
    (
        {"private_key_file": "keys/a\0b"},
        'interface.private_key_file: "keys/a\\u0000b" contains a NUL character',
    ),
    (
        {"private_key_file": "/k", "private_key_credential": "k"},
        "interface.private_key_credential: private_key_file is set too; use one of them",
    ),
    (
        {"private_key_credential": "tunneld.key"},
        "interface.private_key_credential: $CREDENTIALS_DIRECTORY is not set: the systemd unit"
        " needs LoadCredential=tunneld.key:/path/to/key (or SetCredential=), or use"
        " private_key_file instead",
    ),
    (
        {"private_key_credential": "../etc/shadow"},
        'interface.private_key_credential: "../etc/shadow" is not a credential name'
        " (a file name: no '/', not . or ..)",
    ),
    ({"mut": 1400}, 'interface.mut: unknown key; did you mean "mtu"?'),
    ({"colour": "blue"}, "interface.colour: unknown key"),
    (
        {"private_key": KEY_B},
        'interface.private_key: unknown key; did you mean "private_key_file"?; keys are never'
        " inline: put it in a 0600 file, set private_key_file",
    ),
]


@pytest.mark.parametrize(("changes", "expected"), INTERFACE_ERRORS)
def test_interface_errors(changes: dict[str, Any], expected: str) -> None:
    assert problems(write(interface=changes)) == [f"tunneld.toml: {expected}"]


GATEWAY_ERRORS = [
    (  # the example of the issue, verbatim
        {"endpoints": ["gw1.example.net:51820", "gw.example:99999"]},
        'gateway[0].endpoints[1]: "gw.example:99999" is not host:port (port 1–65535)',
    ),
    (
        {"endpoints": ["gw.example"]},
        'gateway[0].endpoints[0]: "gw.example" is not host:port (missing :port)',
    ),
    (
        {"endpoints": ["gw.example:0"]},
        'gateway[0].endpoints[0]: "gw.example:0" is not host:port (port 1–65535)',
    ),
    (
        {"endpoints": ["gw.example:65536"]},
        'gateway[0].endpoints[0]: "gw.example:65536" is not host:port (port 1–65535)',
    ),
    (
        {"endpoints": ["gw.example:wg"]},
        'gateway[0].endpoints[0]: "gw.example:wg" is not host:port (port 1–65535)',
    ),
    (
        {"endpoints": ["gw.example:"]},
        'gateway[0].endpoints[0]: "gw.example:" is not host:port (port 1–65535)',
    ),
    (
        {"endpoints": [":51820"]},
        'gateway[0].endpoints[0]: ":51820" is not host:port (empty host)',
    ),
    (
        {"endpoints": ["2001:db8::1:51820"]},
        'gateway[0].endpoints[0]: "2001:db8::1:51820" is not host:port'
        " (an IPv6 address needs brackets, e.g. [2001:db8::1]:51820)",
    ),
    (
        {"endpoints": ["[2001:db8::1]"]},
        'gateway[0].endpoints[0]: "[2001:db8::1]" is not host:port'
        " (missing :port after the bracketed address)",
    ),
    (
        {"endpoints": ["[2001:db8::zz]:51820"]},
        'gateway[0].endpoints[0]: "[2001:db8::zz]:51820" is not host:port'
        " (not a valid IPv6 address inside the brackets)",
    ),
    (
        {"endpoints": ["300.1.2.3:51820"]},
        'gateway[0].endpoints[0]: "300.1.2.3:51820" is not host:port (not a valid IPv4 address)',
    ),
    (
        {"endpoints": ["gw!.example:51820"]},
        'gateway[0].endpoints[0]: "gw!.example:51820" is not host:port'
        " (not a DNS name: letters, digits, '-', '_', dot-separated labels)",
    ),
    (
        {"endpoints": ["-gw.example:51820"]},
        'gateway[0].endpoints[0]: "-gw.example:51820" is not host:port'
        " (not a DNS name: letters, digits, '-', '_', dot-separated labels)",
    ),
    (
        {"endpoints": ["gw..example:51820"]},
        'gateway[0].endpoints[0]: "gw..example:51820" is not host:port'
        " (not a DNS name: letters, digits, '-', '_', dot-separated labels)",
    ),
    (
        {"endpoints": []},
        "gateway[0].endpoints: must not be empty;"
        ' expected host:port strings, e.g. ["gw.example:51820"]',
    ),
    (
        {"endpoints": 51820},
        "gateway[0].endpoints: expected a list of host:port strings,"
        ' e.g. ["gw.example:51820"], got integer 51820',
    ),
    (
        {"endpoints": DELETE},
        'gateway[0].endpoints: missing; expected host:port strings, e.g. ["gw.example:51820"]'
        " (in the file or as TUNNELD_GATEWAY_0_ENDPOINTS)",
    ),
    (
        {"public_key": DELETE},
        "gateway[0].public_key: missing; expected the gateway's base64 public key"
        " (in the file or as TUNNELD_GATEWAY_0_PUBLIC_KEY)",
    ),
    (
        {"public_key": "not a key, and not echoed"},
        "gateway[0].public_key: public key is not a WireGuard key"
        " (not valid base64; a key is 44 characters ending in '=')",
    ),
    (
        {"public_key": base64.b64encode(bytes(31)).decode()},
        "gateway[0].public_key: public key is not a WireGuard key"
        " (decodes to 31 bytes, expected 32)",
    ),
    ({"public_key": 1}, "gateway[0].public_key: expected a string, got integer 1"),
    (
        {"allowed_ips": ["0.0.0.0/0"]},
        'gateway[0].allowed_ips[0]: "0.0.0.0/0" is a default route: tunneld never routes all'
        " traffic through the tunnel; list the gateway's tunnel address, e.g. 10.44.0.1/32",
    ),
    (
        {"allowed_ips": ["10.44.0.1/32", "::/0"]},
        'gateway[0].allowed_ips[1]: "::/0" is a default route: tunneld never routes all'
        " traffic through the tunnel; list the gateway's tunnel address, e.g. 10.44.0.1/32",
    ),
    (
        {"allowed_ips": ["10.44.0.1/40"]},
        'gateway[0].allowed_ips[0]: "10.44.0.1/40" is not an IP network, e.g. 10.44.0.1/32',
    ),
    (
        {"allowed_ips": []},
        'gateway[0].allowed_ips: must not be empty; expected networks, e.g. ["10.44.0.1/32"]',
    ),
    (
        {"persistent_keepalive": -1},
        "gateway[0].persistent_keepalive: -1 is out of range (expected 0–65535)",
    ),
    (
        {"persistent_keepalive": False},
        "gateway[0].persistent_keepalive: expected an integer, got boolean false",
    ),
    (
        {"name": "edge 1"},
        'gateway[0].name: "edge 1" is not a gateway name ([A-Za-z0-9_.-], 1–63 chars)',
    ),
    (
        {"name": "e" * 64},
        f'gateway[0].name: "{"e" * 64}" is not a gateway name ([A-Za-z0-9_.-], 1–63 chars)',
    ),
    (
        {"preshared_key_file": "a.psk", "preshared_key_credential": "a.psk"},
        "gateway[0].preshared_key_credential: preshared_key_file is set too; use one of them",
    ),
    (
        {"endpoint": ["gw.example:1"]},
        'gateway[0].endpoint: unknown key; did you mean "endpoints"?',
    ),
    (
        {"preshared_key": KEY_B},
        'gateway[0].preshared_key: unknown key; did you mean "preshared_key_file"?; keys are'
        " never inline: put it in a 0600 file, set preshared_key_file",
    ),
]


@pytest.mark.parametrize(("changes", "expected"), GATEWAY_ERRORS)
def test_gateway_errors(changes: dict[str, Any], expected: str) -> None:
    assert problems(write(gateways=[changes])) == [f"tunneld.toml: {expected}"]


def test_key_material_is_never_echoed() -> None:
    (line,) = problems(write(gateways=[{"public_key": "c2VjcmV0LXByaXZhdGUta2V5"}]))
    assert "c2VjcmV0" not in line
    (line,) = problems(write(interface={"private_key": "c2VjcmV0LXByaXZhdGUta2V5"}))
    assert "c2VjcmV0" not in line


def test_no_gateway() -> None:
    assert problems(write(gateways=[])) == [
        "tunneld.toml: gateway: missing; at least one [[gateway]] table is required"
    ]


def test_gateway_written_as_a_single_table() -> None:
    path = Path("tunneld.toml")
    path.write_text(
        toml_table("[interface]", BASE_INTERFACE) + toml_table("[gateway]", BASE_GATEWAY)
    )
    assert problems(path) == [
        "tunneld.toml: gateway: expected an array of tables [[gateway]], got table"
    ]


def test_interface_of_the_wrong_type() -> None:
    path = write(gateways=[])
    path.write_text("interface = 5\n" + toml_table("[[gateway]]", BASE_GATEWAY))
    assert problems(path) == [
        "tunneld.toml: interface: expected a table [interface], got integer 5",
        "tunneld.toml: interface.address: missing;"
        ' expected addresses with prefix, e.g. ["10.44.0.2/24"]'
        " (in the file or as TUNNELD_INTERFACE_ADDRESS)",
    ]


def test_unknown_section() -> None:
    assert problems(write(extra="[tracing]\nlisten = '127.0.0.1:9477'\n")) == [
        "tunneld.toml: tracing: unknown key"
    ]
    assert problems(write(extra="[helth]\nprobe = 'icmp'\n")) == [
        'tunneld.toml: helth: unknown key; did you mean "health"?'
    ]
    assert problems(write(extra="[gateways]\n")) == [
        'tunneld.toml: gateways: unknown key; did you mean "gateway"?'
    ]


def test_duplicate_gateway_names_and_keys() -> None:
    second = {"name": "edge", "allowed_ips": ["10.44.0.3/32"]}
    assert problems(write(gateways=[{"name": "edge"}, second])) == [
        'tunneld.toml: gateway[1].name: "edge" is taken by gateway[0]',
        "tunneld.toml: gateway[1].public_key: same key as gateway[0];"
        " each gateway is a distinct peer",
    ]


def test_default_gateway_name_can_collide_with_an_explicit_one() -> None:
    second = {"public_key": KEY_B, "allowed_ips": ["10.44.0.3/32"]}
    assert problems(write(gateways=[{"name": "gateway-1"}, second])) == [
        'tunneld.toml: gateway[1].name: "gateway-1" is taken by gateway[0]'
    ]


def test_allowed_ips_overlapping_between_gateways() -> None:
    second = {
        "public_key": KEY_B,
        "allowed_ips": ["fd44::/64", "10.44.0.0/24"],
        "probe_address": "fd44::1",
    }
    assert problems(write(gateways=[{"allowed_ips": ["10.44.0.1/32", "fd45::1"]}, second])) == [
        "tunneld.toml: gateway[1].allowed_ips: 10.44.0.0/24 overlaps 10.44.0.1/32 of gateway[0];"
        " WireGuard routes an address to one peer only"
    ]


def test_every_problem_is_reported_at_once() -> None:
    path = write(
        interface={"name": "x" * 20, "mtu": "big", "address": ["10.0.0.1"]},
        gateways=[{"endpoints": ["gw"], "persistent_keepalive": 70000, "typo": 1}],
    )
    assert problems(path) == [
        f'tunneld.toml: interface.name: "{"x" * 20}" is 20 bytes long; Linux allows 1–15',
        'tunneld.toml: interface.address[0]: "10.0.0.1" has no prefix length;'
        " write it as 10.0.0.1/24",
        'tunneld.toml: interface.mtu: expected an integer, got string "big"',
        'tunneld.toml: gateway[0].endpoints[0]: "gw" is not host:port (missing :port)',
        "tunneld.toml: gateway[0].persistent_keepalive: 70000 is out of range (expected 0–65535)",
        "tunneld.toml: gateway[0].typo: unknown key",
    ]


# --- the file itself ------------------------------------------------------------------------


def test_malformed_toml_names_line_and_column() -> None:
    path = Path("tunneld.toml")
    path.write_text('[interface]\nname = "tunneld0"\naddress = [10.44.0.2/24]\n')
    (line,) = problems(path)
    assert line.startswith("tunneld.toml: invalid TOML: ")
    assert line.endswith("(at line 3, column 17)")


def test_missing_file_given_explicitly() -> None:
    assert problems(Path("nope.toml")) == ["nope.toml: no such file"]


def test_missing_file_named_by_tunneld_config() -> None:
    assert problems(environ={"TUNNELD_CONFIG": "/etc/nope.toml"}) == [
        "environment: TUNNELD_CONFIG: /etc/nope.toml: no such file"
    ]
    assert problems(environ={"TUNNELD_CONFIG": ""}) == [
        "environment: TUNNELD_CONFIG: empty; expected a file path"
    ]


def test_directory_instead_of_a_file() -> None:
    Path("dir.toml").mkdir()
    assert problems(Path("dir.toml")) == [
        "dir.toml: a directory, not a regular file; point it at the TOML file"
    ]


def test_fifo_is_refused_without_waiting_for_a_writer() -> None:
    os.mkfifo("tunneld.toml")
    assert problems_in_subprocess(Path("tunneld.toml")) == [
        "tunneld.toml: a FIFO, not a regular file; point it at the TOML file"
    ]


def test_endless_device_is_refused_without_reading_it() -> None:
    assert problems_in_subprocess(Path("/dev/zero")) == [
        "/dev/zero: a character device, not a regular file; point it at the TOML file"
    ]
    assert problems(environ={"TUNNELD_CONFIG": "/dev/zero"}) == [
        "environment: TUNNELD_CONFIG: /dev/zero: a character device, not a regular file;"
        " point it at the TOML file"
    ]


def test_symlink_to_a_file_is_followed() -> None:  # Kubernetes mounts a ConfigMap as symlinks
    Path("link.toml").symlink_to(write())
    assert load_config(Path("link.toml"), environ={}).source == "link.toml"


def test_file_size_limit() -> None:
    limit = config_reader.MAX_FILE_BYTES
    path = write()
    path.write_text(path.read_text() + "#" * (limit - path.stat().st_size - 1) + "\n")
    assert path.stat().st_size == limit
    assert load_config(path, environ={}).source == "tunneld.toml"
    path.write_text(path.read_text() + "\n")
    assert problems(path) == [
        f"tunneld.toml: larger than {limit} bytes; a config file is a few kilobytes: check the path"
    ]


def test_file_without_read_permission() -> None:
    path = write()
    path.chmod(0)
    expected = "tunneld.toml: cannot read: Permission denied"
    if os.geteuid() != 0:
        assert problems(path) == [expected]
        return
    # Root reads any file; without the DAC capabilities it is held to the mode like anyone.
    drop = "-dac_override,-dac_read_search"
    wrapper = ("setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}")
    assert problems_in_subprocess(path, wrapper=wrapper) == [expected]


def test_file_that_is_not_utf8() -> None:
    path = Path("tunneld.toml")
    path.write_bytes(b'[interface]\nname = "\xff"\n')
    assert problems(path) == ["tunneld.toml: not UTF-8 text (byte 20); TOML is UTF-8"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a = " + "[" * 5000 + "]" * 5000, "tunneld.toml: invalid TOML: nested too deeply"),
        ("a = " + "1" * 5000, "tunneld.toml: invalid TOML: Exceeds the limit (4300 digits)"),
    ],
)
def test_pathological_toml(text: str, expected: str) -> None:
    path = Path("tunneld.toml")
    path.write_text(text)
    (line,) = problems(path)
    assert line.startswith(expected)


def test_default_path_is_read_when_it_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    path = write()
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", path.absolute())
    assert load_config(environ={}).source == str(path.absolute())


def test_tunneld_config_names_the_file_and_an_explicit_path_wins() -> None:
    write(name="from-env.toml")
    write(interface={"mtu": 1300}, name="explicit.toml")
    assert load_config(environ={"TUNNELD_CONFIG": "from-env.toml"}).source == "from-env.toml"
    explicit = load_config(Path("explicit.toml"), environ={"TUNNELD_CONFIG": "from-env.toml"})
    assert explicit.interface.mtu == 1300


# --- environment ----------------------------------------------------------------------------

ENV_ONLY = {
    "TUNNELD_INTERFACE_ADDRESS": " 10.44.0.2/24 , fd44::2/64,",
    "TUNNELD_INTERFACE_PRIVATE_KEY_FILE": "keys/private.key",
    "TUNNELD_INTERFACE_FWMARK": "0xCA6C",
    "TUNNELD_INTERFACE_LISTEN_PORT": "51820",
    "TUNNELD_GATEWAY_0_PUBLIC_KEY": KEY_A,
    "TUNNELD_GATEWAY_0_ENDPOINTS": "gw1.example.net:51820,[2001:db8::1]:51820",
    "TUNNELD_GATEWAY_0_ALLOWED_IPS": "10.44.0.1/32",
    "TUNNELD_GATEWAY_0_PERSISTENT_KEEPALIVE": "0",
    "TUNNELD_LOG_LEVEL": "debug",  # reserved: read elsewhere
    "PATH": "/usr/bin",  # not ours
}


def test_environment_alone(isolated: Path) -> None:
    loaded = load_config(environ=ENV_ONLY)
    assert loaded.source == "environment"
    assert loaded.interface.addresses == (
        ipaddress.IPv4Interface("10.44.0.2/24"),
        ipaddress.IPv6Interface("fd44::2/64"),
    )
    assert loaded.interface.private_key == KeySource(isolated / "keys" / "private.key")
    assert loaded.interface.fwmark == 0xCA6C
    assert loaded.interface.listen_port == 51820
    assert loaded.gateways[0].endpoints == (
        HostPort("gw1.example.net", 51820),
        HostPort("2001:db8::1", 51820),
    )
    assert loaded.gateways[0].persistent_keepalive_seconds == 0


def test_environment_alone_in_a_deleted_working_directory(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (isolated / "gone").mkdir()
    monkeypatch.chdir(isolated / "gone")
    (isolated / "gone").rmdir()
    assert problems(environ=ENV_ONLY) == [
        'environment: TUNNELD_INTERFACE_PRIVATE_KEY_FILE: "keys/private.key" is relative,'
        " but the working directory it would be relative to no longer exists;"
        " use an absolute path"
    ]
    absolute = {**ENV_ONLY, "TUNNELD_INTERFACE_PRIVATE_KEY_FILE": "/etc/tunneld/private.key"}
    loaded = load_config(environ=absolute)
    assert loaded.interface.private_key == KeySource(Path("/etc/tunneld/private.key"))


def test_environment_alone_names_missing_keys_by_variable() -> None:
    env = {key: value for key, value in ENV_ONLY.items() if "PUBLIC_KEY" not in key}
    assert problems(environ=env) == [
        "environment: gateway[0].public_key: missing; expected the gateway's base64 public key"
        " (in the file or as TUNNELD_GATEWAY_0_PUBLIC_KEY)"
    ]


def test_environment_overrides_the_file() -> None:
    path = write(
        interface={"mtu": 1400},
        gateways=[{}, {"public_key": KEY_B, "allowed_ips": ["10.44.0.3/32"]}],
    )
    loaded = load_config(
        path,
        environ={
            "TUNNELD_INTERFACE_MTU": "1300",
            "TUNNELD_GATEWAY_1_ENDPOINTS": "gw9.example:1",
            "TUNNELD_GATEWAY_2_PUBLIC_KEY": base64.b64encode(bytes(32)).decode(),
            "TUNNELD_GATEWAY_2_ENDPOINTS": "gw3.example:51820",
            "TUNNELD_GATEWAY_2_ALLOWED_IPS": "10.44.0.4/32",
        },
    )
    assert loaded.source == "tunneld.toml"
    assert loaded.interface.mtu == 1300
    assert loaded.gateways[0].endpoints == (HostPort("gw1.example.net", 51820),)
    assert loaded.gateways[1].endpoints == (HostPort("gw9.example", 1),)  # replaced, not appended
    assert loaded.gateways[2].public_key == bytes(32)
    assert len(loaded.gateways) == 3


def test_bad_environment_values_name_the_variable() -> None:
    environ = {
        "TUNNELD_INTERFACE_MTU": "1300 bytes",
        "TUNNELD_INTERFACE_LISTEN_PORT": "",
        "TUNNELD_GATEWAY_0_ENDPOINTS": "gw1.example:51820, gw.example:99999",
        "TUNNELD_GATEWAY_0_ALLOWED_IPS": " , ",
        "TUNNELD_GATEWAY_0_PUBLIC_KEY": "x",
    }
    assert problems(write(), environ) == [
        'environment: TUNNELD_INTERFACE_LISTEN_PORT: "" is not an integer (decimal or 0x-hex)',
        'environment: TUNNELD_INTERFACE_MTU: "1300 bytes" is not an integer (decimal or 0x-hex)',
        "environment: TUNNELD_GATEWAY_0_PUBLIC_KEY: public key is not a WireGuard key"
        " (not valid base64; a key is 44 characters ending in '=')",
        'environment: TUNNELD_GATEWAY_0_ENDPOINTS: "gw.example:99999" is not host:port'
        " (port 1–65535)",
        "environment: TUNNELD_GATEWAY_0_ALLOWED_IPS: must not be empty;"
        ' expected networks, e.g. ["10.44.0.1/32"]',
    ]


def test_unknown_environment_variables() -> None:
    environ = {
        "TUNNELD_INTERFACE_ADRESS": "10.44.0.2/24",
        "TUNNELD_GATEWAY_0_COLOUR": "blue",
        "TUNNELD_GATEWAY_NAME": "edge",
        "TUNNELD_TRACING_LISTEN": "127.0.0.1:9477",
    }
    forms = (
        "TUNNELD_INTERFACE_<KEY>, TUNNELD_HEALTH_<KEY>, TUNNELD_PROXY_<KEY>, TUNNELD_METRICS_<KEY>,"
        " TUNNELD_GATEWAY_<N>_<KEY>,"
        f" TUNNELD_SERVICE_<N>_<KEY>, {', '.join(sorted(RESERVED_ENV))}"
    )
    assert problems(write(), environ) == [
        f"environment: TUNNELD_GATEWAY_NAME: unknown variable; expected {forms}",
        f"environment: TUNNELD_TRACING_LISTEN: unknown variable; expected {forms}",
        "environment: TUNNELD_INTERFACE_ADRESS: unknown variable;"
        " did you mean TUNNELD_INTERFACE_ADDRESS?",
        "environment: TUNNELD_GATEWAY_0_COLOUR: unknown variable",
    ]


def test_gateway_indices_in_the_environment_must_be_contiguous() -> None:
    environ = {"TUNNELD_GATEWAY_2_NAME": "edge-3"}
    assert problems(write(), environ) == [
        "environment: TUNNELD_GATEWAY_2_NAME: index 2 leaves a gap: there is no gateway 1"
        " in the file or environment (indices are 0-based, contiguous)"
    ]


def test_reserved_variables_are_not_config_keys() -> None:
    assert {"TUNNELD_CONFIG", "TUNNELD_LOG_LEVEL", "TUNNELD_LOG_FORMAT"} <= RESERVED_ENV
    environ = {"TUNNELD_LOG_LEVEL": "debug", "TUNNELD_LOG_FORMAT": "json"}
    assert load_config(write(), environ=environ).interface.name == "tunneld0"


# --- render ---------------------------------------------------------------------------------


def test_render_round_trip(isolated: Path) -> None:
    path = write(
        interface={
            "address": ["10.44.0.2/24", "fd44::2/64"],
            "private_key_credential": "tunneld.key",
            "listen_port": 51820,
            "fwmark": 51820,
            "backend": "kernel",
            "userspace_binary": 'odd "name"\\\x7f',
        },
        gateways=[
            {"endpoints": ["gw1.example.net:51820", "[2001:db8::1]:51820"], "name": "edge-1"},
            {
                "public_key": KEY_B,
                "allowed_ips": ["10.44.1.7/24"],
                "probe_address": "10.44.1.7",
                "preshared_key_file": "psk",
                "persistent_keepalive": 0,
            },
        ],
    )
    environ = {"CREDENTIALS_DIRECTORY": "/run/credentials/x", "TUNNELD_INTERFACE_MTU": "1300"}
    original = load_config(path, environ=environ)
    text = render_config(original)
    assert text.startswith("# effective configuration (file + environment)\n")
    assert f'public_key = "{KEY_B}"' in text
    assert f'preshared_key_file = "{isolated / "psk"}"' in text
    assert 'private_key_credential = "tunneld.key"' in text
    assert 'allowed_ips = ["10.44.1.0/24"]' in text
    Path("rendered.toml").write_text(text)
    reread = load_config(
        Path("rendered.toml"), environ={"CREDENTIALS_DIRECTORY": "/run/credentials/x"}
    )
    assert reread == dataclasses.replace(original, source="rendered.toml")


def test_render_round_trip_of_environment_alone() -> None:
    original = load_config(environ=ENV_ONLY)
    Path("rendered.toml").write_text(render_config(original))
    reread = load_config(Path("rendered.toml"), environ={})
    assert reread == dataclasses.replace(original, source="rendered.toml")


# --- properties -----------------------------------------------------------------------------

text_without_surrogates = st.text(st.characters(exclude_categories=["Cs"]))


@FUZZ_SETTINGS
@given(st.one_of(text_without_surrogates.map(str.encode), st.binary()))
def test_arbitrary_file_content_raises_only_config_error(content: bytes) -> None:
    path = Path("fuzz.toml")
    path.write_bytes(content)
    with contextlib.suppress(ConfigError):
        load_config(path, environ={})


toml_scalars = st.one_of(
    text_without_surrogates,
    st.integers(-(2**63), 2**63 - 1),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
)
toml_values = st.one_of(toml_scalars, st.lists(toml_scalars, max_size=4))

# Valid values per key; the fuzz test mixes them with anything at all.
VALID_INTERFACE: dict[str, list[Any]] = {
    "address": [["10.44.0.2/24"], ["fd44::2/64", "10.9.0.1/8"]],
    "name": ["wg0", "tunneld.a=b+c-d", "x" * 15],
    "mtu": [1280, 1420, 65535],
    "fwmark": [0, 0xFFFFFFFF, 51820],
    "listen_port": [1, 51820, 65535],
    "backend": ["auto", "kernel", "userspace"],
    "private_key_file": ["k", "/etc/k", "../k", 'we"ird\\päth'],
}
VALID_GATEWAY: dict[str, list[Any]] = {
    "name": ["edge-1", "a.b_c"],
    "public_key": [KEY_B, base64.b64encode(bytes(32)).decode()],
    "endpoints": [["[::1]:1", "gw.example.:65535"], ["192.0.2.1:51820"]],
    "allowed_ips": [["10.44.0.0/16", "fd44::7"], ["fd44::1", "10.44.0.1/32"]],
    "persistent_keepalive": [0, 65535],
    "probe_address": ["10.44.0.1"],  # inside every choice of allowed_ips
    "preshared_key_file": ["psk", "/run/psk"],
}


def table_changes(
    valid: dict[str, list[Any]], *, anything: bool
) -> st.SearchStrategy[dict[str, Any]]:
    def value(key: str) -> st.SearchStrategy[Any]:
        return (
            st.sampled_from(valid[key]) | toml_values if anything else st.sampled_from(valid[key])
        )

    change = st.sampled_from(sorted(valid)).flatmap(lambda key: st.tuples(st.just(key), value(key)))
    return st.lists(change, max_size=4).map(dict)


@FUZZ_SETTINGS
@given(table_changes(VALID_INTERFACE, anything=True), table_changes(VALID_GATEWAY, anything=True))
def test_arbitrary_values_raise_only_config_error(
    interface: dict[str, Any], gateway: dict[str, Any]
) -> None:
    with contextlib.suppress(ConfigError):
        load_config(write(interface, [gateway]), environ={})


@FUZZ_SETTINGS
@given(table_changes(VALID_INTERFACE, anything=False), table_changes(VALID_GATEWAY, anything=False))
def test_valid_configs_round_trip(interface: dict[str, Any], gateway: dict[str, Any]) -> None:
    loaded = load_config(write(interface, [gateway]), environ={})
    Path("rendered.toml").write_text(render_config(loaded))
    reread = load_config(Path("rendered.toml"), environ={})
    assert reread == dataclasses.replace(loaded, source="rendered.toml")


@FUZZ_SETTINGS
@given(
    st.dictionaries(
        st.sampled_from(
            [f"TUNNELD_INTERFACE_{k.upper()}" for k in ("address", "mtu", "fwmark", "name")]
            + [f"TUNNELD_GATEWAY_{i}_{k.upper()}" for i in (0, 1) for k in BASE_GATEWAY]
        ),
        text_without_surrogates.filter(lambda value: "\0" not in value),
        max_size=4,
    )
)
def test_arbitrary_environment_values_raise_only_config_error(environ: dict[str, str]) -> None:
    with contextlib.suppress(ConfigError):
        load_config(write(), environ=environ)


dns_names = st.from_regex(r"[a-z]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z]{2,6}){0,3}", fullmatch=True)
hosts = st.one_of(dns_names, st.ip_addresses().map(str))


@FUZZ_SETTINGS
@given(st.builds(HostPort, hosts, st.integers(1, 65535)))
def test_host_port_parse_inverts_str(host_port: HostPort) -> None:
    assert HostPort.parse(str(host_port)) == host_port


# --- [metrics] ------------------------------------------------------------------------------

SERVICE = (
    '\n[[service]]\nname = "billing"\nhosts = ["billing"]\nupstream = "http://127.0.0.1:8080"\n'
)


def test_metrics_listen_on_loopback_by_default_or_where_told() -> None:
    assert load_config(write(), environ={}).metrics.listen == HostPort("127.0.0.1", 9477)
    told = load_config(write(extra='[metrics]\nlisten = "[::]:9100"\n'), environ={})
    assert told.metrics.listen == HostPort("::", 9100)
    off = load_config(write(extra='[metrics]\nlisten = "off"\n'), environ={})
    assert off.metrics.listen is None
    from_env = load_config(write(), environ={"TUNNELD_METRICS_LISTEN": "10.0.0.5:9477"})
    assert from_env.metrics.listen == HostPort("10.0.0.5", 9477)


def test_metrics_bad_input_is_named() -> None:
    assert problems(write(extra='[metrics]\nlisten = "localhost:9477"\n')) == [
        'tunneld.toml: metrics.listen: "localhost:9477": listen on an IP address, not a name'
    ]
    assert problems(write(extra='[metrics]\nlisten = "127.0.0.1"\n')) == [
        'tunneld.toml: metrics.listen: "127.0.0.1" is not host:port (missing :port), '
        'e.g. "127.0.0.1:9477", or "off"'
    ]
    assert problems(write(extra=SERVICE + '[metrics]\nready_services = ["biling"]\n')) == [
        'tunneld.toml: metrics.ready_services[0]: "biling" is not a [[service]] name '
        "(services: billing)"
    ]


def test_metrics_and_access_log_render_and_read_back() -> None:
    extra = SERVICE + '[proxy]\naccess_log = true\n[metrics]\nready_services = ["billing"]\n'
    original = load_config(write(extra=extra), environ={})
    assert original.proxy.access_log and original.metrics.ready_services == ("billing",)
    Path("rendered.toml").write_text(render_config(original))
    reread = load_config(Path("rendered.toml"), environ={})
    assert reread == dataclasses.replace(original, source="rendered.toml")
