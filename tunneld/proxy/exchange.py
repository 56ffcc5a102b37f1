"""One request forwarded to its origin, and the origin's answer relayed back to the client.

How this works: :meth:`Exchange.forward` takes a routed, authorized request whose head has been
read. The rewritten head goes to a pooled origin connection in one write together with whatever
of the body is already parsed. If that was the whole request, the exchange then waits for the
response head; otherwise a second task streams the rest of the body while the first waits, so an
origin may answer (and the client read) before the upload ends. Bodies move in pieces of at most
``RECEIVE_BYTES`` in both directions, each written before the next is read: trio's flow control
holds back the faster side and no body is ever held whole.

Deadlines: the response side runs under one cancel scope whose deadline moves with the phase
(scopes are the largest cost trio adds per wait): ``idle_timeout`` while writing the request and
while relaying the body, ``response_timeout`` for the response head. That timeout runs from the
moment the whole request has been written (a long upload is guarded by ``idle_timeout`` instead);
missing it answers 504.

How an exchange ends: it returns the status it relayed; or raises :class:`ExchangeFailed` while
nothing of a response has reached the client, who then gets that status; or raises
:class:`ExchangeAborted` once a response is under way or the client is gone, when the only honest
signal left is to close the client connection (a chunked body then lacks its last chunk).

Decisions:

- ``Expect: 100-continue`` is answered by the proxy, as nginx and Envoy do: the ``100`` goes out
  once the origin connection is open (routing and authorization came before), so a 404/401/502
  still spares the client its upload; ``Expect`` is not forwarded (one upload path, and origins
  that ignore ``Expect`` cannot stall the client).
- A request that fails on a reused pooled connection before any response byte is retried once on
  a new connection, but only if the failing write was the first one (everything sent is still
  in hand) or the request was complete, idempotent and the origin closed without a byte. A new
  connection is never found stale, so there is no second retry.
- Informational answers other than 101 (100, 103) from origins are not relayed. A 101 to an
  Upgrade request turns the exchange into a raw byte relay, both ways, until both sides are done.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from tunneld.config_proxy import ProxyConfig, ServiceConfig
from tunneld.errors import UpstreamError
from tunneld.proxy.headers import (
    ForwardingPolicy,
    client_response_head,
    origin_request_head,
    response_headers,
)
from tunneld.proxy.http1 import (
    CONTINUE_RESPONSE,
    LAST_CHUNK,
    Body,
    ConnectionClosed,
    EndOfMessage,
    IncompleteMessage,
    ProtocolError,
    RequestHead,
    ResponseHead,
    chunk,
    response_head_bytes,
)
from tunneld.proxy.pool import RECEIVE_BYTES, EventReader, UpstreamConnection, UpstreamPool

log = logging.getLogger(__name__)

IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_NETWORK_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)


class ExchangeFailed(Exception):
    """Nothing of a response has reached the client: answer it with ``status``."""

    def __init__(self, status: int, detail: str = "") -> None:
        super().__init__(status, detail)
        self.status = status
        self.detail = detail  # for the client to read: no addresses, no origin's words


class ExchangeAborted(Exception):
    """Close the client connection now: a response is under way or the client is gone.

    ``status`` is the status the client was sent, or 0 if none.
    """

    def __init__(self, status: int = 0) -> None:
        super().__init__(status)
        self.status = status


class _StaleConnection(Exception):
    """A reused origin connection turned out dead before the request took effect."""


class Service:
    """A service as forwarding sees it: its settings, origin connections and header rewriting."""

    __slots__ = ("config", "policy", "pool")

    def __init__(self, config: ServiceConfig, proxy: ProxyConfig) -> None:
        self.config = config
        self.policy = ForwardingPolicy.for_service(config, proxy)
        self.pool = UpstreamPool(config)


class Exchange:
    """One request on its way to ``service``'s origin.

    ``report_upstream_error(service_name, kind)`` is told of each origin failure.
    """

    __slots__ = (
        "_client",
        "_client_error",
        "_head",
        "_report_upstream_error",
        "_request_sent",
        "_response_started",
        "_service",
        "request_read",
    )

    def __init__(
        self,
        client: EventReader,
        head: RequestHead,
        service: Service,
        report_upstream_error: Callable[[str, str], None],
    ) -> None:
        self._client = client
        self._head = head
        self._service = service
        self._report_upstream_error = report_upstream_error
        #: The client's body has been read to its end: the connection may carry another request.
        self.request_read = head.framing == "none"
        # The origin has the whole request, or will once the first write is done.
        self._request_sent = self.request_read
        self._response_started = False
        self._client_error: Exception | None = None  # why the upload stopped reading the client

    async def forward(self, client_address: str) -> tuple[int, bool]:
        """Send the request, relay the answer: ``(status, keep the client connection)``.

        Raises :class:`ExchangeFailed` or :class:`ExchangeAborted` (see the module docstring);
        a client that cannot take a ``100 Continue`` raises what its stream raised.
        """
        head = self._head
        first_write = self._first_write(client_address)
        pool = self._service.pool
        conn = await self._connect(pool.acquire)
        if head.expect_continue and not self.request_read and head.version == b"1.1":
            try:
                with trio.fail_after(self._service.config.idle_timeout_seconds):
                    await self._client.stream.send_all(CONTINUE_RESPONSE)
            except BaseException:
                await pool.release(conn)  # nothing was sent on it: still good
                raise
        try:
            return await self._exchange_on(conn, first_write)
        except _StaleConnection:
            log.debug("%s: reused origin connection was dead, retrying", self._service.config.name)
        conn = await self._connect(pool.connect)  # new, so never stale: the only retry
        return await self._exchange_on(conn, first_write)

    def _first_write(self, client_address: str) -> bytes:
        """The rewritten head and the body parsed so far: a small request goes in one write."""
        head = self._head
        chunked = head.framing == "chunked"
        parts = [origin_request_head(head, self._service.policy, client_address=client_address)]
        events = self._client.events
        size = 0
        while events and size < RECEIVE_BYTES and not self.request_read:
            event = events.popleft()
            if isinstance(event, Body):
                parts.append(chunk(event.data) if chunked else event.data)
                size += len(event.data)
            else:  # EndOfMessage: the parser emits nothing else inside a request
                if chunked:
                    parts.append(LAST_CHUNK)
                self.request_read = self._request_sent = True
        return b"".join(parts)

    async def _connect(
        self, connect: Callable[[], Awaitable[UpstreamConnection]]
    ) -> UpstreamConnection:
        try:
            return await connect()
        except UpstreamError as exc:
            raise self._upstream_failed(exc.kind, str(exc)) from None

    def _upstream_failed(self, kind: str, message: str) -> ExchangeFailed:
        """Log and report an origin failure; returns what to raise."""
        name = self._service.config.name
        log.warning("service %s: %s", name, message)
        self._report_upstream_error(name, kind)
        if kind == "timeout":
            return ExchangeFailed(504, "the service did not answer in time")
        return ExchangeFailed(502, "the service is unreachable" if kind != "protocol" else "")

    # -- on one origin connection ------------------------------------------------------------

    async def _exchange_on(self, conn: UpstreamConnection, first_write: bytes) -> tuple[int, bool]:
        """The exchange on ``conn``, which goes back to the pool only after a clean end."""
        conn.parser.expect_response(self._head.method)
        conn.received_bytes = 0  # of this exchange: 0 still means "may retry"
        try:
            if self._request_sent:
                scope = trio.CancelScope(
                    deadline=trio.current_time() + self._service.config.idle_timeout_seconds
                )
                replayable = conn.reused and self._head.method in IDEMPOTENT_METHODS
                status, keep_client, keep_conn = await self._relay_response(
                    conn, scope, replayable=replayable, request=first_write
                )
            else:
                status, keep_client, keep_conn = await self._relay_during_upload(conn, first_write)
        except BaseException:
            await conn.aclose()
            raise
        # Unless the whole request went out, the origin may still be waiting for body bytes.
        if keep_conn and self._request_sent:
            await self._service.pool.release(conn)  # which closes it if it cannot be reused
        else:
            await conn.aclose()
        return status, keep_client

    async def _send_request(self, conn: UpstreamConnection, data: bytes) -> None:
        """The first write of a request: failing on a reused connection means it was stale."""
        try:
            await conn.stream.send_all(data)
        except _NETWORK_ERRORS:
            if conn.reused:
                raise _StaleConnection from None
            raise self._upstream_failed("closed", "origin closed before the request") from None

    async def _relay_during_upload(
        self, conn: UpstreamConnection, first_write: bytes
    ) -> tuple[int, bool, bool]:
        """Send the head, then stream the rest of the body from a second task meanwhile."""
        config = self._service.config
        with trio.CancelScope(deadline=trio.current_time() + config.idle_timeout_seconds) as scope:
            await self._send_request(conn, first_write)
        if scope.cancelled_caught:
            raise self._upstream_failed("timeout", "origin does not read the request")
        response_scope = trio.CancelScope()  # the upload sets the deadline once it is done
        outcome: tuple[int, bool, bool] | None = None
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._upload, conn, response_scope, nursery.cancel_scope)
            try:
                outcome = await self._relay_response(conn, response_scope, replayable=False)
            except Exception as exc:  # re-raised below the nursery, not wrapped in a group
                failure = exc
            nursery.cancel_scope.cancel()  # an early answer ends the upload
        broken = self._client_error
        if broken is not None:
            log.debug("%s: client failed during the upload: %r", config.name, broken)
            if (
                isinstance(broken, ProtocolError)
                and not isinstance(broken, IncompleteMessage)
                and not self._response_started
            ):
                raise ExchangeFailed(broken.status, str(broken))
            raise ExchangeAborted
        if failure is not None:
            raise failure
        if outcome is None:  # cancelled: only the upload does that, and it records why first
            raise ExchangeAborted
        status, keep_client, keep_conn = outcome
        return status, keep_client and self.request_read, keep_conn

    async def _upload(
        self,
        conn: UpstreamConnection,
        response_scope: trio.CancelScope,
        cancel_exchange: trio.CancelScope,
    ) -> None:
        """Stream the rest of the request body from the client to the origin."""
        client = self._client
        chunked = self._head.framing == "chunked"
        config = self._service.config
        idle = config.idle_timeout_seconds
        try:
            while True:
                try:
                    with trio.fail_after(idle):
                        event = await client.next_event()
                except (ProtocolError, trio.TooSlowError, *_NETWORK_ERRORS) as exc:
                    self._client_error = exc
                    cancel_exchange.cancel()
                    return
                if isinstance(event, Body):
                    data = chunk(event.data) if chunked else event.data
                else:  # EndOfMessage: the parser emits nothing else inside a request
                    self.request_read = True
                    if not chunked:
                        self._request_sent = True
                        return
                    data = LAST_CHUNK
                try:
                    with trio.fail_after(idle):
                        await conn.stream.send_all(data)
                except (trio.TooSlowError, *_NETWORK_ERRORS):
                    return  # the origin stopped reading: its answer (or EOF) tells the rest
                if self.request_read:
                    self._request_sent = True
                    return
        finally:
            if not self._response_started:
                response_scope.deadline = min(
                    response_scope.deadline, trio.current_time() + config.response_timeout_seconds
                )

    async def _relay_response(
        self,
        conn: UpstreamConnection,
        scope: trio.CancelScope,
        *,
        replayable: bool,
        request: bytes | None = None,
    ) -> tuple[int, bool, bool]:
        """Relay the answer: ``(status, keep the client connection, keep conn)``.

        ``request``, when given, is the whole request, written first. Everything runs under
        ``scope``; ``replayable`` says a close without a byte may be retried on a new connection.
        """
        config = self._service.config
        response: ResponseHead | None = None
        with scope:
            if request is not None:
                await self._send_request(conn, request)
                scope.deadline = trio.current_time() + config.response_timeout_seconds
            try:
                while response is None:
                    event = await conn.next_event()
                    if isinstance(event, ResponseHead):
                        if event.status >= 200 or event.status == 101:
                            response = event  # 100 and 103 are dropped, with their ends
                    elif isinstance(event, ConnectionClosed):
                        raise IncompleteMessage(502, "origin closed before answering")
            except (ProtocolError, *_NETWORK_ERRORS) as exc:
                if replayable and conn.received_bytes == 0:
                    raise _StaleConnection from None
                kind = "protocol" if type(exc) is ProtocolError else "closed"
                raise self._upstream_failed(kind, f"{config.upstream}: {exc}") from None
            if response.status != 101:
                return await self._relay_body(conn, response, scope)
        if response is None:
            raise self._upstream_failed(
                "timeout",
                f"{config.upstream}: no response within {config.response_timeout_seconds:g}s",
            )
        if scope.cancelled_caught:  # the deadline passed during the body
            log.info("%s: response relay idle for %gs", config.name, config.idle_timeout_seconds)
            raise ExchangeAborted(response.status)
        if not self._head.upgrade:
            raise self._upstream_failed("protocol", "101 without an Upgrade request")
        await self._switch_protocols(conn, response)
        return 101, False, False

    async def _relay_body(
        self, conn: UpstreamConnection, response: ResponseHead, scope: trio.CancelScope
    ) -> tuple[int, bool, bool]:
        """Relay a final response's head and body to the client."""
        head = self._head
        keep_client = head.keep_alive and self.request_read and not head.upgrade
        data, chunked, keep_client = client_response_head(response, head, keep_alive=keep_client)
        pending = [data]  # the head goes out with the body already here: one write when small
        idle = self._service.config.idle_timeout_seconds
        events = conn.events
        self._response_started = True
        done = False
        try:
            while True:
                while events and not done:
                    event = events.popleft()
                    if isinstance(event, Body):
                        pending.append(chunk(event.data) if chunked else event.data)
                    elif isinstance(event, EndOfMessage):
                        if chunked:
                            pending.append(LAST_CHUNK)
                        done = True
                if pending:
                    scope.deadline = trio.current_time() + idle
                    await self._client.stream.send_all(b"".join(pending))
                    pending = []
                if done:
                    return response.status, keep_client, response.keep_alive
                scope.deadline = trio.current_time() + idle
                await conn.receive()
        except (ProtocolError, *_NETWORK_ERRORS) as exc:
            log.info("%s: response relay ended early: %r", self._service.config.name, exc)
            raise ExchangeAborted(response.status) from None

    async def _switch_protocols(self, conn: UpstreamConnection, response: ResponseHead) -> None:
        """Relay the 101, then raw bytes both ways until both sides are done or idle."""
        client = self._client
        idle = self._service.config.idle_timeout_seconds
        headers = response_headers(response.headers, upgrade=True)
        first = response_head_bytes(101, response.reason, headers) + conn.parser.trailing_data
        try:
            with trio.fail_after(idle):
                await client.stream.send_all(first)
                if client.parser.trailing_data:
                    await conn.stream.send_all(client.parser.trailing_data)
        except (trio.TooSlowError, *_NETWORK_ERRORS):
            raise ExchangeAborted(101) from None
        await _relay_raw(client.stream, conn.stream, idle)


async def _relay_raw(a: trio.abc.Stream, b: trio.abc.Stream, idle_seconds: float) -> None:
    """Copy bytes both ways until both sides are done, one side breaks, or nothing moves for
    ``idle_seconds``. An EOF is passed on as a half-close where the other stream has one."""
    with trio.CancelScope(deadline=trio.current_time() + idle_seconds) as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_copy, a, b, scope, idle_seconds)
            nursery.start_soon(_copy, b, a, scope, idle_seconds)


async def _copy(
    source: trio.abc.Stream, sink: trio.abc.Stream, scope: trio.CancelScope, idle_seconds: float
) -> None:
    try:
        while data := await source.receive_some(RECEIVE_BYTES):
            await sink.send_all(data)
            scope.deadline = trio.current_time() + idle_seconds
        if isinstance(sink, trio.abc.HalfCloseableStream):
            await sink.send_eof()
            return  # the other direction may still be carrying an answer
    except _NETWORK_ERRORS:
        pass
    scope.cancel()
