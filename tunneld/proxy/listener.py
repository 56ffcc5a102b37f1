"""Listening on the tunnel only, and the accept loop in front of every proxy handler.

How exposure is limited, in layers:

1. Each listening socket binds one tunnel address (never the wildcard) **and** is
   ``SO_BINDTODEVICE``-bound to the WireGuard interface. Linux delivers a packet addressed to
   any local address whatever interface it arrived on (the "weak host" model), so the address
   alone would let a LAN host that routes the tunnel prefix at this machine reach the proxy; with
   the device binding the kernel answers such a SYN with a reset.
2. Accepted connections whose source is outside ``allowed_sources`` (the gateway peers' allowed
   IPs, possibly narrowed by config) are closed at once, before any byte is read.
3. A capacity limiter bounds concurrent connections; the excess is handed to ``on_excess`` (HTTP
   answers 503) or closed, never queued.

Privileges: since Linux 5.7 an unprivileged socket may set ``SO_BINDTODEVICE`` once, while it is
not bound to a device yet; changing or clearing an existing binding needs ``CAP_NET_RAW`` (and
before 5.7 every use did). We set it exactly once, so on current kernels no capability is needed
for it. ``IP_FREEBIND`` needs none either. A port below ``net.ipv4.ip_unprivileged_port_start``
(1024 by default; HTTP's default is 80) needs ``CAP_NET_BIND_SERVICE``.

The device binding follows the interface *index*: when the WireGuard interface is deleted and
created again, these sockets no longer receive anything and must be opened again.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import trio

from tunneld.errors import PermissionError_, ProxyError
from tunneld.proxy.eager import EagerSocketStream
from tunneld.wireguard.model import IPAddress, IPNetwork

log = logging.getLogger(__name__)

# Not exported by Python's socket module. IP_FREEBIND at the IP level is honoured by IPv6
# sockets too (the kernel keeps one freebind flag per socket), on every kernel we support.
_IP_FREEBIND = 15
_SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)

BACKLOG = 1024
# Out of descriptors or memory: accept would fail again at once, so wait (as trio.serve_listeners).
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_BACKOFF_SECONDS = 0.1
ACCEPT_ERROR_LOG_INTERVAL_SECONDS = 10.0
# on_excess gets this long (e.g. to read a request head and answer 503) before the close.
EXCESS_DEADLINE_SECONDS = 5.0

Handler = Callable[[EagerSocketStream, str], Awaitable[None]]


class AllowedSources:
    """The client networks a listener accepts; a reload may replace them under open listeners."""

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        self.networks = tuple(networks)

    def __contains__(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)


async def open_tunnel_listeners(
    addresses: Sequence[IPAddress], port: int, ifname: str
) -> list[trio.SocketListener]:
    """One listening TCP socket per address, bound to ``port`` and to the device ``ifname``.

    The addresses need not be usable yet (``IP_FREEBIND``: an IPv6 address may still be
    tentative). ``port`` 0 gives each socket its own ephemeral port. On any failure the sockets
    opened so far are closed and :class:`ProxyError` says which address, port and why.
    """
    listeners: list[trio.SocketListener] = []
    try:
        for address in addresses:
            listeners.append(await _open_one(address, port, ifname))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners


async def _open_one(address: IPAddress, port: int, ifname: str) -> trio.SocketListener:
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    where = f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    step = "configuring the socket"
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.IPPROTO_IP, _IP_FREEBIND, 1)
        step = f"binding to device {ifname}"
        sock.setsockopt(socket.SOL_SOCKET, _SO_BINDTODEVICE, ifname.encode())
        step = "binding"
        await sock.bind((str(address), port))
        step = "listening"
        sock.listen(BACKLOG)
        return trio.SocketListener(sock)
    except OSError as exc:
        sock.close()
        message = f"cannot listen on {where} ({step}): {_explain(exc, port, ifname)}"
        if exc.errno in (errno.EACCES, errno.EPERM):  # a restart cannot help: exit code 2
            raise PermissionError_(message) from exc
        raise ProxyError(message) from exc
    except BaseException:
        sock.close()
        raise


def _explain(exc: OSError, port: int, ifname: str) -> str:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    if exc.errno == errno.EADDRINUSE:
        return f"{reason}: another process holds port {port} on this address (see `ss -ltnp`)"
    if exc.errno == errno.ENODEV:
        return f"{reason}: interface {ifname} does not exist (yet)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (
            f"{reason}: ports below net.ipv4.ip_unprivileged_port_start (1024 by default) need "
            "CAP_NET_BIND_SERVICE; on Linux before 5.7 SO_BINDTODEVICE needs CAP_NET_RAW"
        )
    return reason


@dataclass
class ConnectionCounters:
    """What the accept loop has seen; read by metrics. Totals since ``serve`` started."""

    accepted: int = 0  # handed to the handler
    rejected_sources: int = 0  # closed at once: source outside allowed_sources
    excess: int = 0  # no limiter token: given to on_excess or closed
    accept_errors: int = 0  # EMFILE/ENFILE/ENOMEM/ENOBUFS from accept()
    handler_errors: int = 0  # handlers that raised


async def serve(
    listeners: Sequence[trio.SocketListener],
    handler: Handler,
    *,
    allowed_sources: AllowedSources | Iterable[IPNetwork],
    limiter: trio.CapacityLimiter,
    on_excess: Callable[[EagerSocketStream], Awaitable[None]] | None = None,
    counters: ConnectionCounters | None = None,
    task_status: trio.TaskStatus[ConnectionCounters] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on every listener and run ``handler(stream, client_ip)`` for each connection.

    ``client_ip`` is the peer's address without port (what X-Forwarded-For wants). Each handler
    runs in its own task holding one ``limiter`` token; the stream is closed when it returns.
    ``serve`` owns the listeners: they are closed when it returns, however it returns.
    A handler's exception is logged and never stops the loop. ``task_status.started`` reports
    the counters (``counters`` or a fresh object).

    Returns once every listener is closed and every handler has finished, so a graceful drain
    is: ``aclose()`` the listeners, then wait for this under a deadline, then cancel it.
    """
    counters = counters if counters is not None else ConnectionCounters()
    if not isinstance(allowed_sources, AllowedSources):
        allowed_sources = AllowedSources(allowed_sources)
    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(
                    _accept_loop,
                    listener,
                    handler,
                    allowed_sources,
                    limiter,
                    on_excess,
                    counters,
                    nursery,
                )
            # The sockets already listen: connections queue in the backlog from here on.
            task_status.started(counters)
    finally:
        for listener in listeners:
            listener.socket.close()


async def _accept_loop(
    listener: trio.SocketListener,
    handler: Handler,
    allowed_sources: AllowedSources,
    limiter: trio.CapacityLimiter,
    on_excess: Callable[[EagerSocketStream], Awaitable[None]] | None,
    counters: ConnectionCounters,
    nursery: trio.Nursery,
) -> None:
    last_logged: float | None = None
    suppressed = 0
    while True:
        try:
            stream = EagerSocketStream.from_trio(await listener.accept())
        except trio.ClosedResourceError:
            return  # the listener was closed: stop accepting, let handlers finish
        except OSError as exc:
            if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                raise
            counters.accept_errors += 1
            now = trio.current_time()
            if last_logged is None or now - last_logged >= ACCEPT_ERROR_LOG_INTERVAL_SECONDS:
                log.error(
                    "accept failed: %s (%d more since the last report); retrying in %gs",
                    os.strerror(exc.errno or 0),
                    suppressed,
                    ACCEPT_BACKOFF_SECONDS,
                )
                last_logged, suppressed = now, 0
            else:
                suppressed += 1
            await trio.sleep(ACCEPT_BACKOFF_SECONDS)
            continue
        client_ip = _peer_ip(stream)
        if client_ip is None or client_ip not in allowed_sources:
            counters.rejected_sources += 1
            log.debug("closed a connection from %s: not an allowed source", client_ip)
            await trio.aclose_forcefully(stream)
            continue
        token = object()
        try:
            limiter.acquire_on_behalf_of_nowait(token)
        except trio.WouldBlock:
            counters.excess += 1
            log.debug("connection from %s over the limit of %g", client_ip, limiter.total_tokens)
            if on_excess is None:
                await trio.aclose_forcefully(stream)
            else:
                nursery.start_soon(_run_excess, on_excess, stream, str(client_ip))
            continue
        counters.accepted += 1
        nursery.start_soon(_run_handler, handler, stream, str(client_ip), limiter, token, counters)


def _peer_ip(stream: EagerSocketStream) -> IPAddress | None:
    try:
        host = stream.socket.getpeername()[0]
    except OSError:  # the peer already reset the connection
        return None
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


async def _run_handler(
    handler: Handler,
    stream: EagerSocketStream,
    client_ip: str,
    limiter: trio.CapacityLimiter,
    token: object,
    counters: ConnectionCounters,
) -> None:
    try:
        await handler(stream, client_ip)
    except Exception:
        counters.handler_errors += 1
        log.exception("connection from %s failed", client_ip)
    finally:
        limiter.release_on_behalf_of(token)
        await trio.aclose_forcefully(stream)


async def _run_excess(
    on_excess: Callable[[EagerSocketStream], Awaitable[None]],
    stream: EagerSocketStream,
    client_ip: str,
) -> None:
    try:
        with trio.move_on_after(EXCESS_DEADLINE_SECONDS):
            await on_excess(stream)
    except Exception:
        log.exception("answering an excess connection from %s failed", client_ip)
    finally:
        await trio.aclose_forcefully(stream)
