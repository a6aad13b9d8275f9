"""Tell producers whether this dispatcher needs waking (notifyq.queue_appetite).

Every INSERT that notifies commits under one database-wide lock, so inserts skip
their notification while every dispatcher of the queue is draining: its claims
come back full and it claims again without being told.  The rows say so:

    draining  after DRAIN_AFTER full claims in a row; counts for TTL seconds,
              renewed while the claims stay full (a dead dispatcher's row expires)
    hungry    after a short claim.  Then, before it waits, the dispatcher passes
              the barrier (notifyq.appetite_barrier: every producer transaction
              that may have read the rows draining has ended) and claims again,
              so a job whose notification was skipped is claimed by that claim.

schema.sql (notifyq.queue_appetite) has the rule and why no job waits for the
poll.  The barrier waits 20 ms at most (new producers of the queue wait behind
it); when a producer keeps its transaction open longer, the dispatcher stays
hungry and tries again after a pause that doubles up to BARRIER_MAX, claiming
once the barrier passes.

Only a dispatcher that listens states an appetite: one that polls is woken by
nothing anyway.  A state write that failed leaves `state` unknown (None): the
next claim states it again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import anyio

from .store import Store

DRAIN_AFTER = 2  # full claims in a row before the rows say draining
TTL = 10.0  # seconds a draining row counts; renewed after half of it
BARRIER_FIRST = 0.01  # seconds before a barrier that gave up is tried again ...
BARRIER_MAX = 0.5  # ... doubling up to this


class Appetite:
    def __init__(
        self,
        store: Store,
        claimant: str,
        queues: Sequence[str],
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        self._store = store
        self._claimant = claimant
        self._queues = sorted(queues)
        self._clock = clock
        self.state: str | None = None  # what our rows say, as far as we know
        self._full = 0  # full claims in a row
        self._renew_at = math.inf
        self.barrier_at = math.inf  # when the barrier is due (inf: none pending)
        self._pause = BARRIER_FIRST
        self.marks = 0  # state writes
        self.barriers = 0  # barriers passed
        self.barriers_missed = 0  # barriers that gave up on a long producer transaction

    async def claimed(self, full: bool) -> None:
        """After each claim: whether it came back full.  May raise DatabaseUnavailable
        (the state is then unknown)."""
        if full:
            self._full += 1
            if self._full < DRAIN_AFTER:
                return
            if self.state == "draining" and self._clock() < self._renew_at:
                return
            await self._mark("draining")
            self._renew_at = self._clock() + TTL / 2
            # Draining again: the claims go on, and the next short one passes a barrier.
            self.barrier_at = math.inf
            return
        self._full = 0
        if self.state == "hungry":
            return
        await self._mark("hungry")
        self._pause = BARRIER_FIRST
        self.barrier_at = self._clock()

    async def barrier(self) -> bool:
        """Pass the barrier that is due; True: claim now.  False: try again at
        `barrier_at`.  May raise DatabaseUnavailable (call `missed`)."""
        if not await self._store.appetite_barrier(self._queues):
            self.missed()
            return False
        self.barriers += 1
        self.barrier_at = math.inf
        return True

    def missed(self) -> None:
        self.barriers_missed += 1
        self.barrier_at = self._clock() + self._pause
        self._pause = min(self._pause * 2, BARRIER_MAX)

    def lost(self) -> None:
        """Our rows may be gone (the listener was cut off: a peer may have taken us for
        dead): state them again after the next claim."""
        self.state = None
        self._full = 0

    async def forget(self) -> None:
        """We claim no more: drop our rows (a draining one would hold back notifications)."""
        self.state = None
        await self._store.set_appetite(self._claimant, self._queues, None, TTL)

    async def _mark(self, state: str) -> None:
        self.state = None
        await self._store.set_appetite(self._claimant, self._queues, state, TTL)
        self.state = state
        self.marks += 1
