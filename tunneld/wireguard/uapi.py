"""Sans-IO codec of the WireGuard cross-platform userspace API (UAPI).

Userspace implementations (wireguard-go, boringtun) listen on ``/var/run/wireguard/IFNAME.sock``
and speak a line protocol described at https://www.wireguard.com/xplatform/. This module turns
configuration into request bytes and reply bytes into stats; it never touches a socket, so the
I/O adapter (``userspace.py``) only moves bytes, in the style of h11.

How the framing works:

* Every message is ASCII ``key=value`` lines, each ending in ``\\n``, and the message ends with an
  empty line. A request opens with ``set=1`` or ``get=1``; several requests may follow each other
  on one connection, and the replies come back in order.
* Keys are 32 bytes written as 64 hex digits. The reply to ``set`` is ``errno=N``; the reply to
  ``get`` is the device's ``key=value`` lines followed by ``errno=N``. ``N`` is 0 on success.
  Its sign is the implementation's business: wireguard-go sends ``errno=-22`` for EINVAL. We pass
  it on as sent and treat any non-zero value as a refusal.
* In a ``get`` reply the device attributes come first; each ``public_key=`` line opens a peer, and
  the lines after it describe that peer until the next ``public_key=``. Peer order is not stable.
* An implementation closes the connection instead of replying when the request is invalid, so an
  end of stream while a reply is awaited is reported as a protocol error.

Decisions a reader might otherwise have to guess:

* Unknown keys in a reply are skipped (forward compatibility); a malformed known key is an error.
* An IPv6 endpoint's ``%zone`` is dropped: ``Endpoint`` has no zone, and wireguard-go itself drops
  it (``[fe80::1%lo]:51820`` is read back as ``[fe80::1]:51820``).
* The reply's ``private_key`` is reduced to its public key at once (as ``wg show`` does) and
  dropped. Error messages never quote the value of a ``private_key`` or ``preshared_key`` line,
  nor anything else that could be key material.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection
from dataclasses import dataclass, field

from tunneld.errors import UapiError, UapiProtocolError
from tunneld.keys import public_key as public_key_of
from tunneld.wireguard.model import (
    KEY_LEN,
    DeviceConfig,
    DeviceStats,
    Endpoint,
    IPNetwork,
    PeerConfig,
    PeerStats,
)

__all__ = [
    "ReplyReader",
    "encode_get",
    "encode_set",
    "parse_get_reply",
    "parse_set_reply",
]

_UINT16_MAX = 0xFFFF
_UINT32_MAX = 0xFFFF_FFFF
_UINT64_MAX = 0xFFFF_FFFF_FFFF_FFFF
_INT64_MAX = 0x7FFF_FFFF_FFFF_FFFF
_NANOSECONDS_MAX = 999_999_999

_ZERO_KEY = bytes(KEY_LEN)
_SECRET_KEY_NAMES = ("private_key", "preshared_key")

_KEY_NAME = re.compile(r"[a-z][a-z0-9_]*")
_HEX_KEY = re.compile(rf"[0-9a-fA-F]{{{2 * KEY_LEN}}}")
_UNSIGNED = re.compile(r"[0-9]{1,20}")  # bounded, so int() never sees a megabyte of digits
_SIGNED = re.compile(r"-?[0-9]{1,20}")
_PREFIX = re.compile(r"[0-9a-fA-F.:]+/[0-9]{1,3}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HEX_RUN = re.compile(r"[0-9a-fA-F]{16,}")

_QUOTE_CHARS = 60

_DEVICE_KEYS = frozenset({"private_key", "listen_port", "fwmark"})
_PEER_KEYS = frozenset(
    {
        "preshared_key",
        "protocol_version",
        "endpoint",
        "last_handshake_time_sec",
        "last_handshake_time_nsec",
        "tx_bytes",
        "rx_bytes",
        "persistent_keepalive_interval",
        "allowed_ip",
    }
)


# --- requests ---------------------------------------------------------------------------------


def encode_get() -> bytes:
    """The request for the device's configuration and statistics."""
    return b"get=1\n\n"


def encode_set(config: DeviceConfig, *, present_peers: Collection[bytes] | None = None) -> bytes:
    """A ``set`` request that makes the device exactly ``config``.

    Without ``present_peers`` it replaces every peer (``replace_peers=true``), which also drops
    every session: right for a fresh device. With ``present_peers`` (the public keys the device
    has now) it updates in place: peers that stay keep their sessions and counters, the others
    are removed with ``remove=true``. Either way each peer's allowed IPs are replaced, the fwmark
    is cleared when 0, and a preshared key that is ``None`` is cleared. ``listen_port=None``
    leaves the port as it is. Raises ``ValueError`` for a key that is not 32 bytes or a number
    out of its range.
    """
    lines = ["set=1", _line("private_key", _key_hex(config.private_key, "private key"))]
    if config.listen_port is not None:
        lines.append(_line("listen_port", _ranged(config.listen_port, "listen_port", _UINT16_MAX)))
    lines.append(_line("fwmark", _ranged(config.fwmark, "fwmark", _UINT32_MAX)))
    if present_peers is None:
        lines.append("replace_peers=true")
    else:
        wanted = {peer.public_key for peer in config.peers}
        for public_key in present_peers:
            if public_key not in wanted:
                lines.append(_line("public_key", _key_hex(public_key, "stale peer's public key")))
                lines.append("remove=true")
    for index, peer in enumerate(config.peers):
        lines.extend(_peer_lines(peer, f"peer {index}"))
    return ("\n".join(lines) + "\n\n").encode("ascii")


def _peer_lines(peer: PeerConfig, where: str) -> list[str]:
    lines = [
        _line("public_key", _key_hex(peer.public_key, f"{where}: public key")),
        "replace_allowed_ips=true",
    ]
    if peer.endpoint is not None:
        _ranged(peer.endpoint.port, f"{where}: endpoint port", _UINT16_MAX)
        lines.append(_line("endpoint", str(peer.endpoint)))
    keepalive = _ranged(peer.persistent_keepalive_seconds, f"{where}: keepalive", _UINT16_MAX)
    lines.append(_line("persistent_keepalive_interval", keepalive))
    # An all-zero preshared key means "none": sending it clears a key that was removed from config.
    preshared = _ZERO_KEY if peer.preshared_key is None else peer.preshared_key
    lines.append(_line("preshared_key", _key_hex(preshared, f"{where}: preshared key")))
    lines.append("protocol_version=1")
    lines.extend(_line("allowed_ip", str(network)) for network in peer.allowed_ips)
    return lines


def _line(key: str, value: object) -> str:
    text = str(value)
    if "\n" in text:  # typed inputs cannot do this; an untyped caller must not inject lines
        raise ValueError(f"UAPI {key} value contains a newline")
    return f"{key}={text}"


def _key_hex(key: bytes, what: str) -> str:
    if len(key) != KEY_LEN:
        raise ValueError(f"{what} must be {KEY_LEN} bytes, got {len(key)}")
    return key.hex()


def _ranged(number: int, what: str, maximum: int) -> int:
    if not 0 <= number <= maximum:
        raise ValueError(f"{what} must be between 0 and {maximum}, got {number}")
    return number


# --- reply framing ----------------------------------------------------------------------------


class ReplyReader:
    """Feed bytes as they arrive; ``next_reply()`` returns None until a whole reply is buffered.

    A reply is a run of ``key=value`` lines ending with an empty line. ``receive_data(b"")``
    records the end of the stream; after it, ``next_reply()`` still hands out replies that were
    complete, then raises ``UapiProtocolError`` (a reply can no longer arrive). A reply longer than
    ``max_reply_bytes``, or one that is not ASCII ``key=value`` lines, raises
    ``UapiProtocolError``; the reader then stays broken and raises the same error on every call.

    The returned pairs are raw and may hold the private key: do not log them.
    """

    def __init__(self, *, max_reply_bytes: int = 1 << 20) -> None:
        if max_reply_bytes < 1:
            raise ValueError(f"max_reply_bytes must be positive, got {max_reply_bytes}")
        self._max_reply_bytes = max_reply_bytes
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the buffer already searched for the terminator
        self._eof = False
        self._error: str | None = None

    def receive_data(self, data: bytes) -> None:
        """Append bytes from the socket; ``b""`` means the peer closed the connection."""
        if self._error is not None:
            return  # broken for good: next_reply() keeps raising, so keep nothing
        if self._eof:
            if data:
                raise RuntimeError("ReplyReader.receive_data() called with data after EOF")
            return
        if data:
            self._buffer += data
        else:
            self._eof = True

    def next_reply(self) -> list[tuple[str, str]] | None:
        """The key/value pairs of the next complete reply (``errno`` included), or None."""
        if self._error is not None:
            raise UapiProtocolError(self._error)
        try:
            return self._next_reply()
        except UapiProtocolError as exc:
            self._error = str(exc)
            self._buffer.clear()  # it may hold key material and can never be parsed now
            raise

    def _next_reply(self) -> list[tuple[str, str]] | None:
        if self._buffer[:1] == b"\n":  # an empty line right away: a reply without lines
            del self._buffer[:1]
            self._scanned = 0
            return []
        end = self._buffer.find(b"\n\n", max(self._scanned - 1, 0))
        if end == -1:
            self._scanned = len(self._buffer)
            # A reply still to be completed is at least one byte longer than what is buffered.
            if len(self._buffer) >= self._max_reply_bytes:
                raise UapiProtocolError(
                    f"UAPI reply exceeds {self._max_reply_bytes} bytes without ending"
                )
            if self._eof:
                if self._buffer:
                    raise UapiProtocolError(
                        f"UAPI connection closed in the middle of a reply "
                        f"({len(self._buffer)} bytes received)"
                    )
                raise UapiProtocolError("UAPI connection closed without a reply")
            return None
        size = end + 2
        if size > self._max_reply_bytes:
            raise UapiProtocolError(
                f"UAPI reply of {size} bytes exceeds the limit of {self._max_reply_bytes}"
            )
        text = bytes(self._buffer[: end + 1])
        del self._buffer[:size]
        self._scanned = 0
        return _split_reply(text)


def _split_reply(text: bytes) -> list[tuple[str, str]]:
    """``b"a=1\\nb=2\\n"`` → ``[("a", "1"), ("b", "2")]``, checking each line's shape."""
    try:
        decoded = text.decode("ascii")
    except UnicodeDecodeError as exc:
        raise UapiProtocolError(f"UAPI reply byte {exc.start} is not ASCII") from None
    pairs: list[tuple[str, str]] = []
    for number, line in enumerate(decoded[:-1].split("\n"), start=1):
        key, equals, value = line.partition("=")
        if not equals:
            raise UapiProtocolError(f"UAPI reply line {number} has no '=': {_quote(line)}")
        if not _KEY_NAME.fullmatch(key):
            raise UapiProtocolError(f"UAPI reply line {number} has a malformed key: {_quote(key)}")
        if _CONTROL.search(value):
            raise UapiProtocolError(
                f"UAPI reply line {number} ({key}) contains a control character"
            )
        pairs.append((key, value))
    return pairs


def _quote(text: str) -> str:
    """``text`` fit for an error message: truncated, and withheld if it may be key material."""
    if text.startswith(_SECRET_KEY_NAMES) or _HEX_RUN.search(text):
        return f"<{len(text)} characters withheld: may contain key material>"
    if len(text) > _QUOTE_CHARS:
        return repr(text[:_QUOTE_CHARS]) + "..."
    return repr(text)


# --- reply meaning ----------------------------------------------------------------------------


def parse_set_reply(pairs: list[tuple[str, str]]) -> None:
    """Accept a ``set`` reply; ``UapiError`` if the device refused the configuration."""
    errno = _errno_of(pairs, "set")
    if errno != 0:
        raise UapiError(errno, "set")


def parse_get_reply(pairs: list[tuple[str, str]]) -> DeviceStats:
    """The device's state from a ``get`` reply; ``UapiError`` if the device refused the request."""
    errno = _errno_of(pairs, "get")
    if errno != 0:
        raise UapiError(errno, "get")
    listen_port = 0
    fwmark = 0
    device_seen: set[str] = set()
    peers: list[_PeerBuilder] = []
    public_keys: set[bytes] = set()
    device_public_key: bytes | None = None
    for key, value in pairs[:-1]:
        if key == "public_key":
            public_key = _parse_key(key, value)
            if public_key in public_keys:
                raise UapiProtocolError(f"UAPI get reply lists peer {value} twice")
            public_keys.add(public_key)
            peers.append(_PeerBuilder(public_key))
        elif key in _DEVICE_KEYS:
            if peers:
                raise UapiProtocolError(f"UAPI get reply has device attribute {key} after a peer")
            if key in device_seen:
                raise UapiProtocolError(f"UAPI get reply repeats device attribute {key}")
            device_seen.add(key)
            if key == "private_key":
                device_public_key = public_key_of(_parse_key(key, value))
            elif key == "listen_port":
                listen_port = _parse_unsigned(key, value, _UINT16_MAX)
            else:
                fwmark = _parse_unsigned(key, value, _UINT32_MAX)
        elif key in _PEER_KEYS:
            if not peers:
                raise UapiProtocolError(
                    f"UAPI get reply has peer attribute {key} before any public_key"
                )
            peers[-1].apply(key, value)
        # Any other key is from a newer protocol revision: skipped.
    return DeviceStats(
        public_key=device_public_key,
        listen_port=listen_port,
        fwmark=fwmark,
        peers=tuple(peer.build() for peer in peers),
    )


def _errno_of(pairs: list[tuple[str, str]], operation: str) -> int:
    """The reply's status: exactly one ``errno`` line, and it must be the last one."""
    errno_lines = sum(1 for key, _ in pairs if key == "errno")
    if errno_lines == 0:
        raise UapiProtocolError(f"UAPI {operation} reply has no errno line")
    if errno_lines > 1 or pairs[-1][0] != "errno":
        raise UapiProtocolError(f"UAPI {operation} reply must end with its one errno line")
    value = pairs[-1][1]
    if not _SIGNED.fullmatch(value):
        raise UapiProtocolError(f"UAPI {operation} reply errno is not an integer: {_quote(value)}")
    return int(value)


@dataclass
class _PeerBuilder:
    """One peer's attributes while its lines of a ``get`` reply are read."""

    public_key: bytes
    seen: set[str] = field(default_factory=set)
    endpoint: Endpoint | None = None
    handshake_seconds: int = 0
    handshake_nanoseconds: int = 0
    receive_bytes: int = 0
    transmit_bytes: int = 0
    keepalive_seconds: int = 0
    allowed_ips: list[IPNetwork] = field(default_factory=list)
    has_preshared_key: bool = False

    def apply(self, key: str, value: str) -> None:
        if key != "allowed_ip":
            if key in self.seen:
                raise UapiProtocolError(
                    f"UAPI get reply repeats {key} for peer {self.public_key.hex()}"
                )
            self.seen.add(key)
        match key:
            case "preshared_key":
                self.has_preshared_key = _parse_key(key, value) != _ZERO_KEY
            case "protocol_version":
                _parse_unsigned(key, value, _UINT32_MAX)  # informational; only 1 exists
            case "endpoint":
                self.endpoint = _parse_endpoint(value)
            case "last_handshake_time_sec":
                self.handshake_seconds = _parse_unsigned(key, value, _INT64_MAX)
            case "last_handshake_time_nsec":
                self.handshake_nanoseconds = _parse_unsigned(key, value, _NANOSECONDS_MAX)
            case "tx_bytes":
                self.transmit_bytes = _parse_unsigned(key, value, _UINT64_MAX)
            case "rx_bytes":
                self.receive_bytes = _parse_unsigned(key, value, _UINT64_MAX)
            case "persistent_keepalive_interval":
                self.keepalive_seconds = _parse_unsigned(key, value, _UINT16_MAX)
            case "allowed_ip":
                self.allowed_ips.append(_parse_allowed_ip(value))
            case _:  # pragma: no cover - callers only pass _PEER_KEYS
                raise AssertionError(key)

    def build(self) -> PeerStats:
        handshake: float | None = None
        if self.handshake_seconds or self.handshake_nanoseconds:  # 0/0 means "never"
            handshake = self.handshake_seconds + self.handshake_nanoseconds / 1e9
        return PeerStats(
            public_key=self.public_key,
            endpoint=self.endpoint,
            last_handshake_unix_seconds=handshake,
            receive_bytes=self.receive_bytes,
            transmit_bytes=self.transmit_bytes,
            persistent_keepalive_seconds=self.keepalive_seconds,
            allowed_ips=tuple(self.allowed_ips),
            has_preshared_key=self.has_preshared_key,
        )


def _parse_key(key: str, value: str) -> bytes:
    if not _HEX_KEY.fullmatch(value):
        # Never echo the value: on a private_key or preshared_key line it is a secret.
        raise UapiProtocolError(
            f"UAPI reply {key} line is not {2 * KEY_LEN} hex digits (value withheld)"
        )
    return bytes.fromhex(value)


def _parse_unsigned(key: str, value: str, maximum: int) -> int:
    if not _UNSIGNED.fullmatch(value):
        raise UapiProtocolError(f"UAPI reply {key} is not an unsigned integer: {_quote(value)}")
    number = int(value)
    if number > maximum:
        raise UapiProtocolError(f"UAPI reply {key}={number} is above its maximum {maximum}")
    return number


def _parse_endpoint(value: str) -> Endpoint:
    """``1.2.3.4:51820`` or ``[2001:db8::1]:51820`` (a ``%zone`` inside the brackets is dropped)."""
    host, colon, port_text = value.rpartition(":")
    if not colon:
        raise UapiProtocolError(f"UAPI reply endpoint has no port: {_quote(value)}")
    port = _parse_unsigned("endpoint port", port_text, _UINT16_MAX)
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    try:
        if host.startswith("[") and host.endswith("]"):
            address = ipaddress.IPv6Address(host[1:-1].partition("%")[0])
        else:
            address = ipaddress.IPv4Address(host)
    except ValueError as exc:
        raise UapiProtocolError(
            f"UAPI reply endpoint is not IPv4:port or [IPv6]:port: {_quote(value)}"
        ) from exc
    return Endpoint(address, port)


def _parse_allowed_ip(value: str) -> IPNetwork:
    problem = f"UAPI reply allowed_ip is not an address/prefix-length: {_quote(value)}"
    if not _PREFIX.fullmatch(value):
        raise UapiProtocolError(problem)
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError as exc:
        raise UapiProtocolError(problem) from exc
