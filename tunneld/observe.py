"""The observability endpoint: ``/metrics``, ``/livez``, ``/readyz`` and ``/status`` over HTTP/1.1.

How this works. :func:`serve_observability` binds ``[metrics] listen`` (loopback by default)
and answers one request per connection (``Connection: close``), which is all a scraper or a
probe needs. The request head is parsed by the proxy's strict sans-IO parser
(:class:`~tunneld.proxy.http1.RequestParser`); :func:`route` decides what the request gets,
:class:`ObservabilityApp` builds the answer from what the daemon already keeps (nothing here
asks the WireGuard device; the supervisor's tick has read it).

- ``/metrics``: the registry in Prometheus' text format. ``generate_latest`` runs in the event
  loop: for our registry (tens of families, a few hundred series, the process collector's
  ``/proc`` reads included) it takes about a millisecond. A worker thread would not make that
  cheaper, and it would read the tunnel's and proxy's state while the trio thread changes it.
- ``/livez``: 200 while the supervisor loop makes progress — the watchdog's rule
  (:data:`~tunneld.systemd.DEFAULT_STALL_AFTER_SECONDS`), so a wedged daemon is restarted by
  Kubernetes as by systemd, and a network outage is not (the loop survives those).
- ``/readyz``: 200 when this connector can serve: the interface is configured, a gateway is up,
  each ``ready_services`` origin accepts a connection (checked concurrently, ~1 s each) and the
  daemon is not draining; else 503 with the reasons.
- ``/status``: :func:`tunneld.status.daemon_report` as JSON.

Bounds, because any local process can connect: the head must arrive within
``head_timeout_seconds`` (408 after it — a slowloris client holds one task that long, nothing
more) and fit ``max_head_bytes`` (431); an answer gets ``send_timeout_seconds``; beyond
``max_connections`` open connections the excess is answered 503 at once, without reading
(within ``EXCESS_ANSWER_SECONDS``). A failing connection is logged and closed; it never ends
the server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from typing import Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from tunneld import fdlimit
from tunneld.config_proxy import ServiceConfig, TLSOptions
from tunneld.errors import TunneldError, UpstreamError
from tunneld.host_port import HostPort
from tunneld.metrics import (
    ProxyState,
    ReloaderState,
    TunnelState,
    config_hash,
    readiness_problems,
)
from tunneld.proxy.http1 import (
    ConnectionClosed,
    IncompleteMessage,
    ProtocolError,
    RequestHead,
    RequestParser,
    response_head_bytes,
)
from tunneld.proxy.upstream import open_upstream
from tunneld.status import daemon_report
from tunneld.systemd import DEFAULT_STALL_AFTER_SECONDS

log = logging.getLogger(__name__)

ORIGIN_CHECK_TIMEOUT_SECONDS = 1.0
#: After an answer, how long the client's remaining input is drained before the close (a close
#: with unread input resets the connection, and the client could lose the answer).
LINGER_SECONDS = 1.0
#: All that a connection beyond ``max_connections`` gets: its 503 sent and the close.
EXCESS_ANSWER_SECONDS = 1.0
RECEIVE_BYTES = 4096
#: Out of descriptors, accept is tried again this much later (as trio.serve_listeners does).
ACCEPT_RETRY_SECONDS = 0.1
PATHS = ("/metrics", "/livez", "/readyz", "/status")
_NETWORK_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)


@dataclass(frozen=True)
class ServerLimits:
    head_timeout_seconds: float = 5.0
    max_head_bytes: int = 8192
    send_timeout_seconds: float = 10.0
    #: Generous: scrapers and probes are few, but a burst must not queue behind slow clients.
    #: The proxy's connection budget keeps this many descriptors free for them.
    max_connections: int = fdlimit.OBSERVABILITY_CONNECTIONS


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def to_bytes(self, *, head_only: bool = False) -> bytes:
        """Status line, headers and (unless ``head_only``: the answer to HEAD) the body."""
        headers = [
            (b"content-type", self.content_type.encode()),
            (b"content-length", b"%d" % len(self.body)),
            (b"cache-control", b"no-store"),
            (b"x-content-type-options", b"nosniff"),
            (b"connection", b"close"),
            *self.headers,
        ]
        phrase = HTTPStatus(self.status).phrase.encode()
        head = response_head_bytes(self.status, phrase, headers)
        return head if head_only else head + self.body


def text_response(status: int, detail: str = "") -> Response:
    phrase = HTTPStatus(status).phrase
    return Response(status, f"{status} {phrase}\n{detail}\n".encode() if detail else b"")


def json_response(status: int, data: dict[str, Any]) -> Response:
    return Response(status, json.dumps(data, indent=2).encode() + b"\n", "application/json")


def route(method: bytes, target: bytes) -> str | Response:
    """The path to answer, or the error answer: 404 for an unknown path, 405 for a method
    other than GET and HEAD (with ``Allow``). A query string is ignored."""
    path = target.split(b"?", 1)[0].decode("latin-1")
    if path not in PATHS:
        return text_response(404, f"try {', '.join(PATHS)}")
    if method not in (b"GET", b"HEAD"):
        return dataclasses.replace(text_response(405), headers=((b"allow", b"GET, HEAD"),))
    return path


# -- liveness and readiness (decisions without I/O) -------------------------------------------


def liveness_problems(*, now: float, last_progress: float, stall_after_seconds: float) -> list[str]:
    """Why the daemon is not alive: its supervisor loop has not progressed for too long."""
    idle = now - last_progress
    if idle <= stall_after_seconds:
        return []
    return [
        f"the supervisor loop has made no progress for {idle:.0f}s "
        f"(stalled after {stall_after_seconds:g}s)"
    ]


async def check_origin(service: ServiceConfig, timeout_seconds: float) -> str | None:
    """Connect to the service's origin (TCP or unix; no TLS handshake) and close again.

    None if it accepted the connection, else why not.
    """
    upstream = service.upstream
    if upstream.scheme == "https":  # a TCP connection is the question, not the certificate
        upstream = dataclasses.replace(upstream, scheme="tcp")
    try:
        stream = await open_upstream(
            upstream, TLSOptions(), connect_timeout_seconds=timeout_seconds
        )
    except UpstreamError as exc:
        return f"service {service.name}: origin does not accept connections ({exc})"
    await trio.aclose_forcefully(stream)
    return None


# -- the application --------------------------------------------------------------------------


class ObservabilityApp:
    """Answers the endpoint's paths from the daemon's parts.

    ``is_draining`` tells whether a shutdown drain has begun (readiness says 503 then; the
    endpoint keeps answering until the daemon cancels it). Construct it inside trio: liveness
    grants the first bring-up ``stall_after_seconds`` from then.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        tunnel: TunnelState,
        proxy: ProxyState,
        reloader: ReloaderState,
        is_draining: Callable[[], bool] = lambda: False,
        stall_after_seconds: float = DEFAULT_STALL_AFTER_SECONDS,
        origin_timeout_seconds: float = ORIGIN_CHECK_TIMEOUT_SECONDS,
    ) -> None:
        self.registry = registry
        self.tunnel, self.proxy, self.reloader = tunnel, proxy, reloader
        self.is_draining = is_draining
        self.stall_after_seconds = stall_after_seconds
        self.origin_timeout_seconds = origin_timeout_seconds
        self.started_at = trio.current_time()

    async def respond(self, method: bytes, target: bytes) -> Response:
        """The answer to one request (an unexpected failure inside is a logged 500)."""
        decided = route(method, target)
        if isinstance(decided, Response):
            return decided
        try:
            if decided == "/metrics":
                return Response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
            if decided == "/livez":
                return self.livez()
            if decided == "/readyz":
                return await self.readyz()
            return await self.status()
        except Exception:
            log.exception("observability endpoint: answering %s failed", decided)
            return text_response(500)

    def livez(self) -> Response:
        tunnel = self.tunnel
        # Before the first bring-up has finished there is no tick yet: count from our start.
        last_progress = tunnel.last_tick if tunnel.generation else self.started_at
        problems = liveness_problems(
            now=trio.current_time(),
            last_progress=last_progress,
            stall_after_seconds=self.stall_after_seconds,
        )
        if problems:
            return json_response(503, {"live": False, "reasons": problems})
        return json_response(200, {"live": True})

    async def readyz(self) -> Response:
        problems, _ = await self.readiness()
        if problems:
            return json_response(503, {"ready": False, "reasons": problems})
        return json_response(200, {"ready": True})

    async def readiness(self) -> tuple[list[str], dict[str, bool]]:
        """(why not ready, whether each checked origin accepted a connection)."""
        config = self.reloader.config
        services = {service.name: service for service in config.services}
        checked = [services[name] for name in config.metrics.ready_services if name in services]
        results: dict[str, str | None] = {}

        async def check(service: ServiceConfig) -> None:
            results[service.name] = await check_origin(service, self.origin_timeout_seconds)

        async with trio.open_nursery() as nursery:
            for service in checked:
                nursery.start_soon(check, service)
        origin_problems = [problem for s in checked if (problem := results[s.name]) is not None]
        problems = readiness_problems(
            self.tunnel, draining=self.is_draining(), origin_problems=origin_problems
        )
        return problems, {name: problem is None for name, problem in results.items()}

    async def status(self) -> Response:
        problems, reachable = await self.readiness()
        tunnel, config = self.tunnel, self.reloader.config
        report = daemon_report(
            config,
            await tunnel.read_stats(),
            backend=tunnel.backend_name,
            peer_states={name: r.health.state.value for name, r in tunnel.gateways.items()},
            active_connections=self.proxy.active_connections(),
            origins_reachable=reachable,
            ready_reasons=problems,
            reloads=self.reloader.results,
            config_hash=config_hash(config),
            status_line=tunnel.status_line(),
            now=time.time(),  # handshakes are wall-clock times
        )
        return json_response(200, report)


# -- the server -------------------------------------------------------------------------------


async def serve_observability(
    listen: HostPort,
    app: ObservabilityApp,
    *,
    limits: ServerLimits = ServerLimits(),
    task_status: trio.TaskStatus[HostPort] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``listen`` (an IP literal) until cancelled.

    ``task_status.started`` reports the address bound (the port, when ``listen.port`` is 0).
    A port that cannot be bound raises :class:`TunneldError` saying why.
    """
    try:
        listeners = await trio.open_tcp_listeners(listen.port, host=listen.host)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        if exc.errno == errno.EADDRINUSE:
            reason += " (another process holds it: see `ss -ltnp`)"
        raise TunneldError(
            f"cannot serve metrics and health on {listen}: {reason}; "
            'change [metrics] listen, or set it to "off"'
        ) from exc
    bound = HostPort(listen.host, listeners[0].socket.getsockname()[1])
    log.info("metrics and health endpoint on http://%s", bound)
    limiter = trio.CapacityLimiter(limits.max_connections)
    task_status.started(bound)
    handler = partial(_serve_connection, app, limits, limiter)
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept_loop, listener, handler, nursery)


async def _accept_loop(
    listener: trio.SocketListener,
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    nursery: trio.Nursery,
) -> None:
    """``trio.serve_listeners``' loop, but out of descriptors it says so every few seconds
    (trio's logs an error every 0.1 s) while it waits for some to be freed."""
    failures = fdlimit.ExhaustionLog("accepting on the metrics and health endpoint")
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in fdlimit.EXHAUSTION_ERRNOS | {errno.ENOBUFS}:
                    raise
                failures.failed(exc, retry=f"retrying in {ACCEPT_RETRY_SECONDS:g}s")
                await trio.sleep(ACCEPT_RETRY_SECONDS)
                continue
            failures.succeeded()
            nursery.start_soon(_closing, handler, stream)


async def _closing(
    handler: Callable[[trio.SocketStream], Awaitable[None]], stream: trio.SocketStream
) -> None:
    async with stream:
        await handler(stream)


async def _serve_connection(
    app: ObservabilityApp,
    limits: ServerLimits,
    limiter: trio.CapacityLimiter,
    stream: trio.SocketStream,
) -> None:
    """One request, one answer, close. The accept loop closes the stream after this."""
    token = object()
    try:
        limiter.acquire_on_behalf_of_nowait(token)
    except trio.WouldBlock:
        # Not even read: the excess must cost less than what it is refused.
        with trio.move_on_after(EXCESS_ANSWER_SECONDS), contextlib.suppress(*_NETWORK_ERRORS):
            await stream.send_all(text_response(503, "too many connections").to_bytes())
            await _linger(stream)
        return
    try:
        await _exchange(app, limits, stream)
    except _NETWORK_ERRORS as exc:
        log.debug("observability endpoint: client went away: %r", exc)
    except Exception:  # one connection's failure must not end the server
        log.exception("observability endpoint: connection failed")
    finally:
        limiter.release_on_behalf_of(token)


async def _exchange(app: ObservabilityApp, limits: ServerLimits, stream: trio.SocketStream) -> None:
    response: Response | None = None
    head: RequestHead | None = None
    with trio.move_on_after(limits.head_timeout_seconds) as head_scope:
        try:
            head = await _read_head(stream, RequestParser(limits.max_head_bytes))
        except IncompleteMessage:
            return  # the client gave up halfway through its head
        except ProtocolError as exc:
            response = text_response(exc.status, str(exc))
    if head_scope.cancelled_caught:
        response = text_response(408, f"send the request within {limits.head_timeout_seconds:g}s")
    elif head is not None:
        response = await app.respond(head.method, head.target)
    if response is None:
        return  # closed before sending anything
    head_only = head is not None and head.method == b"HEAD"
    with trio.move_on_after(limits.send_timeout_seconds):
        await stream.send_all(response.to_bytes(head_only=head_only))
        await _linger(stream)


async def _read_head(stream: trio.abc.ReceiveStream, parser: RequestParser) -> RequestHead | None:
    """The request head; None if the client closed before starting one."""
    while True:
        data = await stream.receive_some(RECEIVE_BYTES)
        for event in parser.feed(data) if data else parser.feed_eof():
            if isinstance(event, RequestHead):
                return event
            if isinstance(event, ConnectionClosed):
                return None


async def _linger(stream: trio.SocketStream) -> None:
    """Half-close, then drain what the client still sends until it closes (bounded)."""
    with trio.move_on_after(LINGER_SECONDS), contextlib.suppress(*_NETWORK_ERRORS):
        await stream.send_eof()
        while await stream.receive_some(RECEIVE_BYTES):
            pass
