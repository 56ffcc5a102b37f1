"""deploy/prometheus and deploy/grafana: promtool accepts the files and passes the rule tests, and
every metric and label they use is one tunneld exports.

A misspelt metric name fails nowhere else: the alert never fires, the panel stays empty. So the
names below are the contract with tunneld/metrics.py, and a query may only use them (plus ``up``,
the ``process_*`` series of the client library, and a histogram's ``_bucket``/``_sum``/``_count``).
promtool comes with Debian's ``prometheus`` package (scripts/bootstrap); without it these tests
skip, and under ``CI=true`` they fail.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import missing_prerequisite

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
CONFIG = PROMETHEUS / "prometheus.yml"
RULES = PROMETHEUS / "tunneld.rules.yml"
RULE_TESTS = PROMETHEUS / "tunneld.rules.test.yml"
DASHBOARD = DEPLOY / "grafana" / "tunneld-dashboard.json"

# What tunneld exports: metric name -> its label names.
METRICS: dict[str, frozenset[str]] = {
    name: frozenset(labels.split())
    for name, labels in {
        "tunneld_build_info": "version backend",
        "tunneld_peer_up": "peer",
        "tunneld_peer_state": "peer state",
        "tunneld_peer_last_handshake_timestamp_seconds": "peer",
        "tunneld_peer_receive_bytes_total": "peer",
        "tunneld_peer_transmit_bytes_total": "peer",
        "tunneld_peer_endpoint_changes_total": "peer",
        "tunneld_peer_recoveries_total": "peer action",
        "tunneld_probe_duration_seconds": "peer",
        "tunneld_requests_total": "service code",
        "tunneld_request_duration_seconds": "service",
        "tunneld_upstream_errors_total": "service kind",
        "tunneld_active_connections": "service",
        "tunneld_config_reloads_total": "result",
        "tunneld_config_info": "hash",
        "tunneld_ready": "",
        "process_cpu_seconds_total": "",
        "process_open_fds": "",
        "process_max_fds": "",
        "process_virtual_memory_bytes": "",
        "process_resident_memory_bytes": "",
        "process_start_time_seconds": "",
        "up": "",
    }.items()
}
HISTOGRAMS = ("tunneld_probe_duration_seconds", "tunneld_request_duration_seconds")
TARGET_LABELS = frozenset({"job", "instance"})
# code: the exact status (a class like "5xx" only for codes outside HTTPStatus), so a query
# that means a class must use a regex: code=~"5..".
EXACT_CODE = re.compile(r"[1-5][0-9][0-9]")
LABEL_VALUES: dict[str, set[str] | re.Pattern[str]] = {
    "code": EXACT_CODE,
    "state": {"starting", "connecting", "up", "degraded", "recovering"},
    "result": {"success", "failure"},
}
ALERTS = {
    "TunneldDown",
    "TunneldPeerDown",
    "TunneldHandshakeStale",
    "TunneldHighErrorRate",
    "TunneldUpstreamErrors",
    "TunneldReloadFailed",
    "TunneldNotReady",
}


def series_labels() -> dict[str, frozenset[str]]:
    """Every series name a query may use, with the labels it carries."""
    names = {name: labels | TARGET_LABELS for name, labels in METRICS.items()}
    for histogram in HISTOGRAMS:
        labels = names.pop(histogram)
        names[f"{histogram}_bucket"] = labels | {"le"}
        names[f"{histogram}_sum"] = names[f"{histogram}_count"] = labels
    return names


SERIES = series_labels()
ALL_LABELS = frozenset().union(*SERIES.values())

METRIC_NAME = re.compile(r"\b(?:tunneld|process)_[a-z0-9_]+\b")
SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def problems_in_query(query: str) -> list[str]:
    """Unknown metric names, labels a selected series lacks, and label values that never occur."""
    problems = [
        f"unknown metric {name}" for name in METRIC_NAME.findall(query) if name not in SERIES
    ]
    for name, matchers in SELECTOR.findall(query):
        for label, operator, value in MATCHER.findall(matchers):
            if name in SERIES and label not in SERIES[name]:
                problems.append(f"{name} has no label {label}")
            known = LABEL_VALUES.get(label, {value})
            if operator == "=" and not (
                known.fullmatch(value) if isinstance(known, re.Pattern) else value in known
            ):
                problems.append(f'{label}="{value}" never occurs')
    for labels in GROUPING.findall(query):
        problems += [
            f"unknown label {label}"
            for label in re.split(r"\s*,\s*", labels.strip())
            if label and label not in ALL_LABELS
        ]
    return [f"{problem} in: {query}" for problem in problems]


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        missing_prerequisite(
            "promtool is missing (Debian package prometheus; scripts/bootstrap installs it)"
        )
    return path


def promtool_output(promtool: str, *args: str | Path) -> tuple[int, str]:
    done = subprocess.run(
        [promtool, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )
    return done.returncode, done.stdout + done.stderr


def run_promtool(promtool: str, *args: str | Path) -> str:
    returncode, output = promtool_output(promtool, *args)
    assert returncode == 0, output
    assert "SUCCESS" in output, output
    return output


# --- promtool ---------------------------------------------------------------------------------


def test_the_scrape_config_and_the_rule_file_it_loads_are_valid(promtool: str) -> None:
    output = run_promtool(promtool, "check", "config", CONFIG)
    assert "1 rule files found" in output


def test_the_commented_kubernetes_job_is_valid_once_uncommented(
    promtool: str, tmp_path: Path
) -> None:
    lines = CONFIG.read_text().splitlines()
    start = lines.index("  # - job_name: tunneld")
    block = [lines[start]]
    block += [line for line in lines[start + 1 :] if line.startswith("  #   ")]
    assert len(block) > 5, block
    job = "\n".join("  " + line[4:] for line in block)
    assert "kubernetes_sd_configs" in job
    job = job.replace("job_name: tunneld", "job_name: tunneld-kubernetes")
    config = tmp_path / "prometheus.yml"
    config.write_text(CONFIG.read_text() + job)
    shutil.copy(RULES, tmp_path)
    returncode, output = promtool_output(promtool, "check", "config", config)
    if "field kubernetes_sd_configs not found" in output:
        # Debian builds Prometheus without Kubernetes discovery: check the rest of the job (the
        # relabelling) with another discovery in its place.
        discovery = "    kubernetes_sd_configs:\n      - role: pod\n"
        assert discovery in job
        other = "    file_sd_configs:\n      - files: [targets.json]\n"
        config.write_text(CONFIG.read_text() + job.replace(discovery, other))
        returncode, output = promtool_output(promtool, "check", "config", config)
    assert returncode == 0, output
    assert "SUCCESS" in output, output


def test_the_rules_are_valid_and_lint_clean(promtool: str) -> None:
    output = run_promtool(promtool, "check", "rules", "--lint=all", "--lint-fatal", RULES)
    assert f"{rule_count()} rules found" in output


def test_the_rule_unit_tests_pass(promtool: str) -> None:
    run_promtool(promtool, "test", "rules", RULE_TESTS)


def test_every_dashboard_query_parses(promtool: str, tmp_path: Path) -> None:
    # promtool has no query parser of its own: each query becomes a recording rule.
    rules = [
        {"record": f"dashboard:query_{index}", "expr": grafana_to_promql(query)}
        for index, query in enumerate(dashboard_queries())
    ]
    path = tmp_path / "dashboard.rules.yml"  # JSON is YAML
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert f"{len(rules)} rules found" in run_promtool(promtool, "check", "rules", path)


# --- the rules --------------------------------------------------------------------------------


def rule_expressions() -> Iterator[str]:
    """The ``expr:`` values of the rule file: inline, or a block scalar (``>-``, ``|``)."""
    lines = RULES.read_text().splitlines()
    for index, line in enumerate(lines):
        match = re.match(r"^( *)(?:- )?expr: *(.*)$", line)
        if match is None:
            continue
        indent, value = len(match[1]), match[2]
        if value[:1] not in ("|", ">"):
            yield value
            continue
        block = []
        for follow in lines[index + 1 :]:
            if follow.strip() and len(follow) - len(follow.lstrip()) <= indent:
                break
            block.append(follow.strip())
        yield "\n".join(block).strip()


def rule_count() -> int:
    return len(re.findall(r"^ *- (?:alert|record): ", RULES.read_text(), re.MULTILINE))


def test_the_alerts_are_there_and_each_one_is_unit_tested() -> None:
    text = RULES.read_text()
    alerts = set(re.findall(r"^ *- alert: (\w+)$", text, re.MULTILINE))
    assert alerts == ALERTS
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == ALERTS


def test_every_alert_has_a_severity_a_summary_and_a_description() -> None:
    rules = re.split(r"^ *- alert: ", RULES.read_text(), flags=re.MULTILINE)[1:]
    assert len(rules) == rule_count()
    for rule in rules:
        assert re.search(r"^ +severity: (critical|warning)$", rule, re.MULTILINE), rule
        assert re.search(r"^ +summary: ", rule, re.MULTILINE), rule
        assert re.search(r"^ +description: ", rule, re.MULTILINE), rule


def test_the_rules_use_only_metrics_and_labels_tunneld_exports() -> None:
    expressions = list(rule_expressions())
    assert len(expressions) == rule_count()
    assert all(expressions)
    problems = [problem for expr in expressions for problem in problems_in_query(expr)]
    templated = set(re.findall(r"\$labels\.(\w+)", RULES.read_text()))
    problems += [f"annotation uses unknown label {label}" for label in templated - ALL_LABELS]
    assert problems == []


def test_the_checker_catches_misspelt_names() -> None:
    assert problems_in_query("rate(tunneld_request_total[5m])")
    assert problems_in_query("tunneld_request_duration_seconds > 1")  # a histogram's bare name
    assert problems_in_query('tunneld_peer_up{peers="edge-1"}')
    assert problems_in_query('tunneld_requests_total{code="5xx"}')  # codes are exact
    assert problems_in_query("sum by (servce) (tunneld_active_connections)")
    assert problems_in_query('sum(rate(tunneld_requests_total{service="x", code="502"}[5m]))') == []
    assert problems_in_query('sum(rate(tunneld_requests_total{code=~"5.."}[5m]))') == []


# --- the dashboard ----------------------------------------------------------------------------


def dashboard() -> dict[str, object]:
    loaded = json.loads(DASHBOARD.read_text())
    assert isinstance(loaded, dict)
    return loaded


def panels() -> list[dict[str, object]]:
    """Every panel, those inside collapsed rows included."""
    found = []
    for panel in dashboard()["panels"]:  # type: ignore[attr-defined]
        found.append(panel)
        found += panel.get("panels", [])
    return found


def values_of(node: object, key: str) -> Iterator[object]:
    if isinstance(node, dict):
        for name, value in node.items():
            if name == key:
                yield value
            yield from values_of(value, key)
    elif isinstance(node, list):
        for item in node:
            yield from values_of(item, key)


def dashboard_queries() -> list[str]:
    """Panel and annotation queries, and the selectors of the variables' label_values()."""
    queries = [str(expr) for expr in values_of(dashboard(), "expr")]
    for variable in dashboard()["templating"]["list"]:  # type: ignore[index]
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"])
            assert match is not None, variable["query"]
            queries.append(match[1])
    assert queries
    return queries


def grafana_to_promql(query: str) -> str:
    """Grafana's variables replaced as it would: intervals by a duration, the rest by a regex."""
    query = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", query)
    return re.sub(r"\$\{?\w+\}?", ".*", query)


def test_the_dashboard_queries_use_only_metrics_and_labels_tunneld_exports() -> None:
    problems = [problem for query in dashboard_queries() for problem in problems_in_query(query)]
    legends = " ".join(
        str(text)
        for key in ("legendFormat", "titleFormat", "textFormat")
        for text in values_of(dashboard(), key)
    )
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legends))
    problems += [f"a legend uses unknown label {label}" for label in used - ALL_LABELS]
    assert problems == []


def test_the_data_source_is_the_ds_prometheus_variable() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}  # type: ignore[index]
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert {"instance", "peer", "service"} <= variables.keys()
    sources = [
        source
        for source in values_of(dashboard(), "datasource")
        if source != {"type": "grafana", "uid": "-- Grafana --"}  # the built-in annotations
    ]
    assert sources
    assert all(source == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"} for source in sources)


def test_the_panels_have_unique_ids_and_do_not_overlap() -> None:
    ids = [panel["id"] for panel in panels()]
    assert len(ids) == len(set(ids))
    taken: dict[tuple[int, int], object] = {}
    for panel in panels():
        grid = panel["gridPos"]
        assert isinstance(grid, dict)
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[x, y]}"
                taken[x, y] = panel["title"]
        if panel["type"] != "row":
            assert panel.get("targets"), panel["title"]
