"""What is measured: the targets, the workloads, and the interleaved order of the runs (pure)."""

from __future__ import annotations

from dataclasses import dataclass

from bench import servers


@dataclass(frozen=True)
class Target:
    """One way for the gateway to reach the origin through the tunnel."""

    name: str
    description: str
    http_port: int  # where wrk sends its requests (on the tunnel address)
    bulk_port: int | None  # where iperf3 connects; None: not an L4 path
    proxy: str | None  # the measured proxy program (a Topology.groups() name); None: no proxy
    reference: str | None  # the target this one is compared with, besides `direct`


TARGETS = (
    Target(
        "direct",
        "origin nginx bound on the tunnel address itself: no proxy, the limit",
        servers.DIRECT_PORT,
        servers.BULK_DIRECT_PORT,
        None,
        None,
    ),
    Target(
        "nginx",
        "nginx reverse proxy (1 worker, keep-alive upstream) → origin on 127.0.0.1",
        servers.NGINX_PORT,
        None,
        "nginx-proxy",
        None,
    ),
    Target(
        "haproxy-tcp",
        "HAProxy in TCP mode (1 thread) → origin on 127.0.0.1",
        servers.HAPROXY_PORT,
        servers.BULK_HAPROXY_PORT,
        "haproxy",
        None,
    ),
    Target(
        "tunneld-http",
        "tunneld http service (routed by Host) → origin on 127.0.0.1",
        servers.TUNNELD_HTTP_PORT,
        None,
        "tunneld",
        "nginx",
    ),
    Target(
        "tunneld-tcp",
        "tunneld tcp service (L4 relay) → origin on 127.0.0.1",
        servers.TUNNELD_TCP_PORT,
        servers.BULK_TUNNELD_PORT,
        "tunneld",
        "haproxy-tcp",
    ),
)
TARGETS_BY_NAME = {target.name: target for target in TARGETS}


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    kind: str  # "wrk" (HTTP requests) or "iperf3" (one bulk TCP stream)
    duration_seconds: int
    path: str = "/"
    connections: int = 50
    threads: int = 2
    new_connection_per_request: bool = False
    timeout_seconds: int = 5  # wrk --timeout: a request slower than this counts as a timeout

    def applies_to(self, target: Target) -> bool:
        return self.kind == "wrk" or target.bulk_port is not None

    def describe(self) -> str:
        if self.kind == "iperf3":
            return f"iperf3 -t {self.duration_seconds}, one stream"
        close = ' -H "Connection: close"' if self.new_connection_per_request else ""
        return (
            f"wrk -t{self.threads} -c{self.connections} -d{self.duration_seconds}s{close} "
            f"GET {self.path}"
        )


def full_workloads(duration_seconds: int = 8, short_seconds: int = 5) -> tuple[Workload, ...]:
    """The full run: the headline workload for ``duration_seconds``, the others shorter."""
    return (
        Workload("small", "31-byte body, keep-alive, 50 connections", "wrk", duration_seconds),
        Workload(
            "small-close",
            "31-byte body, new connection per request, 50 connections",
            "wrk",
            short_seconds,
            new_connection_per_request=True,
        ),
        Workload(
            "small-c1",
            "31-byte body, keep-alive, 1 connection",
            "wrk",
            short_seconds,
            connections=1,
            threads=1,
        ),
        Workload(
            "small-c500",
            "31-byte body, keep-alive, 500 connections",
            "wrk",
            short_seconds,
            connections=500,
        ),
        Workload(
            "10k",
            "10 KB body, keep-alive, 50 connections",
            "wrk",
            short_seconds,
            path="/files/10k.bin",
        ),
        Workload(
            "1m",
            "1 MB body, keep-alive, 10 connections",
            "wrk",
            short_seconds,
            path="/files/1m.bin",
            connections=10,
            timeout_seconds=15,
        ),
        Workload("bulk", "bulk TCP stream (iperf3), Mbit/s", "iperf3", short_seconds),
    )


def quick_workloads() -> tuple[Workload, ...]:
    """A smoke test of the harness: one short run of the small and the bulk workloads."""
    return (
        Workload("small", "31-byte body, keep-alive, 50 connections", "wrk", 2),
        Workload("bulk", "bulk TCP stream (iperf3), Mbit/s", "iperf3", 1),
    )


@dataclass(frozen=True)
class Step:
    repeat: int
    workload: Workload
    target: Target


def schedule(
    targets: tuple[Target, ...], workloads: tuple[Workload, ...], repeats: int
) -> list[Step]:
    """Every (workload, target) once per repeat, targets interleaved.

    Within a repeat each workload runs on every target back to back, so a disturbance (another
    job on the machine) hits all targets of that workload alike; the target order rotates from
    one repeat to the next, so no target is always first or last.
    """
    steps = []
    for repeat in range(repeats):
        shift = repeat % len(targets)
        order = targets[shift:] + targets[:shift]
        for workload in workloads:
            steps.extend(
                Step(repeat, workload, target) for target in order if workload.applies_to(target)
            )
    return steps
