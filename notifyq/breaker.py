"""A task's circuit breaker settings (`@app.task(circuit_breaker=...)`).  Pure.

The breaker itself lives in PostgreSQL (notifyq.circuit_breakers, schema.sql),
shared by every dispatcher and SQL worker: the claim holds back the jobs of a
task whose breaker is open and lets one probe through after the cool-down; the
completion counts failures and opens and closes it.  This object only carries
the three settings a dispatcher writes there at start-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigurationError

# Mirrors the CHECK circuit_breakers_failures_range.
MAX_FAILURES = 1_000_000


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    """Open after `failures` failed attempts within `window` seconds (counted from the
    first of them); while open, no job of the task starts, and none is charged an
    attempt; `cooldown` seconds later one job runs as a probe: its success closes the
    breaker, its failure opens it again for another cool-down.

    A failure is an attempt that raised (or timed out, or asked to Retry); an attempt
    that ends the job for good (DoNotRetry, a refused payload, an HTTP 4xx) or a
    cancellation says nothing about the service and is not counted."""

    failures: int = 5
    window: float = 60.0
    cooldown: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.failures, bool) or not isinstance(self.failures, int):
            raise ConfigurationError(
                f"circuit_breaker failures must be a whole number, not {self.failures!r}"
            )
        if not 1 <= self.failures <= MAX_FAILURES:
            raise ConfigurationError(
                f"circuit_breaker failures must be from 1 to {MAX_FAILURES:,}, not {self.failures}"
            )
        for name in ("window", "cooldown"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigurationError(f"circuit_breaker {name} must be seconds, not {value!r}")
            if not (math.isfinite(value) and value > 0):
                raise ConfigurationError(
                    f"circuit_breaker {name} must be a positive number of seconds, not {value}"
                )
