"""The TCP relay against real origins on 127.0.0.1 and on a unix socket (no root needed)."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from tunneld.config_proxy import ServiceConfig, Upstream
from tunneld.proxy.tcp import relay

OriginHandler = Callable[[trio.SocketStream], Awaitable[None]]


@dataclass
class Origin:
    """What an origin saw: every byte it received, and whether it got end-of-file."""

    received: bytearray = field(default_factory=bytearray)
    got_eof: trio.Event = field(default_factory=trio.Event)
    closed: trio.Event = field(default_factory=trio.Event)

    async def read_to_eof(self, stream: trio.abc.ReceiveStream) -> None:
        try:
            while data := await stream.receive_some(65536):
                self.received += data
            self.got_eof.set()
        except trio.BrokenResourceError:
            pass
        finally:
            self.closed.set()


async def echo(stream: trio.SocketStream) -> None:
    try:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
        await stream.send_eof()
    except trio.BrokenResourceError:
        pass


@asynccontextmanager
async def tcp_origin(handler: OriginHandler) -> AsyncIterator[Upstream]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        yield Upstream(scheme="tcp", host="127.0.0.1", port=port)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def unix_origin(handler: OriginHandler, path: Path) -> AsyncIterator[Upstream]:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(os.fspath(path))
    sock.listen()
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, [trio.SocketListener(sock)])
        yield Upstream(scheme="unix", path=path)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def relayed(service: ServiceConfig) -> AsyncIterator[tuple[int, list[float]]]:
    """A relay for ``service`` behind a plain listener; yields its port and handler end times."""
    ended: list[float] = []

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await relay(stream, "127.0.0.1", service)
        finally:
            ended.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1], ended
        nursery.cancel_scope.cancel()


def service_for(
    upstream: Upstream, *, idle_timeout_seconds: float = 300, connect_timeout_seconds: float = 5
) -> ServiceConfig:
    return ServiceConfig(
        name="test-tcp",
        upstream=upstream,
        protocol="tcp",
        listen_port=1,
        idle_timeout_seconds=idle_timeout_seconds,
        connect_timeout_seconds=connect_timeout_seconds,
    )


async def read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    received = bytearray()
    while data := await stream.receive_some(65536):
        received += data
    return bytes(received)


async def test_echo_through_the_relay() -> None:
    with trio.fail_after(5):
        async with tcp_origin(echo) as upstream, relayed(service_for(upstream)) as (port, _):
            client = await trio.open_tcp_stream("127.0.0.1", port)
            for message in (b"hello", b"world" * 1000):
                await client.send_all(message)
                received = b""
                while len(received) < len(message):
                    received += await client.receive_some(65536)
                assert received == message
            await client.aclose()


async def test_client_half_close_still_receives_the_reply() -> None:
    """Client shuts its write side; the origin sees EOF, then answers; the client gets it all."""

    async def answer_after_eof(stream: trio.SocketStream) -> None:
        request = await read_to_eof(stream)
        await stream.send_all(b"got %d bytes: " % len(request) + request[::-1])
        await stream.aclose()

    with trio.fail_after(5):
        async with (
            tcp_origin(answer_after_eof) as upstream,
            relayed(service_for(upstream)) as (port, _),
        ):
            client = await trio.open_tcp_stream("127.0.0.1", port)
            await client.send_all(b"abc" * 10000)
            await client.send_eof()
            reply = await read_to_eof(client)
            assert reply == b"got 30000 bytes: " + b"cba" * 10000
            await client.aclose()


async def test_origin_half_close_client_can_still_send() -> None:
    """The origin sends a banner and shuts its write side; the client's later bytes still arrive."""
    origin = Origin()

    async def banner_then_listen(stream: trio.SocketStream) -> None:
        await stream.send_all(b"banner\n")
        await stream.send_eof()
        await origin.read_to_eof(stream)

    with trio.fail_after(5):
        async with (
            tcp_origin(banner_then_listen) as upstream,
            relayed(service_for(upstream)) as (port, _),
        ):
            client = await trio.open_tcp_stream("127.0.0.1", port)
            assert await read_to_eof(client) == b"banner\n"  # the origin's EOF reached us
            await client.send_all(b"late data")
            await client.send_eof()
            await origin.got_eof.wait()
            assert bytes(origin.received) == b"late data"
            await client.aclose()


async def test_idle_timeout_closes_both_sides() -> None:
    origin = Origin()

    async def echo_then_record(stream: trio.SocketStream) -> None:
        await stream.send_all(await stream.receive_some(100))
        await origin.read_to_eof(stream)

    with trio.fail_after(5):
        async with (
            tcp_origin(echo_then_record) as upstream,
            relayed(service_for(upstream, idle_timeout_seconds=0.3)) as (port, _),
        ):
            client = await trio.open_tcp_stream("127.0.0.1", port)
            await client.send_all(b"x")
            assert await client.receive_some(100) == b"x"
            # Traffic keeps it alive past the timeout...
            for _ in range(4):
                await trio.sleep(0.15)
                await client.send_all(b"y")
            # ...silence ends it, for both sides.
            quiet_from = trio.current_time()
            assert await read_to_eof(client) == b""
            waited = trio.current_time() - quiet_from
            assert 0.2 <= waited < 1.5
            await origin.closed.wait()
            assert bytes(origin.received) == b"yyyy"
            await client.aclose()


async def test_refused_origin_closes_the_client_promptly() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    free_port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    upstream = Upstream(scheme="tcp", host="127.0.0.1", port=free_port)
    with trio.fail_after(5):
        async with relayed(service_for(upstream, connect_timeout_seconds=3)) as (port, ended):
            client = await trio.open_tcp_stream("127.0.0.1", port)
            started = trio.current_time()
            assert await read_to_eof(client) == b""
            assert trio.current_time() - started < 1.0
            await client.aclose()
            while not ended:
                await trio.sleep(0.01)


async def test_unix_socket_origin_with_half_close(tmp_path: Path) -> None:
    async def answer_after_eof(stream: trio.SocketStream) -> None:
        request = await read_to_eof(stream)
        await stream.send_all(request.upper())
        await stream.send_eof()

    with trio.fail_after(5):
        async with (
            unix_origin(answer_after_eof, tmp_path / "origin.sock") as upstream,
            relayed(service_for(upstream)) as (port, _),
        ):
            client = await trio.open_tcp_stream("127.0.0.1", port)
            await client.send_all(b"over a unix socket")
            await client.send_eof()
            assert await read_to_eof(client) == b"OVER A UNIX SOCKET"
            await client.aclose()


async def test_five_megabytes_each_way_arrive_intact() -> None:
    payload = os.urandom(5 * 1024 * 1024)
    with trio.fail_after(20):
        async with tcp_origin(echo) as upstream, relayed(service_for(upstream)) as (port, _):
            client = await trio.open_tcp_stream("127.0.0.1", port)
            received = bytearray()

            async def send() -> None:
                view = memoryview(payload)
                for offset in range(0, len(payload), 100_000):
                    await client.send_all(view[offset : offset + 100_000])
                await client.send_eof()

            async def receive() -> None:
                received.extend(await read_to_eof(client))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                nursery.start_soon(receive)
            assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
            await client.aclose()


async def test_client_reset_closes_the_origin_connection() -> None:
    """A client that vanishes mid-stream must not leave the origin connection open."""
    origin = Origin()

    async def stream_forever_then_record(stream: trio.SocketStream) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(origin.read_to_eof, stream)

            async def produce() -> None:
                try:
                    while True:
                        await stream.send_all(b"z" * 65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

            nursery.start_soon(produce)
            await origin.closed.wait()
            nursery.cancel_scope.cancel()

    with trio.fail_after(5):
        async with (
            tcp_origin(stream_forever_then_record) as upstream,
            relayed(service_for(upstream)) as (port, ended),
        ):
            client = await trio.open_tcp_stream("127.0.0.1", port)
            assert (await client.receive_some(10)).startswith(b"z")
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await client.aclose()  # linger 0: a reset
            await origin.closed.wait()
            while not ended:
                await trio.sleep(0.01)
