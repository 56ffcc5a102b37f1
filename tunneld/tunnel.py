"""The tunnel supervisor: turn the config into a configured WireGuard device and keep it healthy.

How this works. :meth:`Tunnel.run` opens the device (choosing and supervising the backend),
resolves each gateway's first endpoint, applies the whole device config and converges the link's
addresses, MTU and routes; only then does it report itself started. Then it ticks every
``health.interval``:

1. converge the link again — idempotent, and it puts back an address, route or link state that
   someone removed; if the interface itself is gone this raises and the device is rebuilt;
2. read the device's stats and probe every gateway (concurrently, each under its timeout);
3. feed each gateway's :class:`~tunneld.health.PeerHealth` machine one observation, log its
   transition, and carry out the recovery actions it asks for: re-resolve the endpoint name,
   move to the next endpoint, or re-apply the peer (removed and added again, which forces a
   fresh handshake).

Between ticks, a change of the host's links, addresses or routes (rtnetlink, see
:mod:`tunneld.netwatch`) starts the recovery of every down gateway over at once: the uplink
may be back, and the ladder's backoff must not keep the tunnel down for another minute.

A lost device (interface deleted, userspace implementation dead) is rebuilt with backoff.
Network trouble never ends the daemon; only errors a person must fix do (exit code 2). Nor does
running out of file descriptors (``EMFILE``, see :mod:`tunneld.fdlimit`): a tick that hits it is
abandoned — no observation reaches the health machines, since the gateway is not at fault, and
the interface is not rebuilt — logged (rate-limited) and tried again at the next interval. Such
a tick is not progress: ``last_tick`` (the watchdog's and ``/livez``'s measure) stays put.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Protocol

import trio

from tunneld import fdlimit, keys
from tunneld.backoff import Backoff
from tunneld.config import Config, GatewayConfig, HostPort
from tunneld.errors import TunneldError, principal_error
from tunneld.health import Action, Observation, PeerHealth, PeerState
from tunneld.netwatch import watch_network
from tunneld.probe import ProbeError, icmp_socket_kind, probe_gateway
from tunneld.proxy.server import listener_groups
from tunneld.wireguard.device import TEARDOWN_TIMEOUT_SECONDS, Device, open_device
from tunneld.wireguard.firewall import (
    FilterPlan,
    filter_installed,
    install_filter,
    remove_filter,
    table_name,
)
from tunneld.wireguard.links import LinkPlan, converge_link, routes_needed
from tunneld.wireguard.model import DeviceConfig, DeviceStats, Endpoint, PeerConfig

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT_SECONDS = 5.0
#: A health machine may ask to be woken early (its next recovery step is due); never so early
#: that a due-now request spins the loop.
MIN_TICK_SPACING_SECONDS = 0.2
#: Network-change wake-ups at most this often: a busy host (containers coming and going) must
#: not turn into a re-apply storm for a gateway that is down.
NETWORK_CHANGE_SPACING_SECONDS = 1.0


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
        if exc.errno in fdlimit.EXHAUSTION_ERRNOS:
            raise  # not DNS's answer: the tick is skipped, the endpoint kept
        raise ResolveError(f"{endpoint}: {exc.strerror or exc}") from None
    for family, _type, _proto, _name, sockaddr in answers:
        if family in (socket.AF_INET, socket.AF_INET6):
            return Endpoint(ipaddress.ip_address(sockaddr[0]), endpoint.port)
    raise ResolveError(f"{endpoint}: no IPv4 or IPv6 address")


@dataclass
class GatewayRuntime:
    """What the supervisor keeps about one gateway between ticks."""

    config: GatewayConfig
    health: PeerHealth
    endpoint_index: int = 0  # which of config.endpoints is in use
    endpoint: Endpoint | None = None  # what it resolved to (None: not yet)
    last_probe_error: str | None = None
    last_resolve_error: str | None = None

    @property
    def name(self) -> str:
        return self.config.name


class ProbeObserver(Protocol):
    """Told of every probe (metrics hook)."""

    def probe_done(self, gateway: str, seconds: float, *, answered: bool) -> None: ...


class Tunnel:
    """Owns the WireGuard device for one config, and keeps its gateways healthy."""

    def __init__(
        self, config: Config, tunnel_keys: TunnelKeys, *, observer: ProbeObserver | None = None
    ) -> None:
        self.config = config
        self._keys = tunnel_keys
        self._observer = observer
        #: What the device reported at the last tick (None while there is no device): status
        #: and metrics read this instead of asking the device from their own task.
        self.last_stats: DeviceStats | None = None
        self.gateways: dict[str, GatewayRuntime] = {}
        self.generation = 0  # how many times the interface has been built
        self.repairs = 0  # how many times it had to be rebuilt
        self.last_tick = 0.0  # trio time the supervisor loop last completed (watchdog progress)
        self._tick_failures = fdlimit.ExhaustionLog("the health tick")
        #: A skipped tick may have stopped between two steps of a recovery (a peer removed to
        #: be added again): the next tick applies the whole device config first.
        self._reapply_device = False
        self.backend_name = ""
        self._generation_changed = trio.Event()
        self._device: Device | None = None  # while the supervisor runs one
        #: The filter as last applied: its plan, False when interface.firewall is off, None
        #: before the first bring-up (so that each change is logged once, not every rebuild).
        self._filter_applied: FilterPlan | bool | None = None
        #: A tick and a reload both reconfigure the device: one at a time.
        self._device_lock = trio.Lock()

    @property
    def ifname(self) -> str:
        return self.config.interface.name

    def _runtime(self, gateway: GatewayConfig) -> GatewayRuntime:
        runtime = self.gateways.get(gateway.name)
        if runtime is None:
            health = PeerHealth.for_gateway(self.config.health, gateway, now=trio.current_time())
            runtime = self.gateways[gateway.name] = GatewayRuntime(gateway, health)
            if self.config.health.probe != "none" and gateway.probe_address is None:
                log.info("gateway %s: judged by its handshake alone (no probe_address, and no "
                         "single address in allowed_ips to probe)", gateway.name)  # fmt: skip
        return runtime

    def device_config(self, *, without: GatewayConfig | None = None) -> DeviceConfig:
        interface = self.config.interface
        return DeviceConfig(
            private_key=self._keys.private_key,
            listen_port=interface.listen_port,
            fwmark=interface.fwmark,
            peers=tuple(
                PeerConfig(
                    public_key=gateway.public_key,
                    allowed_ips=gateway.allowed_ips,
                    endpoint=self._endpoint_of(gateway),
                    persistent_keepalive_seconds=gateway.persistent_keepalive_seconds,
                    preshared_key=self._keys.preshared_keys.get(gateway.name),
                )
                for gateway in self.config.gateways
                if gateway is not without
            ),
        )

    def _endpoint_of(self, gateway: GatewayConfig) -> Endpoint | None:
        runtime = self.gateways.get(gateway.name)
        return runtime.endpoint if runtime is not None else None

    def link_plan(self) -> LinkPlan:
        interface = self.config.interface
        allowed = [network for gateway in self.config.gateways for network in gateway.allowed_ips]
        return LinkPlan(
            addresses=interface.addresses,
            mtu=interface.mtu,
            routes=routes_needed(interface.addresses, allowed),
        )

    def filter_plan(self) -> FilterPlan:
        """What the nftables filter lets in: TCP to every port the proxy listens on."""
        return FilterPlan(
            ifname=self.ifname,
            addresses=tuple(address.ip for address in self.config.interface.addresses),
            tcp_ports=tuple(group.port for group in listener_groups(self.config)),
        )

    # -- bring-up and the device's lifetime --------------------------------------------------

    async def bring_up(self, device: Device) -> None:
        """Resolve endpoints, configure the device and converge the link (idempotent)."""
        await self._apply(device)
        self.backend_name = device.backend_name
        log.info(
            "interface %s is up (%s backend): %s; %d gateway(s)",
            self.ifname,
            device.backend_name,
            ", ".join(str(address) for address in self.config.interface.addresses),
            len(self.config.gateways),
        )

    async def _apply(self, device: Device) -> None:
        """Make the device and the link match ``self.config`` (sessions of kept peers survive)."""
        # The filter first: it matches the interface by name, so it holds from the moment the
        # link has addresses (and a table left by a killed daemon is replaced in one step).
        await self._apply_filter()
        for gateway in self.config.gateways:
            runtime = self._runtime(gateway)
            if runtime.endpoint is None:
                await self._resolve_current(runtime)
        await device.configure(self.device_config())
        await converge_link(self.ifname, self.link_plan())
        self.last_stats = await device.stats()  # what status and metrics show: the new state

    async def _apply_filter(self) -> None:
        """Install (or atomically replace) the nftables filter, or remove it when it is off."""
        if self.config.interface.firewall:
            plan = self.filter_plan()
            await install_filter(plan)
            if plan != self._filter_applied:
                log.info(
                    "nftables table inet %s: through %s only TCP to port(s) %s, ICMP echo and "
                    "replies reach this host; nothing is forwarded",
                    table_name(self.ifname), self.ifname,
                    ", ".join(str(port) for port in sorted(set(plan.tcp_ports))) or "(none)",
                )  # fmt: skip
            self._filter_applied = plan
            return
        if await remove_filter(self.ifname):
            log.info("removed the nftables table inet %s (interface.firewall = false)",
                     table_name(self.ifname))  # fmt: skip
        if self._filter_applied is not False:
            log.warning(
                "interface.firewall = false: tunneld does not filter what arrives through %s. "
                "The gateway reaches every port of this host that listens on the tunnel address "
                "or on 0.0.0.0, and with ip_forward on, your LAN: this host's own firewall must "
                "restrict the tunnel interface",
                self.ifname,
            )
        self._filter_applied = False

    async def _repair_filter(self) -> None:
        """Put the filter back if it was removed under us (``nft flush ruleset`` does that)."""
        if self.config.interface.firewall and not await filter_installed(self.ifname):
            log.warning("the nftables table inet %s is gone (a `nft flush ruleset`?); "
                        "installing it again", table_name(self.ifname))  # fmt: skip
            await install_filter(self.filter_plan())

    async def _remove_filter_at_exit(self) -> None:
        with trio.move_on_after(TEARDOWN_TIMEOUT_SECONDS) as scope:
            scope.shield = True
            try:
                await remove_filter(self.ifname)
            except TunneldError as exc:  # must not hide why we are exiting
                log.warning("could not remove the nftables table inet %s: %s",
                            table_name(self.ifname), exc)  # fmt: skip

    async def read_stats(self) -> DeviceStats | None:
        """The device's stats now (for /status); the last tick's if it cannot answer."""
        device = self._device
        if device is not None:
            with contextlib.suppress(TunneldError):  # the supervisor deals with a lost device
                self.last_stats = await device.stats()
        return self.last_stats

    async def reconfigure(self, config: Config, tunnel_keys: TunnelKeys) -> None:
        """Switch to a reloaded ``config``, touching only what changed.

        A gateway keeps its health machine, endpoint and session unless its own settings or
        ``[health]`` changed; then it gets a fresh machine (which goes straight to "up" when the
        handshake is fresh). The caller has checked that nothing needing a restart changed.
        """
        async with self._device_lock:
            health_changed = config.health != self.config.health
            self.config, self._keys = config, tunnel_keys
            wanted = {gateway.name: gateway for gateway in config.gateways}
            for name in list(self.gateways):
                if name not in wanted:
                    del self.gateways[name]
            for name, gateway in wanted.items():
                runtime = self.gateways.get(name)
                if runtime is None:
                    continue  # new: _apply creates it
                changed = runtime.config != gateway
                if gateway.endpoints != runtime.config.endpoints:
                    runtime.endpoint_index, runtime.endpoint = 0, None
                # Always the new object: device_config(without=...) compares by identity.
                runtime.config = gateway
                if changed or health_changed:
                    runtime.health = PeerHealth.for_gateway(
                        config.health, gateway, now=trio.current_time(),
                        counters=runtime.health.counters,
                    )  # fmt: skip
            if self._device is not None:  # else the next build uses the new config
                await self._apply(self._device)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bring the tunnel up, report started, keep it up until cancelled; tear down.

        A device that is lost — the interface deleted, the userspace implementation dead — is
        rebuilt with backoff; only errors a person must fix (exit code 2: permissions, a missing
        WireGuard implementation) end the loop.
        """
        if self.config.health.probe == "icmp":
            icmp_socket_kind(4)  # no ICMP socket allowed at all: say so now (exit 2), not per tick
        try:
            await self._run(task_status)
        finally:  # after the link is gone: never a moment with the link and without the filter
            await self._remove_filter_at_exit()

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        interface = self.config.interface
        backoff = Backoff()
        while True:
            try:
                async with open_device(
                    interface.name, interface.backend, interface.userspace_binary
                ) as device:
                    async with self._device_lock:  # not while a reload applies a config
                        await self.bring_up(device)
                    self.last_tick = trio.current_time()
                    backoff.reset()
                    self._new_generation()
                    if self.generation == 1:
                        task_status.started()
                    self._device = device
                    try:
                        await self._supervise(device)
                    finally:
                        self._device, self.last_stats = None, None
            except Exception as exc:
                error = principal_error(exc)
                # Out of descriptors is nobody's fault to fix: tried again, as for a loss.
                exhausted = fdlimit.exhaustion(exc)
                if exhausted is None and (error is None or error.exit_code == 2):
                    raise
                delay = backoff.next_delay()
                log.warning("interface %s lost (%s); rebuilding in %.1fs",
                            self.ifname, exhausted or error, delay)  # fmt: skip
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

    # -- the supervisor loop -----------------------------------------------------------------

    async def _supervise(self, device: Device) -> None:
        network_changed = trio.Event()

        def on_network_change() -> None:
            network_changed.set()

        async with trio.open_nursery() as nursery:
            await nursery.start(watch_network, on_network_change)
            # Regular ticks start one interval apart, however long each took (a failing probe
            # takes its whole timeout): counted from the end of the previous tick, `failures`
            # checks would take failures x (interval + probe_timeout).
            due = trio.current_time() + self.config.health.interval_seconds
            while True:
                interval = self.config.health.interval_seconds  # a reload may change it
                now = trio.current_time()
                if due <= now:  # the tick that just ended overran a whole interval: no burst
                    due = now
                wakeups = [
                    at for runtime in self.gateways.values() if (at := runtime.health.wakeup_at())
                ]
                next_tick = max(min([due, *wakeups]), now + MIN_TICK_SPACING_SECONDS)
                with trio.move_on_at(next_tick):
                    # A change of the host's network wakes a recovering gateway early (no
                    # sooner than NETWORK_CHANGE_SPACING_SECONDS after the last such tick).
                    await trio.sleep_until(now + NETWORK_CHANGE_SPACING_SECONDS)
                    await network_changed.wait()
                if network_changed.is_set():
                    network_changed = trio.Event()
                    self._network_changed()
                if trio.current_time() >= due:
                    due += interval
                async with self._device_lock:
                    await self._tick_or_skip(device)

    async def _tick_or_skip(self, device: Device) -> None:
        """One tick; one that ran out of file descriptors is logged and skipped, not fatal."""
        try:
            await self.tick(device)
        except Exception as exc:
            if (exhausted := fdlimit.exhaustion(exc)) is None:
                raise
            self._tick_failures.failed(exhausted, retry="trying again at the next interval")
            self._reapply_device = True
            return
        self._tick_failures.succeeded()
        self.last_tick = trio.current_time()

    def _network_changed(self) -> None:
        now = trio.current_time()
        for runtime in self.gateways.values():
            if runtime.health.state is PeerState.RECOVERING:
                log.info("gateway %s: the host's network changed; recovering at once", runtime.name)
                runtime.health.network_changed(now)

    async def tick(self, device: Device) -> None:
        """One round: repair the link, observe every gateway, act on what the machines decide."""
        if self._reapply_device:
            await device.configure(self.device_config())
            self._reapply_device = False
        await converge_link(self.ifname, self.link_plan())
        await self._repair_filter()
        resolved = [
            runtime
            for runtime in self.gateways.values()
            if runtime.endpoint is None and await self._resolve_current(runtime)
        ]
        for runtime in resolved:  # booted without DNS, and now it answers
            # A fresh peer handshakes at once; the peer as it is would wait out WireGuard's
            # REKEY_TIMEOUT (5 s) since its last attempt, made while it had no endpoint.
            await self._reset_peer(device, runtime.config)
        # Stats on both sides of the probe: a failed probe is excused only by data that
        # arrived while it ran (see health.py), not by what came before an outage began.
        before = await device.stats()
        probes = await self._probe_all()
        stats = self.last_stats = await device.stats()
        wall_now = time.time()
        for runtime in list(self.gateways.values()):
            observation = Observation.from_stats(
                stats.peer(runtime.config.public_key),
                now=trio.current_time(),
                wall_now=wall_now,
                probe_ok=probes.get(runtime.name),
                before_probe=before.peer(runtime.config.public_key),
            )
            decision = runtime.health.observe(observation)
            if decision.transition is not None:
                self._log_transition(runtime, decision.transition.old, decision.transition.new,
                                     decision.transition.reason)  # fmt: skip
            for action in decision.actions:
                await self._recover(device, runtime, action)

    async def _probe_all(self) -> dict[str, bool]:
        """Probe every probed gateway at once; name → answered."""
        results: dict[str, bool] = {}

        async def probe(runtime: GatewayRuntime) -> None:
            address = runtime.config.probe_address
            if address is None:
                return
            started = trio.current_time()
            try:
                await probe_gateway(self.config.health, address, ifname=self.ifname)
            except ProbeError as exc:
                results[runtime.name] = False
                if str(exc) != runtime.last_probe_error:
                    log.debug("gateway %s: probe failed: %s", runtime.name, exc)
                runtime.last_probe_error = str(exc)
            else:
                results[runtime.name] = True
                runtime.last_probe_error = None
            if self._observer is not None:
                self._observer.probe_done(
                    runtime.name, trio.current_time() - started, answered=results[runtime.name]
                )

        if self.config.health.probe != "none":
            async with trio.open_nursery() as nursery:
                for runtime in self.gateways.values():
                    nursery.start_soon(probe, runtime)
        return results

    def _log_transition(
        self, runtime: GatewayRuntime, old: PeerState, new: PeerState, reason: str
    ) -> None:
        level = (
            logging.WARNING if new in (PeerState.DEGRADED, PeerState.RECOVERING) else logging.INFO
        )
        via = f" via {runtime.endpoint}" if new is PeerState.UP and runtime.endpoint else ""
        log.log(
            level, "gateway %s: %s → %s (%s)%s", runtime.name, old.value, new.value, reason, via
        )

    async def _recover(self, device: Device, runtime: GatewayRuntime, action: Action) -> None:
        gateway = runtime.config
        if action is Action.RERESOLVE:
            before = runtime.endpoint
            if await self._resolve_current(runtime) and runtime.endpoint != before:
                name = gateway.endpoints[runtime.endpoint_index]
                log.info("gateway %s: %s now resolves to %s (was %s)",
                         runtime.name, name, runtime.endpoint, before)  # fmt: skip
                await device.configure(self.device_config())
        elif action is Action.NEXT_ENDPOINT:
            runtime.endpoint_index = (runtime.endpoint_index + 1) % len(gateway.endpoints)
            runtime.endpoint = None
            await self._resolve_current(runtime)
            name = gateway.endpoints[runtime.endpoint_index]
            log.info("gateway %s: failing over to endpoint %s (%s)",
                     runtime.name, name, runtime.endpoint or "unresolved")  # fmt: skip
            await self._reset_peer(device, gateway)
        elif action is Action.REAPPLY_PEER:
            log.info("gateway %s: re-applying the peer to force a new handshake", runtime.name)
            await self._reset_peer(device, gateway)

    async def _reset_peer(self, device: Device, gateway: GatewayConfig) -> None:
        """Remove the peer and add it again (with its current endpoint).

        That drops its session and its handshake retry timer, so the next packet starts a fresh
        handshake at once instead of after WireGuard's own back-off (5 s and more).
        """
        await device.configure(self.device_config(without=gateway))
        await device.configure(self.device_config())

    async def _resolve_current(self, runtime: GatewayRuntime) -> bool:
        """Resolve the endpoint in use; True if it resolved (``runtime.endpoint`` updated)."""
        candidate = runtime.config.endpoints[runtime.endpoint_index]
        try:
            runtime.endpoint = await resolve(candidate)
        except ResolveError as exc:
            # A DNS outage repeats the same failure every tick: say it once, then at debug.
            level = logging.DEBUG if str(exc) == runtime.last_resolve_error else logging.WARNING
            log.log(level, "gateway %s: endpoint %s", runtime.name, exc)
            runtime.last_resolve_error = str(exc)
            return False
        runtime.last_resolve_error = None
        return True

    # -- reports -----------------------------------------------------------------------------

    def status_line(self) -> str:
        """One human line for systemd's STATUS=, e.g. "up: edge-1 via 203.0.113.7:51820"."""
        parts = []
        for runtime in self.gateways.values():
            state = runtime.health.state.value
            via = f" via {runtime.endpoint}" if runtime.endpoint else ""
            parts.append(f"{runtime.name} {state}{via}")
        states = {runtime.health.state for runtime in self.gateways.values()}
        if any(runtime.health.is_up for runtime in self.gateways.values()):
            summary = "up"
        elif states <= {PeerState.STARTING, PeerState.CONNECTING}:
            summary = "connecting"
        else:
            summary = "down"
        return f"{summary}: {'; '.join(parts) or 'no gateways'}"
