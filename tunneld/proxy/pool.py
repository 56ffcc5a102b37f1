"""Stream plumbing of the HTTP proxy: events off a stream, the per-service keep-alive pool of
origin connections, the raw relay after an upgrade, and the lingering close.

A pooled connection is handed out newest first (the one least likely to have been closed by the
origin's own idle timer). Before reuse it is checked without blocking: a socket that is readable
while idle has either been closed by the origin or sent bytes nobody asked for, and is dropped.
That check cannot see a close that is still in flight, so the proxy may still retry once on a
fresh connection (see ``http.py`` for when that is safe). Connections idle longer than the
service's ``idle_timeout`` are closed when the pool is next touched.
"""

from __future__ import annotations

from collections import deque

import trio

from tunneld.config_proxy import ServiceConfig
from tunneld.proxy.http1 import Event, RequestParser, ResponseParser
from tunneld.proxy.upstream import open_upstream

#: Bytes asked of the kernel per receive: also the largest piece a body is relayed in.
RECEIVE_BYTES = 65536
#: After an error answer, unread input is drained this long so the close does not reset the
#: connection under the answer (which would make the client see ECONNRESET, not the status).
LINGER_SECONDS = 1.0
LINGER_BYTES = 1 << 20
_NETWORK_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)


class EventReader:
    """Events from ``stream`` through a sans-IO parser. Callers set the deadlines."""

    __slots__ = ("events", "parser", "received_bytes", "stream")

    def __init__(self, stream: trio.abc.Stream, parser: RequestParser | ResponseParser) -> None:
        self.stream = stream
        self.parser = parser
        self.events: deque[Event] = deque()
        self.received_bytes = 0

    async def next_event(self) -> Event:
        """The next event; raises ``ProtocolError`` (and ``IncompleteMessage`` on early EOF)."""
        events = self.events
        while not events:
            await self.receive()
        return events.popleft()

    async def receive(self) -> None:
        """Receive once and parse what came (raises a pending parse error first)."""
        if self.parser.error is not None:
            raise self.parser.error
        data = await self.stream.receive_some(RECEIVE_BYTES)
        self.received_bytes += len(data)
        self.events.extend(self.parser.feed(data) if data else self.parser.feed_eof())


class UpstreamConnection(EventReader):
    """One connection to an origin, with the parser of the responses on it."""

    __slots__ = ("idle_since", "reused")

    parser: ResponseParser

    def __init__(self, stream: trio.abc.Stream) -> None:
        super().__init__(stream, ResponseParser())
        self.idle_since = 0.0
        self.reused = False

    @property
    def reusable(self) -> bool:
        """Between exchanges with nothing unread: may go back to the pool."""
        return self.parser.idle and not self.events

    def looks_alive(self) -> bool:
        socket = _socket_of(self.stream)
        return socket is None or not socket.is_readable()

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


class UpstreamPool:
    """A bounded LIFO of idle keep-alive connections to one service's origin."""

    def __init__(self, service: ServiceConfig) -> None:
        self._service = service
        self._idle: deque[UpstreamConnection] = deque()
        self._closed = False

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    async def acquire(self) -> UpstreamConnection:
        """A pooled connection that still looks alive, else a new one (``UpstreamError``)."""
        idle = self._idle
        if idle:
            deadline = trio.current_time() - self._service.idle_timeout_seconds
            while idle:
                conn = idle.pop()
                if conn.idle_since < deadline:
                    idle.append(conn)
                    await self._close_expired(deadline)
                    break
                if conn.looks_alive():
                    conn.reused = True
                    return conn
                await conn.aclose()
        return await self.connect()

    async def connect(self) -> UpstreamConnection:
        """A new connection, never pooled before (raises ``UpstreamError``)."""
        service = self._service
        stream = await open_upstream(
            service.upstream,
            service.tls,
            connect_timeout_seconds=service.connect_timeout_seconds,
        )
        return UpstreamConnection(stream)

    async def release(self, conn: UpstreamConnection) -> None:
        """Return ``conn`` after a complete exchange; closes it if it cannot be reused."""
        if self._closed or not conn.reusable:
            await conn.aclose()
            return
        now = trio.current_time()
        conn.idle_since = now
        self._idle.append(conn)
        if len(self._idle) > self._service.max_idle_upstream_connections:
            await self._idle.popleft().aclose()
        await self._close_expired(now - self._service.idle_timeout_seconds)

    async def sweep(self) -> None:
        """Close idle connections past ``idle_timeout`` or that the origin has closed.

        Without this, an origin's close leaves our end in CLOSE_WAIT until the next request
        for this service comes along, which on a quiet service may be never.
        """
        await self._close_expired(trio.current_time() - self._service.idle_timeout_seconds)
        alive: deque[UpstreamConnection] = deque()
        while self._idle:
            conn = self._idle.popleft()
            if conn.looks_alive():
                alive.append(conn)
            else:
                await conn.aclose()
        self._idle = alive

    async def _close_expired(self, deadline: float) -> None:
        idle = self._idle
        while idle and idle[0].idle_since < deadline:
            await idle.popleft().aclose()

    async def aclose(self) -> None:
        """Close every idle connection; connections in use are closed on release."""
        self._closed = True
        while self._idle:
            await self._idle.pop().aclose()


def _socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if isinstance(stream, trio.SocketStream):
        return stream.socket
    return None


async def relay_raw(a: trio.abc.Stream, b: trio.abc.Stream, idle_seconds: float) -> None:
    """Copy bytes both ways until both sides are done, one side breaks, or nothing moves for
    ``idle_seconds``. An EOF is passed on as a half-close where the other stream has one."""
    with trio.CancelScope(deadline=trio.current_time() + idle_seconds) as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_copy, a, b, scope, idle_seconds)
            nursery.start_soon(_copy, b, a, scope, idle_seconds)


async def _copy(
    source: trio.abc.Stream, sink: trio.abc.Stream, scope: trio.CancelScope, idle: float
) -> None:
    try:
        while data := await source.receive_some(RECEIVE_BYTES):
            await sink.send_all(data)
            scope.deadline = trio.current_time() + idle
        if isinstance(sink, trio.abc.HalfCloseableStream):
            await sink.send_eof()
            return
    except _NETWORK_ERRORS:
        pass
    scope.cancel()


async def linger(stream: trio.abc.Stream, seconds: float = LINGER_SECONDS) -> None:
    """Half-close and drain what the peer still sends, so closing does not reset our answer."""
    with trio.move_on_after(seconds):
        try:
            if isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()
            drained = 0
            while drained < LINGER_BYTES:
                data = await stream.receive_some(RECEIVE_BYTES)
                if not data:
                    return
                drained += len(data)
        except _NETWORK_ERRORS:
            pass
