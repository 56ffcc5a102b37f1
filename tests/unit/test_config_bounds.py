"""Hostile and oversized input to config validation: every message stays short and one line.

A message that quotes a value shows at most ``MAX_SHOWN_CHARS`` of it, escaped, and says how
long it was; a value from a 1 MiB file or a 900 KB variable must not come back whole (it would
flood the journal, and a newline inside it would forge a second "problem" line).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunneld import config
from tunneld.config import GatewayConfig, load_config
from tunneld.config_reader import MAX_SHOWN_CHARS, Context, shown
from tunneld.errors import ConfigError

KEY = base64.b64encode(bytes(range(32))).decode()
HUGE = "\x1b[31m\nX" + "x" * 900_000  # 900 KB that starts with an escape sequence and a newline
#: A problem line: the key path, the value's first MAX_SHOWN_CHARS escaped, and the prose.
MAX_PROBLEM_CHARS = 2 * MAX_SHOWN_CHARS * 6 + 400


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", tmp_path / "absent" / "tunneld.toml")
    return tmp_path


def toml(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(toml(item) for item in value) + "]"
    return str(value)


def document(sections: dict[str, dict[str, Any]]) -> str:
    base: dict[str, dict[str, Any]] = {
        "interface": {"address": ["10.44.0.2/24"]},
        "gateway": {"public_key": KEY, "endpoints": ["gw:51820"], "allowed_ips": ["10.44.0.1/32"]},
        "service": {"name": "web", "hosts": ["web"], "upstream": "http://127.0.0.1:8080"},
    }
    text = ""
    for section, table in base.items():
        header = f"[[{section}]]" if section in ("gateway", "service") else f"[{section}]"
        merged = {**table, **sections.get(section, {})}
        text += (
            header
            + "\n"
            + "".join(f"{toml(key)} = {toml(value)}\n" for key, value in merged.items())
        )
        for sub, sub_table in sections.get(f"{section}.", {}).items():
            text += f"[{section}.{sub}]\n"
            text += "".join(f"{toml(key)} = {toml(value)}\n" for key, value in sub_table.items())
    for section in ("health", "metrics", "proxy"):
        if section in sections:
            text += f"[{section}]\n"
            text += "".join(
                f"{toml(key)} = {toml(value)}\n" for key, value in sections[section].items()
            )
    return text


def problems_of(text: str = "", environ: dict[str, str] | None = None) -> list[str]:
    path = Path("tunneld.toml")
    path.write_text(text or document({}))
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=environ or {})
    return info.value.problems


def assert_bounded(found: list[str]) -> None:
    assert found
    for problem in found:
        assert len(problem) <= MAX_PROBLEM_CHARS, problem[:300]
        assert problem.isprintable(), problem[:300]  # no newline, no ESC: one line, no forgery
    assert any(re.search(r"… \(\d+ (bytes|digits)\)", problem) for problem in found), found


@pytest.mark.parametrize(
    "sections",
    [
        {"interface": {"name": HUGE}},
        {"interface": {"backend": HUGE}},
        {"interface": {"address": [HUGE]}},
        {"interface": {"private_key_file": "\0" + HUGE}},
        {"interface": {HUGE: 1}},
        {"gateway": {"name": HUGE}},
        {"gateway": {"endpoints": [HUGE]}},
        {"gateway": {"endpoints": ["gw:" + HUGE]}},
        {"gateway": {"allowed_ips": [HUGE]}},
        {"gateway": {"probe_address": HUGE}},
        {"health": {"probe": HUGE}},
        {"health": {"probe": "tcp:" + HUGE}},
        {"metrics": {"listen": HUGE}},
        {"metrics": {"ready_services": [HUGE]}},
        {"proxy": {"allowed_sources": [HUGE]}},
        {"service": {"name": HUGE}},
        {"service": {"protocol": HUGE}},
        {"service": {"hosts": [HUGE]}},
        {"service": {"path_prefix": HUGE}},
        {"service": {"path_prefix": "/" + HUGE}},
        {"service": {"upstream": HUGE}},
        {"service": {"upstream": "http://" + HUGE}},
        {"service": {"upstream": "unix:/" + HUGE}},
        {"service": {"host_rewrite": HUGE}},
        {"service.": {"require_header": {"name": HUGE, "value_file": "s"}}},
        {
            "service": {"upstream": "https://127.0.0.1:1"},
            "service.": {"tls": {"server_name": HUGE}},
        },
    ],
    ids=lambda sections: ".".join(
        f"{section}{'.'.join(table)}" for section, table in sections.items()
    )[:60],
)
def test_a_huge_value_is_shown_bounded_and_escaped(sections: dict[str, dict[str, Any]]) -> None:
    assert_bounded(problems_of(document(sections)))


def test_a_huge_integer_is_shown_bounded() -> None:
    assert_bounded(problems_of(document({"interface": {"mtu": "9" * 4000}})))


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TUNNELD_INTERFACE_NAME", HUGE),
        ("TUNNELD_INTERFACE_MTU", HUGE),
        ("TUNNELD_INTERFACE_MTU", "9" * 900_000),  # int() refuses more than 4300 digits
        ("TUNNELD_INTERFACE_FWMARK", "0x" + "f" * 900_000),
        ("TUNNELD_HEALTH_INTERVAL", "9" * 900_000),
        ("TUNNELD_PROXY_ACCESS_LOG", HUGE),
        ("TUNNELD_SERVICE_0_UPSTREAM", HUGE),
        ("TUNNELD_" + "X" * 900_000, "1"),
        ("TUNNELD_SERVICE_" + "9" * 900_000 + "_NAME", "x"),
    ],
    ids=lambda value: value[:30],
)
def test_a_huge_variable_is_shown_bounded_and_escaped(variable: str, value: str) -> None:
    assert_bounded(problems_of(environ={variable: value}))


def test_shown_keeps_short_values_whole_and_says_how_long_long_ones_were() -> None:
    assert shown("billing") == '"billing"'
    assert shown("a\nb\x1b") == '"a\\nb\\u001b"'
    long = "é" * 1000
    text = shown(long)
    assert text.startswith('"' + "é" * MAX_SHOWN_CHARS + '"')
    assert text.endswith("(2000 bytes)")
    assert shown("\u202e" + "x") == '"\\u202ex"'  # bidi override: escaped, not applied


@pytest.mark.parametrize("listen", ["1abc:9477", "0x7f.1:9477"])
def test_metrics_listen_must_be_an_ip_address_not_a_name_that_starts_with_a_digit(
    listen: str,
) -> None:
    found = problems_of(document({"metrics": {"listen": listen}}))
    assert found == [
        f'tunneld.toml: metrics.listen: "{listen}": listen on an IP address, not a name'
    ]


# --- many gateways --------------------------------------------------------------------------


def _overlaps_by_pairs(gateways: list[GatewayConfig]) -> list[str]:
    """The overlap problems as defined: every network against every earlier gateway's."""
    found = []
    for index, gateway in enumerate(gateways):
        for earlier_index, earlier in enumerate(gateways[:index]):
            for network in gateway.allowed_ips:
                for taken in earlier.allowed_ips:
                    if network.version == taken.version and network.overlaps(taken):
                        found.append(
                            f"tunneld.toml: gateway[{index}].allowed_ips: {network} overlaps "
                            f"{taken} of gateway[{earlier_index}]; WireGuard routes an address "
                            "to one peer only"
                        )
    return found


def _gateways(networks: list[list[str]]) -> list[GatewayConfig]:
    return [
        GatewayConfig(
            name=f"g{index}",
            public_key=index.to_bytes(32, "big"),
            endpoints=(),
            allowed_ips=tuple(ipaddress.ip_network(text) for text in texts),
        )
        for index, texts in enumerate(networks)
    ]


_networks = st.sampled_from(
    ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32", "10.2.0.0/16", "10.1.2.3/32",
     "192.168.0.0/16", "fd00::/8", "fd00:1::/32", "fd00:1::1/128", "::ffff:10.0.0.0/104"]
)  # fmt: skip


@given(st.lists(st.lists(_networks, max_size=3), max_size=6))
def test_gateway_overlaps_are_the_pairwise_ones_in_the_same_order(
    networks: list[list[str]],
) -> None:
    gateways = _gateways(networks)
    ctx = Context("tunneld.toml")
    config._check_gateways(ctx, tuple(gateways))
    assert ctx.problems == _overlaps_by_pairs(gateways)


def test_gateway_overlaps_are_found_in_linear_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each network was compared with every network of every earlier gateway: 3,000 gateways
    took 7 s. Counted in comparisons, not timed."""
    calls = 0
    overlaps = ipaddress.IPv4Network.overlaps

    def counting(self: ipaddress.IPv4Network, other: ipaddress.IPv4Network) -> bool:
        nonlocal calls
        calls += 1
        return overlaps(self, other)

    monkeypatch.setattr(ipaddress.IPv4Network, "overlaps", counting)

    def comparisons(count: int) -> int:
        nonlocal calls
        calls = 0
        gateways = _gateways([[f"10.{i // 250}.{i % 250}.1/32"] for i in range(count)])
        ctx = Context("tunneld.toml")
        config._check_gateways(ctx, tuple(gateways))
        assert ctx.problems == []
        return calls

    small, large = comparisons(100), comparisons(800)
    assert large <= 10 * small + 100, f"{small} comparisons for 100 gateways, {large} for 800"


# --- file paths -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "environ",
    [
        {"TUNNELD_CONFIG": "/" + "a" * 900_000},
        {"TUNNELD_CONFIG": "/tmp/x\n/tunneld.toml"},  # a newline would start a forged line
    ],
    ids=["huge", "newline"],
)
def test_the_config_path_is_shown_bounded_and_escaped(environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, environ=environ)
    assert_bounded_lines(str(info.value))


def test_a_config_path_from_the_command_line_is_shown_bounded(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / ("b" * 300) / ("c" * 900_000), environ={})
    assert_bounded_lines(str(info.value))


@pytest.mark.parametrize(
    "sections",
    [
        {"interface": {"private_key_file": "/" + "k" * 5000}},
        {"gateway": {"preshared_key_file": "k/" * 3000}},
        {"service.": {"require_header": {"name": "X-S", "value_file": "/" + "s" * 4096}}},
        {
            "service": {"upstream": "https://127.0.0.1:1"},
            "service.": {"tls": {"ca_file": "/" + "c" * 4096}},
        },
    ],
    ids=["private_key_file", "preshared_key_file", "value_file", "ca_file"],
)
def test_a_file_path_longer_than_linux_opens_is_refused(sections: dict[str, Any]) -> None:
    """PATH_MAX is 4096 bytes with the NUL: a longer path fails at run time with ENAMETOOLONG,
    and every message about the file would carry it whole."""
    found = problems_of(document(sections))
    assert len(found) == 1 and "longer than 4095 bytes" in found[0], found
    assert_bounded(found)


def assert_bounded_lines(text: str) -> None:
    """One problem: one short line."""
    assert len(text) <= MAX_PROBLEM_CHARS and text.isprintable(), text[:300]


@pytest.mark.parametrize("path", ["/var/lib/tunneld/private\n.key", "key\x1b[2J", "a\x85b"])
def test_a_file_path_with_a_control_character_is_refused(path: str) -> None:
    """Every message about the file (``run``'s key errors too) would carry it, and a line break
    in a message forges a line of the log."""
    found = problems_of(document({"interface": {"private_key_file": path}}))
    assert len(found) == 1 and "control character" in found[0], found
    assert found[0].isprintable()


def test_a_config_file_of_1_gib_is_refused_without_reading_it() -> None:
    with Path("tunneld.toml").open("wb") as file:
        file.truncate(1 << 30)  # sparse: no disk used, but read() would return 1 GiB of NULs
    with pytest.raises(ConfigError) as info:
        load_config(Path("tunneld.toml"), environ={})
    assert info.value.problems == [
        "tunneld.toml: larger than 1048576 bytes; a config file is a few kilobytes: check the path"
    ]


def test_route_test_shows_a_huge_url_bounded() -> None:
    from tunneld.cli import split_test_url

    with pytest.raises(ValueError) as info:
        split_test_url("http://" + "h" * 900_000 + "\n/x")
    assert_bounded_lines(str(info.value))
