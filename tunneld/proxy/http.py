"""HTTP/1.1 reverse proxy: requests that arrive through the tunnel, forwarded to local origins.

How this works: :meth:`HttpProxy.handle` runs one client connection — a keep-alive loop that
reads a request head (:mod:`tunneld.proxy.http1` does the parsing), routes it by Host and path
(:mod:`tunneld.proxy.routes`), checks the service's shared secret and hands the request to an
:class:`~tunneld.proxy.exchange.Exchange`, which forwards it on a pooled origin connection and
relays the answer. What the exchange cannot relay is answered here with an error status.

Decisions:

- An error found before any of a response went out is answered with a status
  (400/401/404/408/431/502/504/...), and the client connection is kept when the request was read
  whole; once a response is under way, the connection is closed instead.
- Between requests a client connection may idle for the previous service's ``idle_timeout``;
  the first request's head, and each later one once it has begun, must arrive within
  ``request_head_timeout`` (else 408).
- Before a client connection is closed with input left unread (after an error answer, or an
  origin's early answer to an upload), it lingers: half-closed, it drains what the client still
  sends for up to ``LINGER_SECONDS``, so the close does not reset the connection under the answer
  (the client would see ECONNRESET instead of the status).
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

import trio

from tunneld.config_proxy import ProxyConfig, ServiceConfig
from tunneld.errors import ConfigError, TunneldError
from tunneld.proxy.exchange import Exchange, ExchangeAborted, ExchangeFailed, Service
from tunneld.proxy.headers import has_required_header
from tunneld.proxy.http1 import (
    EndOfMessage,
    IncompleteMessage,
    ProtocolError,
    RequestHead,
    RequestParser,
    error_response_bytes,
    printable,
)
from tunneld.proxy.paths import PathError
from tunneld.proxy.pool import RECEIVE_BYTES, RequestReader
from tunneld.proxy.routes import Router

log = logging.getLogger(__name__)

ERROR_WRITE_SECONDS = 5.0
#: How long, and how much, unread input is drained before a close (see the module docstring).
LINGER_SECONDS = 1.0
LINGER_BYTES = 1 << 20
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
        self._observer: Observer = observer or NullObserver()
        #: Requests being forwarded (an upgraded WebSocket counts until it closes), by service.
        self.active: collections.Counter[str] = collections.Counter()
        self._draining = False
        #: The deadlines of keep-alive connections idling between requests: a drain ends them.
        self._idle_waits: set[trio.CancelScope] = set()
        self._config = proxy
        self._router = Router(())
        self._services: dict[str, Service] = {}
        #: (header name, secret) by name, for the services with ``require_header``.
        self._credentials: dict[str, tuple[bytes, bytes]] = {}
        self._retired: list[Service] = []
        self.reconfigure(services, proxy, secrets=secrets)

    def reconfigure(
        self,
        services: Sequence[ServiceConfig],
        proxy: ProxyConfig,
        *,
        secrets: Mapping[str, bytes] = {},
    ) -> None:
        """Route the next requests by ``services``; requests in flight finish as they began.

        A service whose settings did not change keeps its origin pool; a changed or removed
        one's pool is retired (closed by :meth:`close_retired`). Raises ``ConfigError`` (and
        changes nothing) if a ``require_header`` secret is missing.
        """
        credentials: dict[str, tuple[bytes, bytes]] = {}
        table: dict[str, Service] = {}
        for service in services:
            if service.protocol != "http":
                continue
            required = service.require_header
            if required is not None:
                secret = secrets.get(service.name)
                if not secret:
                    raise ConfigError(
                        f"service {service.name!r}: the require_header secret was not loaded"
                    )
                credentials[service.name] = (required.name.lower().encode("ascii"), secret)
            kept = self._services.get(service.name)
            if kept is not None and kept.config == service and proxy == self._config:
                table[service.name] = kept
            else:
                table[service.name] = Service(service, proxy)
        self._retired.extend(
            service for name, service in self._services.items() if table.get(name) is not service
        )
        # No await from here on: a request sees the old tables or the new ones, never a mix.
        self._config, self._router = proxy, Router(services)
        self._services, self._credentials = table, credentials

    # -- public API --------------------------------------------------------------------------

    async def handle(self, stream: trio.abc.Stream, client_address: str) -> None:
        """Serve one client connection, request after request, until it ends; never raises but
        ``Cancelled``."""
        client = RequestReader(stream, RequestParser(self._config.max_request_head_bytes))
        idle_timeout: float | None = None  # None before the first request: its head's timeout only
        try:
            while True:  # the keep-alive loop
                head = await self._next_request(client, idle_timeout, client_address)
                if head is None:
                    break
                idle_timeout = await self._serve_request(client, head, client_address)
                if idle_timeout is None or self._draining:
                    break
        except (*_NETWORK_ERRORS, trio.TooSlowError, IncompleteMessage) as exc:
            log.debug("connection from %s ended: %r", client_address, exc)
        except TunneldError as exc:
            log.info("connection from %s failed: %s", client_address, exc)
        except Exception:
            log.exception("unexpected error on the connection from %s", client_address)
        finally:
            await trio.aclose_forcefully(stream)

    async def reject_overloaded(self, stream: trio.abc.Stream) -> None:
        """Answer 503 (``Connection: close``) without reading a request, and close."""
        self._observer.request_done("", 503, 0.0)
        try:
            await _send_error(stream, 503, "too many connections, retry later", close=True)
            await _linger(stream, seconds=LINGER_SECONDS / 4)
        finally:
            await trio.aclose_forcefully(stream)

    async def drain(self) -> None:
        """Let requests in flight finish, then close their connections; close idle ones now."""
        self._draining = True
        for scope in self._idle_waits:
            scope.cancel()

    async def sweep_pools(self) -> None:
        """Drop idle origin connections that expired or were closed by the origin."""
        for service in self._services.values():
            await service.pool.sweep()

    async def close_retired(self) -> None:
        """Close the idle origin connections of services a reload replaced or removed."""
        retired, self._retired = self._retired, []
        for service in retired:
            await service.pool.aclose()

    async def aclose(self) -> None:
        """Close the pooled origin connections (in-use ones close when their request ends)."""
        await self.close_retired()
        for service in self._services.values():
            await service.pool.aclose()

    # -- one client connection ---------------------------------------------------------------

    async def _next_request(
        self, client: RequestReader, idle_timeout: float | None, address: str
    ) -> RequestHead | None:
        """The next request's head, or ``None`` when the connection is done with."""
        started_bytes = client.received_bytes
        try:
            if idle_timeout is not None and client.between_requests:
                if self._draining:
                    return None
                with trio.move_on_after(idle_timeout) as idle_wait:
                    self._idle_waits.add(idle_wait)
                    try:
                        await client.receive()
                    finally:
                        self._idle_waits.discard(idle_wait)
                if not client.events and client.received_bytes == started_bytes:
                    return None  # idle keep-alive connection: close quietly
            if client.events:  # the head is already here: no wait, no deadline to set
                event = client.events.popleft()
            else:
                with trio.move_on_after(self._config.request_head_timeout_seconds) as scope:
                    event = await client.next_event()
                if scope.cancelled_caught:
                    if idle_timeout is None or client.received_bytes > started_bytes:
                        await self._answer_unrouted(client.stream, 408, "request head too slow")
                    return None
        except IncompleteMessage:
            return None  # the client gave up halfway through a head
        except ProtocolError as exc:
            log.debug("bad request from %s: %s", address, exc)
            await self._answer_unrouted(client.stream, exc.status, str(exc))
            return None
        # Between requests the parser yields nothing else but ConnectionClosed.
        return event if isinstance(event, RequestHead) else None

    async def _answer_unrouted(self, stream: trio.abc.Stream, status: int, detail: str) -> None:
        """Answer a request that never got a head we could route, and close."""
        self._observer.request_done("", status, 0.0)
        await _send_error(stream, status, _public_detail(status, detail), close=True)
        await _linger(stream)

    async def _serve_request(
        self, client: RequestReader, head: RequestHead, address: str
    ) -> float | None:
        """Answer one request; returns how long the connection may then idle, or ``None`` when
        it is done with."""
        started = trio.current_time()
        events = client.events
        if events and isinstance(events[0], EndOfMessage):  # a body-less request ends at once
            events.popleft()
        try:
            config = self._router.match(head.host.decode("latin-1"), head.target.decode("latin-1"))
        except PathError as exc:
            self._request_done("", exc.status, started, head, address)
            return await self._answer_error(
                client,
                head,
                exc.status,
                str(exc),
                request_read=head.framing == "none",
                idle_timeout=self._config.request_head_timeout_seconds,
            )
        if config is None:
            self._request_done("", 404, started, head, address)
            # Unrouted: the client gets no longer to send its next request than for a head.
            return await self._answer_error(
                client,
                head,
                404,
                f"no service for host {printable(head.host)}",
                request_read=head.framing == "none",
                idle_timeout=self._config.request_head_timeout_seconds,
            )
        name = config.name
        credential = self._credentials.get(name)
        if credential is not None and not has_required_header(head.headers, *credential):
            self._request_done(name, 401, started, head, address)
            return await self._answer_error(
                client,
                head,
                401,
                "missing or wrong credentials",
                request_read=head.framing == "none",
                idle_timeout=config.idle_timeout_seconds,
            )
        exchange = Exchange(client, head, self._services[name], self._observer.upstream_error)
        self.active[name] += 1
        try:
            status, keep_alive = await exchange.forward(address)
        except ExchangeFailed as failure:
            self._request_done(name, failure.status, started, head, address)
            return await self._answer_error(
                client,
                head,
                failure.status,
                failure.detail,
                request_read=exchange.request_read,
                idle_timeout=config.idle_timeout_seconds,
            )
        except ExchangeAborted as abort:
            self._request_done(name, abort.status, started, head, address)
            return None
        finally:
            self.active[name] -= 1
        self._request_done(name, status, started, head, address)
        if keep_alive:
            return config.idle_timeout_seconds
        if not exchange.request_read:
            await _linger(client.stream)  # the origin answered before the upload ended
        return None

    def _request_done(
        self, name: str, status: int, started: float, head: RequestHead, address: str
    ) -> None:
        duration = trio.current_time() - started
        self._observer.request_done(name, status, duration)
        if self._config.access_log:
            log.info(
                "%s %s %s %s → %d in %.1f ms",
                address,
                name or "-",
                printable(head.method),
                printable(head.target),
                status,
                duration * 1000,
            )

    async def _answer_error(
        self,
        client: RequestReader,
        head: RequestHead,
        status: int,
        detail: str,
        *,
        request_read: bool,
        idle_timeout: float,
    ) -> float | None:
        """Answer ``head`` with an error; keep the connection only if the request was read whole."""
        keep_alive = head.keep_alive and request_read and not head.upgrade
        await _send_error(
            client.stream, status, detail, close=not keep_alive, head_only=head.method == b"HEAD"
        )
        if keep_alive:
            return idle_timeout
        await _linger(client.stream)
        return None


async def _send_error(
    stream: trio.abc.Stream, status: int, detail: str, *, close: bool, head_only: bool = False
) -> None:
    """A short text/plain error answer; a client that is gone is not an error."""
    data = error_response_bytes(status, detail, close=close, head_only=head_only)
    with trio.move_on_after(ERROR_WRITE_SECONDS), contextlib.suppress(*_NETWORK_ERRORS):
        await stream.send_all(data)


async def _linger(stream: trio.abc.Stream, seconds: float = LINGER_SECONDS) -> None:
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


def _public_detail(status: int, detail: str) -> str:
    """What a client may read about a protocol error (our parser's words, no addresses)."""
    return detail if status in (400, 417, 431, 501, 505) else ""
