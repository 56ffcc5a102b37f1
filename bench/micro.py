"""The CPU cost of tunneld's proxy code per request, without the network around it.

``python -m bench.micro`` runs, in one process and one trio loop, an origin on 127.0.0.1, the
proxy (tunneld's own accept loop, HTTP proxy and TCP relay, with its real metrics observer) and
keep-alive clients, and reports the process's CPU time per request for three paths: clients
straight to the origin (the cost of the clients and the origin themselves), through the HTTP
proxy, and through the TCP relay. The differences are what the proxy adds per request.

Why it exists next to ``bench/run``: on a 2-core machine the full benchmark shares the CPU with
wrk and two wireguard-go processes, so its figures move with whatever else runs; CPU time
per request of one process moves much less, and ``--profile`` (cProfile) shows where it goes
without the distortion of sampling a loaded machine. It needs no root and no namespaces.
"""

from __future__ import annotations

import argparse
import cProfile
import ipaddress
import pstats
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio
from prometheus_client import CollectorRegistry

from tunneld.config_proxy import ProxyConfig, ServiceConfig, Upstream
from tunneld.metrics import Metrics
from tunneld.proxy import tcp
from tunneld.proxy.eager import EagerSocketStream
from tunneld.proxy.http import HttpProxy
from tunneld.proxy.listener import serve

LOOPBACK = "127.0.0.1"
BODY = b"tunneld bench: small response.\n"  # 31 bytes, as bench/run's origin sends
ORIGIN_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: micro\r\nContent-Type: text/plain\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
)
PATHS = ("direct", "http", "tcp")
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: micro\r\nAccept: */*\r\n\r\n"


@dataclass
class Result:
    path: str
    requests: int
    cpu_seconds: float
    wall_seconds: float

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_seconds / self.requests * 1e6


def _listening_socket() -> trio.socket.SocketType:
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return sock


async def _origin(stream: EagerSocketStream, _address: str) -> None:
    """Answers every request head with the fixed response (requests carry no body)."""
    pending = b""
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        pending += data
        count = pending.count(b"\r\n\r\n")
        if count:
            pending = pending[pending.rindex(b"\r\n\r\n") + 4 :]
            await stream.send_all(ORIGIN_RESPONSE * count)


async def _client(port: int, requests: int) -> None:
    """``requests`` keep-alive GETs, one at a time; the response length is learnt from the
    first (the proxy's answer is the same every time)."""
    stream = EagerSocketStream(socket.create_connection((LOOPBACK, port)))
    try:
        await stream.send_all(REQUEST)
        first = b""
        while BODY not in first:
            first += await stream.receive_some(65536)
        size = len(first)
        for _ in range(requests - 1):
            await stream.send_all(REQUEST)
            received = 0
            while received < size:
                data = await stream.receive_some(65536)
                if not data:
                    raise RuntimeError("connection closed mid-response")
                received += len(data)
    finally:
        await stream.aclose()


Handler = Callable[[EagerSocketStream, str], Awaitable[None]]


async def _serve(nursery: trio.Nursery, handler: Handler) -> int:
    sock = _listening_socket()
    await sock.bind((LOOPBACK, 0))
    sock.listen(1024)
    port: int = sock.getsockname()[1]
    await nursery.start(
        lambda task_status: serve(
            [trio.SocketListener(sock)],
            handler,
            allowed_sources=[ipaddress.ip_network("127.0.0.0/8")],
            limiter=trio.CapacityLimiter(10_000),
            task_status=task_status,
        )
    )
    return port


async def measure(path: str, connections: int, requests_each: int) -> Result:
    proxy: HttpProxy | None = None
    async with trio.open_nursery() as nursery:
        origin_port = await _serve(nursery, _origin)
        upstream = Upstream("http", host=LOOPBACK, port=origin_port)
        # The pool as large as the client count, as bench/run configures tunneld.
        service = ServiceConfig(
            name="bench", upstream=upstream, hosts=("bench",), max_idle_upstream_connections=64
        )
        if path == "direct":
            port = origin_port
        elif path == "http":
            proxy = HttpProxy([service], ProxyConfig(), observer=Metrics(CollectorRegistry()))
            port = await _serve(nursery, proxy.handle)
        else:  # tcp
            tcp_service = ServiceConfig(
                name="bench-tcp",
                upstream=Upstream("tcp", host=LOOPBACK, port=origin_port),
                protocol="tcp",
                listen_port=1,
            )

            async def relay(stream: EagerSocketStream, address: str) -> None:
                await tcp.relay(stream, address, tcp_service)

            port = await _serve(nursery, relay)
        await _client(port, 10)  # warm up: connections, pools, code paths
        cpu, wall = time.process_time(), time.perf_counter()
        async with trio.open_nursery() as clients:
            for _ in range(connections):
                clients.start_soon(_client, port, requests_each)
        result = Result(
            path,
            connections * requests_each,
            time.process_time() - cpu,
            time.perf_counter() - wall,
        )
        nursery.cancel_scope.cancel()
    if proxy is not None:
        await proxy.aclose()  # its pooled connections to the origin
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--requests", type=int, default=400, help="per connection")
    parser.add_argument("--repeats", type=int, default=3, help="the best of these is shown")
    parser.add_argument("--paths", default="direct,http,tcp")
    parser.add_argument("--profile", choices=("http", "tcp"), help="cProfile one path instead")
    args = parser.parse_args(argv)
    paths = args.paths.split(",")
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        parser.error(f"--paths: unknown {', '.join(unknown)} (known: {', '.join(PATHS)})")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        trio.run(measure, args.profile, args.connections, args.requests)
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(30)
        return 0
    best: dict[str, Result] = {}
    for _ in range(args.repeats):
        for path in paths:
            result = trio.run(measure, path, args.connections, args.requests)
            if path not in best or result.cpu_seconds < best[path].cpu_seconds:
                best[path] = result
    direct = best.get("direct")
    for path, result in best.items():
        added = ""
        if direct is not None and path != "direct":
            added = f"  (proxy adds {result.cpu_us_per_request - direct.cpu_us_per_request:.1f})"
        print(
            f"{path:7} {result.requests:7d} requests  "
            f"{result.cpu_us_per_request:6.1f} µs CPU/request{added}  "
            f"{result.requests / result.wall_seconds:8.0f} req/s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
