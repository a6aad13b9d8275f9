"""The dispatcher in-process: wake-ups, batches, order, schedules, retries, dead letters,
shutdown."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import anyio
import psycopg
import pytest

import notifyq
from notifyq import (
    Backoff,
    DoNotRetry,
    JobContext,
    LockTimeout,
    PayloadError,
    Settings,
    channels,
    store,
)
from tests.conftest import query, statuses
from tests.helpers import eventually, serving

pytestmark = pytest.mark.anyio


def sql_insert(dsn: str, values: str, columns: str = "task, payload") -> None:
    query(dsn, f"INSERT INTO notifyq.jobs ({columns}) VALUES {values}")


async def test_job_inserted_by_sql_runs_on_notification_without_polling(dsn: str) -> None:
    app = notifyq.App()
    seen: list[tuple[Any, int, str, int]] = []
    done = anyio.Event()

    @app.task(name="hello.greet")
    async def greet(payload: Any, ctx: JobContext) -> None:
        seen.append((payload, ctx.id, ctx.queue, ctx.attempt))
        done.set()

    # A poll interval of an hour: only the notification can start this job.
    async with serving(app, dsn, poll_interval=3600) as worker:
        sql_insert(dsn, """('hello.greet', '{"name": "Ada"}')""")
        with anyio.fail_after(10):
            await done.wait()
    assert worker.notifications >= 1
    assert worker.dispatcher.polls_with_work == 0
    job_id = query(dsn, "SELECT id FROM notifyq.jobs")[0][0]
    assert seen == [({"name": "Ada"}, job_id, "default", 1)]
    row = query(
        dsn,
        "SELECT status, attempts, started_at IS NOT NULL, finished_at IS NOT NULL,"
        " claimed_by, lease_expires_at FROM notifyq.jobs",
    )
    assert row == [("succeeded", 1, True, True, None, None)]


async def test_fallback_poll_finds_jobs_when_not_listening(dsn: str) -> None:
    app = notifyq.App()
    ran = anyio.Event()

    @app.task(name="t")
    async def t(payload: Any) -> None:
        ran.set()

    async with serving(app, dsn, listen=False, poll_interval=0.2) as worker:
        sql_insert(dsn, "('t', '{}')")
        with anyio.fail_after(10):
            await ran.wait()
    assert worker.dispatcher.polls_with_work == 1


async def test_a_job_notified_while_every_slot_is_busy_is_no_lost_notification(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The notification came, the job waited for a slot, and the claim that took it ran after
    a fallback poll fell due: not a lost notification."""
    app = notifyq.App()
    release = anyio.Event()
    started: list[int] = []

    @app.task(name="t")
    async def t(payload: Any) -> None:
        started.append(payload["n"])
        if payload["n"] == 1:
            await release.wait()

    caplog.set_level(logging.INFO, logger="notifyq.dispatcher")
    async with serving(app, dsn, concurrency=1, poll_interval=0.2) as worker:
        sql_insert(dsn, """('t', '{"n": 1}')""")
        await eventually(lambda: started == [1])
        heard = worker.notifications
        sql_insert(dsn, """('t', '{"n": 2}')""")
        await eventually(lambda: worker.notifications > heard)
        await anyio.sleep(0.5)  # more than a poll interval: the slot frees with a poll due
        release.set()
        await eventually(lambda: statuses(dsn) == {"succeeded": 2})
    assert started == [1, 2]
    assert worker.dispatcher.polls_with_work == 0
    assert "fallback poll found" not in caplog.text


async def test_a_really_lost_notification_is_found_by_the_poll_and_counted_once(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = notifyq.App()
    ran = anyio.Event()

    @app.task(name="t")
    async def t(payload: Any) -> None:
        ran.set()

    caplog.set_level(logging.INFO, logger="notifyq.dispatcher")
    async with serving(app, dsn, poll_interval=0.3) as worker:
        # The claim that catches up after LISTEN may still be to come: let it pass first,
        # or it would find the job before the poll does.  It is sent on connecting, the
        # LISTEN connection's poll (upkeep) vouches only after a probe's round trip.
        await eventually(lambda: worker.leases.covered)
        heard = worker.notifications
        with psycopg.connect(dsn, autocommit=True) as conn:
            # Triggers do not fire for a session in replica mode: no notification is sent.
            conn.execute("SET session_replication_role = replica")
            conn.execute("INSERT INTO notifyq.jobs (task) VALUES ('t')")
        with anyio.fail_after(10):
            await ran.wait()
        await eventually(lambda: statuses(dsn) == {"succeeded": 1})
    assert worker.notifications == heard  # found without a wake-up
    # Counted once at most.  Not exactly once: since the upkeep and the appetite barrier
    # came together, the claim that takes the job is sometimes not the one the poll
    # counts (an undercount of the metric, noted in issue 17's closing note).
    assert worker.dispatcher.polls_with_work <= 1
    assert caplog.text.count("fallback poll found 1 jobs") == worker.dispatcher.polls_with_work


async def test_backlog_runs_in_priority_then_run_at_then_id_order(dsn: str) -> None:
    app = notifyq.App()
    order: list[int] = []

    @app.task(name="t")
    async def t(payload: Any) -> None:
        order.append(payload["n"])

    query(
        dsn,
        """
        INSERT INTO notifyq.jobs (task, payload, priority, run_at) VALUES
        ('t', '{"n": 4}', 0, now() - interval '1 minute'),
        ('t', '{"n": 5}', 0, now() - interval '1 minute'),
        ('t', '{"n": 1}', 10, now()),
        ('t', '{"n": 3}', 0, now() - interval '2 minutes'),
        ('t', '{"n": 6}', -5, now() - interval '1 hour'),
        ('t', '{"n": 2}', 10, now())""",
    )
    async with serving(app, dsn, concurrency=1):
        await eventually(lambda: statuses(dsn) == {"succeeded": 6})
    assert order == [1, 2, 3, 4, 5, 6]


async def test_a_claim_takes_its_tasks_in_priority_order_across_tasks_and_queues(
    dsn: str,
) -> None:
    """The claim probes each (queue, task) pair on its own, then merges: priority order
    holds across a queue's tasks, queues take turns, and other tasks are not taken."""
    query(
        dsn,
        """
        INSERT INTO notifyq.jobs (queue, task, priority, payload) VALUES
        ('default', 'a', 5, '"a5"'), ('default', 'b', 3, '"b3"'), ('default', 'a', 1, '"a1"'),
        ('default', 'b', 0, '"b0"'), ('default', 'c', 10, '"c10"'), ('other', 'b', 0, '"ob0"'),
        ('other', 'c', 9, '"oc9"'), ('other', 'a', -1, '"oa-1"')""",
    )
    st = store.Store(dsn, "claim")
    try:

        async def claim(limit: int) -> list[str]:
            got = await st.claim(
                queues=["default", "other"],
                limit=limit,
                claimant="test:1:x",
                lease=30.0,
                tasks=["a", "b"],
            )
            return sorted(job.payload for job in got.jobs)

        # Turns: default's best (a5), other's best (ob0), default's second best (b3).
        assert await claim(3) == ["a5", "b3", "ob0"]
        assert await claim(2) == ["a1", "oa-1"]
        assert await claim(10) == ["b0"]  # never c, whatever its priority
    finally:
        await st.close()
    assert query(dsn, "SELECT task FROM notifyq.jobs WHERE status = 'queued' ORDER BY id") == [
        ("c",),
        ("c",),
    ]


async def test_claims_in_batches_and_never_runs_more_than_concurrency(dsn: str) -> None:
    app = notifyq.App()
    running = 0
    peak = 0

    @app.task(name="t")
    async def t(payload: Any) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.01)
        running -= 1

    query(dsn, "INSERT INTO notifyq.jobs (task) SELECT 't' FROM generate_series(1, 300)")
    async with serving(app, dsn, concurrency=4) as worker:
        await eventually(lambda: statuses(dsn) == {"succeeded": 300})
    assert peak == 4
    assert worker.dispatcher.claimed == 300
    # Batches, not one claim per job (claims also happen on wake-ups and polls).
    assert worker.dispatcher.claims < 300 / 2


async def test_claims_no_more_jobs_than_free_slots(dsn: str) -> None:
    app = notifyq.App()
    release = anyio.Event()

    @app.task(name="hold")
    async def hold(payload: Any) -> None:
        await release.wait()

    async with serving(app, dsn, concurrency=4, poll_interval=0.1):
        query(dsn, "INSERT INTO notifyq.jobs (task) SELECT 'hold' FROM generate_series(1, 10)")
        await eventually(lambda: statuses(dsn) == {"running": 4, "queued": 6})
        await anyio.sleep(0.5)  # several polls while full: still nothing more claimed
        assert statuses(dsn) == {"running": 4, "queued": 6}
        release.set()
        await eventually(lambda: statuses(dsn) == {"succeeded": 10})


async def test_claims_pause_while_outcomes_cannot_be_written(dsn: str) -> None:
    """A completion blocked on a row lock (the job waiting on the finished one, which
    the completion must release, is locked): the dispatcher stops claiming once the
    unwritten outcomes exceed its concurrency, instead of marking the whole backlog
    running."""
    app = notifyq.App()
    c = 5
    first_started = anyio.Event()
    locked = anyio.Event()

    @app.task(name="t")
    async def t(payload: Any, ctx: JobContext) -> None:
        if payload == {"first": True}:
            first_started.set()
            await locked.wait()  # its outcome's write will wait for the test's row lock

    (first,) = query(
        dsn,
        """INSERT INTO notifyq.jobs (task, payload, priority) VALUES ('t', '{"first": true}', 1)
           RETURNING id""",
    )[0]
    query(dsn, "INSERT INTO notifyq.jobs (task, depends_on) VALUES ('t', ARRAY[%s])", first)
    query(dsn, "INSERT INTO notifyq.jobs (task) SELECT 't' FROM generate_series(1, 199)")
    with psycopg.connect(dsn) as blocker:
        async with serving(app, dsn, concurrency=c, poll_interval=3600) as worker:
            with anyio.fail_after(10):
                await first_started.wait()
            blocker.execute("SELECT 1 FROM notifyq.jobs WHERE status = 'waiting' FOR UPDATE")
            locked.set()

            def stalled() -> bool:
                d, pool = worker.dispatcher, worker.pool
                return d.claimed >= 3 * c or (pool.running == 0 and worker.completer.pending > c)

            with anyio.fail_after(20):
                while not stalled():  # noqa: ASYNC110 - counters, not events
                    await anyio.sleep(0.01)
            assert worker.dispatcher.claimed < 3 * c
            running = query(dsn, "SELECT count(*) FROM notifyq.jobs WHERE status = 'running'")
            assert running[0][0] < 3 * c
            blocker.rollback()  # the lock goes: every outcome is written, claiming resumes
            await eventually(lambda: statuses(dsn) == {"succeeded": 201})


@pytest.mark.parametrize("prepare", [True, False], ids=["session", "per-statement"])
async def test_a_statement_waits_for_a_lock_at_most_lock_timeout(dsn: str, prepare: bool) -> None:
    """A direct connection sets lock_timeout for its session; one that prepares nothing
    (--no-listen: a pooler in transaction mode) sets it in each statement's own
    transaction, so nothing stays on a server connection the pooler lends to others.
    Either way a wait gives up with LockTimeout, counted, and the connection is kept."""
    registration = {
        "claimant": "h:1:x",
        "host": "h",
        "pid": 1,
        "queues": ["default"],
        "concurrency": 1,
        "heartbeat": 10.0,
        "liveness_lock": False,
        "tasks": ["t"],
    }
    upkeep = store.Store(dsn, "leases", prepare=prepare, lock_timeout=0.2)
    try:
        await upkeep.register(registration, running=0)
        conn = await upkeep._connection()
        cur = await conn.execute("SHOW lock_timeout")
        assert await cur.fetchone() == (("200ms",) if prepare else ("0",))
        with psycopg.connect(dsn) as blocker:
            blocker.execute("SELECT 1 FROM notifyq.dispatchers FOR UPDATE")
            with anyio.fail_after(10), pytest.raises(LockTimeout) as caught:
                await upkeep.register(registration, running=1)
        assert "register_dispatcher (leases connection)" in str(caught.value)
        assert "lock timeout" in str(caught.value)
        assert upkeep.lock_waits == 1
        await upkeep.register(registration, running=2)
        assert await upkeep._connection() is conn
    finally:
        await upkeep.close()
    assert query(dsn, "SELECT running FROM notifyq.dispatchers") == [(2,)]


async def test_delayed_job_starts_on_time_by_the_precise_timer(dsn: str) -> None:
    app = notifyq.App()
    started = anyio.Event()

    @app.task(name="t")
    async def t(payload: Any) -> None:
        started.set()

    async with serving(app, dsn, poll_interval=3600):
        sql_insert(dsn, "('t', now() + interval '1 second')", columns="task, run_at")
        with anyio.fail_after(10):
            await started.wait()
    late = query(dsn, "SELECT extract(epoch FROM started_at - run_at) FROM notifyq.jobs")[0][0]
    # Never before run_at, and nowhere near the hour-long poll.
    assert 0 <= late < 2.0


async def test_failure_retries_with_backoff_then_dead_with_traceback(dsn: str) -> None:
    app = notifyq.App()
    attempts: list[int] = []

    @app.task(name="flaky", max_attempts=3, backoff=Backoff(base=0.2, factor=2))
    def flaky(payload: Any, ctx: JobContext) -> None:
        attempts.append(ctx.attempt)
        raise RuntimeError(f"boom on attempt {ctx.attempt}")

    async with serving(app, dsn, poll_interval=3600):
        sql_insert(dsn, "('flaky', '{}')")
        await eventually(lambda: statuses(dsn) == {"dead": 1})
    assert attempts == [1, 2, 3]
    status, n, max_attempts, error, finished = query(
        dsn,
        "SELECT status, attempts, max_attempts, last_error, finished_at IS NOT NULL"
        " FROM notifyq.jobs",
    )[0]
    assert (status, n, max_attempts, finished) == ("dead", 3, 3, True)
    assert error.startswith("RuntimeError: boom on attempt 3")
    assert "Traceback (most recent call last)" in error and "in flaky" in error


async def test_sql_max_attempts_overrides_the_task_setting(dsn: str) -> None:
    app = notifyq.App()

    @app.task(name="fails", max_attempts=5, backoff=Backoff(base=0))
    async def fails(payload: Any) -> None:
        raise ValueError("no")

    async with serving(app, dsn, poll_interval=3600):
        sql_insert(dsn, "('fails', 1)", columns="task, max_attempts")
        await eventually(lambda: statuses(dsn) == {"dead": 1})
    assert query(dsn, "SELECT attempts FROM notifyq.jobs") == [(1,)]


async def test_retry_waits_for_the_backoff(dsn: str) -> None:
    app = notifyq.App()
    times: list[float] = []

    @app.task(name="once", max_attempts=2, backoff=Backoff(base=0.6))
    async def once(payload: Any) -> None:
        times.append(time.monotonic())
        if len(times) == 1:
            raise RuntimeError("first attempt fails")

    async with serving(app, dsn, poll_interval=3600):
        sql_insert(dsn, "('once', '{}')")
        await eventually(lambda: statuses(dsn) == {"succeeded": 1})
    # Half-jitter: the delay after attempt 1 is within [0.3, 0.6] seconds (slack for a busy
    # machine above; never below).
    assert 0.3 <= times[1] - times[0] < 5
    assert query(
        dsn, "SELECT attempts, last_error LIKE 'RuntimeError: first%' FROM notifyq.jobs"
    ) == [(2, True)]


async def test_do_not_retry_and_payload_errors_go_dead_at_once(dsn: str) -> None:
    app = notifyq.App()

    @app.task(name="refuse", max_attempts=5)
    async def refuse(payload: Any) -> None:
        raise DoNotRetry("this will never work")

    @app.task(name="typed", max_attempts=5, decode=lambda p: int(p["n"]))
    async def typed(n: int) -> None:
        assert isinstance(n, int)

    async with serving(app, dsn, poll_interval=3600):
        sql_insert(dsn, """('refuse', '{}'), ('typed', '{"n": "x"}'), ('typed', '{"n": "7"}')""")
        await eventually(lambda: statuses(dsn) == {"dead": 2, "succeeded": 1})
    rows = query(
        dsn,
        "SELECT task, attempts, split_part(last_error, E'\\n', 1) FROM notifyq.jobs"
        " WHERE status = 'dead' ORDER BY id",
    )
    assert rows[0] == ("refuse", 1, "DoNotRetry: this will never work")
    assert rows[1][:2] == ("typed", 1)
    assert rows[1][2].startswith("PayloadError: payload of job")
    assert "cannot be decoded for task 'typed'" in rows[1][2]
    assert PayloadError.__mro__[1] is DoNotRetry


async def test_a_task_without_a_handler_is_never_claimed_and_others_keep_flowing(
    dsn: str,
) -> None:
    """A job whose task this app cannot run stays queued for an app that can: it is
    neither claimed nor sent dead (notifyq health, watch and the metrics report it)."""
    app = notifyq.App()

    @app.task(name="known")
    async def known(payload: Any) -> None:
        pass

    async with serving(app, dsn, poll_interval=0.05) as worker:
        sql_insert(dsn, "('no.such.task', '{}'), ('known', '{}'), ('no.such.task', '{}')")
        await eventually(lambda: statuses(dsn) == {"queued": 2, "succeeded": 1})
        # Every poll from now on sees the unknown jobs ready (none of them ours), and takes
        # none.
        seen = worker.figures().polls
        await eventually(lambda: worker.figures().polls >= seen + 3)
    assert query(
        dsn, "SELECT attempts, started_at, last_error FROM notifyq.jobs WHERE task = 'no.such.task'"
    ) == [(0, None, None), (0, None, None)]
    assert statuses(dsn) == {"queued": 2, "succeeded": 1}


async def test_only_served_queues_are_claimed(dsn: str) -> None:
    app = notifyq.App()

    @app.task(name="t", queue="mine")
    async def t(payload: Any) -> None:
        pass

    async with serving(app, dsn, queues=("mine",), poll_interval=3600):
        sql_insert(dsn, "('t', 'other'), ('t', 'mine')", columns="task, queue")
        await eventually(lambda: statuses(dsn) == {"queued": 1, "succeeded": 1})
    assert query(dsn, "SELECT queue FROM notifyq.jobs WHERE status = 'queued'") == [("other",)]


async def test_sync_handlers_run_in_threads_without_blocking_the_loop(dsn: str) -> None:
    app = notifyq.App()
    release = threading.Event()
    async_ran = anyio.Event()

    @app.task(name="blocking")
    def blocking(payload: Any) -> None:
        assert threading.current_thread() is not threading.main_thread()
        release.wait(20)

    @app.task(name="quick")
    async def quick(payload: Any) -> None:
        async_ran.set()

    async with serving(app, dsn, concurrency=2, poll_interval=3600):
        sql_insert(dsn, "('blocking', '{}')")
        await eventually(lambda: statuses(dsn) == {"running": 1})
        sql_insert(dsn, "('quick', '{}')")
        with anyio.fail_after(10):
            await async_ran.wait()
        release.set()
        await eventually(lambda: statuses(dsn) == {"succeeded": 2})


async def test_graceful_shutdown_finishes_within_grace_and_hands_back_the_rest(dsn: str) -> None:
    app = notifyq.App()
    started = 0
    quick_done = anyio.Event()

    @app.task(name="quick")
    async def quick(payload: Any) -> None:
        nonlocal started
        started += 1
        await anyio.sleep(0.2)
        quick_done.set()

    @app.task(name="slow")
    async def slow(payload: Any) -> None:
        nonlocal started
        started += 1
        await anyio.sleep(3600)

    worker = app.worker(Settings(concurrency=2, shutdown_timeout=1.0, poll_interval=3600), dsn=dsn)
    sql_insert(dsn, "('quick', '{}'), ('slow', '{}')")
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await eventually(lambda: started == 2)
        sql_insert(dsn, "('quick', '{}')")  # arrives while both slots are busy
        worker.stop()
    assert quick_done.is_set()
    rows = query(
        dsn, "SELECT task, status, attempts, claimed_by, started_at FROM notifyq.jobs ORDER BY id"
    )
    assert rows == [
        ("quick", "succeeded", 1, None, rows[0][4]),
        # Handed back: ready again, its interrupted attempt not charged.
        ("slow", "queued", 0, None, None),
        # Never claimed after stop().
        ("quick", "queued", 0, None, None),
    ]


async def test_lease_is_renewed_while_a_job_runs(dsn: str) -> None:
    app = notifyq.App()
    release = anyio.Event()

    @app.task(name="long")
    async def long(payload: Any) -> None:
        await release.wait()

    def lease_left() -> float:
        return float(
            query(dsn, "SELECT extract(epoch FROM lease_expires_at - now()) FROM notifyq.jobs")[0][
                0
            ]
            or 0
        )

    async with serving(app, dsn, lease=3, poll_interval=3600):
        sql_insert(dsn, "('long', '{}')")
        await eventually(lambda: statuses(dsn) == {"running": 1})
        first = query(dsn, "SELECT lease_expires_at FROM notifyq.jobs")[0][0]
        # Renewed (heartbeat every lease/3) past the first lease, never expired or rescued.
        await eventually(
            lambda: query(
                dsn,
                "SELECT lease_expires_at > %s + interval '0.5 seconds' FROM notifyq.jobs",
                first,
            )[0][0]
        )
        assert lease_left() > 0
        release.set()
        await eventually(lambda: statuses(dsn) == {"succeeded": 1})
    assert query(dsn, "SELECT attempts FROM notifyq.jobs") == [(1,)]


async def test_expired_lease_is_rescued_counting_the_attempt(dsn: str) -> None:
    app = notifyq.App()
    ran = anyio.Event()

    @app.task(name="t", max_attempts=3)
    async def t(payload: Any, ctx: JobContext) -> None:
        assert ctx.attempt == 2
        ran.set()

    # A job left running by a dispatcher that died: its lease ran out a second ago.
    query(
        dsn,
        "INSERT INTO notifyq.jobs (task, status, attempts, max_attempts, started_at,"
        " claimed_by, lease_expires_at) VALUES ('t', 'running', 1, 3, now(),"
        " 'dead-host:1:x', now() - interval '1 second')",
    )
    async with serving(app, dsn, poll_interval=0.5) as worker:
        with anyio.fail_after(15):
            await ran.wait()
        await eventually(lambda: statuses(dsn) == {"succeeded": 1})
    assert worker.leases.rescued == 1
    error = query(dsn, "SELECT last_error FROM notifyq.jobs")[0][0]
    assert "attempt 1 lost: the lease of dispatcher dead-host:1:x expired" in error


async def test_rescued_job_goes_back_to_its_place_ahead_of_the_backlog(dsn: str) -> None:
    app = notifyq.App()
    order: list[str] = []

    @app.task(name="t")
    def t(payload: dict[str, str]) -> None:
        order.append(payload["name"])
        if payload["name"] == "first":
            # Hold the only slot until the lost job has been rescued behind this backlog.
            deadline = time.monotonic() + 15
            while statuses(dsn).get("running", 0) > 1 and time.monotonic() < deadline:
                time.sleep(0.02)

    # Lost an hour ago (its run_at), lease expired: it must run before the newer backlog.
    query(
        dsn,
        "INSERT INTO notifyq.jobs (task, payload, status, attempts, run_at, started_at,"
        " claimed_by, lease_expires_at) VALUES ('t', '{\"name\": \"lost\"}', 'running', 1,"
        " now() - interval '1 hour', now(), 'gone', now() - interval '1 second')",
    )
    sql_insert(dsn, """('t', '{"name": "first"}')""")
    sql_insert(dsn, """('t', '{"name": "b1"}'), ('t', '{"name": "b2"}')""")
    async with serving(app, dsn, concurrency=1, poll_interval=0.3):
        await eventually(lambda: statuses(dsn) == {"succeeded": 4})
    # The start-up sweep may rescue it before the first claim (then it runs first, its
    # run_at being the oldest); either way it runs ahead of the backlog.
    assert order in (["first", "lost", "b1", "b2"], ["lost", "first", "b1", "b2"])


async def test_rescue_of_a_job_out_of_attempts_sends_it_dead(dsn: str) -> None:
    app = notifyq.App()
    query(
        dsn,
        "INSERT INTO notifyq.jobs (task, status, attempts, max_attempts, started_at,"
        " claimed_by, lease_expires_at) VALUES ('t', 'running', 2, 2, now(), 'gone',"
        " now() - interval '1 second')",
    )
    async with serving(app, dsn, poll_interval=0.3):
        await eventually(lambda: statuses(dsn) == {"dead": 1})
    assert query(dsn, "SELECT attempts, finished_at IS NOT NULL FROM notifyq.jobs") == [(2, True)]


async def test_late_completion_of_a_rescued_attempt_is_fenced(dsn: str) -> None:
    app = notifyq.App()
    release = anyio.Event()
    attempts: list[int] = []

    @app.task(name="t")
    async def t(payload: Any, ctx: JobContext) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            await release.wait()

    async with serving(app, dsn, poll_interval=3600) as worker:
        sql_insert(dsn, "('t', '{}')")
        await eventually(lambda: statuses(dsn) == {"running": 1})
        # Meanwhile its lease expired and another dispatcher rescued it and is running
        # attempt 2 (simulated in SQL): still 'running', so only claimant+attempt fence it.
        query(
            dsn,
            "UPDATE notifyq.jobs SET attempts = 2, claimed_by = 'other:1:x',"
            " lease_expires_at = now() + interval '1 hour'",
        )
        release.set()
        await eventually(lambda: worker.completer.fenced == 1)
    assert query(dsn, "SELECT status, attempts, claimed_by FROM notifyq.jobs") == [
        ("running", 2, "other:1:x")
    ]


async def test_cancelled_queued_job_never_runs(dsn: str) -> None:
    app = notifyq.App()
    ran: list[int] = []

    @app.task(name="t")
    async def t(payload: Any) -> None:
        ran.append(payload["n"])

    sql_insert(dsn, """('t', '{"n": 1}'), ('t', '{"n": 2}')""")
    query(dsn, "UPDATE notifyq.jobs SET status = 'cancelled', finished_at = now() WHERE id = 1")
    async with serving(app, dsn, poll_interval=3600):
        await eventually(lambda: statuses(dsn) == {"cancelled": 1, "succeeded": 1})
    assert ran == [2]


@pytest.mark.parametrize("listen", [True, False], ids=["notified", "polled"])
async def test_cancelling_a_running_job_by_sql_interrupts_its_handler(
    dsn: str, listen: bool
) -> None:
    app = notifyq.App()
    started = anyio.Event()
    interrupted = anyio.Event()

    @app.task(name="slow")
    async def slow(payload: Any) -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            interrupted.set()

    @app.task(name="next")
    async def next_job(payload: Any) -> None:
        pass

    # Listening, only the status notification can be this prompt (the poll is an hour);
    # not listening, the check every poll interval finds it.
    poll = 3600 if listen else 0.2
    async with serving(app, dsn, concurrency=1, poll_interval=poll, listen=listen) as worker:
        sql_insert(dsn, "('slow', '{}')")
        with anyio.fail_after(10):
            await started.wait()
        # A plain UPDATE, as any program may do; claimed_by and the lease stay as they were.
        query(dsn, "UPDATE notifyq.jobs SET status = 'cancelled', finished_at = now()")
        with anyio.fail_after(10):
            await interrupted.wait()
        sql_insert(dsn, "('next', '{}')")  # the slot is free again
        await eventually(lambda: statuses(dsn) == {"cancelled": 1, "succeeded": 1})
    assert query(dsn, "SELECT attempts FROM notifyq.jobs WHERE task = 'slow'") == [(1,)]
    assert worker.completer.decided["cancelled"] == 1
    assert worker.completer.fenced == 0  # nothing was written for the cancelled attempt


async def test_app_cancel_tells_a_sync_handler_through_its_context(dsn: str) -> None:
    app = notifyq.App(dsn=dsn)
    started = threading.Event()
    saw: list[bool] = []

    @app.task(name="slow")
    def slow(payload: Any, ctx: JobContext) -> None:
        started.set()
        saw.append(ctx.cancelled.wait(timeout=30))  # a sync handler cannot be interrupted

    async with serving(app, dsn, poll_interval=3600) as worker:
        job_id = await app.enqueue("slow")
        await app.aclose()
        await anyio.to_thread.run_sync(started.wait, 10)
        assert await app.cancel(job_id) == "running"
        await eventually(lambda: worker.completer.decided["cancelled"] == 1)
    assert saw == [True]
    assert statuses(dsn) == {"cancelled": 1}
    assert worker.completer.fenced == 0
    with pytest.raises(notifyq.OperationRefused, match="already cancelled"):
        app.cancel_sync(job_id)


async def test_sync_wrapper_around_a_coroutine_really_runs_it(dsn: str) -> None:
    app = notifyq.App()
    ran = anyio.Event()

    async def body(payload: Any) -> None:
        ran.set()

    @app.task(name="wrapped")
    def wrapped(payload: Any) -> Any:  # a plain def that returns a coroutine
        return body(payload)

    class Callable_:
        async def __call__(self, payload: Any) -> None:
            pass

    app.task(name="callable")(Callable_())
    assert app.registry.get("callable").is_async  # type: ignore[union-attr]

    async with serving(app, dsn, poll_interval=3600):
        sql_insert(dsn, "('wrapped', '{}'), ('callable', '{}')")
        await eventually(lambda: statuses(dsn) == {"succeeded": 2})
    assert ran.is_set()


async def test_handler_leaking_a_cancellation_fails_the_attempt_not_the_pool(dsn: str) -> None:
    app = notifyq.App()

    @app.task(name="leaky", max_attempts=1)
    async def leaky(payload: Any) -> None:
        import asyncio

        future = asyncio.get_running_loop().create_future()
        future.cancel()
        await future  # raises CancelledError that no scope of ours asked for

    @app.task(name="fine")
    async def fine(payload: Any) -> None:
        pass

    async with serving(app, dsn, concurrency=1, poll_interval=3600, shutdown_timeout=2):
        sql_insert(dsn, "('leaky', '{}')")
        await eventually(lambda: statuses(dsn) == {"dead": 1})
        sql_insert(dsn, "('fine', '{}')")  # the only slot is free again
        await eventually(lambda: statuses(dsn) == {"dead": 1, "succeeded": 1})
    error = query(dsn, "SELECT last_error FROM notifyq.jobs WHERE task = 'leaky'")[0][0]
    assert error.startswith("RuntimeError: the handler raised CancelledError")


async def test_handler_raising_system_exit_fails_only_its_attempt(dsn: str) -> None:
    app = notifyq.App()

    @app.task(name="quits", max_attempts=1)
    def quits(payload: Any) -> None:
        raise SystemExit(3)

    @app.task(name="fine")
    async def fine(payload: Any) -> None:
        pass

    async with serving(app, dsn, poll_interval=3600):
        sql_insert(dsn, "('quits', '{}'), ('fine', '{}')")
        await eventually(lambda: statuses(dsn) == {"dead": 1, "succeeded": 1})
    error = query(dsn, "SELECT last_error FROM notifyq.jobs WHERE task = 'quits'")[0][0]
    assert error.startswith("SystemExit: 3")


async def test_error_text_postgres_cannot_store_is_escaped(dsn: str) -> None:
    app = notifyq.App()

    @app.task(name="nul", max_attempts=1)
    async def nul(payload: Any) -> None:
        raise ValueError("bad \x00 byte and \udcff surrogate")

    async with serving(app, dsn, poll_interval=3600):
        sql_insert(dsn, "('nul', '{}')")
        await eventually(lambda: statuses(dsn) == {"dead": 1})
    error = query(dsn, "SELECT last_error FROM notifyq.jobs")[0][0]
    assert error.startswith("ValueError: bad \\x00 byte and \\udcff surrogate")


async def test_task_timeout_fails_the_attempt(dsn: str) -> None:
    app = notifyq.App()

    @app.task(name="slow", timeout=0.2, max_attempts=1)
    async def slow(payload: Any) -> None:
        await anyio.sleep(3600)

    async with serving(app, dsn, poll_interval=3600):
        sql_insert(dsn, "('slow', '{}')")
        await eventually(lambda: statuses(dsn) == {"dead": 1})
    error = query(dsn, "SELECT last_error FROM notifyq.jobs")[0][0]
    assert error.startswith("TimeoutError: task 'slow' ran past its 0.2s timeout")


async def test_busy_dispatcher_waits_instead_of_spinning(dsn: str) -> None:
    app = notifyq.App()
    release = anyio.Event()

    @app.task(name="hold")
    async def hold(payload: Any) -> None:
        await release.wait()

    async with serving(app, dsn, concurrency=1, poll_interval=0.05) as worker:
        sql_insert(dsn, "('hold', '{}'), ('hold', '{}')")
        await eventually(lambda: statuses(dsn) == {"running": 1, "queued": 1})
        before = worker.dispatcher.passes
        await anyio.sleep(1.0)  # real time is the behaviour: what does a busy second cost?
        passes = worker.dispatcher.passes - before
        release.set()
        await eventually(lambda: statuses(dsn) == {"succeeded": 2})
    assert passes < 5


async def test_jobs_claimed_under_our_name_but_never_received_are_returned(dsn: str) -> None:
    app = notifyq.App()

    @app.task(name="t")
    async def t(payload: Any) -> None:
        pass

    release = anyio.Event()

    @app.task(name="held")
    async def held(payload: Any) -> None:
        await release.wait()

    async with serving(app, dsn, poll_interval=3600) as worker:
        sql_insert(dsn, "('held', '{}')")  # genuinely ours and running: must be spared
        await eventually(lambda: statuses(dsn) == {"running": 1})
        # What a claim whose reply was lost leaves behind: running under our claimant.
        query(
            dsn,
            "INSERT INTO notifyq.jobs (task, status, attempts, started_at, claimed_by,"
            " lease_expires_at) VALUES ('t', 'running', 1, now(), %s, now() + interval '1 hour')",
            worker.claimant,
        )
        worker.dispatcher._orphans_possible = True  # as after a failed claim
        worker.dispatcher.wake()
        await eventually(lambda: statuses(dsn) == {"running": 1, "succeeded": 1})
        assert query(dsn, "SELECT task, attempts FROM notifyq.jobs WHERE status = 'running'") == [
            ("held", 1)
        ]
        release.set()
        await eventually(lambda: statuses(dsn) == {"succeeded": 2})
    assert query(dsn, "SELECT attempts FROM notifyq.jobs ORDER BY id") == [(1,), (1,)]


async def test_outcome_survives_a_broken_completion_connection(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = notifyq.App()
    release = anyio.Event()
    runs = 0

    @app.task(name="quick")
    async def quick(payload: Any) -> None:
        pass

    @app.task(name="t")
    async def t(payload: Any) -> None:
        nonlocal runs
        runs += 1
        await release.wait()

    async with serving(app, dsn, poll_interval=3600):
        sql_insert(dsn, "('quick', '{}')")  # opens the completion connection
        await eventually(lambda: statuses(dsn) == {"succeeded": 1})
        sql_insert(dsn, "('t', '{}'), ('t', '{}')")
        await eventually(lambda: statuses(dsn) == {"succeeded": 1, "running": 2})
        # Cut it: the next write meets a dead socket and must be kept and retried.
        query(
            dsn,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'notifyq:complete' AND datname = current_database()",
        )
        release.set()
        await eventually(lambda: statuses(dsn) == {"succeeded": 3})
    assert "completion write failed" in caplog.text
    # Written after reconnecting: not lost, not re-run through a lease.
    assert runs == 2
    assert query(dsn, "SELECT attempts FROM notifyq.jobs") == [(1,), (1,), (1,)]


async def test_sync_handler_sees_stopping_and_can_finish_within_grace(dsn: str) -> None:
    app = notifyq.App()
    started = threading.Event()

    @app.task(name="polite")
    def polite(payload: Any, ctx: JobContext) -> None:
        started.set()
        assert ctx.stopping.wait(30), "stopping was never set"

    worker = app.worker(Settings(poll_interval=3600, shutdown_timeout=30), dsn=dsn)
    sql_insert(dsn, "('polite', '{}')")
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await anyio.to_thread.run_sync(started.wait, 20)
        began = time.monotonic()
        worker.stop()
    assert time.monotonic() - began < 10  # finished early, not after the 30 s grace
    assert statuses(dsn) == {"succeeded": 1}


async def test_outcome_the_database_rejects_is_left_to_the_rescuer(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = notifyq.App()

    @app.task(name="t", max_attempts=1)
    async def t(payload: Any) -> None:
        pass

    # A rule of the user's that refuses this one success: not an outage, so no retrying.
    query(
        dsn,
        """
        CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.status = 'succeeded' AND NEW.payload ? 'poison' THEN
                RAISE EXCEPTION 'refused by a site rule';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse BEFORE UPDATE ON notifyq.jobs
            FOR EACH ROW EXECUTE FUNCTION refuse();
        """,
    )
    async with serving(app, dsn, lease=2, poll_interval=0.5) as worker:
        sql_insert(dsn, """('t', '{"poison": true}')""")
        # Given up, its lease lapses, and the rescuer ends it (no attempts left).
        await eventually(lambda: statuses(dsn) == {"dead": 1})
        assert not worker.held.attempts()
        sql_insert(dsn, "('t', '{}')")  # the dispatcher is alive and well
        await eventually(lambda: statuses(dsn) == {"dead": 1, "succeeded": 1})
    assert "could not write outcomes of jobs [1]" in caplog.text
    assert "refused by a site rule" in caplog.text


async def test_a_flood_of_forged_notifications_causes_a_bounded_claim_rate(dsn: str) -> None:
    """Any role may NOTIFY notifyq_jobs: thousands of empty hints cost at most the empty-claim
    budget (a burst, then a steady rate), and a real job still starts promptly meanwhile."""
    from notifyq.dispatcher import EMPTY_CLAIM_BURST, EMPTY_CLAIM_RATE

    app = notifyq.App()
    started = anyio.Event()

    @app.task(name="real")
    async def real(payload: Any) -> None:
        started.set()

    stop = threading.Event()
    sent = 0

    def flood() -> None:
        nonlocal sent
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                conn.execute("SELECT pg_notify(%s, 'default')", (channels.JOBS,))
                sent += 1

    async with serving(app, dsn, poll_interval=3600) as worker:
        claims_before, began = worker.dispatcher.claims, time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, flood)
            await anyio.sleep(1.0)  # the flood's length is the behaviour under test
            inserted_at = time.monotonic()
            sql_insert(dsn, "('real', '{}')")
            with anyio.fail_after(5):
                await started.wait()
            latency = time.monotonic() - inserted_at
            await anyio.sleep(1.0)
            stop.set()
        elapsed = time.monotonic() - began
        claims = worker.dispatcher.claims - claims_before
    assert sent > 500 and worker.notifications > 100  # the flood really reached it
    assert claims <= EMPTY_CLAIM_BURST + EMPTY_CLAIM_RATE * elapsed + 5
    assert latency < 1.0  # a claim is late by at most one token's wait, not lost
