"""When to run a failed job again: exponential backoff, jittered in its upper half; and
how long to wait for a lost database (reconnect_delay).  Pure."""

from __future__ import annotations

import random
from dataclasses import dataclass

from .errors import ConfigurationError


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before attempt n+1 is drawn uniformly from [base*factor^(n-1) / 2, that].

    Half-jitter keeps retries of a burst of failures apart while still
    guaranteeing that the delay grows.
    """

    base: float = 1.0
    factor: float = 2.0
    max_delay: float = 3600.0

    def __post_init__(self) -> None:
        if self.base < 0 or self.factor < 1 or self.max_delay < 0:
            raise ConfigurationError("backoff needs base >= 0, factor >= 1 and max_delay >= 0")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after `attempt` (1-based) failed."""
        try:
            ceiling = min(self.max_delay, self.base * self.factor ** max(attempt - 1, 0))
        except OverflowError:  # factor ** attempt beyond a float: far past any max_delay
            ceiling = self.max_delay
        draw = (rng or random).random()
        return ceiling / 2 + draw * ceiling / 2


def reconnect_delay(failures: int, *, first: float, cap: float, jitter: bool = True) -> float:
    """Seconds to wait after `failures` consecutive failures to reach the database:
    `first` doubling to `cap`, times a jitter in [0.5, 1] that keeps many processes from
    retrying in step.  The exponent is capped, so no outage is long enough to overflow."""
    delay = min(cap, first * 2.0 ** min(max(failures, 0), 32))
    return delay * random.uniform(0.5, 1.0) if jitter else delay
