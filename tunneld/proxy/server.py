"""The proxy: listeners on the tunnel address(es) wired to the HTTP proxy and the TCP relays.

HTTP services share ``proxy.http_port``; each TCP service has its own ``listen_port``. Every
listener binds the tunnel addresses *and* the WireGuard device, and accepts only sources inside
the gateways' allowed IPs (or the narrower ``proxy.allowed_sources``). One capacity limiter caps
client connections across all listeners, at ``proxy.max_connections`` as the open files limit
allows it (:mod:`tunneld.fdlimit`); beyond it, at most ``EXCESS_ANSWERS`` connections at a time
are answered 503, and the rest are closed at once, so a flood cannot hold more descriptors than
the budget reserved for it.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import trio

from tunneld import fdlimit, keys
from tunneld.config import Config
from tunneld.config_proxy import ServiceConfig
from tunneld.proxy.delivery import wait_until_delivered
from tunneld.proxy.eager import EagerSocketStream
from tunneld.proxy.http import HttpProxy, Observer
from tunneld.proxy.listener import AllowedSources, open_tunnel_listeners, serve
from tunneld.proxy.tcp import relay
from tunneld.wireguard.model import IPAddress, IPNetwork

log = logging.getLogger(__name__)

POOL_SWEEP_INTERVAL_SECONDS = 5.0
#: After a drain, how long the last answers may take to be acknowledged before the teardown.
DELIVERY_TIMEOUT_SECONDS = 3.0


def load_service_secrets(config: Config) -> dict[str, bytes]:
    """The shared-secret header values by service name, read from their 0600 files."""
    return {
        service.name: keys.load_header_secret(service.require_header.value_file)
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


@dataclass(frozen=True)
class ListenerGroup:
    """The listeners on one port. Equal groups are interchangeable: a reload keeps those."""

    port: int
    service: str | None  # the TCP service's name; None: the HTTP services
    addresses: tuple[IPAddress, ...]

    @property
    def what(self) -> str:
        return "HTTP services" if self.service is None else f"TCP service {self.service}"


def listener_groups(config: Config) -> list[ListenerGroup]:
    """Every port ``config`` listens on: the HTTP port if there is an HTTP service, and each
    TCP service's own port."""
    addresses = tuple(address.ip for address in config.interface.addresses)
    groups = []
    if any(service.protocol == "http" for service in config.services):
        groups.append(ListenerGroup(config.proxy.http_port, None, addresses))
    for service in config.services:
        if service.protocol == "tcp" and service.listen_port is not None:
            groups.append(ListenerGroup(service.listen_port, service.name, addresses))
    return groups


class Proxy:
    """Owns the listeners and the HTTP proxy's upstream pools.

    Listeners live as long as one build of the interface: ``SO_BINDTODEVICE`` holds an ifindex,
    so when the tunnel rebuilds the interface they are closed and bound again. The HTTP proxy and
    its upstream pools live as long as the daemon. A reload (:meth:`reconfigure`) closes only
    the listeners that changed and opens only the new ones; open connections are never cut.
    """

    def __init__(
        self, config: Config, secrets: Mapping[str, bytes], *, observer: Observer | None = None
    ) -> None:
        self.config = config
        self.http = HttpProxy(config.services, config.proxy, secrets=secrets, observer=observer)
        self.budget = _budget(config)
        self.limiter = trio.CapacityLimiter(self.budget.max_connections)
        self._excess_answers = 0  # 503 answers being sent
        self._tcp_services = _tcp_services(config)
        self.tcp_active: collections.Counter[str] = collections.Counter()  # open relays
        #: Shared by every listener, so a reload changes whom they accept without rebinding.
        self._sources = AllowedSources(allowed_sources(config))
        self._open: dict[ListenerGroup, list[trio.SocketListener]] = {}
        self._nursery: trio.Nursery | None = None  # serving the current interface's listeners
        self._listeners_lock = trio.Lock()  # an interface rebuild and a reload: one at a time
        self._idle = trio.Event()  # set whenever no listener group is serving
        self._idle.set()
        self._stop_listening = trio.Event()  # the drain has begun

    def active_connections(self) -> dict[str, int]:
        """Open connections by service: HTTP requests being forwarded, TCP relays."""
        return {
            service.name: self.http.active[service.name] + self.tcp_active[service.name]
            for service in self.config.services
        }

    async def reconfigure(self, config: Config, secrets: Mapping[str, bytes]) -> None:
        """Serve the reloaded ``config``: the services' new settings apply to new requests and
        connections; listeners whose port or addresses changed are replaced.

        Raises ``ConfigError`` with nothing changed if a service secret is missing, and
        ``ProxyError`` if a new port cannot be bound (the other changes stay applied).
        """
        async with self._listeners_lock:
            self.http.reconfigure(config.services, config.proxy, secrets=secrets)
            self.config, self._tcp_services = config, _tcp_services(config)
            if (budget := _budget(config)) != self.budget:
                self.budget = budget
                self.limiter.total_tokens = budget.max_connections
            self._sources.networks = allowed_sources(config)
            wanted = listener_groups(config)
            for group in [group for group in self._open if group not in wanted]:
                for listener in self._open.pop(group):
                    await listener.aclose()  # its open connections carry on to their end
                log.info("%s: stopped listening on port %d", group.what, group.port)
            # No nursery: the next build of the interface binds them. Draining: none at all.
            if self._nursery is not None and not self._stop_listening.is_set():
                for group in wanted:
                    if group not in self._open:
                        await self._open_group(self._nursery, group)
        await self.http.close_retired()

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
        self._stop_listening.set()
        for listeners in list(self._open.values()):  # a reload may change _open meanwhile
            for listener in listeners:
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
        self._idle = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                async with self._listeners_lock:
                    if not self._stop_listening.is_set():  # no new listeners during a drain
                        for group in listener_groups(self.config):
                            await self._open_group(nursery, group)
                        self._nursery = nursery
                task_status.started()
                # Open for a reload's new listeners until the drain; then wait for the handlers.
                await self._stop_listening.wait()
        finally:
            self._nursery = None
            self._open.clear()
            self._idle.set()

    async def _open_group(self, nursery: trio.Nursery, group: ListenerGroup) -> None:
        listeners = await open_tunnel_listeners(
            list(group.addresses), group.port, self.config.interface.name
        )
        if group.service is None:
            handler: Handler = self.http.handle
            on_excess: Handler | None = self._answer_excess
        else:
            handler, on_excess = self._tcp_handler(self._tcp_services[group.service]), None
        self._open[group] = listeners
        await nursery.start(
            partial(
                serve,
                listeners,
                handler,
                allowed_sources=self._sources,
                limiter=self.limiter,
                on_excess=on_excess,
            )
        )
        log.info("%s listening on port %d", group.what, group.port)

    def _tcp_handler(
        self, service: ServiceConfig
    ) -> Callable[[EagerSocketStream, str], Awaitable[None]]:
        async def handle(stream: EagerSocketStream, client_address: str) -> None:
            self.tcp_active[service.name] += 1
            try:
                # The service's settings as of this connection (a reload may have changed them).
                await relay(stream, client_address, self._tcp_services.get(service.name, service))
            finally:
                self.tcp_active[service.name] -= 1

        return handle

    async def _answer_excess(self, stream: trio.abc.Stream) -> None:
        """503 to a connection over the limit, while few are being answered; else nothing (the
        accept loop closes it at once): each answer holds a descriptor for a moment."""
        if self._excess_answers >= fdlimit.EXCESS_ANSWERS:
            return
        self._excess_answers += 1
        try:
            await self.http.reject_overloaded(stream)
        finally:
            self._excess_answers -= 1

    async def _sweep_pools(self) -> None:
        while True:
            await trio.sleep(POOL_SWEEP_INTERVAL_SECONDS)
            await self.http.sweep_pools()


Handler = Callable[..., Awaitable[None]]


def _budget(config: Config) -> fdlimit.ConnectionBudget:
    """The connection limit for ``config`` under the open files limit, logged."""
    budget = fdlimit.budget_for(config)
    level = logging.WARNING if budget.clamped or budget.max_connections < 64 else logging.INFO
    log.log(level, "%s", budget.describe())
    return budget


def _tcp_services(config: Config) -> dict[str, ServiceConfig]:
    return {service.name: service for service in config.services if service.protocol == "tcp"}
