"""The HTTP reverse proxy over real loopback sockets, with origins written in trio here."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
import trio

from tests.unit.test_http1 import BAD_REQUESTS, LIMIT
from tunneld.config_proxy import ProxyConfig, RequireHeader, ServiceConfig, Upstream
from tunneld.proxy.http import HttpProxy
from tunneld.proxy.http1 import (
    Body,
    EndOfMessage,
    IncompleteMessage,
    ProtocolError,
    RequestHead,
    RequestParser,
)
from tunneld.proxy.pool import EventReader

LOCAL = "127.0.0.1"
GUARD_SECONDS = 20
MiB = 1 << 20

# -- origins --------------------------------------------------------------------------------------

# A handler answers one request whose head has been read; it must consume the body (read_body)
# and returns False to close the connection.
Handler = Callable[[trio.abc.Stream, RequestHead, EventReader], Awaitable[bool]]


@dataclass
class Origin:
    handler: Handler
    connections: int = 0
    requests: list[RequestHead] = field(default_factory=list)
    broken: int = 0  # connections that ended in the middle of a request
    broken_event: trio.Event = field(default_factory=trio.Event)

    async def serve(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        reader = EventReader(stream, RequestParser(1 * MiB))
        try:
            while True:
                event = await reader.next_event()
                if not isinstance(event, RequestHead):
                    return
                self.requests.append(event)
                if not await self.handler(stream, event, reader):
                    return
        except (IncompleteMessage, trio.BrokenResourceError):
            self.broken += 1
            self.broken_event.set()
        finally:
            await trio.aclose_forcefully(stream)


async def read_body(reader: EventReader) -> tuple[int, str]:
    """Consume a request body: (length, sha256 hex)."""
    digest = hashlib.sha256()
    length = 0
    while True:
        event = await reader.next_event()
        if isinstance(event, Body):
            digest.update(event.data)
            length += len(event.data)
        elif isinstance(event, EndOfMessage):
            return length, digest.hexdigest()


def response(status: int, body: bytes, *headers: tuple[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def echo(stream: trio.abc.Stream, head: RequestHead, reader: EventReader) -> bool:
    """Answers with what it saw, as JSON."""
    length, digest = await read_body(reader)
    seen = {
        "method": head.method.decode(),
        "target": head.target.decode(),
        "headers": [[n.decode(), v.decode()] for n, v in head.headers],
        "length": length,
        "sha256": digest,
    }
    body = json.dumps(seen).encode()
    await stream.send_all(response(200, body, ("Content-Type", "application/json")))
    return True


def named(name: str) -> Handler:
    async def handler(stream: trio.abc.Stream, head: RequestHead, reader: EventReader) -> bool:
        await read_body(reader)
        await stream.send_all(response(200, name.encode()))
        return True

    return handler


@asynccontextmanager
async def tcp_origin(handler: Handler = echo) -> AsyncIterator[tuple[Origin, Upstream]]:
    origin = Origin(handler)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, origin.serve, 0, host=LOCAL))
        port = listeners[0].socket.getsockname()[1]
        yield origin, Upstream("http", LOCAL, port)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def unix_origin(path: Path, handler: Handler) -> AsyncIterator[tuple[Origin, Upstream]]:
    origin = Origin(handler)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(os.fspath(path))
    sock.listen()
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, origin.serve, [trio.SocketListener(sock)])
        yield origin, Upstream("unix", path=path)
        nursery.cancel_scope.cancel()


def service(name: str, upstream: Upstream, *hosts: str, **options: object) -> ServiceConfig:
    defaults: dict[str, object] = {
        "connect_timeout_seconds": 2.0,
        "response_timeout_seconds": 5.0,
        "idle_timeout_seconds": 5.0,
    }
    return ServiceConfig(
        name=name,
        upstream=upstream,
        hosts=hosts or (name,),
        **(defaults | options),  # type: ignore[arg-type]
    )


@dataclass
class Recorder:
    done: list[tuple[str, int]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)

    def request_done(self, service_name: str, status: int, duration_seconds: float) -> None:
        assert duration_seconds >= 0
        self.done.append((service_name, status))

    def upstream_error(self, service_name: str, kind: str) -> None:
        self.errors.append((service_name, kind))


@asynccontextmanager
async def running_proxy(
    services: list[ServiceConfig],
    config: ProxyConfig | None = None,
    secrets: dict[str, bytes] | None = None,
    observer: Recorder | None = None,
) -> AsyncIterator[int]:
    proxy = HttpProxy(services, config or ProxyConfig(), secrets=secrets or {}, observer=observer)

    async def handle(stream: trio.SocketStream) -> None:
        await proxy.handle(stream, LOCAL)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host=LOCAL))
        try:
            yield listeners[0].socket.getsockname()[1]
        finally:
            while _clients:
                await _clients.pop().aclose()
        nursery.cancel_scope.cancel()
    await proxy.aclose()


# -- a small, independent client ------------------------------------------------------------------

_clients: list[Client] = []


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, object]:
        result: dict[str, object] = json.loads(self.body)
        return result

    def seen_headers(self) -> dict[str, str]:
        pairs = self.json()["headers"]
        assert isinstance(pairs, list)
        return {name: value for name, value in pairs}


class Client:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    @classmethod
    async def connect(cls, port: int) -> Client:
        client = cls(await trio.open_tcp_stream(LOCAL, port))
        _clients.append(client)  # closed when the proxy stops
        return client

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _more(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise EOFError(self.buffer[:200])
        self.buffer += data

    async def read_until(self, delimiter: bytes) -> bytes:
        while (end := self.buffer.find(delimiter)) == -1:
            await self._more()
        data, self.buffer = self.buffer[: end + len(delimiter)], self.buffer[end + len(delimiter) :]
        return data

    async def read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            await self._more()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    async def closed(self) -> bool:
        """Whether the proxy closed the connection (after what is already buffered)."""
        try:
            while True:
                await self._more()
        except EOFError:
            return True
        except trio.BrokenResourceError:
            return True

    async def response(self, method: bytes = b"GET") -> Response:
        head = await self.read_until(b"\r\n\r\n")
        status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
        status = int(status_line.split(" ")[1])
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if method == b"HEAD" or status in (204, 304) or status < 200:
            return Response(status, headers, b"")
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while size := int((await self.read_until(b"\r\n")).split(b";")[0], 16):
                body += await self.read_exactly(size)
                await self.read_until(b"\r\n")
            await self.read_until(b"\r\n")
            return Response(status, headers, body)
        if "content-length" in headers:
            return Response(
                status, headers, await self.read_exactly(int(headers["content-length"]))
            )
        await self.closed()
        body, self.buffer = self.buffer, b""
        return Response(status, headers, body)

    async def request(self, target: str = "/", host: str = "echo", extra: str = "") -> Response:
        await self.send(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode())
        return await self.response()

    async def aclose(self) -> None:
        await self.stream.aclose()


async def get(port: int, target: str = "/", host: str = "echo", extra: str = "") -> Response:
    client = await Client.connect(port)
    try:
        return await client.request(target, host, extra)
    finally:
        await client.aclose()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    with trio.fail_after(seconds):
        while not condition():
            await trio.sleep(0.01)


# -- routing, keep-alive, headers -----------------------------------------------------------------


async def test_routes_by_host_across_tcp_and_unix_services(tmp_path: Path) -> None:
    with trio.fail_after(GUARD_SECONDS):
        async with (
            tcp_origin(named("alpha")) as (_, alpha),
            tcp_origin(named("beta")) as (_, beta),
            unix_origin(tmp_path / "gamma.sock", named("gamma")) as (gamma_origin, gamma),
        ):
            services = [
                service("alpha", alpha, "alpha", "alpha.internal"),
                service("beta", beta, "*.beta.internal"),
                service("gamma", gamma, "gamma"),
            ]
            async with running_proxy(services) as port:
                assert (await get(port, host="alpha")).body == b"alpha"
                assert (await get(port, host="ALPHA.internal:80")).body == b"alpha"
                assert (await get(port, host="x.beta.internal")).body == b"beta"
                assert (await get(port, host="gamma")).body == b"gamma"
                assert gamma_origin.connections == 1
                missing = await get(port, host="nope.example")
                assert missing.status == 404
                assert b"'nope.example'" in missing.body
                assert b"127.0.0.1" not in missing.body


async def test_forwarded_request_headers() -> None:
    with trio.fail_after(GUARD_SECONDS):
        async with tcp_origin() as (_, upstream):
            services = [service("echo", upstream, host_rewrite="origin.local")]
            async with running_proxy(services) as port:
                answer = await get(
                    port,
                    "/v1?x=1",
                    extra="X-Forwarded-For: 6.6.6.6\r\nConnection: x-drop\r\nX-Drop: 1\r\n",
                )
    seen = answer.seen_headers()
    assert answer.json()["target"] == "/v1?x=1"
    assert seen["host"] == "origin.local"
    assert seen["x-forwarded-for"] == LOCAL
    assert seen["x-forwarded-host"] == "echo"
    assert seen["x-forwarded-proto"] == "http"
    assert "x-drop" not in seen and "connection" not in seen


async def test_absolute_form_target_is_routed_by_its_authority() -> None:
    with trio.fail_after(GUARD_SECONDS):
        async with tcp_origin(named("a")) as (_, a), tcp_origin(echo) as (_, b):
            services = [service("a", a), service("b", b)]
            async with running_proxy(services) as port:
                answer = await get(port, "http://b/p?q=1", host="a")
    assert answer.json()["target"] == "/p?q=1"
    assert answer.seen_headers()["host"] == "b"


async def test_keep_alive_reuses_one_origin_connection() -> None:
    observer = Recorder()
    with trio.fail_after(GUARD_SECONDS):
        async with (
            tcp_origin() as (origin, upstream),
            running_proxy([service("echo", upstream)], observer=observer) as port,
        ):
            client = await Client.connect(port)
            for i in range(50):
                answer = await client.request(f"/{i}")
                assert answer.status == 200
                assert answer.json()["target"] == f"/{i}"
            await client.aclose()
    assert origin.connections == 1
    assert len(origin.requests) == 50
    assert observer.done == [("echo", 200)] * 50


async def test_head_request_keeps_both_connections_usable() -> None:
    async def handler(stream: trio.abc.Stream, head: RequestHead, reader: EventReader) -> bool:
        await read_body(reader)
        if head.method == b"HEAD":
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        else:
            await stream.send_all(response(200, b"after head"))
        return True

    with trio.fail_after(GUARD_SECONDS):
        async with (
            tcp_origin(handler) as (origin, upstream),
            running_proxy([service("echo", upstream)]) as port,
        ):
            client = await Client.connect(port)
            await client.send(b"HEAD / HTTP/1.1\r\nHost: echo\r\n\r\n")
            head = await client.response(b"HEAD")
            assert (head.status, head.headers["content-length"]) == (200, "1000")
            assert (await client.request()).body == b"after head"
    assert origin.connections == 1


async def test_pipelined_requests_are_answered_in_order() -> None:
    with trio.fail_after(GUARD_SECONDS):
        async with (
            tcp_origin() as (_, upstream),
            running_proxy([service("echo", upstream)]) as port,
        ):
            client = await Client.connect(port)
            await client.send(
                b"GET /1 HTTP/1.1\r\nHost: echo\r\n\r\n"
                b"POST /2 HTTP/1.1\r\nHost: echo\r\nContent-Length: 5\r\n\r\nhello"
                b"GET /3 HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n"
            )
            answers = [await client.response() for _ in range(3)]
            assert await client.closed()
    assert [a.json()["target"] for a in answers] == ["/1", "/2", "/3"]
    assert answers[1].json()["length"] == 5


async def test_http10_client_gets_a_close_delimited_body() -> None:
    async def chunked(stream: trio.abc.Stream, head: RequestHead, reader: EventReader) -> bool:
        await read_body(reader)
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        return True

    with trio.fail_after(GUARD_SECONDS):
        async with (
            tcp_origin(chunked) as (_, upstream),
            running_proxy([service("echo", upstream)]) as port,
        ):
            client = await Client.connect(port)
            await client.send(b"GET / HTTP/1.0\r\nHost: echo\r\nConnection: keep-alive\r\n\r\n")
            answer = await client.response()
    assert answer.body == b"hello"
    assert "transfer-encoding" not in answer.headers
    assert answer.headers["connection"] == "close"


async def test_idle_keep_alive_connection_is_closed() -> None:
    with trio.fail_after(GUARD_SECONDS):
        async with tcp_origin() as (_, upstream):
            services = [service("echo", upstream, idle_timeout_seconds=0.2)]
            async with running_proxy(services) as port:
                client = await Client.connect(port)
                assert (await client.request()).status == 200
                started = trio.current_time()
                assert await client.closed()
                assert trio.current_time() - started < 2


async def test_dead_pooled_connection_is_replaced() -> None:
    """An origin that closes after every answer (without saying so)."""

    async def one_shot(stream: trio.abc.Stream, head: RequestHead, reader: EventReader) -> bool:
        await read_body(reader)
        await stream.send_all(response(200, b"ok"))
        return False

    with trio.fail_after(GUARD_SECONDS):
        async with (
            tcp_origin(one_shot) as (origin, upstream),
            running_proxy([service("echo", upstream)]) as port,
        ):
            client = await Client.connect(port)
            for _ in range(5):
                assert (await client.request()).status == 200
                await trio.sleep(0.02)  # let the origin's FIN arrive
    assert origin.connections == 5


@pytest.mark.parametrize(("method", "status"), [("GET", 200), ("POST", 502)])
async def test_request_lost_on_a_reused_connection_is_retried_only_if_idempotent(
    method: str, status: int
) -> None:
    """The origin drops the second request on each connection without answering it."""
    answered: set[int] = set()

    async def flaky(stream: trio.abc.Stream, head: RequestHead, reader: EventReader) -> bool:
        await read_body(reader)
        if id(reader) in answered:
            return False
        answered.add(id(reader))
        await stream.send_all(response(200, b"ok"))
        return True

    with trio.fail_after(GUARD_SECONDS):
        async with (
            tcp_origin(flaky) as (origin, upstream),
            running_proxy([service("echo", upstream)]) as port,
        ):
            client = await Client.connect(port)
            assert (await client.request("/first")).status == 200
            await client.send(f"{method} /second HTTP/1.1\r\nHost: echo\r\n\r\n".encode())
            answer = await client.response()
    assert answer.status == status
    if method == "GET":
        assert [r.target for r in origin.requests] == [b"/first", b"/second", b"/second"]


# -- streaming ------------------------------------------------------------------------------------


async def test_chunked_response_streams_before_the_origin_finishes() -> None:
    first_seen = trio.Event()

    async def slow(stream: trio.abc.Stream, head: RequestHead, reader: EventReader) -> bool:
        await read_body(reader)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await stream.send_all(b"b\r\nfirst-chunk\r\n")
        await first_seen.wait()  # the last chunk is produced only after the client got one
        await stream.send_all(b"a\r\nlast-chunk\r\n0\r\n\r\n")
        return True

    with trio.fail_after(GUARD_SECONDS):
        async with (
            tcp_origin(slow) as (_, upstream),
            running_proxy([service("echo", upstream)]) as port,
        ):
            client = await Client.connect(port)
            await client.send(b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n")
            await client.read_until(b"first-chunk")
            first_seen.set()
            await client.read_until(b"last-chunk")
            await client.read_until(b"0\r\n\r\n")


def pattern(size: int) -> AsyncIterator[bytes]:
    async def pieces() -> AsyncIterator[bytes]:
        block = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB
        sent = 0
        while sent < size:
            piece = block[: size - sent]
            sent += len(piece)
            yield piece

    return pieces()


async def test_big_upload_and_download_stream_with_bounded_memory() -> None:
    size = 20 * MiB
    expected = hashlib.sha256()
    async for piece in pattern(size):
        expected.update(piece)

    async def big(stream: trio.abc.Stream, head: RequestHead, reader: EventReader) -> bool:
        if head.method == b"POST":
            return await echo(stream, head, reader)
        await read_body(reader)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        async for piece in pattern(size):
            await stream.send_all(piece)
        return True

    with trio.fail_after(GUARD_SECONDS * 3):
        async with (
            tcp_origin(big) as (_, upstream),
            running_proxy([service("echo", upstream)]) as port,
        ):
            tracemalloc.start()
            try:
                client = await Client.connect(port)
                await client.send(
                    b"POST /up HTTP/1.1\r\nHost: echo\r\nContent-Length: %d\r\n\r\n" % size
                )
                async for piece in pattern(size):
                    await client.send(piece)
                uploaded = (await client.response()).json()
                await client.send(b"GET /down HTTP/1.1\r\nHost: echo\r\n\r\n")
                head = await client.read_until(b"\r\n\r\n")
                assert b"Content-Length: %d" % size in head or b"content-length: %d" % size in head
                received = hashlib.sha256()
                left = size
                while left:
                    data = client.buffer or await client.stream.receive_some(65536)
                    client.buffer = b""
                    assert data
                    received.update(data)
                    left -= len(data)
                _, peak_bytes = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
    assert uploaded["length"] == size
    assert uploaded["sha256"] == expected.hexdigest()
    assert received.hexdigest() == expected.hexdigest()
    assert peak_bytes < 4 * MiB, f"peak {peak_bytes} bytes: a body was buffered"


async def test_chunked_upload_is_forwarded_chunked() -> None:
    with trio.fail_after(GUARD_SECONDS):
        async with (
            tcp_origin() as (_, upstream),
            running_proxy([service("echo", upstream)]) as port,
        ):
            client = await Client.connect(port)
            await client.send(
                b"POST / HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
            )
            await trio.sleep(0.05)
            await client.send(b"6\r\n world\r\n0\r\n\r\n")
            answer = await client.response()
    assert answer.json()["length"] == 11
    assert answer.json()["sha256"] == hashlib.sha256(b"hello world").hexdigest()
    assert answer.seen_headers()["transfer-encoding"] == "chunked"


async def test_chunked_request_that_arrives_whole_goes_in_one_write() -> None:
    with trio.fail_after(GUARD_SECONDS):
        async with (
            tcp_origin() as (_, upstream),
            running_proxy([service("echo", upstream)]) as port,
        ):
            client = await Client.connect(port)
            await client.send(
                b"POST / HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n0\r\n\r\n"
            )
            answer = await client.response()
            assert (await client.request()).status == 200  # the connection was kept
    assert answer.json()["length"] == 5
    assert answer.seen_headers()["transfer-encoding"] == "chunked"


async def test_response_timeout_runs_from_the_end_of_the_upload() -> None:
    async def silent(stream: trio.abc.Stream, head: RequestHead, reader: EventReader) -> bool:
        await read_body(reader)
        await trio.sleep_forever()
        return False  # pragma: no cover

    with trio.fail_after(GUARD_SECONDS):
        async with (
            tcp_origin(silent) as (_, upstream),
            running_proxy([service("echo", upstream, response_timeout_seconds=0.2)]) as port,
        ):
            client = await Client.connect(port)
            started = trio.current_time()
            await client.send(b"POST / HTTP/1.1\r\nHost: echo\r\nContent-Length: 3\r\n\r\n")
            for byte in b"abc":  # the upload takes longer than the response timeout
                await trio.sleep(0.15)
                await client.send(bytes([byte]))
            answer = await client.response()
            elapsed = trio.current_time() - started
    assert answer.status == 504
    assert 0.6 < elapsed < 3


async def test_origin_closing_during_an_upload_is_502_and_closes() -> None:
    observer = Recorder()

    async def hang_up(stream: trio.abc.Stream, head: RequestHead, reader: EventReader) -> bool:
        return False

    with trio.fail_after(GUARD_SECONDS):
        async with (
            tcp_origin(hang_up) as (_, upstream),
            running_proxy([service("echo", upstream)], observer=observer) as port,
        ):
            client = await Client.connect(port)
            await client.send(b"POST / HTTP/1.1\r\nHost: echo\r\nContent-Length: %d\r\n\r\n" % MiB)
            await client.send(b"x" * 1000)
            answer = await client.response()
            assert await client.closed()
    assert (answer.status, answer.headers["connection"]) == (502, "close")
    assert observer.errors == [("echo", "closed")]


async def test_early_answer_during_an_upload_is_relayed_and_closes() -> None:
    async def refuse(stream: trio.abc.Stream, head: RequestHead, reader: EventReader) -> bool:
        await stream.send_all(response(413, b"too big", ("Connection", "close")))
        return False

    with trio.fail_after(GUARD_SECONDS):
        async with (
            tcp_origin(refuse) as (_, upstream),
            running_proxy([service("echo", upstream)]) as port,
        ):
            client = await Client.connect(port)
            await client.send(
                b"POST / HTTP/1.1\r\nHost: echo\r\nContent-Length: %d\r\n\r\n" % (50 * MiB)
            )
            await client.send(b"x" * 65536)
            answer = await client.response()
            assert await client.closed()
    assert answer.status == 413
    assert answer.headers["connection"] == "close"


async def test_expect_100_continue_is_answered_before_the_upload() -> None:
    with trio.fail_after(GUARD_SECONDS):
        async with (
            tcp_origin() as (origin, upstream),
            running_proxy([service("echo", upstream)]) as port,
        ):
            client = await Client.connect(port)
            await client.send(
                b"PUT /x HTTP/1.1\r\nHost: echo\r\nExpect: 100-continue\r\n"
                b"Content-Length: 5\r\n\r\n"
            )
            interim = await client.read_until(b"\r\n\r\n")
            assert interim.startswith(b"HTTP/1.1 100 ")
            await client.send(b"hello")
            answer = await client.response()
            # Not routed: no 100, the answer comes at once, the body is never read.
            other = await Client.connect(port)
            await other.send(
                b"PUT /x HTTP/1.1\r\nHost: nope\r\nExpect: 100-continue\r\n"
                b"Content-Length: 5\r\n\r\n"
            )
            refused = await other.response()
    assert answer.status == 200 and answer.json()["length"] == 5
    assert "expect" not in answer.seen_headers()
    assert refused.status == 404 and refused.headers["connection"] == "close"
    assert len(origin.requests) == 1


# -- WebSocket ------------------------------------------------------------------------------------

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def ws_accept(key: bytes) -> bytes:
    digest = hashlib.sha1(key + WS_GUID).digest()  # noqa: S324 (RFC 6455 says SHA-1)
    return base64.b64encode(digest)


def ws_frame(opcode: int, payload: bytes, *, mask: bytes = b"") -> bytes:
    assert len(payload) < 126
    head = bytes([0x80 | opcode, (0x80 if mask else 0) | len(payload)])
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + payload


async def ws_read(read_exactly: Callable[[int], Awaitable[bytes]]) -> tuple[int, bytes]:
    first, second = await read_exactly(2)
    mask = await read_exactly(4) if second & 0x80 else b""
    payload = await read_exactly(second & 0x7F)
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return first & 0x0F, payload


async def websocket_echo(stream: trio.abc.Stream, head: RequestHead, reader: EventReader) -> bool:
    headers = dict(head.headers)
    accept = ws_accept(headers[b"sec-websocket-key"])
    await stream.send_all(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    buffer = reader.parser.trailing_data

    async def read_exactly(size: int) -> bytes:
        nonlocal buffer
        while len(buffer) < size:
            data = await stream.receive_some(65536)
            if not data:
                raise EOFError
            buffer += data
        data, buffer = buffer[:size], buffer[size:]
        return data

    while True:
        opcode, payload = await ws_read(read_exactly)
        await stream.send_all(ws_frame(opcode, payload))
        if opcode == 8:
            return False


async def test_websocket_echo_through_the_proxy() -> None:
    key = base64.b64encode(b"0123456789abcdef")
    with trio.fail_after(GUARD_SECONDS):
        async with (
            tcp_origin(websocket_echo) as (origin, upstream),
            running_proxy([service("ws", upstream)]) as port,
        ):
            client = await Client.connect(port)
            mask = b"\x01\x02\x03\x04"
            # The first frame rides in the same write as the handshake.
            await client.send(
                b"GET /chat HTTP/1.1\r\nHost: ws\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: "
                + key
                + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
                + ws_frame(1, b"hello", mask=mask)
            )
            answer = await client.response()
            assert answer.status == 101
            expected = ws_accept(key).decode()
            assert answer.headers["sec-websocket-accept"] == expected
            assert answer.headers["upgrade"] == "websocket"
            assert await ws_read(client.read_exactly) == (1, b"hello")
            await client.send(ws_frame(2, b"\x00\xffbinary", mask=mask))
            assert await ws_read(client.read_exactly) == (2, b"\x00\xffbinary")
            await client.send(ws_frame(8, b"\x03\xe8", mask=mask))
            assert await ws_read(client.read_exactly) == (8, b"\x03\xe8")
            assert await client.closed()
    assert origin.requests[0].upgrade


# -- the shared secret ----------------------------------------------------------------------------


@pytest.mark.parametrize("forward", [False, True])
async def test_require_header(forward: bool) -> None:
    required = RequireHeader("backend-secret", Path("/unused"), forward=forward)
    with trio.fail_after(GUARD_SECONDS):
        async with tcp_origin() as (origin, upstream):
            services = [service("echo", upstream, require_header=required)]
            async with running_proxy(services, secrets={"echo": b"s3cret"}) as port:
                missing = await get(port)
                wrong = await get(port, extra="Backend-Secret: nope\r\n")
                assert origin.requests == []
                right = await get(port, extra="Backend-Secret: s3cret\r\n")
    assert (missing.status, wrong.status, right.status) == (401, 401, 200)
    assert b"s3cret" not in missing.body + wrong.body
    assert ("backend-secret" in right.seen_headers()) is forward


def test_missing_secret_is_refused_at_start() -> None:
    required = RequireHeader("backend-secret", Path("/unused"))
    with pytest.raises(Exception, match="secret was not loaded"):
        HttpProxy(
            [service("echo", Upstream("http", LOCAL, 1), require_header=required)], ProxyConfig()
        )


# -- origin failures ------------------------------------------------------------------------------


async def test_origin_down_is_502(tmp_path: Path) -> None:
    observer = Recorder()
    sock = trio.socket.socket()
    await sock.bind((LOCAL, 0))
    closed_port = sock.getsockname()[1]
    sock.close()
    services = [
        service("tcp", Upstream("http", LOCAL, closed_port)),
        service("unix", Upstream("unix", path=tmp_path / "nobody.sock")),
    ]
    with trio.fail_after(GUARD_SECONDS):
        async with running_proxy(services, observer=observer) as port:
            for host in ("tcp", "unix"):
                answer = await get(port, host=host)
                assert answer.status == 502
                assert str(closed_port).encode() not in answer.body
                assert b"nobody.sock" not in answer.body
    assert observer.errors == [("tcp", "refused"), ("unix", "refused")]


async def test_origin_that_never_answers_is_504() -> None:
    async def silent(stream: trio.abc.Stream, head: RequestHead, reader: EventReader) -> bool:
        await trio.sleep_forever()
        return False  # pragma: no cover

    with trio.fail_after(GUARD_SECONDS):
        async with tcp_origin(silent) as (_, upstream):
            services = [service("echo", upstream, response_timeout_seconds=0.3)]
            async with running_proxy(services) as port:
                started = trio.current_time()
                answer = await get(port)
                elapsed = trio.current_time() - started
    assert answer.status == 504
    assert 0.25 < elapsed < 3


async def test_origin_stalling_mid_body_is_cut_after_idle_timeout() -> None:
    async def stall(stream: trio.abc.Stream, head: RequestHead, reader: EventReader) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await trio.sleep_forever()
        return False  # pragma: no cover

    with trio.fail_after(GUARD_SECONDS):
        async with (
            tcp_origin(stall) as (_, upstream),
            running_proxy([service("echo", upstream, idle_timeout_seconds=0.3)]) as port,
        ):
            client = await Client.connect(port)
            await client.send(b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n")
            await client.read_until(b"\r\n\r\n")
            started = trio.current_time()
            assert await client.closed()
            assert client.buffer == b"abc"
            assert 0.25 < trio.current_time() - started < 3


async def test_switching_protocols_without_an_upgrade_request_is_502() -> None:
    observer = Recorder()

    async def upgrade(stream: trio.abc.Stream, head: RequestHead, reader: EventReader) -> bool:
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        )
        return False

    with trio.fail_after(GUARD_SECONDS):
        async with (
            tcp_origin(upgrade) as (_, upstream),
            running_proxy([service("echo", upstream)], observer=observer) as port,
        ):
            assert (await get(port)).status == 502
    assert observer.errors == [("echo", "protocol")]


async def test_pooled_connection_expires_after_idle_timeout() -> None:
    with trio.fail_after(GUARD_SECONDS):
        async with (
            tcp_origin() as (origin, upstream),
            running_proxy([service("echo", upstream, idle_timeout_seconds=0.2)]) as port,
        ):
            assert (await get(port)).status == 200
            assert (await get(port)).status == 200
            assert origin.connections == 1
            await trio.sleep(0.3)
            assert (await get(port)).status == 200
    assert origin.connections == 2


async def test_origin_garbage_is_502() -> None:
    async def garbage(stream: trio.abc.Stream, head: RequestHead, reader: EventReader) -> bool:
        await stream.send_all(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        return False

    with trio.fail_after(GUARD_SECONDS):
        async with (
            tcp_origin(garbage) as (_, upstream),
            running_proxy([service("echo", upstream)]) as port,
        ):
            assert (await get(port)).status == 502


async def test_origin_closing_mid_response_closes_the_client() -> None:
    async def cut(stream: trio.abc.Stream, head: RequestHead, reader: EventReader) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        return False

    with trio.fail_after(GUARD_SECONDS):
        async with (
            tcp_origin(cut) as (_, upstream),
            running_proxy([service("echo", upstream)]) as port,
        ):
            client = await Client.connect(port)
            await client.send(b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n")
            head = await client.read_until(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            assert await client.closed()
            assert len(client.buffer) == 1000


async def test_origin_closing_mid_chunked_response_leaves_it_unterminated() -> None:
    async def cut(stream: trio.abc.Stream, head: RequestHead, reader: EventReader) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        return False

    with trio.fail_after(GUARD_SECONDS):
        async with (
            tcp_origin(cut) as (_, upstream),
            running_proxy([service("echo", upstream)]) as port,
        ):
            client = await Client.connect(port)
            await client.send(b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n")
            await client.read_until(b"\r\n\r\n")
            assert await client.closed()
            assert not client.buffer.endswith(b"0\r\n\r\n")


# -- bad clients ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "status"), BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
async def test_bad_request_is_answered_and_the_next_connection_works(
    data: bytes, status: int
) -> None:
    data = data.replace(b"Host: a\r\n", b"Host: echo\r\n")
    config = ProxyConfig(max_request_head_bytes=LIMIT)
    with trio.fail_after(GUARD_SECONDS):
        async with (
            tcp_origin() as (_, upstream),
            running_proxy([service("echo", upstream)], config) as port,
        ):
            client = await Client.connect(port)
            await client.send(data)
            answer = await client.response()
            assert answer.status == status
            assert answer.headers["connection"] == "close"
            assert await client.closed()
            assert (await get(port)).status == 200


async def test_http10_chunked_request_is_refused_and_a_pipelined_one_never_forwarded() -> None:
    """Issue 13 point 6: nginx answers 400; before, tunneld kept the connection and forwarded
    the request pipelined after the body."""
    with trio.fail_after(GUARD_SECONDS):
        async with (
            tcp_origin() as (origin, upstream),
            running_proxy([service("echo", upstream)]) as port,
        ):
            client = await Client.connect(port)
            await client.send(
                b"POST / HTTP/1.0\r\nHost: echo\r\nTransfer-Encoding: chunked\r\n"
                b"Connection: keep-alive\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
                b"GET /smuggled HTTP/1.0\r\nHost: echo\r\n\r\n"
            )
            answer = await client.response()
            assert (answer.status, answer.headers["connection"]) == (400, "close")
            assert await client.closed()
            assert origin.requests == []


async def test_paths_are_forwarded_in_canonical_form_and_refused_spellings_get_400() -> None:
    with trio.fail_after(GUARD_SECONDS):
        async with (
            tcp_origin() as (origin, upstream),
            running_proxy([service("echo", upstream)]) as port,
        ):
            answer = await get(port, "//%61dmin/%7e/x%c3%a9?q=%2f//..")
            assert answer.json()["target"] == "/admin/~/x%C3%A9?q=%2f//.."
            for target in ("/admin%2fx", "/x/..%2fadmin", "/a%00", "/a/../b"):
                assert (await get(port, target)).status == 400, target
            assert len(origin.requests) == 1


async def test_a_path_parameter_that_changes_the_rule_gets_400() -> None:
    with trio.fail_after(GUARD_SECONDS):
        async with (
            tcp_origin() as (origin, upstream),
            running_proxy(
                [service("admin", upstream, "echo", path_prefix="/admin"),
                 service("echo", upstream)]
            ) as port,
        ):  # fmt: skip
            assert (await get(port, "/admin;x/secret")).status == 400
            assert (await get(port, "/login;jsessionid=1")).status == 200
            assert [head.target for head in origin.requests] == [b"/login;jsessionid=1"]


async def test_slow_head_gets_408() -> None:
    config = ProxyConfig(request_head_timeout_seconds=0.3)
    with trio.fail_after(GUARD_SECONDS):
        async with (
            tcp_origin() as (origin, upstream),
            running_proxy([service("echo", upstream)], config) as port,
        ):
            client = await Client.connect(port)
            answer: Response | None = None
            async with trio.open_nursery() as nursery:

                async def trickle() -> None:
                    for byte in b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n":
                        try:
                            await client.send(bytes([byte]))
                        except trio.BrokenResourceError:
                            return
                        await trio.sleep(0.1)

                nursery.start_soon(trickle)
                answer = await client.response()
                nursery.cancel_scope.cancel()
    assert answer is not None and answer.status == 408
    assert origin.requests == []


async def test_silent_client_gets_408_on_its_first_request() -> None:
    config = ProxyConfig(request_head_timeout_seconds=0.2)
    with trio.fail_after(GUARD_SECONDS):
        async with running_proxy([], config) as port:
            client = await Client.connect(port)
            assert (await client.response()).status == 408


async def test_client_disconnect_mid_upload_cancels_the_origin_request() -> None:
    with trio.fail_after(GUARD_SECONDS):
        async with (
            tcp_origin() as (origin, upstream),
            running_proxy([service("echo", upstream)]) as port,
        ):
            assert (await get(port)).status == 200  # warm up: pooled connection, lazy imports
            baseline = open_fds()
            client = await Client.connect(port)
            await client.send(
                b"POST / HTTP/1.1\r\nHost: echo\r\nContent-Length: %d\r\n\r\n" % (10 * MiB)
            )
            await client.send(b"x" * MiB)
            await client.aclose()
            await origin.broken_event.wait()
            await wait_for(lambda: open_fds() <= baseline - 1)  # the pooled one is gone too
    assert origin.broken == 1


async def test_connections_opened_and_dropped_leave_no_fds() -> None:
    config = ProxyConfig(request_head_timeout_seconds=2.0)
    with trio.fail_after(GUARD_SECONDS * 2):
        async with (
            tcp_origin() as (_, upstream),
            running_proxy([service("echo", upstream)], config) as port,
        ):
            assert (await get(port)).status == 200
            baseline = open_fds()
            for i in range(300):
                stream = await trio.open_tcp_stream(LOCAL, port)
                if i % 3 == 1:
                    await stream.send_all(b"GET / HTTP/1.1\r\nHo")
                elif i % 3 == 2:
                    await stream.send_all(
                        b"POST / HTTP/1.1\r\nHost: echo\r\nContent-Length: 9\r\n\r\nab"
                    )
                await stream.aclose()
            await wait_for(lambda: open_fds() <= baseline)
            assert (await get(port)).status == 200


async def test_reject_overloaded_answers_503() -> None:
    proxy = HttpProxy([], ProxyConfig())
    with trio.fail_after(GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(trio.serve_tcp, proxy.reject_overloaded, 0, host=LOCAL)
            )
            client = await Client.connect(listeners[0].socket.getsockname()[1])
            await client.send(b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n")
            answer = await client.response()
            nursery.cancel_scope.cancel()
    assert answer.status == 503 and answer.headers["connection"] == "close"


def test_protocol_error_is_a_proxy_error() -> None:
    from tunneld.errors import ProxyError

    assert issubclass(ProtocolError, ProxyError)
