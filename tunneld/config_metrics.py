"""The ``[metrics]`` table: where the observability endpoint listens, and what readiness needs.

One HTTP listener serves ``/metrics``, ``/livez``, ``/readyz`` and ``/status``. It defaults to
loopback (``127.0.0.1:9477``): a host's Prometheus agent scrapes it locally, and in Kubernetes the
operator sets the pod IP (``listen = "0.0.0.0:9477"``). ``listen = "off"`` turns it off.
``ready_services`` names services whose origin must accept a connection for ``/readyz`` to say
ready (an origin that is down makes the connector useless even with the tunnel up).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from tunneld.config_reader import Context, Table, shown, shown_name, toml_lines
from tunneld.host_port import HostPort

DEFAULT_LISTEN = HostPort("127.0.0.1", 9477)
_LISTED_NAMES = 10  # a message lists this many service names at most
OFF = "off"


@dataclass(frozen=True)
class MetricsConfig:
    listen: HostPort | None = DEFAULT_LISTEN  # None: no observability endpoint
    ready_services: tuple[str, ...] = ()  # origins that /readyz also checks


def read_metrics(ctx: Context, raw: dict[str, object]) -> MetricsConfig:
    """``[metrics]``; every key has a default."""
    table = Table(ctx, ("metrics",), raw)
    listen: HostPort | None = DEFAULT_LISTEN
    text = table.optional_text("listen")
    if text == OFF:
        listen = None
    elif text is not None:
        try:
            listen = HostPort.parse(text)
        except ValueError as exc:
            table.problem(
                "listen",
                f'{shown(text)} is not host:port ({exc}), e.g. "127.0.0.1:9477", or "off"',
            )
        else:
            if not _is_ip_literal(listen.host):
                table.problem("listen", f"{shown(text)}: listen on an IP address, not a name")
    ready: tuple[str, ...] = ()
    if "ready_services" in table.raw:
        ready = tuple(text for _path, text in table.strings("ready_services", "service names"))
    else:
        table.known.append("ready_services")
    table.done()
    return MetricsConfig(listen, ready)


def check_ready_services(
    ctx: Context, metrics: MetricsConfig, service_names: Sequence[str]
) -> None:
    """Every ``ready_services`` entry must name a ``[[service]]``."""
    names = set(service_names)
    for index, name in enumerate(metrics.ready_services):
        if name not in names:
            known = ", ".join(map(shown_name, service_names[:_LISTED_NAMES])) or "none"
            if len(service_names) > _LISTED_NAMES:
                known += f", … ({len(service_names)} services)"
            ctx.add(
                ("metrics", "ready_services", index),
                f"{shown(name)} is not a [[service]] name (services: {known})",
            )


def render_metrics(metrics: MetricsConfig) -> list[str]:
    """``[metrics]`` as TOML lines (after a blank line)."""
    return [
        "",
        "[metrics]",
        *toml_lines(
            listen=str(metrics.listen) if metrics.listen is not None else OFF,
            ready_services=metrics.ready_services or None,
        ),
    ]


def _is_ip_literal(host: str) -> bool:
    # Not "starts with a digit": 1abc and 0x7f.1 are names that getaddrinfo would look up.
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
