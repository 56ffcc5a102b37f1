"""Tell systemd the truth: the ``sd_notify`` datagram protocol, without libsystemd.

How this works: systemd passes a unix datagram socket's address in ``$NOTIFY_SOCKET`` — a path, or
``@name`` for the abstract namespace (the ``@`` stands for a leading NUL byte). A message is one
datagram of ``KEY=VALUE`` lines: ``READY=1`` when start-up is done, ``STATUS=`` one human line
(``systemctl status`` shows it), ``RELOADING=1`` … ``READY=1`` around a reload, ``STOPPING=1``
when shutdown begins, and ``WATCHDOG=1`` at least every ``$WATCHDOG_USEC`` microseconds when the
unit has ``WatchdogSec=``, or systemd kills and (with ``Restart=``) restarts the service.

Notifications are best-effort and never block: each goes out on a fresh non-blocking socket, and a
receiver that is full or gone is logged once at debug level and otherwise ignored — the daemon's
work matters more than its reports. Without ``$NOTIFY_SOCKET`` (not under systemd, or a unit
that is not ``Type=notify``) every method is a no-op.

:func:`run_watchdog` pings only while the supervisor loop makes progress: a wedged loop stops the
pings and systemd restarts us, while a network outage — which the loop survives and keeps
reporting — does not, because restarting does not fix a network.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, MutableMapping

import trio

log = logging.getLogger(__name__)

#: How long the supervisor may go without completing a tick before it counts as wedged, by
#: default. It must exceed the longest gap a healthy loop can have: the repair backoff's 60 s cap
#: plus one attempt's own deadlines (DNS, UAPI and start-up timeouts of 5-10 s each).
DEFAULT_STALL_AFTER_SECONDS = 120.0

_ENVIRONMENT_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def socket_address(notify_socket: str) -> bytes | None:
    """The ``sendto`` address for a ``$NOTIFY_SOCKET`` value, or None if it is not a unix one.

    ``/run/systemd/notify`` is a path; ``@name`` is ``name`` in the abstract namespace. Other
    forms (systemd 254's ``vsock:CID:PORT``, used between VMs) are not supported here.
    """
    if notify_socket.startswith("/"):
        return os.fsencode(notify_socket)
    if notify_socket.startswith("@") and len(notify_socket) > 1:
        return b"\0" + os.fsencode(notify_socket[1:])
    return None


def one_line(text: str) -> str:
    """``text`` as one ``STATUS=`` line: line breaks (and NULs) become single spaces."""
    return " ".join(text.replace("\0", " ").splitlines()).strip()


def monotonic_usec() -> int:
    """``CLOCK_MONOTONIC`` in microseconds, the clock systemd expects in ``MONOTONIC_USEC=``."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends ``sd_notify`` messages to the service manager; every method is a no-op without one."""

    def __init__(self, address: bytes | None, *, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec if address is not None else None
        self._last_status: str | None = None
        self._failure_logged = False

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, *, unset_environment: bool = False
    ) -> Notifier:
        """A notifier for ``$NOTIFY_SOCKET``, with the watchdog of ``$WATCHDOG_USEC`` if it is ours.

        The watchdog is honoured only when ``$WATCHDOG_PID`` is unset or is this process's pid
        (systemd sets it so a child that inherits the variables does not think it is watched).
        With ``unset_environment`` (``environ`` must then be mutable, as ``os.environ`` is) the
        three variables are removed after reading, so no child process inherits them.
        """
        env = os.environ if environ is None else environ
        address = None
        notify_socket = env.get("NOTIFY_SOCKET", "")
        if notify_socket:
            address = socket_address(notify_socket)
            if address is None:
                log.debug(
                    "NOTIFY_SOCKET=%r is not a unix socket address; not notifying", notify_socket
                )
        watchdog_usec = _watchdog_usec(env)
        if unset_environment:
            if not isinstance(env, MutableMapping):
                raise TypeError("unset_environment needs a mutable environ")
            for key in _ENVIRONMENT_KEYS:
                env.pop(key, None)
        return cls(address, watchdog_usec=watchdog_usec)

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens (``$NOTIFY_SOCKET`` was set and usable)."""
        return self.address is not None

    def ready(self, status: str | None = None) -> None:
        """Start-up is complete: the interface is configured and the listeners are bound."""
        self._send(["READY=1"], status)

    def status(self, text: str) -> None:
        """Set the one-line status ``systemctl status`` shows (sent only when it changes)."""
        if one_line(text) != self._last_status:
            self._send([], text)

    def reloading(self, status: str | None = None) -> None:
        """A reload has begun; end it with :meth:`ready_after_reload`.

        ``MONOTONIC_USEC`` is what systemd ≥ 253 requires with ``Type=notify-reload`` to tell
        this reload from an earlier one; older versions ignore it.
        """
        self._send(["RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}"], status)

    def ready_after_reload(self, status: str | None = None) -> None:
        """The reload is done (whether the new config was applied or rejected)."""
        self._send(["READY=1"], status)

    def stopping(self, status: str | None = None) -> None:
        """Shutdown has begun (the drain); systemd shows the unit as deactivating."""
        self._send(["STOPPING=1"], status)

    def watchdog(self) -> None:
        """Reset systemd's watchdog timer; a no-op unless the watchdog is ours."""
        if self.watchdog_usec is not None:
            self._send(["WATCHDOG=1"])

    def watchdog_interval_seconds(self) -> float | None:
        """How often to ping: half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises."""
        if self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    def _send(self, lines: list[str], status: str | None = None) -> None:
        if self.address is None:
            return
        if status is not None:
            self._last_status = one_line(status)
            lines = [*lines, f"STATUS={self._last_status}"]
        message = "\n".join(lines).encode()
        try:
            with socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            ) as sock:
                sock.sendto(message, self.address)
        except OSError as exc:  # full (EAGAIN), gone (ENOENT, ECONNREFUSED), or denied
            if status is not None:
                self._last_status = None  # not delivered: the next status() must send again
            if not self._failure_logged:
                self._failure_logged = True
                log.debug("sd_notify to %r failed (%s); ignoring", self.address, exc)
            return
        self._failure_logged = False  # log the next run of failures again


def _watchdog_usec(environ: Mapping[str, str]) -> int | None:
    pid = environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None  # the variables were meant for another process (our parent)
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None


async def run_watchdog(
    notifier: Notifier,
    progress: Callable[[], float],
    *,
    stall_after_seconds: float = DEFAULT_STALL_AFTER_SECONDS,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Ping systemd's watchdog at half its interval while the supervisor makes progress.

    ``progress()`` returns the ``trio.current_time()`` at which the supervisor loop last
    completed a tick. While that is at most ``stall_after_seconds`` old, ``WATCHDOG=1`` goes out
    every :meth:`Notifier.watchdog_interval_seconds`; once it is older, pings stop (logged) and
    systemd restarts the service within ``WatchdogSec=``; if progress resumes first, so do the
    pings. A blocked trio loop stops the pings too, since this task cannot run. Returns at once
    when the watchdog is not enabled.
    """
    interval = notifier.watchdog_interval_seconds()
    task_status.started()
    if interval is None:
        return
    withholding = False
    while True:
        tick_age = trio.current_time() - progress()
        if tick_age <= stall_after_seconds:
            if withholding:
                log.warning("the supervisor loop is making progress again; watchdog pings resume")
                withholding = False
            notifier.watchdog()
        elif not withholding:
            log.error(
                "the supervisor loop has made no progress for %.0fs; withholding watchdog pings "
                "so that systemd restarts tunneld",
                tick_age,
            )
            withholding = True
        await trio.sleep(interval)
