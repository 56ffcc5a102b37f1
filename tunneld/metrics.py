"""Prometheus metrics: what tunneld exposes, and how each series is produced.

How this works. Series come in two kinds, and each kind has its own way in:

- **State** — is a gateway up, its handshake and byte counters, open connections, reload
  results, the config's hash — is already kept by the tunnel, the proxy and the reloader.
  :meth:`Metrics.collect` reads it from them at scrape time (:meth:`Metrics.bind` says where),
  so the data path does no work for it and a scrape sees the state of the last supervisor
  tick. Nothing here ever asks the WireGuard device itself: ``Tunnel.last_stats`` is the
  tick's copy.
- **Events** — each request, origin failure and probe — must each be counted as they happen:
  :class:`Metrics` is the proxy's ``Observer`` and the tunnel's ``ProbeObserver`` and feeds
  prometheus-client counters and histograms (a dictionary lookup and an add per event).

Labels are bounded. ``peer`` and ``service`` values are names from the config; a request that
matched no service is counted as ``service="(none)"``, which no service can be called (service
names are ``[A-Za-z0-9_.-]``, see ``config_proxy._SERVICE_NAME_RE``). ``code`` and ``kind`` are
bounded sets (:func:`code_label`, :data:`UPSTREAM_ERROR_KINDS`). When a reload removes a gateway
or a service, its series disappear from the next scrape, pushed ones included.

Everything lives in one explicit :class:`~prometheus_client.CollectorRegistry` (never the global
one), which also gets the process, platform and GC collectors. Serving it is ``observe.py``'s job.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from http import HTTPStatus
from typing import Generic, Protocol, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric

from tunneld import __version__
from tunneld.config import Config, render_config
from tunneld.health import Action, PeerState
from tunneld.reload import ReloadResults
from tunneld.tunnel import GatewayRuntime
from tunneld.wireguard.model import DeviceStats

#: The ``service`` label of a request that matched no service (404s, and requests refused
#: before routing: 400, 408, 431, 503). Parentheses cannot occur in a service name.
UNMATCHED_SERVICE = "(none)"

#: What ``UpstreamError.kind`` can be (errors.py); anything else is counted as "other".
UPSTREAM_ERROR_KINDS = frozenset(
    {"refused", "timeout", "unreachable", "dns", "tls", "protocol", "closed"}
)

#: An API proxy in front of local origins: its own overhead is well under a millisecond, origins
#: answer in milliseconds to seconds, and the default response timeout is 60 s.
REQUEST_DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
#: Round trips through the tunnel: sub-millisecond on a LAN, up to seconds on a bad path (the
#: probe timeout is 2 s by default and always below the health interval).
PROBE_DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip

_REGISTERED_STATUSES = frozenset(int(status) for status in HTTPStatus)


def code_label(status: int) -> str:
    """The ``code`` label of a response status: the code itself, or its class ("5xx").

    Exact codes, not classes: the difference between our own 502/504 (origin unreachable, too
    slow), the origin's 500, 401 (shared secret missing) and 404 (no route) is what an operator
    needs to tell first, and an alert on classes is still one regex (``code=~"5.."``, which also
    matches "5xx"). The set stays bounded although origins choose most codes: a code outside the
    registered ones (IANA's, as Python's ``HTTPStatus`` knows them) is counted by its class.
    """
    if status in _REGISTERED_STATUSES:
        return str(status)
    return f"{min(max(status, 0), 999) // 100}xx"


def config_hash(config: Config) -> str:
    """A short fingerprint of the effective config: the first 12 hex digits of its SHA-256.

    Of the rendered settings without comments: the comments name the file it was read from, and
    hosts running the same settings from different paths should show the same hash.
    """
    lines = [line for line in render_config(config).splitlines() if not line.startswith("#")]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]


# -- what is read at scrape time -------------------------------------------------------------


class TunnelState(Protocol):
    """What metrics and the endpoint read of :class:`~tunneld.tunnel.Tunnel`."""

    @property
    def config(self) -> Config: ...
    @property
    def gateways(self) -> Mapping[str, GatewayRuntime]: ...
    @property
    def last_stats(self) -> DeviceStats | None: ...
    @property
    def backend_name(self) -> str: ...
    @property
    def generation(self) -> int: ...
    @property
    def repairs(self) -> int: ...
    @property
    def last_tick(self) -> float: ...
    def status_line(self) -> str: ...
    async def read_stats(self) -> DeviceStats | None: ...


class ProxyState(Protocol):
    """What they read of :class:`~tunneld.proxy.server.Proxy`."""

    def active_connections(self) -> Mapping[str, int]: ...


class ReloaderState(Protocol):
    """What they read of :class:`~tunneld.reload.Reloader`: the running config, and results."""

    @property
    def config(self) -> Config: ...
    @property
    def results(self) -> ReloadResults: ...


def interface_configured(tunnel: TunnelState) -> bool:
    """The WireGuard device exists and has been read at a tick (see ``Tunnel.last_stats``)."""
    return tunnel.last_stats is not None


def readiness_problems(
    tunnel: TunnelState, *, draining: bool, origin_problems: Sequence[str] = ()
) -> list[str]:
    """Why this connector cannot serve now; empty when it can."""
    problems = ["draining: shutting down"] if draining else []
    if not interface_configured(tunnel):
        problems.append(f"interface {tunnel.config.interface.name} is not configured (yet)")
    runtimes = tunnel.gateways.values()
    if not any(runtime.health.is_up for runtime in runtimes):
        states = ", ".join(f"{r.name} {r.health.state.value}" for r in runtimes) or "none"
        problems.append(f"no gateway is up ({states})")
    return problems + list(origin_problems)


# -- the metrics -----------------------------------------------------------------------------


_M = TypeVar("_M", bound=MetricWrapperBase)


class _Pushed(Generic[_M]):
    """A labelled metric fed by events, and the label values it has seen.

    prometheus-client cannot list a metric's children, and forgetting a removed service or
    gateway needs that. The first label is always the name from the config.
    """

    def __init__(self, metric: _M) -> None:
        self.metric = metric
        #: The children by label values. Also a cache: prometheus-client's own ``labels()``
        #: validates and takes a lock on every call, twice the cost of the increment itself,
        #: and this runs for every request.
        self.seen: dict[tuple[str, ...], _M] = {}

    def labels(self, *values: str) -> _M:
        child = self.seen.get(values)
        if child is None:
            child = self.seen[values] = self.metric.labels(*values)
        return child

    def keep_only(self, names: set[str]) -> None:
        for values in [values for values in self.seen if values[0] not in names]:
            self.metric.remove(*values)
            del self.seen[values]


class Metrics:
    """tunneld's metrics in ``registry``, and the observer of requests and probes.

    Create it first and hand it to ``Tunnel(observer=...)`` and ``Proxy(observer=...)``; once the
    reloader exists, :meth:`bind` all three. Until then a scrape has only the build info and the
    event series. Every method runs in the trio thread, like the scrape.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._tunnel: TunnelState | None = None
        self._proxy: ProxyState | None = None
        self._reloader: ReloaderState | None = None
        self._is_draining: Callable[[], bool] = lambda: False
        # Registered before the event metrics: the registry collects in registration order, so
        # a scrape forgets removed names (collect) before it reads the event series.
        registry.register(self)
        self._requests = _Pushed(
            Counter(
                "tunneld_requests_total",
                "HTTP requests answered, by service and status code",
                ("service", "code"),
                registry=registry,
            )
        )
        self._request_duration = _Pushed(
            Histogram(
                "tunneld_request_duration_seconds",
                "Time from a request's head to the end of its answer (upgrades not included)",
                ("service",),
                buckets=REQUEST_DURATION_BUCKETS,
                registry=registry,
            )
        )
        self._upstream_errors = _Pushed(
            Counter(
                "tunneld_upstream_errors_total",
                "Failures to reach or talk to a service's origin, by kind",
                ("service", "kind"),
                registry=registry,
            )
        )
        self._probe_duration = _Pushed(
            Histogram(
                "tunneld_probe_duration_seconds",
                "Round-trip time of answered health probes through the tunnel",
                ("peer",),
                buckets=PROBE_DURATION_BUCKETS,
                registry=registry,
            )
        )
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)

    def bind(
        self,
        *,
        tunnel: TunnelState,
        proxy: ProxyState | None = None,
        reloader: ReloaderState | None = None,
        is_draining: Callable[[], bool] = lambda: False,
    ) -> None:
        """Read the state series from these from now on."""
        self._tunnel, self._proxy, self._reloader = tunnel, proxy, reloader
        self._is_draining = is_draining

    # -- events (the proxy's Observer, the tunnel's ProbeObserver) ----------------------------

    def request_done(self, service_name: str, status: int, duration_seconds: float) -> None:
        service = service_name or UNMATCHED_SERVICE
        self._requests.labels(service, code_label(status)).inc()
        # A 101's "duration" is the whole WebSocket session: it would swamp the latencies.
        if status != HTTPStatus.SWITCHING_PROTOCOLS:
            self._request_duration.labels(service).observe(duration_seconds)

    def upstream_error(self, service_name: str, kind: str) -> None:
        kind = kind if kind in UPSTREAM_ERROR_KINDS else "other"
        self._upstream_errors.labels(service_name or UNMATCHED_SERVICE, kind).inc()

    def probe_done(self, gateway: str, seconds: float, *, answered: bool) -> None:
        # A failed probe's time is its timeout (or how fast an error came back), not a round
        # trip; failures are counted in tunneld_peer_probe_failures_total instead.
        if answered:
            self._probe_duration.labels(gateway).observe(seconds)

    # -- state, read at scrape time (prometheus_client's Collector protocol) ------------------

    def collect(self) -> Iterator[Metric]:
        tunnel = self._tunnel
        build = GaugeMetricFamily(
            "tunneld_build_info",
            "Always 1: the running tunneld's version and WireGuard backend (none before bring-up)",
            labels=("version", "backend"),
        )
        backend = tunnel.backend_name if tunnel is not None else ""
        build.add_metric((__version__, backend or "none"), 1)
        yield build
        if tunnel is None:
            return
        config = self._reloader.config if self._reloader is not None else tunnel.config
        self._forget_removed(set(tunnel.gateways), {service.name for service in config.services})
        yield from _peer_families(tunnel)
        yield _gauge(
            "tunneld_interface_up",
            "1 while the WireGuard interface exists and is configured",
            int(interface_configured(tunnel)),
        )
        yield _gauge(
            "tunneld_ready",
            "1 when the interface is configured, a gateway is up and no drain has begun "
            "(/readyz also checks the ready_services origins)",
            int(not readiness_problems(tunnel, draining=self._is_draining())),
        )
        yield CounterMetricFamily(
            "tunneld_interface_rebuilds_total",
            "Times the interface was lost (or its bring-up failed) and had to be built again",
            value=tunnel.repairs,
        )
        if self._proxy is not None:
            active = GaugeMetricFamily(
                "tunneld_active_connections",
                "Open client connections by service: HTTP requests being forwarded, TCP relays",
                labels=("service",),
            )
            for name, count in sorted(self._proxy.active_connections().items()):
                active.add_metric((name,), count)
            yield active
        if self._reloader is not None:
            yield from _reload_families(self._reloader.results)
        info = GaugeMetricFamily(
            "tunneld_config_info",
            "Always 1: a hash of the running config's settings (as /status shows it)",
            labels=("hash",),
        )
        info.add_metric((config_hash(config),), 1)
        yield info

    def _forget_removed(self, peers: set[str], services: set[str]) -> None:
        self._probe_duration.keep_only(peers)
        services = services | {UNMATCHED_SERVICE}
        for pushed in (self._requests, self._request_duration, self._upstream_errors):
            pushed.keep_only(services)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _peer_families(tunnel: TunnelState) -> Iterator[Metric]:
    """One series per configured gateway (and per state or action where labelled so)."""
    peer = ("peer",)
    up = GaugeMetricFamily(
        "tunneld_peer_up", "1 while the gateway can carry traffic (up or degraded)", labels=peer
    )
    state = GaugeMetricFamily(
        "tunneld_peer_state",
        "The gateway's health state: 1 for the current one, 0 for the others",
        labels=("peer", "state"),
    )
    handshake = GaugeMetricFamily(
        "tunneld_peer_last_handshake_timestamp_seconds",
        "Unix time of the peer's latest handshake; 0 if none completed (no series: no device)",
        labels=peer,
    )
    received = CounterMetricFamily(
        "tunneld_peer_receive_bytes_total",
        "Bytes received from the peer as the device counts them (reset on re-apply or rebuild)",
        labels=peer,
    )
    transmitted = CounterMetricFamily(
        "tunneld_peer_transmit_bytes_total",
        "Bytes sent to the peer as the device counts them (reset on re-apply or rebuild)",
        labels=peer,
    )
    endpoint_changes = CounterMetricFamily(
        "tunneld_peer_endpoint_changes_total",
        "Times the device reported a different endpoint for the peer (roaming, failover)",
        labels=peer,
    )
    recoveries = CounterMetricFamily(
        "tunneld_peer_recoveries_total",
        "Recovery steps taken while the gateway was down, by action",
        labels=("peer", "action"),
    )
    probes = CounterMetricFamily(
        "tunneld_peer_probes_total", "Health probe results observed", labels=peer
    )
    probe_failures = CounterMetricFamily(
        "tunneld_peer_probe_failures_total",
        "Health probes that got no answer (also those excused by arriving traffic)",
        labels=peer,
    )
    stats = tunnel.last_stats
    for name, runtime in sorted(tunnel.gateways.items()):
        health, counters = runtime.health, runtime.health.counters
        up.add_metric((name,), int(health.is_up))
        for value in PeerState:
            state.add_metric((name, value.value), int(health.state is value))
        endpoint_changes.add_metric((name,), counters.endpoint_changes)
        for action in Action:
            recoveries.add_metric((name, action.value), counters.recovery_actions[action])
        probes.add_metric((name,), counters.probes)
        probe_failures.add_metric((name,), counters.probe_failures)
        peer_stats = stats.peer(runtime.config.public_key) if stats is not None else None
        if peer_stats is not None:
            handshake.add_metric((name,), peer_stats.last_handshake_unix_seconds or 0.0)
            received.add_metric((name,), peer_stats.receive_bytes)
            transmitted.add_metric((name,), peer_stats.transmit_bytes)
    yield from (up, state, handshake, received, transmitted, endpoint_changes, recoveries)
    yield from (probes, probe_failures)


def _reload_families(results: ReloadResults) -> Iterator[Metric]:
    reloads = CounterMetricFamily(
        "tunneld_config_reloads_total",
        "Config reloads (SIGHUP, tunneld reload), by result",
        labels=("result",),
    )
    reloads.add_metric(("success",), results.succeeded)
    reloads.add_metric(("failure",), results.failed)
    yield reloads
    yield _gauge(
        "tunneld_config_last_reload_successful",
        "0 while the last reload failed (the previous config still runs), else 1",
        int(results.last_error is None),
    )
