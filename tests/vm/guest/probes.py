"""Functions that :func:`tests.vm.guest.launcher.call` runs in a namespace, importable by name.

Kept apart from the test modules so that a forked child imports only tunneld (preloaded in the
forkserver) and not pytest. Results cross a pipe, so they are plain picklable values.
"""

from __future__ import annotations

from typing import Any

import trio
from pyroute2 import WireGuard

from tunneld.wireguard import kernel


def netlink(method: str, *args: Any, **kwargs: Any) -> Any:
    """One call on the production seam, :class:`tunneld.wireguard.kernel.PyrouteNetlink`."""
    return getattr(kernel.PyrouteNetlink(), method)(*args, **kwargs)


def open_kernel_device(ifname: str) -> str:
    return repr(trio.run(kernel.open_kernel_device, ifname))


def delete_kernel_device(ifname: str) -> bool:
    return trio.run(kernel.delete_kernel_device, ifname)


def kernel_supported() -> tuple[bool, str]:
    return trio.run(kernel.kernel_supported)


def dump_message_count(ifname: str) -> int:
    """How many messages the kernel's device dump takes (pyroute2 directly: a test premise)."""
    with WireGuard() as wg:
        return len(tuple(wg.info(ifname)))
