"""Medians of the repeated runs, ratios, and the markdown table (pure: records in, text out)."""

from __future__ import annotations

import statistics
from typing import Any

from bench.plan import TARGETS_BY_NAME, Target, Workload

PROGRAMS = ("tunneld", "wireguard-go-host", "wireguard-go-gateway", "origin")


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(
    records: list[dict[str, Any]], workloads: tuple[Workload, ...], targets: tuple[Target, ...]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per workload and target: medians over the successful runs, and ratios.

    The primary number is req/s for wrk workloads and Mbit/s for the bulk workload. ``vs_direct``
    divides it by direct's; ``vs_reference`` by the reference's (nginx for tunneld-http, HAProxy
    for tunneld-tcp).
    """
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for workload in workloads:
        per_target: dict[str, dict[str, Any]] = {}
        for target in targets:
            if not workload.applies_to(target):
                continue
            runs = [
                r for r in records if r["workload"] == workload.name and r["target"] == target.name
            ]
            ok = [r for r in runs if r["ok"]]
            primary = (
                [r["requests_per_second"] for r in ok]
                if workload.kind == "wrk"
                else [r["bits_per_second"] / 1e6 for r in ok]
            )
            entry: dict[str, Any] = {
                "runs": len(runs),
                "ok_runs": len(ok),
                "failures": [r["error"] for r in runs if not r["ok"]],
                "values": [round(value, 1) for value in primary],
                "median": _median(primary),
                "mbit_per_second": _median([r["bits_per_second"] / 1e6 for r in ok]),
                "errors": sum(sum(r["errors"].values()) for r in runs if r.get("errors")),
                "retransmits": sum(r.get("retransmits", 0) for r in ok),
            }
            if workload.kind == "wrk":
                for percentile in ("p50", "p99"):
                    entry[f"latency_{percentile}_ms"] = _median(
                        [r["latency_ms"][percentile] for r in ok]
                    )
                entry["origin_connections_per_1k_requests"] = _median(
                    [
                        r["origin_connections_per_1k_requests"]
                        for r in ok
                        if "origin_connections_per_1k_requests" in r
                    ]
                )
                cost_key = "cpu_seconds_per_1k_requests"
            else:
                cost_key = "cpu_seconds_per_gb"
            programs = ([target.proxy] if target.proxy else []) + [
                p for p in PROGRAMS if p != target.proxy
            ]
            entry[cost_key] = {
                program: _median(
                    [r[cost_key][program] for r in ok if program in r.get(cost_key, {})]
                )
                for program in programs
            }
            entry["proxy_cost"] = entry[cost_key].get(target.proxy) if target.proxy else None
            per_target[target.name] = entry
        direct = per_target.get("direct", {}).get("median")
        for name, entry in per_target.items():
            reference_name = TARGETS_BY_NAME[name].reference
            reference = per_target.get(reference_name, {}).get("median") if reference_name else None
            value = entry["median"]
            entry["vs_direct"] = value / direct if value is not None and direct else None
            entry["vs_reference"] = value / reference if value is not None and reference else None
            entry["reference"] = reference_name
        summary[workload.name] = per_target
    return summary


# -- markdown ---------------------------------------------------------------------------------


def _number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _spread(values: list[float]) -> str:
    if len(values) < 2:
        return ""
    low, high = min(values), max(values)
    return f"±{(high - low) / 2 / statistics.median(values) * 100:.0f}%"


def _mib(kib: float | None) -> str:
    return "—" if kib is None else f"{kib / 1024:.1f}"


def _workload_table(workload: Workload, per_target: dict[str, dict[str, Any]]) -> list[str]:
    lines = [f"### {workload.name}: {workload.title}", "", f"`{workload.describe()}`", ""]
    if workload.kind == "wrk":
        lines += [
            "| target | req/s | spread | vs direct | vs reference | p50 ms | p99 ms | errors "
            "| proxy CPU s / 1k req |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
    else:
        lines += [
            "| target | Mbit/s | spread | vs direct | vs reference | retransmits "
            "| proxy CPU s / GB |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
    notes = []
    for name, entry in per_target.items():
        reference = (
            f"{_ratio(entry['vs_reference'])} {entry['reference']}" if entry["reference"] else ""
        )
        if entry["ok_runs"] == 0:
            cells = [
                name,
                "**failed**" if entry["runs"] else "not run",
                "",
                "",
                "",
                *([""] * (4 if workload.kind == "wrk" else 2)),
            ]
        elif workload.kind == "wrk":
            cells = [
                name,
                _number(entry["median"]),
                _spread(entry["values"]),
                _ratio(entry["vs_direct"]),
                reference,
                _number(entry["latency_p50_ms"], 2),
                _number(entry["latency_p99_ms"], 2),
                _number(entry["errors"]),
                _number(entry["proxy_cost"], 4),
            ]
        else:
            cells = [
                name,
                _number(entry["median"]),
                _spread(entry["values"]),
                _ratio(entry["vs_direct"]),
                reference,
                _number(entry["retransmits"]),
                _number(entry["proxy_cost"], 3),
            ]
        lines.append("| " + " | ".join(cells) + " |")
        for failure in entry["failures"]:
            notes.append(f"- {name}: a run failed: {failure}")
    return [*lines, "", *notes, *([""] if notes else [])]


def _cost_table(summary: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    per_target = summary.get("small")
    if not per_target:
        return []
    lines = [
        "### CPU seconds per 1,000 requests (workload `small`), by program",
        "",
        "| target | proxy | wireguard-go (host, tunneld's child) | wireguard-go (gateway) "
        "| origin nginx | origin connections opened / 1k req |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, entry in per_target.items():
        cost = entry["cpu_seconds_per_1k_requests"]
        proxy = TARGETS_BY_NAME[name].proxy
        proxy_cell = f"{_number(cost.get(proxy), 4)} ({proxy})" if proxy else "—"
        lines.append(
            f"| {name} | {proxy_cell} | {_number(cost.get('wireguard-go-host'), 4)} "
            f"| {_number(cost.get('wireguard-go-gateway'), 4)} | {_number(cost.get('origin'), 4)} "
            f"| {_number(entry['origin_connections_per_1k_requests'], 1)} |"
        )
    return [*lines, ""]


def _memory_table(memory: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "### Memory of the proxies (MiB)",
        "",
        "| program | idle RSS | steady RSS (`small`, median) | RSS max seen | peak (VmHWM) |",
        "|---|---:|---:|---:|---:|",
    ]
    for program, entry in memory.items():
        lines.append(
            f"| {program} | {_mib(entry.get('idle_kib'))} | {_mib(entry.get('steady_kib'))} "
            f"| {_mib(entry.get('max_seen_kib'))} | {_mib(entry.get('hwm_kib'))} |"
        )
    return [*lines, ""]


def machine_lines(machine: dict[str, Any]) -> list[str]:
    """The machine a run ran on, as markdown list items (also used by the soak's report)."""
    packages = ", ".join(f"{k} {v}" for k, v in machine["python_packages"].items())
    tools = ", ".join(f"{k} {v}" for k, v in machine["tools"].items())
    return [
        f"- machine: {machine['cpu_model']}, {machine['cores']} cores, "
        f"{machine['memory_mib']} MiB, {machine['os']}, kernel {machine['kernel']}",
        f"- Python {machine['python']}; {packages}",
        f"- {tools}",
    ]


def render_markdown(report: dict[str, Any], workloads: tuple[Workload, ...]) -> str:
    settings = report["settings"]
    minutes, seconds = divmod(int(report["elapsed_seconds"]), 60)
    lines = [
        f"# tunneld benchmark ({settings['mode']}) — {report['finished_at']}",
        "",
        *machine_lines(report["machine"]),
        f"- {settings['repeats']} repeat(s), median shown, target order rotated per repeat; "
        f"run time {minutes} min {seconds} s; load average at start "
        f"{report['load_average_start']}, at end {report['load_average_end']}",
        "- path: load generator in the gateway netns → wireguard-go ⇄ veth ⇄ tunneld's "
        "wireguard-go → target on the tunnel address 10.44.0.2 → origin nginx on 127.0.0.1",
        f"- nginx and tunneld keep up to {settings['upstream_idle_connections']} idle keep-alive "
        "connections to the origin; nginx runs 1 worker, HAProxy 1 thread",
        *(
            [f"- tunneld run from {settings['tunneld_src']} (not the installed package)"]
            if settings.get("tunneld_src", "installed") != "installed"
            else []
        ),
        "- spread: half the range of the runs, relative to the median. vs reference: "
        "tunneld-http against nginx, tunneld-tcp against haproxy-tcp",
        "",
    ]
    for workload in workloads:
        lines += _workload_table(workload, report["summary"][workload.name])
    lines += _cost_table(report["summary"])
    lines += _memory_table(report["memory"])
    if report.get("aborted"):
        lines += [f"**The run was aborted:** {report['aborted']}", ""]
    return "\n".join(lines).rstrip() + "\n"
