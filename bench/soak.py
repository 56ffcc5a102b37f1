"""bench/run --soak: does tunneld's memory or fd count grow under a long, mixed load?

For ``--soak-minutes`` (default 10) wrk and iperf3 run back to back against tunneld only, in a
rotating cycle of kinds (:data:`KINDS`): keep-alive small requests through the http service (the
bulk of the requests), a new connection per request, 10 KB bodies, keep-alive small requests
through the tcp service, and a short iperf3 burst through the tcp service's bulk port. Every run
is bounded (wrk ``-d``, iperf3 ``-t``, killed 20 s past that). Meanwhile a thread samples, every
:data:`SAMPLE_SECONDS`, tunneld's RSS, open fds (split into connections to the origin, client
connections and the rest), threads and CPU time, and the RSS and fds of its wireguard-go child.

Before the load, one second of each kind primes tunneld (the first request of a kind may set up
something that stays, which is not growth), then the harness waits :data:`IDLE_SETTLE_SECONDS`
and takes the idle sample "before"; after the load it waits as long again and takes "after".

The analysis is pure (samples in, figures out): the first 20 % of the load is warm-up (at least
30 s, at most 2 min, at most half the run); growth is the median of the last quarter of the
post-warm-up samples minus the median of the first quarter; the slope is a least-squares fit
over the post-warm-up samples. The verdict is "flat" when RSS grew at most
:data:`RSS_FLAT_MIB` and the fds after the load are back to the idle count (±
:data:`FD_TOLERANCE`), not counting the idle keep-alive connections to the origin, which
tunneld's pool keeps by design (up to ``max_idle_upstream_connections``, checked apart).
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
import math
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import report, servers
from bench.load import LoadResult, run_load
from bench.measure import load_average
from bench.plan import TARGETS_BY_NAME, Workload
from bench.procstat import cpu_seconds, memory_kib, open_fds, thread_count
from bench.tools import machine_description
from bench.topology import Topology

SAMPLE_SECONDS = 5.0
IDLE_SETTLE_SECONDS = 5.0  # before the idle samples: what the last run left in flight drains
SETTLE_SECONDS = 0.2  # between two runs
RSS_FLAT_MIB = 2.0
FD_TOLERANCE = 2
MIN_POST_WARMUP_SAMPLES = 4
PRIMER_SECONDS = 1
ISSUE_GOAL_REQUESTS = 1_000_000  # the issue's figure for a 10-minute soak
SERVICE_PORTS = (servers.TUNNELD_HTTP_PORT, servers.TUNNELD_TCP_PORT, servers.BULK_TUNNELD_PORT)
TCP_LISTEN = "0A"


@dataclasses.dataclass(frozen=True)
class Kind:
    """One kind of load of the soak's cycle, and its seconds per cycle at full length."""

    name: str
    target: str
    workload: Workload
    seconds_per_cycle: int

    def with_seconds(self, seconds: int) -> Workload:
        return dataclasses.replace(self.workload, duration_seconds=seconds)


KINDS = (
    Kind(
        "http-keepalive",
        "tunneld-http",
        Workload("http-keepalive", "31-byte body, keep-alive, 50 connections", "wrk", 1),
        26,
    ),
    Kind(
        "http-close",
        "tunneld-http",
        Workload(
            "http-close",
            "31-byte body, new connection per request, 50 connections",
            "wrk",
            1,
            new_connection_per_request=True,
        ),
        8,
    ),
    Kind(
        "http-10k",
        "tunneld-http",
        Workload("http-10k", "10 KB body, keep-alive, 50 connections", "wrk", 1, "/files/10k.bin"),
        8,
    ),
    Kind(
        "tcp-keepalive",
        "tunneld-tcp",
        Workload("tcp-keepalive", "31-byte body, keep-alive, 50 connections", "wrk", 1),
        8,
    ),
    Kind(
        "tcp-bulk",
        "tunneld-tcp",
        Workload("tcp-bulk", "bulk TCP stream (iperf3)", "iperf3", 1),
        3,
    ),
)
KINDS_BY_NAME = {kind.name: kind for kind in KINDS}


# -- the schedule (pure) ------------------------------------------------------------------------


def cycle(duration_seconds: float) -> list[tuple[Kind, int]]:
    """The kinds of one cycle and their seconds: full length (~1 min) for runs of 2 min or
    more, shrunk for shorter ones so that every kind still comes round at least twice."""
    full = sum(kind.seconds_per_cycle for kind in KINDS)
    scale = min(1.0, duration_seconds / 2 / full)
    return [(kind, max(1, int(kind.seconds_per_cycle * scale))) for kind in KINDS]


def next_run(
    schedule: Sequence[tuple[Kind, int]], number: int, remaining_seconds: float
) -> tuple[Kind, int] | None:
    """The ``number``-th run (from 0) of the rotation, cut to what is left; None when < 1 s is."""
    if remaining_seconds < 1:
        return None
    kind, seconds = schedule[number % len(schedule)]
    return kind, max(1, min(seconds, int(remaining_seconds)))


# -- /proc readings ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TcpSocket:
    local_address: str
    local_port: int
    remote_address: str
    remote_port: int
    state: str  # hex, as /proc/net/tcp shows it: 01 ESTABLISHED, 0A LISTEN, 08 CLOSE_WAIT, …


def _address(hex_text: str, little_endian: bool) -> str:
    raw = bytes.fromhex(hex_text)
    words = [raw[i : i + 4] for i in range(0, len(raw), 4)]
    if little_endian:
        words = [word[::-1] for word in words]
    address = ipaddress.ip_address(b"".join(words))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def parse_proc_net_tcp(
    text: str, little_endian: bool = sys.byteorder == "little"
) -> dict[int, TcpSocket]:
    """``/proc/PID/net/tcp`` or ``tcp6``: socket inode → addresses, ports and state."""
    sockets = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        local, remote = fields[1].split(":"), fields[2].split(":")
        sockets[int(fields[9])] = TcpSocket(
            _address(local[0], little_endian),
            int(local[1], 16),
            _address(remote[0], little_endian),
            int(remote[1], 16),
            fields[3],
        )
    return sockets


def classify_fds(
    targets: Sequence[str],
    sockets: dict[int, TcpSocket],
    origin_port: int = servers.ORIGIN_PORT,
    service_ports: Sequence[int] = SERVICE_PORTS,
) -> dict[str, int]:
    """Count a process's fds: ``origin`` (TCP connections to the origin on loopback: the
    keep-alive pool, and relays in progress), ``client`` (accepted connections on the service
    ports) and ``other`` (listeners, epoll, pipes, files, UDP…)."""
    counts = {"total": len(targets), "origin": 0, "client": 0, "other": 0}
    for target in targets:
        tcp = None
        if target.startswith("socket:[") and target.endswith("]"):
            tcp = sockets.get(int(target[8:-1]))
        if tcp is None or tcp.state == TCP_LISTEN:
            counts["other"] += 1
        elif (
            tcp.remote_port == origin_port and ipaddress.ip_address(tcp.remote_address).is_loopback
        ):
            counts["origin"] += 1
        elif tcp.local_port in service_ports:
            counts["client"] += 1
        else:
            counts["other"] += 1
    return counts


def process_sample(pid: int) -> dict[str, Any]:
    rss, _ = memory_kib(pid)
    return {
        "rss_kib": rss,
        "fds": len(open_fds(pid)),
        "threads": thread_count(pid),
        "cpu_seconds": round(cpu_seconds(pid), 2),
    }


def tunneld_sample(pid: int) -> dict[str, Any]:
    """RSS, threads, CPU and the fds of tunneld, classified with its namespace's TCP table."""
    sample = process_sample(pid)
    sockets: dict[int, TcpSocket] = {}
    for name in ("tcp", "tcp6"):
        try:
            sockets.update(parse_proc_net_tcp(Path(f"/proc/{pid}/net/{name}").read_text()))
        except OSError:
            continue
    counts = classify_fds(open_fds(pid), sockets)
    sample["fds"] = counts.pop("total")
    sample["fd_kinds"] = counts
    return sample


class Sampler:
    """Samples tunneld and its wireguard-go every ``interval`` seconds, in a thread, from its
    start (t = 0) to its stop (a last sample then); ``phase`` names what runs meanwhile."""

    def __init__(self, tunneld_pid: int, wireguard_go_pid: int, interval: float) -> None:
        self.tunneld_pid, self.wireguard_go_pid, self.interval = (
            tunneld_pid,
            wireguard_go_pid,
            interval,
        )
        self.samples: list[dict[str, Any]] = []
        self.phase = "-"
        self.started = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="soak-sampler", daemon=True)

    def take(self, t: float | None = None) -> dict[str, Any]:
        return {
            "t": round(time.monotonic() - self.started if t is None else t, 1),
            "phase": self.phase,
            "tunneld": tunneld_sample(self.tunneld_pid),
            "wireguard_go": process_sample(self.wireguard_go_pid),
        }

    def __enter__(self) -> Sampler:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.samples.append(self.take())

    def _loop(self) -> None:
        number = 0
        while True:
            self.samples.append(self.take())
            number += 1
            delay = self.started + number * self.interval - time.monotonic()
            if self._stop.wait(max(0.0, delay)):
                return


# -- analysis (pure) ----------------------------------------------------------------------------


def warmup_seconds(duration_seconds: float) -> float:
    """The first 20 % of the load, at least 30 s and at most 2 min — and at most half of it."""
    return min(max(0.2 * duration_seconds, 30.0), 120.0, duration_seconds / 2)


def least_squares_slope(points: Sequence[tuple[float, float]]) -> float | None:
    """The slope of the least-squares line through ``(x, y)`` points; None if undefined."""
    if len(points) < 2:
        return None
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


def quarter_growth(values: Sequence[float]) -> float | None:
    """Median of the last quarter minus median of the first quarter (a quarter being at least
    one value); None without values."""
    if not values:
        return None
    quarter = max(1, len(values) // 4)
    return statistics.median(values[-quarter:]) - statistics.median(values[:quarter])


def series_figures(
    points: Sequence[tuple[float, float]], warmup: float, scale: float = 1.0
) -> dict[str, Any]:
    """Of one series of ``(t seconds, value)``: at the end of the warm-up, at the end, max after
    the warm-up, growth after it (absolute and % of the first post-warm-up quarter's median),
    and the least-squares slope per hour. Values are divided by ``scale`` (KiB → MiB: 1024)."""
    scaled = [(t, value / scale) for t, value in points]
    post = [(t, value) for t, value in scaled if t >= warmup]
    values = [value for _, value in post]
    growth = quarter_growth(values)
    base = statistics.median(values[: max(1, len(values) // 4)]) if values else None
    slope = least_squares_slope(post)
    return {
        "samples_after_warmup": len(post),
        "at_warmup_end": post[0][1] if post else None,
        "at_end": scaled[-1][1] if scaled else None,
        "max_after_warmup": max(values) if values else None,
        "growth": growth,
        "growth_percent": growth / base * 100 if growth is not None and base else None,
        "slope_per_hour": slope * 3600 if slope is not None else None,
    }


def judge(
    rss_growth_mib: float | None,
    post_warmup_samples: int,
    fds_before: dict[str, Any],
    fds_after: dict[str, Any],
    pool_bound: int,
) -> tuple[str, list[str]]:
    """ "flat", "growing" or "inconclusive" (too few samples after the warm-up), and why.

    ``fds_before``/``fds_after`` are idle tunneld samples (``fds`` and ``fd_kinds``). The idle
    keep-alive connections to the origin are not counted against the idle fd count: tunneld
    keeps up to ``pool_bound`` of them by design; more than that is growth.
    """
    if post_warmup_samples < MIN_POST_WARMUP_SAMPLES or rss_growth_mib is None:
        return "inconclusive", [
            f"only {post_warmup_samples} samples after the warm-up "
            f"(at least {MIN_POST_WARMUP_SAMPLES} needed)"
        ]
    growing = False
    reasons = []
    if rss_growth_mib > RSS_FLAT_MIB:
        growing = True
        reasons.append(f"RSS grew {rss_growth_mib:.2f} MiB after the warm-up (> {RSS_FLAT_MIB:g})")
    else:
        reasons.append(
            f"RSS growth after the warm-up {rss_growth_mib:.2f} MiB (≤ {RSS_FLAT_MIB:g})"
        )
    before = fds_before["fds"] - fds_before["fd_kinds"]["origin"]
    after = fds_after["fds"] - fds_after["fd_kinds"]["origin"]
    pooled = fds_after["fd_kinds"]["origin"]
    if abs(after - before) > FD_TOLERANCE:
        growing = True
        reasons.append(
            f"{after} fds after the load besides origin connections, {before} before "
            f"(more than ±{FD_TOLERANCE})"
        )
    else:
        reasons.append(
            f"fds after the load back to idle: {after} besides origin connections, "
            f"{before} before (±{FD_TOLERANCE})"
        )
    if pooled > pool_bound:
        growing = True
        reasons.append(
            f"{pooled} connections to the origin left open, above the pool's bound {pool_bound}"
        )
    else:
        reasons.append(f"{pooled} idle connections to the origin kept (pool bound {pool_bound})")
    return ("growing" if growing else "flat"), reasons


def analyze(
    samples: Sequence[dict[str, Any]],
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    pool_bound: int,
) -> dict[str, Any]:
    """Every figure of the report from the samples of the load and the two idle samples."""
    if not samples:
        return {"verdict": "inconclusive", "reasons": ["no sample was taken"]}
    duration = float(samples[-1]["t"])
    warmup = warmup_seconds(duration)

    def points(process: str, key: str) -> list[tuple[float, float]]:
        return [(float(s["t"]), float(s[process][key])) for s in samples]

    other_fds = [(float(s["t"]), float(s["tunneld"]["fd_kinds"]["other"])) for s in samples]

    figures = {
        "tunneld_rss_mib": series_figures(points("tunneld", "rss_kib"), warmup, 1024),
        "tunneld_fds": series_figures(points("tunneld", "fds"), warmup),
        "tunneld_other_fds": series_figures(other_fds, warmup),
        "tunneld_threads": series_figures(points("tunneld", "threads"), warmup),
        "wireguard_go_rss_mib": series_figures(points("wireguard_go", "rss_kib"), warmup, 1024),
        "wireguard_go_fds": series_figures(points("wireguard_go", "fds"), warmup),
    }
    cpu = points("tunneld", "cpu_seconds")
    rss = figures["tunneld_rss_mib"]
    if before is None or after is None:
        missing = " and ".join(
            name for name, idle in (("before", before), ("after", after)) if idle is None
        )
        verdict, reasons = "inconclusive", [f"no idle sample {missing} the load (stopped early)"]
    else:
        verdict, reasons = judge(
            rss["growth"], rss["samples_after_warmup"], before["tunneld"], after["tunneld"],
            pool_bound,
        )  # fmt: skip
    return {
        "load_seconds": duration,
        "warmup_seconds": warmup,
        "tunneld_cpu_seconds": round(cpu[-1][1] - cpu[0][1], 2),
        **figures,
        "verdict": verdict,
        "reasons": reasons,
    }


ERROR_KEYS = ("connect", "read", "write", "timeout", "status")


def tally(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Requests and errors summed from the runs' wrk (and iperf3) results, per kind and in all.

    Errors are wrk's socket errors (connect, read, write, timeout) and its non-2xx answers
    (``status``); a run that failed outright counts as failed, with whatever it reported."""
    kinds: dict[str, dict[str, Any]] = {}
    for run in runs:
        entry = kinds.setdefault(
            run["kind"],
            {
                "runs": 0,
                "failed_runs": 0,
                "requests": 0,
                "seconds": 0.0,
                "bytes": 0,
                "errors": dict.fromkeys(ERROR_KEYS, 0),
                "mbit_per_second": [],
            },
        )
        entry["runs"] += 1
        entry["failed_runs"] += 0 if run["ok"] else 1
        entry["requests"] += run.get("requests", 0)
        entry["seconds"] += run.get("seconds", 0.0)
        entry["bytes"] += run.get("bytes", 0)
        for key, value in run.get("errors", {}).items():
            entry["errors"][key] = entry["errors"].get(key, 0) + value
        if run.get("bits_per_second") and run.get("tool") == "iperf3" and run["ok"]:
            entry["mbit_per_second"].append(round(run["bits_per_second"] / 1e6, 1))
    for entry in kinds.values():
        entry["requests_per_second"] = (
            entry["requests"] / entry["seconds"] if entry["seconds"] > 0 else None
        )
        entry["error_count"] = sum(entry["errors"].values())
    return {
        "kinds": kinds,
        "requests": sum(entry["requests"] for entry in kinds.values()),
        "errors": sum(entry["error_count"] for entry in kinds.values()),
        "socket_errors": sum(
            entry["error_count"] - entry["errors"]["status"] for entry in kinds.values()
        ),
        "status_errors": sum(entry["errors"]["status"] for entry in kinds.values()),
        "failed_runs": sum(entry["failed_runs"] for entry in kinds.values()),
        "runs": len(runs),
    }


def series_rows(samples: Sequence[dict[str, Any]], every: float) -> list[dict[str, Any]]:
    """About one sample per ``every`` seconds (the first at or after each multiple, within a
    second), and the last one."""
    rows: list[dict[str, Any]] = []
    next_t = 0.0
    for sample in samples:
        if sample["t"] >= next_t - 1.0:
            rows.append(sample)
            next_t = (math.floor(sample["t"] / every + 1e-9) + 1) * every
    if samples and rows[-1] is not samples[-1]:
        rows.append(samples[-1])
    return rows


def tunneld_request_counts(metrics_text: str) -> dict[str, float]:
    """``tunneld_requests_total`` summed per service, from tunneld's /metrics text."""
    counts: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if not line.startswith("tunneld_requests_total{"):
            continue
        labels, _, value = line.rpartition(" ")
        service = labels.split('service="', 1)[1].split('"', 1)[0] if "service=" in labels else "?"
        counts[service] = counts.get(service, 0.0) + float(value)
    return counts


# -- markdown (pure) -----------------------------------------------------------------------------


def _num(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _signed(value: float | None, digits: int = 1, unit: str = "") -> str:
    return "—" if value is None else f"{value:+,.{digits}f}{unit}"


def _mib(kib: float | None) -> str:
    return "—" if kib is None else f"{kib / 1024:.1f}"


def _idle_row(label: str, sample: dict[str, Any] | None) -> str:
    if sample is None:
        return f"| {label} | — | — | — | — | — | — |"
    tunneld, wg = sample["tunneld"], sample["wireguard_go"]
    kinds = tunneld["fd_kinds"]
    return (
        f"| {label} | {_mib(tunneld['rss_kib'])} | {tunneld['fds']} "
        f"({kinds['origin']} to the origin) | {tunneld['threads']} "
        f"| {_mib(wg['rss_kib'])} | {wg['fds']} | {wg['threads']} |"
    )


def render_markdown(result: dict[str, Any]) -> str:
    settings, analysis, totals = result["settings"], result["analysis"], result["tally"]
    load_seconds = analysis.get("load_seconds") or 0.0
    lines = [
        f"# tunneld soak — {result['finished_at']}",
        "",
        *report.machine_lines(result["machine"]),
        f"- planned {settings['minutes']:g} min of load, ran {load_seconds:.0f} s; samples every "
        f"{settings['sample_seconds']:g} s; warm-up: the first "
        f"{analysis.get('warmup_seconds', 0):.0f} s; "
        f"load average at start {result['load_average_start']}, at end "
        f"{result['load_average_end']}",
        "- only tunneld is loaded, from the gateway netns through the tunnel; kinds rotate back "
        "to back: "
        + ", ".join(f"{k['kind']} {k['seconds']} s" for k in settings["cycle"])
        + " (then again)",
        f"- tunneld keeps up to {settings['upstream_idle_connections']} idle keep-alive "
        "connections to the origin",
        *(
            [f"- tunneld run from {settings['tunneld_src']} (not the installed package)"]
            if settings.get("tunneld_src", "installed") != "installed"
            else []
        ),
        "",
        f"## Verdict: **{analysis['verdict']}**",
        "",
        *(f"- {reason}" for reason in analysis["reasons"]),
        "",
    ]
    if result.get("aborted"):
        lines += [f"**The run was aborted:** {result['aborted']}", ""]
    goal = (
        f" (the issue asks for ≥ {ISSUE_GOAL_REQUESTS:,} in 10 min: "
        f"{'met' if totals['requests'] >= ISSUE_GOAL_REQUESTS else 'not met'})"
        if settings["minutes"] >= 10
        else ""
    )
    lines += [
        "## Load",
        "",
        "| kind | what | runs | requests | req/s | errors | failed runs |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for entry in settings["cycle"]:
        kind = totals["kinds"].get(entry["kind"])
        if kind is None:
            lines.append(f"| {entry['kind']} | {entry['what']} | 0 | | | | |")
            continue
        if kind["mbit_per_second"]:
            rate = f"{statistics.median(kind['mbit_per_second']):,.0f} Mbit/s"
            requests = "—"
        else:
            rate = _num(kind["requests_per_second"])
            requests = _num(kind["requests"])
        lines.append(
            f"| {entry['kind']} | {entry['what']} | {kind['runs']} | {requests} | {rate} "
            f"| {_num(kind['error_count'])} | {kind['failed_runs']} |"
        )
    per_second = totals["requests"] / load_seconds if load_seconds else None
    cpu = analysis.get("tunneld_cpu_seconds")
    lines += [
        f"| **all** | {_num(load_seconds)} s | {totals['runs']} | **{_num(totals['requests'])}** "
        f"| {_num(per_second)} | {_num(totals['errors'])} | {totals['failed_runs']} |",
        "",
        f"Requests: {totals['requests']:,}{goal}. Errors: {totals['socket_errors']:,} socket "
        f"(connect, read, write, timeout), {totals['status_errors']:,} non-2xx. tunneld CPU: "
        f"{_num(cpu, 1)} s"
        + (
            f", {cpu / totals['requests'] * 1000:.3f} s per 1,000 requests (all kinds)."
            if cpu and totals["requests"]
            else "."
        ),
        "",
    ]
    counted = result.get("tunneld_requests", {})
    if counted:
        lines += [
            "tunneld's own count (`tunneld_requests_total`, primer and readiness checks "
            "included): " + ", ".join(f"{k} {v:,.0f}" for k, v in counted.items()),
            "",
        ]
    lines += _memory_lines(result, analysis)
    return "\n".join(lines).rstrip() + "\n"


def _memory_lines(result: dict[str, Any], analysis: dict[str, Any]) -> list[str]:
    if "tunneld_rss_mib" not in analysis:
        return []
    names = (
        ("tunneld RSS MiB", "tunneld_rss_mib", 1),
        ("tunneld fds", "tunneld_fds", 0),
        ("tunneld fds besides connections", "tunneld_other_fds", 0),
        ("tunneld threads", "tunneld_threads", 0),
        ("wireguard-go RSS MiB", "wireguard_go_rss_mib", 1),
        ("wireguard-go fds", "wireguard_go_fds", 0),
    )
    lines = [
        "## Memory and fds after the warm-up",
        "",
        "| | at warm-up end | at end | max after warm-up | growth (median of last ¼ - of first ¼) "
        "| slope / hour |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for title, key, digits in names:
        figures = analysis[key]
        percent = figures["growth_percent"]
        lines.append(
            f"| {title} | {_num(figures['at_warmup_end'], digits)} "
            f"| {_num(figures['at_end'], digits)} "
            f"| {_num(figures['max_after_warmup'], digits)} "
            f"| {_signed(figures['growth'], max(digits, 1))}"
            + (f" ({percent:+.1f} %)" if percent is not None else "")
            + f" | {_signed(figures['slope_per_hour'], max(digits, 1))} |"
        )
    lines += [
        "",
        "During the load tunneld's fds follow the kind running (its client connections, relays "
        "and pooled connections to the origin); those besides connections (listeners, epoll, "
        "pipes, files, UDP) should not move at all. wireguard-go is Go: its RSS follows the "
        "traffic and is returned to the OS lazily.",
        "",
        "### Idle, before and after the load",
        "",
        "| | tunneld RSS MiB | tunneld fds | tunneld threads | wireguard-go RSS MiB "
        "| wireguard-go fds | wireguard-go threads |",
        "|---|---:|---:|---:|---:|---:|---:|",
        _idle_row("before (after the primer)", result.get("idle_before")),
        _idle_row(f"after ({IDLE_SETTLE_SECONDS:g} s idle)", result.get("idle_after")),
        "",
    ]
    samples = result["samples"]
    every = 60.0 if (analysis.get("load_seconds") or 0) >= 300 else 10.0
    lines += [
        f"### Samples (one per {every:g} s; all {len(samples)} are in soak.json)",
        "",
        "| t s | running | tunneld RSS MiB | fds | to origin | threads | CPU s (total) "
        "| wireguard-go RSS MiB | wireguard-go fds |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for sample in series_rows(samples, every):
        tunneld, wg = sample["tunneld"], sample["wireguard_go"]
        lines.append(
            f"| {sample['t']:.0f} | {sample['phase']} | {_mib(tunneld['rss_kib'])} "
            f"| {tunneld['fds']} | {tunneld['fd_kinds']['origin']} | {tunneld['threads']} "
            f"| {tunneld['cpu_seconds']:.1f} | {_mib(wg['rss_kib'])} | {wg['fds']} |"
        )
    return [*lines, ""]


# -- the run --------------------------------------------------------------------------------------


def _timestamp(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


class Soak:
    """One soak: what it measured so far, so that an aborted run still writes its results."""

    def __init__(
        self,
        minutes: float,
        upstream_idle: int,
        tunneld_src: Path | None,
        log: Callable[[str], None],
    ) -> None:
        self.minutes = minutes
        self.upstream_idle = upstream_idle
        self.tunneld_src = tunneld_src
        self.log = log
        self.schedule = cycle(minutes * 60)
        self.started = time.time()
        self.load_average_start = load_average()
        self.machine = machine_description()
        self.identity: dict[str, Any] = {}
        self.runs: list[dict[str, Any]] = []
        self.sampler: Sampler | None = None
        self.idle_before: dict[str, Any] | None = None
        self.idle_after: dict[str, Any] | None = None
        self.metrics_text = ""
        self.aborted = ""

    def _load(
        self, topology: Topology, kind: Kind, seconds: int
    ) -> tuple[LoadResult, dict[str, Any]]:
        workload = kind.with_seconds(seconds)
        started = time.monotonic()
        result, command = run_load(topology.gateway_ns, workload, TARGETS_BY_NAME[kind.target])
        record = {
            "kind": kind.name,
            "target": kind.target,
            "tool": workload.kind,
            "command": command,
            "started_t": round(started - self.sampler.started, 1) if self.sampler else None,
            **dataclasses.asdict(result),
        }
        return result, record

    def run(self, topology: Topology) -> None:
        """Prime, idle sample, the rotating load with the sampler running, idle sample."""
        self.identity = topology.identity()
        tunneld_pid = topology.pid("tunneld")
        sampler = Sampler(tunneld_pid, topology.tunneld_wireguard_go_pid(), SAMPLE_SECONDS)
        self.log(f"priming: {PRIMER_SECONDS} s of each kind")
        for kind in KINDS:
            result, _ = self._load(topology, kind, PRIMER_SECONDS)
            if not result.ok:
                self.log(f"primer {kind.name}: {result.error}")
        time.sleep(IDLE_SETTLE_SECONDS)
        sampler.phase = "idle"
        self.idle_before = sampler.take(0.0)
        self.log(f"idle before: {describe_sample(self.idle_before)}")
        sampler.phase = "start"
        self.sampler = sampler
        duration = self.minutes * 60
        self.log(f"soak: {duration:.0f} s of load, sampling every {SAMPLE_SECONDS:g} s")
        next_report = 60.0
        with sampler:
            deadline = sampler.started + duration
            number = 0
            while (
                step := next_run(self.schedule, number, deadline - time.monotonic())
            ) is not None:
                topology.check_running()
                kind, seconds = step
                sampler.phase = kind.name
                result, record = self._load(topology, kind, seconds)
                self.runs.append(record)
                if not result.ok:
                    self.log(f"{kind.name}: run failed: {result.error}")
                number += 1
                elapsed = time.monotonic() - sampler.started
                if elapsed >= next_report and sampler.samples:
                    totals = tally(self.runs)
                    self.log(
                        f"{elapsed:4.0f} s: {totals['requests']:,} requests, "
                        f"{totals['errors']} errors; {describe_sample(sampler.samples[-1])}"
                    )
                    next_report += 60.0
                time.sleep(SETTLE_SECONDS)
            sampler.phase = "end"
        sampler.phase = "idle"
        time.sleep(IDLE_SETTLE_SECONDS)
        self.idle_after = sampler.take()
        self.log(f"idle after: {describe_sample(self.idle_after)}")
        self.metrics_text = topology.tunneld_metrics()

    @property
    def runs_failed(self) -> bool:
        return any(not run["ok"] for run in self.runs)

    def result(self) -> dict[str, Any]:
        samples = list(self.sampler.samples) if self.sampler else []
        finished = time.time()
        result: dict[str, Any] = {
            "schema": 1,
            "mode": "soak",
            "run": self.identity,
            "started_at": _timestamp(self.started),
            "finished_at": _timestamp(finished),
            "elapsed_seconds": round(finished - self.started, 1),
            "load_average_start": self.load_average_start,
            "load_average_end": load_average(),
            "settings": {
                "minutes": self.minutes,
                "sample_seconds": SAMPLE_SECONDS,
                "idle_settle_seconds": IDLE_SETTLE_SECONDS,
                "upstream_idle_connections": self.upstream_idle,
                "tunneld_src": str(self.tunneld_src) if self.tunneld_src else "installed",
                "cycle": [
                    {
                        "kind": kind.name,
                        "target": kind.target,
                        "what": kind.workload.title,
                        "seconds": seconds,
                        "command": kind.with_seconds(seconds).describe(),
                    }
                    for kind, seconds in self.schedule
                ],
            },
            "machine": self.machine,
            "tally": tally(self.runs),
            "analysis": analyze(samples, self.idle_before, self.idle_after, self.upstream_idle),
            "idle_before": self.idle_before,
            "idle_after": self.idle_after,
            "tunneld_requests": tunneld_request_counts(self.metrics_text),
            "samples": samples,
            "runs": self.runs,
        }
        if self.aborted:
            result["aborted"] = self.aborted
        return result

    def write(self, output: Path) -> dict[str, Any]:
        result = self.result()
        markdown = render_markdown(result)
        (output / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
        (output / "soak.md").write_text(markdown)
        self.log(f"wrote {output / 'soak.md'} and {output / 'soak.json'}")
        print(markdown)
        return result


def describe_sample(sample: dict[str, Any]) -> str:
    tunneld, wg = sample["tunneld"], sample["wireguard_go"]
    return (
        f"tunneld RSS {tunneld['rss_kib'] / 1024:.1f} MiB, {tunneld['fds']} fds "
        f"({tunneld['fd_kinds']['origin']} to the origin), {tunneld['threads']} threads; "
        f"wireguard-go RSS {wg['rss_kib'] / 1024:.1f} MiB, {wg['fds']} fds"
    )
