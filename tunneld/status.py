"""The status report: one JSON-able shape for ``tunneld status``, ``--json`` and ``/status``.

``device_report`` is what the device alone can tell (the CLI reads it when no daemon runs); the
daemon's ``/status`` adds what only it knows (each gateway's health state, services, reloads)
to the same shape, so tools read one format whichever answered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tunneld import __version__, keys
from tunneld.config import Config
from tunneld.reload import ReloadResults
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
    """The report for people, like ``wg show``; the daemon's report adds states and services."""
    lines = [
        f"interface: {report['interface']} ({report['backend'] or 'no'} backend)",
        f"  public key: {report['public_key'] or '(none)'}",
        f"  listening port: {report['listen_port'] or '(none)'}",
    ]
    if "ready" in report:  # from the running daemon
        reasons = "; ".join(report["ready_reasons"])
        lines.append(f"  ready: {'yes' if report['ready'] else f'no ({reasons})'}")
    for peer in report["peers"]:
        age = peer["handshake_age_seconds"]
        state = f" [{peer['state']}]" if peer.get("state") else ""
        lines += [
            "",
            f"peer: {peer['name'] or '(not in config)'}{state} {peer['public_key']}",
            f"  endpoint: {peer['endpoint'] or '(none)'}",
            f"  latest handshake: {'never' if age is None else f'{age:.0f}s ago'}",
        ]
        if peer["receive_bytes"] is not None:
            lines.append(
                f"  transfer: {peer['receive_bytes']} B received, {peer['transmit_bytes']} B sent"
            )
        lines.append(f"  allowed ips: {', '.join(peer['allowed_ips']) or '(none)'}")
    for service in report.get("services", ()):
        lines += [
            "",
            f"service: {service['name']} ({service['protocol']}, port {service['listen_port']})"
            f" → {service['upstream']}",
            f"  open connections: {service['active_connections']}",
        ]
        if service["origin_reachable"] is not None:
            lines.append(f"  origin reachable: {'yes' if service['origin_reachable'] else 'no'}")
    return "\n".join(lines)


def daemon_report(
    config: Config,
    stats: DeviceStats | None,
    *,
    backend: str,
    peer_states: Mapping[str, str],
    active_connections: Mapping[str, int],
    origins_reachable: Mapping[str, bool],
    ready_reasons: Sequence[str],
    reloads: ReloadResults,
    config_hash: str,
    status_line: str,
    now: float,
) -> dict[str, Any]:
    """The running daemon's status (``/status``): :func:`device_report`'s shape, and more.

    Each peer also has its gateway's health ``state`` (null for a peer the config does not
    know). Every configured gateway is listed: one the device lacks (or every one, while there
    is no device: ``stats`` None) with its configured facts and null measurements. Top-level
    additions: ``version``; ``ready`` and the ``ready_reasons`` against it; ``services`` with
    their open connections and, for those that readiness checks, ``origin_reachable`` (else
    null); ``reloads``; ``config_hash``; systemd's ``status_line``.
    """
    if stats is None:
        report: dict[str, Any] = {
            "interface": config.interface.name,
            "backend": backend or None,
            "public_key": None,
            "listen_port": None,
            "peers": [],
        }
    else:
        names = {gateway.public_key: gateway.name for gateway in config.gateways}
        report = device_report(config.interface.name, backend, stats, names, now=now)
    listed = {peer["name"] for peer in report["peers"]}
    for gateway in config.gateways:
        if gateway.name not in listed:
            report["peers"].append(
                {
                    "name": gateway.name,
                    "public_key": keys.encode_key(gateway.public_key),
                    "endpoint": None,
                    "last_handshake_unix_seconds": None,
                    "handshake_age_seconds": None,
                    "receive_bytes": None,
                    "transmit_bytes": None,
                    "persistent_keepalive_seconds": gateway.persistent_keepalive_seconds,
                    "allowed_ips": [str(network) for network in gateway.allowed_ips],
                }
            )
    for peer in report["peers"]:
        peer["state"] = peer_states.get(peer["name"]) if peer["name"] is not None else None
    report["version"] = __version__
    report["ready"] = not ready_reasons
    report["ready_reasons"] = list(ready_reasons)
    report["services"] = [
        {
            "name": service.name,
            "protocol": service.protocol,
            "upstream": str(service.upstream),
            "hosts": list(service.hosts),
            "path_prefix": service.path_prefix if service.protocol == "http" else None,
            "listen_port": (
                service.listen_port if service.protocol == "tcp" else config.proxy.http_port
            ),
            "active_connections": active_connections.get(service.name, 0),
            "origin_reachable": origins_reachable.get(service.name),
        }
        for service in config.services
    ]
    report["reloads"] = {
        "succeeded": reloads.succeeded,
        "failed": reloads.failed,
        "last_error": reloads.last_error,
    }
    report["config_hash"] = config_hash
    report["status_line"] = status_line
    return report
