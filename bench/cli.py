"""bench/run: build the topology, measure every target interleaved, write the results.

Exit codes: 0 done; 1 the run failed or was aborted (partial results are still written);
2 usage error or a tool that could not be installed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from bench import plan, profile, report, servers, soak
from bench.measure import load_average, measure
from bench.tools import ToolError, ensure_tools, machine_description
from bench.topology import WORKDIR_PREFIX, Topology, TopologyError, cleanup_stale

RESULTS = Path(__file__).resolve().parent / "results"
SETTLE_SECONDS = 0.5  # between runs: what the last one left in flight drains
MEASURED_PROGRAMS = ("nginx-proxy", "haproxy", "tunneld", "wireguard-go-host", "origin")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="a smoke test of the harness (< 60 s), not a measure"
    )
    parser.add_argument(
        "--output", type=Path, default=RESULTS, help=f"results directory (default {RESULTS})"
    )
    parser.add_argument("--repeats", type=int, help="runs of each workload per target (full: 3)")
    parser.add_argument(
        "--duration", type=int, default=8, help="seconds of the headline workload (default 8)"
    )
    parser.add_argument(
        "--short-duration", type=int, default=5, help="seconds of the other workloads (default 5)"
    )
    parser.add_argument(
        "--targets",
        help=f"comma-separated subset of {','.join(t.name for t in plan.TARGETS)}",
    )
    parser.add_argument("--workloads", help="comma-separated subset of the workloads")
    parser.add_argument(
        "--upstream-idle",
        type=int,
        default=servers.UPSTREAM_IDLE_CONNECTIONS,
        help="idle keep-alive connections to the origin kept by nginx and tunneld "
        f"(default {servers.UPSTREAM_IDLE_CONNECTIONS}; tunneld's own default is 16)",
    )
    parser.add_argument(
        "--tunneld-src",
        type=Path,
        help="run the tunneld package found in this directory instead of the installed one "
        "(to measure a change against the baseline)",
    )
    parser.add_argument(
        "--keep-logs",
        action="store_true",
        help="copy the programs' logs to OUTPUT/logs (done anyway when a run fails)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of measuring, profile tunneld with py-spy under the small workload, or "
        "those of --workloads (writes OUTPUT/profile.md, profile-http.svg, profile-tcp.svg)",
    )
    parser.add_argument(
        "--profile-seconds", type=int, default=10, help="py-spy sampling time per target"
    )
    parser.add_argument(
        "--soak",
        action="store_true",
        help="instead of measuring, load tunneld alone with a rotating mix for --soak-minutes "
        "and sample its RSS and fds every 5 s: is either growing? (writes OUTPUT/soak.md and "
        "soak.json)",
    )
    parser.add_argument(
        "--soak-minutes",
        type=float,
        default=10.0,
        metavar="N",
        help="minutes of load of --soak (default 10; fractions allowed, e.g. 1 for a smoke run)",
    )
    parser.add_argument(
        "--cleanup", action="store_true", help="only remove what killed runs left behind"
    )
    args = parser.parse_args(argv)
    if args.soak and (args.quick or args.profile):
        parser.error("--soak does not combine with --quick or --profile")
    if args.soak_minutes <= 0:
        parser.error("--soak-minutes must be above 0")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.repeats < 1 or args.duration < 1 or args.short_duration < 1:
        parser.error("--repeats and durations must be at least 1")
    workloads = (
        plan.quick_workloads()
        if args.quick
        else plan.full_workloads(args.duration, args.short_duration)
    )
    if args.workloads:
        wanted = args.workloads.split(",")
        unknown = set(wanted) - {w.name for w in workloads}
        if unknown:
            parser.error(f"unknown workloads {sorted(unknown)}: {[w.name for w in workloads]}")
        workloads = tuple(w for w in workloads if w.name in wanted)
    targets = plan.TARGETS
    if args.targets:
        wanted = args.targets.split(",")
        unknown = set(wanted) - set(plan.TARGETS_BY_NAME)
        if unknown:
            parser.error(f"unknown targets {sorted(unknown)}: {list(plan.TARGETS_BY_NAME)}")
        targets = tuple(t for t in targets if t.name in wanted)
    if args.soak:  # tunneld alone; the other targets' programs still run, idle
        targets = tuple(t for t in plan.TARGETS if t.proxy == "tunneld")
    if args.tunneld_src is not None:
        args.tunneld_src = args.tunneld_src.resolve()
        if not (args.tunneld_src / "tunneld" / "__main__.py").is_file():
            parser.error(f"--tunneld-src {args.tunneld_src}: no tunneld package in it")
    args.workload_plan, args.target_plan = workloads, targets
    args.runs_failed = False
    return args


class Interrupted(Exception):
    """SIGINT, SIGTERM or SIGHUP: stop measuring, clean up, write what was measured."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(f"stopped by {signal.Signals(signum).name}")


def raise_file_limit() -> None:
    """500 client connections plus as many to the origin need more than the usual 1024 fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGINT too: a shell without job control starts background jobs with SIGINT ignored, and
    # Python then never raises KeyboardInterrupt.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _on_signal)
    if args.cleanup:
        log(f"cleaned up after {cleanup_stale(log)} earlier run(s)")
        return 0
    try:
        ensure_tools(log)
    except ToolError as exc:
        log(f"error: {exc}")
        return 2
    cleanup_stale(log)
    raise_file_limit()
    args.output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=WORKDIR_PREFIX) as workdir:
        if args.profile:
            return run_profile(args, Path(workdir))
        if args.soak:
            return run_soak(args, Path(workdir))
        return run_benchmark(args, Path(workdir))


@contextlib.contextmanager
def running_topology(args: argparse.Namespace, workdir: Path) -> Iterator[Topology]:
    """Namespaces, tunneld and the servers, every target answering; torn down on the way out,
    whatever happens (a second Ctrl-C or SIGTERM during the clean-up is ignored)."""
    topology = Topology(workdir, log, args.upstream_idle, args.tunneld_src)
    failed = True
    try:
        log(f"building namespaces {topology.gateway_ns} and {topology.host_ns}")
        topology.build()
        topology.start_gateway()
        log("starting tunneld (userspace backend)")
        topology.start_tunneld()
        log("starting the origin, nginx, HAProxy and iperf3 servers")
        topology.start_servers()
        for name, port in (
            ("iperf3-origin", servers.BULK_ORIGIN_PORT),
            ("iperf3-direct", servers.BULK_DIRECT_PORT),
        ):
            topology.wait_host_listening(name, port)
        topology.wait_http("direct", servers.DIRECT_PORT)
        topology.check_body_files()
        for target in args.target_plan:
            topology.wait_http(target.name, target.http_port)
        yield topology
        failed = False
    finally:
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            log("cleaning up")
            topology.close()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if args.keep_logs or failed or getattr(args, "runs_failed", False):
                keep_logs(workdir, args.output)


def run_benchmark(args: argparse.Namespace, workdir: Path) -> int:
    started = time.time()
    load_start = load_average()
    records: list[dict[str, Any]] = []
    memory: dict[str, dict[str, Any]] = {}
    metrics_text = ""
    aborted = ""
    machine = machine_description()
    run_identity: dict[str, Any] = {}
    try:
        with running_topology(args, workdir) as topology:
            run_identity = topology.identity()
            groups = topology.groups()
            for name in MEASURED_PROGRAMS:
                memory[name] = {"idle_kib": groups[name].rss_kib()}
            steps = plan.schedule(args.target_plan, args.workload_plan, args.repeats)
            if not args.quick:
                warm_up(topology, args.target_plan)
            for number, step in enumerate(steps, 1):
                topology.check_running()
                record = measure(topology.gateway_ns, step, groups, topology.origin_counters)
                records.append(record)
                args.runs_failed = args.runs_failed or not record["ok"]
                log(f"[{number}/{len(steps)}] {describe(record)}")
                time.sleep(SETTLE_SECONDS)
            metrics_text = topology.tunneld_metrics()
            for name in MEASURED_PROGRAMS:
                memory[name]["hwm_kib"] = groups[name].hwm_kib()
    except (TopologyError, Interrupted, KeyboardInterrupt) as exc:
        aborted = str(exc) or type(exc).__name__
        log(f"aborted: {aborted}")
    fill_memory(memory, records)
    result = build_report(
        args, run_identity, machine, started, load_start, records, memory, metrics_text
    )
    if aborted:
        result["aborted"] = aborted
    write_results(args, result)
    return 1 if aborted or args.runs_failed else 0


def run_profile(args: argparse.Namespace, workdir: Path) -> int:
    """Profile tunneld per tunneld target and wrk workload (default: small); write profile.md."""
    names = [t.name for t in args.target_plan if t.proxy == "tunneld"]
    workloads = [w for w in args.workload_plan if w.kind == "wrk"]
    if not args.workloads:
        workloads = [w for w in workloads if w.name == "small"]
    if not names or not workloads:
        log("error: --profile needs a tunneld target and a wrk workload")
        return 2
    profiles = {}
    try:
        with running_topology(args, workdir) as topology:
            warm_up(topology, args.target_plan)
            for workload in workloads:
                for name in names:
                    title = name if workload.name == "small" else f"{name}, {workload.name}"
                    profiles[title] = profile.profile_target(
                        topology.gateway_ns,
                        topology.pid("tunneld"),
                        name,
                        workload,
                        args.profile_seconds,
                        args.output,
                        log,
                        workdir,
                    )
    except (TopologyError, Interrupted, KeyboardInterrupt, subprocess.SubprocessError) as exc:
        log(f"aborted: {exc or type(exc).__name__}")
        return 1
    path = args.output / "profile.md"
    path.write_text(profile.render(profiles))
    log(f"wrote {path}")
    return 0


def run_soak(args: argparse.Namespace, workdir: Path) -> int:
    """bench/run --soak (bench/soak.py); results written even when aborted."""
    session = soak.Soak(args.soak_minutes, args.upstream_idle, args.tunneld_src, log)
    try:
        with running_topology(args, workdir) as topology:
            try:
                session.run(topology)
            finally:
                args.runs_failed = session.runs_failed
    except (TopologyError, Interrupted, KeyboardInterrupt) as exc:
        session.aborted = str(exc) or type(exc).__name__
        log(f"aborted: {session.aborted}")
    session.write(args.output)
    return 1 if session.aborted or session.runs_failed else 0


def warm_up(topology: Topology, targets: tuple[plan.Target, ...]) -> None:
    """A short unmeasured run per target: pools filled, caches and JITs (none) warm."""
    workload = plan.Workload("warm-up", "warm-up", "wrk", 2)
    for target in targets:
        measure(topology.gateway_ns, plan.Step(0, workload, target), {})
        time.sleep(SETTLE_SECONDS)
    log("warmed up")


def describe(record: dict[str, Any]) -> str:
    where = f"{record['workload']:<12} {record['target']:<13}"
    if not record["ok"]:
        return f"{where} FAILED: {record['error']}"
    if record["workload"] == "bulk":
        return f"{where} {record['bits_per_second'] / 1e6:9.0f} Mbit/s"
    errors = sum(record["errors"].values())
    return (
        f"{where} {record['requests_per_second']:9.0f} req/s  p99 "
        f"{record['latency_ms']['p99']:.2f} ms" + (f"  errors {errors}" if errors else "")
    )


def fill_memory(memory: dict[str, dict[str, Any]], records: list[dict[str, Any]]) -> None:
    """Steady RSS: the median sample during the `small` runs of the program's own targets (all
    `small` runs for the programs on every path); max seen: over every run."""
    proxies: dict[str, list[str]] = {}
    for target in plan.TARGETS:
        if target.proxy:
            proxies.setdefault(target.proxy, []).append(target.name)
    for name, entry in memory.items():
        own = proxies.get(name)
        steady = [
            r["rss"][name]["median_kib"]
            for r in records
            if r["workload"] == "small" and name in r["rss"] and (own is None or r["target"] in own)
        ]
        seen = [r["rss"][name]["max_kib"] for r in records if name in r["rss"]]
        entry["steady_kib"] = statistics.median(steady) if steady else None
        entry["max_seen_kib"] = max(seen) if seen else None


def build_report(
    args: argparse.Namespace,
    run_identity: dict[str, Any],
    machine: dict[str, Any],
    started: float,
    load_start: list[float],
    records: list[dict[str, Any]],
    memory: dict[str, dict[str, Any]],
    metrics_text: str,
) -> dict[str, Any]:
    finished = time.time()
    return {
        "schema": 1,
        "run": run_identity,
        "started_at": _timestamp(started),
        "finished_at": _timestamp(finished),
        "elapsed_seconds": round(finished - started, 1),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "settings": {
            "mode": "quick" if args.quick else "full",
            "repeats": args.repeats,
            "upstream_idle_connections": args.upstream_idle,
            "tunneld_src": str(args.tunneld_src) if args.tunneld_src else "installed",
            "targets": [t.name for t in args.target_plan],
            "workloads": {w.name: w.describe() for w in args.workload_plan},
        },
        "machine": machine,
        "targets": {
            t.name: {"description": t.description, "proxy": t.proxy, "reference": t.reference}
            for t in args.target_plan
        },
        "summary": report.summarize(records, args.workload_plan, args.target_plan),
        "memory": memory,
        "runs": records,
        "tunneld_metrics": [
            line
            for line in metrics_text.splitlines()
            if line.startswith(
                (
                    "tunneld_requests_total",
                    "tunneld_upstream_errors_total",
                    "tunneld_active_connections",
                )
            )
        ],
    }


def _timestamp(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def write_results(args: argparse.Namespace, result: dict[str, Any]) -> None:
    markdown = report.render_markdown(result, args.workload_plan)
    (args.output / "latest.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.output / "latest.md").write_text(markdown)
    log(f"wrote {args.output / 'latest.md'} and {args.output / 'latest.json'}")
    print(markdown)


def keep_logs(workdir: Path, output: Path) -> None:
    """After a failure, keep the programs' logs next to the results."""
    target = output / "logs"
    target.mkdir(parents=True, exist_ok=True)
    for path in workdir.glob("*.log"):
        (target / path.name).write_bytes(path.read_bytes())
    log(f"the programs' logs are in {target}")
