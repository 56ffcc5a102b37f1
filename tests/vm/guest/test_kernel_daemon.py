"""``tunneld run`` on a kernel that has WireGuard: interop both ways, auto, restart, tear-down,
and the nftables filter on the interface.

Runs inside the VM only (``tests/vm``).
"""

from __future__ import annotations

import signal
import subprocess
import textwrap

import pytest

from tests.integration.topology import GATEWAY_TUNNEL, HOST_TUNNEL, run
from tests.vm.guest.vmtopology import VmTopology


def tcp_service(port: int) -> str:
    """A TCP service on ``port`` of the tunnel address, relayed to 127.0.0.1:``port + 100``:
    the filter lets the gateway reach the proxy's ports only."""
    return textwrap.dedent(
        f"""
        [[service]]
        name = "banner"
        protocol = "tcp"
        listen_port = {port}
        upstream = "tcp://127.0.0.1:{port + 100}"
        """
    )


def filter_table(topology: VmTopology) -> str | None:
    """``nft list table`` of the connector's filter; None if there is none."""
    result = subprocess.run(
        ["ip", "netns", "exec", topology.host_ns,
         "nft", "list", "table", "inet", f"tunneld_{topology.host_ifname}"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    return result.stdout if result.returncode == 0 else None


def assert_traffic_both_ways(topology: VmTopology, port: int) -> None:
    """TCP through the tunnel, gateway → connector (a TCP service) and connector → gateway."""
    topology.listen(topology.host_ns, "127.0.0.1", port + 100, "hello from the private host")
    assert topology.fetch(topology.gateway_ns, HOST_TUNNEL, port) == "hello from the private host"
    topology.listen(topology.gateway_ns, GATEWAY_TUNNEL, port + 1, "hello from the gateway")
    assert topology.fetch(topology.host_ns, GATEWAY_TUNNEL, port + 1) == "hello from the gateway"


def assert_nothing_left(topology: VmTopology) -> None:
    assert topology.host_ifname not in topology.host_links()
    assert "proto 116" not in topology.host_routes()
    assert "10.44.0" not in run("ip", "-n", topology.host_ns, "addr")
    assert filter_table(topology) is None


def test_kernel_tunneld_with_userspace_gateway(topology: VmTopology) -> None:
    """Connector on kernel WireGuard, gateway a stock wireguard-go configured by ``wg``; the
    nftables filter on the kernel link."""
    topology.start_gateway()
    topology.write_config(backend='"kernel"', services=tcp_service(7001))
    daemon = topology.start_daemon()
    topology.wait_running(daemon)
    assert "(kernel backend)" in topology.daemon_log()
    link = run("ip", "-n", topology.host_ns, "-d", "-o", "link", "show", topology.host_ifname)
    assert " wireguard " in link

    topology.wait_handshake()
    assert_traffic_both_ways(topology, 7001)
    topology.ping(topology.gateway_ns, HOST_TUNNEL)
    # The filter on the kernel link: the service and ping pass, a stray 0.0.0.0 listener does
    # not (its SYN is counted and dropped).
    table = filter_table(topology)
    assert table is not None
    print(f"\n{table}")
    assert f'iifname "{topology.host_ifname}" jump from_tunnel' in table
    assert "tcp dport 7001 accept" in table
    topology.listen(topology.host_ns, "0.0.0.0", 2222, "stray")
    with pytest.raises(OSError):
        topology.fetch(topology.gateway_ns, HOST_TUNNEL, 2222, timeout=3)
    dropped = (filter_table(topology) or "").split("counter packets ")[1].split()[0]
    assert int(dropped) > 0

    status = topology.status()
    assert status["backend"] == "kernel"
    [peer] = status["peers"]
    assert peer["name"] == "edge-1"
    assert peer["receive_bytes"] > 0
    assert peer["transmit_bytes"] > 0
    # The userspace side saw the same session.
    gateway_peer = topology.gateway_wg().peers[topology.host_public_key]
    assert gateway_peer.latest_handshake > 0
    assert gateway_peer.transfer_rx > 0


def test_userspace_tunneld_with_kernel_gateway(topology: VmTopology) -> None:
    """The reverse: connector on wireguard-go (backend = "userspace"), gateway a kernel peer."""
    topology.start_kernel_gateway()
    assert " wireguard " in topology.gateway_link_kind()
    topology.write_config(backend='"userspace"', services=tcp_service(7003))
    daemon = topology.start_daemon()
    topology.wait_running(daemon)
    assert "(userspace backend)" in topology.daemon_log()
    link = run("ip", "-n", topology.host_ns, "-d", "-o", "link", "show", topology.host_ifname)
    assert " tun " in link

    topology.wait_handshake()
    assert_traffic_both_ways(topology, 7003)
    topology.ping(topology.host_ns, "fd44::1")  # IPv6 through the tunnel too
    topology.ping(topology.gateway_ns, "fd44::2")

    status = topology.status()
    assert status["backend"] == "userspace"
    assert status["peers"][0]["receive_bytes"] > 0
    gateway_peer = topology.gateway_wg().peers[topology.host_public_key]
    assert gateway_peer.latest_handshake > 0
    assert gateway_peer.transfer_rx > 0


def test_auto_picks_kernel_and_sigterm_removes_everything(topology: VmTopology) -> None:
    topology.start_gateway()
    topology.write_config()  # backend left at its default, "auto"
    daemon = topology.start_daemon()
    topology.wait_running(daemon)
    log = topology.daemon_log()
    assert "backend auto: using kernel WireGuard (kernel WireGuard available)" in log
    assert "(kernel backend)" in log
    assert "tdprobe" not in topology.host_links()  # the probe interface was deleted
    assert topology.status()["backend"] == "kernel"
    topology.wait_handshake()

    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0
    assert "tunneld stopped" in topology.daemon_log()
    assert_nothing_left(topology)


def test_restart_after_kill_9_adopts_the_kernel_link(topology: VmTopology) -> None:
    topology.start_gateway()
    topology.write_config(backend='"kernel"', services=tcp_service(7005))
    daemon = topology.start_daemon()
    topology.wait_running(daemon)
    topology.wait_handshake()
    index_before = topology.host_links().split(f": {topology.host_ifname}:")[0].split()[-1]

    daemon.kill()
    assert daemon.wait(timeout=10) == -signal.SIGKILL
    # A kernel interface outlives a SIGKILLed daemon, its WireGuard state too.
    assert topology.host_ifname in topology.host_links()
    assert topology.gateway_public_key in topology.host_wg().peers
    assert filter_table(topology) is not None  # and so does its filter, still filtering

    restarted = topology.start_daemon(log_name="restart.log")
    topology.wait_running(restarted, log_name="restart.log")
    restart_log = topology.daemon_log("restart.log")
    assert f"adopting existing WireGuard interface {topology.host_ifname}" in restart_log
    assert "created WireGuard interface" not in restart_log
    index_after = topology.host_links().split(f": {topology.host_ifname}:")[0].split()[-1]
    assert index_after == index_before  # the same link, adopted rather than recreated

    topology.wait_handshake()
    assert_traffic_both_ways(topology, 7005)

    restarted.send_signal(signal.SIGTERM)
    assert restarted.wait(timeout=30) == 0
    assert_nothing_left(topology)
