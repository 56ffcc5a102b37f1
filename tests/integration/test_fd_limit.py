"""The daemon at the file-descriptor limit: it must neither die nor lose its interface.

The break this guards against (issue 13, point 2): with the soft limit at 1024 — systemd's
default for services — and ``max_connections`` at its default, ~1,010 idle connections from the
gateway used up every descriptor; the next health tick could not open its netlink socket, and
``EMFILE`` ended the daemon and took the interface with it.

Here tunneld runs under ``prlimit``: once with a hard limit of 1024 (raising the soft limit
cannot help; the connection limit derived from it must), once with a soft limit of 1024 under a
higher hard limit (the daemon raises the soft one at start). From the gateway's namespace the
first test opens 1,100 idle connections (or 600 WebSockets) at once, holds them for several
health intervals and checks that the daemon stays up, keeps its interface, keeps ticking (its
probe counter goes on) and that the gateway stays up in ``/status``; then closes them and checks
that a request gets 200 again. The figures — descriptors in use, how the connections were
answered — are printed (run with ``-s``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import select
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import missing_prerequisite
from tests.integration import netns
from tests.integration.test_resilience import (
    SERVICES,
    LogWatch,
    health,
    serves,
    start_origin,
)
from tests.integration.topology import HOST_TUNNEL, Topology, wait_for

pytestmark = pytest.mark.root

HOLD_SECONDS = 6.0  # several health ticks (interval 1 s), below request_head_timeout (10 s)
CONNECT_SECONDS = 10.0
WEBSOCKET_UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: billing\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
METRICS_PORT = 9477  # the default [metrics] listen, inside the host's own namespace
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def start_limited_daemon(topology: Topology, soft: int, hard: int) -> subprocess.Popen[bytes]:
    """``tunneld run`` under ``prlimit --nofile=SOFT:HARD`` (prlimit execs: same pid)."""
    log_file = (topology.workdir / "tunneld.log").open("ab")
    process = subprocess.Popen(
        ["prlimit", f"--nofile={soft}:{hard}",
         *topology.tunneld_argv("--log-level", "debug", "run", "-c", str(topology.config_file))],
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    log_file.close()
    topology.processes.append(process)
    return process


def nofile_limits(pid: int) -> tuple[int, int]:
    """The process's (soft, hard) RLIMIT_NOFILE, from /proc/PID/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no 'Max open files' in /proc/{pid}/limits")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def open_connections(namespace: str, count: int, request: bytes = b"") -> list[socket.socket]:
    """``count`` non-blocking connects to the HTTP port from ``namespace``, fired at once;
    ``request`` is then sent on each one that is connected within ``CONNECT_SECONDS``.

    The caller closes them; if this fails halfway, it closes the ones it made before raising.
    """
    sockets: list[socket.socket] = []
    failure: list[BaseException] = []

    def create() -> None:  # setns switches only this thread
        fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(fd, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns({namespace})")
            for _ in range(count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.setblocking(False)
                sock.connect_ex((HOST_TUNNEL, 80))
        except BaseException as exc:
            failure.append(exc)
        finally:
            os.close(fd)

    thread = threading.Thread(target=create)
    thread.start()
    thread.join()
    try:
        if failure:
            raise failure[0]
        if request:
            _send_when_connected(sockets, request)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _send_when_connected(sockets: list[socket.socket], request: bytes) -> None:
    waiting = {sock.fileno(): sock for sock in sockets}
    poller = select.poll()
    for fileno in waiting:
        poller.register(fileno, select.POLLOUT)
    deadline = time.monotonic() + CONNECT_SECONDS
    while waiting and time.monotonic() < deadline:
        for fileno, _events in poller.poll(100):
            poller.unregister(fileno)
            sock = waiting.pop(fileno)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                with contextlib.suppress(OSError):  # already refused or reset: classify says so
                    sock.send(request)


def classify(sockets: list[socket.socket]) -> Counter[str]:
    """How each connection stands: answered 503, closed, reset, refused, or open and silent."""
    outcomes: Counter[str] = Counter()
    for sock in sockets:
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            outcomes["open" if error == 0 else errno.errorcode.get(error, str(error))] += 1
            continue
        except ConnectionResetError:
            outcomes["reset"] += 1
            continue
        except OSError as exc:
            outcomes[errno.errorcode.get(exc.errno or 0, str(exc))] += 1
            continue
        if not data:
            outcomes["closed"] += 1
        else:
            match = re.match(rb"HTTP/1\.1 (\d{3})", data)
            outcomes[match.group(1).decode() if match else "other"] += 1
    return outcomes


def probes_total(topology: Topology) -> float | None:
    """``tunneld_peer_probes_total`` of edge-1 from the daemon's /metrics (None: no answer)."""
    connection = netns.HTTPConnection(topology.host_ns, "127.0.0.1", METRICS_PORT, timeout=2)
    try:
        connection.request("GET", "/metrics")
        body = connection.getresponse().read().decode()
    except OSError:
        return None
    finally:
        connection.close()
    match = re.search(r'^tunneld_peer_probes_total\{peer="edge-1"\} (\S+)$', body, re.M)
    return float(match.group(1)) if match else None


def interface_exists(topology: Topology) -> bool:
    return topology.host_ifname in topology.host_links()


def start(topology: Topology, soft: int, hard: int) -> subprocess.Popen[bytes]:
    if subprocess.run(["prlimit", "--version"], capture_output=True, check=False).returncode:
        missing_prerequisite("prlimit (util-linux)")
    topology.write_config(services=SERVICES + health())
    start_origin(topology)
    daemon = start_limited_daemon(topology, soft, hard)
    topology.wait_running(daemon)
    LogWatch(topology, from_start=True).wait(r"gateway edge-1: \w+ → up", timeout=30, daemon=daemon)
    return daemon


@pytest.mark.parametrize(
    ("count", "request_bytes"),
    [(1100, b""), (600, WEBSOCKET_UPGRADE)],
    ids=["1100-idle-connections", "600-websockets"],
)
def test_a_hard_limit_of_1024_under_a_flood_of_connections(
    topology: Topology, count: int, request_bytes: bytes
) -> None:
    """Idle connections hold one descriptor each; WebSockets two (client and origin)."""
    daemon = start(topology, 1024, 1024)
    pid = daemon.pid
    assert nofile_limits(pid) == (1024, 1024)
    idle_fds = open_fds(pid)
    assert serves(topology.gateway_ns, timeout=5)
    ticks_before = probes_total(topology)
    assert ticks_before is not None

    sockets: list[socket.socket] = []
    try:
        sockets = open_connections(topology.gateway_ns, count, request_bytes)
        peak_fds = 0
        deadline = time.monotonic() + HOLD_SECONDS
        while time.monotonic() < deadline:
            assert daemon.poll() is None, (
                f"tunneld exited with {daemon.returncode}:\n{topology.daemon_log()[-3000:]}"
            )
            peak_fds = max(peak_fds, open_fds(pid))
            time.sleep(0.25)
        assert interface_exists(topology), "the WireGuard interface is gone"
        # The supervisor kept ticking under the flood: its probe counter went on.
        ticks_during = probes_total(topology)
        assert ticks_during is not None and ticks_during > ticks_before, (
            ticks_before,
            ticks_during,
        )
        state = {peer["name"]: peer.get("state") for peer in topology.status()["peers"]}
        assert state["edge-1"] == "up", state
        outcomes = classify(sockets)
    finally:
        for sock in sockets:
            sock.close()
    print(
        f"\nfds of the daemon: idle {idle_fds}, peak during the flood {peak_fds}"
        f"\n{count} connections ({'WebSocket' if request_bytes else 'idle'}) after "
        f"{HOLD_SECONDS:g}s: {dict(outcomes)}"
    )
    # Once they are gone, the gateway is served again.
    wait_for("a 200 through the tunnel after the flood", lambda: serves(topology.gateway_ns), 20)
    assert daemon.poll() is None
    assert interface_exists(topology)
    after_fds = wait_for(
        "the daemon's descriptors back near idle",
        lambda: n if (n := open_fds(pid)) <= idle_fds + 20 else None,
        20,
    )
    print(f"fds of the daemon after the flood: {after_fds}")
    assert "lost" not in topology.daemon_log(), "the interface was rebuilt during the flood"


def test_a_soft_limit_below_the_hard_limit_is_raised(topology: Topology) -> None:
    daemon = start(topology, 1024, 4096)
    assert nofile_limits(daemon.pid) == (4096, 4096)
    assert serves(topology.gateway_ns, timeout=5)
