"""Idempotent enqueue (dedupe_key), stored results, and App.wait."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import psycopg
import pytest

import notifyq
from notifyq import DoNotRetry, InvalidJob, JobFailed, OperationRefused
from tests.conftest import query, statuses
from tests.helpers import eventually, serving

pytestmark = pytest.mark.anyio


# --- dedupe_key


async def test_same_dedupe_key_while_unfinished_returns_the_existing_job(dsn: str) -> None:
    app = notifyq.App(dsn)
    try:
        first = await app.enqueue("t", {"n": 1}, dedupe_key="report:42")
        again = await app.enqueue("t", {"n": 2}, dedupe_key="report:42")
        other = await app.enqueue("t", {"n": 3}, dedupe_key="report:43")
        assert again == first and other != first
        assert query(dsn, "SELECT payload FROM notifyq.jobs WHERE id = %s", first) == [({"n": 1},)]
        assert statuses(dsn) == {"queued": 2}
        # Finished: the key is free again, and a new job is inserted.
        query(dsn, "UPDATE notifyq.jobs SET status = 'succeeded', finished_at = now()")
        fresh = app.enqueue_sync("t", {"n": 4}, dedupe_key="report:42")
        assert fresh not in (first, other)
        assert app.enqueue_sync("t", {"n": 5}, dedupe_key="report:42") == fresh
    finally:
        await app.aclose()


async def test_a_job_waiting_for_a_retry_still_holds_its_key(dsn: str) -> None:
    app = notifyq.App(dsn)
    try:
        first = await app.enqueue("t", dedupe_key="k")
        query(
            dsn,
            "UPDATE notifyq.jobs SET attempts = 1, last_error = 'boom', run_at = now() + "
            "interval '1 hour' WHERE id = %s",
            first,
        )
        assert await app.enqueue("t", dedupe_key="k") == first
    finally:
        await app.aclose()


def test_plain_sql_on_conflict_do_nothing_is_a_no_op(dsn: str) -> None:
    insert = (
        "INSERT INTO notifyq.jobs (task, payload, dedupe_key) VALUES ('t', %s, 'nightly') "
        "ON CONFLICT DO NOTHING RETURNING id"
    )
    first = query(dsn, insert, '{"n": 1}')
    assert len(first) == 1
    assert query(dsn, insert, '{"n": 2}') == []
    with pytest.raises(psycopg.errors.UniqueViolation):
        query(dsn, "INSERT INTO notifyq.jobs (task, dedupe_key) VALUES ('t', 'nightly')")
    assert statuses(dsn) == {"queued": 1}


def test_concurrent_enqueues_with_one_key_make_one_job(dsn: str) -> None:
    app = notifyq.App(dsn)
    ids: list[int] = []
    barrier = threading.Barrier(8)

    def enqueue() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            barrier.wait()
            ids.append(app.enqueue_sync("t", dedupe_key="once", conn=conn))

    threads = [threading.Thread(target=enqueue) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ids) == 8 and len(set(ids)) == 1
    assert statuses(dsn) == {"queued": 1}


def test_enqueue_in_an_open_transaction_sees_the_key_it_holds(dsn: str) -> None:
    app = notifyq.App(dsn)
    with psycopg.connect(dsn) as conn:
        first = app.enqueue_sync("t", dedupe_key="tx", conn=conn)
        assert app.enqueue_sync("t", dedupe_key="tx", conn=conn) == first
        conn.rollback()
    assert statuses(dsn) == {}


@pytest.mark.parametrize("key", ["", "x" * 256, 42])
def test_bad_dedupe_keys_are_refused_before_sending(dsn: str, key: Any) -> None:
    app = notifyq.App(dsn)
    with pytest.raises(InvalidJob, match="dedupe_key must be a string of 1 to 255"):
        app.enqueue_sync("t", dedupe_key=key)
    app.close()


# --- results and wait


async def test_wait_returns_the_result_the_handler_returned(dsn: str) -> None:
    app = notifyq.App(dsn)

    @app.task(name="add")
    async def add(payload: Any) -> dict[str, int]:
        return {"sum": payload["a"] + payload["b"]}

    @app.task(name="nothing")
    def nothing(payload: Any) -> None:
        return None

    try:
        async with serving(app, dsn, concurrency=2):
            job = await app.enqueue(add, {"a": 2, "b": 3})
            assert await app.wait(job, timeout=20) == {"sum": 5}
            empty = await app.enqueue(nothing)
            assert await app.wait(empty, timeout=20) is None
        rows = query(dsn, "SELECT id, result FROM notifyq.jobs ORDER BY id")
        assert rows == [(job, {"sum": 5}), (empty, None)]
        # Already finished: answered from the row at once.
        assert await app.wait(job, timeout=5) == {"sum": 5}
    finally:
        await app.aclose()


async def test_wait_is_woken_by_the_status_notification_not_a_poll(dsn: str) -> None:
    """Many waits on one loop share one LISTEN connection; each wakes when its job finishes
    by a plain SQL update, which no poll of ours could have seen sooner than its timeout."""
    app = notifyq.App(dsn)
    ids = [await app.enqueue("t", {"n": n}) for n in range(5)]
    got: dict[int, Any] = {}

    async def wait(job_id: int) -> None:
        got[job_id] = await app.wait(job_id, timeout=20)

    try:
        async with anyio.create_task_group() as tg:
            for job_id in ids:
                tg.start_soon(wait, job_id)
            await eventually(lambda: len(listeners(dsn)) == 1)
            for job_id in ids:
                query(
                    dsn,
                    "UPDATE notifyq.jobs SET status = 'succeeded', finished_at = now(), "
                    "result = jsonb_build_object('id', id) WHERE id = %s",
                    job_id,
                )
        assert got == {job_id: {"id": job_id} for job_id in ids}
        assert len(listeners(dsn)) == 1  # kept for the next wait
    finally:
        await app.aclose()
    assert listeners(dsn) == []


def listeners(dsn: str) -> list[tuple[Any, ...]]:
    return query(
        dsn,
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'notifyq:listen'",
    )


async def test_wait_raises_job_failed_for_dead_and_cancelled_jobs(dsn: str) -> None:
    app = notifyq.App(dsn)

    @app.task(name="fail", max_attempts=1)
    async def fail(payload: Any) -> None:
        raise DoNotRetry("the input is wrong")

    try:
        async with serving(app, dsn):
            job = await app.enqueue(fail)
            with pytest.raises(JobFailed, match="is dead: DoNotRetry: the input is wrong") as info:
                await app.wait(job, timeout=20)
            assert info.value.status == "dead" and info.value.job_id == job
        queued = await app.enqueue("t", queue="nobody")
        await app.cancel(queued)
        with pytest.raises(JobFailed, match="is cancelled"):
            await app.wait(queued, timeout=5)
        with pytest.raises(OperationRefused, match="no job with id 999999"):
            await app.wait(999999, timeout=5)
    finally:
        await app.aclose()


async def test_wait_times_out_without_touching_the_job(dsn: str) -> None:
    app = notifyq.App(dsn)
    try:
        job = await app.enqueue("t", queue="nobody")
        with pytest.raises(TimeoutError, match=f"job {job} did not finish within 0.3s"):
            await app.wait(job, timeout=0.3)
        assert statuses(dsn) == {"queued": 1}
        with pytest.raises(ValueError, match="timeout must be None or at least 0"):
            await app.wait(job, timeout=-1)
    finally:
        await app.aclose()


def test_wait_sync_from_plain_code(dsn: str) -> None:
    app = notifyq.App(dsn)
    job = app.enqueue_sync("t")
    finisher = threading.Timer(
        0.2,
        lambda: query(
            dsn,
            "UPDATE notifyq.jobs SET status = 'succeeded', result = '[1, 2]' WHERE id = %s",
            job,
        ),
    )
    finisher.start()
    try:
        assert app.wait_sync(job, timeout=20) == [1, 2]
    finally:
        finisher.join()
        app.close()


async def test_unstorable_result_sends_the_job_dead_naming_why(dsn: str) -> None:
    app = notifyq.App(dsn)

    @app.task(name="odd")
    async def odd(payload: Any) -> Any:
        return {"when": object()} if payload["kind"] == "object" else "x" * (1024 * 1024 + 1)

    try:
        async with serving(app, dsn):
            bad = await app.enqueue(odd, {"kind": "object"})
            big = await app.enqueue(odd, {"kind": "big"})
            with pytest.raises(JobFailed, match="cannot be stored as JSON"):
                await app.wait(bad, timeout=20)
            with pytest.raises(JobFailed, match="results are limited to 1048576 bytes"):
                await app.wait(big, timeout=20)
        # Dead at the first attempt: retrying would return the same.
        assert query(dsn, "SELECT DISTINCT attempts, status FROM notifyq.jobs") == [(1, "dead")]
    finally:
        await app.aclose()


async def test_nan_or_infinity_in_a_result_is_refused_not_stored_as_null(dsn: str) -> None:
    app = notifyq.App(dsn)

    @app.task(name="ratio")
    async def ratio(payload: Any) -> Any:
        if payload["kind"] == "nan":
            return float("nan")
        return {"stats": {"rates": [0.5, float("inf")]}}

    @app.task(name="sync_ratio")
    def sync_ratio(payload: Any) -> Any:
        return {"ratio": -float("inf")}

    try:
        async with serving(app, dsn):
            nan = await app.enqueue(ratio, {"kind": "nan"})
            nested = await app.enqueue(ratio, {"kind": "nested"})
            sync = await app.enqueue(sync_ratio)
            for job in (nan, nested, sync):
                with pytest.raises(JobFailed, match="ResultError"):
                    await app.wait(job, timeout=20)
        rows = query(dsn, "SELECT id, status, attempts, result, last_error FROM notifyq.jobs")
        errors = {job_id: error for job_id, status, attempts, result, error in rows}
        assert {(status, attempts, result) for _, status, attempts, result, _ in rows} == {
            ("dead", 1, None)
        }
        for error in errors.values():
            assert error.startswith("ResultError: ")
            assert "JSON has no NaN or Infinity" in error
            assert "use None, a string or a finite number" in error
        assert "the value itself is nan" in errors[nan]
        assert "['stats']['rates'][1] is inf" in errors[nested]
        assert "['ratio'] is -inf" in errors[sync]
    finally:
        await app.aclose()
