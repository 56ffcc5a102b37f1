"""Plain data exchanged with a WireGuard backend — no I/O here.

Keys are 32 raw bytes everywhere inside tunneld; base64 (``wg`` format) and hex (UAPI) exist only
at the edges that need them. Fields holding secret keys are excluded from ``repr`` so that a
logged or raised dataclass can never carry a private or preshared key.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

KEY_LEN = 32


@dataclass(frozen=True)
class Endpoint:
    """A resolved UDP endpoint: an IP literal and a port."""

    address: IPAddress
    port: int

    def __str__(self) -> str:
        if self.address.version == 6:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"


@dataclass(frozen=True)
class PeerConfig:
    """What we want the backend to know about one peer."""

    public_key: bytes
    allowed_ips: tuple[IPNetwork, ...] = ()
    endpoint: Endpoint | None = None
    persistent_keepalive_seconds: int = 0  # 0 = off
    preshared_key: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class DeviceConfig:
    """The whole desired state of a WireGuard device (applied as a replacement)."""

    private_key: bytes = field(repr=False)
    peers: tuple[PeerConfig, ...] = ()
    listen_port: int | None = None  # None = let the implementation pick
    fwmark: int = 0  # 0 = off


@dataclass(frozen=True)
class PeerStats:
    """What the backend reports about one peer."""

    public_key: bytes
    endpoint: Endpoint | None = None
    last_handshake_unix_seconds: float | None = None  # None = never
    receive_bytes: int = 0
    transmit_bytes: int = 0
    persistent_keepalive_seconds: int = 0
    allowed_ips: tuple[IPNetwork, ...] = ()
    has_preshared_key: bool = False


@dataclass(frozen=True)
class DeviceStats:
    """What the backend reports about the device (never its private key)."""

    public_key: bytes | None = None
    listen_port: int = 0
    fwmark: int = 0
    peers: tuple[PeerStats, ...] = ()

    def peer(self, public_key: bytes) -> PeerStats | None:
        for peer in self.peers:
            if peer.public_key == public_key:
                return peer
        return None
