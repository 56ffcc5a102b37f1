"""Has everything we sent through the tunnel arrived? Asked once, at the end of a drain.

Closing a TCP socket hands its unsent bytes to the kernel, which keeps transmitting them in
the background. That is fine while the tunnel lives, but a drain ends by deleting the WireGuard
interface: the last response chunk (and the FIN) of a request that finished just in time would
be lost with it, and the gateway's client would hang until its own timeout. So before the
interface goes, wait (bounded) until the peers have acknowledged what our sockets on the tunnel
addresses sent.

The kernel reports each TCP socket of our network namespace in ``/proc/net/tcp`` and
``/proc/net/tcp6`` — closed-but-flushing ones included — with ``tx_queue`` = bytes written but
not yet acknowledged.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Collection, Iterable
from pathlib import Path

import trio

from tunneld.wireguard.model import IPAddress

log = logging.getLogger(__name__)

PROC_NET_TCP = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
POLL_INTERVAL_SECONDS = 0.02


def parse_proc_address(hex_address: str) -> IPAddress:
    """``0100007F`` → 127.0.0.1; IPv6 is four 32-bit words, each in the host's (little) order."""
    raw = bytes.fromhex(hex_address)
    if len(raw) not in (4, 16):
        raise ValueError(f"not an address from /proc/net/tcp: {hex_address!r}")
    in_network_order = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(in_network_order)


def unacknowledged_bytes(lines: Iterable[str], addresses: Collection[IPAddress]) -> int:
    """Sum of ``tx_queue`` over the sockets bound to ``addresses`` in /proc/net/tcp lines."""
    total = 0
    for line in lines:
        fields = line.split()
        if len(fields) < 5 or fields[0] == "sl":
            continue  # the header line
        local = fields[1].partition(":")[0]
        tx_queue = int(fields[4].partition(":")[0], 16)
        if tx_queue and parse_proc_address(local) in addresses:
            total += tx_queue
    return total


def _read_unacknowledged(addresses: Collection[IPAddress]) -> int:
    total = 0
    for path in PROC_NET_TCP:
        try:
            total += unacknowledged_bytes(path.read_text().splitlines(), addresses)
        except FileNotFoundError:  # no IPv6 in this kernel
            continue
    return total


async def wait_until_delivered(addresses: Collection[IPAddress], timeout_seconds: float) -> bool:
    """Wait until our TCP sockets on ``addresses`` have nothing unacknowledged; False on timeout."""
    with trio.move_on_after(timeout_seconds):
        while (pending := await trio.to_thread.run_sync(_read_unacknowledged, addresses)) > 0:
            log.debug("waiting for %d sent bytes to be acknowledged", pending)
            await trio.sleep(POLL_INTERVAL_SECONDS)
        return True
    return False
