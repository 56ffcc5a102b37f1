"""The L4 relay behind a ``protocol = "tcp"`` service.

How it works: after the origin connection is up, two pumps copy bytes, one per direction, one
chunk (at most ``BUFFER_BYTES``) in flight each, so memory per connection is bounded and a slow
reader slows its writer down through TCP flow control. A pump that sees end-of-file passes it on
with ``send_eof`` (a TCP or unix ``shutdown(SHUT_WR)``) and stops; the other direction keeps going
until its own end-of-file, so half-closed protocols (a client that sends a query, shuts its write
side and reads the answer) work both ways. A reset on either side, or no byte in either direction
for ``idle_timeout_seconds``, ends both directions at once. Both sockets are always closed on the
way out.

Zero-copy: ``os.splice`` through a pipe would spare the two copies into and out of Python for TCP
and unix upstreams alike; worth measuring once the relay shows up in profiles (it needs a pipe per
direction and readiness waits on both fds instead of trio's stream API).
"""

from __future__ import annotations

import logging

import trio

from tunneld.config_proxy import ServiceConfig
from tunneld.errors import UpstreamError
from tunneld.proxy.upstream import open_upstream

log = logging.getLogger(__name__)

BUFFER_BYTES = 64 * 1024


async def relay(
    client: trio.abc.HalfCloseableStream, client_address: str, service: ServiceConfig
) -> None:
    """Connect to ``service``'s origin and relay bytes both ways until both sides are done.

    Never raises for network trouble (refused origin, resets, idle timeout): it logs with the
    service name and client address and closes both streams. ``client`` is closed on return.
    """
    try:
        upstream = await open_upstream(
            service.upstream,
            service.tls,
            connect_timeout_seconds=service.connect_timeout_seconds,
        )
    except UpstreamError as exc:
        log.warning(
            "service %s: client %s: cannot reach the origin (%s): %s",
            service.name,
            client_address,
            exc.kind,
            exc,
        )
        await trio.aclose_forcefully(client)
        return
    state = _Relay(service, client_address)
    try:
        await state.run(client, upstream)
    finally:
        await trio.aclose_forcefully(upstream)
        await trio.aclose_forcefully(client)
    state.log_end()


class _Relay:
    def __init__(self, service: ServiceConfig, client_address: str) -> None:
        self.service = service
        self.client_address = client_address
        self.last_activity = trio.current_time()
        self.bytes_to_upstream = 0
        self.bytes_to_client = 0
        self.ended = "closed by both sides"
        self.log_level = logging.DEBUG
        self.scope = trio.CancelScope()

    async def run(self, client: trio.abc.Stream, upstream: trio.abc.Stream) -> None:
        with self.scope:
            async with trio.open_nursery() as watchdog:
                watchdog.start_soon(self._watch_idle)
                async with trio.open_nursery() as pumps:
                    pumps.start_soon(self._pump, client, upstream, "client")
                    pumps.start_soon(self._pump, upstream, client, "origin")
                watchdog.cancel_scope.cancel()  # both directions are done

    async def _pump(self, source: trio.abc.Stream, sink: trio.abc.Stream, source_name: str) -> None:
        try:
            while data := await source.receive_some(BUFFER_BYTES):
                self.last_activity = trio.current_time()
                await sink.send_all(data)
                self.last_activity = trio.current_time()
                if source_name == "client":
                    self.bytes_to_upstream += len(data)
                else:
                    self.bytes_to_client += len(data)
            if not isinstance(sink, trio.abc.HalfCloseableStream):
                self._end(f"{source_name} closed; the other side cannot be half-closed")
                return
            await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            reason = exc.__cause__ or exc
            self._end(f"broken while relaying from the {source_name}: {reason}", logging.INFO)

    async def _watch_idle(self) -> None:
        idle_seconds = self.service.idle_timeout_seconds
        while True:
            deadline = self.last_activity + idle_seconds
            if trio.current_time() >= deadline:
                self._end(f"idle for {idle_seconds:g}s")
                return
            await trio.sleep_until(deadline)

    def _end(self, reason: str, log_level: int = logging.DEBUG) -> None:
        """Stop both directions; the first reason is the one reported."""
        if not self.scope.cancel_called:
            self.ended, self.log_level = reason, log_level
            self.scope.cancel()

    def log_end(self) -> None:
        log.log(
            self.log_level,
            "service %s: client %s: %s (%d bytes to the origin, %d to the client)",
            self.service.name,
            self.client_address,
            self.ended,
            self.bytes_to_upstream,
            self.bytes_to_client,
        )
