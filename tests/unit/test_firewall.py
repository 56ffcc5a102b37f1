"""The nftables filter's sans-IO half: the JSON transaction, error translation, the plan.

libnftables itself is exercised in tests/integration/test_firewall.py (it needs root and a
namespace); here only the ruleset is built and read back.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from tests.unit.conftest import FakeFirewall
from tests.unit.test_tunnel import FakeDevice, _no_link, make_config
from tunneld import keys, tunnel
from tunneld.config import HostPort
from tunneld.errors import FirewallError, FirewallUnavailableError, PermissionError_
from tunneld.tunnel import Tunnel, TunnelKeys
from tunneld.wireguard import firewall
from tunneld.wireguard.firewall import FilterPlan, NftablesError, ruleset, table_name, translate
from tunneld.wireguard.model import Endpoint

V4, V6 = ipaddress.ip_address("10.44.0.2"), ipaddress.ip_address("fd44::2")
PLAN = FilterPlan("tunneld0", (V4, V6), (7000, 80, 80))


def rules(commands: dict[str, Any], chain: str) -> list[list[dict[str, Any]]]:
    return [
        command["add"]["rule"]["expr"]
        for command in commands["nftables"]
        if "rule" in command.get("add", {}) and command["add"]["rule"]["chain"] == chain
    ]


def test_table_is_per_interface() -> None:
    assert table_name("tunneld0") == "tunneld_tunneld0"
    assert table_name("wg-a.b") != table_name("wg-a.c")


def test_one_transaction_replaces_the_table_whole() -> None:
    commands = ruleset(PLAN)["nftables"]
    table = {"table": {"family": "inet", "name": "tunneld_tunneld0"}}
    # add (so that delete cannot fail), delete (whatever was there), add anew: atomic.
    assert commands[1:4] == [{"add": table}, {"delete": table}, {"add": table}]
    added = [command["add"] for command in commands if "add" in command]
    chains = {add["chain"]["name"]: add["chain"] for add in added if "chain" in add}
    assert chains["input"]["hook"] == "input" and chains["forward"]["hook"] == "forward"
    assert "hook" not in chains["from_tunnel"]
    for hooked in (chains["input"], chains["forward"]):
        assert hooked["policy"] == "accept"  # we restrict the tunnel only, never the host


def test_input_jumps_by_interface_name_and_ends_in_drop() -> None:
    [jump] = rules(ruleset(PLAN), "input")
    assert jump[0] == {
        "match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "tunneld0"}
    }
    assert jump[1] == {"jump": {"target": "from_tunnel"}}
    judged = rules(ruleset(PLAN), "from_tunnel")
    assert judged[0][0]["match"]["left"] == {"ct": {"key": "state"}}
    assert judged[0][0]["match"]["right"] == ["established", "related"]
    assert judged[-1] == [{"counter": None}, {"drop": None}]


def test_proxy_ports_on_tunnel_addresses_and_echo_per_family() -> None:
    accepted = rules(ruleset(PLAN), "from_tunnel")[1:-1]
    summary = [
        tuple(
            (e["match"]["left"]["payload"]["protocol"], e["match"]["left"]["payload"]["field"],
             str(e["match"]["right"]))
            for e in expr if "match" in e
        )
        for expr in accepted
    ]  # fmt: skip
    assert summary == [
        (("ip", "daddr", "10.44.0.2"), ("tcp", "dport", "{'set': [80, 7000]}")),
        (("ip", "daddr", "10.44.0.2"), ("icmp", "type", "echo-request")),
        (("ip6", "daddr", "fd44::2"), ("tcp", "dport", "{'set': [80, 7000]}")),
        (("ip6", "daddr", "fd44::2"), ("icmpv6", "type", "echo-request")),
    ]
    assert all(expr[-1] == {"accept": None} for expr in accepted)


def test_no_services_means_no_port_and_one_family_means_one() -> None:
    accepted = rules(ruleset(FilterPlan("wg1", (V4,), ())), "from_tunnel")[1:-1]
    assert len(accepted) == 1  # the echo rule of IPv4 only
    assert accepted[0][1]["match"]["right"] == "echo-request"
    single = rules(ruleset(FilterPlan("wg1", (V4,), (5432,))), "from_tunnel")[1]
    assert single[1]["match"]["right"] == 5432  # one port: a value, not a set


def test_forward_is_dropped_both_ways() -> None:
    forward = rules(ruleset(PLAN), "forward")
    keys_ = [expr[0]["match"]["left"]["meta"]["key"] for expr in forward]
    assert keys_ == ["iifname", "oifname"]
    assert all(expr[-1] == {"drop": None} for expr in forward)


@pytest.mark.parametrize(
    ("text", "kind", "hint"),
    [
        (
            "Error: Could not process rule: Operation not permitted",
            PermissionError_,
            "CAP_NET_ADMIN",
        ),
        (
            "netlink: Error: cache initialization failed: Protocol not supported",
            FirewallUnavailableError,
            "nf_tables",
        ),
        ("Error: Could not process rule: Device or resource busy", FirewallError, "busy"),
    ],
)
def test_errors_say_what_to_do(text: str, kind: type[Exception], hint: str) -> None:
    error = translate(NftablesError(text), "installing the filter")
    assert type(error) is kind
    assert hint in str(error)
    assert getattr(error, "exit_code", None) == (1 if kind is FirewallError else 2)


def test_a_missing_library_is_a_prerequisite_error(monkeypatch: pytest.MonkeyPatch) -> None:
    firewall._library.cache_clear()
    monkeypatch.setattr(firewall, "LIBRARY", "libnftables-that-is-not-there.so.1")
    try:
        with pytest.raises(FirewallUnavailableError, match="apt-get install libnftables1"):
            firewall.Nftables().run(firewall.listing("tunneld0"))
        # Removing is a no-op then: nothing of ours can exist without nftables.
        assert firewall._remove("tunneld0", firewall.Nftables()) is False
    finally:
        firewall._library.cache_clear()


def test_the_tunnel_filters_every_port_the_proxy_listens_on(tmp_path: Path) -> None:
    services = """
[proxy]
http_port = 8080

[[service]]
name = "billing"
hosts = ["billing"]
upstream = "http://127.0.0.1:9000"

[[service]]
name = "postgres"
protocol = "tcp"
listen_port = 5432
upstream = "tcp://127.0.0.1:5432"
"""
    t = Tunnel(
        make_config(tmp_path, extra_sections=services), TunnelKeys(keys.generate_private_key())
    )
    plan = t.filter_plan()
    assert plan.ifname == t.ifname
    assert sorted(plan.tcp_ports) == [5432, 8080]
    assert set(plan.addresses) == {address.ip for address in t.config.interface.addresses}
    only_tcp = services.replace(
        'hosts = ["billing"]\nupstream = "http://127.0.0.1:9000"',
        'protocol = "tcp"\nlisten_port = 81\nupstream = "tcp://127.0.0.1:9000"',
    )
    t = Tunnel(
        make_config(tmp_path, extra_sections=only_tcp), TunnelKeys(keys.generate_private_key())
    )
    assert sorted(t.filter_plan().tcp_ports) == [81, 5432]  # no HTTP service: no HTTP port


async def test_bring_up_installs_and_firewall_false_removes(
    tmp_path: Path, fake_firewall: FakeFirewall, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    async def fake_resolve(endpoint: HostPort) -> Endpoint:
        return Endpoint(ipaddress.ip_address("198.18.0.1"), endpoint.port)

    monkeypatch.setattr(tunnel, "resolve", fake_resolve)
    monkeypatch.setattr(tunnel, "converge_link", _no_link)
    health = '[health]\nprobe = "none"\n'
    t = Tunnel(
        make_config(tmp_path, extra_sections=health), TunnelKeys(keys.generate_private_key())
    )
    device = FakeDevice()
    await t.bring_up(device)
    assert fake_firewall.tables[t.ifname] == t.filter_plan()
    t._device = device  # as while the supervisor runs: a reload applies at once

    # Someone flushes the ruleset: the next tick puts the table back.
    fake_firewall.tables.clear()
    await t.tick(device)
    assert t.ifname in fake_firewall.tables
    assert "is gone" in caplog.text

    off = make_config(tmp_path, extra_interface="firewall = false", extra_sections=health)
    await t.reconfigure(off, TunnelKeys(keys.generate_private_key()))
    assert t.ifname not in fake_firewall.tables

    def warnings() -> int:
        return sum(
            record.levelname == "WARNING" and "firewall = false" in record.getMessage()
            for record in caplog.records
        )

    assert warnings() == 1
    await t.reconfigure(off, TunnelKeys(keys.generate_private_key()))
    assert warnings() == 1  # said once, not at every reload or rebuild
