"""What one client connection can hold of the HTTP proxy: memory, a slot, an origin connection.

Over real loopback sockets, with the origins and the client of ``test_http_proxy``.
"""

from __future__ import annotations

import socket
import tracemalloc

import trio

from tests.unit.test_http_proxy import (
    GUARD_SECONDS,
    LOCAL,
    Client,
    read_body,
    response,
    running_proxy,
    service,
    tcp_origin,
)
from tunneld.proxy.http1 import RequestHead
from tunneld.proxy.pool import EventReader

KiB = 1 << 10
TINY_REQUEST = b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n"


async def answer_8k(stream: trio.abc.Stream, head: RequestHead, reader: EventReader) -> bool:
    await read_body(reader)
    await stream.send_all(response(200, b"x" * (8 * KiB)))
    return True


async def stalled_pipeliner(port: int, requests: int) -> trio.SocketStream:
    """A client that sends ``requests`` tiny requests at once and never reads an answer.

    Its receive buffer is small, so the proxy's answers back up after a few dozen requests.
    """
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect((LOCAL, port))
    stream = trio.SocketStream(sock)
    data = TINY_REQUEST * requests
    with trio.move_on_after(0.5):  # the proxy stops reading: the rest stays in our buffer
        await stream.send_all(data)
    return stream


async def test_pipelining_client_that_never_reads_holds_bounded_memory() -> None:
    """10 clients pipelining 10,000 requests each: the proxy parses one slice ahead, not all."""
    clients = 10
    with trio.fail_after(GUARD_SECONDS):
        async with (
            tcp_origin(answer_8k) as (origin, upstream),
            running_proxy([service("echo", upstream)]) as port,
        ):
            assert (await Client.connect(port)) is not None  # lazy imports, before measuring
            streams: list[trio.SocketStream] = []
            tracemalloc.start()
            try:
                before, _ = tracemalloc.get_traced_memory()
                for _ in range(clients):
                    streams.append(await stalled_pipeliner(port, 10_000))
                # Wait until the proxy stalls: no request reaches the origin for a while.
                seen = -1
                while seen != len(origin.requests):
                    seen = len(origin.requests)
                    await trio.sleep(0.3)
                snapshot = tracemalloc.take_snapshot().filter_traces(
                    [tracemalloc.Filter(True, "*/tunneld/proxy/*")]
                )
                held = sum(stat.size for stat in snapshot.statistics("filename"))
                during, _ = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
                for stream in streams:
                    await stream.aclose()
    assert seen < clients * 200, f"{seen} requests answered: the clients never stalled"
    per_client = held / clients
    assert per_client < 128 * KiB, f"{per_client:.0f} bytes held per stalled client"
    assert during - before < clients * 512 * KiB
