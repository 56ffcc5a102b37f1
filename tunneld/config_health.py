"""The ``[health]`` table and each gateway's ``probe_address``: how tunneld judges a tunnel.

``config.py`` reads ``[health]`` (``read_health``) before the gateways, because a gateway's
``probe_address`` is validated against it (``read_probe_address``): with a probe on, every gateway
needs an address to probe — given, or the first single-address network (/32 or /128) of its
``allowed_ips``, or ``"none"`` to judge it by its handshake alone. Guessing an address inside a
wider network could probe something that never answers and would then "repair" a working tunnel
over and over, so a gateway without a single address and without ``probe_address`` is an error.

A gateway judged by its handshake alone needs ``persistent_keepalive``: without it and without a
probe, nothing sends a packet over an idle tunnel, WireGuard never renews its handshake, and the
gateway would look down although nothing is wrong (``check_handshake_only``).
"""

# ruff: noqa: RUF001 -- messages write ranges with an en dash (U+2013) on purpose

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, cast

from tunneld.config_reader import Context, Table, quote, shown, toml_lines, toml_value
from tunneld.wireguard.model import IPAddress, IPNetwork

ProbeKind = Literal["icmp", "tcp", "none"]
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

#: WireGuard's REJECT_AFTER_TIME. A tunnel that carries packets renews its session when that is
#: 120 to 165 s old, so a smaller staleness limit would call healthy tunnels down.
REJECT_AFTER_SECONDS = 180.0
MAX_FAILURES = 100
#: ``probe_address = "none"``: judge the gateway by its handshake alone.
NO_PROBE = "none"

_TCP_PROBE_RE = re.compile(r"tcp:([0-9]{1,5})")
_PROBE_FORMS = '"icmp", "tcp:PORT" or "none"'


@dataclass(frozen=True)
class HealthConfig:
    """How the supervisor judges each gateway peer (see ``tunneld.health``)."""

    probe: ProbeKind = "icmp"  # sent to each gateway's probe_address through the tunnel
    probe_port: int | None = None  # the port of a "tcp" probe; None otherwise
    interval_seconds: float = 5.0  # one check (stats + probe) per gateway this often
    failures: int = 3  # consecutive failed checks that make a gateway down
    probe_timeout_seconds: float = 2.0  # less than interval_seconds
    reresolve_interval_seconds: float = 60.0  # endpoint names re-resolved this often while up
    stale_handshake_seconds: float = REJECT_AFTER_SECONDS  # an older handshake is down

    @property
    def probe_spec(self) -> str:
        """The probe as written in the config: ``icmp``, ``tcp:PORT`` or ``none``."""
        return f"tcp:{self.probe_port}" if self.probe == "tcp" else self.probe


_DEFAULTS = HealthConfig()


def read_health(ctx: Context, raw: dict[str, object]) -> HealthConfig:
    """``[health]``; every key has a default."""
    table = Table(ctx, ("health",), raw)
    probe, probe_port = _probe(table)
    interval = table.seconds("interval", _DEFAULTS.interval_seconds)
    failures = table.integer("failures", _DEFAULTS.failures, 1, MAX_FAILURES)
    probe_timeout = table.seconds("probe_timeout", _DEFAULTS.probe_timeout_seconds)
    if "probe_timeout" in table.raw and probe_timeout >= interval:
        table.problem(
            "probe_timeout",
            f"{toml_value(probe_timeout)} is not less than health.interval "
            f"({toml_value(interval)}); a probe must end before the next one starts",
        )
        probe_timeout = min(_DEFAULTS.probe_timeout_seconds, interval / 2)
    elif probe_timeout >= interval:  # the default timeout, with an interval of 2 s or less
        probe_timeout = interval / 2
    reresolve = table.seconds("reresolve_interval", _DEFAULTS.reresolve_interval_seconds)
    stale = table.seconds("stale_handshake", _DEFAULTS.stale_handshake_seconds)
    if stale < REJECT_AFTER_SECONDS:
        table.problem(
            "stale_handshake",
            f"{toml_value(stale)} is less than {REJECT_AFTER_SECONDS:g}, WireGuard's reject-after "
            "time: a healthy tunnel renews its handshake only every 2–3 minutes",
        )
        stale = REJECT_AFTER_SECONDS
    table.done()
    return HealthConfig(
        probe=probe,
        probe_port=probe_port,
        interval_seconds=interval,
        failures=failures,
        probe_timeout_seconds=probe_timeout,
        reresolve_interval_seconds=reresolve,
        stale_handshake_seconds=stale,
    )


def _probe(table: Table) -> tuple[ProbeKind, int | None]:
    text = table.text("probe", _DEFAULTS.probe)
    if text in ("icmp", "none"):
        return cast(ProbeKind, text), None
    if text == "tcp":
        table.problem("probe", f'{shown(text)} needs a port: "tcp:PORT", e.g. "tcp:22"')
    elif match := _TCP_PROBE_RE.fullmatch(text):
        port = int(match[1])
        if 1 <= port <= 65535:
            return "tcp", port
        table.problem("probe", f"{shown(text)} has port {port}; expected tcp:1–65535")
    else:
        table.problem("probe", f"{shown(text)} is not one of {_PROBE_FORMS}")
    return _DEFAULTS.probe, None


def render_health(health: HealthConfig) -> list[str]:
    """``[health]`` as TOML lines (after a blank line)."""
    return [
        "",
        "[health]",
        *toml_lines(
            probe=health.probe_spec,
            interval=health.interval_seconds,
            failures=health.failures,
            probe_timeout=health.probe_timeout_seconds,
            reresolve_interval=health.reresolve_interval_seconds,
            stale_handshake=health.stale_handshake_seconds,
        ),
    ]


# --- a gateway's probe_address --------------------------------------------------------------


def read_probe_address(
    table: Table,
    health: HealthConfig,
    allowed_ips: Sequence[IPNetwork],
    own_addresses: Sequence[IPInterface],
) -> IPAddress | None:
    """The address to probe this gateway at; None: judge it by its handshake alone.

    ``table`` is the gateway's; ``allowed_ips`` its networks (none if they were all invalid);
    ``own_addresses`` this host's tunnel addresses, which a probe must never target.
    """
    text = table.optional_text("probe_address")
    if text is None:
        # No single address in allowed_ips: no guess at which host of a network answers (a
        # probe that never gets an answer would "repair" a working tunnel forever); the
        # gateway is judged by its handshake alone, and the supervisor says so at start.
        return default_probe_address(allowed_ips)
    if text == NO_PROBE:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        address = None
    if address is None or "%" in text:  # no scope: the probe is bound to the tunnel device
        table.problem(
            "probe_address", f'{shown(text)} is not an IP address, e.g. "10.44.0.1", or "none"'
        )
        return None
    for index, own in enumerate(own_addresses):
        if own.ip == address:
            table.problem(
                "probe_address",
                f"{address} is this host's own tunnel address (interface.address[{index}]); "
                "probe the gateway's",
            )
            return None
    if allowed_ips and not any(address in network for network in allowed_ips):
        inside = ", ".join(str(network) for network in allowed_ips)
        table.problem(
            "probe_address",
            f"{address} is not inside allowed_ips ({inside}); "
            "the probe must reach the gateway through its tunnel",
        )
        return None
    return address


def default_probe_address(allowed_ips: Sequence[IPNetwork]) -> IPAddress | None:
    """The first single-address network (/32 or /128) of ``allowed_ips``, as an address."""
    for network in allowed_ips:
        if network.prefixlen == network.max_prefixlen:
            return network.network_address
    return None


def check_handshake_only(
    table: Table, health: HealthConfig, keepalive_seconds: int, probe_address: IPAddress | None
) -> None:
    """A gateway without a probe needs keepalives, or an idle tunnel would look down."""
    if keepalive_seconds != 0:
        return
    if health.probe == "none":
        no_probe = 'health.probe = "none"'
    elif table.raw.get("probe_address") == NO_PROBE:
        no_probe = 'probe_address = "none"'
    elif probe_address is None and "probe_address" not in table.raw:
        no_probe = "allowed_ips has no single address to probe and probe_address is not set"
    else:  # probed (or its probe_address is invalid, which is reported already)
        return
    table.problem(
        "persistent_keepalive",
        f"0 turns keepalives off, and this gateway has no probe ({no_probe}): nothing would "
        "renew the handshake of an idle tunnel, so it would be judged down; set "
        "persistent_keepalive, e.g. 25",
    )


def render_probe_address(probe_address: IPAddress | None) -> str:
    """The ``probe_address`` line of a rendered gateway."""
    return f"probe_address = {quote(NO_PROBE if probe_address is None else str(probe_address))}"
