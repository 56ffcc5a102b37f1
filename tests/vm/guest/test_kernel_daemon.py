"""``tunneld run`` on a kernel that has WireGuard: interop both ways, auto, restart, tear-down.

Runs inside the VM only (``tests/vm``).
"""

from __future__ import annotations

import signal

from tests.integration.topology import GATEWAY_TUNNEL, HOST_TUNNEL, run
from tests.vm.guest.vmtopology import VmTopology


def assert_traffic_both_ways(topology: VmTopology, port: int) -> None:
    """TCP through the tunnel, gateway → connector and connector → gateway."""
    topology.listen(topology.host_ns, HOST_TUNNEL, port, "hello from the private host")
    assert topology.fetch(topology.gateway_ns, HOST_TUNNEL, port) == "hello from the private host"
    topology.listen(topology.gateway_ns, GATEWAY_TUNNEL, port + 1, "hello from the gateway")
    assert topology.fetch(topology.host_ns, GATEWAY_TUNNEL, port + 1) == "hello from the gateway"


def assert_nothing_left(topology: VmTopology) -> None:
    assert topology.host_ifname not in topology.host_links()
    assert "proto 116" not in topology.host_routes()
    assert "10.44.0" not in run("ip", "-n", topology.host_ns, "addr")


def test_kernel_tunneld_with_userspace_gateway(topology: VmTopology) -> None:
    """Connector on kernel WireGuard, gateway a stock wireguard-go configured by ``wg``."""
    topology.start_gateway()
    topology.write_config(backend='"kernel"')
    daemon = topology.start_daemon()
    topology.wait_running(daemon)
    assert "(kernel backend)" in topology.daemon_log()
    link = run("ip", "-n", topology.host_ns, "-d", "-o", "link", "show", topology.host_ifname)
    assert " wireguard " in link

    topology.wait_handshake()
    assert_traffic_both_ways(topology, 7001)
    topology.ping(topology.gateway_ns, HOST_TUNNEL)

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
    topology.write_config(backend='"userspace"')
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
    topology.write_config(backend='"kernel"')
    daemon = topology.start_daemon()
    topology.wait_running(daemon)
    topology.wait_handshake()
    index_before = topology.host_links().split(f": {topology.host_ifname}:")[0].split()[-1]

    daemon.kill()
    assert daemon.wait(timeout=10) == -signal.SIGKILL
    # A kernel interface outlives a SIGKILLed daemon, its WireGuard state too.
    assert topology.host_ifname in topology.host_links()
    assert topology.gateway_public_key in topology.host_wg().peers

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
