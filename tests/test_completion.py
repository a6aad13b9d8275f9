"""The completer's contract, against a real table: each attempt's end becomes one fenced
write (or a hand-back, or nothing for a cancelled job), the ledger drops the attempt once
it is written, and subscribers hear what was decided and what the database made of it."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest

from notifyq import store
from notifyq.completion import Completer, decide
from notifyq.errors import DoNotRetry
from notifyq.job import Job
from notifyq.ledger import Ledger
from notifyq.worker_pool import Finished, UnknownTask
from tests.conftest import query

pytestmark = pytest.mark.anyio

CLAIMANT = "test-host:1:completion"


class Heard:
    """A completion.Subscriber that writes down what it is told, by job id."""

    def __init__(self) -> None:
        self.decisions: dict[int, str] = {}
        self.settlements: dict[int, str] = {}

    def decided(self, finished: Finished, status: str) -> None:
        self.decisions[finished.job.id] = status

    def settled(self, job: Job, status: str) -> None:
        self.settlements[job.id] = status


def insert(dsn: str, max_attempts: int = 3) -> int:
    rows = query(
        dsn,
        "INSERT INTO notifyq.jobs (task, max_attempts) VALUES ('t', %s) RETURNING id",
        max_attempts,
    )
    return int(rows[0][0])


def row(dsn: str, job_id: int) -> tuple[Any, ...]:
    return query(dsn, "SELECT status, attempts FROM notifyq.jobs WHERE id = %s", job_id)[0]


async def until_written(ledger: Ledger) -> None:
    """Until every attempt left the ledger (its outcome written), within 20 s."""
    with anyio.fail_after(20):
        while len(ledger):  # noqa: ASYNC110 - the ledger has no event
            await anyio.sleep(0.02)


def test_decide_asks_for_a_retry_unless_the_error_says_not_to() -> None:
    job = Job(1, "default", "t", None, 1, 3)
    assert decide(Finished(job, None)).status == "succeeded"
    assert decide(Finished(job, None, ValueError("x"))).status == "failed"
    assert decide(Finished(job, None, DoNotRetry("x"))).status == "dead"
    assert decide(Finished(job, None, UnknownTask("x"))).status == "dead"
    outcome = decide(Finished(job, None, ValueError("bad\x00byte")))
    assert outcome.error is not None and outcome.error.startswith("ValueError: bad\\x00byte")


async def test_every_end_is_written_once_fenced_and_published(dsn: str) -> None:
    ok, retried, dead, final, handed, cancelled, taken = (
        insert(dsn),
        insert(dsn),
        insert(dsn, max_attempts=1),
        insert(dsn),
        insert(dsn),
        insert(dsn),
        insert(dsn),
    )
    claims = store.Store(dsn, "claims")
    writes = store.Store(dsn, "complete")
    ledger = Ledger()
    written = 0

    def on_written() -> None:
        nonlocal written
        written += 1

    heard = Heard()
    try:
        jobs, *_ = await claims.claim(
            queues=["default"], limit=10, claimant=CLAIMANT, lease=30, tasks=["t"]
        )
        by_id = {j.id: j for j in jobs}
        assert len(by_id) == 7
        for j in jobs:
            ledger.claimed((j.id, j.attempt))
            ledger.finished((j.id, j.attempt))  # as the pool reports it
        # An operator cancelled one while it ran; another was rescued from under us.
        query(dsn, "UPDATE notifyq.jobs SET status = 'cancelled' WHERE id = %s", cancelled)
        query(
            dsn,
            "UPDATE notifyq.jobs SET status = 'queued', claimed_by = NULL,"
            " lease_expires_at = NULL WHERE id = %s",
            taken,
        )
        completer = Completer(writes, CLAIMANT, ledger, on_written)
        completer.subscribe(heard)
        ends = [
            Finished(by_id[ok], None, result='{"a":1}'),
            Finished(by_id[retried], None, ValueError("try again")),
            Finished(by_id[dead], None, ValueError("no attempts left")),
            Finished(by_id[final], None, DoNotRetry("never")),
            Finished(by_id[handed], None, interrupted=True),
            Finished(by_id[cancelled], None, interrupted=True, cancelled=True),
            Finished(by_id[taken], None),
        ]
        async with anyio.create_task_group() as tg:
            tg.start_soon(completer.run)
            for end in ends:
                completer.submit(end)
            assert completer.pending == 6  # the cancelled one had nothing to write
            await until_written(ledger)
            completer.close(give_up_after=5)
    finally:
        await claims.close()
        await writes.close()
    assert heard.decisions == {
        ok: "succeeded",
        retried: "failed",
        dead: "failed",
        final: "dead",
        handed: "interrupted",
        cancelled: "cancelled",
        taken: "succeeded",
    }
    # What the rows became, by the database's retry policy; the fenced one is not heard.
    assert heard.settlements == {ok: "succeeded", retried: "queued", dead: "dead", final: "dead"}
    assert row(dsn, ok) == ("succeeded", 1)
    assert row(dsn, retried) == ("queued", 1)
    assert row(dsn, dead) == ("dead", 1)
    assert row(dsn, final) == ("dead", 1)
    assert row(dsn, handed) == ("queued", 0)  # handed back: the attempt is not counted
    assert row(dsn, cancelled)[0] == "cancelled"
    assert row(dsn, taken) == ("queued", 1)  # the late outcome was fenced off
    assert (completer.written, completer.fenced) == (5, 1)
    assert completer.decided == {"succeeded": 1, "queued": 1, "dead": 2, "cancelled": 1}
    assert completer.pending == 0
    assert written >= 1


async def test_a_write_that_cannot_reach_the_database_is_kept_and_held(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Its attempt stays in the ledger, not being written (so its lease is renewed and a
    loss would be reported), while the completer retries the write."""
    caplog.set_level(logging.WARNING, logger="notifyq.completion")
    job_id = insert(dsn)
    claims = store.Store(dsn, "claims")
    # Nothing listens on port 1: every write fails as DatabaseUnavailable.
    writes = store.Store("postgresql://postgres@127.0.0.1:1/none?connect_timeout=2", "complete")
    ledger = Ledger()
    failures = lambda: [r for r in caplog.records if "completion write failed" in r.getMessage()]  # noqa: E731
    try:
        jobs, *_ = await claims.claim(
            queues=["default"], limit=1, claimant=CLAIMANT, lease=30, tasks=["t"]
        )
        attempt = (jobs[0].id, jobs[0].attempt)
        ledger.claimed(attempt)
        ledger.finished(attempt)
        completer = Completer(writes, CLAIMANT, ledger, lambda: None)
        async with anyio.create_task_group() as tg:
            tg.start_soon(completer.run)
            completer.submit(Finished(jobs[0], None))
            with anyio.fail_after(20):
                while len(failures()) < 2:  # noqa: ASYNC110 - log records have no event
                    await anyio.sleep(0.02)
            assert ledger.attempts() == {attempt}
            assert ledger.still_expected({attempt}) == {attempt}
            assert completer.pending == 1
            completer.close(give_up_after=0)
    finally:
        await claims.close()
        await writes.close()
    assert len(ledger) == 1  # never written: left to the rescuer once its lease expires
    assert row(dsn, job_id) == ("running", 1)


class Broken:
    """A subscriber that raises on everything it hears."""

    def decided(self, finished: Finished, status: str) -> None:
        raise RuntimeError("decided broke")

    def settled(self, job: Job, status: str) -> None:
        raise RuntimeError("settled broke")


async def test_a_subscriber_that_raises_stops_no_write(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Its error is logged once; every outcome is still written and released from the
    ledger, and the subscribers after it still hear of each."""
    caplog.set_level(logging.ERROR, logger="notifyq.completion")
    ok, failed = insert(dsn), insert(dsn)
    claims = store.Store(dsn, "claims")
    writes = store.Store(dsn, "complete")
    ledger = Ledger()
    heard = Heard()
    try:
        jobs, *_ = await claims.claim(
            queues=["default"], limit=10, claimant=CLAIMANT, lease=30, tasks=["t"]
        )
        by_id = {j.id: j for j in jobs}
        for j in jobs:
            ledger.claimed((j.id, j.attempt))
            ledger.finished((j.id, j.attempt))
        completer = Completer(writes, CLAIMANT, ledger, lambda: None)
        completer.subscribe(Broken())
        completer.subscribe(heard)
        async with anyio.create_task_group() as tg:
            tg.start_soon(completer.run)
            completer.submit(Finished(by_id[ok], None))
            completer.submit(Finished(by_id[failed], None, ValueError("again")))
            await until_written(ledger)
            completer.close(give_up_after=5)
    finally:
        await claims.close()
        await writes.close()
    assert heard.decisions == {ok: "succeeded", failed: "failed"}
    assert heard.settlements == {ok: "succeeded", failed: "queued"}
    assert row(dsn, ok) == ("succeeded", 1)
    assert row(dsn, failed) == ("queued", 1)
    logged = [r for r in caplog.records if "subscriber" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None
