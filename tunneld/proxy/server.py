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

import trio

from tunneld import keys
from tunneld.config import Config
from tunneld.config_proxy import ServiceConfig
from tunneld.proxy.http import HttpProxy
from tunneld.proxy.listener import open_tunnel_listeners, serve
from tunneld.proxy.tcp import relay
from tunneld.wireguard.model import IPNetwork

log = logging.getLogger(__name__)

POOL_SWEEP_INTERVAL_SECONDS = 5.0


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


class Proxy:
    """Owns the listeners and the HTTP proxy's upstream pools for one config."""

    def __init__(self, config: Config, secrets: Mapping[str, bytes]) -> None:
        self.config = config
        self.http = HttpProxy(config.services, config.proxy, secrets=secrets)
        self.limiter = trio.CapacityLimiter(config.proxy.max_connections)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind every listener, report started, serve until cancelled."""
        config = self.config
        addresses = [address.ip for address in config.interface.addresses]
        ifname = config.interface.name
        sources = allowed_sources(config)
        try:
            async with trio.open_nursery() as nursery:
                if any(service.protocol == "http" for service in config.services):
                    listeners = await open_tunnel_listeners(
                        addresses, config.proxy.http_port, ifname
                    )
                    await nursery.start(
                        partial(
                            serve,
                            listeners,
                            self.http.handle,
                            allowed_sources=sources,
                            limiter=self.limiter,
                            on_excess=self.http.reject_overloaded,
                        )
                    )
                    log.info("HTTP services listening on port %d", config.proxy.http_port)
                for service in config.services:
                    if service.protocol != "tcp" or service.listen_port is None:
                        continue
                    listeners = await open_tunnel_listeners(addresses, service.listen_port, ifname)
                    await nursery.start(
                        partial(
                            serve,
                            listeners,
                            _tcp_handler(service),
                            allowed_sources=sources,
                            limiter=self.limiter,
                        )
                    )
                    log.info(
                        "TCP service %s listening on port %d", service.name, service.listen_port
                    )
                nursery.start_soon(self._sweep_pools)
                task_status.started()
        finally:
            with trio.move_on_after(5) as scope:
                scope.shield = True
                await self.http.aclose()

    async def _sweep_pools(self) -> None:
        while True:
            await trio.sleep(POOL_SWEEP_INTERVAL_SECONDS)
            await self.http.sweep_pools()


def _tcp_handler(service: ServiceConfig) -> Callable[[trio.SocketStream, str], Awaitable[None]]:
    async def handle(stream: trio.SocketStream, client_address: str) -> None:
        await relay(stream, client_address, service)

    return handle
