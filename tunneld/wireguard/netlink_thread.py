"""The one thread that talks netlink through pyroute2, and the handles it keeps open.

Why a thread of its own. pyroute2 0.9's synchronous API wraps an asyncio core whose state is
thread-local: a handle's event loop (an epoll descriptor and a self-pipe) and its netlink socket
belong to the thread that created it, and calls from that thread reuse them. A call from any
other thread opens a socket for that thread and a fresh event loop for the call — measured: a
handle is 4 descriptors, and a call from a second thread leaves a fifth open. trio's worker
threads are pooled, not pinned (``trio.to_thread.run_sync`` never promises the same thread
twice, not even under a ``CapacityLimiter(1)``), so handles used from them would cost descriptors
at every call — which is how the health tick used to open an event loop per tick and die with
``EMFILE`` when the proxy's connections had used the rest.

So every pyroute2 call runs here: :func:`run_sync` hands a function to one long-lived thread,
which runs the calls one at a time in the order they came and keeps one ``IPRoute`` (no
multicast groups: nothing arrives unasked and queues up) and one ``WireGuard`` handle for the
life of the process (:func:`iproute`, :func:`wireguard`; created at first use, in this thread).
A call that failed with a socket error (not a kernel's refusal, ``NetlinkError``) drops them, and
the next call opens fresh ones.

STYLE says no bare threads; this is the exception, because trio offers no thread affinity and
pyroute2 needs it. The thread holds no trio state: each call carries the trio token of its
caller and is reported back through it. It is a daemon thread, idle on its queue between calls,
so it never holds up the interpreter's exit. A started call is not abandoned when the caller is
cancelled — as with ``trio.to_thread.run_sync`` before — since each is one short netlink request.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio
from pyroute2 import IPRoute, NetlinkError, WireGuard

log = logging.getLogger(__name__)

T = TypeVar("T")
_Report = Callable[[outcome.Outcome[Any]], None]
_Job = tuple[Callable[[], Any], _Report]

_handles = threading.local()  # the open pyroute2 handles of the thread that made them
_thread_lock = threading.Lock()
_jobs: queue.SimpleQueue[_Job] | None = None


def _cached(name: str, factory: Callable[[], Any]) -> Any:
    cache: dict[str, Any] = _handles.__dict__.setdefault("cache", {})
    handle = cache.get(name)
    if handle is None:
        handle = cache[name] = factory()
    return handle


def iproute() -> Any:
    """This thread's long-lived ``IPRoute`` handle (created at the first call)."""
    return _cached("iproute", lambda: IPRoute(groups=0))


def wireguard() -> Any:
    """This thread's long-lived ``WireGuard`` handle (created at the first call).

    Creating it looks up the "wireguard" generic netlink family: without the kernel module that
    raises (``NetlinkError`` ENOENT), and nothing is cached.
    """
    return _cached("wireguard", WireGuard)


def discard_handles() -> None:
    """Close this thread's handles; the next :func:`iproute`/:func:`wireguard` opens new ones."""
    cache: dict[str, Any] = _handles.__dict__.get("cache", {})
    for handle in cache.values():
        try:
            handle.close()
        except Exception:  # closing a broken handle may fail too; it is dropped all the same
            log.debug("closing a pyroute2 handle failed", exc_info=True)
    cache.clear()


def _broke_the_socket(error: BaseException) -> bool:
    """Whether ``error`` (or what it was translated from) is a socket failure, not a reply."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, NetlinkError):
            return False
        if isinstance(seen, OSError):
            return True
        seen = seen.__cause__
    return False


def _serve(jobs: queue.SimpleQueue[_Job]) -> None:
    while True:
        call, report = jobs.get()
        result = outcome.capture(call)
        if isinstance(result, outcome.Error) and _broke_the_socket(result.error):
            discard_handles()
        report(result)
        del call, report, result  # hold nothing of a finished call while idle


def _queue() -> queue.SimpleQueue[_Job]:
    global _jobs
    with _thread_lock:
        if _jobs is None:
            jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
            threading.Thread(
                target=_serve, args=(jobs,), name="tunneld-netlink", daemon=True
            ).start()
            _jobs = jobs
        return _jobs


async def run_sync(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` in the netlink thread; its result, or its exception re-raised.

    Calls run one at a time, in the order they were made. A call is not abandoned once
    submitted: a caller cancelled meanwhile waits for it to end, then gets ``Cancelled``.
    """
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()

    def report(result: outcome.Outcome[Any]) -> None:
        token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    _queue().put((lambda: function(*args), report))

    def abort(_raise_cancel: Any) -> trio.lowlevel.Abort:
        return trio.lowlevel.Abort.FAILED  # it runs to its end; the caller sees cancel after

    result: T = await trio.lowlevel.wait_task_rescheduled(abort)
    await trio.lowlevel.checkpoint_if_cancelled()  # a cancelled caller stops here, not later
    return result
