"""The daemon: the one place that knows every part and wires them in one nursery.

Start-up order is explicit: privilege, the interface lock and keys are checked before anything
touches the network; signal handling is installed before the tunnel starts (so a SIGTERM during
bring-up still tears down); the proxy starts once the interface exists.

Shutdown is a drain: the first SIGTERM/SIGINT closes the listeners, lets open connections finish
within ``proxy.shutdown_grace``, then cancels everything; the tunnel's teardown runs shielded
under its own deadline. A second signal skips the wait. SIGHUP reloads the config in place
(:mod:`tunneld.reload`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import signal
from collections.abc import Callable

import trio
from prometheus_client import CollectorRegistry, disable_created_metrics

from tunneld import fdlimit, keys, systemd
from tunneld.config import Config
from tunneld.metrics import Metrics
from tunneld.observe import ObservabilityApp, serve_observability
from tunneld.preflight import interface_lock, require_net_admin
from tunneld.proxy.server import Proxy, load_service_secrets
from tunneld.reload import Reloader
from tunneld.tunnel import Tunnel, load_tunnel_keys

log = logging.getLogger(__name__)

STATUS_INTERVAL_SECONDS = 5.0


async def _watch_signals(
    shutdown: trio.Event,
    running: trio.Event,
    cancel_scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The first SIGTERM/SIGINT starts a graceful shutdown; a second one exits at once.

    Before start-up has finished there is nothing to drain (and bring-up may be backing off
    for a while): the first signal stops at once.
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            if shutdown.is_set() or not running.is_set():
                log.warning("received %s; stopping now without draining", name)
                cancel_scope.cancel()
                return
            log.info("received %s; draining, then shutting down", name)
            shutdown.set()


async def _report_status(notifier: systemd.Notifier, tunnel: Tunnel, shutdown: trio.Event) -> None:
    """Keep systemd's one-line STATUS= current (repeats are not sent)."""
    while not shutdown.is_set():
        notifier.status(tunnel.status_line())
        with trio.move_on_after(STATUS_INTERVAL_SECONDS):
            await shutdown.wait()


async def _reload_on_hangup(
    reloader: Reloader, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    # Installed before start-up ends: SIGHUP's default action would kill us.
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        task_status.started()
        async for _ in signals:
            log.info("SIGHUP: reloading the config")
            await reloader.reload()


def _release_freed_heap() -> None:
    """Give the heap that bring-up used and freed back to the kernel, once.

    glibc keeps freed pages for reuse. At the end of bring-up 0.65 MiB of them (config parsing,
    the netlink work in a worker thread's arena) are more than the idle daemon needs, and
    ``malloc_trim`` returns them (idle RSS measured: 44.1 → 43.5 MiB); load grows the heap again
    as it needs. Outside glibc (musl) there is no such function, and nothing to do.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


async def run(config: Config, load_config: Callable[[], Config]) -> None:
    """Run tunneld in the foreground until SIGTERM/SIGINT; tear down before returning.

    ``load_config`` reads the config again on reload (SIGHUP).
    """
    fdlimit.raise_open_files_limit()  # before anything opens a descriptor it counts on
    require_net_admin()
    with interface_lock(config.interface.name):
        await _run_locked(config, load_config)


async def _run_locked(config: Config, load_config: Callable[[], Config]) -> None:
    # prometheus-client would add a *_created series to every counter: twice the series, for a
    # timestamp that process_start_time_seconds already gives.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    tunnel_keys = await trio.to_thread.run_sync(
        lambda: load_tunnel_keys(config, create_missing=True)
    )
    secrets = await trio.to_thread.run_sync(load_service_secrets, config)
    log.info(
        "tunneld starting: interface %s, public key %s",
        config.interface.name,
        keys.encode_key(keys.public_key(tunnel_keys.private_key)),
    )
    metrics = Metrics(CollectorRegistry())
    tunnel = Tunnel(config, tunnel_keys, observer=metrics)
    proxy = Proxy(config, secrets, observer=metrics)
    shutdown, running = trio.Event(), trio.Event()
    notifier = systemd.Notifier.from_environ(unset_environment=True)
    reloader = Reloader(
        config,
        load_config=load_config,
        load_secrets=load_service_secrets,
        tunnel=tunnel,
        proxy=proxy,
        notifier=notifier,
        status_line=tunnel.status_line,
    )
    metrics.bind(tunnel=tunnel, proxy=proxy, reloader=reloader, is_draining=shutdown.is_set)
    async with trio.open_nursery() as nursery:
        await nursery.start(_watch_signals, shutdown, running, nursery.cancel_scope)
        await nursery.start(_reload_on_hangup, reloader)
        if config.metrics.listen is not None:
            # Before the tunnel: /livez and /readyz answer during bring-up (a boot without
            # network can take long), and a port already taken fails before the network is
            # touched.
            app = ObservabilityApp(
                metrics.registry,
                tunnel=tunnel,
                proxy=proxy,
                reloader=reloader,
                is_draining=shutdown.is_set,
            )
            await nursery.start(serve_observability, config.metrics.listen, app)
        await nursery.start(tunnel.run)
        # Listeners need the interface and its addresses: after the tunnel.
        await nursery.start(proxy.run, tunnel)
        await nursery.start(systemd.run_watchdog, notifier, lambda: tunnel.last_tick)
        nursery.start_soon(_report_status, notifier, tunnel, shutdown)
        notifier.ready(tunnel.status_line())
        running.set()
        log.info("tunneld is running")
        _release_freed_heap()
        await shutdown.wait()
        notifier.stopping("draining connections")
        grace = reloader.config.proxy.shutdown_grace_seconds
        if not await proxy.drain(grace):
            log.warning("connections still open after %gs; closing them", grace)
        nursery.cancel_scope.cancel()  # the tunnel tears the interface down (bounded, shielded)
    log.info("tunneld stopped")
