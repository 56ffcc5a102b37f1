"""Per-gateway health state machine (sans-IO: observations in, transitions and actions out).

How this works. The supervisor owns one :class:`PeerHealth` per gateway peer. Every
``health.interval`` it reads the peer's stats from the backend, runs the probe, and hands the
result to :meth:`PeerHealth.observe` as an :class:`Observation`. The machine answers with a
:class:`Decision`: at most one state transition (old → new, with a human reason to log) and the
:class:`Action` s to perform now. It never sleeps, resolves or sends anything itself, and reads
time only from ``Observation.now``.

Each observation yields one *check*. For a probed peer the check is the probe's result; for a
peer judged by its handshake alone (no probe) it is "is the handshake fresh?". ``failures``
consecutive failed checks make a peer down. A failed probe does not count while data keeps
arriving from the peer (its receive counter grew while the probe ran — or, where that was not
measured, since the previous observation — and its handshake is fresh): WireGuard authenticates
every packet, so the tunnel demonstrably works and only the probe is being dropped —
"repairing" such a tunnel would interrupt real traffic. Only data *during* the probe counts
when it is known: a packet that arrived just before an outage must not excuse the first probe
that fails after it.

Besides, a probed peer whose handshake is stale (older than ``stale_handshake``, or gone) is
down at once: its probe traffic renews a healthy session long before. A peer still waiting for
its first handshake is judged by time alone: it is down once that has taken
``connect_grace_seconds`` (``failures * interval``); checks before it do not count.

While down (``RECOVERING``) the machine walks an escalation ladder — re-resolve the endpoint
names, move to the next endpoint, re-apply the peer — one rung each time the backoff delay
(exponential, full jitter, 1 s → 60 s) has passed, the first at once, cycling until the peer is
up again; success resets the backoff. While up, it asks for a re-resolution every
``reresolve_interval`` so that a moved gateway is followed without an outage.

Device-level trouble (interface deleted or down, userspace backend dead) is not any one peer's;
the supervisor repairs the device, and each peer's machine sees the consequences.
"""

from __future__ import annotations

import enum
import ipaddress
import random
from collections import Counter
from dataclasses import dataclass, field

from tunneld.backoff import Backoff
from tunneld.config import GatewayConfig
from tunneld.config_health import HealthConfig
from tunneld.wireguard.model import Endpoint, PeerStats


class PeerState(enum.Enum):
    STARTING = "starting"  # configured, not observed yet
    CONNECTING = "connecting"  # waiting for the first handshake
    UP = "up"  # handshake fresh, checks pass
    DEGRADED = "degraded"  # handshake fresh, but checks fail (not yet `failures` in a row)
    RECOVERING = "recovering"  # down: recovery actions escalate until it is up again


S = PeerState

#: Every transition the machine can make; anything else is a bug (:class:`HealthStateError`).
TRANSITIONS: frozenset[tuple[PeerState, PeerState]] = frozenset({
    (S.STARTING, S.CONNECTING),    # first observation, no fresh handshake
    (S.STARTING, S.UP),            # first observation, handshake already fresh (e.g. on reload)
    (S.CONNECTING, S.UP),          # handshake completed
    (S.CONNECTING, S.DEGRADED),    # handshake completed, but the probe fails
    (S.CONNECTING, S.RECOVERING),  # no handshake within the grace; or failures = 1
    (S.UP, S.DEGRADED),            # a check failed
    (S.UP, S.RECOVERING),          # handshake stale or gone; or failures = 1
    (S.DEGRADED, S.UP),            # a check passed again
    (S.DEGRADED, S.RECOVERING),    # `failures` checks failed in a row; or handshake stale
    (S.RECOVERING, S.UP),          # handshake fresh and the probe answers again
})  # fmt: skip


class Action(enum.Enum):
    """What the supervisor should do for a peer; the first three are the escalation ladder."""

    RERESOLVE = "reresolve"  # resolve the current endpoint's name again; set it if it changed
    NEXT_ENDPOINT = "next_endpoint"  # move on to the next entry of the gateway's endpoints
    REAPPLY_PEER = "reapply_peer"  # remove and re-add the peer: fresh handshake state


LADDER: tuple[Action, ...] = (Action.RERESOLVE, Action.NEXT_ENDPOINT, Action.REAPPLY_PEER)


def recovery_ladder(*, endpoint_count: int, has_names: bool) -> tuple[Action, ...]:
    """The rungs that can change anything for this gateway: re-resolving needs a DNS name among
    its endpoints, moving on needs a second endpoint; re-applying always applies."""
    return tuple(
        action
        for action in LADDER
        if (action is not Action.RERESOLVE or has_names)
        and (action is not Action.NEXT_ENDPOINT or endpoint_count > 1)
    )


class HealthStateError(RuntimeError):
    """A transition outside :data:`TRANSITIONS` was attempted: a bug in this module."""


@dataclass(frozen=True)
class Observation:
    """One tick's facts about one peer.

    ``now`` is monotonic seconds (``trio.current_time()``); ``handshake_age_seconds`` is None
    when the peer never completed a handshake (or the backend forgot it, e.g. after re-apply);
    ``probe_ok`` is None when no probe is configured for the peer or none ran this tick.
    ``receive_bytes`` growing between observations excuses a failed probe (see the module);
    ``transmit_bytes`` is only kept (``PeerHealth.last``) for status reports.
    """

    now: float
    handshake_age_seconds: float | None
    receive_bytes: int = 0
    transmit_bytes: int = 0
    probe_ok: bool | None = None
    endpoint: Endpoint | None = None  # as the backend reports it; counts endpoint changes
    #: Whether the receive counter grew while the probe ran; None: not measured.
    received_during_probe: bool | None = None

    @classmethod
    def from_stats(
        cls,
        stats: PeerStats | None,
        *,
        now: float,
        wall_now: float,
        probe_ok: bool | None,
        before_probe: PeerStats | None = None,
    ) -> Observation:
        """The observation of a peer as the backend reports it (None: the device lacks it).

        ``stats`` are read after the probe; ``before_probe``, if given, just before it.
        ``wall_now`` is ``time.time()``: backends report the last handshake in Unix time.
        """
        if stats is None:
            return cls(now, None, probe_ok=probe_ok)
        handshake = stats.last_handshake_unix_seconds
        age = None if handshake is None else max(0.0, wall_now - handshake)
        during = None
        if before_probe is not None and probe_ok is not None:
            during = stats.receive_bytes > before_probe.receive_bytes
        return cls(
            now, age, stats.receive_bytes, stats.transmit_bytes, probe_ok, stats.endpoint, during
        )


@dataclass(frozen=True)
class Transition:
    old: PeerState
    new: PeerState
    reason: str  # for the log line, e.g. "3 probes failed in a row"
    at: float  # Observation.now


@dataclass(frozen=True)
class Decision:
    """What one observation changed, and what to do about it now (in this order)."""

    transition: Transition | None = None
    actions: tuple[Action, ...] = ()


@dataclass
class PeerCounters:
    """Running totals for metrics (``..._total`` counters); they only ever grow."""

    transitions: Counter[tuple[PeerState, PeerState]] = field(default_factory=Counter)
    recovery_actions: Counter[Action] = field(default_factory=Counter)  # ladder rungs, by action
    periodic_reresolves: int = 0  # RERESOLVE asked for while up
    probes: int = 0  # probe results observed
    probe_failures: int = 0  # of which failed (excused ones included)
    endpoint_changes: int = 0  # the backend reported a different endpoint than before


class PeerHealth:
    """The health of one gateway peer. Drive it with :meth:`observe`, one call per tick."""

    def __init__(
        self,
        config: HealthConfig,
        *,
        now: float,
        probing: bool,
        endpoint_count: int = 1,
        has_names: bool = True,
        rng: random.Random | None = None,
        counters: PeerCounters | None = None,
    ) -> None:
        """``probing``: a probe is configured for this peer (health.probe and probe_address);
        ``endpoint_count`` and ``has_names`` describe its endpoints (:func:`recovery_ladder`);
        ``counters`` carries totals over from an earlier machine of the same peer (reload)."""
        self.config = config
        self.probing = probing
        self.ladder = recovery_ladder(endpoint_count=endpoint_count, has_names=has_names)
        self.resolvable = has_names
        self.counters = counters if counters is not None else PeerCounters()
        #: How long the first handshake may take before the peer counts as down.
        self.connect_grace_seconds = config.failures * config.interval_seconds
        self.state = PeerState.STARTING
        self.state_since = now
        self.consecutive_failures = 0
        self.backoff = Backoff(base_seconds=1.0, cap_seconds=60.0)
        if rng is not None:  # tests: a seeded generator makes the jitter reproducible
            self.backoff = Backoff(base_seconds=1.0, cap_seconds=60.0, _random=rng)
        self.next_action_at: float | None = None  # while RECOVERING
        self.next_rung = 0  # index into the ladder, while RECOVERING
        self.next_reresolve_at = now + config.reresolve_interval_seconds
        self.last: Observation | None = None
        self.endpoint: Endpoint | None = None  # the last one the backend reported

    @classmethod
    def for_gateway(
        cls,
        config: HealthConfig,
        gateway: GatewayConfig,
        *,
        now: float,
        counters: PeerCounters | None = None,
    ) -> PeerHealth:
        """The machine for ``gateway`` as configured: probed if ``config.probe`` is on and the
        gateway has a ``probe_address``; its ladder fitted to its endpoints."""
        return cls(
            config,
            now=now,
            probing=config.probe != "none" and gateway.probe_address is not None,
            endpoint_count=len(gateway.endpoints),
            has_names=any(not _is_ip_literal(endpoint.host) for endpoint in gateway.endpoints),
            counters=counters,
        )

    # --- queries ------------------------------------------------------------------------------

    @property
    def is_up(self) -> bool:
        """Traffic can flow: up, or degraded (suspect but not down)."""
        return self.state in (PeerState.UP, PeerState.DEGRADED)

    def wakeup_at(self) -> float | None:
        """When the machine next wants an observation for an action of its own, if ever."""
        if self.state is PeerState.RECOVERING:
            return self.next_action_at
        if self.is_up and self.resolvable:
            return self.next_reresolve_at
        return None

    # --- the step -----------------------------------------------------------------------------

    def network_changed(self, now: float) -> None:
        """The host's links, addresses or routes changed (the uplink may be back): a recovering
        peer starts its ladder over, at once and with the backoff reset."""
        if self.state is S.RECOVERING:
            self.backoff.reset()
            self.next_rung = 0
            self.next_action_at = now

    def observe(self, observation: Observation) -> Decision:
        """Take one tick's observation; return the transition (if any) and actions to do now."""
        now = observation.now
        fresh = self._fresh(observation)
        check = self._check(observation, fresh)
        self._count(observation)
        if check is True:
            self.consecutive_failures = 0
        elif check is False:
            self.consecutive_failures += 1
        self.last = observation

        transition = self._next_state(observation, fresh, check)
        if transition is not None:
            self._move(transition)
        return Decision(transition, self._actions(now))

    def _fresh(self, observation: Observation) -> bool:
        age = observation.handshake_age_seconds
        return age is not None and age <= self._stale_limit

    def _check(self, observation: Observation, fresh: bool) -> bool | None:
        """This tick's check: True passed, False failed (and counts), None nothing to count."""
        if not fresh and self.state in (S.STARTING, S.CONNECTING):
            return None  # the first handshake is awaited: connect_grace_seconds judges that
        if not self.probing:
            return fresh
        if observation.probe_ok is False and fresh and self._still_receiving(observation):
            return None  # the probe is dropped, but the tunnel carries traffic: excused
        return observation.probe_ok

    def _still_receiving(self, observation: Observation) -> bool:
        if observation.received_during_probe is not None:
            return observation.received_during_probe
        return self.last is not None and observation.receive_bytes > self.last.receive_bytes

    def _count(self, observation: Observation) -> None:
        counters = self.counters
        if self.probing and observation.probe_ok is not None:
            counters.probes += 1
            counters.probe_failures += 0 if observation.probe_ok else 1
        if observation.endpoint is None:
            return
        if self.endpoint is not None and observation.endpoint != self.endpoint:
            counters.endpoint_changes += 1
        self.endpoint = observation.endpoint

    def _next_state(
        self, observation: Observation, fresh: bool, check: bool | None
    ) -> Transition | None:
        state, now = self.state, observation.now

        def to(new: PeerState, reason: str) -> Transition:
            return Transition(state, new, reason, now)

        if state is S.STARTING:
            if fresh and check is not False:
                return to(S.UP, f"handshake {_age(observation)}")
            return to(S.CONNECTING, "waiting for the first handshake")
        if state is S.RECOVERING:
            if fresh and check is True:
                down_for = now - self.state_since
                return to(S.UP, f"{self._passed(observation)}; was down {down_for:.0f}s")
            return None
        down = self._down_reason(observation, fresh)
        if down is not None:
            return to(S.RECOVERING, down)
        # A failed probe degrades even when excused; a handshake-only peer's failed check is a
        # stale handshake.
        failed = observation.probe_ok is False if self.probing else check is False
        if state is S.CONNECTING and fresh:
            if failed:
                return to(S.DEGRADED, f"handshake {_age(observation)}, but {self._failing()}")
            return to(S.UP, f"handshake {_age(observation)}")
        if state is S.UP and failed:
            reason = self._failing() if self.probing else _stale(observation, self._stale_limit)
            return to(S.DEGRADED, reason)
        if state is S.DEGRADED and check is True:
            return to(S.UP, self._passed(observation))
        return None

    def _down_reason(self, observation: Observation, fresh: bool) -> str | None:
        """Why the peer (connecting, up or degraded) is down now; None if it is not."""
        failed_in_a_row = self.consecutive_failures
        enough = failed_in_a_row >= self.config.failures
        if self.state is S.CONNECTING and not fresh:
            waited = observation.now - self.state_since
            if waited >= self.connect_grace_seconds:
                return f"no handshake after {waited:.0f}s"
            return None
        if enough and self.probing:
            return _in_a_row(failed_in_a_row, "probe failed", "probes failed")
        if enough:
            stale = _stale(observation, self._stale_limit)
            return f"{stale}, {_in_a_row(failed_in_a_row, 'check', 'checks')}"
        if self.probing and not fresh:  # probe traffic renews a healthy session long before
            return _stale(observation, self._stale_limit)
        return None

    @property
    def _stale_limit(self) -> float:
        return self.config.stale_handshake_seconds

    def _failing(self) -> str:
        if self.consecutive_failures == 0:
            return "probe failed, but data still arrives from the peer"
        return f"probe failed ({self.consecutive_failures} of {self.config.failures})"

    def _passed(self, observation: Observation) -> str:
        if self.probing:
            return f"probe answered, handshake {_age(observation)}"
        return f"handshake {_age(observation)}"

    def _move(self, transition: Transition) -> None:
        """Enter ``transition.new``; the only place that changes ``state``."""
        if (transition.old, transition.new) not in TRANSITIONS or transition.old is not self.state:
            raise HealthStateError(
                f"illegal transition {transition.old.value} → {transition.new.value} "
                f"(state is {self.state.value})"
            )
        self.counters.transitions[transition.old, transition.new] += 1
        self.state = transition.new
        self.state_since = transition.at
        if transition.new is S.RECOVERING:
            self.next_rung = 0
            self.next_action_at = transition.at  # the first rung at once
        else:
            self.next_action_at = None
        if transition.old is S.RECOVERING:
            self.backoff.reset()
        if transition.new is S.UP:
            self.consecutive_failures = 0
        if transition.new in (S.UP, S.DEGRADED) and transition.old not in (S.UP, S.DEGRADED):
            # Resolved just now (bring-up or recovery): the next re-resolution is a period away.
            self.next_reresolve_at = transition.at + self.config.reresolve_interval_seconds

    def _actions(self, now: float) -> tuple[Action, ...]:
        if self.state is S.RECOVERING:
            if self.next_action_at is None or now < self.next_action_at or not self.ladder:
                return ()
            action = self.ladder[self.next_rung % len(self.ladder)]
            self.next_rung += 1
            self.next_action_at = now + self.backoff.next_delay()
            self.counters.recovery_actions[action] += 1
            if action is Action.RERESOLVE:
                self.next_reresolve_at = now + self.config.reresolve_interval_seconds
            return (action,)
        if self.is_up and self.resolvable and now >= self.next_reresolve_at:
            self.next_reresolve_at = now + self.config.reresolve_interval_seconds
            self.counters.periodic_reresolves += 1
            return (Action.RERESOLVE,)
        return ()


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _in_a_row(count: int, one: str, many: str) -> str:
    return one if count == 1 else f"{count} {many} in a row"


def _age(observation: Observation) -> str:
    age = observation.handshake_age_seconds
    return "never completed" if age is None else f"{age:.0f}s ago"


def _stale(observation: Observation, limit: float) -> str:
    age = observation.handshake_age_seconds
    if age is None:
        return "no handshake"
    return f"handshake {age:.0f}s old (stale after {limit:g}s)"
