"""Connections of the HTTP proxy: events off a stream, and each service's pool of idle origin
connections kept alive for the next request.

How this works: an :class:`EventReader` pairs a stream with a sans-IO parser from
:mod:`tunneld.proxy.http1`; it serves client connections and, as :class:`UpstreamConnection`,
origin ones. A pooled connection is handed out newest first (the one least likely to have been
closed by the origin's own idle timer). Before reuse it is checked without blocking: a socket
that is readable while idle has either been closed by the origin or sent bytes nobody asked for,
and is dropped. That check cannot see a close that is still in flight, so a request may still be
retried once on a new connection (:mod:`tunneld.proxy.exchange` says when that is safe).
Connections idle longer than the service's ``idle_timeout`` are closed when the pool is next
touched, and by the periodic :meth:`UpstreamPool.sweep`.
"""

from __future__ import annotations

from collections import deque

import trio

from tunneld.config_proxy import ServiceConfig
from tunneld.proxy.eager import EagerSocketStream
from tunneld.proxy.http1 import (
    Body,
    EndOfMessage,
    Event,
    ProtocolError,
    RequestHead,
    RequestParser,
    ResponseParser,
)
from tunneld.proxy.upstream import open_upstream

#: Bytes asked of the kernel per receive: also the largest piece a body is relayed in.
RECEIVE_BYTES = 65536
#: What a client connection receives at once outside a body: at most this much lies unparsed.
HEAD_RECEIVE_BYTES = 16384
#: Outside a body, request bytes are parsed in pieces of this size, stopping once a request ends.
PARSE_SLICE_BYTES = 1024


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


class RequestReader(EventReader):
    """A client connection's requests, parsed at most one request ahead of the caller.

    A client may pipeline as many requests as it likes; parsing them all at once would turn one
    receive of tiny requests into thousands of events (objects far larger than their bytes),
    held for as long as the client does not read the answers. Instead, what follows a complete
    request stays unparsed (at most ``HEAD_RECEIVE_BYTES``: outside a body no more is received
    at once) until the events before it are consumed. Outside a body, bytes go to the parser in
    ``PARSE_SLICE_BYTES`` pieces; a body goes whole — exactly its remaining length when it has
    one, and a chunked body up to each place where its last chunk could begin — so uploads keep
    their one parse per receive.
    """

    __slots__ = ("_body_left", "_in_body", "_metadata", "unparsed")

    parser: RequestParser

    def __init__(self, stream: trio.abc.Stream, parser: RequestParser) -> None:
        super().__init__(stream, parser)
        #: Received bytes after a complete request, not parsed yet.
        self.unparsed = b""
        self._in_body = False
        self._body_left = -1  # bytes of a body with Content-Length still to come; -1: chunked
        self._metadata = False  # in a chunked body, the last piece parsed gave no data

    @property
    def between_requests(self) -> bool:
        """Nothing of a next request has arrived: the connection is idle."""
        return not self.events and not self.unparsed and self.parser.idle

    async def receive(self) -> None:
        """Parse more: what is unparsed, else one receive (raises a pending parse error first)."""
        if self.parser.error is not None:
            raise self.parser.error
        data: bytes | bytearray = self.unparsed
        if data:
            self.unparsed = b""
        else:
            data = await self.stream.receive_some(
                RECEIVE_BYTES if self._in_body else HEAD_RECEIVE_BYTES
            )
            self.received_bytes += len(data)
            if not data:
                self.events.extend(self.parser.feed_eof())
                return
        self._parse(data)

    def _parse(self, data: bytes | bytearray) -> None:
        feed = self.parser.feed
        events = self.events
        start, end = 0, len(data)
        while start < end:
            if not self._in_body:
                stop = start + PARSE_SLICE_BYTES
            elif self._body_left >= 0:
                stop = start + (self._body_left or PARSE_SLICE_BYTES)
            else:
                stop = self._chunked_stop(data, start, end)
            try:
                new = feed(data if start == 0 and stop >= end else data[start:stop])
            except ProtocolError as exc:
                if not events:
                    raise
                self.parser.error = exc  # raised once the requests before it are answered
                return
            start = stop
            complete = False
            for event in new:  # usually one or two
                if isinstance(event, Body):
                    if self._body_left > 0:
                        self._body_left -= len(event.data)
                elif isinstance(event, EndOfMessage):
                    self._in_body = False
                    complete = True
                elif isinstance(event, RequestHead):
                    self._in_body = event.framing != "none"
                    self._body_left = event.content_length or 0 if event.framing == "length" else -1
                    if event.upgrade:
                        # The parser stopped at the head: what follows is the new protocol's.
                        self.parser.trailing_data += data[start:]
                        start = end
            self._metadata = self._in_body and self._body_left < 0 and not new
            events.extend(new)
            if self.parser.error is not None:
                return  # nothing more will be parsed on this connection
            if complete and start < end:
                self.unparsed = bytes(data[start:])
                return

    def _chunked_stop(self, data: bytes | bytearray, start: int, end: int) -> int:
        """Where to cut a chunked body so that its end, if here, lies in a small piece."""
        if self._metadata or data[start] == 0x30:  # "0": maybe the last chunk
            return start + PARSE_SLICE_BYTES
        candidate = data.find(b"\n0", start, end)
        return end if candidate < 0 else candidate + 1


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
        stream = self.stream
        if isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        return not isinstance(stream, EagerSocketStream) or not stream.is_readable()

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
            expired_before = trio.current_time() - self._service.idle_timeout_seconds
            while idle:
                conn = idle.pop()
                if conn.idle_since < expired_before:  # the newest expired: so did all the others
                    idle.append(conn)
                    await self._close_expired(expired_before)
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

    async def _close_expired(self, expired_before: float) -> None:
        idle = self._idle
        while idle and idle[0].idle_since < expired_before:
            await idle.popleft().aclose()

    async def aclose(self) -> None:
        """Close every idle connection; connections in use are closed on release."""
        self._closed = True
        while self._idle:
            await self._idle.pop().aclose()
