"""Notice when the host's network changes: a link, address or route appears or goes.

Why: while a gateway is down, the supervisor's recovery steps back off (up to a minute), and
WireGuard itself retries a handshake only every 5 s. When the uplink comes back — a cable, a
Wi-Fi roam, a VPC interface re-attached — the fastest way back is to start the recovery over
at once. The kernel announces such changes on rtnetlink multicast groups; we only need to know
*that* something changed, so nothing is parsed.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable

import trio

from tunneld import fdlimit

log = logging.getLogger(__name__)

# linux/rtnetlink.h: the legacy group bits, enough for links, addresses and routes.
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
#: Out of descriptors, the next attempt at the socket comes this much later.
EXHAUSTED_RETRY_SECONDS = 5.0
GROUPS = (
    RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE
)


async def watch_network(
    changed: Callable[[], None], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Call ``changed()`` after every batch of rtnetlink link/address/route notifications.

    Runs until cancelled. Without a netlink socket (a sandbox that forbids it) it logs once and
    returns: the supervisor's regular ticks still notice everything, only later. Out of file
    descriptors, it reports started all the same and tries again every
    :data:`EXHAUSTED_RETRY_SECONDS` (logged, rate-limited).
    """
    failures = fdlimit.ExhaustionLog("watching network changes")
    started = False
    while True:
        try:
            sock = trio.socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        except OSError as exc:
            if exc.errno not in fdlimit.EXHAUSTION_ERRNOS:
                log.warning("cannot watch network changes (%s); relying on the regular checks", exc)
                if not started:
                    task_status.started()
                return
            failures.failed(exc, retry=f"trying again in {EXHAUSTED_RETRY_SECONDS:g}s")
            if not started:
                task_status.started()
                started = True
            await trio.sleep(EXHAUSTED_RETRY_SECONDS)
            continue
        break
    with sock:
        try:
            await sock.bind((0, GROUPS))
        except OSError as exc:
            log.warning("cannot watch network changes (%s); relying on the regular checks", exc)
            if not started:
                task_status.started()
            return
        failures.succeeded()
        if not started:
            task_status.started()
        while True:
            try:
                await sock.recv(65536)
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:  # ENOBUFS: we missed some; a change all the same
                    raise
            changed()
