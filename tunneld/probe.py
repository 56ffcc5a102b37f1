"""Active probes through the tunnel: one ICMP echo, or one TCP connect (the I/O side of health).

How this works. A probe sends one packet to the gateway's tunnel address from a socket bound
(``SO_BINDTODEVICE``) to the WireGuard device, so it can only leave through the tunnel — never
by another route to the same address — and returns the round-trip time, or raises
:class:`ProbeError`. The verdict (how many failures make a peer down) is ``tunneld.health``'s.

ICMP: a *datagram* ICMP socket ("ping socket") needs no capability, but the process's group must
lie inside ``net.ipv4.ping_group_range`` (which covers ICMPv6 too). That range is per network
namespace and the kernel's default is ``1 0`` — nobody, root included — in every new namespace:
a container's, unless the runtime widens it (Docker does), and the host's, unless something
widens it at boot (systemd's sysctl defaults do). When the datagram socket is refused, a *raw*
ICMP socket is used, which needs ``CAP_NET_RAW``. With neither, :class:`PermissionError_` says
which to grant. A raw socket sees every ICMP message arriving on the device, so replies are
matched by identifier, sequence number and a random payload; a datagram socket gets only its
own (and learns of ICMP errors through ``IP_RECVERR``). An ICMP error about our request
(destination unreachable) fails the probe at once.

``SO_BINDTODEVICE`` itself needs no capability since Linux 5.7 (``CAP_NET_RAW`` before).

TCP: a connect. A refusal (RST, or ICMP port unreachable) is a *success*: it proves the packet
crossed the tunnel and the gateway answered. Only a timeout or an unreachable network fails.

A probe that cannot get a socket because this process is out of descriptors (``EMFILE``, see
:mod:`tunneld.fdlimit`) says nothing about the gateway: the ``OSError`` is raised as it is, not as
a :class:`ProbeError`, and the supervisor skips that tick.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import secrets
import socket
import struct
from typing import Literal

import trio

from tunneld.config_health import HealthConfig
from tunneld.errors import PermissionError_, TunneldError
from tunneld.fdlimit import EXHAUSTION_ERRNOS
from tunneld.wireguard.model import IPAddress

IcmpSocketKind = Literal["datagram", "raw"]
ProbeFailure = Literal["timeout", "unreachable", "no-device", "error"]

ICMP_ECHO_REPLY, ICMP_DEST_UNREACH, ICMP_ECHO_REQUEST, ICMP_TIME_EXCEEDED = 0, 3, 8, 11
ICMP6_DEST_UNREACH, ICMP6_TIME_EXCEEDED, ICMP6_ECHO_REQUEST, ICMP6_ECHO_REPLY = 1, 3, 128, 129
_ERRORS = {4: (ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED), 6: (ICMP6_DEST_UNREACH, ICMP6_TIME_EXCEEDED)}
_REQUEST = {4: ICMP_ECHO_REQUEST, 6: ICMP6_ECHO_REQUEST}
_REPLY = {4: ICMP_ECHO_REPLY, 6: ICMP6_ECHO_REPLY}
IPV6_HEADER_BYTES = 40
TOKEN_BYTES = 16
RECEIVE_BYTES = 2048

# Raw-socket filters (linux/icmp.h, linux/icmpv6.h): a set bit drops that ICMP type.
_SOL_RAW, _ICMP_FILTER, _ICMP6_FILTER = 255, 1, 1
# linux/in.h, linux/in6.h; Python has no names for them.
_IP_RECVERR, _IPV6_RECVERR = 11, 25
# errnos meaning "the network says no" (WireGuard answers ENOKEY for an address of no peer,
# EDESTADDRREQ for a peer without endpoint); a blackhole route gives EINVAL.
_UNREACHABLE = frozenset({
    errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENETDOWN, errno.ENOKEY,
    errno.EDESTADDRREQ, errno.EINVAL, errno.EACCES, errno.EPERM, errno.EADDRNOTAVAIL,
})  # fmt: skip


class ProbeError(TunneldError):
    """A probe got no answer in time, or the network refused it.

    ``kind`` is a short, bounded label for logs and metrics: ``timeout``, ``unreachable``,
    ``no-device`` (the WireGuard interface is gone) or ``error``.
    """

    def __init__(self, kind: ProbeFailure, message: str) -> None:
        self.kind = kind
        super().__init__(message)


# --- the probes -----------------------------------------------------------------------------


async def probe_gateway(health: HealthConfig, address: IPAddress, *, ifname: str) -> float:
    """The probe that ``health`` configures, sent to ``address`` through ``ifname``.

    Round-trip seconds; :class:`ProbeError` if it failed. ``health.probe`` must not be "none".
    """
    timeout = health.probe_timeout_seconds
    if health.probe == "icmp":
        return await icmp_probe(address, ifname=ifname, timeout_seconds=timeout)
    if health.probe == "tcp" and health.probe_port is not None:
        return await tcp_probe(address, health.probe_port, ifname=ifname, timeout_seconds=timeout)
    raise ValueError(f"no probe to run: health.probe is {health.probe_spec!r}")


async def icmp_probe(
    address: IPAddress | str, *, ifname: str | None, timeout_seconds: float
) -> float:
    """One ICMP echo to ``address`` from a socket bound to ``ifname`` (None: unbound).

    Round-trip seconds. :class:`ProbeError` on no reply within ``timeout_seconds`` or an
    unreachable destination; :class:`PermissionError_` if ICMP sockets are not allowed at all.
    """
    target = _address(address)
    sock, kind = open_icmp_socket(target.version)
    with sock:
        _bind_to_device(sock, ifname)
        if kind == "raw":
            _filter_replies(sock, target.version)
        else:  # without it, Linux does not report ICMP errors to a ping socket (seen on 6.x)
            level, option = (
                (socket.IPPROTO_IP, _IP_RECVERR)
                if target.version == 4
                else (socket.IPPROTO_IPV6, _IPV6_RECVERR)
            )
            sock.setsockopt(level, option, 1)
        identifier, sequence = secrets.randbelow(0x10000), secrets.randbelow(0x10000)
        token = secrets.token_bytes(TOKEN_BYTES)
        packet = echo_request(target.version, identifier, sequence, token)
        with trio.move_on_after(timeout_seconds):
            try:
                started = trio.current_time()
                if kind == "datagram":
                    await sock.connect((str(target), 0))  # then ICMP errors arrive as errno
                    await sock.send(packet)
                else:  # unconnected: errors come from routers, not from the target
                    await sock.sendto(packet, (str(target), 0))
                while True:  # ends with the reply, an error, or the deadline
                    data = await sock.recv(RECEIVE_BYTES)
                    verdict = classify_icmp(
                        data,
                        version=target.version,
                        with_ip_header=kind == "raw" and target.version == 4,
                        identifier=identifier if kind == "raw" else None,
                        sequence=sequence,
                        token=token,
                    )
                    if verdict == "reply":
                        return trio.current_time() - started
                    if verdict is not None:
                        raise ProbeError("unreachable", f"ping {target}: {verdict}")
            except OSError as exc:
                raise _probe_error(f"ping {target}", exc) from None
        raise ProbeError("timeout", f"ping {target}: no reply within {timeout_seconds:g}s")


async def tcp_probe(
    address: IPAddress | str, port: int, *, timeout_seconds: float, ifname: str | None = None
) -> float:
    """A TCP connect to ``address:port`` (from a socket bound to ``ifname``, if given).

    Round-trip seconds of the handshake — or of the refusal, which counts as an answer.
    :class:`ProbeError` on a timeout or an unreachable destination.
    """
    target = _address(address)
    family = socket.AF_INET if target.version == 4 else socket.AF_INET6
    where = f"{target}:{port}" if target.version == 4 else f"[{target}]:{port}"
    with trio.socket.socket(family, socket.SOCK_STREAM) as sock:
        _bind_to_device(sock, ifname)
        started = trio.current_time()
        with trio.move_on_after(timeout_seconds):
            try:
                await sock.connect((str(target), port))
            except ConnectionRefusedError:
                pass  # the gateway answered: the tunnel works
            except OSError as exc:
                raise _probe_error(f"connect {where}", exc) from None
            return trio.current_time() - started
        raise ProbeError("timeout", f"connect {where}: no answer within {timeout_seconds:g}s")


# --- sockets --------------------------------------------------------------------------------


def open_icmp_socket(version: int) -> tuple[trio.socket.SocketType, IcmpSocketKind]:
    """A datagram ICMP socket if this process may have one, else a raw one.

    :class:`PermissionError_` if neither is allowed; :class:`ProbeError` if the address family
    is not available at all (e.g. IPv6 disabled).
    """
    sock, kind = _icmp_socket(version)
    return trio.socket.from_stdlib_socket(sock), kind


def icmp_socket_kind(version: int = 4) -> IcmpSocketKind:
    """Which ICMP socket the probe would use here; :class:`PermissionError_` if none. A
    preflight check (no trio needed), so a missing capability is reported once, at start."""
    sock, kind = _icmp_socket(version)
    sock.close()
    return kind


def _icmp_socket(version: int) -> tuple[socket.socket, IcmpSocketKind]:
    family, protocol = (
        (socket.AF_INET, socket.IPPROTO_ICMP)
        if version == 4
        else (socket.AF_INET6, socket.IPPROTO_ICMPV6)
    )
    try:
        return socket.socket(family, socket.SOCK_DGRAM, protocol), "datagram"
    except OSError as exc:
        if exc.errno in EXHAUSTION_ERRNOS:
            raise  # not the gateway's doing: the caller skips this round
        # EACCES: the group is outside ping_group_range; or no ping sockets in this kernel
    try:
        return socket.socket(family, socket.SOCK_RAW, protocol), "raw"
    except PermissionError as exc:
        raise PermissionError_(
            "the ICMP probe needs CAP_NET_RAW, or this process's group inside "
            "net.ipv4.ping_group_range (kernel default: none in a new network namespace); "
            'grant one (systemd: AmbientCapabilities=CAP_NET_RAW), or set health.probe = "tcp:PORT"'
            ' or "none"'
        ) from exc
    except OSError as exc:
        if exc.errno in EXHAUSTION_ERRNOS:
            raise
        raise _probe_error(f"ICMPv{6 if version == 6 else 4} socket", exc) from None


def _bind_to_device(sock: trio.socket.SocketType, ifname: str | None) -> None:
    if ifname is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
    except PermissionError as exc:  # Linux < 5.7 without CAP_NET_RAW
        raise PermissionError_(
            f"binding the probe to {ifname} needs CAP_NET_RAW on this kernel (before Linux 5.7)"
        ) from exc
    except OSError as exc:
        if exc.errno == errno.ENODEV:
            raise ProbeError("no-device", f"{ifname}: no such network interface") from None
        raise _probe_error(f"bind to {ifname}", exc) from None


def _filter_replies(sock: trio.socket.SocketType, version: int) -> None:
    """Let only echo replies and errors reach a raw socket (it would see every ICMP type)."""
    if version == 4:
        passed = (1 << ICMP_ECHO_REPLY) | (1 << ICMP_DEST_UNREACH) | (1 << ICMP_TIME_EXCEEDED)
        sock.setsockopt(_SOL_RAW, _ICMP_FILTER, struct.pack("=I", ~passed & 0xFFFFFFFF))
        return
    blocked = [0xFFFFFFFF] * 8
    for kind in (ICMP6_ECHO_REPLY, ICMP6_DEST_UNREACH, ICMP6_TIME_EXCEEDED):
        blocked[kind >> 5] &= ~(1 << (kind & 31))
    sock.setsockopt(socket.IPPROTO_ICMPV6, _ICMP6_FILTER, struct.pack("=8I", *blocked))


def _address(address: IPAddress | str) -> IPAddress:
    return ipaddress.ip_address(address) if isinstance(address, str) else address


def _probe_error(what: str, exc: OSError) -> ProbeError:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)  # trio's strerror adds noise
    if exc.errno == errno.ETIMEDOUT:
        return ProbeError("timeout", f"{what}: {reason}")
    if exc.errno == errno.ENODEV:
        return ProbeError("no-device", f"{what}: {reason}")
    if exc.errno in _UNREACHABLE:
        return ProbeError("unreachable", f"{what}: {reason}")
    return ProbeError("error", f"{what}: {reason}")


# --- packets (pure) -------------------------------------------------------------------------


def internet_checksum(data: bytes) -> int:
    """RFC 1071: the ones' complement of the ones' complement sum of 16-bit words."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_request(version: int, identifier: int, sequence: int, payload: bytes) -> bytes:
    """An ICMP (v4) or ICMPv6 echo request; the kernel fills in ICMPv6's checksum."""
    header = struct.pack("!BBHHH", _REQUEST[version], 0, 0, identifier, sequence)
    if version == 6:
        return header + payload
    checksum = internet_checksum(header + payload)
    return struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, checksum, identifier, sequence) + payload


def classify_icmp(
    data: bytes,
    *,
    version: int,
    with_ip_header: bool,
    identifier: int | None,
    sequence: int,
    token: bytes,
) -> str | None:
    """What a received ICMP message says about our echo request.

    ``"reply"`` for our echo reply; a description (``"destination unreachable (code 1)"``) for
    an ICMP error quoting our request; None for anything else. ``with_ip_header``: the message
    starts with its IPv4 header (raw IPv4 sockets); ``identifier`` None: not checked (a
    datagram socket's kernel sets and matches it).
    """
    if with_ip_header:
        if len(data) < 20:
            return None
        data = data[(data[0] & 0x0F) * 4 :]
    if len(data) < 8:
        return None
    kind, code, _checksum, ident, seq = struct.unpack("!BBHHH", data[:8])
    if kind == _REPLY[version]:
        ours = identifier in (None, ident) and seq == sequence and data[8:] == token
        return "reply" if ours else None
    if kind not in _ERRORS[version]:
        return None
    quoted = data[8:]  # the IP header of our request and the start of our echo request
    if version == 4:
        if len(quoted) < 20:
            return None
        quoted = quoted[(quoted[0] & 0x0F) * 4 :]
    else:
        quoted = quoted[IPV6_HEADER_BYTES:]
    if len(quoted) < 8:
        return None
    q_kind, _code, _checksum, q_ident, q_seq = struct.unpack("!BBHHH", quoted[:8])
    if q_kind != _REQUEST[version] or identifier not in (None, q_ident) or q_seq != sequence:
        return None
    if kind == _ERRORS[version][0]:
        return f"destination unreachable (code {code})"
    return f"time exceeded (code {code})"
