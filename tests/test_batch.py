"""Batch handlers (`@app.task(batch_size=N)`): up to N jobs a call, one slot a batch,
outcomes per job; and the SQL worker's claim of a batch of one task."""

from __future__ import annotations

import json
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

import anyio
import pytest

import notifyq
from notifyq import Backoff, BatchItem, ConfigurationError
from notifyq.errors import OutcomeAlreadySet
from notifyq.job import JobContext
from tests.conftest import query, statuses
from tests.helpers import eventually, serving

pytestmark = pytest.mark.anyio


def insert(dsn: str, task: str, count: int, payload: str = "'{}'") -> None:
    query(
        dsn,
        f"INSERT INTO notifyq.jobs (task, payload) SELECT %s, {payload}::jsonb"
        " FROM generate_series(1, %s) AS g",
        task,
        count,
    )


async def test_a_batch_handler_gets_up_to_n_jobs_a_call_in_one_slot(dsn: str) -> None:
    app = notifyq.App()
    calls: list[list[int]] = []

    @app.task(name="bulk", batch_size=100)
    async def bulk(batch: list[BatchItem[Any]]) -> None:
        calls.append([item.id for item in batch])

    insert(dsn, "bulk", 250)
    # Two slots: a batch of 100 takes one of them, not 100.
    async with serving(app, dsn, concurrency=2) as worker:
        await eventually(lambda: statuses(dsn) == {"succeeded": 250})
    sizes = sorted(len(c) for c in calls)
    assert sizes == [50, 100, 100], sizes
    ran = [job_id for c in calls for job_id in c]
    assert len(set(ran)) == 250 == len(ran)
    assert worker.dispatcher.claimed == 250
    assert worker.held.slots == 0 and len(worker.held) == 0


async def test_outcomes_per_item_sync_handler(dsn: str) -> None:
    app = notifyq.App()
    seen: list[tuple[int, int]] = []

    @app.task(name="mixed", batch_size=10, max_attempts=3, backoff=Backoff(base=0))
    def mixed(batch: list[BatchItem[dict[str, Any]]]) -> None:
        assert threading.current_thread() is not threading.main_thread()
        for item in batch:
            seen.append((item.id, item.ctx.attempt))
            kind = item.payload["kind"]
            if kind == "ok":
                item.succeed({"n": item.payload["n"]})
            elif kind == "flaky" and item.ctx.attempt == 1:
                item.retry("try again", after=0)
            elif kind == "flaky":
                item.succeed("second time")
            elif kind == "bad":
                item.dead(ValueError("no such address"))
            # "forget": left unsettled, it succeeds when the handler returns

    query(
        dsn,
        "INSERT INTO notifyq.jobs (task, payload) SELECT 'mixed',"
        " jsonb_build_object('n', g, 'kind', (ARRAY['ok', 'flaky', 'bad', 'forget'])[g % 4 + 1])"
        " FROM generate_series(1, 20) AS g",
    )
    async with serving(app, dsn, concurrency=2):
        await eventually(lambda: statuses(dsn) == {"succeeded": 15, "dead": 5})
    rows = query(
        dsn,
        "SELECT payload->>'kind', status, attempts, result, last_error FROM notifyq.jobs",
    )
    for kind, status, attempts, result, error in rows:
        if kind == "ok":
            assert (status, attempts, set(result)) == ("succeeded", 1, {"n"})
        elif kind == "flaky":
            assert (status, attempts, result) == ("succeeded", 2, "second time")
            assert error.startswith("Retry: try again")
        elif kind == "bad":
            assert (status, attempts, result) == ("dead", 1, None)
            assert error.startswith("DoNotRetry: ValueError: no such address")
        else:
            assert (status, attempts, result) == ("succeeded", 1, None)
    assert len(seen) == 25 == len(set(seen))  # the 5 flaky ones ran twice, nothing else did


async def test_a_raising_batch_handler_fails_the_items_it_did_not_settle(dsn: str) -> None:
    app = notifyq.App()
    calls = 0

    @app.task(name="boom", batch_size=50, max_attempts=2, backoff=Backoff(base=0))
    async def boom(batch: list[BatchItem[dict[str, Any]]]) -> None:
        nonlocal calls
        calls += 1
        for item in batch:
            if item.payload["kind"] == "done":
                item.succeed("kept")  # settled before the exception: it stands
        if any(item.payload["kind"] == "doomed" for item in batch) or calls == 1:
            raise RuntimeError("the bulk API is down")

    query(
        dsn,
        "INSERT INTO notifyq.jobs (task, payload) VALUES"
        " ('boom', '{\"kind\": \"done\"}'), ('boom', '{\"kind\": \"later\"}'),"
        " ('boom', '{\"kind\": \"later\"}')",
    )
    async with serving(app, dsn, concurrency=1):
        await eventually(lambda: statuses(dsn) == {"succeeded": 3})
        assert calls == 2  # the two `later` ones failed once, then ran together again
        query(
            dsn,
            "INSERT INTO notifyq.jobs (task, payload) VALUES ('boom', %s)",
            '{"kind": "doomed"}',
        )
        await eventually(lambda: statuses(dsn) == {"succeeded": 3, "dead": 1})
    rows = query(dsn, "SELECT payload->>'kind', attempts, result, last_error FROM notifyq.jobs")
    by_kind = {(k, a) for k, a, _, _ in rows}
    assert by_kind == {("done", 1), ("later", 2), ("doomed", 2)}
    assert all(r == "kept" for k, _, r, _ in rows if k == "done")
    doomed = next(e for k, _, _, e in rows if k == "doomed")
    assert doomed.startswith("RuntimeError: the bulk API is down")
    assert "Traceback" in doomed


async def test_two_dispatchers_share_batches_and_run_no_job_twice(dsn: str) -> None:
    app = notifyq.App()
    ran: Counter[int] = Counter()
    by: Counter[str] = Counter()

    @app.task(name="shared", batch_size=40)
    async def shared(batch: list[BatchItem[Any]]) -> None:
        for item in batch:
            ran[item.id] += 1
        await anyio.sleep(0.01)

    async with serving(app, dsn, concurrency=2) as one, serving(app, dsn, concurrency=2) as two:
        insert(dsn, "shared", 600)
        await eventually(lambda: statuses(dsn) == {"succeeded": 600})
        by["one"], by["two"] = one.dispatcher.claimed, two.dispatcher.claimed
    assert len(ran) == 600 and set(ran.values()) == {1}
    assert by["one"] + by["two"] == 600
    assert by["one"] > 0 and by["two"] > 0, by


async def test_batch_and_single_tasks_both_progress(dsn: str) -> None:
    app = notifyq.App()

    @app.task(name="many", batch_size=20)
    async def many(batch: list[BatchItem[Any]]) -> None:
        await anyio.sleep(0.005)

    @app.task(name="one")
    async def one(payload: Any) -> None:
        await anyio.sleep(0.001)

    insert(dsn, "many", 400)
    insert(dsn, "one", 100)
    async with serving(app, dsn, concurrency=3):
        await eventually(lambda: statuses(dsn) == {"succeeded": 500})


async def test_batch_wait_gathers_a_trickle_into_one_batch(dsn: str) -> None:
    app = notifyq.App()
    sizes: list[int] = []

    @app.task(name="gather", batch_size=100, batch_wait=3.0)
    async def gather(batch: list[BatchItem[Any]]) -> None:
        sizes.append(len(batch))

    async with serving(app, dsn, concurrency=2):
        insert(dsn, "gather", 1)
        await eventually(lambda: sizes == [1])  # the first of a trickle runs at once
        for _ in range(5):  # five transactions, five notifications, within the hold
            insert(dsn, "gather", 1)
        await eventually(lambda: statuses(dsn) == {"succeeded": 6})
    assert sizes == [1, 5]


async def test_a_job_cancelled_in_a_running_batch_is_told_and_stays_cancelled(dsn: str) -> None:
    app = notifyq.App()
    started = anyio.Event()
    told: list[int] = []

    @app.task(name="long", batch_size=10)
    async def long(batch: list[BatchItem[Any]]) -> None:
        started.set()
        with anyio.fail_after(15):
            # ctx.cancelled is a threading.Event (sync handlers read it too): polled here.
            while not any(item.ctx.cancelled.is_set() for item in batch):  # noqa: ASYNC110
                await anyio.sleep(0.01)
        told.extend(item.id for item in batch if item.ctx.cancelled.is_set())
        for item in batch:
            item.succeed()  # the cancelled one's is dropped: its row says cancelled

    insert(dsn, "long", 3)
    victim = query(dsn, "SELECT min(id) FROM notifyq.jobs")[0][0]
    async with serving(app, dsn, concurrency=1, poll_interval=0.2):
        await started.wait()
        query(dsn, "SELECT notifyq.cancel_job(%s)", victim)
        await eventually(lambda: statuses(dsn) == {"succeeded": 2, "cancelled": 1})
    assert told == [victim]


@dataclass
class Email:
    to: str


async def test_typed_payloads_reach_batch_items(dsn: str) -> None:
    app = notifyq.App()
    got: list[Email] = []

    @app.task(name="mail", batch_size=10)
    async def mail(batch: list[BatchItem[Email]]) -> None:
        got.extend(item.payload for item in batch)

    query(
        dsn,
        "INSERT INTO notifyq.jobs (task, payload) VALUES ('mail', %s), ('mail', %s)",
        json.dumps({"to": "a@example.com"}),
        json.dumps({"nope": 1}),
    )
    async with serving(app, dsn, concurrency=1):
        await eventually(lambda: statuses(dsn) == {"succeeded": 1, "dead": 1})
    assert got == [Email("a@example.com")]  # the undecodable one went dead, not in the list
    (error,) = query(dsn, "SELECT last_error FROM notifyq.jobs WHERE status = 'dead'")[0]
    assert error.startswith("PayloadError")


def test_sql_workers_claim_a_batch_of_one_task(dsn: str) -> None:
    query(
        dsn,
        "INSERT INTO notifyq.jobs (queue, task) SELECT CASE WHEN g % 3 = 0 THEN 'other'"
        " ELSE 'default' END, CASE WHEN g % 2 = 0 THEN 'email.send' ELSE 'other.task' END"
        " FROM generate_series(1, 300) AS g",
    )
    batch = query(
        dsn,
        "SELECT id, task FROM notifyq.claim('w', max_jobs => 100, tasks => ARRAY['email.send'])",
    )
    assert len(batch) == 100 and {t for _, t in batch} == {"email.send"}
    rest = query(dsn, "SELECT id FROM notifyq.claim('w2', NULL, 100, tasks => ARRAY['email.send'])")
    assert len(rest) == 50 and not {r[0] for r in rest} & {r[0] for r in batch}
    (running,) = query(dsn, "SELECT count(*) FROM notifyq.jobs WHERE status = 'running'")[0]
    assert running == 150


def test_batch_settings_are_checked_at_registration() -> None:
    app = notifyq.App()
    for bad in ({"batch_size": 0}, {"batch_size": 1001}, {"batch_size": 2, "batch_wait": -1}):
        with pytest.raises(ConfigurationError):
            app.task(name="x", **bad)(lambda batch: None)
    with pytest.raises(ConfigurationError, match="batch_wait needs batch_size"):
        app.task(name="x", batch_wait=1)(lambda payload: None)
    # Called with the list alone: a handler that needs a context too would fail every call.
    with pytest.raises(ConfigurationError, match=r"only argument.*item\.ctx"):
        app.task(name="x", batch_size=10)(lambda batch, ctx: None)
    app.task(name="optional", batch_size=10)(lambda batch, ctx=None: None)
    app.task(name="variadic", batch_size=10)(lambda *args: None)


def test_an_item_is_settled_once() -> None:
    item: BatchItem[int] = BatchItem(1, JobContext(1, "default", "t", 1, 5), threading.Lock())
    item.succeed()
    assert item.settled
    with pytest.raises(OutcomeAlreadySet, match="already settled"):
        item.dead("late")


def test_eager_mode_runs_a_batch_handler_with_a_batch_of_one() -> None:
    from notifyq.testing import eager

    app = notifyq.App(dsn="postgresql://unused")

    @app.task(name="bulk", batch_size=10)
    def bulk(batch: list[BatchItem[dict[str, Any]]]) -> None:
        for item in batch:
            if item.payload.get("bad"):
                item.dead("refused")
            else:
                item.succeed({"seen": item.payload["n"]})

    with eager(app) as jobs:
        app.enqueue_sync("bulk", {"n": 1})
        with pytest.raises(notifyq.DoNotRetry, match="refused"):
            app.enqueue_sync("bulk", {"n": 2, "bad": True})
    assert [j.result for j in jobs.enqueued("bulk")] == [{"seen": 1}, None]


async def test_a_handler_that_empties_its_list_settles_every_item(dsn: str) -> None:
    app = notifyq.App()

    @app.task(name="drain", batch_size=10)
    async def drain(batch: list[BatchItem[Any]]) -> None:
        while batch:  # consumes the list it was given, as a work queue
            item = batch.pop()
            if item.id % 2:
                item.succeed("popped")
        batch.append(BatchItem(None, JobContext(10**9, "default", "drain", 1, 5), threading.Lock()))

    insert(dsn, "drain", 6)
    async with serving(app, dsn, concurrency=1) as worker:
        await eventually(lambda: statuses(dsn) == {"succeeded": 6})
        # The pool still runs (the list it kept is its own), and holds nothing.
        insert(dsn, "drain", 1)
        await eventually(lambda: statuses(dsn) == {"succeeded": 7})
        await eventually(lambda: len(worker.held) == 0)
    rows = query(dsn, "SELECT id, result FROM notifyq.jobs ORDER BY id LIMIT 6")
    assert all(result == ("popped" if job_id % 2 else None) for job_id, result in rows)


def test_eager_mode_keeps_an_item_settled_before_the_handler_raised() -> None:
    """As the worker does: what was settled stands; a result JSON cannot hold is refused."""
    from notifyq.errors import ResultError
    from notifyq.testing import eager

    app = notifyq.App(dsn="postgresql://unused")

    @app.task(name="bulk", batch_size=10)
    async def bulk(batch: list[BatchItem[dict[str, Any]]]) -> None:
        for item in batch:
            item.succeed({"sent": True} if item.payload["ok"] else object())
        raise RuntimeError("the bulk API hung up after sending")

    with eager(app) as jobs:
        app.enqueue_sync("bulk", {"ok": True})
        with pytest.raises(ResultError, match="cannot be stored as JSON"):
            app.enqueue_sync("bulk", {"ok": False})
    assert [j.status for j in jobs.enqueued("bulk")] == ["succeeded", "dead"]
    assert jobs.enqueued("bulk")[0].result == {"sent": True}


async def test_a_running_batch_leaves_the_other_slots_free(dsn: str) -> None:
    """A batch of 10 takes one of two slots: while it runs, the next batch starts in the
    other (counted per job, its 10 attempts would fill both and hold every claim back)."""
    app = notifyq.App()
    release = anyio.Event()
    calls: list[int] = []

    @app.task(name="held", batch_size=10)
    async def held(batch: list[BatchItem[Any]]) -> None:
        calls.append(len(batch))
        if len(calls) == 1:
            await release.wait()

    async with serving(app, dsn, concurrency=2) as worker:
        insert(dsn, "held", 10)
        await eventually(lambda: calls == [10])
        assert worker.held.running == 10 and worker.held.slots == 1
        insert(dsn, "held", 3)
        await eventually(lambda: calls == [10, 3])  # the first is still waiting
        release.set()
        await eventually(lambda: statuses(dsn) == {"succeeded": 13})
