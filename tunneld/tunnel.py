"""The tunnel: turn the config into a configured WireGuard device and keep it that way.

How this works: :meth:`Tunnel.run` opens the device (choosing and supervising the backend),
resolves each gateway's endpoints, applies the whole device config, then converges the link's
addresses, MTU and routes. Only then does it report itself started. Afterwards it watches the
device: gateways whose endpoint names did not resolve yet (DNS often comes up after us at boot)
are retried with backoff, and handshake progress is logged. Network trouble is never fatal here;
config, permission and backend errors are.

The full health state machine, probes and failover belong to the supervisor that grows out of
this module; this part guarantees bring-up, idempotent convergence and tear-down.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from dataclasses import dataclass, field

import trio

from tunneld import keys
from tunneld.backoff import Backoff
from tunneld.config import Config, GatewayConfig, HostPort
from tunneld.errors import TunneldError, principal_error
from tunneld.wireguard.device import Device, open_device
from tunneld.wireguard.links import LinkPlan, converge_link, routes_needed
from tunneld.wireguard.model import DeviceConfig, Endpoint, PeerConfig

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT_SECONDS = 5.0
WATCH_INTERVAL_SECONDS = 5.0
#: WireGuard's REJECT_AFTER_TIME: a session this old can no longer carry data.
HANDSHAKE_STALE_SECONDS = 180.0


class ResolveError(TunneldError):
    """An endpoint name did not resolve (yet)."""


@dataclass(frozen=True)
class TunnelKeys:
    private_key: bytes = field(repr=False)
    preshared_keys: dict[str, bytes] = field(default_factory=dict, repr=False)  # by gateway name


def load_tunnel_keys(config: Config, *, create_missing: bool) -> TunnelKeys:
    """Read (or on first start create) the private key, and read every preshared key."""
    source = config.interface.private_key
    if create_missing and source.credential is None:
        private_key, created = keys.ensure_private_key_file(source.path)
        if created:
            log.info(
                "created a new private key in %s; public key %s",
                source.path,
                keys.encode_key(keys.public_key(private_key)),
            )
    else:
        private_key = keys.load_key_file(source.path)
    preshared = {
        gateway.name: keys.load_key_file(gateway.preshared_key.path, what="preshared key")
        for gateway in config.gateways
        if gateway.preshared_key is not None
    }
    return TunnelKeys(private_key, preshared)


async def resolve(endpoint: HostPort) -> Endpoint:
    """Resolve one ``host:port`` to an address (IP literals pass straight through)."""
    try:
        return Endpoint(ipaddress.ip_address(endpoint.host), endpoint.port)
    except ValueError:
        pass
    try:
        with trio.fail_after(RESOLVE_TIMEOUT_SECONDS):
            answers = await trio.socket.getaddrinfo(
                endpoint.host, endpoint.port, type=socket.SOCK_DGRAM
            )
    except trio.TooSlowError:
        raise ResolveError(
            f"{endpoint}: no DNS answer within {RESOLVE_TIMEOUT_SECONDS:g}s"
        ) from None
    except OSError as exc:
        raise ResolveError(f"{endpoint}: {exc.strerror or exc}") from None
    for family, _type, _proto, _name, sockaddr in answers:
        if family in (socket.AF_INET, socket.AF_INET6):
            return Endpoint(ipaddress.ip_address(sockaddr[0]), endpoint.port)
    raise ResolveError(f"{endpoint}: no IPv4 or IPv6 address")


async def resolve_first(gateway: GatewayConfig) -> Endpoint | None:
    """The first of the gateway's endpoints (in config order) that resolves, or None."""
    for candidate in gateway.endpoints:
        try:
            return await resolve(candidate)
        except ResolveError as exc:
            log.warning("gateway %s: endpoint %s", gateway.name, exc)
    return None


@dataclass
class _GatewayWatch:
    """What the watch loop remembers about one gateway between ticks."""

    endpoint: Endpoint | None
    backoff: Backoff = field(default_factory=Backoff)
    next_resolve_at: float = 0.0
    handshake_fresh: bool = False


class Tunnel:
    """Owns the WireGuard device for one config."""

    def __init__(self, config: Config, tunnel_keys: TunnelKeys) -> None:
        self.config = config
        self._keys = tunnel_keys
        self._watches = {gateway.name: _GatewayWatch(endpoint=None) for gateway in config.gateways}
        self.generation = 0  # how many times the interface has been built
        self.repairs = 0  # how many times it had to be rebuilt
        self._generation_changed = trio.Event()

    @property
    def ifname(self) -> str:
        return self.config.interface.name

    def device_config(self) -> DeviceConfig:
        interface = self.config.interface
        return DeviceConfig(
            private_key=self._keys.private_key,
            listen_port=interface.listen_port,
            fwmark=interface.fwmark,
            peers=tuple(
                PeerConfig(
                    public_key=gateway.public_key,
                    allowed_ips=gateway.allowed_ips,
                    endpoint=self._watches[gateway.name].endpoint,
                    persistent_keepalive_seconds=gateway.persistent_keepalive_seconds,
                    preshared_key=self._keys.preshared_keys.get(gateway.name),
                )
                for gateway in self.config.gateways
            ),
        )

    def link_plan(self) -> LinkPlan:
        interface = self.config.interface
        allowed = [network for gateway in self.config.gateways for network in gateway.allowed_ips]
        return LinkPlan(
            addresses=interface.addresses,
            mtu=interface.mtu,
            routes=routes_needed(interface.addresses, allowed),
        )

    async def bring_up(self, device: Device) -> None:
        """Resolve endpoints, configure the device and converge the link (idempotent)."""
        for gateway in self.config.gateways:
            watch = self._watches[gateway.name]
            watch.endpoint = await resolve_first(gateway)
            if watch.endpoint is None:
                log.warning("gateway %s: no endpoint resolves yet; will keep trying", gateway.name)
        await device.configure(self.device_config())
        await converge_link(self.ifname, self.link_plan())
        log.info(
            "interface %s is up (%s backend): %s; %d gateway(s)",
            self.ifname,
            device.backend_name,
            ", ".join(str(address) for address in self.config.interface.addresses),
            len(self.config.gateways),
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bring the tunnel up, report started, keep it up until cancelled; tear down.

        A device that is lost — the interface deleted, the userspace implementation dead — is
        rebuilt with backoff; only errors a person must fix (exit code 2: permissions, a missing
        WireGuard implementation) end the loop.
        """
        interface = self.config.interface
        backoff = Backoff()
        while True:
            try:
                async with open_device(
                    interface.name, interface.backend, interface.userspace_binary
                ) as device:
                    await self.bring_up(device)
                    backoff.reset()
                    self._new_generation()
                    if self.generation == 1:
                        task_status.started()
                    while True:
                        await trio.sleep(WATCH_INTERVAL_SECONDS)
                        await self.watch_once(device)
            except Exception as exc:
                error = principal_error(exc)
                if error is None or error.exit_code == 2:
                    raise
                delay = backoff.next_delay()
                log.warning(
                    "interface %s lost (%s); rebuilding in %.1fs", self.ifname, error, delay
                )
                self.repairs += 1
            await trio.sleep(delay)

    def _new_generation(self) -> None:
        self.generation += 1
        self._generation_changed.set()
        self._generation_changed = trio.Event()

    async def wait_for_new_interface(self, generation: int) -> None:
        """Return once the interface has been (re)built after ``generation``.

        Sockets bound to the old device (SO_BINDTODEVICE holds an ifindex) are dead then.
        """
        while self.generation <= generation:
            await self._generation_changed.wait()

    async def watch_once(self, device: Device) -> None:
        """One tick: repair the link, retry unresolved endpoints, log handshake progress."""
        # Idempotent, and cheap enough every tick: puts back an address, route or link state
        # that someone removed; raises when the interface itself is gone (→ rebuild).
        await converge_link(self.ifname, self.link_plan())
        changed = False
        now = trio.current_time()
        for gateway in self.config.gateways:
            watch = self._watches[gateway.name]
            if watch.endpoint is not None or now < watch.next_resolve_at:
                continue
            watch.endpoint = await resolve_first(gateway)
            if watch.endpoint is None:
                watch.next_resolve_at = now + watch.backoff.next_delay()
            else:
                watch.backoff.reset()
                log.info("gateway %s: endpoint resolved to %s", gateway.name, watch.endpoint)
                changed = True
        if changed:
            await device.configure(self.device_config())
        await self._log_handshakes(device)

    async def _log_handshakes(self, device: Device) -> None:
        stats = await device.stats()
        wall_now = time.time()
        for gateway in self.config.gateways:
            watch = self._watches[gateway.name]
            peer = stats.peer(gateway.public_key)
            handshake = peer.last_handshake_unix_seconds if peer else None
            fresh = handshake is not None and wall_now - handshake < HANDSHAKE_STALE_SECONDS
            if fresh and not watch.handshake_fresh:
                log.info(
                    "gateway %s: handshake completed via %s",
                    gateway.name,
                    peer.endpoint if peer else "?",
                )
            elif watch.handshake_fresh and not fresh:
                log.warning(
                    "gateway %s: no handshake for %.0fs; WireGuard keeps retrying",
                    gateway.name,
                    HANDSHAKE_STALE_SECONDS,
                )
            watch.handshake_fresh = fresh
