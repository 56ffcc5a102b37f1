"""The proxy end to end: a client in the gateway namespace, origins on 127.0.0.1 behind tunneld.

One topology (gateway + connector namespaces, a stock WireGuard gateway, tunneld with seven
services) is shared by the tests in this module: building it takes seconds, and the tests only
read from it. Origins are stdlib servers started with ``ip netns exec`` in the connector's
namespace, bound to loopback (or a unix socket): reachable only through tunneld.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration import netns
from tests.integration.servers.origin import PATTERN, ws_frame
from tests.integration.topology import GATEWAY_TUNNEL, HOST_TUNNEL, Topology, run, wait_for

pytestmark = pytest.mark.root

SERVERS = Path(__file__).parent / "servers"
SECRET = "correct horse battery staple"


class Proxied:
    """The running topology plus ways to talk to it from the gateway side."""

    def __init__(self, topology: Topology, daemon: subprocess.Popen[bytes]) -> None:
        self.topology = topology
        self.daemon = daemon

    def request(
        self, host: str, path: str, *, method: str = "GET", headers: dict[str, str] | None = None,
        body: bytes | None = None, timeout: float = 15.0,
    ) -> tuple[int, bytes]:  # fmt: skip
        connection = netns.HTTPConnection(self.topology.gateway_ns, HOST_TUNNEL, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers={"Host": host, **(headers or {})})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def raw(self, data: bytes, *, timeout: float = 10.0, port: int = 80) -> bytes:
        """Send ``data`` on a fresh connection and read until the proxy closes it."""
        with netns.connect(self.topology.gateway_ns, HOST_TUNNEL, port, timeout) as sock:
            sock.sendall(data)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)

    def daemon_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.daemon.pid}/fd"))

    def daemon_peak_rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.daemon.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    def assert_healthy(self) -> None:
        """A well-formed request on a new connection still works."""
        assert self.request("billing", "/hello") == (200, b"hello from billing")


def start_server(topology: Topology, *argv: str) -> None:
    process = subprocess.Popen(
        ["ip", "netns", "exec", topology.host_ns, sys.executable, *argv],
        stdout=subprocess.PIPE,
    )
    topology.processes.append(process)
    assert process.stdout is not None
    assert process.stdout.readline().strip() == b"ready", f"{argv} did not start"


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxied]:
    workdir = tmp_path_factory.mktemp("proxy")
    topology = Topology(workdir)
    try:
        topology.build()
        topology.start_gateway()
        reports_socket = workdir / "reports.sock"
        secret_file = workdir / "vault.secret"
        secret_file.write_text(SECRET + "\n")
        secret_file.chmod(0o600)
        start_server(topology, str(SERVERS / "origin.py"), "billing", "tcp", "8081")
        start_server(topology, str(SERVERS / "origin.py"), "accounts", "tcp", "8082")
        start_server(topology, str(SERVERS / "origin.py"), "reports", "unix", str(reports_socket))
        start_server(topology, str(SERVERS / "echo.py"), "7070")
        topology.write_config(
            services=textwrap.dedent(
                f"""
                [proxy]
                request_head_timeout = 2

                [[service]]
                name = "billing"
                hosts = ["billing", "*.billing.internal"]
                upstream = "http://127.0.0.1:8081"

                [[service]]
                name = "accounts"
                hosts = ["accounts"]
                upstream = "http://127.0.0.1:8082"

                [[service]]
                name = "reports"
                hosts = ["reports"]
                upstream = "unix:{reports_socket}"

                [[service]]
                name = "vault"
                hosts = ["vault"]
                upstream = "http://127.0.0.1:8082"
                [service.require_header]
                name = "X-Backend-Secret"
                value_file = "{secret_file}"

                [[service]]
                name = "slow"
                hosts = ["slow"]
                upstream = "http://127.0.0.1:8081"
                response_timeout = 1

                [[service]]
                name = "down"
                hosts = ["down"]
                upstream = "http://127.0.0.1:1"

                [[service]]
                name = "lines"
                protocol = "tcp"
                listen_port = 7000
                upstream = "tcp://127.0.0.1:7070"
                """
            )
        )
        daemon = topology.start_daemon()
        topology.wait_running(daemon)
        topology.wait_handshake()
        yield Proxied(topology, daemon)
    finally:
        topology.close()


# --- routing ----------------------------------------------------------------------------------


def test_host_routing_across_http_and_unix_socket_services(proxied: Proxied) -> None:
    assert proxied.request("billing", "/hello") == (200, b"hello from billing")
    assert proxied.request("accounts", "/hello") == (200, b"hello from accounts")
    assert proxied.request("reports", "/hello") == (200, b"hello from reports")
    assert proxied.request("EU.Billing.Internal:80", "/hello") == (200, b"hello from billing")
    status, body = proxied.request("nobody-home", "/hello")
    assert status == 404
    assert b"nobody-home" in body


def test_tcp_service_line_echo_with_half_close(proxied: Proxied) -> None:
    with netns.connect(proxied.topology.gateway_ns, HOST_TUNNEL, 7000) as sock:
        sock.sendall(b"first\nsecond\n")
        sock.shutdown(socket.SHUT_WR)  # our EOF must reach the origin, its reply must reach us
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
    assert received == b"first\nsecond\nbye\n"


# --- streaming --------------------------------------------------------------------------------

HUNDRED_MB = 100 * 1024 * 1024


def test_100_mb_download_and_upload_intact_with_bounded_memory(proxied: Proxied) -> None:
    expected = hashlib.sha256()
    for offset in range(0, HUNDRED_MB, len(PATTERN)):
        expected.update(PATTERN[: min(len(PATTERN), HUNDRED_MB - offset)])

    connection = netns.HTTPConnection(proxied.topology.gateway_ns, HOST_TUNNEL, timeout=60)
    connection.request("GET", f"/download?size={HUNDRED_MB}", headers={"Host": "billing"})
    response = connection.getresponse()
    assert response.status == 200
    received = hashlib.sha256()
    size = 0
    while chunk := response.read(1 << 20):
        received.update(chunk)
        size += len(chunk)
    assert size == HUNDRED_MB
    assert received.hexdigest() == expected.hexdigest()

    def body() -> Iterator[bytes]:
        for offset in range(0, HUNDRED_MB, len(PATTERN)):
            yield PATTERN[: min(len(PATTERN), HUNDRED_MB - offset)]

    connection.request(
        "POST", "/upload", body=body(),
        headers={"Host": "billing", "Content-Length": str(HUNDRED_MB)},
    )  # fmt: skip
    response = connection.getresponse()
    assert response.status == 200
    assert response.read().decode() == f"{HUNDRED_MB} {expected.hexdigest()}"
    connection.close()

    peak = proxied.daemon_peak_rss_bytes()
    print(f"100 MB down + 100 MB up intact; tunneld peak RSS {peak / 2**20:.1f} MiB")
    assert peak < 100 * 1024 * 1024, f"tunneld peaked at {peak / 2**20:.1f} MiB"


def test_chunked_response_streams_before_the_producer_finishes(proxied: Proxied) -> None:
    connection = netns.HTTPConnection(proxied.topology.gateway_ns, HOST_TUNNEL, timeout=30)
    connection.request("GET", "/slow-chunks?n=4&delay=0.5", headers={"Host": "billing"})
    response = connection.getresponse()
    first_line = response.readline()
    first_arrived = time.monotonic()  # CLOCK_MONOTONIC is shared by every namespace
    rest = response.read().decode().splitlines()
    connection.close()
    assert first_line.startswith(b"chunk 0")
    last_produced = float(rest[-1].split(" at ")[1])
    assert first_arrived < last_produced, "the first chunk waited for the whole response"


def test_websocket_echo_through_the_proxy(proxied: Proxied) -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    with netns.connect(proxied.topology.gateway_ns, HOST_TUNNEL, 80) as sock:
        sock.sendall(
            (
                "GET /ws HTTP/1.1\r\nHost: billing\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101")
        accept = base64.b64encode(
            hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC11B85").encode()).digest()  # noqa: S324
        )
        # Header names are case-insensitive; the proxy forwards them lower-cased.
        assert b"sec-websocket-accept: " + accept in head
        for payload in (b"hello through the tunnel", os.urandom(70000)):
            opcode = 0x1 if payload.isascii() else 0x2
            sock.sendall(ws_frame(opcode, payload, mask=os.urandom(4)))
            expected = ws_frame(opcode, payload)
            echoed = b""
            while len(echoed) < len(expected):
                echoed += sock.recv(65536)
            assert echoed == expected
        sock.sendall(ws_frame(0x8, b"\x03\xe8", mask=os.urandom(4)))
        assert sock.recv(16) == ws_frame(0x8, b"\x03\xe8")


def test_keep_alive_reuses_upstream_connections(proxied: Proxied) -> None:
    def counter(path: str) -> int:
        return int(proxied.request("accounts", path)[1])

    connections_before, requests_before = counter("/connections"), counter("/requests")
    connection = netns.HTTPConnection(proxied.topology.gateway_ns, HOST_TUNNEL, timeout=30)
    for _ in range(1000):
        connection.request("GET", "/hello", headers={"Host": "accounts"})
        response = connection.getresponse()
        assert response.read() == b"hello from accounts"
    connection.close()
    new_connections = counter("/connections") - connections_before
    assert counter("/requests") - requests_before >= 1000
    print(f"1000 keep-alive requests opened {new_connections} new upstream connection(s)")
    assert new_connections <= 2, f"1000 requests opened {new_connections} upstream connections"


def test_pipelined_requests_are_answered_in_order(proxied: Proxied) -> None:
    reply = proxied.raw(
        b"GET /hello HTTP/1.1\r\nHost: billing\r\n\r\n"
        b"GET /hello HTTP/1.1\r\nHost: accounts\r\n\r\n"
        b"GET /hello HTTP/1.1\r\nHost: reports\r\nConnection: close\r\n\r\n"
    )
    assert reply.count(b"HTTP/1.1 200 ") == 3
    positions = [
        reply.index(b"hello from " + name) for name in (b"billing", b"accounts", b"reports")
    ]
    assert positions == sorted(positions)


# --- exposure ---------------------------------------------------------------------------------


def test_only_the_tunnel_reaches_the_proxy(proxied: Proxied) -> None:
    topology = proxied.topology
    lan = f"tdlan-{topology.suffix}"
    run("ip", "netns", "add", lan)
    try:
        run(
            "ip", "link", "add", f"vl{topology.suffix}", "netns", lan,
            "type", "veth", "peer", "name", f"vx{topology.suffix}", "netns", topology.host_ns,
        )  # fmt: skip
        run("ip", "-n", lan, "addr", "add", "198.19.0.2/24", "dev", f"vl{topology.suffix}")
        run("ip", "-n", lan, "link", "set", f"vl{topology.suffix}", "up")
        run(
            "ip",
            "-n",
            topology.host_ns,
            "addr",
            "add",
            "198.19.0.1/24",
            "dev",
            f"vx{topology.suffix}",
        )
        run("ip", "-n", topology.host_ns, "link", "set", f"vx{topology.suffix}", "up")
        # The LAN host routes the tunnel prefix at the connector, as a hostile neighbour would.
        run("ip", "-n", lan, "route", "add", "10.44.0.0/24", "via", "198.19.0.1")

        # Control: a listener on the tunnel address *without* device binding is reachable from
        # the LAN — so the test below can tell binding from luck.
        topology.start_host_listener(HOST_TUNNEL, 7999, "unbound")
        with netns.connect(lan, HOST_TUNNEL, 7999, timeout=5) as sock:
            assert sock.recv(16) == b"unbound"

        for port in (80, 7000):
            with pytest.raises(OSError):
                netns.connect(lan, HOST_TUNNEL, port, timeout=3).close()
        assert proxied.request("billing", "/hello")[0] == 200  # the gateway still gets in
    finally:
        run("ip", "netns", "del", lan, check=False)

    # Nothing of tunneld's listens on the underlay: every listening socket is on a tunnel address,
    # but for the metrics and health endpoint on loopback (its default).
    listening = run("ip", "netns", "exec", topology.host_ns, "ss", "-Hltnp")
    ours = [line for line in listening.splitlines() if f"pid={proxied.daemon.pid}," in line]
    locals_ = [line.split()[3] for line in ours]
    assert "127.0.0.1:9477" in locals_, listening
    proxy_sockets = [local for local in locals_ if local != "127.0.0.1:9477"]
    assert proxy_sockets, listening
    for local in proxy_sockets:
        assert local.startswith((f"{HOST_TUNNEL}%", "[fd44::2]%")), local
        assert f"%{topology.host_ifname}:" in local, local


# --- policy and errors ------------------------------------------------------------------------


def test_shared_secret_header(proxied: Proxied) -> None:
    def origin_requests() -> int:
        return int(proxied.request("accounts", "/requests")[1])

    before = origin_requests()
    assert proxied.request("vault", "/hello")[0] == 401
    assert proxied.request("vault", "/hello", headers={"X-Backend-Secret": "wrong"})[0] == 401
    assert origin_requests() == before + 1  # only the counter request itself reached the origin

    status, body = proxied.request("vault", "/headers", headers={"X-Backend-Secret": SECRET})
    assert status == 200
    seen = {name.lower(): value for name, value in json.loads(body).items()}
    assert "x-backend-secret" not in seen
    assert seen["x-forwarded-for"] == GATEWAY_TUNNEL
    assert seen["x-forwarded-host"] == "vault"
    assert seen["x-forwarded-proto"] == "http"
    assert SECRET not in proxied.topology.daemon_log()


def test_origin_failures_map_to_502_and_504(proxied: Proxied) -> None:
    assert proxied.request("down", "/hello")[0] == 502
    started = time.monotonic()
    assert proxied.request("slow", "/never")[0] == 504
    assert time.monotonic() - started < 10
    assert proxied.request("billing", "/garbage")[0] == 502
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        proxied.request("billing", "/close-mid-response")
    proxied.assert_healthy()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"\x16\x03\x01 not http at all\r\n\r\n", 400),
        (b"GET /hello HTTP/1.1\r\nHost: billing\r\nno colon here\r\n\r\n", 400),
        (b"GET /hello HTTP/1.1\r\nHost: billing\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n", 431),
        (
            b"POST /upload HTTP/1.1\r\nHost: billing\r\nContent-Length: 4\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (b"POST /upload HTTP/1.1\r\nHost: billing\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST /upload HTTP/1.1\r\nHost: billing\r\nContent-Length: " + b"9" * 30 + b"\r\n\r\n",
         400),
        (
            b"POST /upload HTTP/1.1\r\nHost: billing\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"fffffffffffffffffffff\r\n",
            400,
        ),
        (b"GET /hello HTTP/1.1\r\n\r\n", 400),
        (b"GET /hello HTTP/1.1\r\nHost: bil ling\r\n\r\n", 400),
    ],
    ids=["garbage", "no-colon", "100kb-header", "cl-and-te", "negative-cl", "huge-cl",
         "chunk-overflow", "no-host", "host-with-space"],
)  # fmt: skip
def test_malformed_requests_get_their_status(
    proxied: Proxied, request_bytes: bytes, status: int
) -> None:
    reply = proxied.raw(request_bytes)
    assert reply.startswith(f"HTTP/1.1 {status} ".encode()), reply[:200]
    proxied.assert_healthy()


def test_slow_client_head_gets_408(proxied: Proxied) -> None:
    with netns.connect(proxied.topology.gateway_ns, HOST_TUNNEL, 80, timeout=15) as sock:
        sock.sendall(b"GET /hello HTTP/1.1\r\n")
        for byte in b"Host: billing\r\n":  # one byte a second, never finishing the head
            time.sleep(1)
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            sock.setblocking(False)
            try:
                early = sock.recv(4096)
            except BlockingIOError:
                early = b""
            sock.setblocking(True)
            if early:
                assert early.startswith(b"HTTP/1.1 408 "), early
                break
        else:
            pytest.fail("no 408 after 15 s of a trickling request head")
    proxied.assert_healthy()


def test_client_disconnect_mid_upload_leaks_nothing(proxied: Proxied) -> None:
    baseline = proxied.daemon_fds()
    with netns.connect(proxied.topology.gateway_ns, HOST_TUNNEL, 80) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: billing\r\nContent-Length: 100000000\r\n\r\n")
        sock.sendall(PATTERN * 16)  # 1 MiB of the promised 100 MB, then hang up
    wait_for(
        "tunneld's fd count to return to baseline", lambda: proxied.daemon_fds() <= baseline + 1
    )
    proxied.assert_healthy()


def test_ten_thousand_connections_opened_and_dropped(proxied: Proxied) -> None:
    baseline = proxied.daemon_fds()
    deadline = time.monotonic() + 120
    for _ in range(10_000):
        assert time.monotonic() < deadline, "10,000 connections took over 2 minutes"
        netns.connect(proxied.topology.gateway_ns, HOST_TUNNEL, 80, timeout=5).close()
    wait_for(
        "tunneld's fd count to return to baseline",
        lambda: proxied.daemon_fds() <= baseline + 2,
        timeout=30,
    )
    after = proxied.daemon_fds()
    print(f"10,000 connections opened and dropped; tunneld fds {baseline} before, {after} after")
    proxied.assert_healthy()
