"""bench/run --quick: a smoke test of the benchmark harness, not of performance.

The root test runs the real harness (namespaces, wireguard-go, tunneld, nginx, HAProxy, wrk,
iperf3) once, briefly, and checks that it produced its table and JSON with every target
measured, and that it left no namespace, process or UAPI socket behind. The numbers themselves
are not judged: a busy CI machine may make them anything. The other tests check the harness's
pure parts (parsing, schedule, ratios, the table) without root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import plan, profile, report
from bench.load import parse_iperf3, parse_wrk

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ("direct", "nginx", "haproxy-tcp", "tunneld-http", "tunneld-tcp")
BULK_TARGETS = ("direct", "haproxy-tcp", "tunneld-tcp")


def bench_namespaces() -> set[str]:
    listing = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True
    ).stdout
    return {
        line.split()[0] for line in listing.splitlines() if line.startswith(("tbgw-", "tbhost-"))
    }


def processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in command:
            found.append(f"{entry.name}: {command}")
    return found


@pytest.mark.root
def test_quick_run_measures_every_target_and_leaves_nothing_behind(tmp_path: Path) -> None:
    output = tmp_path / "results"
    result = subprocess.run(
        [str(ROOT / "bench" / "run"), "--quick", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=240,  # the harness itself aims at < 60 s; apt-get may add to the first run
        env={**os.environ, "PYTHON": sys.executable},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]

    report = json.loads((output / "latest.json").read_text())
    markdown = (output / "latest.md").read_text()
    assert report["settings"]["mode"] == "quick"
    assert set(report["summary"]["small"]) == set(TARGETS)
    assert set(report["summary"]["bulk"]) == set(BULK_TARGETS)
    for target, entry in report["summary"]["small"].items():
        assert entry["ok_runs"] == entry["runs"] == 1, (target, entry)
        assert entry["median"] > 0, target
        assert entry["latency_p99_ms"] > 0, target
        assert entry["vs_direct"] > 0, target
    for target, entry in report["summary"]["bulk"].items():
        assert entry["ok_runs"] == 1, (target, entry)
        assert entry["median"] > 0, target
    for target in ("nginx", "haproxy-tcp", "tunneld-http", "tunneld-tcp"):
        assert report["summary"]["small"][target]["proxy_cost"] > 0, target
    assert report["summary"]["small"]["tunneld-http"]["vs_reference"] > 0
    for program in ("tunneld", "nginx-proxy", "haproxy"):
        memory = report["memory"][program]
        assert memory["idle_kib"] > 0
        assert memory["hwm_kib"] >= memory["idle_kib"], program
    assert report["machine"]["cores"] >= 1
    assert report["machine"]["tools"]["nginx"] != "?"
    assert any('code="200"' in line for line in report["tunneld_metrics"])

    for target in TARGETS:
        assert f"| {target} |" in markdown, target
    assert "failed" not in markdown
    assert "CPU seconds per 1,000 requests" in markdown

    # Nothing left behind: its namespaces, its processes (each one's argv names the run's work
    # directory or its interface), its UAPI sockets, its state file.
    run = report["run"]
    assert not set(run["namespaces"]) & bench_namespaces()
    leftovers = processes_mentioning(run["workdir"]) + processes_mentioning(run["id"])
    assert not leftovers, leftovers
    for interface in run["interfaces"]:
        assert not Path(f"/var/run/wireguard/{interface}.sock").exists()
    assert not Path(f"/run/tunneld-bench/{run['id']}.json").exists()
    assert not Path(run["workdir"]).exists()


# -- the pure parts -----------------------------------------------------------------------------

WRK_OUTPUT = """Running 2s test @ http://10.44.0.2:80/
  2 threads and 50 connections
  Latency Distribution
     50%    1.00ms
BENCH_JSON {"requests":20000,"duration_us":2000000,"bytes":3100000,\
"errors":{"connect":0,"read":1,"write":0,"status":2,"timeout":0},\
"latency_us":{"min":100,"mean":1500.5,"stdev":300.0,"max":9000,\
"p50":1000,"p90":2000,"p99":4000,"p999":8000}}
""".replace("\\\n", "")


def test_parse_wrk_reads_the_report_line() -> None:
    result = parse_wrk(WRK_OUTPUT)
    assert result.ok
    assert result.requests == 20000
    assert result.requests_per_second == 10000
    assert result.latency_ms["p99"] == 4.0
    assert result.errors == {"connect": 0, "read": 1, "write": 0, "status": 2, "timeout": 0}


def test_parse_wrk_without_a_report_fails_with_what_wrk_said() -> None:
    result = parse_wrk("unable to connect to 10.44.0.2:80 Connection refused\n")
    assert not result.ok
    assert "Connection refused" in result.error


def test_parse_iperf3_reads_the_receiver_rate_and_errors() -> None:
    output = json.dumps(
        {
            "end": {
                "sum_received": {"seconds": 5.0, "bytes": 400_000_000, "bits_per_second": 6.4e8},
                "sum_sent": {"retransmits": 7},
            }
        }
    )
    result = parse_iperf3(output)
    assert result.ok
    assert result.bits_per_second == 6.4e8
    assert result.retransmits == 7
    failed = parse_iperf3(json.dumps({"error": "unable to connect to server"}))
    assert not failed.ok
    assert "unable to connect" in failed.error


def test_schedule_interleaves_targets_and_rotates_their_order() -> None:
    workloads = plan.full_workloads()
    steps = plan.schedule(plan.TARGETS, workloads, repeats=3)
    http_runs = len(plan.TARGETS) * (len(workloads) - 1) * 3
    bulk_runs = sum(1 for t in plan.TARGETS if t.bulk_port) * 3
    assert len(steps) == http_runs + bulk_runs
    firsts = [s.target.name for s in steps if s.workload.name == "small"][:: len(plan.TARGETS)]
    assert firsts == ["direct", "nginx", "haproxy-tcp"]
    assert {s.target.name for s in steps if s.workload.kind == "iperf3"} == {
        "direct",
        "haproxy-tcp",
        "tunneld-tcp",
    }


def _record(target: str, rps: float, ok: bool = True) -> dict[str, object]:
    return {
        "workload": "small",
        "target": target,
        "ok": ok,
        "error": "" if ok else "boom",
        "requests_per_second": rps,
        "bits_per_second": rps * 8,
        "latency_ms": {"p50": 1.0, "p99": 2.0},
        "errors": {"connect": 0},
        "cpu_seconds_per_1k_requests": {"tunneld": 0.1, "nginx-proxy": 0.05},
        "origin_connections_per_1k_requests": 0.5,
    }


def test_summary_takes_medians_and_ratios_and_the_table_shows_them() -> None:
    workloads = plan.quick_workloads()[:1]
    targets = tuple(plan.TARGETS_BY_NAME[n] for n in ("direct", "nginx", "tunneld-http"))
    records = [
        *(_record("direct", rps) for rps in (900, 1000, 1100)),
        *(_record("nginx", rps) for rps in (500, 800, 700)),
        _record("tunneld-http", 350),
        _record("tunneld-http", 0, ok=False),
    ]
    summary = report.summarize(records, workloads, targets)["small"]
    assert summary["direct"]["median"] == 1000
    assert summary["nginx"]["vs_direct"] == pytest.approx(0.7)
    assert summary["tunneld-http"]["vs_reference"] == pytest.approx(0.5)
    assert summary["tunneld-http"]["failures"] == ["boom"]
    assert summary["tunneld-http"]["proxy_cost"] == 0.1

    markdown = report.render_markdown(
        {
            "machine": {
                "cpu_model": "CPU",
                "cores": 2,
                "memory_mib": 1,
                "os": "OS",
                "kernel": "K",
                "python": "3",
                "python_packages": {"trio": "1"},
                "tools": {"wrk": "4"},
            },
            "settings": {"mode": "quick", "repeats": 3, "upstream_idle_connections": 64},
            "finished_at": "now",
            "elapsed_seconds": 61,
            "load_average_start": [0, 0, 0],
            "load_average_end": [0, 0, 0],
            "summary": {"small": summary},
            "memory": {"tunneld": {"idle_kib": 1024, "steady_kib": 2048}},
        },
        workloads,
    )
    assert "| tunneld-http | 350 |" in markdown
    assert "0.50 nginx" in markdown
    assert "tunneld-http: a run failed: boom" in markdown
    assert "| tunneld | 1.0 | 2.0 |" in markdown


def test_profile_summary_counts_self_and_total_time_of_the_main_thread() -> None:
    site = "/x/.venv/lib/python3.11/site-packages"
    main = f"main (/work/main/tunneld/cli.py:1);run ({site}/trio/_core/_run.py:9)"
    handle = "handle (/work/main/tunneld/proxy/http.py"
    raw = "\n".join(
        [
            f"{main};{handle}:5);send ({site}/trio/_socket.py:7) 30",
            f"{main};{handle}:6) 10",
            f"Thread._bootstrap (/usr/lib/python3.11/threading.py:1);_work ({site}/trio/x.py:2) 5",
        ]
    )
    summary = profile.summarize_raw(raw)
    assert summary.samples == 40
    assert summary.other_thread_samples == 5
    assert summary.self_time["send (trio/_socket.py)"] == 30
    assert summary.total_time["handle (tunneld/proxy/http.py)"] == 40
    assert summary.package_self == {"trio": 30, "tunneld": 10}
    assert summary.module_self["tunneld/proxy/http.py"] == 40
