"""One measured run: load from the gateway namespace, CPU and memory of every program meanwhile."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.load import run_load
from bench.plan import Step
from bench.procstat import ProcessGroup, RssSampler, cpu_snapshot


def load_average() -> list[float]:
    return [float(value) for value in Path("/proc/loadavg").read_text().split()[:3]]


def measure(
    namespace: str,
    step: Step,
    groups: dict[str, ProcessGroup],
    origin_counters: Callable[[], dict[str, int]] | None = None,
) -> dict[str, Any]:
    """Run ``step`` from ``namespace`` and return its record (what the JSON keeps of it).

    ``origin_counters`` reads the origin's accepted connections and served requests; their
    difference says how many connections the path opened to the origin.
    """
    origin_before = origin_counters() if origin_counters else {}
    before = cpu_snapshot(groups.values())
    load_before = load_average()
    started = time.time()
    with RssSampler(list(groups.values())) as sampler:
        result, command = run_load(namespace, step.workload, step.target)
    after = cpu_snapshot(groups.values())
    origin_after = origin_counters() if origin_counters else {}
    cpu = {name: round(after[name] - before[name], 3) for name in groups}
    record: dict[str, Any] = {
        "repeat": step.repeat,
        "workload": step.workload.name,
        "target": step.target.name,
        "command": command,
        "started": started,
        "load_average_before": load_before,
        **asdict(result),
        "cpu_seconds": cpu,
        "rss": sampler.summary(),
    }
    if origin_counters:
        # The status request itself is one connection and one request.
        record["origin"] = {
            key: origin_after[key] - origin_before[key] - 1 for key in origin_before
        }
    if step.workload.kind == "wrk" and result.requests > 0:
        record["cpu_seconds_per_1k_requests"] = {
            name: round(seconds / result.requests * 1000, 5) for name, seconds in cpu.items()
        }
        if origin_counters:
            opened = record["origin"]["connections"]
            record["origin_connections_per_1k_requests"] = round(opened / result.requests * 1000, 2)
    if step.workload.kind == "iperf3" and result.bytes > 0:
        record["cpu_seconds_per_gb"] = {
            name: round(seconds / (result.bytes / 1e9), 4) for name, seconds in cpu.items()
        }
    return record
