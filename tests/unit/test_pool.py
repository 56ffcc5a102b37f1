"""The upstream pool's housekeeping, against real loopback origins."""

from __future__ import annotations

from functools import partial

import trio

from tunneld.config_proxy import ServiceConfig, Upstream
from tunneld.proxy.pool import UpstreamPool


async def test_sweep_closes_connections_the_origin_hung_up() -> None:
    hang_up = trio.Event()
    accepted: list[trio.SocketStream] = []

    async def origin(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await hang_up.wait()
        await stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, origin, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            service = ServiceConfig("svc", Upstream("http", "127.0.0.1", port), hosts=("svc",))
            pool = UpstreamPool(service)
            for _ in range(2):
                await pool.release(await pool.connect())
            assert pool.idle_count == 2

            await pool.sweep()  # both alive: kept
            assert pool.idle_count == 2

            hang_up.set()
            while len(accepted) < 2:
                await trio.sleep(0.01)
            await trio.sleep(0.1)  # let the FINs arrive
            await pool.sweep()
            assert pool.idle_count == 0
            nursery.cancel_scope.cancel()
