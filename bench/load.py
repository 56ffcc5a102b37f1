"""The load generators, run in the gateway namespace: wrk (HTTP) and iperf3 (bulk TCP).

Each run is bounded: wrk and iperf3 stop by themselves after their duration, and the harness
kills them if they have not exited some seconds later. Parsing is kept apart from running.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import servers
from bench.plan import Target, Workload
from bench.tools import tool_path

WRK_SCRIPT = Path(__file__).with_name("wrk_report.lua")
GRACE_SECONDS = 20  # beyond a run's duration before the harness kills the load generator


@dataclass
class LoadResult:
    ok: bool
    error: str = ""
    requests: int = 0
    seconds: float = 0.0
    bytes: int = 0
    requests_per_second: float = 0.0
    bits_per_second: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    retransmits: int = 0


def parse_wrk(output: str) -> LoadResult:
    """Read the JSON line that bench/wrk_report.lua prints at the end of a wrk run."""
    for line in output.splitlines():
        if line.startswith("BENCH_JSON "):
            data = json.loads(line.removeprefix("BENCH_JSON "))
            break
    else:
        tail = " | ".join(output.strip().splitlines()[-5:])
        return LoadResult(ok=False, error=f"wrk printed no report: {tail[:300]}")
    seconds = data["duration_us"] / 1e6
    requests = int(data["requests"])
    result = LoadResult(
        ok=requests > 0,
        requests=requests,
        seconds=seconds,
        bytes=int(data["bytes"]),
        requests_per_second=requests / seconds if seconds > 0 else 0.0,
        latency_ms={key: value / 1000 for key, value in data["latency_us"].items()},
        errors={key: int(value) for key, value in data["errors"].items()},
    )
    result.bits_per_second = result.bytes * 8 / seconds if seconds > 0 else 0.0
    if not result.ok:
        result.error = "no request completed"
    return result


def parse_iperf3(output: str) -> LoadResult:
    """Read ``iperf3 -J`` output: the receiver's rate of the one stream."""
    try:
        data: dict[str, Any] = json.loads(output)
    except ValueError:
        return LoadResult(ok=False, error=f"iperf3 printed no JSON: {output.strip()[:300]}")
    if data.get("error"):
        return LoadResult(ok=False, error=f"iperf3: {data['error']}")
    received = data["end"]["sum_received"]
    sent = data["end"].get("sum_sent", {})
    result = LoadResult(
        ok=received["bits_per_second"] > 0,
        seconds=float(received["seconds"]),
        bytes=int(received["bytes"]),
        bits_per_second=float(received["bits_per_second"]),
        retransmits=int(sent.get("retransmits", 0)),
    )
    if not result.ok:
        result.error = "iperf3 moved no data"
    return result


def wrk_argv(workload: Workload, target: Target) -> list[str]:
    argv = [
        tool_path("wrk"),
        f"-t{workload.threads}",
        f"-c{workload.connections}",
        f"-d{workload.duration_seconds}s",
        f"--timeout={workload.timeout_seconds}s",
        "--latency",
        "-s",
        str(WRK_SCRIPT),
        "-H",
        f"Host: {servers.HTTP_HOST}",
    ]
    if workload.new_connection_per_request:
        argv += ["-H", "Connection: close"]
    return [*argv, f"http://{servers.HOST_TUNNEL}:{target.http_port}{workload.path}"]


def iperf3_argv(workload: Workload, target: Target) -> list[str]:
    return [
        tool_path("iperf3"),
        "--client",
        servers.HOST_TUNNEL,
        "--port",
        str(target.bulk_port),
        "--time",
        str(workload.duration_seconds),
        "--connect-timeout",
        "3000",
        "--json",
    ]


def run_load(namespace: str, workload: Workload, target: Target) -> tuple[LoadResult, str]:
    """Run the workload against the target from ``namespace``; return the result and argv."""
    argv = wrk_argv(workload, target) if workload.kind == "wrk" else iperf3_argv(workload, target)
    command = shlex.join(argv)
    try:
        completed = subprocess.run(
            ["ip", "netns", "exec", namespace, *argv],
            capture_output=True,
            text=True,
            timeout=workload.duration_seconds + GRACE_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        seconds = workload.duration_seconds + GRACE_SECONDS
        return LoadResult(ok=False, error=f"did not finish within {seconds}s; killed"), command
    output = completed.stdout + ("\n" + completed.stderr if completed.stderr else "")
    result = parse_wrk(output) if workload.kind == "wrk" else parse_iperf3(completed.stdout)
    if completed.returncode != 0 and result.ok:
        result.ok = False
        result.error = f"exit status {completed.returncode}: {completed.stderr.strip()[:300]}"
    return result, command
