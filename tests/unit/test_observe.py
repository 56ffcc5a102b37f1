"""The observability endpoint over real loopback sockets, in front of the daemon's real parts.

The parts (tunnel without a device, proxy without listeners, reloader) come from test_metrics.
Timeouts that the robustness tests exercise are shortened through ``ServerLimits`` rather than
mocked, so the sockets, the parser and the deadlines are the ones the daemon runs.
"""

from __future__ import annotations

import errno
import json
import shutil
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import IN_CI
from tests.unit.test_metrics import HANDSHAKE_AT, DaemonParts, daemon_config
from tunneld import __version__, observe
from tunneld.errors import TunneldError
from tunneld.host_port import HostPort
from tunneld.metrics import Metrics, config_hash
from tunneld.observe import (
    ObservabilityApp,
    Response,
    ServerLimits,
    liveness_problems,
    readiness_problems,
    route,
    serve_observability,
)
from tunneld.status import device_report, format_status

LOCAL = "127.0.0.1"
GUARD_SECONDS = 20


# -- helpers ----------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers["content-type"] == "application/json"
        return json.loads(self.body)


def parse_answer(data: bytes) -> Answer:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip()
    return Answer(int(status_line.split()[1]), headers, body)


async def read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    received = bytearray()
    try:
        while data := await stream.receive_some(65536):
            received += data
    except trio.BrokenResourceError:
        pass  # a reset ends the answer as an EOF does
    return bytes(received)


async def exchange(port: int, raw: bytes, *, host: str = LOCAL) -> Answer:
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(raw)
        return parse_answer(await read_to_eof(stream))


async def get(port: int, path: str, *, method: str = "GET", host: str = LOCAL) -> Answer:
    request = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: test\r\n\r\n"
    return await exchange(port, request.encode(), host=host)


def make_app(
    parts: DaemonParts,
    metrics: Metrics | None = None,
    *,
    is_draining: Callable[[], bool] = lambda: False,
    **options: float,
) -> ObservabilityApp:
    """The endpoint's app as the daemon wires it: metrics bound to the parts."""
    metrics = metrics if metrics is not None else Metrics(CollectorRegistry())
    metrics.bind(tunnel=parts.tunnel, proxy=parts.proxy, reloader=parts.reloader)
    return ObservabilityApp(
        metrics.registry,
        tunnel=parts.tunnel,
        proxy=parts.proxy,
        reloader=parts.reloader,
        is_draining=is_draining,
        **options,
    )


def ticking(parts: DaemonParts) -> DaemonParts:
    """Up, with a supervisor tick just now."""
    parts.bring_up()
    parts.tunnel.last_tick = trio.current_time()
    return parts


DEFAULT_LIMITS = ServerLimits()
ANY_LOCAL_PORT = HostPort(LOCAL, 0)


@asynccontextmanager
async def endpoint(
    app: ObservabilityApp,
    limits: ServerLimits = DEFAULT_LIMITS,
    listen: HostPort = ANY_LOCAL_PORT,
) -> AsyncIterator[int]:
    """Serve ``app``; yields the port. Leaving cancels the server, as the daemon does.

    Everything done inside has the test's guard deadline.
    """
    with trio.fail_after(GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(partial(serve_observability, listen, app, limits=limits))
            yield bound.port
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def closing(streams: list[trio.SocketStream]) -> AsyncIterator[None]:
    """Close the test's own client connections, however it ends."""
    try:
        yield
    finally:
        for stream in streams:
            await trio.aclose_forcefully(stream)


@pytest.fixture
def parts(tmp_path: Path) -> DaemonParts:
    return DaemonParts.build(daemon_config(tmp_path))


@asynccontextmanager
async def tcp_origin() -> AsyncIterator[int]:
    """A port that accepts connections (the kernel completes them: nobody needs to accept)."""
    listeners = await trio.open_tcp_listeners(0, host=LOCAL)
    async with listeners[0]:
        yield listeners[0].socket.getsockname()[1]


# -- decisions without I/O --------------------------------------------------------------------


def test_routes() -> None:
    assert route(b"GET", b"/metrics") == "/metrics"
    assert route(b"HEAD", b"/readyz?verbose=1") == "/readyz"
    not_found = route(b"GET", b"/metrics/")
    assert isinstance(not_found, Response)
    assert not_found.status == 404
    assert isinstance(unknown := route(b"POST", b"/nowhere"), Response)
    assert unknown.status == 404
    for method in (b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE"):
        refused = route(method, b"/status")
        assert isinstance(refused, Response)
        assert refused.status == 405
        assert (b"allow", b"GET, HEAD") in refused.headers


def test_liveness_is_progress_within_the_stall_threshold() -> None:
    assert liveness_problems(now=1000.0, last_progress=900.0, stall_after_seconds=120) == []
    problems = liveness_problems(now=1000.0, last_progress=870.0, stall_after_seconds=120)
    assert problems == ["the supervisor loop has made no progress for 130s (stalled after 120s)"]


def test_readiness_needs_the_interface_and_a_gateway_and_no_drain(parts: DaemonParts) -> None:
    assert readiness_problems(parts.tunnel, draining=False) == [
        "interface tdunit0 is not configured (yet)",
        "no gateway is up (edge-1 starting, edge-2 starting)",
    ]
    parts.bring_up()
    assert readiness_problems(parts.tunnel, draining=False) == []
    assert readiness_problems(parts.tunnel, draining=True, origin_problems=["billing: x"]) == [
        "draining: shutting down",
        "billing: x",
    ]


# -- the endpoints ----------------------------------------------------------------------------


async def test_metrics_is_prometheus_text(parts: DaemonParts) -> None:
    async with endpoint(make_app(ticking(parts))) as port:
        answer = await get(port, "/metrics")
    assert answer.status == 200
    assert answer.headers["content-type"] == CONTENT_TYPE_LATEST
    assert answer.headers["connection"] == "close"
    assert int(answer.headers["content-length"]) == len(answer.body)
    families = {f.name: f for f in text_string_to_metric_families(answer.body.decode())}
    up = {s.labels["peer"]: s.value for s in families["tunneld_peer_up"].samples}
    assert up == {"edge-1": 1, "edge-2": 0}
    assert "process_cpu_seconds" in families


async def test_livez_follows_the_supervisor_loop(parts: DaemonParts) -> None:
    app = make_app(ticking(parts), stall_after_seconds=120)
    async with endpoint(app) as port:
        alive = await get(port, "/livez")
        assert (alive.status, alive.json()) == (200, {"live": True})
        parts.tunnel.last_tick = trio.current_time() - 125
        stalled = await get(port, "/livez")
    assert stalled.status == 503
    assert stalled.json()["live"] is False
    assert "no progress for 125s" in stalled.json()["reasons"][0]


async def test_livez_gives_the_first_bring_up_the_stall_threshold(parts: DaemonParts) -> None:
    """Before the interface was ever built there is no tick: time counts from the start."""
    app = make_app(parts, stall_after_seconds=0.3)
    async with endpoint(app) as port:
        assert (await get(port, "/livez")).status == 200
        await trio.sleep(0.4)
        assert (await get(port, "/livez")).status == 503


async def test_readyz_says_why_not(parts: DaemonParts) -> None:
    async with endpoint(make_app(parts)) as port:
        answer = await get(port, "/readyz")
        assert answer.status == 503
        assert answer.json() == {
            "ready": False,
            "reasons": [
                "interface tdunit0 is not configured (yet)",
                "no gateway is up (edge-1 starting, edge-2 starting)",
            ],
        }
        ticking(parts)
        answer = await get(port, "/readyz")
    assert (answer.status, answer.json()) == (200, {"ready": True})


async def test_readyz_checks_the_ready_services_origins(tmp_path: Path) -> None:
    async with tcp_origin() as origin_port:
        upstream = f"http://127.0.0.1:{origin_port}"
        parts = ticking(DaemonParts.build(daemon_config(tmp_path, billing=upstream,
                                                       ready=("billing",))))  # fmt: skip
        async with endpoint(make_app(parts)) as port:
            assert (await get(port, "/readyz")).status == 200
    async with endpoint(make_app(parts)) as port:  # the origin is gone now
        answer = await get(port, "/readyz")
    assert answer.status == 503
    [reason] = answer.json()["reasons"]
    assert reason.startswith(f"service billing: origin does not accept connections ({upstream}")
    assert "refused" in reason


async def test_readyz_checks_a_unix_socket_origin(tmp_path: Path) -> None:
    path = tmp_path / "app.sock"
    parts = ticking(DaemonParts.build(daemon_config(tmp_path, billing=f"unix:{path}",
                                                   ready=("billing",))))  # fmt: skip
    async with endpoint(make_app(parts)) as port:
        missing = await get(port, "/readyz")
        assert missing.status == 503
        assert "service billing" in missing.json()["reasons"][0]
        with trio.socket.socket(socket.AF_UNIX) as origin:
            await origin.bind(str(path))
            origin.listen()
            assert (await get(port, "/readyz")).status == 200


async def test_readyz_is_503_while_draining_and_the_rest_keeps_answering(
    parts: DaemonParts,
) -> None:
    shutdown = trio.Event()
    app = make_app(ticking(parts), is_draining=shutdown.is_set)
    async with endpoint(app) as port:
        assert (await get(port, "/readyz")).status == 200
        shutdown.set()
        answer = await get(port, "/readyz")
        assert answer.status == 503
        assert answer.json()["reasons"] == ["draining: shutting down"]
        assert (await get(port, "/livez")).status == 200
        assert (await get(port, "/metrics")).status == 200
        assert (await get(port, "/status")).json()["ready"] is False


async def test_status_extends_the_device_report(tmp_path: Path) -> None:
    async with tcp_origin() as origin_port:
        config = daemon_config(tmp_path, billing=f"http://127.0.0.1:{origin_port}",
                               ready=("billing",))  # fmt: skip
        parts = ticking(DaemonParts.build(config))
        parts.proxy.http.active["billing"] = 2
        parts.reloader.results.failed = 1
        parts.reloader.results.last_error = "gateway[0].public_key: not a key"
        async with endpoint(make_app(parts)) as port:
            report = (await get(port, "/status")).json()
    assert parts.tunnel.last_stats is not None
    device = device_report("tdunit0", "userspace", parts.tunnel.last_stats, {}, now=0.0)
    assert set(report) == {*device, "version", "ready", "ready_reasons", "services", "reloads",
                           "config_hash", "status_line"}  # fmt: skip
    assert report["interface"] == "tdunit0"
    assert report["backend"] == "userspace"
    assert report["listen_port"] == 51820
    assert report["version"] == __version__
    assert (report["ready"], report["ready_reasons"]) == (True, [])
    peers = {peer["name"]: peer for peer in report["peers"]}
    assert set(peers["edge-1"]) == {*device["peers"][0], "state"}
    assert peers["edge-1"]["state"] == "up"
    assert peers["edge-1"]["receive_bytes"] == 1234
    assert peers["edge-1"]["endpoint"] == "198.18.0.9:51820"
    assert peers["edge-2"]["state"] == "connecting"
    assert peers[None]["state"] is None  # a peer on the device that the config does not know
    services = {service["name"]: service for service in report["services"]}
    assert services["billing"] == {
        "name": "billing",
        "protocol": "http",
        "upstream": f"http://127.0.0.1:{origin_port}",
        "hosts": ["billing"],
        "path_prefix": "/",
        "listen_port": 80,
        "active_connections": 2,
        "origin_reachable": True,
    }
    assert services["pg"]["listen_port"] == 5432
    assert services["pg"]["origin_reachable"] is None  # not a ready service: not checked
    assert report["reloads"] == {
        "succeeded": 0,
        "failed": 1,
        "last_error": "gateway[0].public_key: not a key",
    }
    assert report["config_hash"] == config_hash(config)
    assert report["status_line"] == parts.tunnel.status_line()


async def test_status_without_a_device_lists_the_configured_peers(parts: DaemonParts) -> None:
    async with endpoint(make_app(parts)) as port:
        report = (await get(port, "/status")).json()
    assert (report["public_key"], report["listen_port"], report["backend"]) == (None, None, None)
    assert report["ready"] is False
    edge_1 = report["peers"][0]
    assert edge_1["name"] == "edge-1"
    assert edge_1["state"] == "starting"
    assert edge_1["allowed_ips"] == ["10.44.0.1/32", "10.45.0.0/24"]
    for measured in ("endpoint", "last_handshake_unix_seconds", "handshake_age_seconds",
                     "receive_bytes", "transmit_bytes"):  # fmt: skip
        assert edge_1[measured] is None
    assert [peer["name"] for peer in report["peers"]] == ["edge-1", "edge-2"]


# -- bad input --------------------------------------------------------------------------------


async def test_other_methods_get_405_and_unknown_paths_404(parts: DaemonParts) -> None:
    async with endpoint(make_app(parts)) as port:
        refused = await get(port, "/metrics", method="DELETE")
        assert refused.status == 405
        assert refused.headers["allow"] == "GET, HEAD"
        upload = b"POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000
        posted = await exchange(port, upload)  # the body is never read; the answer arrives
        assert posted.status == 405
        assert (await get(port, "/")).status == 404
        assert (await get(port, "/metrics/../status")).status == 400  # the parser's rule


async def test_head_is_get_without_the_body(parts: DaemonParts) -> None:
    async with endpoint(make_app(ticking(parts))) as port:
        for path in ("/status", "/readyz", "/livez"):
            full, head = await get(port, path), await get(port, path, method="HEAD")
            assert head.status == full.status == 200
            assert head.body == b""
            if path != "/status":  # /status holds ages that change between the two requests
                assert head.headers["content-length"] == full.headers["content-length"]
            assert int(head.headers["content-length"]) > 0
        head = await get(port, "/metrics", method="HEAD")
        assert head.status == 200
        assert (head.headers["content-type"], head.body) == (CONTENT_TYPE_LATEST, b"")


async def test_malformed_and_oversized_heads(parts: DaemonParts) -> None:
    async with endpoint(make_app(parts), ServerLimits(max_head_bytes=4096)) as port:
        huge = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 6000 + b"\r\n\r\n"
        assert (await exchange(port, huge)).status == 431
        endless = b"GET /metrics HTTP/1.1\r\n" + b"X-Pad: aaaaaaaa\r\n" * 2000
        assert (await exchange(port, endless)).status == 431
        assert (await exchange(port, b"NOT HTTP AT ALL\r\n\r\n")).status == 400
        assert (await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")).status == 400  # no Host
        assert (await exchange(port, b"GET /metrics HTTP/2.0\r\nHost: x\r\n\r\n")).status == 505
        # Clients that close before or in the middle of a head get nothing, and cost nothing.
        for sent in (b"", b"GET /metr"):
            async with await trio.open_tcp_stream(LOCAL, port) as leaving:
                await leaving.send_all(sent)
                await leaving.send_eof()
                assert await read_to_eof(leaving) == b""
        assert (await get(port, "/metrics")).status == 200


async def test_a_silent_or_dribbling_client_is_cut_and_blocks_nobody(parts: DaemonParts) -> None:
    limits = ServerLimits(head_timeout_seconds=0.5)
    clients: list[trio.SocketStream] = []
    async with endpoint(make_app(ticking(parts)), limits) as port, closing(clients):
        silent = await trio.open_tcp_stream(LOCAL, port)
        dribbler = await trio.open_tcp_stream(LOCAL, port)
        clients.extend((silent, dribbler))
        started = trio.current_time()

        async def dribble() -> None:
            """A byte every 50 ms: the whole head would take 2 s, four head timeouts."""
            for byte in b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n":
                try:
                    await dribbler.send_all(bytes([byte]))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                await trio.sleep(0.05)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(dribble)
            meanwhile = await get(port, "/metrics")
            answered_after = trio.current_time() - started
            cut = parse_answer(await read_to_eof(dribbler))
            dribbler_cut_after = trio.current_time() - started
            nursery.cancel_scope.cancel()
        silenced = parse_answer(await read_to_eof(silent))
        silent_cut_after = trio.current_time() - started
    assert meanwhile.status == 200
    assert answered_after < 0.5
    assert cut.status == silenced.status == 408
    # The head timeout counts for the whole head, however slowly it trickles in.
    assert 0.5 <= dribbler_cut_after < 2.0
    assert 0.5 <= silent_cut_after < 2.0


async def test_a_hundred_concurrent_scrapers_all_get_answers(parts: DaemonParts) -> None:
    answers: list[tuple[str, Answer]] = []

    async def scrape(path: str) -> None:
        answers.append((path, await get(port, path)))

    async with endpoint(make_app(ticking(parts))) as port, trio.open_nursery() as nursery:
        for index in range(100):
            nursery.start_soon(scrape, ("/metrics", "/status", "/readyz", "/livez")[index % 4])
    assert len(answers) == 100
    assert all(answer.status == 200 for _, answer in answers)
    for path, answer in answers:
        if path == "/metrics":
            assert any(f.name == "tunneld_peer_up" for f in parse_metrics(answer.body))


def parse_metrics(body: bytes) -> list[Metric]:
    return list(text_string_to_metric_families(body.decode()))


async def test_connections_beyond_the_limit_get_503_at_once(parts: DaemonParts) -> None:
    limits = ServerLimits(max_connections=2, head_timeout_seconds=10)
    clients: list[trio.SocketStream] = []
    async with endpoint(make_app(ticking(parts)), limits) as port, closing(clients):
        idle = [await trio.open_tcp_stream(LOCAL, port) for _ in range(2)]
        clients.extend(idle)
        await trio.sleep(0.2)  # both accepted and holding their places
        started = trio.current_time()
        excess = await get(port, "/metrics")
        assert excess.status == 503
        assert trio.current_time() - started < 1.0
        for stream in idle:
            await stream.aclose()
        await trio.sleep(0.2)  # their places are free again
        assert (await get(port, "/metrics")).status == 200


class BrokenCollector:
    def collect(self) -> Iterator[Metric]:
        raise RuntimeError("a collector bug")


async def test_a_failing_collector_is_a_500_and_the_server_goes_on(
    parts: DaemonParts, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics(CollectorRegistry())
    app = make_app(ticking(parts), metrics)
    metrics.registry.register(BrokenCollector())
    async with endpoint(app) as port:
        assert (await get(port, "/metrics")).status == 500
        assert (await get(port, "/livez")).status == 200
    assert "answering /metrics failed" in caplog.text


async def test_scrapes_during_reloads_and_rebuilds(tmp_path: Path) -> None:
    """Reloads (the real Reloader, tunnel and proxy) and a device that comes and goes, while
    scrapers hit every path: every answer is a 200 or a 503 with reasons, never a 500."""
    full = daemon_config(tmp_path)
    parts = ticking(DaemonParts.build(full))
    bare = daemon_config(tmp_path, gateways="", services=False)
    stats = parts.tunnel.last_stats
    statuses: list[int] = []

    async def churn() -> None:
        for round_ in range(20):
            parts.next_configs.append(bare if round_ % 2 == 0 else full)
            assert await parts.reloader.reload()
            parts.tunnel.last_stats = None if round_ % 3 == 0 else stats
            await trio.sleep(0.005)

    async def scrape(path: str) -> None:
        for _ in range(10):
            answer = await get(port, path)
            statuses.append(answer.status)
            if path == "/metrics":
                parse_metrics(answer.body)
            elif answer.status == 503:
                assert answer.json()["reasons"]
            elif path == "/status":
                assert answer.json()["config_hash"]

    async with endpoint(make_app(parts)) as port, trio.open_nursery() as nursery:
        nursery.start_soon(churn)
        for path in ("/metrics", "/status", "/readyz", "/livez"):
            nursery.start_soon(scrape, path)
    assert len(statuses) == 40
    assert set(statuses) <= {200, 503}
    assert parts.reloader.results.succeeded == 20


async def test_cancelling_the_server_with_clients_connected_is_clean(parts: DaemonParts) -> None:
    clients: list[trio.SocketStream] = []
    async with closing(clients):
        async with endpoint(make_app(ticking(parts))) as port:
            halfway = await trio.open_tcp_stream(LOCAL, port)
            idle = await trio.open_tcp_stream(LOCAL, port)
            clients.extend((halfway, idle))
            await halfway.send_all(b"GET /metrics HTTP/1.1\r\n")
            await trio.sleep(0.1)
        # Cancelled with both in its hands: it returned, and they see the connection end.
        assert await read_to_eof(halfway) == b""
        assert await read_to_eof(idle) == b""


# -- binding ----------------------------------------------------------------------------------


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_serves_on_an_ipv6_address(
    parts: DaemonParts, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="tunneld.observe")
    async with endpoint(make_app(ticking(parts)), listen=HostPort("::1", 0)) as port:
        assert (await get(port, "/livez", host="::1")).status == 200
    assert f"metrics and health endpoint on http://[::1]:{port}" in caplog.text


async def test_a_taken_port_is_an_error_that_says_so(parts: DaemonParts) -> None:
    async with tcp_origin() as taken:
        with (
            trio.fail_after(GUARD_SECONDS),
            pytest.raises(TunneldError, match=f"127.0.0.1:{taken}: Address already in use"),
        ):
            await serve_observability(HostPort(LOCAL, taken), make_app(parts))


# -- promtool ---------------------------------------------------------------------------------

PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(
    PROMTOOL is None and not IN_CI,
    reason="promtool is not installed (apt-get install --no-install-recommends prometheus)",
)
async def test_promtool_finds_no_problem_in_our_metrics(parts: DaemonParts) -> None:
    if PROMTOOL is None:
        pytest.fail("CI=true and promtool is missing: apt-get install prometheus", pytrace=False)
    metrics = Metrics(CollectorRegistry())
    app = make_app(ticking(parts), metrics)
    parts.proxy.http.active["billing"] = 1
    metrics.request_done("billing", 200, 0.01)
    metrics.request_done("", 404, 0.0)
    metrics.upstream_error("billing", "refused")
    metrics.probe_done("edge-1", 0.003, answered=True)
    async with endpoint(app) as port:
        answer = await get(port, "/metrics")
    result = await trio.run_process(
        [PROMTOOL, "check", "metrics"],
        stdin=answer.body,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    output = (result.stdout + result.stderr).decode()
    assert (result.returncode, output) == (0, "")


async def test_the_daemon_report_reads_well_as_text(parts: DaemonParts) -> None:
    app = make_app(parts)
    text = format_status(json.loads((await app.status()).body))  # no device yet: null bytes
    assert "peer: edge-1 [starting]" in text and "None" not in text
    assert "service: billing (http, port 80) → http://127.0.0.1:8081" in text
    parts.bring_up()
    text = format_status(json.loads((await app.status()).body))
    assert "peer: edge-1 [up]" in text and "1234 B received, 5678 B sent" in text


async def test_status_handshake_age_is_wall_clock(parts: DaemonParts) -> None:
    parts.bring_up()  # edge-1's handshake at HANDSHAKE_AT, a unix time
    report = json.loads((await make_app(parts).status()).body)
    edge_1 = next(peer for peer in report["peers"] if peer["name"] == "edge-1")
    assert edge_1["handshake_age_seconds"] == pytest.approx(time.time() - HANDSHAKE_AT, abs=60)


async def test_the_accept_loop_outlives_running_out_of_descriptors(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Out of descriptors, accept fails again and again: said every 10 s, never fatal, and
    the connection that finally comes is served."""
    served: list[object] = []

    class ExhaustedListener(trio.abc.Listener[trio.SocketStream]):
        failures = 300  # 30 s at the retry interval

        async def accept(self) -> trio.SocketStream:
            await trio.lowlevel.checkpoint()
            if self.failures:
                self.failures -= 1
                raise OSError(errno.EMFILE, "Too many open files")
            if served:
                await trio.sleep_forever()
            return FakeStream()  # type: ignore[return-value]

        async def aclose(self) -> None:
            pass

    class FakeStream(trio.abc.AsyncResource):
        async def aclose(self) -> None:
            pass

    async def handler(stream: trio.SocketStream) -> None:
        served.append(stream)

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(observe._accept_loop, ExhaustedListener(), handler, nursery)
            while not served:
                await trio.sleep(1)
            nursery.cancel_scope.cancel()
    said = [r.getMessage() for r in caplog.records if "accepting on the metrics" in r.getMessage()]
    assert 3 <= len(said) <= 5, said
    assert said[0].startswith("accepting on the metrics and health endpoint failed: EMFILE")
    assert said[-1].endswith("works again after 300 failure(s) for lack of descriptors")
