"""Reloading the config under a running daemon: only what changed is touched.

An open WebSocket of one service and an open TCP relay of another must survive a reload that
changes a third service; an invalid reload must change nothing at all.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration import netns
from tests.integration.servers.origin import ws_frame
from tests.integration.topology import HOST_TUNNEL, Topology, wait_for

pytestmark = pytest.mark.root

SERVERS = Path(__file__).parent / "servers"
BILLING = """
[[service]]
name = "billing"
hosts = ["billing"]
upstream = "{billing_upstream}"
"""
OTHERS = """
[[service]]
name = "chat"
hosts = ["chat"]
upstream = "http://127.0.0.1:8082"

[[service]]
name = "db"
protocol = "tcp"
listen_port = 5432
upstream = "tcp://127.0.0.1:7001"
"""
NEW_SERVICE = """
[[service]]
name = "reports"
hosts = ["reports"]
upstream = "http://127.0.0.1:8083"
"""


@dataclass
class Running:
    topology: Topology
    daemon: subprocess.Popen[bytes]
    notifications: socket.socket

    def write_services(self, billing_upstream: str, extra: str = "") -> None:
        services = BILLING.format(billing_upstream=billing_upstream) + OTHERS + extra
        self.topology.write_config(services=services)

    def reload(self) -> subprocess.CompletedProcess[str]:
        return self.topology.tunneld("reload", "-c", str(self.topology.config_file))

    def wait_reloaded(self, count: int = 1) -> None:
        def reloaded() -> bool:
            log = self.topology.daemon_log()
            return log.count("reloaded the config") + log.count("reload rejected") >= count

        wait_for("the daemon to finish the reload", reloaded, timeout=15)

    def received(self) -> list[str]:
        messages = []
        with contextlib.suppress(BlockingIOError):
            while True:
                messages.append(self.notifications.recv(4096).decode())
        return messages


def start_server(topology: Topology, *argv: str) -> None:
    process = subprocess.Popen(
        ["ip", "netns", "exec", topology.host_ns, sys.executable, *argv], stdout=subprocess.PIPE
    )
    topology.processes.append(process)
    assert process.stdout is not None and process.stdout.readline().strip() == b"ready"


@pytest.fixture
def running(topology: Topology) -> Iterator[Running]:
    origin = str(SERVERS / "origin.py")
    for name, port in (("billing", "8081"), ("chat", "8082"), ("billing-v2", "8083")):
        start_server(topology, origin, name, "tcp", port)
    start_server(topology, str(SERVERS / "echo.py"), "7001")
    notifications = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = topology.workdir / "notify.sock"
    notifications.bind(str(path))
    notifications.setblocking(False)
    try:
        state = Running(topology, None, notifications)  # type: ignore[arg-type]
        state.write_services("http://127.0.0.1:8081")
        state.daemon = topology.start_daemon(env={"NOTIFY_SOCKET": str(path)})
        topology.wait_running(state.daemon)
        topology.wait_handshake()
        yield state
    finally:
        notifications.close()


def get(topology: Topology, host: str, path: str = "/hello") -> tuple[int, bytes]:
    connection = netns.HTTPConnection(topology.gateway_ns, HOST_TUNNEL, timeout=5)
    try:
        connection.request("GET", path, headers={"Host": host})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def open_websocket(topology: Topology, host: str) -> socket.socket:
    sock = netns.connect(topology.gateway_ns, HOST_TUNNEL, 80)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def websocket_echoes(sock: socket.socket, payload: bytes) -> bool:
    sock.sendall(ws_frame(0x1, payload, mask=os.urandom(4)))
    expected = ws_frame(0x1, payload)
    echoed = b""
    while len(echoed) < len(expected):
        data = sock.recv(65536)
        if not data:
            return False
        echoed += data
    return echoed == expected


def line_echoes(sock: socket.socket, line: bytes) -> bool:
    sock.sendall(line + b"\n")
    echoed = b""
    while not echoed.endswith(b"\n"):
        data = sock.recv(4096)
        if not data:
            return False
        echoed += data
    return echoed == line + b"\n"


def test_reload_changes_one_service_and_keeps_the_others_connections(running: Running) -> None:
    topology = running.topology
    assert get(topology, "billing") == (200, b"hello from billing")
    assert get(topology, "reports")[0] == 404
    with (
        open_websocket(topology, "chat") as websocket,
        netns.connect(topology.gateway_ns, HOST_TUNNEL, 5432) as relay,
    ):
        assert websocket_echoes(websocket, b"before the reload")
        assert line_echoes(relay, b"before the reload")
        handshake_before = topology.status()["peers"][0]["last_handshake_unix_seconds"]
        running.received()  # forget start-up's notifications

        running.write_services("http://127.0.0.1:8083", extra=NEW_SERVICE)
        result = running.reload()
        assert result.returncode == 0, result.stderr
        running.wait_reloaded()

        assert get(topology, "billing") == (200, b"hello from billing-v2")
        assert get(topology, "reports") == (200, b"hello from billing-v2")
        assert websocket_echoes(websocket, b"after the reload")
        assert line_echoes(relay, b"after the reload")
    log = topology.daemon_log()
    assert "service reports added" in log and "service billing changed" in log
    assert "listening on port 80" in log.split("reloaded the config")[0]  # not bound again
    assert log.count("HTTP services listening on port 80") == 1
    # The gateway's session was not touched: no new handshake was needed.
    assert topology.status()["peers"][0]["last_handshake_unix_seconds"] == handshake_before
    messages = running.received()
    reloading = [m for m in messages if "RELOADING=1" in m]
    assert reloading and "MONOTONIC_USEC=" in reloading[0], messages
    assert any("READY=1" in m for m in messages[messages.index(reloading[0]) :]), messages
    assert running.daemon.poll() is None


def test_invalid_reload_leaves_everything_running(running: Running) -> None:
    topology = running.topology
    good_config = topology.config_file.read_text()
    with netns.connect(topology.gateway_ns, HOST_TUNNEL, 5432) as relay:
        assert line_echoes(relay, b"before")
        # 1. Invalid TOML sent straight to the daemon (as `systemctl reload` would).
        topology.config_file.write_text(good_config + "\n[[service]\nname = \n")
        running.daemon.send_signal(signal.SIGHUP)
        running.wait_reloaded(1)
        # 2. `tunneld reload` refuses an invalid config itself and does not signal the daemon.
        topology.config_file.write_text(
            good_config.replace("listen_port = 5432", "listen_port = 0")
        )
        result = running.reload()
        assert result.returncode == 2
        assert "listen_port" in result.stderr
        # 3. A change only a restart can make is refused whole, with the other changes in it.
        topology.config_file.write_text(
            good_config.replace(topology.host_ifname, "tdother0").replace("8081", "8083")
        )
        running.daemon.send_signal(signal.SIGHUP)
        running.wait_reloaded(2)
        assert line_echoes(relay, b"after")
    assert get(topology, "billing") == (200, b"hello from billing")  # not billing-v2
    log = topology.daemon_log()
    assert log.count("reload rejected: still running the previous config") == 2
    assert "interface.name changed, which needs a restart" in log
    assert "reloaded the config" not in log
    assert running.daemon.poll() is None


def test_reload_adds_and_removes_a_gateway_without_touching_the_first(
    running: Running,
) -> None:
    topology = running.topology
    second_key = topology.tunneld("genkey").stdout.strip()
    second_public = subprocess.run(
        ["wg", "pubkey"], input=second_key, capture_output=True, text=True, check=True
    ).stdout.strip()
    base = topology.config_file.read_text()
    first = topology.status()["peers"][0]
    topology.config_file.write_text(
        base
        + textwrap.dedent(
            f"""
            [[gateway]]
            name = "edge-2"
            public_key = "{second_public}"
            endpoints = ["198.18.0.77:51820"]
            allowed_ips = ["10.46.0.1/32"]
            """
        )
    )
    assert running.reload().returncode == 0
    running.wait_reloaded(1)
    peers = {peer["name"]: peer for peer in topology.status()["peers"]}
    assert set(peers) == {"edge-1", "edge-2"}
    assert peers["edge-2"]["endpoint"] == "198.18.0.77:51820"
    assert peers["edge-1"]["last_handshake_unix_seconds"] == first["last_handshake_unix_seconds"]
    routes = subprocess.run(
        ["ip", "-n", topology.host_ns, "route", "show", "10.46.0.1"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert topology.host_ifname in routes

    topology.config_file.write_text(base)
    assert running.reload().returncode == 0
    running.wait_reloaded(2)
    assert [peer["name"] for peer in topology.status()["peers"]] == ["edge-1"]
    assert get(topology, "billing") == (200, b"hello from billing")
    log = topology.daemon_log()
    assert "gateway edge-2 added" in log and "gateway edge-2 removed" in log
    started = time.monotonic()
    wait_for("the route to the removed gateway to go", lambda: "10.46.0.1" not in subprocess.run(
        ["ip", "-n", topology.host_ns, "route"], capture_output=True, text=True, check=True
    ).stdout, timeout=5)  # fmt: skip
    assert time.monotonic() - started < 5
