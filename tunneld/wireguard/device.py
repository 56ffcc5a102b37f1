"""Choosing a backend and owning the device's lifetime.

``backend = "auto"`` behaves like ``wg-quick``: kernel WireGuard when ``ip link add type
wireguard`` works, otherwise the userspace implementation. The interface name is ours: a device of
that name left by an earlier tunneld run (of either backend) is adopted or replaced, while a link
of that name that is anything else is refused rather than deleted.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal, Protocol

import trio

from tunneld.errors import BackendError
from tunneld.wireguard import kernel, userspace
from tunneld.wireguard.links import delete_link, link_kind
from tunneld.wireguard.model import DeviceConfig, DeviceStats

log = logging.getLogger(__name__)

BackendName = Literal["kernel", "userspace"]
TEARDOWN_TIMEOUT_SECONDS = 10.0


class Device(Protocol):
    """A configured WireGuard device, whichever implementation runs it."""

    backend_name: str
    ifname: str

    async def configure(self, config: DeviceConfig) -> None: ...

    async def stats(self) -> DeviceStats: ...


async def choose_backend(choice: str) -> BackendName:
    """Resolve ``auto`` to a concrete backend and log which one and why."""
    if choice == "kernel":
        return "kernel"
    if choice == "userspace":
        return "userspace"
    supported, reason = await kernel.kernel_supported()
    backend: BackendName = "kernel" if supported else "userspace"
    log.info("backend auto: using %s WireGuard (%s)", backend, reason)
    return backend


async def _clear_leftover(ifname: str, backend: BackendName) -> None:
    """Remove a device of ours that the chosen backend cannot adopt; refuse anyone else's link."""
    kind = await link_kind(ifname)
    if kind is None or (kind == "wireguard" and backend == "kernel"):
        return  # nothing there, or a kernel device the kernel backend adopts
    if kind == "wireguard" or await userspace.answers_uapi(ifname):
        log.info("replacing WireGuard device %s left behind by an earlier run", ifname)
        await userspace.remove_stale_device(ifname)
        return
    raise BackendError(
        f"interface {ifname} exists and is a {kind} link that tunneld did not create; "
        f"pick another [interface].name or remove it: ip link del {ifname}"
    )


async def delete_device(ifname: str) -> bool:
    """Tear down a device of ours, whichever backend made it; True if one existed."""
    kind = await link_kind(ifname)
    if kind is None:
        return False
    if kind == "wireguard":
        await delete_link(ifname)
    elif await userspace.answers_uapi(ifname):
        await userspace.remove_stale_device(ifname)
    else:
        raise BackendError(
            f"interface {ifname} is a {kind} link that tunneld did not create; not deleting it"
        )
    return True


@asynccontextmanager
async def open_device(
    ifname: str, backend_choice: str, userspace_binary: str, *, detach: bool = False
) -> AsyncIterator[Device]:
    """Create (or adopt) the device; on exit tear it down unless ``detach``.

    ``detach`` is for the one-shot ``tunneld up``: the device, and a userspace implementation's
    process, outlive us.
    """
    backend = await choose_backend(backend_choice)
    await _clear_leftover(ifname, backend)
    if backend == "userspace" and not detach:
        async with userspace.supervised_device(ifname, userspace_binary) as supervised:
            yield supervised
        return
    device: Device
    if backend == "userspace":
        device = await userspace.start_detached(ifname, userspace_binary)
    else:
        device = await kernel.open_kernel_device(ifname)
    if detach:
        yield device
        return
    try:
        yield device
    finally:
        with trio.move_on_after(TEARDOWN_TIMEOUT_SECONDS) as scope:
            scope.shield = True
            await delete_link(ifname)


async def existing_device(ifname: str) -> Device | None:
    """A handle on a running device of ours (for ``tunneld status``), or None if absent."""
    kind = await link_kind(ifname)
    if kind is None:
        return None
    if kind == "wireguard":
        return kernel.KernelDevice(ifname, kernel.PyrouteNetlink())
    if await userspace.answers_uapi(ifname):
        return userspace.UserspaceDevice(ifname)
    raise BackendError(f"interface {ifname} is a {kind} link, not a WireGuard device")
