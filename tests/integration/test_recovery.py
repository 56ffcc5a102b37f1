"""Self-repair and drain in real namespaces: what an operator breaks under a running daemon."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration import netns
from tests.integration.topology import HOST_TUNNEL, Topology, run, wait_for

pytestmark = pytest.mark.root

SERVERS = Path(__file__).parent / "servers"
SERVICES = textwrap.dedent(
    """
    [proxy]
    shutdown_grace = 10

    [[service]]
    name = "billing"
    hosts = ["billing"]
    upstream = "http://127.0.0.1:8081"
    """
)


@pytest.fixture
def served(topology: Topology) -> Iterator[tuple[Topology, subprocess.Popen[bytes]]]:
    """The topology with an origin behind tunneld and the daemon running."""
    origin = subprocess.Popen(
        ["ip", "netns", "exec", topology.host_ns, sys.executable,
         str(SERVERS / "origin.py"), "billing", "tcp", "8081"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    topology.processes.append(origin)
    assert origin.stdout is not None and origin.stdout.readline().strip() == b"ready"
    topology.write_config(services=SERVICES)
    daemon = topology.start_daemon()
    topology.wait_running(daemon)
    topology.wait_handshake()
    yield topology, daemon


def get(topology: Topology, path: str = "/hello", timeout: float = 5.0) -> tuple[int, bytes]:
    connection = netns.HTTPConnection(topology.gateway_ns, HOST_TUNNEL, timeout=timeout)
    try:
        connection.request("GET", path, headers={"Host": "billing"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def serves(topology: Topology) -> bool:
    try:
        return get(topology, timeout=2) == (200, b"hello from billing")
    except OSError:
        return False


def test_interface_deleted_under_the_daemon_is_rebuilt(
    served: tuple[Topology, subprocess.Popen[bytes]],
) -> None:
    topology, daemon = served
    assert serves(topology)
    deleted_at = time.monotonic()
    run("ip", "-n", topology.host_ns, "link", "del", topology.host_ifname)
    wait_for("the proxy to serve through a rebuilt interface", lambda: serves(topology), timeout=30)
    print(f"interface deleted → serving again after {time.monotonic() - deleted_at:.1f}s")
    assert daemon.poll() is None
    assert "rebuilding" in topology.daemon_log()
    assert "binding the listeners again" in topology.daemon_log()


def test_killed_userspace_backend_is_restarted(
    served: tuple[Topology, subprocess.Popen[bytes]],
) -> None:
    topology, daemon = served
    pids = run("ip", "netns", "pids", topology.host_ns).split()
    wireguard_go = [
        pid for pid in pids if b"wireguard-go" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(wireguard_go) == 1
    killed_at = time.monotonic()
    run("kill", "-9", wireguard_go[0])
    wait_for("the proxy to serve through a restarted backend", lambda: serves(topology), timeout=30)
    print(f"wireguard-go killed → serving again after {time.monotonic() - killed_at:.1f}s")
    assert daemon.poll() is None


def test_drain_lets_the_request_in_flight_finish_and_refuses_new_ones(
    served: tuple[Topology, subprocess.Popen[bytes]],
) -> None:
    topology, daemon = served
    result: dict[str, object] = {}

    def slow_request() -> None:
        connection = netns.HTTPConnection(topology.gateway_ns, HOST_TUNNEL, timeout=20)
        try:
            connection.request("GET", "/slow-chunks?n=4&delay=0.5", headers={"Host": "billing"})
            response = connection.getresponse()
            result["status"], result["body"] = response.status, response.read()
        except OSError as exc:  # reported by this test, not by whichever test runs next
            result["error"] = exc
        finally:
            connection.close()

    thread = threading.Thread(target=slow_request)
    thread.start()
    time.sleep(0.5)  # the request is in flight: its first chunk is on the way
    daemon.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(OSError):  # listeners are closed: a new connection is refused
        netns.connect(topology.gateway_ns, HOST_TUNNEL, 80, timeout=2).close()
    thread.join(timeout=20)
    assert "error" not in result, result
    assert result["status"] == 200
    assert result["body"].count(b"chunk ") == 4  # type: ignore[union-attr]
    assert daemon.wait(timeout=20) == 0
    assert topology.host_ifname not in topology.host_links()


def test_a_second_signal_skips_the_drain(served: tuple[Topology, subprocess.Popen[bytes]]) -> None:
    topology, daemon = served
    connection = netns.HTTPConnection(topology.gateway_ns, HOST_TUNNEL, timeout=30)
    connection.request("GET", "/never", headers={"Host": "billing"})  # in flight for ever
    time.sleep(0.3)
    daemon.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert daemon.poll() is None  # draining: waiting for the request (grace is 10 s)
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=5) == 0
    connection.close()
    assert topology.host_ifname not in topology.host_links()


def test_sd_notify_ready_status_watchdog_stopping(topology: Topology) -> None:
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = topology.workdir / "notify.sock"
    receiver.bind(str(path))
    receiver.settimeout(1.0)
    messages: list[str] = []

    def drain(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                messages.append(receiver.recv(4096).decode())

    try:
        daemon = topology.start_daemon(env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000"})
        topology.wait_running(daemon)
        drain(3.5)  # WATCHDOG=1 every second (half of WATCHDOG_USEC)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=20) == 0
        drain(0.5)
    finally:
        receiver.close()
    ready = [m for m in messages if "READY=1" in m]
    assert ready and "STATUS=" in ready[0], messages
    assert sum("WATCHDOG=1" in m for m in messages) >= 2, messages
    assert any("STOPPING=1" in m for m in messages), messages
    assert any("STATUS=connecting: edge-1" in m or "STATUS=up: edge-1" in m for m in messages)


FAST_HEALTH = "\n[health]\ninterval = 1\nfailures = 2\nprobe_timeout = 0.5\n"


def test_failover_to_the_second_endpoint(topology: Topology) -> None:
    # 198.18.0.9 is on the underlay's subnet but nobody has it: handshakes there go unanswered.
    topology.write_config(endpoint="198.18.0.9:51820", services=FAST_HEALTH)
    text = topology.config_file.read_text()
    topology.config_file.write_text(
        text.replace(
            'endpoints = ["198.18.0.9:51820"]',
            'endpoints = ["198.18.0.9:51820", "198.18.0.1:51820"]',
        )
    )
    daemon = topology.start_daemon()
    started = time.monotonic()
    topology.wait_running(daemon)
    peer = topology.wait_handshake(timeout=30)
    print(f"failed over to the second endpoint; handshake after {time.monotonic() - started:.1f}s")
    assert peer["endpoint"] == "198.18.0.1:51820"
    assert "failing over to endpoint 198.18.0.1:51820" in topology.daemon_log()


def test_gateway_restart_is_followed_by_a_fresh_handshake(topology: Topology) -> None:
    topology.write_config(services=FAST_HEALTH)
    daemon = topology.start_daemon()
    topology.wait_running(daemon)
    topology.wait_handshake()
    # The gateway process dies and comes back with the same key but no session.
    run("ip", "-n", topology.gateway_ns, "link", "del", topology.gateway_ifname)
    time.sleep(3)
    topology.start_gateway()
    back = time.monotonic()

    def traffic_flows() -> bool:
        result = subprocess.run(
            ["ip", "netns", "exec", topology.gateway_ns, "ping", "-c1", "-W1", HOST_TUNNEL],
            capture_output=True, check=False,
        )  # fmt: skip
        return result.returncode == 0

    wait_for("traffic through the tunnel again", traffic_flows, timeout=30)
    print(f"gateway back → traffic flows again after {time.monotonic() - back:.1f}s")
    assert daemon.poll() is None
    assert "re-applying the peer" in topology.daemon_log()
