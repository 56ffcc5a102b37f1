"""The proxy: listeners on the tunnel address(es) wired to the HTTP proxy and the TCP relays.

HTTP services share ``proxy.http_port``; each TCP service has its own ``listen_port``. Every
listener binds the tunnel addresses *and* the WireGuard device, and accepts only sources inside
the gateways' allowed IPs (or the narrower ``proxy.allowed_sources``). One capacity limiter caps
client connections across all listeners.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Protocol

import trio

from tunneld import keys
from tunneld.config import Config
from tunneld.config_proxy import ServiceConfig
from tunneld.proxy.delivery import wait_until_delivered
from tunneld.proxy.http import HttpProxy
from tunneld.proxy.listener import open_tunnel_listeners, serve
from tunneld.proxy.tcp import relay
from tunneld.wireguard.model import IPNetwork

log = logging.getLogger(__name__)

POOL_SWEEP_INTERVAL_SECONDS = 5.0
#: After a drain, how long the last answers may take to be acknowledged before the teardown.
DELIVERY_TIMEOUT_SECONDS = 3.0


def load_service_secrets(config: Config) -> dict[str, bytes]:
    """The shared-secret header values by service name, read from their 0600 files."""
    return {
        service.name: keys.read_secret_file(
            service.require_header.value_file, what="header secret file"
        ).strip()
        for service in config.services
        if service.require_header is not None
    }


def allowed_sources(config: Config) -> tuple[IPNetwork, ...]:
    if config.proxy.allowed_sources:
        return config.proxy.allowed_sources
    return tuple(network for gateway in config.gateways for network in gateway.allowed_ips)


class InterfaceGenerations(Protocol):
    """What the proxy needs of the tunnel: to know when the interface was rebuilt."""

    generation: int

    async def wait_for_new_interface(self, generation: int) -> None: ...


class Proxy:
    """Owns the listeners and the HTTP proxy's upstream pools for one config.

    Listeners live as long as one build of the interface: ``SO_BINDTODEVICE`` holds an ifindex,
    so when the tunnel rebuilds the interface they are closed and bound again. The HTTP proxy and
    its upstream pools live as long as the daemon.
    """

    def __init__(self, config: Config, secrets: Mapping[str, bytes]) -> None:
        self.config = config
        self.http = HttpProxy(config.services, config.proxy, secrets=secrets)
        self.limiter = trio.CapacityLimiter(config.proxy.max_connections)
        self._listeners: list[trio.SocketListener] = []
        self._idle = trio.Event()  # set whenever no listener group is serving
        self._idle.set()

    async def run(
        self,
        interface: InterfaceGenerations,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve on every build of the interface until cancelled; close the pools on the way out."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._sweep_pools)
                started = False
                while True:
                    generation = interface.generation
                    async with trio.open_nursery() as listening:
                        await listening.start(self._listen)
                        if not started:
                            task_status.started()
                            started = True
                        await interface.wait_for_new_interface(generation)
                        log.info("interface %s was rebuilt: binding the listeners again",
                                 self.config.interface.name)  # fmt: skip
                        listening.cancel_scope.cancel()
        finally:
            with trio.move_on_after(5) as scope:
                scope.shield = True
                await self.http.aclose()

    async def drain(self, grace_seconds: float) -> bool:
        """Stop accepting; wait up to ``grace_seconds`` for open connections to finish.

        Returns whether they all did. The caller cancels whatever is left.
        """
        for listener in self._listeners:
            await listener.aclose()
        await self.http.drain()
        with trio.move_on_after(grace_seconds):
            await self._idle.wait()
        if not self._idle.is_set():
            return False
        # The interface goes next: let the last bytes of those answers reach the gateway first.
        addresses = [address.ip for address in self.config.interface.addresses]
        if not await wait_until_delivered(addresses, DELIVERY_TIMEOUT_SECONDS):
            log.warning("sent data still unacknowledged after %gs; closing anyway",
                        DELIVERY_TIMEOUT_SECONDS)  # fmt: skip
        return True

    async def _listen(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind every listener on the current interface and serve until they are closed."""
        config = self.config
        addresses = [address.ip for address in config.interface.addresses]
        ifname = config.interface.name
        sources = allowed_sources(config)
        self._idle = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                groups: list[tuple[int, Handler, Handler | None, str]] = []
                if any(service.protocol == "http" for service in config.services):
                    groups.append(
                        (
                            config.proxy.http_port,
                            self.http.handle,
                            self.http.reject_overloaded,
                            "HTTP services",
                        )
                    )
                for service in config.services:
                    if service.protocol == "tcp" and service.listen_port is not None:
                        groups.append(
                            (
                                service.listen_port,
                                _tcp_handler(service),
                                None,
                                f"TCP service {service.name}",
                            )
                        )
                for port, handler, on_excess, what in groups:
                    listeners = await open_tunnel_listeners(addresses, port, ifname)
                    self._listeners.extend(listeners)
                    await nursery.start(
                        partial(
                            serve,
                            listeners,
                            handler,
                            allowed_sources=sources,
                            limiter=self.limiter,
                            on_excess=on_excess,
                        )
                    )
                    log.info("%s listening on port %d", what, port)
                task_status.started()
        finally:
            self._listeners = []
            self._idle.set()

    async def _sweep_pools(self) -> None:
        while True:
            await trio.sleep(POOL_SWEEP_INTERVAL_SECONDS)
            await self.http.sweep_pools()


Handler = Callable[..., Awaitable[None]]


def _tcp_handler(service: ServiceConfig) -> Callable[[trio.SocketStream, str], Awaitable[None]]:
    async def handle(stream: trio.SocketStream, client_address: str) -> None:
        await relay(stream, client_address, service)

    return handle
