"""tunneld against a stock WireGuard gateway, in real network namespaces."""

from __future__ import annotations

import base64
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.topology import (
    GATEWAY_TUNNEL,
    GATEWAY_UNDERLAY,
    HOST_TUNNEL,
    Topology,
    run,
    wait_for,
)

pytestmark = pytest.mark.root


def tcp_service(port: int) -> str:
    """A TCP service on ``port`` of the tunnel address, relayed to 127.0.0.1:``port + 100``.

    Only the proxy's ports are reachable through the tunnel (tunneld's nftables filter), so
    traffic tests go through a service rather than to a listener of their own.
    """
    return (
        f'\n[[service]]\nname = "banner-{port}"\nprotocol = "tcp"\nlisten_port = {port}\n'
        f'upstream = "tcp://127.0.0.1:{port + 100}"\n'
    )


def test_handshake_reachability_and_status(topology: Topology) -> None:
    topology.write_config(services=tcp_service(7001))
    daemon = topology.start_daemon()
    topology.wait_running(daemon)
    first = topology.wait_handshake()
    assert first["name"] == "edge-1"
    assert first["endpoint"] == f"{GATEWAY_UNDERLAY}:51820"

    topology.start_host_listener("127.0.0.1", 7101, "hello from the private host")
    assert topology.gateway_connect(HOST_TUNNEL, 7001) == "hello from the private host"

    # Keepalive is 1 s, so counters grow on their own; traffic above made them grow already.
    time.sleep(2.5)
    second = topology.status()["peers"][0]
    assert second["receive_bytes"] > first["receive_bytes"]
    assert second["transmit_bytes"] > first["transmit_bytes"]
    assert second["handshake_age_seconds"] < 10
    print(
        f"handshake age {second['handshake_age_seconds']:.1f}s; rx {first['receive_bytes']} → "
        f"{second['receive_bytes']} B, tx {first['transmit_bytes']} → {second['transmit_bytes']} B"
    )

    status = topology.status()
    assert status["backend"] == "userspace"
    # The config leaves backend at "auto": this kernel has no WireGuard, so auto chose userspace
    # (tests/vm shows auto choosing the kernel where it has WireGuard).
    assert "backend auto: using userspace WireGuard" in topology.daemon_log()
    assert status["public_key"] == topology.host_public_key

    # The private key is in no log line (debug level!), argv or child environment.
    private_b64 = topology.key_file.read_text().strip()
    private_hex = base64.b64decode(private_b64).hex()
    exposed = topology.daemon_log()
    for pid in run("ip", "netns", "pids", topology.host_ns).split():
        proc = Path("/proc") / pid
        exposed += (proc / "cmdline").read_bytes().decode(errors="replace")
        exposed += (proc / "environ").read_bytes().decode(errors="replace")
    assert "wireguard-go" in exposed
    assert private_b64 not in exposed
    assert private_hex not in exposed

    # tunneld's wireguard-go child (found by its PPid) has exactly the environment the README
    # states: LOG_LEVEL=error and nothing else.
    children = [
        pid
        for pid in run("ip", "netns", "pids", topology.host_ns).split()
        if _parent_pid(int(pid)) == daemon.pid
        and Path(f"/proc/{pid}/exe").resolve().name == "wireguard-go"
    ]
    assert len(children) == 1, children
    assert Path(f"/proc/{children[0]}/environ").read_bytes() == b"LOG_LEVEL=error\0"

    # Routes: only the gateway's allowed IPs, via our interface; never a default route.
    routes = topology.host_routes()
    assert f"10.45.0.0/24 dev {topology.host_ifname} proto 116" in routes
    assert "default" not in routes


def _parent_pid(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # it exited meanwhile
        return None
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:"))


def test_sigterm_tears_down_everything(topology: Topology) -> None:
    daemon = topology.start_daemon()
    topology.wait_running(daemon)
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=15) == 0
    assert topology.host_ifname not in topology.host_links()
    assert "proto 116" not in topology.host_routes()
    assert "10.44.0" not in run("ip", "-n", topology.host_ns, "addr")


def test_restart_after_kill_9_converges(topology: Topology) -> None:
    topology.write_config(services=tcp_service(7002))
    daemon = topology.start_daemon()
    topology.wait_running(daemon)
    topology.wait_handshake()
    daemon.kill()
    daemon.wait(timeout=10)
    # The interface (and its wireguard-go) outlive a SIGKILLed daemon.
    assert topology.host_ifname in topology.host_links()

    restarted = topology.start_daemon(log_name="restart.log")
    topology.wait_running(restarted, log_name="restart.log")
    assert "left behind by an earlier run" in topology.daemon_log("restart.log")
    topology.wait_handshake()
    topology.start_host_listener("127.0.0.1", 7102, "after restart")
    assert topology.gateway_connect(HOST_TUNNEL, 7002) == "after restart"


def test_up_then_down_leaves_nothing(topology: Topology) -> None:
    up = topology.tunneld("up", "-c", str(topology.config_file))
    assert up.returncode == 0, up.stderr
    topology.wait_handshake()
    assert f"10.44.0.0/24 dev {topology.host_ifname}" in topology.host_routes()

    down = topology.tunneld("down", "-c", str(topology.config_file))
    assert down.returncode == 0, down.stderr
    assert topology.host_ifname not in topology.host_links()
    assert topology.host_ifname not in topology.host_routes()
    assert "10.44.0" not in run("ip", "-n", topology.host_ns, "addr")
    wait_for(
        "wireguard-go to exit",
        lambda: not run("ip", "netns", "pids", topology.host_ns).split(),
    )


def test_unresolvable_endpoint_is_retried_until_dns_has_it(topology: Topology) -> None:
    topology.write_config(endpoint="gateway.tunneld.test:51820")
    daemon = topology.start_daemon()
    topology.wait_running(daemon)
    assert "gateway.tunneld.test" in topology.daemon_log()
    assert topology.status()["peers"][0]["endpoint"] is None

    # In place (same inode): the file is bind-mounted over the daemon's /etc/hosts.
    with topology.hosts_file.open("a") as hosts:
        hosts.write(f"{GATEWAY_UNDERLAY} gateway.tunneld.test\n")
    peer = topology.wait_handshake(timeout=60)
    assert peer["endpoint"] == f"{GATEWAY_UNDERLAY}:51820"
    assert daemon.poll() is None


def test_gateway_not_answering_keeps_the_daemon_running(topology: Topology) -> None:
    run("ip", "-n", topology.gateway_ns, "link", "del", topology.gateway_ifname)
    daemon = topology.start_daemon()
    topology.wait_running(daemon)
    time.sleep(3)
    assert daemon.poll() is None
    assert topology.status()["peers"][0]["handshake_age_seconds"] is None


def test_gateway_reaches_only_the_tunnel_address_through_the_tunnel(topology: Topology) -> None:
    daemon = topology.start_daemon()
    topology.wait_running(daemon)
    topology.wait_handshake()
    # Ping across the tunnel both ways proves the data plane, not just the handshake.
    run("ip", "netns", "exec", topology.gateway_ns, "ping", "-c1", "-W2", HOST_TUNNEL)
    run("ip", "netns", "exec", topology.host_ns, "ping", "-c1", "-W2", GATEWAY_TUNNEL)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda t: t.key_file.chmod(0o644), "chmod 600"),
        (lambda t: t.key_file.write_text("c2hvcnQ=\n"), "32"),
    ],
    ids=["key-file-0644", "key-file-short"],
)
def test_bad_key_file_exits_2_and_configures_nothing(topology: Topology, mutate, expected) -> None:  # type: ignore[no-untyped-def]
    mutate(topology)
    result = topology.tunneld("run", "-c", str(topology.config_file))
    assert result.returncode == 2
    assert expected in result.stderr
    assert str(topology.key_file) in result.stderr
    assert topology.host_ifname not in topology.host_links()


def test_missing_wireguard_go_says_what_to_install(topology: Topology) -> None:
    topology.write_config(userspace_binary='"/nonexistent/wireguard-go"')
    result = topology.tunneld("run", "-c", str(topology.config_file))
    assert result.returncode == 2
    assert "apt-get install wireguard-go" in result.stderr
    assert topology.host_ifname not in topology.host_links()


def test_without_cap_net_admin_names_the_capability(topology: Topology) -> None:
    argv = topology.tunneld_argv("run", "-c", str(topology.config_file))
    # Drop CAP_NET_ADMIN from the bounding set: even root then cannot regain it on exec.
    index = argv.index("exec") + 2
    argv[index:index] = ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin", "--"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2, result.stderr
    assert "CAP_NET_ADMIN" in result.stderr
    assert topology.host_ifname not in topology.host_links()


def test_a_second_daemon_for_the_same_interface_is_refused(topology: Topology) -> None:
    first = topology.start_daemon()
    topology.wait_running(first)
    second = topology.tunneld("run", "-c", str(topology.config_file))
    assert second.returncode == 1
    # `ip netns exec` execs the daemon, so its pid is the one Popen knows.
    assert f"managed by another tunneld (pid {first.pid})" in second.stderr
    down = topology.tunneld("down", "-c", str(topology.config_file))
    assert down.returncode == 1
    assert first.poll() is None
    topology.wait_handshake()
