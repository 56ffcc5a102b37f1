"""bench/run --soak: the pure parts (schedule, /proc parsing, analysis, tallies, the table).

No root and no load: the figures come from made-up samples. The verdict is checked on samples
built to be flat or growing, never on a real run's timing.
"""

from __future__ import annotations

from typing import Any

import pytest

from bench import soak
from bench.load import parse_wrk


def wrk_output(requests: int, status: int = 0, connect: int = 0, read: int = 0) -> str:
    return (
        "Running 10s test @ http://10.44.0.2:80/\n"
        f'BENCH_JSON {{"requests":{requests},"duration_us":10000000,"bytes":{requests * 150},'
        f'"errors":{{"connect":{connect},"read":{read},"write":0,"status":{status},"timeout":0}},'
        '"latency_us":{"min":100,"mean":1500.5,"stdev":300.0,"max":9000,'
        '"p50":1000,"p90":2000,"p99":4000,"p999":8000}}\n'
    )


def run_record(kind: str, output: str) -> dict[str, Any]:
    result = parse_wrk(output)
    return {
        "kind": kind,
        "tool": "wrk",
        "ok": result.ok,
        "requests": result.requests,
        "seconds": result.seconds,
        "bytes": result.bytes,
        "errors": result.errors,
        "bits_per_second": result.bits_per_second,
    }


def sample(
    t: float,
    rss_mib: float,
    fds: int = 20,
    origin: int = 0,
    cpu: float = 0.0,
    wg_rss_mib: float = 10.0,
) -> dict[str, Any]:
    return {
        "t": t,
        "phase": "http-keepalive",
        "tunneld": {
            "rss_kib": int(rss_mib * 1024),
            "fds": fds,
            "threads": 3,
            "cpu_seconds": cpu,
            "fd_kinds": {"origin": origin, "client": 0, "other": fds - origin},
        },
        "wireguard_go": {"rss_kib": int(wg_rss_mib * 1024), "fds": 12, "threads": 8},
    }


def samples_over(seconds: int, rss: Any, every: int = 5) -> list[dict[str, Any]]:
    return [sample(t, rss(t), cpu=t / 10) for t in range(0, seconds + 1, every)]


# -- schedule -----------------------------------------------------------------------------------


def test_the_cycle_is_full_length_for_long_runs_and_shrinks_for_short_ones() -> None:
    full = soak.cycle(600)
    assert [kind.name for kind, _ in full] == [kind.name for kind in soak.KINDS]
    assert dict((kind.name, seconds) for kind, seconds in full)["http-keepalive"] == 26
    keepalive = sum(s for k, s in full if k.name == "http-keepalive")
    assert keepalive > sum(full_seconds for _, full_seconds in full) / 3  # the bulk of the time
    short = soak.cycle(60)
    assert sum(seconds for _, seconds in short) <= 30  # every kind comes round twice in 60 s
    assert all(seconds >= 1 for _, seconds in short)


def test_next_run_rotates_and_is_cut_to_the_time_left() -> None:
    schedule = soak.cycle(600)
    runs = [soak.next_run(schedule, n, 1000) for n in range(len(schedule) + 1)]
    names = [run[0].name for run in runs if run is not None]
    assert names[: len(schedule)] == [kind.name for kind in soak.KINDS]
    assert names[-1] == names[0]
    assert soak.next_run(schedule, 0, 5.7) == (schedule[0][0], 5)
    assert soak.next_run(schedule, 0, 0.9) is None


def test_kinds_use_tunneld_targets_and_close_and_10k_workloads() -> None:
    kinds = soak.KINDS_BY_NAME
    assert {kind.target for kind in soak.KINDS} == {"tunneld-http", "tunneld-tcp"}
    assert kinds["http-close"].workload.new_connection_per_request
    assert kinds["http-10k"].workload.path == "/files/10k.bin"
    assert kinds["tcp-bulk"].workload.kind == "iperf3"
    assert kinds["tcp-keepalive"].with_seconds(7).describe().startswith("wrk -t2 -c50 -d7s")


# -- /proc parsing --------------------------------------------------------------------------------

PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0200440A:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 101 1
   1: 0100007F:C350 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 102 1
   2: 0100007F:C351 0100007F:1F90 08 00000000:00000000 00:00000000 00000000     0        0 103 1
   3: 0200440A:0050 0100440A:9C40 01 00000000:00000000 00:00000000 00000000     0        0 104 1
   4: 0200440A:1F95 0100440A:9C41 01 00000000:00000000 00:00000000 00000000     0        0 105 1
   5: 0100007F:2511 0100007F:C352 01 00000000:00000000 00:00000000 00000000     0        0 106 1
"""


def test_proc_net_tcp_is_parsed_into_addresses_ports_and_states() -> None:
    sockets = soak.parse_proc_net_tcp(PROC_NET_TCP, little_endian=True)
    assert sockets[101] == soak.TcpSocket("10.68.0.2", 80, "0.0.0.0", 0, "0A")
    assert sockets[102].remote_address == "127.0.0.1"
    assert sockets[102].remote_port == 8080
    assert sockets[105].local_port == 8085
    six = (
        "  sl  local_address                         remote_address ...\n"
        "   0: 0000000000000000FFFF00000100007F:C350 0000000000000000FFFF00000100007F:1F90 "
        "01 00000000:00000000 00:00000000 00000000 0 0 201 1\n"
    )
    assert soak.parse_proc_net_tcp(six, little_endian=True)[201].remote_address == "127.0.0.1"


def test_fds_are_split_into_origin_client_and_other() -> None:
    sockets = soak.parse_proc_net_tcp(PROC_NET_TCP, little_endian=True)
    targets = [
        *(f"socket:[{inode}]" for inode in range(101, 107)),
        "socket:[999]",  # not TCP (UDP, unix)
        "anon_inode:[eventpoll]",
        "pipe:[5]",
        "/dev/null",
    ]
    counts = soak.classify_fds(targets, sockets)
    # 102, 103: to the origin (whatever their state); 104, 105: clients on 80 and 8085;
    # the listener, the unrelated loopback socket and the non-TCP fds: other.
    assert counts == {"total": 10, "origin": 2, "client": 2, "other": 6}


# -- analysis ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("duration", "warmup"),
    [(600, 120), (300, 60), (100, 30), (60, 30), (40, 20), (3600, 120)],
)
def test_warmup_is_a_fifth_of_the_run_within_bounds(duration: float, warmup: float) -> None:
    assert soak.warmup_seconds(duration) == warmup


def test_least_squares_slope() -> None:
    assert soak.least_squares_slope([(0, 1), (1, 3), (2, 5)]) == pytest.approx(2)
    assert soak.least_squares_slope([(0, 0), (1, 1), (2, 0), (3, 1)]) == pytest.approx(0.2)
    assert soak.least_squares_slope([(0, 1)]) is None
    assert soak.least_squares_slope([(5, 1), (5, 2)]) is None


def test_quarter_growth_compares_the_medians_of_the_first_and_last_quarters() -> None:
    assert soak.quarter_growth([10, 11, 10, 50, 10, 10, 12, 12]) == pytest.approx(1.5)
    assert soak.quarter_growth([5.0]) == 0
    assert soak.quarter_growth([]) is None


def test_series_figures_ignore_the_warmup() -> None:
    # A steep rise during the warm-up (0-30 s), then flat at 40 MiB with one spike.
    points = [(t, 20.0 + t if t < 30 else 40.0) for t in range(0, 61, 5)]
    points[9] = (45, 43.0)
    figures = soak.series_figures([(t, v * 1024) for t, v in points], warmup=30, scale=1024)
    assert figures["samples_after_warmup"] == 7
    assert figures["at_warmup_end"] == 40
    assert figures["at_end"] == 40
    assert figures["max_after_warmup"] == 43
    assert figures["growth"] == 0
    assert figures["growth_percent"] == 0
    assert figures["slope_per_hour"] == pytest.approx(0, abs=300)


def test_slope_is_per_hour() -> None:
    points = [(float(t), 100 + t / 60) for t in range(0, 601, 5)]  # 1 MiB per minute
    figures = soak.series_figures(points, warmup=120)
    assert figures["slope_per_hour"] == pytest.approx(60)
    assert figures["growth"] == pytest.approx(6, abs=0.5)
    assert figures["growth_percent"] == pytest.approx(6 / 102.8 * 100, abs=0.5)


IDLE_BEFORE = sample(0, 40, fds=15, origin=0)
IDLE_AFTER_FLAT = sample(70, 41, fds=65, origin=50)  # 50 pooled origin connections, 15 others


def test_a_flat_run_is_flat() -> None:
    samples = samples_over(600, lambda t: 30 + min(t, 60) / 6 + (t % 10) / 10)
    analysis = soak.analyze(samples, IDLE_BEFORE, IDLE_AFTER_FLAT, 64)
    assert analysis["warmup_seconds"] == 120
    assert analysis["verdict"] == "flat", analysis["reasons"]
    assert analysis["tunneld_rss_mib"]["growth"] == pytest.approx(0, abs=0.2)
    assert analysis["tunneld_cpu_seconds"] == 60
    assert analysis["tunneld_other_fds"]["growth"] == 0
    assert any("50 idle connections to the origin" in r for r in analysis["reasons"])


def test_growing_rss_is_growing() -> None:
    samples = samples_over(600, lambda t: 30 + t / 100)  # 6 MiB over the run
    analysis = soak.analyze(samples, IDLE_BEFORE, IDLE_AFTER_FLAT, 64)
    assert analysis["verdict"] == "growing"
    assert analysis["tunneld_rss_mib"]["growth"] > soak.RSS_FLAT_MIB
    assert analysis["tunneld_rss_mib"]["slope_per_hour"] == pytest.approx(36)
    assert "RSS grew" in analysis["reasons"][0]


def test_fds_not_back_to_idle_are_growing() -> None:
    flat = samples_over(600, lambda t: 30.0)
    leaked = sample(610, 30, fds=15 + 3, origin=0)
    verdict, reasons = soak.judge(0.0, 96, IDLE_BEFORE["tunneld"], leaked["tunneld"], 64)
    assert verdict == "growing"
    assert "18 fds after the load besides origin connections, 15 before" in reasons[1]
    within = sample(610, 30, fds=15 + 2, origin=0)
    assert soak.judge(0.0, 96, IDLE_BEFORE["tunneld"], within["tunneld"], 64)[0] == "flat"
    too_many_origin = sample(610, 30, fds=15 + 80, origin=80)
    verdict, reasons = soak.judge(0.0, 96, IDLE_BEFORE["tunneld"], too_many_origin["tunneld"], 64)
    assert verdict == "growing"
    assert "above the pool's bound 64" in reasons[2]
    analysis = soak.analyze(flat, IDLE_BEFORE, leaked, 64)
    assert analysis["verdict"] == "growing"


def test_too_short_a_run_is_inconclusive() -> None:
    samples = samples_over(20, lambda t: 30.0)  # warm-up 10 s: 3 samples after it
    analysis = soak.analyze(samples, IDLE_BEFORE, IDLE_AFTER_FLAT, 64)
    assert analysis["verdict"] == "inconclusive"
    assert soak.analyze([], None, None, 64)["verdict"] == "inconclusive"
    missing_idle = soak.analyze(samples_over(600, lambda t: 30.0), IDLE_BEFORE, None, 64)
    assert missing_idle["verdict"] == "inconclusive"
    assert missing_idle["reasons"] == ["no idle sample after the load (stopped early)"]
    assert missing_idle["tunneld_rss_mib"]["growth"] == 0  # the figures are still there


# -- tallies and the table -----------------------------------------------------------------------


def test_tally_sums_requests_and_errors_from_wrk_output() -> None:
    runs = [
        run_record("http-keepalive", wrk_output(50_000)),
        run_record("http-keepalive", wrk_output(48_000, status=3)),
        run_record("http-close", wrk_output(12_000, connect=2, read=1)),
        run_record("http-close", "unable to connect to 10.44.0.2:80 Connection refused\n"),
        {"kind": "tcp-bulk", "tool": "iperf3", "ok": True, "bits_per_second": 4e8, "bytes": 1},
    ]
    totals = soak.tally(runs)
    assert totals["requests"] == 110_000
    assert totals["errors"] == 6
    assert totals["status_errors"] == 3
    assert totals["socket_errors"] == 3
    assert totals["failed_runs"] == 1
    assert totals["runs"] == 5
    keepalive = totals["kinds"]["http-keepalive"]
    assert keepalive["requests"] == 98_000
    assert keepalive["requests_per_second"] == pytest.approx(4_900)
    assert totals["kinds"]["http-close"]["errors"]["connect"] == 2
    assert totals["kinds"]["tcp-bulk"]["mbit_per_second"] == [400.0]


def test_series_rows_pick_about_one_sample_per_interval_and_the_last() -> None:
    samples = [sample(round(5.3 * k, 1), 30) for k in range(37)]
    rows = soak.series_rows(samples, 60)
    # A sample every 5.3 s: the first at or after each minute, then the last.
    assert [round(row["t"]) for row in rows] == [0, 64, 122, 180, 191]
    assert soak.series_rows([], 60) == []


def test_tunneld_request_counts_sum_per_service() -> None:
    text = (
        "# HELP tunneld_requests_total HTTP requests answered\n"
        'tunneld_requests_total{code="200",service="bench-http"} 1.5e+06\n'
        'tunneld_requests_total{code="502",service="bench-http"} 2.0\n'
        'tunneld_request_duration_seconds_count{service="bench-http"} 9.0\n'
    )
    assert soak.tunneld_request_counts(text) == {"bench-http": 1_500_002.0}


def test_the_markdown_shows_the_totals_the_figures_and_the_verdict() -> None:
    samples = samples_over(600, lambda t: 30.0)
    runs = [run_record("http-keepalive", wrk_output(600_000)), run_record("http-close", "")]
    result = {
        "finished_at": "now",
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
        "load_average_start": [0, 0, 0],
        "load_average_end": [1, 1, 1],
        "settings": {
            "minutes": 10,
            "sample_seconds": 5,
            "upstream_idle_connections": 64,
            "cycle": [
                {"kind": kind.name, "what": kind.workload.title, "seconds": seconds}
                for kind, seconds in soak.cycle(600)
            ],
        },
        "tally": soak.tally(runs),
        "analysis": soak.analyze(samples, IDLE_BEFORE, IDLE_AFTER_FLAT, 64),
        "idle_before": IDLE_BEFORE,
        "idle_after": IDLE_AFTER_FLAT,
        "tunneld_requests": {"bench-http": 600_123.0},
        "samples": samples,
    }
    markdown = soak.render_markdown(result)
    assert "## Verdict: **flat**" in markdown
    assert "| http-keepalive | 31-byte body, keep-alive, 50 connections | 1 | 600,000 |" in markdown
    assert "| http-close |" in markdown and "| tcp-bulk |" in markdown
    assert "**600,000**" in markdown
    assert "not met" in markdown  # 600,000 < 1,000,000 in a 10-minute run
    assert "| tunneld RSS MiB | 30.0 | 30.0 | 30.0 | +0.0 (+0.0 %) | +0.0 |" in markdown
    assert "| before (after the primer) | 40.0 | 15 (0 to the origin) |" in markdown
    table = markdown.split("### Samples (one per 60 s; all 121 are in soak.json)")[1]
    times = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")]
    assert times[1:] == [str(t) for t in range(0, 601, 60)]  # after the header row
