"""The dispatcher's contract on its own, against a real table: it claims no more than the
free slots, and counts them from the ledger (attempts running take a slot; outcomes not
yet written past the concurrency hold claims back), waking when either is given back."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from notifyq import store
from notifyq.dispatcher import Dispatcher, Work
from notifyq.job import Job
from notifyq.ledger import Ledger
from notifyq.registry import Batching
from tests.conftest import query
from tests.helpers import eventually

pytestmark = pytest.mark.anyio

CLAIMANT = "test-host:1:dispatcher"
TASK = store.TaskSettings("t", 3, 1.0, 2.0, 3600.0, None)


def insert(dsn: str, n: int) -> None:
    query(dsn, "INSERT INTO notifyq.jobs (task) SELECT 't' FROM generate_series(1, %s)", n)


class Taken:
    """The pool's side of the hand-over: each job enters the ledger as running."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.jobs: list[Job] = []
        self.batches: list[tuple[Job, ...]] = []
        self.changed = anyio.Event()

    def submit(self, work: Work) -> None:
        if isinstance(work, tuple):  # a batch: one slot
            self.ledger.claimed_batch([(job.id, job.attempt) for job in work])
            self.batches.append(work)
            self.jobs.extend(work)
        else:
            self.ledger.claimed((work.id, work.attempt))
            self.jobs.append(work)
        self.changed.set()

    async def until(self, test: Callable[[], bool]) -> None:
        with anyio.fail_after(20):
            while not test():
                await self.changed.wait()
                self.changed = anyio.Event()


@asynccontextmanager
async def dispatching(
    dsn: str, ledger: Ledger, concurrency: int, batches: Mapping[str, Batching] | None = None
) -> AsyncIterator[tuple[Dispatcher, Taken]]:
    claims = store.Store(dsn, "claim")
    taken = Taken(ledger)
    dispatcher = Dispatcher(
        claims,
        CLAIMANT,
        queues=["default"],
        concurrency=concurrency,
        batch_size=concurrency,
        poll_interval=60,  # no poll in these tests: every claim has a reason
        lease=30,
        tasks=[TASK],
        submit=taken.submit,
        ledger=ledger,
        batches=batches,
    )
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(dispatcher.run)
            yield dispatcher, taken
            dispatcher.stop()
    finally:
        await claims.close()


async def test_attempts_running_in_the_ledger_take_slots(dsn: str) -> None:
    insert(dsn, 5)
    ledger = Ledger()
    ledger.claimed((10**9, 1))  # an attempt already running here: one of three slots
    async with dispatching(dsn, ledger, concurrency=3) as (dispatcher, taken):
        await taken.until(lambda: len(taken.jobs) == 2)
        # One claim, for the two free slots; the claim came back full, yet every slot is
        # taken now, so the next claim waits for a slot.
        assert (dispatcher.claims, dispatcher.claimed, dispatcher.running) == (1, 2, 3)
        first = taken.jobs[0]
        ledger.finished((first.id, first.attempt))  # its handler returned ...
        dispatcher.slot_freed()  # ... and the pool's report says so
        await taken.until(lambda: len(taken.jobs) == 3)
        assert dispatcher.claimed == 3
        assert ledger.running == 3 and ledger.pending == 1


async def test_outcomes_waiting_to_be_written_past_the_concurrency_hold_claims_back(
    dsn: str,
) -> None:
    insert(dsn, 5)
    ledger = Ledger()
    unwritten = [(10**9 + n, 1) for n in range(4)]  # one more than the concurrency
    for attempt in unwritten:
        ledger.claimed(attempt)
        ledger.finished(attempt)
    async with dispatching(dsn, ledger, concurrency=3) as (dispatcher, taken):
        await taken.until(lambda: len(taken.jobs) == 2)  # 3 slots, less the 1 of backlog
        assert dispatcher.claims == 1
        ledger.written(unwritten)  # the completer wrote them ...
        dispatcher.outcomes_written()  # ... and told the dispatcher
        await taken.until(lambda: len(taken.jobs) == 3)
        assert dispatcher.claimed == 3
        assert dispatcher.running == 3


async def test_a_batch_task_held_back_by_a_rate_limit_claims_once_a_slot_a_pass(
    dsn: str,
) -> None:
    """Batch claims that only defer (a rate limit gives every candidate a later slot) take
    no slot, yet each counts as one: a pass does not go on claiming until the whole
    backlog is deferred, deaf to stop() and with the other tasks waiting."""
    query(dsn, "INSERT INTO notifyq.rate_limits (rate_key, per_second) VALUES ('slow', 0.001)")
    query(
        dsn,
        "INSERT INTO notifyq.jobs (task, rate_key) SELECT 't', 'slow' FROM generate_series(1, 60)",
    )
    ledger = Ledger()
    async with dispatching(dsn, ledger, concurrency=1, batches={"t": Batching(10)}) as (
        dispatcher,
        taken,
    ):
        await taken.until(lambda: len(taken.batches) == 1)  # the one job the limit lets start
        claims_by_pass: Counter[int] = Counter()
        claim = dispatcher._store.claim

        async def counted(**kwargs: Any) -> store.Claim:
            claims_by_pass[dispatcher.passes] += 1
            return await claim(**kwargs)

        dispatcher._store.claim = counted  # type: ignore[method-assign]
        (job,) = taken.batches[0]
        ledger.finished_batch([(job.id, job.attempt)])  # its slot is free: claim again
        dispatcher.slot_freed()
        # Every job but the one running has its slot: the claims have gone through them.
        unreserved = "SELECT count(*) FROM notifyq.jobs WHERE NOT rate_reserved"
        await eventually(lambda: query(dsn, unreserved)[0][0] == 1)
    assert claims_by_pass and max(claims_by_pass.values()) == 1, claims_by_pass
