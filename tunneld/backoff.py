"""Exponential backoff with full jitter (sans-IO: it computes delays, the caller sleeps).

Full jitter — a uniform draw from ``[0, min(cap, base * 2**attempt)]`` — spreads retries of many
connectors that lost the same gateway at the same moment, instead of synchronising them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    base_seconds: float = 1.0
    cap_seconds: float = 60.0
    attempt: int = 0
    _random: random.Random = field(default_factory=random.Random, repr=False)

    def next_delay(self) -> float:
        """The delay before the next try; each call counts one more failure."""
        ceiling = min(self.cap_seconds, self.base_seconds * 2.0**self.attempt)
        self.attempt += 1
        return self._random.uniform(0.0, ceiling)

    def reset(self) -> None:
        """Call after a success: the next failure starts over from ``base_seconds``."""
        self.attempt = 0
