"""RSS of the HTTP proxy under clients that pipeline requests and never read the answers.

```sh
.venv/bin/python -m bench.pipeline_memory                      # 200 and 1,000 clients, ~1 min
.venv/bin/python -m bench.pipeline_memory --clients 1000 --hold 10
```

No root, loopback only. This process runs tunneld's accept loop (``serve``) with its HTTP proxy
on 127.0.0.1; a child process runs the origin and the clients, so the RSS measured is the
proxy's alone. Each client connects, sends tiny pipelined ``GET``s until its socket would block
(at most ``--bytes-per-client``), and never reads; the child holds them ``--hold`` seconds, then
closes them all and exits. The figures: the proxy's RSS idle before, with every client
connected and stalled, once the clients are gone, and again after ``malloc_trim`` (what glibc
kept of the freed heap). Everything is bounded: a fixed count, a deadline on each phase, the
child killed in ``finally``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import ipaddress
import json
import resource
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import trio

from tunneld.config_proxy import ProxyConfig, ServiceConfig, Upstream
from tunneld.proxy.http import HttpProxy
from tunneld.proxy.listener import serve

LOCAL = "127.0.0.1"
PHASE_SECONDS = 120.0

# The child: an origin answering every request with a short body, and the clients.
_CHILD = textwrap.dedent(
    """
    import json, resource, socket, sys, time
    import trio
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    port, clients, per_client = (int(a) for a in sys.argv[1:4])
    hold = float(sys.argv[4])
    ANSWER = b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok"

    async def origin(stream):
        buffer = b""
        try:
            while data := await stream.receive_some(65536):
                buffer += data
                count = buffer.count(b"\\r\\n\\r\\n")
                if count:
                    buffer = buffer[buffer.rfind(b"\\r\\n\\r\\n") + 4:]
                    await stream.send_all(ANSWER * count)
        except trio.BrokenResourceError:
            pass

    async def main():
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial_serve)
            print(json.dumps({"origin": listeners[0].socket.getsockname()[1]}), flush=True)
            sys.stdin.readline()  # the proxy knows the origin now
            request = b"GET / HTTP/1.1\\r\\nHost: echo\\r\\n\\r\\n" * 256
            socks = []
            for _ in range(clients):
                s = socket.create_connection(("127.0.0.1", port))
                s.setblocking(False)
                socks.append(s)
            sent = 0
            deadline = time.monotonic() + 60
            pending = list(socks)
            totals = {id(s): 0 for s in socks}
            while pending and time.monotonic() < deadline:
                still = []
                for s in pending:
                    try:
                        n = s.send(request)
                        totals[id(s)] += n
                        sent += n
                        if totals[id(s)] < per_client:
                            still.append(s)
                    except BlockingIOError:
                        pass
                    except OSError:
                        pass
                pending = still
                await trio.sleep(0.05)
            print(json.dumps({"sent_bytes": sent}), flush=True)
            await trio.sleep(hold)
            for s in socks:
                s.close()
            print(json.dumps({"closed": True}), flush=True)
            await trio.to_thread.run_sync(sys.stdin.readline)  # the origin serves till the end
            nursery.cancel_scope.cancel()

    import functools
    partial_serve = functools.partial(trio.serve_tcp, origin, 0, host="127.0.0.1")
    trio.run(main)
    """
)


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def _line(stream: trio.abc.ReceiveStream, buffer: bytearray) -> dict[str, object]:
    with trio.fail_after(PHASE_SECONDS):
        while b"\n" not in buffer:
            data = await stream.receive_some(4096)
            if not data:
                raise RuntimeError("the client process ended early")
            buffer += data
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    result: dict[str, object] = json.loads(line)
    return result


async def measure(clients: int, per_client_bytes: int, hold_seconds: float) -> dict[str, float]:
    """One run; returns the RSS figures in MiB."""
    listeners = await trio.open_tcp_listeners(0, host=LOCAL)
    port = listeners[0].socket.getsockname()[1]
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", _CHILD, str(port), str(clients), str(per_client_bytes),
         str(hold_seconds)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )  # fmt: skip
    if process.stdout is None or process.stdin is None:
        raise RuntimeError("no pipes to the client process")
    figures: dict[str, float] = {}
    buffer = bytearray()
    try:
        origin_port = (await _line(process.stdout, buffer))["origin"]
        origin_port = int(str(origin_port))
        config = ServiceConfig(
            name="echo", upstream=Upstream("http", LOCAL, origin_port), hosts=("echo",)
        )
        proxy = HttpProxy([config], ProxyConfig(max_connections=clients + 100))
        limiter = trio.CapacityLimiter(clients + 100)
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    serve,
                    listeners,
                    proxy.handle,
                    allowed_sources=[ipaddress.ip_network("127.0.0.0/8")],
                    limiter=limiter,
                    on_excess=proxy.reject_overloaded,
                )
            )
            gc.collect()
            figures["before"] = rss_mib()
            await process.stdin.send_all(b"go\n")
            sent = (await _line(process.stdout, buffer))["sent_bytes"]
            figures["sent_mib"] = int(str(sent)) / (1 << 20)
            # Sample while the child holds the clients: the highest RSS and connection count.
            figures["during"] = figures["connections"] = 0.0
            with trio.move_on_after(hold_seconds * 0.9):
                while True:
                    figures["during"] = max(figures["during"], rss_mib())
                    figures["connections"] = max(figures["connections"], limiter.borrowed_tokens)
                    await trio.sleep(0.25)
            await _line(process.stdout, buffer)  # closed
            closed_at = trio.current_time()
            with trio.fail_after(PHASE_SECONDS):
                while limiter.borrowed_tokens:  # noqa: ASYNC110 (a count, no event to wait on)
                    await trio.sleep(0.1)
            figures["drain_seconds"] = trio.current_time() - closed_at
            await trio.sleep(1.0)
            gc.collect()
            figures["after"] = rss_mib()
            ctypes.CDLL(None).malloc_trim(0)
            figures["after_trim"] = rss_mib()
            await process.stdin.send_all(b"bye\n")
            nursery.cancel_scope.cancel()
        await proxy.aclose()
    finally:
        with trio.move_on_after(5):
            process.kill()
            await process.wait()
        for listener in listeners:
            await listener.aclose()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, action="append", help="default: 200 and 1000")
    parser.add_argument("--bytes-per-client", type=int, default=4 << 20)
    parser.add_argument("--hold", type=float, default=10.0, help="seconds the clients stay")
    args = parser.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    for clients in args.clients or [200, 1000]:
        # A fresh process per count, so one run's heap does not flatter the next.
        if args.clients is None or len(args.clients) > 1:
            subprocess.run(
                [sys.executable, "-m", "bench.pipeline_memory", "--clients", str(clients),
                 "--bytes-per-client", str(args.bytes_per_client), "--hold", str(args.hold)],
                check=True, cwd=Path(__file__).resolve().parent.parent,
            )  # fmt: skip
            continue
        figures = trio.run(measure, clients, args.bytes_per_client, args.hold)
        print(
            f"{clients} clients ({figures['connections']:.0f} open, "
            f"{figures['sent_mib']:.0f} MiB sent): RSS before {figures['before']:.1f} MiB, "
            f"during {figures['during']:.1f} (+{figures['during'] - figures['before']:.1f}), "
            f"after {figures['after']:.1f} (+{figures['after'] - figures['before']:.1f}), "
            f"after malloc_trim {figures['after_trim']:.1f} "
            f"(+{figures['after_trim'] - figures['before']:.1f}); the proxy took "
            f"{figures['drain_seconds']:.1f} s to notice the clients had gone",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
