"""The L3 filter on the WireGuard interface: an nftables table of tunneld's own.

How this works. The gateway is trusted to send requests to the proxy, not to roam the host or
its LAN; Linux, though, delivers a packet that arrives through the tunnel to *any* local socket
(a stray ``0.0.0.0`` listener, the host's LAN address) and forwards it onwards when
``ip_forward`` is on. So at bring-up tunneld installs one table, ``inet tunneld_<ifname>``:

- ``input`` (hook input): packets whose ``iifname`` is the tunnel jump to ``from_tunnel``, which
  accepts replies (conntrack ``established,related``: answers to the health probe and to the
  host's own outbound traffic, ICMP errors such as "packet too big"), TCP to the proxy's ports
  on the tunnel addresses, and ICMP echo requests to the tunnel addresses (an operator's first
  diagnostic from the gateway: ``ping 10.44.0.2``); everything else is counted and dropped;
- ``forward`` (hook forward): everything from or to the tunnel is dropped.

The health probe needs no rule of its own: tunneld sends it, so what comes back (an echo reply,
a SYN-ACK, an RST, an ICMP error) is ``established`` or ``related``.

Matching by interface *name* keeps the filter valid across a rebuild of the link (a new
ifindex), and lets it be installed before the link exists. The table is written in one
transaction that creates it (if absent), deletes it and fills it anew: a reload, or a start
after ``kill -9`` that finds the old table, replaces it atomically, with no moment unfiltered.
The table carries the interface's name, so daemons of different interfaces never touch each
other's; one daemon per interface is guaranteed by the interface lock (:mod:`tunneld.preflight`).

nftables rules only add restrictions here: an ``accept`` in our table does not override a
``drop`` in another table at the same hook, so a host's own firewall keeps the last word.

The binding is libnftables' JSON API (Debian ``libnftables1``, what ``nft`` and firewalld use)
through ctypes: :func:`ruleset` builds the JSON without I/O; :class:`Nftables` runs it. pyroute2's
nftables module (0.9.7) speaks raw expressions (registers, payload offsets) with no parser for
``ct state`` or ``iifname``: the ruleset would be hand-assembled bytecode.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import trio

from tunneld.errors import FirewallError, FirewallUnavailableError, PermissionError_
from tunneld.wireguard.model import IPAddress

log = logging.getLogger(__name__)

FAMILY = "inet"
TABLE_PREFIX = "tunneld_"
LIBRARY = "libnftables.so.1"
#: The chain that judges what arrives through the tunnel.
FROM_TUNNEL_CHAIN = "from_tunnel"

_NFT_CTX_DEFAULT = 0
_NFT_CTX_OUTPUT_JSON = 1 << 4  # enum nft_output_flags (nftables/libnftables.h)

Command = dict[str, Any]


@dataclass(frozen=True)
class FilterPlan:
    """What the filter lets in through ``ifname``: TCP to ``tcp_ports`` on ``addresses``."""

    ifname: str
    addresses: tuple[IPAddress, ...]
    tcp_ports: tuple[int, ...]


def table_name(ifname: str) -> str:
    """The table of the daemon that owns ``ifname``: ``tunneld_<ifname>``."""
    return f"{TABLE_PREFIX}{ifname}"


# --- the ruleset, without I/O -----------------------------------------------------------------


def _table(ifname: str) -> Command:
    return {"table": {"family": FAMILY, "name": table_name(ifname)}}


def _chain(ifname: str, name: str, hook: str | None = None) -> Command:
    chain: dict[str, Any] = {"family": FAMILY, "table": table_name(ifname), "name": name}
    if hook is not None:
        chain.update(type="filter", hook=hook, prio=0, policy="accept")
    return {"add": {"chain": chain}}


def _rule(ifname: str, chain: str, *expressions: Command) -> Command:
    rule = {
        "family": FAMILY,
        "table": table_name(ifname),
        "chain": chain,
        "expr": list(expressions),
    }
    return {"add": {"rule": rule}}


def _match(left: Command, right: object, op: str = "==") -> Command:
    return {"match": {"op": op, "left": left, "right": right}}


def _payload(protocol: str, field: str) -> Command:
    return {"payload": {"protocol": protocol, "field": field}}


def _one_or_set(values: Iterable[object]) -> object:
    items = list(values)
    return items[0] if len(items) == 1 else {"set": items}


_ACCEPT: Command = {"accept": None}
_DROP: Command = {"drop": None}


def ruleset(plan: FilterPlan) -> Command:
    """The whole transaction that installs (or atomically replaces) ``plan``'s table."""
    ifname = plan.ifname
    from_tunnel = _match({"meta": {"key": "iifname"}}, ifname)
    ports = sorted(set(plan.tcp_ports))
    accepts: list[Command] = [
        _rule(ifname, FROM_TUNNEL_CHAIN,
              _match({"ct": {"key": "state"}}, ["established", "related"], op="in"), _ACCEPT),
    ]  # fmt: skip
    for version, ip, icmp in ((4, "ip", "icmp"), (6, "ip6", "icmpv6")):
        addresses = sorted(str(a) for a in plan.addresses if a.version == version)
        if not addresses:
            continue
        to_us = _match(_payload(ip, "daddr"), _one_or_set(addresses))
        if ports:
            to_ports = _match(_payload("tcp", "dport"), _one_or_set(ports))
            accepts.append(_rule(ifname, FROM_TUNNEL_CHAIN, to_us, to_ports, _ACCEPT))
        echo = _match(_payload(icmp, "type"), "echo-request")
        accepts.append(_rule(ifname, FROM_TUNNEL_CHAIN, to_us, echo, _ACCEPT))
    commands: list[Command] = [
        {"metainfo": {"json_schema_version": 1}},
        # add + delete + add: one transaction replaces whatever table of ours is there.
        {"add": _table(ifname)},
        {"delete": _table(ifname)},
        {"add": _table(ifname)},
        _chain(ifname, "input", hook="input"),
        _chain(ifname, FROM_TUNNEL_CHAIN),
        _chain(ifname, "forward", hook="forward"),
        _rule(ifname, "input", from_tunnel, {"jump": {"target": FROM_TUNNEL_CHAIN}}),
        *accepts,
        _rule(ifname, FROM_TUNNEL_CHAIN, {"counter": None}, _DROP),
        _rule(ifname, "forward", from_tunnel, _DROP),
        _rule(ifname, "forward", _match({"meta": {"key": "oifname"}}, ifname), _DROP),
    ]
    return {"nftables": commands}


def removal(ifname: str) -> Command:
    """The transaction that deletes ``ifname``'s table (an error if there is none)."""
    return {"nftables": [{"delete": _table(ifname)}]}


def listing(ifname: str) -> Command:
    return {"nftables": [{"list": _table(ifname)}]}


# --- libnftables ------------------------------------------------------------------------------


class NftablesError(Exception):
    """libnftables refused a command; ``text`` is its error output."""

    def __init__(self, text: str) -> None:
        self.text = text
        super().__init__(text)

    @property
    def absent(self) -> bool:
        """The table (or the object named) does not exist."""
        return "No such file or directory" in self.text


@functools.cache
def _library() -> ctypes.CDLL:
    try:
        library = ctypes.CDLL(LIBRARY, use_errno=True)
    except OSError as exc:
        raise FirewallUnavailableError(
            f"cannot load {LIBRARY} ({exc}): tunneld's filter on the WireGuard interface needs "
            "libnftables; install it (Debian/Ubuntu: apt-get install libnftables1; Fedora: dnf "
            "install nftables), or set interface.firewall = false if this host filters the "
            "tunnel with a firewall of its own"
        ) from None
    library.nft_ctx_new.restype = ctypes.c_void_p
    library.nft_ctx_new.argtypes = [ctypes.c_uint32]
    library.nft_ctx_free.restype = None
    library.nft_ctx_free.argtypes = [ctypes.c_void_p]
    library.nft_ctx_output_set_flags.restype = None
    library.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
        getattr(library, name).restype = ctypes.c_int
        getattr(library, name).argtypes = [ctypes.c_void_p]
    for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
        getattr(library, name).restype = ctypes.c_char_p
        getattr(library, name).argtypes = [ctypes.c_void_p]
    library.nft_run_cmd_from_buffer.restype = ctypes.c_int
    library.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    return library


class Nftables:
    """One libnftables context per call (blocking: run it in a worker thread)."""

    def run(self, commands: Command) -> Command | None:
        """Run a JSON transaction; its JSON output (for ``list``), None if it printed nothing.

        :class:`NftablesError` with libnftables' own message if it refused.
        """
        library = _library()
        context = library.nft_ctx_new(_NFT_CTX_DEFAULT)
        if not context:
            raise FirewallError("libnftables could not create a context (out of memory?)")
        try:
            library.nft_ctx_output_set_flags(context, _NFT_CTX_OUTPUT_JSON)
            library.nft_ctx_buffer_output(context)
            library.nft_ctx_buffer_error(context)
            status = library.nft_run_cmd_from_buffer(context, json.dumps(commands).encode())
            output = (library.nft_ctx_get_output_buffer(context) or b"").decode(errors="replace")
            error = (library.nft_ctx_get_error_buffer(context) or b"").decode(errors="replace")
        finally:
            library.nft_ctx_free(context)
        if status != 0:
            raise NftablesError(error.strip() or f"libnftables failed (status {status})")
        return json.loads(output) if output.strip() else None


def translate(exc: NftablesError, action: str) -> Exception:
    """libnftables' message → the error a person can act on."""
    text = exc.text
    if "Operation not permitted" in text or "Permission denied" in text:
        return PermissionError_(
            f"{action}: permission denied; tunneld needs root or CAP_NET_ADMIN for its nftables "
            "filter on the WireGuard interface"
        )
    if "Protocol not supported" in text or "Operation not supported" in text:
        return FirewallUnavailableError(
            f"{action}: the kernel has no nf_tables ({text.splitlines()[0]}); load it "
            "(modprobe nf_tables) or use a kernel built with CONFIG_NF_TABLES, or set "
            "interface.firewall = false if this host filters the tunnel by other means"
        )
    return FirewallError(f"{action}: libnftables: {' / '.join(text.splitlines())}")


# --- the filter's lifetime --------------------------------------------------------------------


def _install(plan: FilterPlan, nftables: Nftables) -> None:
    try:
        nftables.run(ruleset(plan))
    except NftablesError as exc:
        raise translate(exc, f"installing the nftables filter of {plan.ifname}") from exc


def _remove(ifname: str, nftables: Nftables) -> bool:
    try:
        nftables.run(removal(ifname))
    except FirewallUnavailableError:
        return False  # no nftables here: nothing of ours can be there either
    except NftablesError as exc:
        error = translate(exc, f"removing the nftables filter of {ifname}")
        if exc.absent or isinstance(error, FirewallUnavailableError):
            return False
        raise error from exc
    return True


def _installed(ifname: str, nftables: Nftables) -> bool:
    try:
        nftables.run(listing(ifname))
    except NftablesError as exc:
        if exc.absent:
            return False
        raise translate(exc, f"reading the nftables filter of {ifname}") from exc
    return True


async def install_filter(plan: FilterPlan, nftables: Nftables | None = None) -> None:
    """Install ``plan``'s table, atomically replacing any table of ours for that interface."""
    await trio.to_thread.run_sync(_install, plan, nftables or Nftables())


async def remove_filter(ifname: str, nftables: Nftables | None = None) -> bool:
    """Delete ``ifname``'s table; True if there was one (False, too, without nftables)."""
    return await trio.to_thread.run_sync(_remove, ifname, nftables or Nftables())


async def filter_installed(ifname: str, nftables: Nftables | None = None) -> bool:
    """Whether ``ifname``'s table exists (someone's ``nft flush ruleset`` removes it)."""
    return await trio.to_thread.run_sync(_installed, ifname, nftables or Nftables())
