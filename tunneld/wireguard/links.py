"""Addresses, MTU, link state and routes of the WireGuard interface (rtnetlink), for both backends.

How this works: the backends only create the device and speak WireGuard to it; everything an
``ip`` command would do afterwards lives here. :func:`converge_link` makes the link match the
config whatever state it was left in (a restart after ``kill -9`` finds it half-configured):
addresses not in config are removed, missing ones added, and routes are added for the gateway
peers' allowed IPs only — never a default route. Routes we add carry our own routing protocol
number (:data:`ROUTE_PROTOCOL`) so that later we remove exactly what we created and nothing else.

pyroute2's core runs its own asyncio loop bound to the thread that made the handle, so every call
here runs in the one netlink thread on its long-lived ``IPRoute`` handle
(:mod:`tunneld.wireguard.netlink_thread`): a health tick opens no descriptor.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pyroute2 import NetlinkError
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

from tunneld.errors import BackendError, PermissionError_
from tunneld.wireguard import netlink_thread
from tunneld.wireguard.model import IPNetwork

log = logging.getLogger(__name__)

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

#: ``proto`` of the routes tunneld installs (0x74, "t"); unused by iproute2's rt_protos.
ROUTE_PROTOCOL = 116
_MAIN_TABLE = 254
_IFF_UP = 0x1


@dataclass(frozen=True)
class LinkPlan:
    """The desired state of the interface's L3 side."""

    addresses: tuple[IPInterface, ...]
    mtu: int
    routes: tuple[IPNetwork, ...]


def routes_needed(
    addresses: Iterable[IPInterface], allowed_ips: Iterable[IPNetwork]
) -> tuple[IPNetwork, ...]:
    """The allowed IPs not already on-link through one of our own address prefixes.

    ``10.44.0.1/32`` needs no route when we hold ``10.44.0.2/24``: the kernel's connected route
    covers it, and adding one would only duplicate what ``ip addr`` already did.
    """
    on_link = [address.network for address in addresses]
    needed: list[IPNetwork] = []
    for network in allowed_ips:
        covered = any(
            network.version == prefix.version and network.subnet_of(prefix)  # type: ignore[arg-type]
            for prefix in on_link
        )
        if not covered and network not in needed:
            needed.append(network)
    return tuple(needed)


def _translate(exc: NetlinkError, action: str) -> Exception:
    if exc.code in (errno.EPERM, errno.EACCES):
        return PermissionError_(f"{action}: permission denied; tunneld needs root or CAP_NET_ADMIN")
    return BackendError(f"{action}: {exc.args[-1] if exc.args else exc} (errno {exc.code})")


def _index(ipr: Any, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def _link_kind(ifname: str) -> str | None:
    ipr = netlink_thread.iproute()
    index = _index(ipr, ifname)
    if index is None:
        return None
    link = ipr.get_links(index)[0]
    kind = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
    return str(kind) if kind else "unknown"


async def link_kind(ifname: str) -> str | None:
    """The kind of link ``ifname`` ("wireguard", "tun", "veth", ...), or None if absent."""
    try:
        return await netlink_thread.run_sync(_link_kind, ifname)
    except NetlinkError as exc:
        raise _translate(exc, f"looking up interface {ifname}") from exc


def _delete_link(ifname: str) -> bool:
    ipr = netlink_thread.iproute()
    index = _index(ipr, ifname)
    if index is None:
        return False
    try:
        ipr.link("del", index=index)
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:  # went away on its own meanwhile
            return False
        raise
    return True


async def delete_link(ifname: str) -> bool:
    """Delete ``ifname`` with everything on it; True if it existed."""
    try:
        return await netlink_thread.run_sync(_delete_link, ifname)
    except NetlinkError as exc:
        raise _translate(exc, f"deleting interface {ifname}") from exc


def _converge(ifname: str, plan: LinkPlan) -> None:
    ipr = netlink_thread.iproute()
    index = _index(ipr, ifname)
    if index is None:
        raise BackendError(f"interface {ifname} vanished while being configured")
    ipr.link("set", index=index, mtu=plan.mtu)
    _converge_addresses(ipr, index, plan.addresses)
    link = ipr.get_links(index)[0]
    if not link["flags"] & _IFF_UP:
        ipr.link("set", index=index, state="up")
    _converge_routes(ipr, ifname, index, plan.routes)


def _converge_addresses(ipr: Any, index: int, wanted: tuple[IPInterface, ...]) -> None:
    present: set[IPInterface] = set()
    for message in ipr.get_addr(index=index):
        address = ipaddress.ip_interface(f"{message.get('IFA_ADDRESS')}/{message['prefixlen']}")
        if address.is_link_local:
            continue  # the kernel's own fe80::, not ours to manage
        if address in wanted:
            present.add(address)
        else:
            log.info("removing stale address %s", address)
            ipr.addr(
                "del", index=index, address=str(address.ip), prefixlen=address.network.prefixlen
            )
    for address in wanted:
        if address in present:
            continue
        # NODAD: a tunnel address cannot collide, and DAD would leave it "tentative" (unbindable)
        # for a second or two after every start.
        flags = IFA_F_NODAD if address.version == 6 else 0
        ipr.addr(
            "add",
            index=index,
            address=str(address.ip),
            prefixlen=address.network.prefixlen,
            flags=flags,
        )


def _converge_routes(ipr: Any, ifname: str, index: int, wanted: tuple[IPNetwork, ...]) -> None:
    present: set[IPNetwork] = set()
    for family in (socket.AF_INET, socket.AF_INET6):
        for message in ipr.get_routes(family=family, oif=index, table=_MAIN_TABLE):
            if message["proto"] != ROUTE_PROTOCOL:
                continue
            network = ipaddress.ip_network(f"{message.get('RTA_DST')}/{message['dst_len']}")
            if network in wanted:
                present.add(network)
            else:
                log.info("removing stale route %s dev %s", network, ifname)
                ipr.route("del", dst=str(network), oif=index, proto=ROUTE_PROTOCOL, family=family)
    for network in wanted:
        if network in present:
            continue
        family = socket.AF_INET6 if network.version == 6 else socket.AF_INET
        try:
            ipr.route("add", dst=str(network), oif=index, proto=ROUTE_PROTOCOL, family=family)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
            # Someone else's route to the same prefix. Overriding it could cut the host off a
            # network it needs, so refuse and say where the conflict is.
            raise BackendError(
                f"a route to {network} already exists outside {ifname}; tunneld will not override "
                f"it. Check `ip route show {network}` and the gateway's allowed_ips"
            ) from exc


async def converge_link(ifname: str, plan: LinkPlan) -> None:
    """Make ``ifname``'s MTU, addresses, state and routes match ``plan``."""
    try:
        await netlink_thread.run_sync(_converge, ifname, plan)
    except NetlinkError as exc:
        raise _translate(exc, f"configuring interface {ifname}") from exc
