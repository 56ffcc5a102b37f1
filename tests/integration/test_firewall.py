"""The nftables filter on the WireGuard interface, against a gateway that tries to roam.

The topology of :mod:`tests.integration.topology`, plus what a compromised gateway would aim at:

    gateway netns ── tunnel ──▶ host netns (tunneld) ── veth ──▶ LAN netns "tdlan-XXXX"
    10.44.0.1                   10.44.0.2, LAN 198.19.0.1          198.19.0.2
                                a stray listener on 0.0.0.0:2222   a listener on 0.0.0.0:2223
                                ip_forward = 1

The gateway's peer entry for the connector is widened to 198.19.0.0/24 and the gateway routes
that network into its tunnel, so without a filter the host's LAN address and the LAN host are
one hop away. Every service (HTTP and TCP) must stay reachable, the health probe must keep the
gateway up, and nothing else may answer.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration import netns
from tests.integration.topology import HOST_TUNNEL, Topology, run, wait_for

pytestmark = pytest.mark.root

SERVERS = Path(__file__).parent / "servers"
HOST_LAN, LAN_HOST = "198.19.0.1", "198.19.0.2"
STRAY_PORT, LAN_PORT, TCP_SERVICE_PORT = 2222, 2223, 7000


@dataclass
class Roaming:
    """The topology with a LAN behind the connector and a gateway allowed to route into it."""

    topology: Topology
    lan_ns: str

    @property
    def table(self) -> str:
        return f"tunneld_{self.topology.host_ifname}"

    def table_json(self) -> list[dict[str, object]] | None:
        """``nft -j list table`` in the connector's namespace; None if there is no table."""
        result = subprocess.run(
            ["ip", "netns", "exec", self.topology.host_ns,
             "nft", "-j", "list", "table", "inet", self.table],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            assert "No such file or directory" in result.stderr, result.stderr
            return None
        return json.loads(result.stdout)["nftables"]  # type: ignore[no-any-return]

    def table_text(self) -> str:
        return run("ip", "netns", "exec", self.topology.host_ns,
                   "nft", "list", "table", "inet", self.table)  # fmt: skip

    def reachable(self, address: str, port: int) -> str:
        """What a TCP server at ``address:port`` says to the gateway ("" if unreachable)."""
        return self.topology.gateway_connect(address, port, timeout=2.0)

    def http_status(self, host: str) -> int:
        connection = netns.HTTPConnection(self.topology.gateway_ns, HOST_TUNNEL, timeout=10)
        try:
            connection.request("GET", "/hello", headers={"Host": host})
            return connection.getresponse().status
        finally:
            connection.close()

    def ping_from_gateway(self, address: str) -> bool:
        argv = ["ip", "netns", "exec", self.topology.gateway_ns, "ping", "-c1", "-W2", address]
        return subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode == 0

    def gateway_state(self) -> str:
        return str(self.topology.status()["peers"][0]["state"])

    def assert_services_reachable(self) -> None:
        assert self.http_status("billing") == 200
        assert self.reachable(HOST_TUNNEL, TCP_SERVICE_PORT) == "tcp service"

    def assert_only_services_reachable(self) -> None:
        self.assert_services_reachable()
        assert self.reachable(HOST_TUNNEL, STRAY_PORT) == ""
        assert self.reachable(HOST_LAN, STRAY_PORT) == ""
        assert self.reachable(LAN_HOST, LAN_PORT) == ""

    def assert_everything_reachable(self) -> None:
        """The break: with nothing filtering, the gateway reaches far more than the services."""
        self.assert_services_reachable()
        assert self.reachable(HOST_TUNNEL, STRAY_PORT) == "stray"
        assert self.reachable(HOST_LAN, STRAY_PORT) == "stray"
        assert self.reachable(LAN_HOST, LAN_PORT) == "lan host"


def services(extra: str = "") -> str:
    return textwrap.dedent(
        f"""
        [[service]]
        name = "billing"
        hosts = ["billing"]
        upstream = "http://127.0.0.1:8081"

        [[service]]
        name = "banner"
        protocol = "tcp"
        listen_port = {TCP_SERVICE_PORT}
        upstream = "tcp://127.0.0.1:7100"
        """
    ) + textwrap.dedent(extra)


def serve_in(topology: Topology, namespace: str, address: str, port: int, banner: str) -> None:
    """A greeting TCP server in ``namespace`` (stopped by the topology's close)."""
    topology.start_host_listener(address, port, banner, namespace=namespace)


@pytest.fixture
def roaming(topology: Topology) -> Iterator[Roaming]:
    suffix = topology.suffix
    lan = f"tdlan-{suffix}"
    run("ip", "netns", "add", lan)
    try:
        run("ip", "-n", lan, "link", "set", "lo", "up")
        run(
            "ip", "link", "add", f"vl{suffix}", "netns", lan,
            "type", "veth", "peer", "name", f"vx{suffix}", "netns", topology.host_ns,
        )  # fmt: skip
        for ns, link, address in ((lan, f"vl{suffix}", LAN_HOST),
                                  (topology.host_ns, f"vx{suffix}", HOST_LAN)):  # fmt: skip
            run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", link)
            run("ip", "-n", ns, "link", "set", link, "up")
        run("ip", "-n", lan, "route", "add", "10.44.0.0/24", "via", HOST_LAN)
        run("ip", "netns", "exec", topology.host_ns, "sysctl", "-q", "net.ipv4.ip_forward=1")
        # The gateway may send to the LAN through this connector, and routes it there.
        run(
            "ip", "netns", "exec", topology.gateway_ns, "wg", "set", topology.gateway_ifname,
            "peer", topology.host_public_key, "allowed-ips", f"{HOST_TUNNEL}/32,198.19.0.0/24",
        )  # fmt: skip
        run("ip", "-n", topology.gateway_ns, "route", "add", "198.19.0.0/24",
            "dev", topology.gateway_ifname)  # fmt: skip

        serve_in(topology, topology.host_ns, "0.0.0.0", STRAY_PORT, "stray")
        serve_in(topology, lan, "0.0.0.0", LAN_PORT, "lan host")
        serve_in(topology, topology.host_ns, "127.0.0.1", 7100, "tcp service")
        origin = subprocess.Popen(
            ["ip", "netns", "exec", topology.host_ns, sys.executable,
             str(SERVERS / "origin.py"), "billing", "tcp", "8081"],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        topology.processes.append(origin)
        assert origin.stdout is not None
        assert origin.stdout.readline().strip() == b"ready"
        topology.write_config(services=services())
        yield Roaming(topology, lan)
    finally:
        run("ip", "netns", "del", lan, check=False)


def start(roaming: Roaming, log_name: str = "tunneld.log") -> subprocess.Popen[bytes]:
    daemon = roaming.topology.start_daemon(log_name=log_name)
    roaming.topology.wait_running(daemon, log_name=log_name)
    roaming.topology.wait_handshake()
    return daemon


def test_gateway_reaches_the_services_and_nothing_else(roaming: Roaming) -> None:
    daemon = start(roaming)
    roaming.assert_only_services_reachable()
    # The gateway's ping (an operator's first check) still answers; the LAN's does not.
    assert roaming.ping_from_gateway(HOST_TUNNEL)
    assert not roaming.ping_from_gateway(LAN_HOST)
    # The ICMP probe's answers come back through the filter: the gateway is up, and stays up.
    wait_for("the gateway reported up", lambda: roaming.gateway_state() == "up", timeout=30)
    table = roaming.table_text()
    print(f"\n{table}")
    dropped = table.split("counter packets ")[1].split()[0]
    assert int(dropped) > 0, table
    assert roaming.topology.host_ifname in table

    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0
    assert roaming.table_json() is None  # removed with the interface
    assert roaming.topology.host_ifname not in roaming.topology.host_links()


def test_a_table_left_by_kill_9_is_replaced_at_the_next_start(roaming: Roaming) -> None:
    daemon = start(roaming)
    daemon.kill()
    daemon.wait(timeout=10)
    # Left behind, still filtering: the interface outlives the daemon, and so does its filter.
    assert roaming.table_json() is not None
    assert roaming.reachable(HOST_TUNNEL, STRAY_PORT) == ""
    # Something stale in it, as an older version's table would have: a chain that lets all in.
    run("ip", "netns", "exec", roaming.topology.host_ns, "nft", "add", "chain", "inet",
        roaming.table, "stale")  # fmt: skip

    restarted = start(roaming, log_name="restart.log")
    table = roaming.table_json()
    assert table is not None
    chains = {item["chain"]["name"] for item in table if "chain" in item}  # type: ignore[index]
    assert chains == {"input", "from_tunnel", "forward"}  # replaced whole, "stale" is gone
    roaming.assert_only_services_reachable()
    restarted.send_signal(signal.SIGTERM)
    assert restarted.wait(timeout=30) == 0
    assert roaming.table_json() is None


def test_reload_updates_the_filter_and_a_flushed_table_comes_back(roaming: Roaming) -> None:
    # A TCP probe this time: its answer (an RST from the gateway, which listens on no such port)
    # is "established" to conntrack and must pass the filter too.
    topology = roaming.topology
    topology.write_config(services='[health]\nprobe = "tcp:9"\ninterval = 1\n' + services())
    daemon = start(roaming)
    wait_for("the gateway reported up", lambda: roaming.gateway_state() == "up", timeout=30)
    serve_in(topology, topology.host_ns, "127.0.0.1", 7101, "second tcp service")
    assert roaming.reachable(HOST_TUNNEL, 7001) == ""

    topology.write_config(
        services='[health]\nprobe = "tcp:9"\ninterval = 1\n'
        + services(
            """
            [[service]]
            name = "second"
            protocol = "tcp"
            listen_port = 7001
            upstream = "tcp://127.0.0.1:7101"
            """
        )
    )
    result = topology.tunneld("reload", "-c", str(topology.config_file))
    assert result.returncode == 0, result.stderr
    wait_for("the reload", lambda: "reloaded the config" in topology.daemon_log())
    assert "7001" in roaming.table_text()
    wait_for(
        "the new service", lambda: roaming.reachable(HOST_TUNNEL, 7001) == "second tcp service"
    )
    roaming.assert_only_services_reachable()

    # The host's firewall reloads with `flush ruleset`: the next tick puts our table back.
    run("ip", "netns", "exec", topology.host_ns, "nft", "flush", "ruleset")
    assert roaming.reachable(HOST_TUNNEL, STRAY_PORT) == "stray"  # the gap we must close
    wait_for("the table to come back", lambda: roaming.table_json() is not None, timeout=10)
    assert "is gone" in topology.daemon_log()
    roaming.assert_only_services_reachable()
    assert roaming.gateway_state() == "up"
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0


def test_firewall_false_leaves_no_table_and_says_so(roaming: Roaming) -> None:
    topology = roaming.topology
    # A table of ours from an earlier run with the filter on: the opt-out removes it.
    run("ip", "netns", "exec", topology.host_ns, "nft", "add", "table", "inet", roaming.table)
    topology.write_config(services=services(), firewall="false")
    daemon = start(roaming)
    assert roaming.table_json() is None
    log = topology.daemon_log()
    assert "WARNING" in log and "interface.firewall = false" in log
    roaming.assert_everything_reachable()  # the host's own firewall's job now
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0


def test_up_installs_the_filter_and_down_removes_it(roaming: Roaming) -> None:
    topology = roaming.topology
    up = topology.tunneld("up", "-c", str(topology.config_file))
    assert up.returncode == 0, up.stderr
    assert roaming.table_json() is not None
    down = topology.tunneld("down", "-i", topology.host_ifname)
    assert down.returncode == 0, down.stderr
    assert roaming.table_json() is None
    assert topology.host_ifname not in topology.host_links()
