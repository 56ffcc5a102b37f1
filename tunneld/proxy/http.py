"""HTTP/1.1 reverse proxy: requests that arrive through the tunnel, forwarded to local origins.

How this works: :meth:`HttpProxy.handle` runs one client connection — a keep-alive loop that
reads a request head (:mod:`tunneld.proxy.http1` does the parsing), routes it by Host and path
(:mod:`tunneld.proxy.routes`), checks the service's shared secret, rewrites the headers
(:mod:`tunneld.proxy.headers`) and forwards it on a pooled origin connection
(:mod:`tunneld.proxy.pool`). Bodies stream in pieces of at most 64 KiB in both directions: a
piece is written before the next is read, so trio's flow control holds back the faster side
and no body is ever held whole. Requests with a body are uploaded by a second task while the
first waits for the answer, so an origin may answer (and the client read) before the upload
ends.

Decisions:

- ``Expect: 100-continue`` is answered by the proxy, as nginx and Envoy do: the ``100`` goes out
  once the request is routed, authorized and its origin connection is open, so a 404/401/502
  still spares the client its upload; ``Expect`` is not forwarded (one upload path, and origins
  that ignore ``Expect`` cannot stall the client).
- ``response_timeout`` runs from the moment the whole request has been written to the origin (a
  long upload is guarded by ``idle_timeout`` instead); missing it answers 504.
- A request that fails on a reused pooled connection before any response byte is retried once on
  a new connection, but only if the failing write was the first one (everything sent is still
  in hand) or the request was complete, idempotent and the origin closed without a byte.
- Errors before the response head answer with a status (400/408/431/502/504/...) and keep the
  client connection when the request was read whole; after the head, the only honest signal
  is to close the client connection (a chunked body then lacks its last chunk).
- Between requests a client connection may idle for the previous service's ``idle_timeout``;
  the first request's head, and each later one once it has begun, must arrive within
  ``request_head_timeout`` (else 408).
- Informational answers other than 101 (100, 103) from origins are not relayed.
- Each exchange has one cancel scope whose deadline moves with the phase (idle_timeout for writes
  and body reads, response_timeout for the head): scopes are the largest cost trio adds per wait.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

import trio

from tunneld.config_proxy import ProxyConfig, ServiceConfig
from tunneld.errors import ConfigError, TunneldError, UpstreamError
from tunneld.proxy.headers import (
    ForwardingPolicy,
    client_response_head,
    has_required_header,
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
    RequestParser,
    ResponseHead,
    chunk,
    error_response_bytes,
    printable,
    response_head_bytes,
)
from tunneld.proxy.pool import (
    LINGER_SECONDS,
    RECEIVE_BYTES,
    EventReader,
    UpstreamConnection,
    UpstreamPool,
    linger,
    relay_raw,
)
from tunneld.proxy.routes import Router

log = logging.getLogger(__name__)

IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
ERROR_WRITE_SECONDS = 5.0
_NETWORK_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)


class Observer(Protocol):
    """Receives per-request outcomes (metrics hook)."""

    def request_done(self, service_name: str, status: int, duration_seconds: float) -> None: ...

    def upstream_error(self, service_name: str, kind: str) -> None: ...


class NullObserver:
    def request_done(self, service_name: str, status: int, duration_seconds: float) -> None:
        pass

    def upstream_error(self, service_name: str, kind: str) -> None:
        pass


class _Answer(Exception):
    """Answer the request with an error status (nothing of a response sent yet)."""

    def __init__(self, status: int, detail: str = "") -> None:
        super().__init__(status, detail)
        self.status, self.detail = status, detail


class _Abort(Exception):
    """Close the client connection now: a response is under way or the client is gone."""

    def __init__(self, status: int = 0) -> None:
        super().__init__(status)
        self.status = status


class _Retry(Exception):
    """A reused origin connection turned out dead before the request took effect."""


class _Service:
    __slots__ = ("config", "policy", "pool", "secret", "secret_header")

    def __init__(self, config: ServiceConfig, proxy: ProxyConfig, secret: bytes | None) -> None:
        self.config = config
        self.pool = UpstreamPool(config)
        required = config.require_header
        self.secret_header = required.name.lower().encode("ascii") if required else None
        self.secret = secret
        self.policy = ForwardingPolicy.for_service(config, proxy)


class _Exchange:
    """Per-request state shared by the upload task and the response relay."""

    __slots__ = ("client_error", "request_read", "request_sent", "response_started")

    def __init__(self, request_read: bool) -> None:
        self.request_read = request_read  # the client's body was read to its end
        self.request_sent = request_read  # ... and written to the origin
        self.response_started = False
        self.client_error: Exception | None = None


class HttpProxy:
    """The HTTP/1.1 reverse proxy for the ``protocol = "http"`` services."""

    def __init__(
        self,
        services: Sequence[ServiceConfig],
        proxy: ProxyConfig,
        *,
        secrets: Mapping[str, bytes] = {},
        observer: Observer | None = None,
    ) -> None:
        self._config = proxy
        self._router = Router(services)
        self._observer: Observer = observer or NullObserver()
        self._services: dict[str, _Service] = {}
        for service in services:
            if service.protocol != "http":
                continue
            secret = secrets.get(service.name) if service.require_header else None
            if service.require_header and not secret:
                raise ConfigError(
                    f"service {service.name!r}: the require_header secret was not loaded"
                )
            self._services[service.name] = _Service(service, proxy, secret)

    # -- public API --------------------------------------------------------------------------

    async def handle(self, stream: trio.abc.Stream, client_address: str) -> None:
        """Serve one client connection until it ends; never raises but ``Cancelled``."""
        client = EventReader(stream, RequestParser(self._config.max_request_head_bytes))
        should_linger = False
        try:
            try:
                should_linger = await self._serve(client, client_address)
            except (*_NETWORK_ERRORS, trio.TooSlowError, IncompleteMessage) as exc:
                log.debug("connection from %s ended: %r", client_address, exc)
            except TunneldError as exc:
                log.info("connection from %s failed: %s", client_address, exc)
            except Exception:
                log.exception("unexpected error on the connection from %s", client_address)
            if should_linger:
                await linger(stream)
        finally:
            await trio.aclose_forcefully(stream)

    async def reject_overloaded(self, stream: trio.abc.Stream) -> None:
        """Answer 503 (``Connection: close``) without reading a request, and close."""
        try:
            await _send_error(stream, 503, "too many connections, retry later", close=True)
            await linger(stream, seconds=LINGER_SECONDS / 4)
        finally:
            await trio.aclose_forcefully(stream)

    async def sweep_pools(self) -> None:
        """Drop idle origin connections that expired or were closed by the origin."""
        for service in self._services.values():
            await service.pool.sweep()

    async def aclose(self) -> None:
        """Close the pooled origin connections (in-use ones close when their request ends)."""
        for service in self._services.values():
            await service.pool.aclose()

    # -- one client connection ---------------------------------------------------------------

    async def _serve(self, client: EventReader, address: str) -> bool:
        """The keep-alive loop; returns whether to linger before closing."""
        head_timeout = self._config.request_head_timeout_seconds
        idle_timeout: float | None = None  # the first request: only the head timeout applies
        while True:
            started_bytes = client.received_bytes
            try:
                if idle_timeout is not None and not client.events and client.parser.idle:
                    with trio.move_on_after(idle_timeout):
                        await client.receive()
                    if not client.events and client.received_bytes == started_bytes:
                        return False  # idle keep-alive connection: close quietly
                if client.events:  # the head is already here: no wait, no deadline to set
                    event, timed_out = client.events.popleft(), False
                else:
                    with trio.move_on_after(head_timeout) as scope:
                        event = await client.next_event()
                    timed_out = scope.cancelled_caught
            except IncompleteMessage:
                return False  # the client gave up halfway through a head
            except ProtocolError as exc:
                log.debug("bad request from %s: %s", address, exc)
                await self._answer_unrouted(client.stream, exc.status, str(exc))
                return True
            if timed_out:
                if idle_timeout is None or client.received_bytes > started_bytes:
                    await self._answer_unrouted(client.stream, 408, "request head too slow")
                    return True
                return False
            if not isinstance(event, RequestHead):
                return False  # ConnectionClosed: the parser yields nothing else here
            keep_alive, idle_timeout, linger = await self._exchange(client, event, address)
            if not keep_alive:
                return linger

    async def _answer_unrouted(self, stream: trio.abc.Stream, status: int, detail: str) -> None:
        self._observer.request_done("", status, 0.0)
        await _send_error(stream, status, _public_detail(status, detail), close=True)

    async def _exchange(
        self, client: EventReader, head: RequestHead, address: str
    ) -> tuple[bool, float, bool]:
        """One request: (keep the connection, its idle timeout, linger before closing)."""
        started = trio.current_time()
        name = ""
        events = client.events
        if events and isinstance(events[0], EndOfMessage):  # a body-less request ends at once
            events.popleft()
        exchange = _Exchange(request_read=head.framing == "none")
        config = self._router.match(head.host.decode("latin-1"), head.target.decode("latin-1"))
        try:
            if config is None:
                raise _Answer(404, f"no service for host {printable(head.host)}")  # noqa: TRY301
            name = config.name
            status, keep_alive = await self._forward(
                client, head, self._services[name], exchange, address
            )
        except _Answer as answer:
            self._observer.request_done(name, answer.status, trio.current_time() - started)
            keep_alive = head.keep_alive and exchange.request_read and not head.upgrade
            await _send_error(
                client.stream,
                answer.status,
                answer.detail,
                close=not keep_alive,
                head_only=head.method == b"HEAD",
            )
            # Unrouted: the client gets no longer to send its next request than for a head.
            idle = self._config.request_head_timeout_seconds
            if name:
                idle = self._services[name].config.idle_timeout_seconds
            return keep_alive, idle, not keep_alive
        except _Abort as abort:
            self._observer.request_done(name, abort.status, trio.current_time() - started)
            return False, 0.0, False
        self._observer.request_done(name, status, trio.current_time() - started)
        # An early answer left part of the upload unread: drain it so the close is clean.
        return keep_alive, config.idle_timeout_seconds, not exchange.request_read

    # -- forwarding --------------------------------------------------------------------------

    async def _forward(
        self,
        client: EventReader,
        head: RequestHead,
        service: _Service,
        exchange: _Exchange,
        address: str,
    ) -> tuple[int, bool]:
        if (
            service.secret is not None
            and service.secret_header is not None
            and not has_required_header(head.headers, service.secret_header, service.secret)
        ):
            raise _Answer(401, "missing or wrong credentials")
        parts = [origin_request_head(head, service.policy, client_address=address)]
        _take_available_body(client, parts, exchange, head.framing == "chunked")
        payload = b"".join(parts)

        pool = service.pool
        conn = await self._connect(service, pool.acquire)
        if head.expect_continue and not exchange.request_read and head.version == b"1.1":
            try:
                with trio.fail_after(service.config.idle_timeout_seconds):
                    await client.stream.send_all(CONTINUE_RESPONSE)
            except BaseException:
                await pool.release(conn)  # nothing was sent on it: still good
                raise
        for attempt in (1, 2):
            try:
                result = await self._exchange_on(client, head, service, conn, exchange, payload)
            except _Retry:
                await conn.aclose()
                log.debug("%s: reused origin connection was dead, retrying", service.config.name)
                if attempt == 2:
                    self._observer.upstream_error(service.config.name, "closed")
                    raise _Answer(502, "origin closed the connection") from None
                conn = await self._connect(service, pool.connect)
                continue
            except BaseException:
                await conn.aclose()
                raise
            if exchange.request_sent and conn.reusable and result[2]:
                await pool.release(conn)
            else:
                await conn.aclose()
            return result[0], result[1]
        raise AssertionError("unreachable")

    async def _connect(
        self, service: _Service, connect: Callable[[], Awaitable[UpstreamConnection]]
    ) -> UpstreamConnection:
        try:
            return await connect()
        except UpstreamError as exc:
            raise self._upstream_failed(service, exc.kind, str(exc)) from None

    def _upstream_failed(self, service: _Service, kind: str, message: str) -> _Answer:
        name = service.config.name
        log.warning("service %s: %s", name, message)
        self._observer.upstream_error(name, kind)
        if kind == "timeout":
            return _Answer(504, "the service did not answer in time")
        return _Answer(502, "the service is unreachable" if kind != "protocol" else "")

    async def _exchange_on(
        self,
        client: EventReader,
        head: RequestHead,
        service: _Service,
        conn: UpstreamConnection,
        exchange: _Exchange,
        payload: bytes,
    ) -> tuple[int, bool, bool]:
        """Send the request on ``conn`` and relay the answer: (status, keep client, keep conn)."""
        config = service.config
        conn.parser.expect_response(head.method)
        conn.received_bytes = 0  # of this exchange: 0 still means "may retry"
        scope = trio.CancelScope(deadline=trio.current_time() + config.idle_timeout_seconds)
        if exchange.request_sent:
            replayable = conn.reused and head.method in IDEMPOTENT_METHODS
            return await self._relay_response(
                client, head, service, conn, exchange, scope, replayable, payload
            )
        with scope:
            await self._send_payload(service, conn, payload)
        if scope.cancelled_caught:
            raise self._upstream_failed(service, "timeout", "origin does not read the request")
        scope = trio.CancelScope()  # the upload sets the deadline once it is done
        result: tuple[int, bool, bool] | None = None
        error: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                self._upload,
                client,
                conn,
                config,
                head.framing == "chunked",
                exchange,
                scope,
                nursery.cancel_scope,
            )
            try:
                result = await self._relay_response(
                    client, head, service, conn, exchange, scope, False, None
                )
            except Exception as exc:  # raised after the nursery, not wrapped in a group
                error = exc
            nursery.cancel_scope.cancel()  # an early answer ends the upload
        if exchange.client_error is not None:
            broken = exchange.client_error
            log.debug("%s: client failed during the upload: %r", config.name, broken)
            if (
                isinstance(broken, ProtocolError)
                and not isinstance(broken, IncompleteMessage)
                and not exchange.response_started
            ):
                raise _Answer(broken.status, str(broken))
            raise _Abort(0)
        if error is not None:
            raise error
        if result is None:
            raise _Abort(0)
        return result[0], result[1] and exchange.request_read, result[2]

    async def _upload(
        self,
        client: EventReader,
        conn: UpstreamConnection,
        config: ServiceConfig,
        chunked: bool,
        exchange: _Exchange,
        response_scope: trio.CancelScope,
        cancel_exchange: trio.CancelScope,
    ) -> None:
        """Stream the rest of the request body from the client to the origin."""
        idle = config.idle_timeout_seconds
        try:
            while True:
                try:
                    with trio.fail_after(idle):
                        event = await client.next_event()
                except (ProtocolError, trio.TooSlowError, *_NETWORK_ERRORS) as exc:
                    exchange.client_error = exc
                    cancel_exchange.cancel()
                    return
                if isinstance(event, Body):
                    data = chunk(event.data) if chunked else event.data
                else:  # EndOfMessage: the parser emits nothing else inside a request
                    exchange.request_read = True
                    if not chunked:
                        exchange.request_sent = True
                        return
                    data = LAST_CHUNK
                try:
                    with trio.fail_after(idle):
                        await conn.stream.send_all(data)
                except (trio.TooSlowError, *_NETWORK_ERRORS):
                    return  # the origin stopped reading: its answer (or EOF) tells the rest
                if exchange.request_read:
                    exchange.request_sent = True
                    return
        finally:
            if not exchange.response_started:
                response_scope.deadline = min(
                    response_scope.deadline, trio.current_time() + config.response_timeout_seconds
                )

    async def _send_payload(
        self, service: _Service, conn: UpstreamConnection, payload: bytes
    ) -> None:
        try:
            await conn.stream.send_all(payload)
        except _NETWORK_ERRORS:
            if conn.reused:
                raise _Retry from None
            failure = self._upstream_failed(service, "closed", "origin closed before the request")
            raise failure from None

    async def _relay_response(
        self,
        client: EventReader,
        head: RequestHead,
        service: _Service,
        conn: UpstreamConnection,
        exchange: _Exchange,
        scope: trio.CancelScope,
        replayable: bool,
        payload: bytes | None,
    ) -> tuple[int, bool, bool]:
        """Read the answer and relay it; ``payload`` (if any) is sent first, under ``scope``."""
        config = service.config
        response: ResponseHead | None = None
        with scope:
            if payload is not None:
                await self._send_payload(service, conn, payload)
                scope.deadline = trio.current_time() + config.response_timeout_seconds
            try:
                while response is None:
                    event = await conn.next_event()
                    if isinstance(event, ResponseHead):
                        if event.status >= 200 or event.status == 101:
                            response = event  # 100 and 103 are dropped
                    elif isinstance(event, ConnectionClosed):
                        raise IncompleteMessage(502, "origin closed before answering")
            except (ProtocolError, *_NETWORK_ERRORS) as exc:
                if replayable and conn.received_bytes == 0:
                    raise _Retry from None
                kind = "protocol" if type(exc) is ProtocolError else "closed"
                raise self._upstream_failed(service, kind, f"{config.upstream}: {exc}") from None
            if response.status != 101:
                return await self._relay_body(client, head, conn, exchange, response, config, scope)
        if response is None:
            raise self._upstream_failed(
                service,
                "timeout",
                f"{config.upstream}: no response within {config.response_timeout_seconds:g}s",
            )
        if scope.cancelled_caught:  # the deadline passed during the body
            log.info("%s: response relay idle for %gs", config.name, config.idle_timeout_seconds)
            raise _Abort(response.status)
        if not head.upgrade:
            raise self._upstream_failed(service, "protocol", "101 without an Upgrade request")
        await self._switch_protocols(client, conn, response, config.idle_timeout_seconds)
        return 101, False, False

    async def _relay_body(
        self,
        client: EventReader,
        head: RequestHead,
        conn: UpstreamConnection,
        exchange: _Exchange,
        response: ResponseHead,
        config: ServiceConfig,
        scope: trio.CancelScope,
    ) -> tuple[int, bool, bool]:
        keep_alive = head.keep_alive and exchange.request_read and not head.upgrade
        data, chunked, keep_alive = client_response_head(response, head, keep_alive=keep_alive)
        pending = [data]
        idle = config.idle_timeout_seconds
        events = conn.events
        exchange.response_started = True
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
                    await client.stream.send_all(b"".join(pending))
                    pending = []
                if done:
                    return response.status, keep_alive, response.keep_alive
                scope.deadline = trio.current_time() + idle
                await conn.receive()
        except (ProtocolError, *_NETWORK_ERRORS) as exc:
            log.info("%s: response relay ended early: %r", config.name, exc)
            raise _Abort(response.status) from None

    async def _switch_protocols(
        self, client: EventReader, conn: UpstreamConnection, response: ResponseHead, idle: float
    ) -> None:
        """Relay the 101, then raw bytes both ways until both sides are done or idle."""
        headers = response_headers(response.headers, upgrade=True)
        first = response_head_bytes(101, response.reason, headers) + conn.parser.trailing_data
        try:
            with trio.fail_after(idle):
                await client.stream.send_all(first)
                if client.parser.trailing_data:
                    await conn.stream.send_all(client.parser.trailing_data)
        except (trio.TooSlowError, *_NETWORK_ERRORS):
            raise _Abort(101) from None
        await relay_raw(client.stream, conn.stream, idle)


def _take_available_body(
    client: EventReader, parts: list[bytes], exchange: _Exchange, chunked: bool
) -> None:
    """Move body events already parsed into ``parts`` (one write for small requests)."""
    events = client.events
    size = 0
    while events and size < RECEIVE_BYTES and not exchange.request_read:
        event = events[0]
        if isinstance(event, Body):
            events.popleft()
            parts.append(chunk(event.data) if chunked else event.data)
            size += len(event.data)
        elif isinstance(event, EndOfMessage):
            events.popleft()
            if chunked:
                parts.append(LAST_CHUNK)
            exchange.request_read = exchange.request_sent = True
        else:
            break


async def _send_error(
    stream: trio.abc.Stream, status: int, detail: str, *, close: bool, head_only: bool = False
) -> None:
    """A short text/plain error answer; a client that is gone is not an error."""
    data = error_response_bytes(status, detail, close=close, head_only=head_only)
    with trio.move_on_after(ERROR_WRITE_SECONDS), contextlib.suppress(*_NETWORK_ERRORS):
        await stream.send_all(data)


def _public_detail(status: int, detail: str) -> str:
    """What a client may read about a protocol error (our parser's words, no addresses)."""
    return detail if status in (400, 417, 431, 501, 505) else ""
