"""The kernel WireGuard backend: ``ip link add type wireguard`` plus WireGuard's generic netlink.

How this works
--------------
Everything that talks to the kernel goes through :class:`Netlink`, a narrow synchronous seam of
seven operations; :class:`PyrouteNetlink` implements it with pyroute2 and is the only code here
that touches pyroute2 (untyped, so ``Any`` stays inside that class). pyroute2's core runs its own
asyncio loop bound to the thread that made the handle, so every seam call runs in the one netlink
thread on its long-lived ``IPRoute``/``WireGuard`` handles (:mod:`tunneld.wireguard.netlink_thread`:
reading the device's stats at every health tick opens no descriptor). A started call is not
abandoned on cancellation (each is one short netlink request), so a cancelled
:meth:`KernelDevice.configure` stops between steps and the next one converges from there.

:meth:`KernelDevice.configure` converges the device on a :class:`DeviceConfig` instead of
replacing it: the kernel's ``WGDEVICE_F_REPLACE_PEERS`` flag would do that in one message, but
pyroute2's ``WireGuard.set`` cannot send it and carries one peer per call. So configure

1. sets private key, fwmark and (when configured) listen port — the kernel skips unchanged ones;
2. sets every desired peer exactly: allowed IPs replaced, preshared key set or cleared (an
   all-zero key clears it), keepalive set, endpoint set when configured. Existing sessions survive;
3. reads the device back and removes every peer that is not desired.

Desired peers go in before stale ones go out, so an allowed IP moving from one peer to another
never has a moment without an owner. Running configure twice with the same config removes nothing.

The kernel may split a device dump over several messages: the device attributes come in the first,
peers continue in the following ones, and a peer with many allowed IPs continues in the next
message under the same public key. :meth:`PyrouteNetlink.wg_info` merges them, and reads again
when the kernel flags the dump as interrupted by a concurrent change, as ``wg`` does.
"""

from __future__ import annotations

import binascii
import errno
import ipaddress
import logging
import os
import secrets
import struct
from base64 import b64decode, b64encode
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from typing import Any, Protocol

import trio
from pyroute2 import NetlinkError
from pyroute2.netlink import NLM_F_DUMP_INTR

from tunneld.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigError,
    PermissionError_,
    TunneldError,
)
from tunneld.wireguard import netlink_thread
from tunneld.wireguard.model import (
    KEY_LEN,
    DeviceConfig,
    DeviceStats,
    Endpoint,
    PeerConfig,
    PeerStats,
)

log = logging.getLogger(__name__)

WIREGUARD_KIND = "wireguard"
#: ``link_kind`` of a link that reports no kind at all: physical NICs, loopback.
NO_KIND = ""
#: Prefix of :func:`kernel_supported`'s throwaway interface ("tdprobe" + 6 hex digits: 13 bytes).
PROBE_PREFIX = "tdprobe"
PROBE_CLEANUP_TIMEOUT_SECONDS = 5.0
IFNAMSIZ = 16  # including the terminating NUL: names are at most 15 bytes

_ZERO_KEY = bytes(KEY_LEN)


class Netlink(Protocol):
    """The synchronous kernel operations the backend needs (called in the netlink thread).

    Implementations raise only :class:`~tunneld.errors.TunneldError` subclasses:
    :class:`PermissionError_` for a missing privilege, :class:`BackendUnavailableError` when the
    kernel has no WireGuard, :class:`BackendError` for anything else. Messages never carry keys.
    """

    def link_kind(self, ifname: str) -> str | None:
        """The link's kind ("wireguard", "veth", ...), :data:`NO_KIND` if none, None if absent."""
        ...

    def link_add_wireguard(self, ifname: str) -> None:
        """Create a WireGuard link; :class:`BackendUnavailableError` if the kernel cannot."""
        ...

    def link_delete(self, ifname: str) -> bool:
        """Delete the link; False if there was none."""
        ...

    def wg_set_device(
        self, ifname: str, *, private_key: bytes, listen_port: int | None, fwmark: int
    ) -> None:
        """Set the device's identity; ``listen_port=None`` leaves the current port alone."""
        ...

    def wg_set_peer(self, ifname: str, peer: PeerConfig) -> None:
        """Create or update a peer to match ``peer`` exactly (allowed IPs replaced, preshared key
        cleared when None); an endpoint of None leaves the kernel's endpoint alone."""
        ...

    def wg_remove_peer(self, ifname: str, public_key: bytes) -> None:
        """Remove a peer; removing an absent peer is not an error."""
        ...

    def wg_info(self, ifname: str) -> DeviceStats:
        """The device's state, merged from however many dump messages the kernel sent."""
        ...


def _errno_text(code: int, detail: str) -> str:
    # errno.errorcode[95] is "ENOTSUP"; the kernel (and its docs) call it EOPNOTSUPP.
    name = "EOPNOTSUPP" if code == errno.EOPNOTSUPP else errno.errorcode.get(code, f"errno {code}")
    return f"{name}, {detail or os.strerror(code)}"


class PyrouteNetlink:
    """:class:`Netlink` through pyroute2's long-lived handles of the calling thread. Blocks: call
    it through :func:`tunneld.wireguard.netlink_thread.run_sync`."""

    #: Reads of a device dump before giving up when the kernel keeps flagging it as interrupted.
    DUMP_ATTEMPTS = 3
    #: A peer's allowed IPs travel in one netlink attribute, whose 16-bit length caps it at
    #: 64 KiB: ~2300 IPv4 or ~1600 IPv6 entries. Larger sets go in several messages, as wg(8)
    #: does: the first replaces, the later ones append.
    ALLOWED_IPS_PER_MESSAGE = 1000

    # -- rtnetlink ---------------------------------------------------------------------------

    def link_kind(self, ifname: str) -> str | None:
        with self._translated(f"looking up interface {ifname}"):
            try:
                links = netlink_thread.iproute().link("get", ifname=ifname)
            except NetlinkError as exc:
                if exc.code == errno.ENODEV:
                    return None
                raise
            if not links:
                return None
            kind = links[0].get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
            return str(kind) if kind else NO_KIND

    def link_add_wireguard(self, ifname: str) -> None:
        operation = f"creating WireGuard interface {ifname}"
        try:
            netlink_thread.iproute().link("add", ifname=ifname, kind=WIREGUARD_KIND)
        except NetlinkError as exc:
            if exc.code == errno.EOPNOTSUPP:
                raise BackendUnavailableError(
                    f"kernel has no WireGuard module ({operation}: "
                    f"{_errno_text(exc.code, self._detail(exc))}); load it with "
                    '`modprobe wireguard`, or set [interface].backend = "userspace"'
                ) from exc
            raise self._translate(exc, operation) from exc

    def link_delete(self, ifname: str) -> bool:
        with self._translated(f"deleting interface {ifname}"):
            try:
                netlink_thread.iproute().link("del", ifname=ifname)
            except NetlinkError as exc:
                if exc.code == errno.ENODEV:
                    return False
                raise
            return True

    # -- WireGuard generic netlink -----------------------------------------------------------

    def wg_set_device(
        self, ifname: str, *, private_key: bytes, listen_port: int | None, fwmark: int
    ) -> None:
        with self._translated(f"setting WireGuard device {ifname}", wireguard=ifname):
            netlink_thread.wireguard().set(
                ifname,
                private_key=_b64(private_key),
                listen_port=listen_port,
                fwmark=fwmark,
            )

    def wg_set_peer(self, ifname: str, peer: PeerConfig) -> None:
        allowed_ips = [str(network) for network in peer.allowed_ips]
        chunk = self.ALLOWED_IPS_PER_MESSAGE
        spec: dict[str, Any] = {
            "public_key": _b64(peer.public_key),
            # The kernel stores whatever key it is given; all zeros means "none" (as `wg` does).
            "preshared_key": _b64(peer.preshared_key or _ZERO_KEY),
            "persistent_keepalive": peer.persistent_keepalive_seconds,
            "replace_allowed_ips": True,
            "allowed_ips": allowed_ips[:chunk],
        }
        if peer.endpoint is not None:
            spec["endpoint_addr"] = str(peer.endpoint.address)
            spec["endpoint_port"] = peer.endpoint.port
        with self._translated(f"setting a peer of WireGuard device {ifname}", wireguard=ifname):
            wg = netlink_thread.wireguard()
            wg.set(ifname, peer=spec)
            # The rest in further messages: without replace_allowed_ips the kernel appends.
            for start in range(chunk, len(allowed_ips), chunk):
                more = {
                    "public_key": spec["public_key"],
                    "allowed_ips": allowed_ips[start : start + chunk],
                }
                wg.set(ifname, peer=more)

    def wg_remove_peer(self, ifname: str, public_key: bytes) -> None:
        spec = {"public_key": _b64(public_key), "remove": True}
        with self._translated(f"removing a peer from WireGuard device {ifname}", wireguard=ifname):
            netlink_thread.wireguard().set(ifname, peer=spec)

    def wg_info(self, ifname: str) -> DeviceStats:
        operation = f"reading WireGuard device {ifname}"
        for _attempt in range(self.DUMP_ATTEMPTS):
            with self._translated(operation, wireguard=ifname):
                messages = tuple(netlink_thread.wireguard().info(ifname))
            if not any(msg["header"].get("flags", 0) & NLM_F_DUMP_INTR for msg in messages):
                return self._parse_info(messages, operation)
        raise BackendError(
            f"{operation}: the kernel reported the dump interrupted {self.DUMP_ATTEMPTS} times "
            "in a row (the device kept changing); try again"
        )

    # -- helpers (the only functions that see pyroute2 objects) ------------------------------

    @staticmethod
    def _detail(exc: Any) -> str:
        # NetlinkError(code, msg): msg is the kernel's extended-ack text or strerror(code).
        return str(exc.args[1]) if len(exc.args) > 1 and exc.args[1] else ""

    @classmethod
    def _translate(cls, exc: Any, operation: str, *, wireguard: str | None = None) -> TunneldError:
        code = int(exc.code) if isinstance(exc.code, int) else -1
        what = f"{operation} failed ({_errno_text(code, cls._detail(exc))})"
        if code in (errno.EPERM, errno.EACCES):
            return PermissionError_(f"{what}: this needs root or CAP_NET_ADMIN")
        if wireguard is not None and code == errno.ENOENT:
            # The generic netlink family lookup failed: no "wireguard" family registered.
            return BackendUnavailableError(
                f"{what}: kernel has no WireGuard module (no 'wireguard' generic netlink family); "
                'load it with `modprobe wireguard`, or set [interface].backend = "userspace"'
            )
        if wireguard is not None and code == errno.EOPNOTSUPP:
            return BackendError(f"{what}: {wireguard} is not a WireGuard interface")
        if code == errno.ENODEV:
            return BackendError(f"{what}: no such interface")
        return BackendError(what)

    @classmethod
    @contextmanager
    def _translated(cls, operation: str, *, wireguard: str | None = None) -> Iterator[None]:
        """Turn pyroute2's and the socket layer's errors into tunneld's, naming ``operation``."""
        try:
            yield
        except NetlinkError as exc:
            raise cls._translate(exc, operation, wireguard=wireguard) from exc
        except OSError as exc:
            raise cls._translate(
                NetlinkError(exc.errno or 0, exc.strerror), operation, wireguard=wireguard
            ) from exc
        except (struct.error, ValueError) as exc:  # pyroute2 could not encode the request
            raise BackendError(f"{operation}: could not encode the netlink request: {exc}") from exc

    @classmethod
    def _parse_info(cls, messages: Sequence[Any], operation: str) -> DeviceStats:
        if not messages:
            raise BackendError(f"{operation}: the kernel sent an empty reply")
        try:
            return cls._merge_info(messages)
        except (KeyError, TypeError, ValueError, AttributeError, binascii.Error) as exc:
            raise BackendError(
                f"{operation}: could not understand the kernel's reply "
                f"({type(exc).__name__}: {exc})"
            ) from exc

    @classmethod
    def _merge_info(cls, messages: Sequence[Any]) -> DeviceStats:
        # The device attributes come in the first message only; peers may continue in later
        # ones, and a peer whose allowed IPs did not fit continues under the same public key.
        # The device's private key is in the reply too: it is never read.
        public_key: bytes | None = None
        listen_port: int | None = None
        fwmark: int | None = None
        peers: dict[bytes, PeerStats] = {}
        for msg in messages:
            key_attr = msg.get_attr("WGDEVICE_A_PUBLIC_KEY")  # absent until a key is set
            if public_key is None and key_attr is not None:
                public_key = _key_from_attr(key_attr)
            port_attr = msg.get_attr("WGDEVICE_A_LISTEN_PORT")
            if listen_port is None and port_attr is not None:
                listen_port = int(port_attr)
            fwmark_attr = msg.get_attr("WGDEVICE_A_FWMARK")
            if fwmark is None and fwmark_attr is not None:
                fwmark = int(fwmark_attr)
            for peer_attr in msg.get_attr("WGDEVICE_A_PEERS") or ():
                peer = cls._parse_peer(peer_attr)
                earlier = peers.get(peer.public_key)
                if earlier is None:
                    peers[peer.public_key] = peer
                else:
                    peers[peer.public_key] = replace(
                        earlier, allowed_ips=earlier.allowed_ips + peer.allowed_ips
                    )
        return DeviceStats(
            public_key=public_key,
            listen_port=listen_port or 0,
            fwmark=fwmark or 0,
            peers=tuple(peers.values()),
        )

    @staticmethod
    def _parse_peer(peer: Any) -> PeerStats:
        endpoint = None
        endpoint_attr = peer.get_attr("WGPEER_A_ENDPOINT")
        if endpoint_attr is not None:
            # pyroute2 ignores the IPv6 scope id's byte order; a scope is dropped here.
            endpoint = Endpoint(
                ipaddress.ip_address(str(endpoint_attr["addr"])), int(endpoint_attr["port"])
            )
        last_handshake = None
        handshake_attr = peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
        if handshake_attr is not None:
            seconds, nanoseconds = int(handshake_attr["tv_sec"]), int(handshake_attr["tv_nsec"])
            if seconds or nanoseconds:  # zero means "never"
                last_handshake = seconds + nanoseconds / 1e9
        preshared_attr = peer.get_attr("WGPEER_A_PRESHARED_KEY")
        return PeerStats(
            public_key=_key_from_attr(peer.get_attr("WGPEER_A_PUBLIC_KEY")),
            endpoint=endpoint,
            last_handshake_unix_seconds=last_handshake,
            receive_bytes=int(peer.get_attr("WGPEER_A_RX_BYTES") or 0),
            transmit_bytes=int(peer.get_attr("WGPEER_A_TX_BYTES") or 0),
            persistent_keepalive_seconds=int(
                peer.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0
            ),
            allowed_ips=tuple(
                ipaddress.ip_network(str(allowed["addr"]), strict=False)
                for allowed in peer.get_attr("WGPEER_A_ALLOWEDIPS") or ()
            ),
            has_preshared_key=(
                preshared_attr is not None and _key_from_attr(preshared_attr) != _ZERO_KEY
            ),
        )


def _b64(key: bytes) -> str:
    return b64encode(key).decode("ascii")


def _key_from_attr(value: object) -> bytes:
    """A 32-byte key from pyroute2's decoded key attribute: base64 bytes, or a dict of them."""
    if isinstance(value, dict):
        value = value["value"]
    if not isinstance(value, bytes | str):
        raise TypeError(f"expected a base64 key, got {type(value).__name__}")
    key = b64decode(value, validate=True)
    if len(key) != KEY_LEN:
        raise ValueError(f"key of {len(key)} bytes, expected {KEY_LEN}")
    return key


def check_ifname(ifname: str) -> None:
    """Refuse a name Linux would refuse (``dev_valid_name``), with a message that says why."""
    encoded = ifname.encode()
    if (
        not 0 < len(encoded) < IFNAMSIZ
        or ifname in (".", "..")
        or any(char in "/:" or char.isspace() for char in ifname)
    ):
        raise ConfigError(
            f"[interface].name {ifname!r} is not a valid Linux interface name: it needs 1 to "
            f"{IFNAMSIZ - 1} bytes without '/', ':' or whitespace, and cannot be '.' or '..'"
        )


class KernelDevice:
    """A kernel WireGuard interface; :meth:`configure` converges it on a :class:`DeviceConfig`."""

    backend_name = "kernel"

    def __init__(self, ifname: str, netlink: Netlink) -> None:
        self.ifname = ifname
        self._netlink = netlink
        self._configure_lock = trio.Lock()

    def __repr__(self) -> str:
        return f"KernelDevice({self.ifname!r})"

    async def configure(self, config: DeviceConfig) -> None:
        """Make the device's WireGuard state equal ``config`` (see the module docstring)."""
        netlink = self._netlink
        async with self._configure_lock:
            await netlink_thread.run_sync(
                partial(
                    netlink.wg_set_device,
                    self.ifname,
                    private_key=config.private_key,
                    listen_port=config.listen_port,
                    fwmark=config.fwmark,
                )
            )
            for peer in config.peers:
                await netlink_thread.run_sync(netlink.wg_set_peer, self.ifname, peer)
            current = await netlink_thread.run_sync(netlink.wg_info, self.ifname)
            wanted = {peer.public_key for peer in config.peers}
            stale = [peer.public_key for peer in current.peers if peer.public_key not in wanted]
            for public_key in stale:
                await netlink_thread.run_sync(netlink.wg_remove_peer, self.ifname, public_key)
        log.debug(
            "configured WireGuard interface %s: %d peer(s) set, %d stale peer(s) removed",
            self.ifname,
            len(config.peers),
            len(stale),
        )

    async def stats(self) -> DeviceStats:
        """The device's current state as the kernel reports it."""
        return await netlink_thread.run_sync(self._netlink.wg_info, self.ifname)

    async def close(self) -> None:
        """Nothing to release: the interface outlives this object (:func:`delete_kernel_device`)."""


async def open_kernel_device(ifname: str, *, netlink: Netlink | None = None) -> KernelDevice:
    """Adopt the WireGuard interface ``ifname`` if it exists, otherwise create it.

    A link of that name that is not WireGuard is refused, never deleted.
    """
    check_ifname(ifname)
    netlink = netlink if netlink is not None else PyrouteNetlink()
    kind = await netlink_thread.run_sync(netlink.link_kind, ifname)
    if kind == WIREGUARD_KIND:
        log.info("adopting existing WireGuard interface %s", ifname)
    elif kind is None:
        await netlink_thread.run_sync(netlink.link_add_wireguard, ifname)
        log.info("created WireGuard interface %s", ifname)
    elif kind == NO_KIND:
        raise BackendError(
            f"interface {ifname} exists and is a physical or loopback device, not WireGuard; "
            "pick another [interface].name"
        )
    else:
        raise BackendError(
            f"interface {ifname} exists and is a {kind} link, not WireGuard; pick another "
            f"[interface].name or delete it: ip link del {ifname}"
        )
    return KernelDevice(ifname, netlink)


async def delete_kernel_device(ifname: str, *, netlink: Netlink | None = None) -> bool:
    """Delete the WireGuard interface ``ifname``; False if there was none.

    A link of that name that is not WireGuard is refused, never deleted.
    """
    check_ifname(ifname)
    netlink = netlink if netlink is not None else PyrouteNetlink()
    kind = await netlink_thread.run_sync(netlink.link_kind, ifname)
    if kind is None:
        return False
    if kind != WIREGUARD_KIND:
        raise BackendError(
            f"interface {ifname} is a {kind or 'physical or loopback'} link, not WireGuard; "
            "not deleting it"
        )
    deleted = await netlink_thread.run_sync(netlink.link_delete, ifname)
    if deleted:
        log.info("deleted WireGuard interface %s", ifname)
    return deleted


async def kernel_supported(netlink: Netlink | None = None) -> tuple[bool, str]:
    """Whether the kernel can run WireGuard, and why (for logs): probe with a throwaway link.

    Creates ``tdprobe`` + 6 random hex digits, reads it over WireGuard's generic netlink (which
    proves the module answers there too) and deletes it. A missing module gives ``(False,
    reason)``; a missing privilege raises :class:`PermissionError_`, because it is not an answer.
    """
    netlink = netlink if netlink is not None else PyrouteNetlink()
    probe = PROBE_PREFIX + secrets.token_hex(3)
    try:
        await netlink_thread.run_sync(netlink.link_add_wireguard, probe)
    except BackendUnavailableError as exc:
        return False, str(exc)
    try:
        kind = await netlink_thread.run_sync(netlink.link_kind, probe)
        if kind != WIREGUARD_KIND:
            return False, f"the kernel made probe interface {probe} a {kind!r} link, not WireGuard"
        await netlink_thread.run_sync(netlink.wg_info, probe)
    except BackendUnavailableError as exc:
        return False, str(exc)
    finally:
        await _delete_probe(netlink, probe)
    return True, "kernel WireGuard available"


async def _delete_probe(netlink: Netlink, probe: str) -> None:
    # Runs even when the probe was cancelled: shielded, but bounded.
    with trio.move_on_after(PROBE_CLEANUP_TIMEOUT_SECONDS, shield=True) as scope:
        try:
            await netlink_thread.run_sync(netlink.link_delete, probe)
        except TunneldError as exc:
            log.warning(
                "could not delete probe interface %s (%s); ip link del %s", probe, exc, probe
            )
    if scope.cancelled_caught:
        log.warning("timed out deleting probe interface %s; ip link del %s", probe, probe)
