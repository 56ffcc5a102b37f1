"""The status report: one JSON-able shape for ``tunneld status``, ``--json`` and ``/status``.

``device_report`` is what the device alone can tell (the CLI reads it when no daemon runs); the
daemon's ``/status`` adds what only it knows (each gateway's health state, services, reloads)
to the same shape, so tools read one format whichever answered.
"""

from __future__ import annotations

from typing import Any

from tunneld import keys
from tunneld.wireguard.model import DeviceStats


def device_report(
    ifname: str, backend: str, stats: DeviceStats, names: dict[bytes, str], *, now: float
) -> dict[str, Any]:
    """The status of a device as plain JSON-able data (also the shape of ``--json``)."""
    peers = []
    for peer in stats.peers:
        handshake = peer.last_handshake_unix_seconds
        peers.append(
            {
                "name": names.get(peer.public_key),
                "public_key": keys.encode_key(peer.public_key),
                "endpoint": str(peer.endpoint) if peer.endpoint else None,
                "last_handshake_unix_seconds": handshake,
                "handshake_age_seconds": None if handshake is None else max(0.0, now - handshake),
                "receive_bytes": peer.receive_bytes,
                "transmit_bytes": peer.transmit_bytes,
                "persistent_keepalive_seconds": peer.persistent_keepalive_seconds,
                "allowed_ips": [str(network) for network in peer.allowed_ips],
            }
        )
    return {
        "interface": ifname,
        "backend": backend,
        "public_key": keys.encode_key(stats.public_key) if stats.public_key else None,
        "listen_port": stats.listen_port,
        "peers": peers,
    }


def format_status(report: dict[str, Any]) -> str:
    lines = [
        f"interface: {report['interface']} ({report['backend']} backend)",
        f"  public key: {report['public_key'] or '(none)'}",
        f"  listening port: {report['listen_port']}",
    ]
    for peer in report["peers"]:
        age = peer["handshake_age_seconds"]
        lines += [
            "",
            f"peer: {peer['name'] or '(not in config)'} {peer['public_key']}",
            f"  endpoint: {peer['endpoint'] or '(none)'}",
            f"  latest handshake: {'never' if age is None else f'{age:.0f}s ago'}",
            f"  transfer: {peer['receive_bytes']} B received, {peer['transmit_bytes']} B sent",
            f"  allowed ips: {', '.join(peer['allowed_ips']) or '(none)'}",
        ]
    return "\n".join(lines)
