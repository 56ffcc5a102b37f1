"""Socket streams whose receives yield to the scheduler only when the kernel makes them wait.

Why this exists: :class:`trio.SocketStream` makes every send and receive a full schedule point.
An operation the kernel completes at once still ends with a trip through trio's run loop before
it returns (trio's rule: every ``await`` of its own is a checkpoint, so a loop of operations that
never block can still be cancelled and cannot starve other tasks). For a receive that found its
data, the trip buys nothing: the caller has work in hand. Skipping it cut tunneld-tcp's CPU per
request by about a fifth in ``bench/run`` (small keep-alive requests: 0.064-0.069 → 0.053 s per
1,000; tunneld-http, whose cost lies elsewhere, is unchanged within the noise).

Sends keep the trip, deliberately. After a send the peer — often a process on this same host,
the origin — needs a moment to answer; letting the other ready tasks run first gives it that
moment, and the receive that follows then finds the answer instead of registering with epoll and
waiting to be woken, which costs more than the trip. Measured: with eager sends as well,
tunneld-http used 15 % *more* CPU per request in ``bench/run`` (0.164-0.197 vs 0.145-0.152 s per
1,000), although ``bench.micro``, whose origin shares the proxy's loop, showed a gain.

How the guarantees are kept without the trip:

- **Cancellation**: every operation first asks whether its task is cancelled
  (``trio.lowlevel.checkpoint_if_cancelled``: no yield unless it is), so a cancelled task stops
  at its next operation whether or not that one would have waited.
- **Fairness**: receives (and EOFs sent) that complete without waiting are counted loop-wide
  (any wait or send returns to the scheduler and starts the count again); after
  :data:`YIELD_EVERY` in a row, the next one yields once. A task draining an always-ready socket
  therefore still lets every other task run every few dozen operations.

The stream is otherwise a ``trio.abc.HalfCloseableStream`` like trio's: network errors become
``trio.BrokenResourceError`` (the ``OSError`` as its cause), use after close becomes
``trio.ClosedResourceError`` — also for a task waiting on the socket when another closes it.
TCP sockets get ``TCP_NODELAY`` (a proxy forwards what it has; delaying it helps nobody) and a
``TCP_NOTSENT_LOWAT`` of 128 KiB: it bounds what sits unsent in the kernel, so a slow reader's
backpressure reaches the writer instead of piling up in socket buffers. trio uses 16 KiB, with
which a 64 KiB relay write can wait for the peer several times over. With 128 KiB, 1 MB responses
cost about a fifth less CPU in ``bench/run`` (tunneld-http 2.85-3.24 → 2.24-2.35 s per 1,000; tcp
2.14-2.43 → 1.68-1.84), with the same throughput. Leaving it unset (the kernel's default: no
bound) saved nothing.
"""

from __future__ import annotations

import errno
import os
import select
import socket
from collections.abc import Awaitable, Callable
from contextlib import suppress

import trio
from trio.lowlevel import (
    cancel_shielded_checkpoint,
    checkpoint,
    checkpoint_if_cancelled,
    notify_closing,
    wait_readable,
    wait_writable,
)

#: Receives completed without waiting, loop-wide, after which one yields to the scheduler.
YIELD_EVERY = 32
#: What ``receive_some()`` asks of the kernel when the caller does not say.
DEFAULT_RECEIVE_BYTES = 65536
_NOTSENT_LOWAT_BYTES = 128 * 1024
UNIX_BACKLOG_RETRY_SECONDS = 0.005

# Receives completed without waiting since some task last went through the scheduler. One
# count per process: tunneld runs one trio loop (a second loop in another thread would only make
# both yield a little more often than needed).
_ready_in_a_row = 0


class EagerSocketStream(trio.abc.HalfCloseableStream):
    """A connected ``SOCK_STREAM`` socket (TCP or unix) as a trio stream.

    ``socket`` is the standard-library socket, non-blocking from here on; the stream owns it.
    """

    __slots__ = ("_eof_sent", "socket")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.socket = sock
        self._eof_sent = False
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            with suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, _NOTSENT_LOWAT_BYTES)

    @classmethod
    def from_trio(cls, stream: trio.SocketStream) -> EagerSocketStream:
        """Take over the socket of ``stream`` (which must not be used afterwards)."""
        trio_socket = stream.socket
        family, kind, proto = trio_socket.family, trio_socket.type, trio_socket.proto
        return cls(socket.socket(family, kind, proto, fileno=trio_socket.detach()))

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE_BYTES
        elif max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        await checkpoint_if_cancelled()
        sock = self.socket
        try:
            while True:
                try:
                    data = sock.recv(max_bytes)
                except BlockingIOError:
                    await _wait(wait_readable, sock)
                else:
                    break
        except OSError as exc:
            raise _stream_error(exc) from exc
        await _count_ready()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof_sent:
            raise trio.ClosedResourceError("can't send data after sending EOF")
        await checkpoint_if_cancelled()
        sock = self.socket
        remaining = len(data)
        view: memoryview | None = None  # made only for a partial send
        try:
            while True:
                try:
                    sent = sock.send(data if view is None else view)
                except BlockingIOError:
                    await _wait(wait_writable, sock)
                    continue
                if sent == remaining:
                    break
                remaining -= sent
                view = (memoryview(data) if view is None else view)[sent:]
        except OSError as exc:
            raise _stream_error(exc) from exc
        finally:
            if view is not None:
                view.release()
        await _yield_after_send()

    async def wait_send_all_might_not_block(self) -> None:
        if self.socket.fileno() == -1:
            raise trio.ClosedResourceError("this socket was already closed")
        await _wait(wait_writable, self.socket)

    async def send_eof(self) -> None:
        await checkpoint_if_cancelled()
        if self._eof_sent:
            return
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise _stream_error(exc) from exc
        self._eof_sent = True
        await _count_ready()

    async def aclose(self) -> None:
        sock = self.socket
        _close(sock)  # a task waiting on it gets ClosedResourceError
        await checkpoint()

    def is_readable(self) -> bool:
        """Whether a receive would return at once (data, EOF or an error) — for an idle
        pooled connection: the origin closed it, or sent what nobody asked for."""
        if self.socket.fileno() == -1:
            return False
        poller = select.poll()  # not select(): it fails for a descriptor above 1023
        poller.register(self.socket, select.POLLIN)
        return bool(poller.poll(0))


async def _wait(wait: Callable[[socket.socket], Awaitable[None]], sock: socket.socket) -> None:
    global _ready_in_a_row
    await wait(sock)
    _ready_in_a_row = 0


async def _yield_after_send() -> None:
    """Let every other ready task run before the sender goes on (see the module docstring)."""
    global _ready_in_a_row
    _ready_in_a_row = 0
    await cancel_shielded_checkpoint()


async def _count_ready() -> None:
    """Count an operation that did not wait; every :data:`YIELD_EVERY`-th one yields."""
    global _ready_in_a_row
    _ready_in_a_row += 1
    if _ready_in_a_row >= YIELD_EVERY:
        _ready_in_a_row = 0
        await cancel_shielded_checkpoint()


def _stream_error(exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


async def connect(
    family: socket.AddressFamily, address: tuple[str, int] | str
) -> EagerSocketStream:
    """Connect a new ``SOCK_STREAM`` socket of ``family`` to ``address`` (no name lookup:
    an IP literal and port, or a unix socket path). Raises ``OSError`` as ``connect()`` does;
    the caller sets the deadline."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        code = await _connect(sock, address)
    except BaseException:
        _close(sock)
        raise
    if code != 0:
        _close(sock)
        raise OSError(code, os.strerror(code))
    return EagerSocketStream(sock)


async def _connect(sock: socket.socket, address: tuple[str, int] | str) -> int:
    """Connect the non-blocking ``sock``; returns the errno (0: connected)."""
    code = sock.connect_ex(address)
    while code == errno.EAGAIN:  # unix: the listener's backlog is full; TCP never says this
        await trio.sleep(UNIX_BACKLOG_RETRY_SECONDS)
        code = sock.connect_ex(address)
    if code != errno.EINPROGRESS:
        await checkpoint()
        return code
    await wait_writable(sock)
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


def _close(sock: socket.socket) -> None:
    if sock.fileno() != -1:
        notify_closing(sock)
    sock.close()
