import random

from tunneld.backoff import Backoff


def test_delays_stay_under_a_doubling_ceiling_capped_at_the_maximum() -> None:
    backoff = Backoff(base_seconds=1.0, cap_seconds=60.0, _random=random.Random(7))
    ceilings = [1, 2, 4, 8, 16, 32, 60, 60, 60]
    for ceiling in ceilings:
        delay = backoff.next_delay()
        assert 0.0 <= delay <= ceiling


def test_jitter_uses_the_whole_range() -> None:
    backoff = Backoff(base_seconds=1.0, cap_seconds=8.0, attempt=10, _random=random.Random(1))
    delays = [backoff.next_delay() for _ in range(200)]
    assert min(delays) < 1.0
    assert max(delays) > 7.0


def test_reset_starts_over() -> None:
    backoff = Backoff(base_seconds=1.0, cap_seconds=60.0, _random=random.Random(3))
    for _ in range(10):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() <= 1.0
