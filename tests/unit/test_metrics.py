"""Metrics without sockets: the daemon's real parts (no device), read through the exposition.

Each test scrapes the registry with ``generate_latest`` and parses the text back with
prometheus-client's own parser, so what is asserted is exactly what Prometheus would store.
``DaemonParts`` (also used by test_observe) builds a tunnel, proxy and reloader for a config
with two gateways and two services, without touching the network.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.test_tunnel import GATEWAY_PUBLIC, make_config
from tunneld import __version__, keys
from tunneld.config import Config
from tunneld.health import Action, Observation, PeerHealth
from tunneld.metrics import Metrics, code_label, config_hash
from tunneld.proxy.server import Proxy
from tunneld.reload import Reloader
from tunneld.tunnel import GatewayRuntime, Tunnel, TunnelKeys
from tunneld.wireguard.model import DeviceStats, Endpoint, PeerStats

SECOND_PUBLIC = keys.public_key(keys.generate_private_key())
STRANGER_PUBLIC = keys.public_key(keys.generate_private_key())
HANDSHAKE_AT = 1_700_000_000.0

SECOND_GATEWAY = f"""
[[gateway]]
name = "edge-2"
public_key = "{keys.encode_key(SECOND_PUBLIC)}"
endpoints = ["198.18.0.7:51820"]
allowed_ips = ["10.46.0.1/32"]
"""
SERVICES = """
[[service]]
name = "billing"
hosts = ["billing"]
upstream = "{billing}"

[[service]]
name = "pg"
protocol = "tcp"
listen_port = 5432
upstream = "tcp://127.0.0.1:5432"
"""


def daemon_config(
    tmp_path: Path,
    *,
    billing: str = "http://127.0.0.1:8081",
    ready: tuple[str, ...] = (),
    gateways: str = SECOND_GATEWAY,
    services: bool = True,
) -> Config:
    """The config the parts run: edge-1 (and edge-2), billing (http) and pg (tcp)."""
    key_file = tmp_path / "private.key"
    keys.ensure_private_key_file(key_file)
    sections = gateways
    if services:
        sections += SERVICES.format(billing=billing)
    if ready:
        sections += f"\n[metrics]\nready_services = {json.dumps(list(ready))}\n"
    return make_config(
        tmp_path, extra_interface=f'private_key_file = "{key_file}"', extra_sections=sections
    )


class Notifications:
    def reloading(self, status: str | None = None) -> None:
        pass

    def ready_after_reload(self, status: str | None = None) -> None:
        pass


@dataclass
class DaemonParts:
    """A tunnel (no device), the proxy (no listeners) and a reloader, as the daemon wires them."""

    config: Config
    tunnel: Tunnel
    proxy: Proxy
    reloader: Reloader
    next_configs: list[Config] = dataclasses.field(default_factory=list)

    @classmethod
    def build(cls, config: Config, *, observer: Metrics | None = None) -> DaemonParts:
        tunnel = Tunnel(config, TunnelKeys(keys.generate_private_key()), observer=observer)
        proxy = Proxy(config, {}, observer=observer)
        next_configs: list[Config] = []
        reloader = Reloader(
            config,
            load_config=lambda: next_configs.pop(0),
            load_secrets=lambda config: {},
            tunnel=tunnel,
            proxy=proxy,
            notifier=Notifications(),
            status_line=tunnel.status_line,
        )
        for gateway in config.gateways:
            health = PeerHealth.for_gateway(config.health, gateway, now=0.0)
            tunnel.gateways[gateway.name] = GatewayRuntime(gateway, health)
        return cls(config, tunnel, proxy, reloader, next_configs)

    def runtime(self, name: str) -> GatewayRuntime:
        return self.tunnel.gateways[name]

    def bring_up(self) -> None:
        """As after a first tick: the device read, edge-1 up (handshake 3 s ago), edge-2 not."""
        tunnel = self.tunnel
        tunnel.backend_name, tunnel.generation = "userspace", 1
        self.runtime("edge-1").health.observe(Observation(0.0, 3.0, probe_ok=True))
        self.runtime("edge-2").health.observe(Observation(0.0, None))
        tunnel.last_stats = DeviceStats(
            public_key=keys.public_key(keys.generate_private_key()),
            listen_port=51820,
            peers=(
                PeerStats(
                    GATEWAY_PUBLIC,
                    endpoint=Endpoint(ipaddress.ip_address("198.18.0.9"), 51820),
                    last_handshake_unix_seconds=HANDSHAKE_AT,
                    receive_bytes=1234,
                    transmit_bytes=5678,
                    persistent_keepalive_seconds=25,
                    allowed_ips=(ipaddress.ip_network("10.44.0.1/32"),),
                ),
                PeerStats(SECOND_PUBLIC),  # never shook hands
                PeerStats(STRANGER_PUBLIC, receive_bytes=1),  # not ours: never in metrics
            ),
        )


def series(registry: CollectorRegistry, name: str) -> dict[str, float]:
    """Every sample called ``name`` in a scrape, keyed by its labels as ``a=x,b=y`` (sorted)."""
    text = generate_latest(registry).decode()
    return {
        ",".join(f"{key}={value}" for key, value in sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def family_names(registry: CollectorRegistry, prefix: str = "tunneld_") -> set[str]:
    """The families with samples in a scrape (without prometheus-client's ``_created`` ones)."""
    text = generate_latest(registry).decode()
    return {
        family.name
        for family in text_string_to_metric_families(text)
        if family.name.startswith(prefix)
        and family.samples
        and not family.name.endswith("_created")
    }


@pytest.fixture
def parts(tmp_path: Path) -> DaemonParts:
    return DaemonParts.build(daemon_config(tmp_path))


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def bound_metrics(registry: CollectorRegistry, parts: DaemonParts) -> Metrics:
    metrics = Metrics(registry)
    metrics.bind(tunnel=parts.tunnel, proxy=parts.proxy, reloader=parts.reloader)
    return metrics


# -- the surface ------------------------------------------------------------------------------


def test_before_bind_only_build_info_and_the_process_metrics(registry: CollectorRegistry) -> None:
    Metrics(registry)
    assert series(registry, "tunneld_build_info") == {f"backend=none,version={__version__}": 1}
    assert family_names(registry) == {"tunneld_build_info"}
    for process_family in ("process_cpu_seconds", "process_resident_memory_bytes", "python_info"):
        assert process_family in family_names(registry, prefix="")
    # Our own registry only: nothing of ours leaks into prometheus-client's global one.
    assert not any(name.startswith("tunneld_") for name in family_names(REGISTRY, prefix=""))


def test_every_family_once_bound_and_observed(
    registry: CollectorRegistry, parts: DaemonParts
) -> None:
    metrics = bound_metrics(registry, parts)
    parts.bring_up()
    metrics.request_done("billing", 200, 0.01)
    metrics.upstream_error("billing", "refused")
    metrics.probe_done("edge-1", 0.002, answered=True)
    # Families as the parser names them: counters without _total.
    assert family_names(registry) == {
        "tunneld_build_info",
        "tunneld_peer_up",
        "tunneld_peer_state",
        "tunneld_peer_last_handshake_timestamp_seconds",
        "tunneld_peer_receive_bytes",
        "tunneld_peer_transmit_bytes",
        "tunneld_peer_endpoint_changes",
        "tunneld_peer_recoveries",
        "tunneld_peer_probes",
        "tunneld_peer_probe_failures",
        "tunneld_interface_up",
        "tunneld_ready",
        "tunneld_interface_rebuilds",
        "tunneld_active_connections",
        "tunneld_config_reloads",
        "tunneld_config_last_reload_successful",
        "tunneld_config_info",
        "tunneld_requests",
        "tunneld_request_duration_seconds",
        "tunneld_upstream_errors",
        "tunneld_probe_duration_seconds",
    }


# -- state, read at scrape time ---------------------------------------------------------------


def test_peer_series_come_from_the_health_machines_and_the_last_stats(
    registry: CollectorRegistry, parts: DaemonParts
) -> None:
    bound_metrics(registry, parts)
    parts.bring_up()
    counters = parts.runtime("edge-1").health.counters
    counters.endpoint_changes = 2
    counters.recovery_actions[Action.NEXT_ENDPOINT] = 3
    counters.probe_failures = 1
    assert series(registry, "tunneld_peer_up") == {"peer=edge-1": 1, "peer=edge-2": 0}
    state = series(registry, "tunneld_peer_state")
    assert {key for key, value in state.items() if value == 1} == {
        "peer=edge-1,state=up",
        "peer=edge-2,state=connecting",
    }
    assert len(state) == 2 * 5  # one-hot over every state
    assert series(registry, "tunneld_peer_last_handshake_timestamp_seconds") == {
        "peer=edge-1": HANDSHAKE_AT,
        "peer=edge-2": 0,  # never: 0, as wg shows it
    }
    assert series(registry, "tunneld_peer_receive_bytes_total") == {
        "peer=edge-1": 1234,
        "peer=edge-2": 0,
    }
    assert series(registry, "tunneld_peer_transmit_bytes_total")["peer=edge-1"] == 5678
    assert series(registry, "tunneld_peer_endpoint_changes_total") == {
        "peer=edge-1": 2,
        "peer=edge-2": 0,
    }
    assert series(registry, "tunneld_peer_recoveries_total") == {
        "action=next_endpoint,peer=edge-1": 3,
        "action=reapply_peer,peer=edge-1": 0,
        "action=reresolve,peer=edge-1": 0,
        "action=next_endpoint,peer=edge-2": 0,
        "action=reapply_peer,peer=edge-2": 0,
        "action=reresolve,peer=edge-2": 0,
    }
    assert series(registry, "tunneld_peer_probes_total") == {"peer=edge-1": 1, "peer=edge-2": 0}
    assert series(registry, "tunneld_peer_probe_failures_total")["peer=edge-1"] == 1


def test_without_a_device_there_are_no_measurements(
    registry: CollectorRegistry, parts: DaemonParts
) -> None:
    bound_metrics(registry, parts)
    parts.bring_up()
    parts.tunnel.last_stats = None  # the interface is being rebuilt
    parts.tunnel.repairs = 1
    assert series(registry, "tunneld_peer_last_handshake_timestamp_seconds") == {}
    assert series(registry, "tunneld_peer_receive_bytes_total") == {}
    assert series(registry, "tunneld_peer_up") == {"peer=edge-1": 1, "peer=edge-2": 0}
    assert series(registry, "tunneld_interface_up") == {"": 0}
    assert series(registry, "tunneld_interface_rebuilds_total") == {"": 1}


def test_build_info_names_the_backend_once_chosen(
    registry: CollectorRegistry, parts: DaemonParts
) -> None:
    bound_metrics(registry, parts)
    assert series(registry, "tunneld_build_info") == {f"backend=none,version={__version__}": 1}
    parts.bring_up()
    assert series(registry, "tunneld_build_info") == {f"backend=userspace,version={__version__}": 1}
    assert series(registry, "tunneld_interface_up") == {"": 1}


def test_connections_reloads_and_the_config_hash(
    registry: CollectorRegistry, parts: DaemonParts
) -> None:
    bound_metrics(registry, parts)
    parts.proxy.http.active["billing"] = 2
    parts.proxy.tcp_active["pg"] = 1
    assert series(registry, "tunneld_active_connections") == {"service=billing": 2, "service=pg": 1}
    assert series(registry, "tunneld_config_reloads_total") == {
        "result=success": 0,
        "result=failure": 0,
    }
    assert series(registry, "tunneld_config_last_reload_successful") == {"": 1}
    results = parts.reloader.results
    results.succeeded, results.failed, results.last_error = 3, 1, "gateway[0]: bad key"
    assert series(registry, "tunneld_config_reloads_total") == {
        "result=success": 3,
        "result=failure": 1,
    }
    assert series(registry, "tunneld_config_last_reload_successful") == {"": 0}
    assert series(registry, "tunneld_config_info") == {f"hash={config_hash(parts.config)}": 1}


def test_the_config_hash_follows_the_settings_not_the_file_name(tmp_path: Path) -> None:
    one, other = tmp_path / "one", tmp_path / "other"
    one.mkdir()
    other.mkdir()
    first = daemon_config(one)
    digest = config_hash(first)
    assert len(digest) == 12
    assert int(digest, 16) >= 0
    moved = dataclasses.replace(first, source=str(other / "tunneld.toml"))
    assert config_hash(moved) == digest
    assert config_hash(daemon_config(one, billing="http://127.0.0.1:9999")) != digest


# -- events -----------------------------------------------------------------------------------


def test_requests_are_counted_by_exact_code_and_unmatched_ones_as_none(
    registry: CollectorRegistry, parts: DaemonParts
) -> None:
    metrics = bound_metrics(registry, parts)
    metrics.request_done("billing", 200, 0.003)
    metrics.request_done("billing", 200, 0.2)
    metrics.request_done("billing", 502, 0.001)
    metrics.request_done("billing", 101, 3600.0)  # a WebSocket session: counted, not timed
    metrics.request_done("", 404, 0.0005)
    assert series(registry, "tunneld_requests_total") == {
        "code=200,service=billing": 2,
        "code=502,service=billing": 1,
        "code=101,service=billing": 1,
        "code=404,service=(none)": 1,
    }
    assert series(registry, "tunneld_request_duration_seconds_count") == {
        "service=billing": 3,
        "service=(none)": 1,
    }
    assert series(registry, "tunneld_request_duration_seconds_sum")["service=billing"] == (
        pytest.approx(0.204)
    )
    buckets = series(registry, "tunneld_request_duration_seconds_bucket")
    assert buckets["le=0.005,service=billing"] == 2
    assert buckets["le=60.0,service=billing"] == 3
    assert buckets["le=+Inf,service=billing"] == 3


@pytest.mark.parametrize(
    ("status", "label"),
    [(200, "200"), (404, "404"), (503, "503"), (299, "2xx"), (599, "5xx"), (1234, "9xx")],
)
def test_a_code_outside_the_registered_ones_is_counted_by_its_class(
    status: int, label: str
) -> None:
    assert code_label(status) == label


def test_upstream_error_kinds_are_a_bounded_set(
    registry: CollectorRegistry, parts: DaemonParts
) -> None:
    metrics = bound_metrics(registry, parts)
    metrics.upstream_error("billing", "refused")
    metrics.upstream_error("billing", "refused")
    metrics.upstream_error("billing", "timeout")
    metrics.upstream_error("billing", "something new")
    assert series(registry, "tunneld_upstream_errors_total") == {
        "kind=refused,service=billing": 2,
        "kind=timeout,service=billing": 1,
        "kind=other,service=billing": 1,
    }


def test_only_answered_probes_are_timed(registry: CollectorRegistry, parts: DaemonParts) -> None:
    metrics = bound_metrics(registry, parts)
    metrics.probe_done("edge-1", 0.004, answered=True)
    metrics.probe_done("edge-1", 2.0, answered=False)  # its timeout, not a round trip
    assert series(registry, "tunneld_probe_duration_seconds_count") == {"peer=edge-1": 1}
    buckets = series(registry, "tunneld_probe_duration_seconds_bucket")
    assert buckets["le=0.0025,peer=edge-1"] == 0
    assert buckets["le=0.005,peer=edge-1"] == 1


async def test_the_tunnel_and_the_proxy_report_into_metrics(
    registry: CollectorRegistry, tmp_path: Path
) -> None:
    """The real parts take Metrics as their observer; an unrouted request is counted."""
    metrics = Metrics(registry)
    parts = DaemonParts.build(daemon_config(tmp_path), observer=metrics)
    metrics.bind(tunnel=parts.tunnel, proxy=parts.proxy, reloader=parts.reloader)
    client, server = trio.testing.memory_stream_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(parts.proxy.http.handle, server, "10.44.0.1")
            await client.send_all(b"GET / HTTP/1.1\r\nHost: nowhere\r\nConnection: close\r\n\r\n")
            answer = await client.receive_some()
            await client.aclose()
    assert answer.startswith(b"HTTP/1.1 404 ")
    assert series(registry, "tunneld_requests_total") == {"code=404,service=(none)": 1}


# -- reloads ----------------------------------------------------------------------------------


async def test_series_of_a_removed_gateway_or_service_disappear(
    registry: CollectorRegistry, tmp_path: Path
) -> None:
    parts = DaemonParts.build(daemon_config(tmp_path))
    metrics = bound_metrics(registry, parts)
    parts.bring_up()
    for peer in ("edge-1", "edge-2"):
        metrics.probe_done(peer, 0.01, answered=True)
    for service in ("billing", "pg", ""):
        metrics.request_done(service, 200, 0.01)
        metrics.upstream_error(service, "refused")
    parts.next_configs.append(daemon_config(tmp_path, gateways="", services=False))
    assert await parts.reloader.reload()

    assert series(registry, "tunneld_peer_up") == {"peer=edge-1": 1}
    assert series(registry, "tunneld_probe_duration_seconds_count") == {"peer=edge-1": 1}
    assert series(registry, "tunneld_requests_total") == {"code=200,service=(none)": 1}
    assert series(registry, "tunneld_request_duration_seconds_count") == {"service=(none)": 1}
    assert series(registry, "tunneld_upstream_errors_total") == {"kind=refused,service=(none)": 1}
    assert series(registry, "tunneld_active_connections") == {}
    assert series(registry, "tunneld_config_reloads_total")["result=success"] == 1
    assert series(registry, "tunneld_config_info") == {
        f"hash={config_hash(parts.reloader.config)}": 1
    }
    # A late answer of a removed service (a long request) is forgotten again by the scrape.
    metrics.request_done("billing", 200, 0.01)
    assert "code=200,service=billing" not in series(registry, "tunneld_requests_total")


def test_what_the_rules_and_dashboard_may_use_is_what_a_scrape_has(
    registry: CollectorRegistry, parts: DaemonParts
) -> None:
    """deploy/'s checker keeps its own list of our series: it must not drift from the real one."""
    from tests.unit.test_deploy_prometheus import METRICS

    metrics = bound_metrics(registry, parts)
    parts.bring_up()
    metrics.request_done("billing", 200, 0.01)
    metrics.upstream_error("billing", "refused")
    metrics.probe_done("edge-1", 0.002, answered=True)
    text = generate_latest(registry).decode()
    exported: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
            labels = set(sample.labels) - {"le"}
            exported.setdefault(name, set()).update(labels)
            exported.setdefault(family.name, set()).update(labels)
    for name, labels in METRICS.items():
        if name == "up":
            continue  # Prometheus' own
        assert name in exported, f"{name} is used by deploy/ but not exported"
        assert labels <= exported[name], (name, labels, exported[name])
