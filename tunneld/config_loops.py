"""Upstreams that lead back into tunneld itself, which config validation refuses.

A service whose upstream is tunneld's own metrics listener would serve ``/metrics`` and
``/status`` (peers, endpoints, services) to the gateway. One whose upstream is a proxy listener
of tunneld (a tunnel address at ``proxy.http_port``, or at a tcp service's ``listen_port``) can
never reach an origin: the request comes back to tunneld, whose listeners take connections from
the tunnel only.

How this works: decided from the config alone, without I/O. An upstream reaches a listener when
the ports are equal and the listener accepts one of the addresses the upstream connects to:

- ``localhost`` and names under ``.localhost`` (RFC 6761) connect to 127.0.0.1 and ::1;
  ``0.0.0.0`` and ``::`` connect to 127.0.0.1 and ::1 (Linux sends a connection to the
  unspecified address to loopback); an IPv4-mapped IPv6 address connects to its IPv4 address;
- a listener on an address accepts that address; one on ``0.0.0.0`` accepts every IPv4 address
  of this host, of which the config knows 127.0.0.0/8 and the tunnel addresses, and one on
  ``::`` the IPv6 ones (::1 and the tunnel's): tunneld's IPv6 listeners are IPv6-only.

Other names are not resolved (validation does no I/O, and an answer can change), and other
addresses of this host are not known: the check catches the mistakes made by hand, and says so
in docs/configuration.md.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from tunneld.config_metrics import MetricsConfig
from tunneld.config_proxy import ProxyConfig, ServiceConfig
from tunneld.config_reader import Context, quote, shown
from tunneld.wireguard.model import IPAddress

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

_UNSPECIFIED: dict[int, IPAddress] = {
    4: ipaddress.IPv4Address("0.0.0.0"),  # noqa: S104 -- compared with, never bound
    6: ipaddress.IPv6Address("::"),
}
_LOOPBACK: tuple[IPAddress, ...] = (
    ipaddress.IPv4Address("127.0.0.1"),
    ipaddress.IPv6Address("::1"),
)


@dataclass(frozen=True)
class _Listener:
    address: IPAddress  # unspecified (0.0.0.0 or ::) for a wildcard listener
    port: int
    what: str  # what it is, for a message
    advice: str  # what goes wrong, and what to do


def check_upstream_loops(
    ctx: Context,
    addresses: Sequence[IPInterface],
    proxy: ProxyConfig,
    services: Sequence[ServiceConfig],
    metrics: MetricsConfig,
) -> None:
    """Refuse every service whose upstream is one of tunneld's own listeners (see above)."""
    by_address: dict[tuple[IPAddress, int], _Listener] = {}
    for listener in _listeners(addresses, proxy, services, metrics):
        by_address.setdefault((listener.address, listener.port), listener)  # the first owner
    tunnel = {interface.ip for interface in addresses}
    for index, service in enumerate(services):
        upstream = service.upstream
        if upstream.scheme == "unix" or not by_address:
            continue
        for destination in _destinations(upstream.host):
            found = by_address.get((destination, upstream.port))
            if found is None and (destination.is_loopback or destination in tunnel):
                wildcard = _UNSPECIFIED[destination.version]
                found = by_address.get((wildcard, upstream.port))
            if found is not None:
                ctx.add(
                    ("service", index, "upstream"),
                    f"{shown(str(upstream))} is {found.what}: {found.advice}",
                )
                break


def _listeners(
    addresses: Sequence[IPInterface],
    proxy: ProxyConfig,
    services: Sequence[ServiceConfig],
    metrics: MetricsConfig,
) -> list[_Listener]:
    listeners = []
    if metrics.listen is not None:
        listen = metrics.listen
        with contextlib.suppress(ValueError):  # not an IP literal: reported by read_metrics
            listeners.append(
                _Listener(
                    ipaddress.ip_address(listen.host),
                    listen.port,
                    f"tunneld's own metrics listener (metrics.listen = {quote(str(listen))})",
                    "the gateway would read /metrics and /status through it; point upstream "
                    "at the origin itself, or move metrics.listen",
                )
            )
    ports: list[tuple[int, str]] = []
    if any(service.protocol == "http" for service in services):
        ports.append((proxy.http_port, f"proxy.http_port {proxy.http_port}"))
    for index, service in enumerate(services):
        if service.protocol == "tcp" and service.listen_port is not None:
            port = service.listen_port
            ports.append(
                (port, f"service[{index}] ({shown(service.name)}), its listen_port {port}")
            )
    for interface in addresses:
        for port, owner in ports:
            listeners.append(
                _Listener(
                    interface.ip,
                    port,
                    f"tunneld's own listener (interface.address {interface.ip}, {owner})",
                    "requests would come back to tunneld instead of reaching an origin; point "
                    "upstream at the origin itself, e.g. 127.0.0.1 and the port it listens on",
                )
            )
    return listeners


def _destinations(host: str) -> tuple[IPAddress, ...]:
    """The addresses a connection to ``host`` (a name or an IP literal) may go to, if known."""
    name = host.lower().removesuffix(".")
    if name == "localhost" or name.endswith(".localhost"):
        return _LOOPBACK
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return ()  # another name: not resolved here
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_unspecified:
        return (_LOOPBACK[0] if address.version == 4 else _LOOPBACK[1],)
    return (address,)
