"""Keys beyond unfinished jobs: unique_for windows and on_duplicate='replace' (debounce),
from Python and plain SQL, under many concurrent producers and two dispatchers."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import anyio
import psycopg
import pytest

import notifyq
from notifyq import InvalidJob, JobContext
from tests.conftest import query, statuses
from tests.helpers import eventually, serving

pytestmark = pytest.mark.anyio

PRODUCERS = 24


@pytest.fixture
def app(dsn: str) -> Iterator[notifyq.App]:
    """An app for the sync tests, its connections closed after."""
    made = notifyq.App(dsn)
    yield made
    made.close()


def together(count: int, work: Callable[[psycopg.Connection[Any], int], None], dsn: str) -> None:
    """`work(conn, n)` in `count` threads at once, each on a connection of its own."""
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                barrier.wait()
                work(conn, n)
        except BaseException as exc:  # reported by the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def end_windows(dsn: str) -> None:
    """Every unique_for window ends now (the windows' clock moves, not the jobs')."""
    query(dsn, "UPDATE notifyq.unique_windows SET expires_at = now() - interval '1 second'")


def payload_of(dsn: str, job_id: int) -> Any:
    return query(dsn, "SELECT payload FROM notifyq.jobs WHERE id = %s", job_id)[0][0]


# --- unique_for


async def test_unique_for_holds_the_key_after_the_job_finished(dsn: str) -> None:
    app = notifyq.App(dsn)
    try:
        first = await app.enqueue("t", {"n": 1}, dedupe_key="k", unique_for=timedelta(hours=1))
        assert first.token is not None
        query(dsn, "UPDATE notifyq.jobs SET status = 'succeeded', finished_at = now()")
        again = await app.enqueue("t", {"n": 2}, dedupe_key="k", unique_for=3600)
        assert again == first and again.token is None  # refused, as a dedupe is
        assert statuses(dsn) == {"succeeded": 1}
        # Without unique_for the key is free once its job finished: dedupe_key's own rule.
        plain = await app.enqueue("t", {"n": 3}, dedupe_key="k")
        assert plain != first
        query(dsn, "UPDATE notifyq.jobs SET status = 'succeeded', finished_at = now()")
        end_windows(dsn)
        fresh = app.enqueue_sync("t", {"n": 4}, dedupe_key="k", unique_for=60.0)
        assert fresh not in (first, plain) and fresh.token is not None
        assert query(dsn, "SELECT job_id FROM notifyq.unique_windows") == [(fresh,)]
    finally:
        await app.aclose()


def test_a_refused_insert_opens_no_window(dsn: str, app: notifyq.App) -> None:
    """The window ended but its job is still queued: the key is held (dedupe_key), and the
    refused INSERT neither inserts a job nor takes the window over."""
    first = app.enqueue_sync("t", dedupe_key="k", unique_for=60, delay=3600)
    end_windows(dsn)
    assert app.enqueue_sync("t", dedupe_key="k", unique_for=60) == first
    assert query(dsn, "SELECT job_id, expires_at < now() FROM notifyq.unique_windows") == [
        (first, True)
    ]
    assert statuses(dsn) == {"queued": 1}


def test_plain_sql_unique_for_inserts_nothing_while_the_window_lasts(dsn: str) -> None:
    insert = (
        "INSERT INTO notifyq.jobs (task, payload, dedupe_key, unique_for)"
        " VALUES ('t', %s, 'nightly', interval '1 hour') {} RETURNING id"
    )
    (first,) = query(dsn, insert.format(""), '{"n": 1}')
    query(dsn, "UPDATE notifyq.jobs SET status = 'succeeded', finished_at = now()")
    # Refused silently, with or without ON CONFLICT: no row back, no error.
    assert query(dsn, insert.format(""), '{"n": 2}') == []
    assert query(dsn, insert.format("ON CONFLICT DO NOTHING"), '{"n": 3}') == []
    assert query(dsn, "SELECT job_id FROM notifyq.unique_windows") == [first]
    assert statuses(dsn) == {"succeeded": 1}


def test_a_bad_row_meets_its_check_while_a_window_lasts(dsn: str) -> None:
    """A row the CHECKs refuse fails with the constraint's name, never dropped silently
    by the key's open window."""
    insert = (
        "INSERT INTO notifyq.jobs (task, dedupe_key, unique_for, on_duplicate)"
        " VALUES ('t', 'k', %s, %s)"
    )
    query(dsn, insert, "1 hour", None)
    for window, policy, constraint in [
        ("11 years", None, "jobs_unique_for_valid"),
        ("1 hour", "merge", "jobs_on_duplicate_valid"),
    ]:
        with pytest.raises(psycopg.errors.CheckViolation, match=constraint):
            query(dsn, insert, window, policy)
    assert statuses(dsn) == {"queued": 1}


def test_bad_unique_for_and_on_duplicate_are_refused(dsn: str, app: notifyq.App) -> None:
    for options, message in [
        ({"unique_for": 60}, "unique_for needs a dedupe_key"),
        ({"dedupe_key": "k", "unique_for": 0}, "more than 0"),
        ({"dedupe_key": "k", "unique_for": float("nan")}, "more than 0"),
        ({"dedupe_key": "k", "unique_for": "1h"}, "timedelta or seconds"),
        ({"on_duplicate": "replace"}, "on_duplicate needs a dedupe_key"),
        ({"dedupe_key": "k", "on_duplicate": "merge"}, "'refuse' or 'replace'"),
        ({"dedupe_key": "k", "on_duplicate": "replace", "unique_for": 5}, "cannot be combined"),
    ]:
        with pytest.raises(InvalidJob, match=message):
            app.enqueue_sync("t", **options)
    for columns in [
        "unique_for) VALUES ('t', interval '1 hour'",
        "dedupe_key, unique_for) VALUES ('t', 'k', interval '-1 hour'",
        "on_duplicate) VALUES ('t', 'replace'",
        "dedupe_key, on_duplicate) VALUES ('t', 'k', 'merge'",
        "dedupe_key, unique_for, on_duplicate) VALUES ('t', 'k', interval '1 s', 'replace'",
    ]:
        with pytest.raises(psycopg.errors.CheckViolation):
            query(dsn, f"INSERT INTO notifyq.jobs (task, {columns})")
    assert statuses(dsn) == {}


def test_many_producers_insert_one_job_per_window(dsn: str, app: notifyq.App) -> None:
    """24 producers at once, Python and plain SQL alike, round after round: exactly one job
    per window, whether the window's job is still queued or finished."""
    sql_insert = (
        "INSERT INTO notifyq.jobs (task, dedupe_key, unique_for) VALUES ('t', 'w', %s) RETURNING id"
    )
    ids: list[int] = []
    for round_ in range(3):
        ids.clear()

        def produce(conn: psycopg.Connection[Any], n: int) -> None:
            if n % 2:
                ids.append(app.enqueue_sync("t", dedupe_key="w", unique_for=3600, conn=conn))
            else:
                ids.extend(r[0] for r in conn.execute(sql_insert, (timedelta(hours=1),)))

        together(PRODUCERS, produce, dsn)
        python_ids = set(ids)
        assert len(python_ids) == 1, ids  # every Python producer names the one job
        assert statuses(dsn).get("queued") == 1, round_
        (window,) = query(dsn, "SELECT job_id FROM notifyq.unique_windows")
        assert python_ids == {window[0]}
        query(dsn, "UPDATE notifyq.jobs SET status = 'succeeded', finished_at = now()")
        end_windows(dsn)
    assert statuses(dsn) == {"succeeded": 3}


async def test_two_dispatchers_run_one_job_per_window_while_producers_race(dsn: str) -> None:
    """Jobs finish while 24 producers keep enqueueing the key: one job in all."""
    app = notifyq.App(dsn)
    ran: list[int] = []

    @app.task(name="once")
    async def once(payload: Any, ctx: JobContext) -> None:
        ran.append(ctx.id)

    def produce(conn: psycopg.Connection[Any], n: int) -> None:
        for _ in range(10):
            app.enqueue_sync("once", {"n": n}, dedupe_key="hourly", unique_for=3600, conn=conn)

    try:
        async with serving(app, dsn, concurrency=4), serving(app, dsn, concurrency=4):
            await anyio.to_thread.run_sync(together, PRODUCERS, produce, dsn)
            await eventually(lambda: statuses(dsn) == {"succeeded": 1})
        assert len(ran) == 1
    finally:
        await app.aclose()


async def test_a_row_dropped_by_on_conflict_opens_no_window(dsn: str) -> None:
    """A producer not using unique_for holds the key with a job not committed yet, which
    the trigger cannot see: the unique_for row waits for it at jobs_dedupe_idx and ON
    CONFLICT drops it.  It opens no window: one naming a job that never existed would
    refuse the key's jobs for the window's length after the holder finished."""
    app = notifyq.App(dsn)
    try:
        with psycopg.connect(dsn) as plain:  # a transaction of its own, left open
            row = plain.execute(
                "INSERT INTO notifyq.jobs (task, dedupe_key) VALUES ('t', 'k') RETURNING id"
            ).fetchone()
            assert row is not None
            held = row[0]
            async with anyio.create_task_group() as tg:
                got: list[int] = []

                async def produce() -> None:
                    got.append(await app.enqueue("t", dedupe_key="k", unique_for=3600))

                tg.start_soon(produce)
                await eventually(
                    lambda: (
                        query(
                            dsn,
                            "SELECT count(*) FROM pg_stat_activity"
                            " WHERE wait_event = 'transactionid' AND datname = current_database()",
                        )
                        == [(1,)]
                    )
                )
                plain.commit()
        assert got == [held]
        assert query(dsn, "SELECT count(*) FROM notifyq.unique_windows") == [(0,)]
        # So the key is free once its job finished.
        query(dsn, "UPDATE notifyq.jobs SET status = 'succeeded', finished_at = now()")
        fresh = await app.enqueue("t", dedupe_key="k", unique_for=3600)
        assert fresh != held and fresh.token is not None
    finally:
        await app.aclose()


def test_retention_deletes_the_windows_that_ended(dsn: str, app: notifyq.App) -> None:
    for key in ("a", "b", "c"):
        app.enqueue_sync("t", dedupe_key=key, unique_for=3600)
    query(
        dsn,
        "UPDATE notifyq.unique_windows SET expires_at = now() - interval '1 s'"
        " WHERE dedupe_key <> 'c'",
    )
    assert query(dsn, "SELECT notifyq.expire_unique_windows(1)") == [(1,)]
    assert query(dsn, "SELECT notifyq.expire_unique_windows(10)") == [(1,)]
    assert query(dsn, "SELECT dedupe_key FROM notifyq.unique_windows") == [("c",)]


async def test_a_serving_dispatchers_retention_expires_windows(dsn: str) -> None:
    app = notifyq.App(dsn)
    await app.enqueue("t", dedupe_key="gone", unique_for=1)
    end_windows(dsn)
    async with serving(app, dsn, retention_interval=0.05) as worker:
        await eventually(lambda: worker.retention.windows_expired == 1)
    assert query(dsn, "SELECT count(*) FROM notifyq.unique_windows") == [(0,)]
    await app.aclose()


# --- on_duplicate = 'replace' (debounce)


async def test_replace_gives_the_queued_job_the_new_payload_and_run_at(dsn: str) -> None:
    app = notifyq.App(dsn)
    try:
        first = await app.enqueue(
            "t", {"v": 1}, dedupe_key="doc:5", delay=3600, priority=7, on_duplicate="replace"
        )
        again = await app.enqueue(
            "t", {"v": 2}, dedupe_key="doc:5", delay=10, priority=1, on_duplicate="replace"
        )
        assert again == first and again.token is None
        row = query(
            dsn,
            "SELECT payload, priority, run_at < now() + interval '1 minute', token = %s"
            " FROM notifyq.jobs",
            first.token,
        )
        # The new payload and run_at; the first enqueue's priority and token.
        assert row == [({"v": 2}, 7, True, True)]
        # 'refuse' is the dedupe_key's own rule.
        assert app.enqueue_sync("t", {"v": 3}, dedupe_key="doc:5", on_duplicate="refuse") == first
        assert payload_of(dsn, first) == {"v": 2}
    finally:
        await app.aclose()


def test_replace_never_runs_a_retry_or_a_rate_slot_sooner(dsn: str, app: notifyq.App) -> None:
    first = app.enqueue_sync("t", {"v": 1}, dedupe_key="k", on_duplicate="replace")
    query(
        dsn,
        "UPDATE notifyq.jobs SET attempts = 1, checkpoint = '{\"row\": 9}',"
        " run_at = now() + interval '1 hour'",
    )
    assert app.enqueue_sync("t", {"v": 2}, dedupe_key="k", on_duplicate="replace") == first
    assert query(
        dsn, "SELECT payload, checkpoint, run_at > now() + interval '59 minutes' FROM notifyq.jobs"
    ) == [({"v": 2}, None, True)]


def test_replace_past_a_rate_slot_gives_the_slot_up(dsn: str, app: notifyq.App) -> None:
    """A job the rate limit deferred holds its slot (rate_reserved: it starts then without
    the rate check).  Replaced with a run_at within the slot, it keeps it; moved past the
    slot, it is checked again when due instead of starting at a time never granted."""
    query(
        dsn, "INSERT INTO notifyq.rate_limits (rate_key, per_second, burst) VALUES ('api', 0.01, 1)"
    )
    app.enqueue_sync("t", rate_key="api")
    held = app.enqueue_sync("t", {"v": 1}, dedupe_key="k", rate_key="api", on_duplicate="replace")
    # The first job takes the budget; the second gets a slot 100 s later.
    query(dsn, "SELECT * FROM notifyq.claim_jobs('w', '{default}', '{t}', 10, '1 minute')")
    slot = query(dsn, "SELECT run_at, rate_reserved FROM notifyq.jobs WHERE id = %s", held)
    assert slot[0][1] is True
    assert app.enqueue_sync("t", {"v": 2}, dedupe_key="k", on_duplicate="replace") == held
    assert query(dsn, "SELECT run_at, rate_reserved FROM notifyq.jobs WHERE id = %s", held) == slot
    assert (
        app.enqueue_sync("t", {"v": 3}, dedupe_key="k", delay=3600, on_duplicate="replace") == held
    )
    assert query(
        dsn,
        "SELECT payload, rate_reserved, run_at > now() + interval '59 minutes'"
        " FROM notifyq.jobs WHERE id = %s",
        held,
    ) == [({"v": 3}, False, True)]


def test_replace_while_the_holder_runs_enqueues_a_new_job(dsn: str, app: notifyq.App) -> None:
    first = app.enqueue_sync("t", {"v": 1}, dedupe_key="k", on_duplicate="replace")
    query(
        dsn,
        "UPDATE notifyq.jobs SET status = 'running', attempts = 1, started_at = now(),"
        " claimed_by = 'c', lease_expires_at = now() + interval '1 minute'",
    )
    second = app.enqueue_sync("t", {"v": 2}, dedupe_key="k", on_duplicate="replace")
    assert second != first and second.token is not None
    assert query(dsn, "SELECT id, status, dedupe_key FROM notifyq.jobs ORDER BY id") == [
        (first, "running", None),
        (second, "queued", "k"),
    ]


def test_replace_never_changes_a_job_enqueued_without_it(dsn: str, app: notifyq.App) -> None:
    """A producer asking to replace meets a job whose producer chose the key's own rule: the
    key refuses the row, as any duplicate; the job keeps its payload, run_at and key,
    queued or running."""
    first = app.enqueue_sync("t", {"v": 1}, dedupe_key="k", delay=3600)
    before = query(dsn, "SELECT payload, run_at, dedupe_key FROM notifyq.jobs")
    again = app.enqueue_sync("t", {"v": 2}, dedupe_key="k", on_duplicate="replace")
    assert again == first and again.token is None
    assert query(dsn, "SELECT payload, run_at, dedupe_key FROM notifyq.jobs") == before
    with pytest.raises(psycopg.errors.UniqueViolation):
        query(
            dsn,
            "INSERT INTO notifyq.jobs (task, payload, dedupe_key, on_duplicate)"
            " VALUES ('t', '{\"v\": 3}', 'k', 'replace')",
        )
    query(
        dsn,
        "UPDATE notifyq.jobs SET status = 'running', attempts = 1, started_at = now(),"
        " claimed_by = 'c', lease_expires_at = now() + interval '1 minute'",
    )
    assert app.enqueue_sync("t", {"v": 4}, dedupe_key="k", on_duplicate="replace") == first
    assert query(dsn, "SELECT id, payload, dedupe_key FROM notifyq.jobs") == [
        (first, {"v": 1}, "k")
    ]


def test_plain_sql_replace_and_another_tasks_key(dsn: str, app: notifyq.App) -> None:
    insert = (
        "INSERT INTO notifyq.jobs (task, payload, dedupe_key, run_at, on_duplicate)"
        " VALUES (%s, %s, 'doc:7', now() + interval '10 seconds', 'replace') RETURNING id"
    )
    (first,) = query(dsn, insert, "reindex", '{"v": 1}')
    assert query(dsn, insert, "reindex", '{"v": 2}') == []  # replaced: no new row
    assert payload_of(dsn, first[0]) == {"v": 2}
    with pytest.raises(psycopg.errors.CheckViolation, match="held by job"):
        query(dsn, insert, "other", '{"v": 3}')
    with pytest.raises(InvalidJob, match="held by job"):
        app.enqueue_sync("other", dedupe_key="doc:7", on_duplicate="replace")


def test_many_producers_replacing_leave_one_job_with_the_last_payload(
    dsn: str, app: notifyq.App
) -> None:
    """24 producers replace one key at once, each in a transaction of its own: one queued
    job, holding the payload of the producer that committed last."""
    order: list[int] = []
    lock = threading.Lock()

    def produce(conn: psycopg.Connection[Any], n: int) -> None:
        with conn.transaction():
            app.enqueue_sync("t", {"n": n}, dedupe_key="d", on_duplicate="replace", conn=conn)
            # Still holding the key's lock: producers get here one at a time, in the order
            # they commit.
            with lock:
                order.append(n)

    together(PRODUCERS, produce, dsn)
    assert sorted(order) == list(range(PRODUCERS))
    rows = query(dsn, "SELECT payload, status FROM notifyq.jobs")
    assert rows == [({"n": order[-1]}, "queued")]


async def test_two_dispatchers_always_run_the_last_payload(dsn: str) -> None:
    """While two dispatchers run the key's jobs, 24 producers replace it: whatever ran in
    between, the last payload written runs after it was written."""
    app = notifyq.App(dsn)
    seen: list[int] = []

    @app.task(name="debounced")
    async def debounced(payload: Any) -> None:
        seen.append(payload["n"])

    order: list[int] = []
    lock = threading.Lock()

    def produce(conn: psycopg.Connection[Any], n: int) -> None:
        for i in range(5):
            value = n * 100 + i
            with conn.transaction():
                app.enqueue_sync(
                    "debounced", {"n": value}, dedupe_key="d", on_duplicate="replace", conn=conn
                )
                with lock:
                    order.append(value)

    try:
        async with serving(app, dsn, concurrency=4), serving(app, dsn, concurrency=4):
            await anyio.to_thread.run_sync(together, PRODUCERS, produce, dsn)
            await eventually(lambda: set(statuses(dsn)) == {"succeeded"})
        assert order[-1] in seen, (seen[-5:], order[-5:])
        assert len(order) == PRODUCERS * 5
    finally:
        await app.aclose()


def test_jobs_without_the_columns_never_call_the_trigger(dsn: str) -> None:
    """The trigger's WHEN keeps every other INSERT, dedupe_key included, from calling it."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET track_functions = 'pl'")
        conn.execute("INSERT INTO notifyq.jobs (task) SELECT 't' FROM generate_series(1, 10)")
        conn.execute("INSERT INTO notifyq.jobs (task, dedupe_key) VALUES ('t', 'k')")
        conn.execute("SELECT pg_stat_force_next_flush()")
        calls = conn.execute(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions"
            " WHERE funcname IN ('dedupe_on_insert', 'open_unique_window')"
        ).fetchone()
        assert calls == (0,)
        conn.execute(
            "INSERT INTO notifyq.jobs (task, dedupe_key, unique_for) VALUES ('t', 'u', '1 h')"
        )
        conn.execute("SELECT pg_stat_force_next_flush()")
        calls = conn.execute(
            "SELECT sum(calls) FROM pg_stat_user_functions"
            " WHERE funcname IN ('dedupe_on_insert', 'open_unique_window')"
        ).fetchone()
        assert calls == (2,)  # the check before, the window after
