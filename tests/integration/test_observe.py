"""Observability against the real thing: a Prometheus server scraping the daemon.

Prometheus (Debian's package) runs in the connector's namespace, bound to loopback there, and
scrapes tunneld's endpoint every second; the test asks Prometheus' query API, not our endpoint,
whether the numbers are right. The same run checks /readyz and `tunneld ready` across a gateway
outage, `promtool check metrics` on the real output, and that no secret reached the logs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import missing_prerequisite
from tests.integration import netns
from tests.integration.topology import HOST_TUNNEL, Topology, run, wait_for

pytestmark = pytest.mark.root

SERVERS = Path(__file__).parent / "servers"
METRICS_PORT = 9477
PROMETHEUS_PORT = 9090
REQUESTS = 25
SECRET_HEADER = "X-Tunnel-Secret"


@dataclass
class Observed:
    topology: Topology
    header_secret: str
    preshared_key: str

    def get(self, port: int, path: str) -> tuple[int, bytes, str]:
        connection = netns.HTTPConnection(self.topology.host_ns, "127.0.0.1", port, timeout=5)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read(), response.getheader("Content-Type") or ""
        finally:
            connection.close()

    def query(self, promql: str) -> list[dict[str, object]]:
        path = "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        status, body, _ = self.get(PROMETHEUS_PORT, path)
        assert status == 200, body
        answer = json.loads(body)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]  # type: ignore[no-any-return]

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None  # type: ignore[index]

    def request_billing(self) -> int:
        connection = netns.HTTPConnection(self.topology.gateway_ns, HOST_TUNNEL, timeout=5)
        try:
            connection.request(
                "GET", "/hello", headers={"Host": "billing", SECRET_HEADER: self.header_secret}
            )
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()


def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        missing_prerequisite(
            "prometheus is not installed (scripts/bootstrap installs Debian's package)"
        )
    return binary


@pytest.fixture
def observed(topology: Topology) -> Iterator[Observed]:
    binary = prometheus_binary()
    workdir = topology.workdir
    # A preshared key on both ends, and a shared-secret header: secrets the logs must not show.
    preshared_key = topology.tunneld("genkey").stdout.strip()
    psk_file = workdir / "preshared.key"
    psk_file.write_text(preshared_key + "\n")
    psk_file.chmod(0o600)
    run("ip", "netns", "exec", topology.gateway_ns, "wg", "set", topology.gateway_ifname,
        "peer", topology.host_public_key, "preshared-key", str(psk_file))  # fmt: skip
    header_secret = "s3cret-" + topology.tunneld("genkey").stdout.strip()[:20]
    secret_file = workdir / "header.secret"
    secret_file.write_text(header_secret + "\n")
    secret_file.chmod(0o600)

    origin = subprocess.Popen(
        ["ip", "netns", "exec", topology.host_ns, "python3",
         str(SERVERS / "origin.py"), "billing", "tcp", "8081"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    topology.processes.append(origin)
    assert origin.stdout is not None and origin.stdout.readline().strip() == b"ready"
    topology.write_config(
        services=textwrap.dedent(
            f"""
            [health]
            interval = 1
            failures = 2
            probe_timeout = 0.5

            [[service]]
            name = "billing"
            hosts = ["billing"]
            upstream = "http://127.0.0.1:8081"

            [service.require_header]
            name = "{SECRET_HEADER}"
            value_file = "{secret_file}"

            [metrics]
            listen = "127.0.0.1:{METRICS_PORT}"
            ready_services = ["billing"]
            """
        )
    )
    text = topology.config_file.read_text()
    topology.config_file.write_text(
        text.replace(
            "persistent_keepalive = 1\n",
            f'persistent_keepalive = 1\npreshared_key_file = "{psk_file}"\n',
        )
    )
    prometheus_config = workdir / "prometheus.yml"
    prometheus_config.write_text(
        textwrap.dedent(
            f"""
            global:
              scrape_interval: 1s
              evaluation_interval: 1s
            scrape_configs:
              - job_name: tunneld
                static_configs:
                  - targets: ["127.0.0.1:{METRICS_PORT}"]
            """
        )
    )
    with (workdir / "prometheus.log").open("wb") as prometheus_log:
        prometheus = subprocess.Popen(
            ["ip", "netns", "exec", topology.host_ns, binary,
             f"--config.file={prometheus_config}",
             f"--storage.tsdb.path={workdir / 'prometheus-data'}",
             f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}"],
            stdout=prometheus_log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    topology.processes.append(prometheus)
    state = Observed(topology, header_secret, preshared_key)
    daemon = topology.start_daemon()
    topology.wait_running(daemon)
    topology.wait_handshake()

    def prometheus_ready() -> bool:
        try:
            return state.get(PROMETHEUS_PORT, "/-/ready")[0] == 200
        except OSError:
            return False

    wait_for("Prometheus to be ready", prometheus_ready, timeout=60)
    yield state
    assert daemon.poll() is None


def test_prometheus_sees_the_tunnel_the_requests_and_the_outage(observed: Observed) -> None:
    topology = observed.topology
    peer_up = 'tunneld_peer_up{peer="edge-1"}'
    wait_for("a scrape of a live peer", lambda: observed.value(peer_up) == 1, timeout=30)
    handshake = observed.value('tunneld_peer_last_handshake_timestamp_seconds{peer="edge-1"}')
    assert handshake is not None and time.time() - handshake < 60

    before = observed.value('sum(tunneld_requests_total{service="billing",code="200"})') or 0.0
    statuses = [observed.request_billing() for _ in range(REQUESTS)]
    assert statuses == [200] * REQUESTS
    wait_for(
        f"Prometheus to count {REQUESTS} more requests",
        lambda: (
            observed.value('sum(tunneld_requests_total{service="billing",code="200"})')
            == before + REQUESTS
        ),
        timeout=30,
    )
    assert observed.value('tunneld_build_info{backend="userspace"}') == 1
    assert (observed.value('sum(tunneld_peer_receive_bytes_total{peer="edge-1"})') or 0) > 0
    assert observed.value("tunneld_request_duration_seconds_count") is not None

    # Our real output passes Prometheus' own linter.
    status, body, content_type = observed.get(METRICS_PORT, "/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=")
    lint = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True,
                          check=False)  # fmt: skip
    assert lint.returncode == 0, lint.stdout + lint.stderr

    # Ready now; the gateway goes away: peer_up drops to 0, /readyz and `tunneld ready` say no.
    assert observed.get(METRICS_PORT, "/readyz")[0] == 200
    assert topology.tunneld("ready", "-c", str(topology.config_file)).returncode == 0
    stopped = time.monotonic()
    run("ip", "-n", topology.gateway_ns, "link", "del", topology.gateway_ifname)
    wait_for("Prometheus to see the peer down",
             lambda: observed.value(peer_up) == 0, timeout=30)  # fmt: skip
    print(f"\ngateway stopped → tunneld_peer_up == 0 in Prometheus after "
          f"{time.monotonic() - stopped:.1f}s")  # fmt: skip
    status, body, _ = observed.get(METRICS_PORT, "/readyz")
    assert status == 503 and json.loads(body)["reasons"], body
    not_ready = topology.tunneld("ready", "-c", str(topology.config_file))
    assert not_ready.returncode == 1 and "not ready" in not_ready.stdout

    # The gateway comes back (same key and preshared key): ready again.
    topology.start_gateway()
    run("ip", "netns", "exec", topology.gateway_ns, "wg", "set", topology.gateway_ifname,
        "peer", topology.host_public_key, "preshared-key",
        str(topology.workdir / "preshared.key"))  # fmt: skip
    wait_for("/readyz to answer 200 again",
             lambda: observed.get(METRICS_PORT, "/readyz")[0] == 200, timeout=30)  # fmt: skip
    assert topology.tunneld("ready", "-c", str(topology.config_file)).returncode == 0
    wait_for("Prometheus to see the peer up again",
             lambda: observed.value(peer_up) == 1, timeout=30)  # fmt: skip

    # `tunneld status` reads the daemon's /status: it knows the health state.
    status_run = topology.tunneld("status", "--json", "-c", str(topology.config_file))
    assert status_run.returncode == 0, status_run.stderr
    report = json.loads(status_run.stdout)
    assert report["peers"][0]["state"] == "up"
    assert report["services"][0]["name"] == "billing"


def test_no_secret_reaches_the_logs(observed: Observed) -> None:
    topology = observed.topology
    assert [observed.request_billing() for _ in range(3)] == [200] * 3
    outputs = [observed.get(METRICS_PORT, path)[1].decode() for path in ("/status", "/metrics")]
    for command in ("status", "check-config", "reload"):  # reload reads every secret again
        result = topology.tunneld(command, "-c", str(topology.config_file))
        assert result.returncode == 0, result.stderr
        outputs += [result.stdout, result.stderr]
    wait_for("the reload", lambda: "reloaded the config" in topology.daemon_log(), timeout=15)
    private_key = topology.key_file.read_text().strip()
    logs = topology.daemon_log()  # at --log-level debug
    assert len(logs) > 1000
    logs += "\n".join(outputs)
    for name, secret in (
        ("private key", private_key),
        ("preshared key", observed.preshared_key),
        ("header secret", observed.header_secret),
    ):
        assert secret not in logs, f"the {name} is in the daemon's log or a command's output"
