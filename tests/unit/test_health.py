"""Tests of tunneld.health: the per-gateway state machine, driven with explicit ``now`` values.

Pure code, so no clock at all: every observation says what time it is. The backoff's jitter comes
from a seeded ``random.Random``, and a reference ``Backoff`` with the same seed says which delays
to expect.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import random
from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunneld.backoff import Backoff
from tunneld.config import GatewayConfig, HostPort
from tunneld.config_health import HealthConfig
from tunneld.health import (
    LADDER,
    TRANSITIONS,
    Action,
    Decision,
    HealthStateError,
    Observation,
    PeerCounters,
    PeerHealth,
    PeerState,
    Transition,
    recovery_ladder,
)
from tunneld.wireguard.model import Endpoint, PeerStats

S = PeerState
CONFIG = HealthConfig()  # probe every 5 s, down after 3 failures, stale after 180 s
SEED = 42
FRESH = 10.0  # a handshake age that is fresh
STALE = 181.0
ENDPOINT_A = Endpoint(ipaddress.ip_address("203.0.113.7"), 51820)
ENDPOINT_B = Endpoint(ipaddress.ip_address("203.0.113.8"), 51820)


def machine(
    *, probing: bool = True, config: HealthConfig = CONFIG, endpoints: int = 3, **kwargs: object
) -> PeerHealth:
    return PeerHealth(
        config,
        now=0.0,
        probing=probing,
        endpoint_count=endpoints,
        rng=random.Random(SEED),
        **kwargs,  # type: ignore[arg-type]
    )


def seen(
    peer: PeerHealth,
    now: float,
    age: float | None = FRESH,
    probe: bool | None = True,
    rx: int = 0,
    endpoint: Endpoint | None = None,
) -> Decision:
    if not peer.probing:
        probe = None
    return peer.observe(Observation(now, age, rx, 0, probe, endpoint))


def up(**kwargs: object) -> PeerHealth:
    """A peer that came up at t=0."""
    peer = machine(**kwargs)  # type: ignore[arg-type]
    assert seen(peer, 0.0).transition == Transition(S.STARTING, S.UP, "handshake 10s ago", 0.0)
    return peer


def down(**kwargs: object) -> PeerHealth:
    """A probed peer that went down at t=15 (its first recovery action taken then)."""
    peer = up(**kwargs)
    for now in (5.0, 10.0, 15.0):
        decision = seen(peer, now, probe=False)
    assert peer.state is S.RECOVERING
    assert decision.actions == (Action.RERESOLVE,)
    return peer


# --- the table ------------------------------------------------------------------------------


def _starting_to_connecting() -> Decision:
    return seen(machine(), 0.0, age=None, probe=None)


def _starting_to_up() -> Decision:
    return seen(machine(), 0.0)


def _connecting_to_up() -> Decision:
    peer = machine()
    seen(peer, 0.0, age=None, probe=False)
    return seen(peer, 5.0, age=1.0)


def _connecting_to_degraded() -> Decision:
    peer = machine()
    seen(peer, 0.0, age=None, probe=False)
    return seen(peer, 5.0, age=1.0, probe=False)


def _connecting_to_recovering() -> Decision:
    peer = machine()
    seen(peer, 0.0, age=None, probe=False)
    seen(peer, 14.9, age=None, probe=False)
    assert peer.state is S.CONNECTING  # probes before the first handshake do not count
    return seen(peer, 15.0, age=None, probe=False)


def _up_to_degraded() -> Decision:
    return seen(up(), 5.0, probe=False)


def _up_to_recovering() -> Decision:
    return seen(up(), 5.0, age=None, probe=None)


def _degraded_to_up() -> Decision:
    peer = up()
    seen(peer, 5.0, probe=False)
    return seen(peer, 10.0)


def _degraded_to_recovering() -> Decision:
    peer = up()
    seen(peer, 5.0, probe=False)
    seen(peer, 10.0, probe=False)
    return seen(peer, 15.0, probe=False)


def _recovering_to_up() -> Decision:
    peer = down()
    return seen(peer, 20.0, age=3.0)


SCENARIOS: dict[tuple[PeerState, PeerState], tuple[Callable[[], Decision], str]] = {
    (S.STARTING, S.CONNECTING): (_starting_to_connecting, "waiting for the first handshake"),
    (S.STARTING, S.UP): (_starting_to_up, "handshake 10s ago"),
    (S.CONNECTING, S.UP): (_connecting_to_up, "handshake 1s ago"),
    (S.CONNECTING, S.DEGRADED): (
        _connecting_to_degraded,
        "handshake 1s ago, but probe failed (1 of 3)",
    ),
    (S.CONNECTING, S.RECOVERING): (_connecting_to_recovering, "no handshake after 15s"),
    (S.UP, S.DEGRADED): (_up_to_degraded, "probe failed (1 of 3)"),
    (S.UP, S.RECOVERING): (_up_to_recovering, "no handshake"),
    (S.DEGRADED, S.UP): (_degraded_to_up, "probe answered, handshake 10s ago"),
    (S.DEGRADED, S.RECOVERING): (_degraded_to_recovering, "3 probes failed in a row"),
    (S.RECOVERING, S.UP): (_recovering_to_up, "probe answered, handshake 3s ago; was down 5s"),
}


def test_every_transition_of_the_table_has_a_scenario() -> None:
    assert set(SCENARIOS) == TRANSITIONS


@pytest.mark.parametrize("edge", sorted(SCENARIOS, key=lambda e: (e[0].value, e[1].value)))
def test_each_transition_of_the_table(edge: tuple[PeerState, PeerState]) -> None:
    scenario, reason = SCENARIOS[edge]
    transition = scenario().transition
    assert transition is not None
    assert (transition.old, transition.new, transition.reason) == (*edge, reason)


ILLEGAL = [
    (old, new)
    for old, new in itertools.product(PeerState, PeerState)
    if (old, new) not in TRANSITIONS
]


@pytest.mark.parametrize("edge", ILLEGAL, ids=lambda e: f"{e[0].value}-{e[1].value}")
def test_an_illegal_transition_is_refused(edge: tuple[PeerState, PeerState]) -> None:
    peer = machine()
    peer.state = edge[0]
    with pytest.raises(HealthStateError, match="illegal transition"):
        peer._move(Transition(edge[0], edge[1], "test", 1.0))
    assert peer.state is edge[0]
    assert not peer.counters.transitions


def test_a_transition_from_another_state_than_the_current_one_is_refused() -> None:
    peer = up()
    with pytest.raises(HealthStateError, match=r"starting → up \(state is up\)"):
        peer._move(Transition(S.STARTING, S.UP, "again", 1.0))


def test_nothing_returns_to_starting_or_connecting() -> None:
    assert not {edge for edge in TRANSITIONS if edge[1] in (S.STARTING, S.CONNECTING)} - {
        (S.STARTING, S.CONNECTING)
    }


# --- judging --------------------------------------------------------------------------------


def test_a_first_observation_with_a_failing_probe_is_connecting_not_up() -> None:
    peer = machine()
    assert seen(peer, 0.0, probe=False).transition == Transition(
        S.STARTING, S.CONNECTING, "waiting for the first handshake", 0.0
    )


def test_down_after_failures_consecutive_failed_probes() -> None:
    peer = up()
    reasons = [seen(peer, now, probe=False).transition for now in (5.0, 10.0, 15.0)]
    assert [(t.new, t.reason) for t in reasons if t] == [
        (S.DEGRADED, "probe failed (1 of 3)"),
        (S.RECOVERING, "3 probes failed in a row"),
    ]
    assert peer.state_since == 15.0


def test_a_probe_not_run_neither_counts_nor_resets() -> None:
    peer = up()
    seen(peer, 5.0, probe=False)
    seen(peer, 10.0, probe=None)
    seen(peer, 15.0, probe=False)
    assert (peer.state, peer.consecutive_failures) == (S.DEGRADED, 2)
    assert seen(peer, 20.0, probe=False).transition is not None
    assert peer.state is S.RECOVERING


def test_failures_of_one_goes_down_at_the_first_failed_probe() -> None:
    config = dataclasses.replace(CONFIG, failures=1)
    peer = up(config=config)
    transition = seen(peer, 5.0, probe=False).transition
    assert transition == Transition(S.UP, S.RECOVERING, "probe failed", 5.0)
    peer = machine(config=config)
    seen(peer, 0.0, age=None)
    transition = seen(peer, 5.0, age=1.0, probe=False).transition
    assert transition == Transition(S.CONNECTING, S.RECOVERING, "probe failed", 5.0)


def test_a_stale_handshake_takes_a_probed_peer_down_at_once() -> None:
    peer = up()
    assert seen(peer, 5.0, age=180.0).transition is None  # 180 s is still fresh
    transition = seen(peer, 10.0, age=STALE, probe=True).transition
    assert transition == Transition(
        S.UP, S.RECOVERING, "handshake 181s old (stale after 180s)", 10.0
    )


def test_a_degraded_probed_peer_whose_handshake_goes_stale_is_down() -> None:
    peer = up()
    seen(peer, 5.0, probe=False)
    transition = seen(peer, 10.0, age=STALE, probe=False).transition
    assert transition is not None
    assert (transition.new, transition.reason) == (
        S.RECOVERING,
        "handshake 181s old (stale after 180s)",
    )


def test_a_failed_probe_is_excused_while_data_arrives_from_the_peer() -> None:
    peer = up()
    rx = 1000
    seen(peer, 5.0, rx=rx)
    for tick in range(1, 20):
        rx += 500  # requests keep arriving through the tunnel
        decision = seen(peer, 5.0 + 5 * tick, probe=False, rx=rx)
        if tick == 1:
            assert decision.transition == Transition(
                S.UP, S.DEGRADED, "probe failed, but data still arrives from the peer", 10.0
            )
        else:
            assert decision.transition is None
    assert (peer.state, peer.consecutive_failures) == (S.DEGRADED, 0)
    assert peer.counters.probe_failures == 19  # counted for metrics all the same
    # Once nothing arrives any more, failed probes count again.
    for now in (105.0, 110.0, 115.0):
        seen(peer, now, probe=False, rx=rx)
    assert peer.state is S.RECOVERING


def test_only_data_during_the_probe_excuses_it_when_that_was_measured() -> None:
    # The outage begins just after a packet arrived: the counter grew since the last tick,
    # but not while the probe ran. That failed probe counts (else detection is a tick late).
    peer = up(config=HealthConfig(failures=2))
    seen(peer, 5.0, rx=1000)
    lost = Observation(10.0, FRESH, 1500, 0, False, received_during_probe=False)
    assert peer.observe(lost).transition == Transition(
        S.UP, S.DEGRADED, "probe failed (1 of 2)", 10.0
    )
    # A probe dropped while traffic flows through it is excused: not the second failure.
    busy = Observation(15.0, FRESH, 2000, 0, False, received_during_probe=True)
    assert peer.observe(busy).transition is None
    assert (peer.state, peer.consecutive_failures) == (S.DEGRADED, 1)


def test_received_during_probe_is_read_from_the_stats_on_both_sides() -> None:
    before = PeerStats(b"k" * 32, receive_bytes=100)
    after = dataclasses.replace(before, receive_bytes=148)
    now = {"now": 1.0, "wall_now": 2.0}
    assert Observation.from_stats(
        after, probe_ok=False, before_probe=before, **now
    ).received_during_probe
    same = Observation.from_stats(before, probe_ok=False, before_probe=before, **now)
    assert same.received_during_probe is False
    assert Observation.from_stats(after, probe_ok=False, **now).received_during_probe is None
    assert (
        Observation.from_stats(
            after, probe_ok=None, before_probe=before, **now
        ).received_during_probe
        is None
    )


def test_data_arriving_does_not_excuse_a_stale_handshake() -> None:
    peer = up()
    seen(peer, 5.0, rx=10)
    assert seen(peer, 10.0, age=STALE, probe=False, rx=20).transition is not None
    assert peer.state is S.RECOVERING


def test_a_reset_receive_counter_is_no_sign_of_traffic() -> None:
    peer = up()
    seen(peer, 5.0, rx=5000)
    for now in (10.0, 15.0, 20.0):
        seen(peer, now, probe=False, rx=100)  # re-applied peer: counters start over
    assert peer.state is S.RECOVERING


def test_recovering_waits_for_a_probe_answer_even_with_a_fresh_handshake() -> None:
    peer = down()
    assert seen(peer, 16.0, age=1.0, probe=None).transition is None
    assert seen(peer, 17.0, age=1.0, probe=False).transition is None
    assert seen(peer, 18.0, age=STALE, probe=True).transition is None  # answered by whom?
    assert peer.state is S.RECOVERING
    assert seen(peer, 19.0, age=1.0, probe=True).transition is not None
    assert (peer.state, peer.consecutive_failures) == (S.UP, 0)


def test_connecting_lasts_the_grace_whatever_the_probes_say() -> None:
    peer = machine()
    seen(peer, 0.0, age=None, probe=None)
    for now in (5.0, 10.0, 14.0):
        assert seen(peer, now, age=None, probe=False).transition is None
    assert peer.consecutive_failures == 0
    assert peer.connect_grace_seconds == 15.0
    decision = seen(peer, 15.5, age=None, probe=False)
    assert decision == Decision(
        Transition(S.CONNECTING, S.RECOVERING, "no handshake after 16s", 15.5),
        (Action.RERESOLVE,),
    )


def test_a_stale_handshake_from_before_counts_as_none_while_connecting() -> None:
    peer = machine(probing=False)
    assert seen(peer, 0.0, age=500.0).transition is not None
    assert peer.state is S.CONNECTING
    assert seen(peer, 14.0, age=514.0).transition is None
    transition = seen(peer, 15.0, age=515.0).transition
    assert transition == Transition(S.CONNECTING, S.RECOVERING, "no handshake after 15s", 15.0)


# --- peers judged by their handshake alone --------------------------------------------------


def test_handshake_only_peer_is_debounced_over_failures_checks() -> None:
    peer = up(probing=False)
    assert seen(peer, 5.0, age=170.0).transition is None
    transitions = [seen(peer, now, age=now + 170).transition for now in (15.0, 20.0, 25.0)]
    assert [(t.old, t.new, t.reason) for t in transitions if t] == [
        (S.UP, S.DEGRADED, "handshake 185s old (stale after 180s)"),
        (S.DEGRADED, S.RECOVERING, "handshake 195s old (stale after 180s), 3 checks in a row"),
    ]


def test_handshake_only_peer_rides_out_a_late_rekey() -> None:
    # The gateway initiated the session and nothing else is sent: WireGuard rekeys a little
    # after 180 s. That must not count as an outage.
    peer = up(probing=False)
    seen(peer, 5.0, age=178.0)
    assert seen(peer, 10.0, age=183.0).transition == Transition(
        S.UP, S.DEGRADED, "handshake 183s old (stale after 180s)", 10.0
    )
    assert seen(peer, 15.0, age=2.0).transition == Transition(
        S.DEGRADED, S.UP, "handshake 2s ago", 15.0
    )
    assert not peer.counters.recovery_actions


def test_handshake_only_peer_ignores_probe_results() -> None:
    peer = up(probing=False)
    decision = peer.observe(Observation(5.0, FRESH, probe_ok=False))
    assert decision.transition is None
    assert peer.counters.probes == 0


def test_handshake_only_peer_recovers_on_a_fresh_handshake() -> None:
    peer = up(probing=False)
    for now in (5.0, 10.0, 15.0):
        seen(peer, now, age=None)
    assert peer.state is S.RECOVERING
    assert seen(peer, 20.0, age=1.0).transition == Transition(
        S.RECOVERING, S.UP, "handshake 1s ago; was down 5s", 20.0
    )


# --- recovery: escalation and backoff ------------------------------------------------------


def actions_at_wakeups(peer: PeerHealth, count: int) -> list[tuple[float, Action]]:
    """Observe the (still down) peer exactly when it asks to be, ``count`` times."""
    taken = []
    for _ in range(count):
        wakeup = peer.wakeup_at()
        assert wakeup is not None
        assert seen(peer, wakeup - 1e-6, age=None, probe=False).actions == ()  # not yet
        (action,) = seen(peer, wakeup, age=None, probe=False).actions
        taken.append((wakeup, action))
    return taken


def test_escalation_cycles_through_the_ladder_in_order() -> None:
    peer = down()
    taken = actions_at_wakeups(peer, 9)
    assert [action for _, action in taken] == [
        Action.NEXT_ENDPOINT,
        Action.REAPPLY_PEER,
        Action.RERESOLVE,
        Action.NEXT_ENDPOINT,
        Action.REAPPLY_PEER,
        Action.RERESOLVE,
        Action.NEXT_ENDPOINT,
        Action.REAPPLY_PEER,
        Action.RERESOLVE,
    ]
    assert peer.counters.recovery_actions == {
        Action.RERESOLVE: 4,
        Action.NEXT_ENDPOINT: 3,
        Action.REAPPLY_PEER: 3,
    }


def test_backoff_delays_are_the_seeded_full_jitter_sequence() -> None:
    peer = down()
    reference = Backoff(base_seconds=1.0, cap_seconds=60.0, _random=random.Random(SEED))
    expected, now = [], 15.0
    for _ in range(12):
        now += reference.next_delay()
        expected.append(now)
    assert [at for at, _ in actions_at_wakeups(peer, 12)] == pytest.approx(expected)


def test_backoff_gaps_grow_to_the_cap_and_no_further() -> None:
    peer = down()
    times = [15.0] + [at for at, _ in actions_at_wakeups(peer, 40)]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    for attempt, gap in enumerate(gaps):
        assert 0.0 <= gap <= min(60.0, 2.0**attempt)
    assert max(gaps[:3]) <= 4.0
    assert max(gaps) > 45.0  # the cap is reached


def test_actions_wait_for_the_backoff_between_ticks() -> None:
    peer = down()
    wakeup = peer.wakeup_at()
    assert wakeup is not None and 15.0 <= wakeup <= 16.0
    # Observed only every 5 s, the peer takes at most one action per tick.
    counts = [
        len(seen(peer, 15.0 + 5 * tick, age=None, probe=False).actions) for tick in range(1, 30)
    ]
    assert set(counts) <= {0, 1}
    assert counts[:2] == [1, 1]  # 1 s and 2 s ceilings both pass within one tick


def test_success_resets_the_backoff_and_the_ladder() -> None:
    peer = down()
    actions_at_wakeups(peer, 8)
    assert peer.backoff.attempt == 9
    seen(peer, 1000.0, age=1.0)
    assert (peer.state, peer.backoff.attempt, peer.next_action_at) == (S.UP, 0, None)
    for now in (1005.0, 1010.0):
        seen(peer, now, probe=False)
    decision = seen(peer, 1015.0, probe=False)
    assert decision.actions == (Action.RERESOLVE,)  # the ladder starts over, at once
    wakeup = peer.wakeup_at()
    assert wakeup is not None and wakeup <= 1016.0  # and the backoff from 1 s


def test_ladder_without_names_or_a_second_endpoint() -> None:
    assert recovery_ladder(endpoint_count=3, has_names=True) == LADDER
    assert recovery_ladder(endpoint_count=1, has_names=True) == (
        Action.RERESOLVE,
        Action.REAPPLY_PEER,
    )
    assert recovery_ladder(endpoint_count=2, has_names=False) == (
        Action.NEXT_ENDPOINT,
        Action.REAPPLY_PEER,
    )
    assert recovery_ladder(endpoint_count=1, has_names=False) == (Action.REAPPLY_PEER,)
    assert recovery_ladder(endpoint_count=0, has_names=False) == (Action.REAPPLY_PEER,)


def test_a_single_literal_endpoint_is_only_ever_reapplied() -> None:
    peer = up(endpoints=1, has_names=False)
    for now in (5.0, 10.0):
        seen(peer, now, probe=False)
    assert seen(peer, 15.0, probe=False).actions == (Action.REAPPLY_PEER,)
    assert {action for _, action in actions_at_wakeups(peer, 5)} == {Action.REAPPLY_PEER}


# --- periodic re-resolution ------------------------------------------------------------------


def test_periodic_reresolve_while_up() -> None:
    peer = up()
    actions = {now: seen(peer, float(now)).actions for now in range(5, 200, 5)}
    assert [now for now, taken in actions.items() if taken] == [60, 120, 180]
    assert set(itertools.chain(*actions.values())) == {Action.RERESOLVE}
    assert peer.counters.periodic_reresolves == 3
    assert not peer.counters.recovery_actions
    assert peer.wakeup_at() == 240.0


def test_periodic_reresolve_continues_while_degraded() -> None:
    peer = up()
    seen(peer, 55.0, probe=False)
    assert peer.state is S.DEGRADED
    assert seen(peer, 60.0, probe=None).actions == (Action.RERESOLVE,)


def test_no_periodic_reresolve_while_connecting_or_without_names() -> None:
    peer = machine()
    for now in (0.0, 59.0, 60.0, 61.0):
        decision = seen(peer, now, age=None, probe=None)
        if now < 15:
            assert decision.actions == ()
    peer = up(has_names=False)
    assert all(not seen(peer, float(now)).actions for now in range(5, 300, 5))
    assert peer.wakeup_at() is None


def test_periodic_reresolve_counts_from_coming_up() -> None:
    peer = down()
    actions_at_wakeups(peer, 4)  # a RERESOLVE among them
    back_up = 100.0
    seen(peer, back_up, age=1.0)
    assert peer.wakeup_at() == back_up + 60
    assert seen(peer, back_up + 59).actions == ()
    assert seen(peer, back_up + 60).actions == (Action.RERESOLVE,)


# --- flapping -------------------------------------------------------------------------------


def test_a_flapping_probe_never_takes_the_peer_down() -> None:
    peer = up()
    for tick, probe in enumerate(itertools.islice(itertools.cycle([False, False, True]), 60)):
        seen(peer, 5.0 * (tick + 1), probe=probe)
        assert peer.state in (S.UP, S.DEGRADED)
    assert peer.counters.transitions == {
        (S.STARTING, S.UP): 1,
        (S.UP, S.DEGRADED): 20,
        (S.DEGRADED, S.UP): 20,
    }
    assert not peer.counters.recovery_actions


def test_a_flapping_tunnel_goes_down_and_up_each_time_with_a_fresh_ladder() -> None:
    peer = up()
    now = 0.0
    for _ in range(5):
        for _ in range(3):
            now += 5
            decision = seen(peer, now, probe=False)
        assert peer.state is S.RECOVERING
        assert decision.actions == (Action.RERESOLVE,)
        now += 5
        assert seen(peer, now).transition is not None
        assert peer.state is S.UP
    assert peer.counters.transitions[S.DEGRADED, S.RECOVERING] == 5
    assert peer.counters.transitions[S.RECOVERING, S.UP] == 5


# --- counters and observations ---------------------------------------------------------------


def test_counters_for_metrics() -> None:
    peer = up()
    seen(peer, 5.0, endpoint=ENDPOINT_A)
    seen(peer, 10.0, endpoint=None)  # not reported: no change
    seen(peer, 15.0, probe=False, endpoint=ENDPOINT_A)
    seen(peer, 20.0, probe=None, endpoint=ENDPOINT_B)
    seen(peer, 25.0, endpoint=ENDPOINT_A)
    assert peer.counters == PeerCounters(
        transitions=Counter({(S.STARTING, S.UP): 1, (S.UP, S.DEGRADED): 1, (S.DEGRADED, S.UP): 1}),
        recovery_actions=Counter(),
        periodic_reresolves=0,
        probes=5,
        probe_failures=1,
        endpoint_changes=2,
    )


def test_counters_carry_over_to_a_new_machine() -> None:
    first = down()
    second = machine(counters=first.counters)
    seen(second, 0.0)
    assert second.counters is first.counters
    assert second.counters.transitions[S.STARTING, S.UP] == 2
    assert second.counters.recovery_actions[Action.RERESOLVE] == 1


def test_observation_from_stats() -> None:
    stats = PeerStats(
        public_key=bytes(32),
        endpoint=ENDPOINT_A,
        last_handshake_unix_seconds=1_000_000.0,
        receive_bytes=7,
        transmit_bytes=9,
    )
    assert Observation.from_stats(stats, now=5.0, wall_now=1_000_042.5, probe_ok=True) == (
        Observation(5.0, 42.5, 7, 9, True, ENDPOINT_A)
    )
    never = dataclasses.replace(stats, last_handshake_unix_seconds=None)
    assert (
        Observation.from_stats(never, now=5.0, wall_now=1.0, probe_ok=None).handshake_age_seconds
        is None
    )
    # A clock stepped backwards never makes an age negative.
    assert (
        Observation.from_stats(
            stats, now=5.0, wall_now=999_990.0, probe_ok=None
        ).handshake_age_seconds
        == 0.0
    )
    assert Observation.from_stats(None, now=5.0, wall_now=1.0, probe_ok=False) == Observation(
        5.0, None, probe_ok=False
    )


def test_peers_are_independent() -> None:
    edge_1, edge_2 = up(), up()
    for now in (5.0, 10.0, 15.0):
        assert seen(edge_2, now).actions == ()
        seen(edge_1, now, probe=False)
    assert (edge_1.state, edge_2.state) == (S.RECOVERING, S.UP)


# --- from the config -----------------------------------------------------------------------


def gateway(endpoints: tuple[str, ...], probe_address: str | None = "10.44.0.1") -> GatewayConfig:
    return GatewayConfig(
        name="edge-1",
        public_key=bytes(32),
        endpoints=tuple(HostPort.parse(text) for text in endpoints),
        allowed_ips=(ipaddress.ip_network("10.44.0.1/32"),),
        probe_address=None if probe_address is None else ipaddress.ip_address(probe_address),
    )


def test_for_gateway_fits_the_machine_to_the_gateway() -> None:
    peer = PeerHealth.for_gateway(
        CONFIG, gateway(("gw1.example:51820", "192.0.2.1:51820")), now=7.0
    )
    assert (peer.probing, peer.ladder, peer.state_since) == (True, LADDER, 7.0)
    peer = PeerHealth.for_gateway(CONFIG, gateway(("[2001:db8::1]:51820",), None), now=0.0)
    assert (peer.probing, peer.ladder, peer.wakeup_at()) == (False, (Action.REAPPLY_PEER,), None)
    no_probe = dataclasses.replace(CONFIG, probe="none")
    counters = PeerCounters(periodic_reresolves=4)
    peer = PeerHealth.for_gateway(no_probe, gateway(("gw.example:1",)), now=0.0, counters=counters)
    assert (peer.probing, peer.ladder) == (False, (Action.RERESOLVE, Action.REAPPLY_PEER))
    assert peer.counters is counters


# --- properties -----------------------------------------------------------------------------

ticks = st.lists(
    st.tuples(
        st.floats(0.01, 30.0),  # time since the previous observation
        st.sampled_from([None, 1.0, 100.0, 179.0, 181.0, 1000.0]),  # handshake age
        st.sampled_from([True, False, None]),  # probe
        st.integers(0, 2),  # receive bytes gained
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(
    ticks,
    st.booleans(),
    st.integers(1, 4),
    st.integers(1, 3),
    st.booleans(),
)
def test_any_observations_keep_every_invariant(
    sequence: list[tuple[float, float | None, bool | None, int]],
    probing: bool,
    failures: int,
    endpoints: int,
    has_names: bool,
) -> None:
    config = dataclasses.replace(CONFIG, failures=failures)
    peer = machine(probing=probing, config=config, endpoints=endpoints, has_names=has_names)
    now, rx, transitions = 0.0, 0, 0
    for gap, age, probe, gained in sequence:
        now += gap
        rx += gained
        before = peer.state
        decision = seen(peer, now, age=age, probe=probe, rx=rx)
        if decision.transition is not None:
            transitions += 1
            assert (decision.transition.old, decision.transition.new) in TRANSITIONS
            assert decision.transition.old is before
            assert decision.transition.at == now
            assert decision.transition.reason
        assert len(decision.actions) <= 1
        for action in decision.actions:
            if peer.state is S.RECOVERING:
                assert action in peer.ladder
            else:
                assert peer.is_up and action is Action.RERESOLVE and has_names
        if peer.state is S.UP:
            assert peer.consecutive_failures == 0
        if peer.state is S.DEGRADED:
            assert peer.consecutive_failures < failures
        fresh = age is not None and age <= 180.0
        if before is S.RECOVERING and fresh and (probe is True or not probing):
            assert peer.state is S.UP  # recovery is noticed at once
    assert sum(peer.counters.transitions.values()) == transitions


def test_a_network_change_starts_the_recovery_over_at_once() -> None:
    peer = down()
    # Deep in the ladder: the backoff has grown and the next rung is far away.
    now = 1000.0
    for _ in range(12):
        now = max(now, peer.next_action_at or now)
        seen(peer, now, age=STALE, probe=False)
    assert peer.next_action_at is not None and peer.next_action_at > now
    peer.network_changed(now + 0.5)
    decision = seen(peer, now + 0.5, age=STALE, probe=False)
    assert decision.actions == (peer.ladder[0],)  # the first rung, right away
    # Up peers are not disturbed.
    healthy = up()
    healthy.network_changed(1.0)
    assert seen(healthy, 5.0).actions == ()
