"""The daemon: the one place that knows every part and wires them in one nursery.

Start-up order is explicit: privilege, the interface lock and keys are checked before anything
touches the network; signal handling is installed before the tunnel starts (so a SIGTERM during
bring-up still tears down); and ``run`` returns only after the tunnel's teardown has finished.
"""

from __future__ import annotations

import logging
import signal

import trio

from tunneld import keys
from tunneld.config import Config
from tunneld.preflight import interface_lock, require_net_admin
from tunneld.proxy.server import Proxy, load_service_secrets
from tunneld.tunnel import Tunnel, load_tunnel_keys

log = logging.getLogger(__name__)


async def _stop_on_signal(
    cancel_scope: trio.CancelScope, task_status: trio.TaskStatus[None]
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            log.info("received %s; shutting down", signal.Signals(signum).name)
            cancel_scope.cancel()
            return


async def run(config: Config) -> None:
    """Run tunneld in the foreground until SIGTERM/SIGINT; tear down before returning."""
    require_net_admin()
    with interface_lock(config.interface.name):
        await _run_locked(config)


async def _run_locked(config: Config) -> None:
    tunnel_keys = await trio.to_thread.run_sync(
        lambda: load_tunnel_keys(config, create_missing=True)
    )
    secrets = await trio.to_thread.run_sync(load_service_secrets, config)
    log.info(
        "tunneld starting: interface %s, public key %s",
        config.interface.name,
        keys.encode_key(keys.public_key(tunnel_keys.private_key)),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(_stop_on_signal, nursery.cancel_scope)
        await nursery.start(Tunnel(config, tunnel_keys).run)
        if config.services:  # listeners need the interface and its addresses: after the tunnel
            await nursery.start(Proxy(config, secrets).run)
        log.info("tunneld is running")
    log.info("tunneld stopped")
