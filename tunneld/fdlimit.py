"""File descriptors: raise the soft limit at start, budget them, and survive running out.

How this works. Every proxied connection may hold two descriptors (the client's and the
origin's); the control plane — the interface's supervisor and everything it opens — needs some
too, and it must never be the one that fails. So:

1. :func:`raise_open_files_limit` lifts the soft ``RLIMIT_NOFILE`` to the hard limit at start,
   as Go's runtime and nginx's ``worker_rlimit_nofile`` do (systemd gives services a soft limit
   of 1024 and a hard one of 524288). It never fails: if the kernel refuses, the soft limit stays.
2. :func:`connection_budget` derives ``proxy.max_connections`` from the soft limit: what is left
   after :func:`control_plane_reserve`, two descriptors per connection. ``"auto"`` (the default)
   takes all of that, up to :data:`AUTO_MAX_CONNECTIONS`; a configured number above it is
   clamped to it, with a warning — a limit the descriptors cannot honour would only move the
   failure from a clear 503 to ``EMFILE`` somewhere else.
3. Should descriptors run out all the same (another process's descriptors do not count, but a
   leak or a burst of excess connections would), :func:`exhaustion` recognises the error
   wherever it surfaced, and the supervisor, netwatch and the accept loops log it and retry
   instead of ending.
"""

from __future__ import annotations

import errno
import logging
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from tunneld.config import Config

log = logging.getLogger(__name__)

#: Descriptors each proxied connection may hold: the client's and the origin's.
FDS_PER_CONNECTION = 2
#: What the control plane holds besides the budgeted parts below: stdin/out/err and log files,
#: trio's epoll and wake-up pair, the netlink thread's two pyroute2 handles (4 each), netwatch's
#: socket, the wireguard-go child's pipes, a UAPI connection, the probes (one per gateway), DNS
#: lookups, sd_notify, the listening sockets, and a reload reading the config, keys and secrets.
#: Counted generously: a spare descriptor costs nothing, a missing one stops the health tick.
CONTROL_PLANE_FDS = 64
#: The observability endpoint's connection limit (``observe.ServerLimits``): all reserved.
OBSERVABILITY_CONNECTIONS = 256
#: Connections beyond ``max_connections`` answered 503 at once; more are closed unanswered.
EXCESS_ANSWERS = 64
#: ``"auto"`` never goes beyond this, however high the limit: memory is the next bound.
AUTO_MAX_CONNECTIONS = 16384
#: errnos that say "this process (or the host) is out of descriptors or memory": not a fault of
#: the network or of a peer, and over once something is closed — so retried, never fatal.
EXHAUSTION_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})
_NR_OPEN = Path("/proc/sys/fs/nr_open")  # the kernel's ceiling for RLIMIT_NOFILE
_NR_OPEN_DEFAULT = 1 << 20


def _ceiling(hard: int) -> int:
    if hard != resource.RLIM_INFINITY:
        return hard
    try:  # an unlimited hard limit: the kernel still refuses more than nr_open
        return int(_NR_OPEN.read_text())
    except (OSError, ValueError):
        return _NR_OPEN_DEFAULT


def raise_open_files_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _ceiling(hard)
    if soft == resource.RLIM_INFINITY or soft >= target:
        log.debug("open files limit: %d (hard limit %d)", open_files_limit(), target)
        return open_files_limit()
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log.warning("could not raise the open files limit from %d to %d (%s); keeping %d",
                    soft, target, exc, soft)  # fmt: skip
        return soft
    log.info("raised the open files limit from %d to the hard limit, %d", soft, target)
    return target


def open_files_limit() -> int:
    """The soft ``RLIMIT_NOFILE`` in force (an unlimited one as the kernel's ceiling)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return _ceiling(soft)


def control_plane_reserve(config: Config) -> int:
    """Descriptors kept out of the proxy's connection budget for everything else.

    The fixed part, the observability endpoint's connections when it is on, the answers to
    excess connections, and the idle origin connections each HTTP service may pool (they are
    not counted against any client connection).
    """
    pools = sum(
        service.max_idle_upstream_connections
        for service in config.services
        if service.protocol == "http"
    )
    observability = OBSERVABILITY_CONNECTIONS if config.metrics.listen is not None else 0
    return CONTROL_PLANE_FDS + observability + EXCESS_ANSWERS + pools


@dataclass(frozen=True)
class ConnectionBudget:
    """The connection limit in force, and how it came about (for the log and /status)."""

    max_connections: int
    open_files_limit: int
    reserve: int
    configured: int | None  # None: "auto"

    @property
    def clamped(self) -> bool:
        return self.configured is not None and self.max_connections < self.configured

    def describe(self) -> str:
        source = "auto" if self.configured is None else f"{self.configured} configured"
        if self.clamped:
            source += ", lowered to fit the open files limit; raise LimitNOFILE= to allow it"
        return (
            f"max_connections {self.max_connections} ({source}): open files limit "
            f"{self.open_files_limit}, {self.reserve} kept for the control plane, "
            f"{FDS_PER_CONNECTION} per connection"
        )


def connection_budget(configured: int | None, open_files: int, reserve: int) -> ConnectionBudget:
    """The connection limit for ``configured`` (None: auto) under ``open_files`` descriptors.

    At least 1, even when the reserve leaves nothing: a limit that low is logged as a warning
    by the caller (it says to raise the limit), and the control plane survives running out.
    """
    fits = max(1, (open_files - reserve) // FDS_PER_CONNECTION)
    limit = min(fits, AUTO_MAX_CONNECTIONS if configured is None else configured)
    return ConnectionBudget(limit, open_files, reserve, configured)


def budget_for(config: Config) -> ConnectionBudget:
    """:func:`connection_budget` for ``config`` under the soft limit now in force."""
    return connection_budget(
        config.proxy.max_connections, open_files_limit(), control_plane_reserve(config)
    )


def exhaustion(exc: BaseException) -> OSError | None:
    """The out-of-descriptors (or memory) ``OSError`` behind ``exc``, if that is what it is.

    Looks through what tunneld translated it into (``__cause__``) and through trio's exception
    groups, where a probe's failure arrives from a nursery. Any other error inside a group
    makes the whole something else: None.
    """
    if isinstance(exc, BaseExceptionGroup):
        inner = [exhaustion(e) for e in exc.exceptions if not isinstance(e, trio.Cancelled)]
        return inner[0] if inner and all(inner) else None
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in EXHAUSTION_ERRNOS:
            return seen
        seen = seen.__cause__
    return None


class ExhaustionLog:
    """Says that ``what`` keeps failing for lack of descriptors: at once, then at most every
    ``interval_seconds`` with how many failures it left unsaid; and once when it works again."""

    def __init__(self, what: str, *, interval_seconds: float = 10.0) -> None:
        self.what = what
        self.interval_seconds = interval_seconds
        self.failures = 0  # since the last success
        self._unsaid = 0
        self._last_said: float | None = None

    def failed(self, error: OSError, *, retry: str) -> None:
        self.failures += 1
        now = trio.current_time()
        if self._last_said is not None and now - self._last_said < self.interval_seconds:
            self._unsaid += 1
            return
        more = f" ({self._unsaid} more since the last report)" if self._unsaid else ""
        log.error("%s failed: %s%s; %s", self.what, _strerror(error), more, retry)
        self._last_said, self._unsaid = now, 0

    def succeeded(self) -> None:
        if self.failures:
            log.warning("%s works again after %d failure(s) for lack of descriptors",
                        self.what, self.failures)  # fmt: skip
        self.failures, self._unsaid, self._last_said = 0, 0, None


def _strerror(error: OSError) -> str:
    name = errno.errorcode.get(error.errno or 0, "")
    return f"{name} ({error.strerror})" if name and error.strerror else str(error)
