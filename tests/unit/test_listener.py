"""Tunnel-only listeners and the accept loop.

The accept-loop tests run on loopback (device ``lo``) and need no root. The exposure tests build
throwaway namespaces (root) and prove both sides: a device-bound listener is unreachable from a
LAN host that routes the tunnel prefix at us, and — the control that shows the probe can tell —
the same listener without the device binding *is* reachable from there.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import resource
import secrets
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio

from tunneld.errors import ProxyError
from tunneld.proxy.eager import EagerSocketStream
from tunneld.proxy.listener import ConnectionCounters, open_tunnel_listeners, serve

LOOPBACK_V4 = ipaddress.ip_address("127.0.0.1")
LOOPBACK_V6 = ipaddress.ip_address("::1")
EVERYONE = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
REPO = Path(__file__).resolve().parents[2]


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


async def greet(stream: EagerSocketStream, client_address: str) -> None:
    await stream.send_all(f"hello {client_address}\n".encode())


async def read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    received = bytearray()
    try:
        while data := await stream.receive_some(4096):
            received += data
    except trio.BrokenResourceError:
        pass  # a reset is as final as an EOF here
    return bytes(received)


@dataclass
class Served:
    port: int
    counters: ConnectionCounters
    listeners: list[trio.SocketListener]


@asynccontextmanager
async def serving(
    handler: object = greet,
    *,
    addresses: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = (LOOPBACK_V4,),
    **options: object,
) -> AsyncIterator[Served]:
    options.setdefault("allowed_sources", EVERYONE)
    options.setdefault("limiter", trio.CapacityLimiter(10))
    listeners = await open_tunnel_listeners(addresses, 0, "lo")
    async with trio.open_nursery() as nursery:
        counters = await nursery.start(partial(serve, listeners, handler, **options))  # type: ignore[arg-type]
        yield Served(listeners[0].socket.getsockname()[1], counters, listeners)
        nursery.cancel_scope.cancel()


# -- opening listeners ---------------------------------------------------------------------------


async def test_listeners_bind_each_address_and_the_device() -> None:
    addresses = (LOOPBACK_V4, LOOPBACK_V6) if has_ipv6_loopback() else (LOOPBACK_V4,)
    with trio.fail_after(5):
        listeners = await open_tunnel_listeners(addresses, 0, "lo")
        try:
            assert len(listeners) == len(addresses)
            for listener, address in zip(listeners, addresses, strict=True):
                sock = listener.socket
                assert sock.getsockname()[0] == str(address)
                device = sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16)
                assert device.rstrip(b"\0") == b"lo"
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
                if address.version == 6:
                    assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
        finally:
            for listener in listeners:
                await listener.aclose()


async def test_accepted_connections_have_nodelay_and_the_client_ip() -> None:
    seen: list[tuple[str, int]] = []

    async def record(stream: EagerSocketStream, client_address: str) -> None:
        seen.append(
            (client_address, stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        )

    with trio.fail_after(5):
        async with serving(record) as served:
            client = await trio.open_tcp_stream("127.0.0.1", served.port)
            assert await read_to_eof(client) == b""
            await client.aclose()
    assert seen == [("127.0.0.1", 1)]


async def test_port_in_use_names_the_port() -> None:
    with trio.fail_after(5):
        holder = socket.socket()
        try:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            port = holder.getsockname()[1]
            with pytest.raises(ProxyError, match=rf"127\.0\.0\.1:{port}.*another process"):
                await open_tunnel_listeners([LOOPBACK_V4], port, "lo")
        finally:
            holder.close()


async def test_missing_interface_is_named() -> None:
    with trio.fail_after(5), pytest.raises(ProxyError, match="interface nosuchif0 does not exist"):
        await open_tunnel_listeners([LOOPBACK_V4], 0, "nosuchif0")


async def test_a_failure_closes_the_listeners_already_opened() -> None:
    """The second address fails (not local, and the first socket holds nothing it needs)."""
    with trio.fail_after(5):
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(ProxyError):
            await open_tunnel_listeners([LOOPBACK_V4, LOOPBACK_V4], 0, "nosuchif0")
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        holder.close()
        with pytest.raises(ProxyError, match="another process"):
            await open_tunnel_listeners([LOOPBACK_V4, LOOPBACK_V4], port, "lo")
        assert len(os.listdir("/proc/self/fd")) == before


# -- the accept loop ------------------------------------------------------------------------------


async def test_sources_outside_the_allowlist_are_closed_before_the_handler() -> None:
    with trio.fail_after(5):
        async with serving(allowed_sources=[ipaddress.ip_network("127.0.0.2/32")]) as served:
            outsider = await trio.open_tcp_stream("127.0.0.1", served.port)
            assert await read_to_eof(outsider) == b""
            await outsider.aclose()
            insider = await trio.open_tcp_stream(
                "127.0.0.1", served.port, local_address="127.0.0.2"
            )
            assert await read_to_eof(insider) == b"hello 127.0.0.2\n"
            await insider.aclose()
            assert served.counters.rejected_sources == 1
            assert served.counters.accepted == 1


async def test_an_empty_allowlist_admits_nobody() -> None:
    with trio.fail_after(5):
        async with serving(allowed_sources=()) as served:
            client = await trio.open_tcp_stream("127.0.0.1", served.port)
            assert await read_to_eof(client) == b""
            await client.aclose()
            assert (served.counters.rejected_sources, served.counters.accepted) == (1, 0)


async def test_excess_connections_go_to_on_excess() -> None:
    release = trio.Event()
    limiter = trio.CapacityLimiter(1)

    async def hold(stream: EagerSocketStream, client_address: str) -> None:
        await stream.send_all(b"served\n")
        await release.wait()

    async def busy(stream: EagerSocketStream) -> None:
        await stream.send_all(b"503 busy\n")

    with trio.fail_after(5):
        async with serving(hold, limiter=limiter, on_excess=busy) as served:
            first = await trio.open_tcp_stream("127.0.0.1", served.port)
            assert await first.receive_some(100) == b"served\n"
            second = await trio.open_tcp_stream("127.0.0.1", served.port)
            assert await read_to_eof(second) == b"503 busy\n"
            assert served.counters.excess == 1
            release.set()
            assert await read_to_eof(first) == b""
            while limiter.borrowed_tokens:
                await trio.sleep(0.01)
            third = await trio.open_tcp_stream("127.0.0.1", served.port)
            assert await third.receive_some(100) == b"served\n"
            for stream in (first, second, third):
                await stream.aclose()
            assert served.counters.accepted == 2


async def test_excess_without_on_excess_is_closed() -> None:
    release = trio.Event()

    async def hold(stream: EagerSocketStream, client_address: str) -> None:
        await release.wait()

    with trio.fail_after(5):
        async with serving(hold, limiter=trio.CapacityLimiter(1)) as served:
            first = await trio.open_tcp_stream("127.0.0.1", served.port)
            second = await trio.open_tcp_stream("127.0.0.1", served.port)
            assert await read_to_eof(second) == b""
            assert served.counters.excess == 1
            release.set()
            for stream in (first, second):
                await stream.aclose()


async def test_a_failing_handler_does_not_stop_the_loop(caplog: pytest.LogCaptureFixture) -> None:
    limiter = trio.CapacityLimiter(1)
    calls = 0

    async def fail_first(stream: EagerSocketStream, client_address: str) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("handler bug")
        await greet(stream, client_address)

    with trio.fail_after(5):
        async with serving(fail_first, limiter=limiter) as served:
            first = await trio.open_tcp_stream("127.0.0.1", served.port)
            assert await read_to_eof(first) == b""  # closed, not hung
            second = await trio.open_tcp_stream("127.0.0.1", served.port)
            assert await read_to_eof(second) == b"hello 127.0.0.1\n"  # the token came back
            for stream in (first, second):
                await stream.aclose()
            assert served.counters.handler_errors == 1
    assert "connection from 127.0.0.1 failed" in caplog.text
    assert "handler bug" in caplog.text


async def test_accept_survives_running_out_of_file_descriptors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A real EMFILE: no descriptor is free while a connection waits in the backlog."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with trio.fail_after(5):
        async with serving() as served:
            client = trio.socket.socket()  # its descriptor exists before the limit drops
            lowest_free = os.open(os.devnull, os.O_RDONLY)
            os.close(lowest_free)
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
            try:
                await client.connect(("127.0.0.1", served.port))
                await trio.sleep(0.5)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            errors = served.counters.accept_errors
            assert 1 <= errors <= 10  # it backed off instead of spinning
            stream = trio.SocketStream(client)
            assert await read_to_eof(stream) == b"hello 127.0.0.1\n"
            await stream.aclose()
    assert "Too many open files" in caplog.text
    assert caplog.text.count("accept failed") == 1  # rate-limited


async def test_closing_the_listeners_drains_gracefully() -> None:
    release = trio.Event()

    async def hold(stream: EagerSocketStream, client_address: str) -> None:
        await release.wait()
        await stream.send_all(b"finished\n")

    with trio.fail_after(5):
        listeners = await open_tunnel_listeners([LOOPBACK_V4], 0, "lo")
        port = listeners[0].socket.getsockname()[1]
        limiter = trio.CapacityLimiter(10)
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(serve, listeners, hold, allowed_sources=EVERYONE, limiter=limiter)
            )
            client = await trio.open_tcp_stream("127.0.0.1", port)
            while not limiter.borrowed_tokens:
                await trio.sleep(0.01)
            for listener in listeners:
                await listener.aclose()  # stop accepting; the connection in flight goes on
            with socket.socket() as late, pytest.raises(ConnectionRefusedError):
                late.connect(("127.0.0.1", port))
            release.set()
        # serve returned by itself once its handler finished
        assert await read_to_eof(client) == b"finished\n"
        await client.aclose()


# -- exposure, in namespaces (root) ---------------------------------------------------------------

SERVER = textwrap.dedent(
    """
    import ipaddress, socket, sys
    from functools import partial
    import trio
    from tunneld.proxy.listener import open_tunnel_listeners, serve

    mode, ifname, port, *addresses = sys.argv[1:]

    async def greet(stream, client_address):
        await stream.send_all(b"hello " + client_address.encode())

    async def unbound_listeners():  # the control: same addresses, no device binding
        listeners = []
        for address in addresses:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            sock = trio.socket.socket(family)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await sock.bind((address, int(port)))
            sock.listen()
            listeners.append(trio.SocketListener(sock))
        return listeners

    async def main():
        if mode == "bound":
            ips = [ipaddress.ip_address(a) for a in addresses]
            listeners = await open_tunnel_listeners(ips, int(port), ifname)
        else:
            listeners = await unbound_listeners()
        everyone = [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(serve, listeners, greet, allowed_sources=everyone,
                        limiter=trio.CapacityLimiter(10))
            )
            print("ready", flush=True)
            with trio.move_on_after(60):  # bounded even if the test forgets us
                await trio.sleep_forever()
            nursery.cancel_scope.cancel()

    trio.run(main)
    """
)

PORT = 8443


def ip(*argv: str) -> None:
    result = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=10, check=False)
    if result.returncode != 0:
        raise AssertionError(f"ip {' '.join(argv)}: {result.stderr.strip()}")


class Exposure:
    """Three namespaces around the connector's::

        LAN host ── veth ── connector ── veth ("the tunnel") ── gateway
        198.18.7.1          198.18.7.2    10.44.0.2 fd44::2       10.44.0.1 fd44::1
        fd45::1             fd45::2

    The LAN host routes the tunnel prefixes via the connector's LAN address.
    """

    def __init__(self) -> None:
        suffix = secrets.token_hex(3)
        self.host, self.lan, self.gateway = (f"tdl{role}-{suffix}" for role in "hlg")
        self.tunnel_ifname = f"tlt{suffix}"
        self.servers: list[subprocess.Popen[str]] = []

    def build(self) -> None:
        for ns in (self.host, self.lan, self.gateway):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("link", "add", self.tunnel_ifname, "netns", self.host,
           "type", "veth", "peer", "name", "tunnel", "netns", self.gateway)  # fmt: skip
        ip("link", "add", "lan", "netns", self.host,
           "type", "veth", "peer", "name", "lan", "netns", self.lan)  # fmt: skip
        for ns, link, addresses in (
            (self.host, self.tunnel_ifname, ("10.44.0.2/24", "fd44::2/64")),
            (self.gateway, "tunnel", ("10.44.0.1/24", "fd44::1/64")),
            (self.host, "lan", ("198.18.7.2/24", "fd45::2/64")),
            (self.lan, "lan", ("198.18.7.1/24", "fd45::1/64")),
        ):
            for address in addresses:
                ip("-n", ns, "addr", "add", address, "dev", link, "nodad")
            ip("-n", ns, "link", "set", link, "up")
        ip("-n", self.lan, "route", "add", "10.44.0.0/24", "via", "198.18.7.2")
        ip("-n", self.lan, "-6", "route", "add", "fd44::/64", "via", "fd45::2")

    def start_server(self, mode: str, *addresses: str) -> None:
        server = subprocess.Popen(
            ["ip", "netns", "exec", self.host, sys.executable, "-c", SERVER,
             mode, self.tunnel_ifname, str(PORT), *addresses],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        )  # fmt: skip
        self.servers.append(server)
        assert server.stdout is not None
        line = server.stdout.readline()  # the server prints "ready" or dies
        if line.strip() != "ready":
            server.kill()
            raise AssertionError(f"server did not start: {server.communicate(timeout=10)[1]}")

    def close(self) -> None:
        for server in self.servers:
            server.kill()
            server.communicate(timeout=10)
        for ns in (self.host, self.lan, self.gateway):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10, check=False)


_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000


def connect_from(namespace: str, address: str, port: int, timeout: float = 3.0) -> str:
    """Connect from inside ``namespace``: what the server sent, or how the connect failed.

    setns(2) switches only the calling thread and a socket stays in the namespace it was made
    in, so a short-lived thread makes the socket and the test uses it from here.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    made: list[socket.socket | BaseException] = []

    def make() -> None:
        fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(fd, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns({namespace})")
            made.append(socket.socket(family, socket.SOCK_STREAM))
        except BaseException as exc:
            made.append(exc)
        finally:
            os.close(fd)

    thread = threading.Thread(target=make)
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    with made[0] as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((address, port))
        except TimeoutError:
            return "timeout"
        except OSError as exc:
            outcomes = {errno.ECONNREFUSED: "refused", errno.EHOSTUNREACH: "unreachable"}
            if exc.errno in outcomes:
                return outcomes[exc.errno]
            raise
        received = bytearray()
        while data := sock.recv(4096):
            received += data
        return received.decode()


@pytest.fixture
def exposure() -> Iterator[Exposure]:
    topology = Exposure()
    try:
        topology.build()
        yield topology
    finally:
        topology.close()


@pytest.mark.root
def test_device_bound_listener_serves_the_tunnel_but_not_the_lan(exposure: Exposure) -> None:
    exposure.start_server("bound", "10.44.0.2", "fd44::2")
    assert connect_from(exposure.gateway, "10.44.0.2", PORT) == "hello 10.44.0.1"
    assert connect_from(exposure.gateway, "fd44::2", PORT) == "hello fd44::1"
    assert connect_from(exposure.lan, "10.44.0.2", PORT) == "refused"
    assert connect_from(exposure.lan, "fd44::2", PORT) == "refused"


@pytest.mark.root
def test_control_without_device_binding_the_lan_gets_in(exposure: Exposure) -> None:
    """Shows the probe above can fail: Linux's weak host model lets the LAN reach the address."""
    exposure.start_server("unbound", "10.44.0.2", "fd44::2")
    assert connect_from(exposure.lan, "10.44.0.2", PORT) == "hello 198.18.7.1"
    assert connect_from(exposure.lan, "fd44::2", PORT) == "hello fd45::1"


@pytest.mark.root
def test_listener_comes_up_before_its_ipv6_address(exposure: Exposure) -> None:
    """IP_FREEBIND: it binds fd44::3 before the address exists, and serves once it does."""
    exposure.start_server("bound", "fd44::3")  # "ready": bound although fd44::3 is nowhere
    ip("-n", exposure.host, "addr", "add", "fd44::3/64", "dev", exposure.tunnel_ifname, "nodad")
    assert connect_from(exposure.gateway, "fd44::3", PORT) == "hello fd44::1"


@pytest.mark.root
def test_a_privileged_port_without_the_capability_is_exit_code_2() -> None:
    """A restart cannot grant a capability: the error is a person's to fix, not a retry's."""
    # The lowest unprivileged port is a per-namespace sysctl: take one just below it.
    port = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text()) - 1
    assert port > 0, "every port is unprivileged here: nothing to test"
    script = textwrap.dedent(
        f"""
        import ipaddress, trio
        from tunneld.errors import TunneldError
        from tunneld.proxy.listener import open_tunnel_listeners
        try:
            trio.run(open_tunnel_listeners, [ipaddress.ip_address("127.0.0.1")], {port}, "lo")
        except TunneldError as exc:
            print(exc.exit_code, exc)
        """
    )
    drop = "-net_bind_service"
    result = subprocess.run(
        ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", sys.executable, "-c", script],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert result.stdout.startswith(f"2 cannot listen on 127.0.0.1:{port} (binding): "), result
    assert "CAP_NET_BIND_SERVICE" in result.stdout
