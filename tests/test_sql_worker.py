"""The SQL worker protocol: notifyq.claim, heartbeat, complete, fail, progress,
hold_session, hand_back and stop_worker, as a worker in any language calls them."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import anyio
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

import notifyq
from notifyq import Backoff, Settings, channels
from tests.conftest import query, wait_until
from tests.helpers import listen_on
from tests.test_security import Roles, roles  # noqa: F401 - the fixture

CLAIM = "SELECT id, queue, task, payload, attempt, max_attempts FROM notifyq.claim(%s, {})"


def claim(dsn: str, worker: str, args: str = "", *params: Any) -> list[tuple[Any, ...]]:
    return query(dsn, CLAIM.format(args or "NULL"), worker, *params)


def insert(dsn: str, values: str, columns: str = "task") -> list[int]:
    return [
        r[0]
        for r in query(dsn, f"INSERT INTO notifyq.jobs ({columns}) VALUES {values} RETURNING id")
    ]


def job(dsn: str, job_id: int, columns: str = "status, attempts") -> tuple[Any, ...]:
    return query(dsn, f"SELECT {columns} FROM notifyq.jobs WHERE id = %s", job_id)[0]


def test_claim_order_and_what_is_never_claimed(dsn: str) -> None:
    low, high, late = insert(
        dsn, "('a', -1, now()), ('a', 5, now()), ('a', 5, now())", "task, priority, run_at"
    )
    future = insert(dsn, "('a', now() + interval '1 hour')", "task, run_at")[0]
    waiting = insert(dsn, f"('a', '{{{future}}}')", "task, depends_on")[0]
    assert job(dsn, waiting, "status") == ("waiting",)
    got = claim(dsn, "w1", "NULL, 10")
    assert [r[0] for r in got] == [high, late, low]
    assert all(r[4] == 1 and r[5] == 5 for r in got)  # first attempt; the default max_attempts
    assert claim(dsn, "w2", "NULL, 10") == []


def test_claim_restricted_to_queues_and_tasks(dsn: str) -> None:
    a, b, c = insert(dsn, "('q1', 'a'), ('q1', 'b'), ('q2', 'a')", "queue, task")
    assert [r[0] for r in claim(dsn, "w", "ARRAY['q2'], 10")] == [c]
    assert [r[0] for r in claim(dsn, "w", "NULL, 10, tasks => ARRAY['b']")] == [b]
    assert [r[0] for r in claim(dsn, "w", "ARRAY['q1', 'q3'], 10, tasks => ARRAY['a']")] == [a]


def test_claim_takes_max_attempts_and_timeout_from_the_task_settings(dsn: str) -> None:
    query(
        dsn,
        "INSERT INTO notifyq.tasks (task, max_attempts, timeout) VALUES ('t', 9, '2 minutes')",
    )
    own, setting = insert(dsn, "('t', 2), ('t', NULL)", "task, max_attempts")
    rows = query(
        dsn,
        "SELECT id, max_attempts, timeout, lease_expires_at - now() FROM notifyq.claim('w', "
        "max_jobs => 5, lease => '45 seconds') ORDER BY id",
    )
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (own, 2, timedelta(minutes=2)),
        (setting, 9, timedelta(minutes=2)),
    ]
    assert all(timedelta(seconds=40) < r[3] <= timedelta(seconds=45) for r in rows)


def test_complete_is_fenced(dsn: str) -> None:
    (j,) = insert(dsn, "('t')")
    ((_, _, _, _, attempt, _),) = claim(dsn, "w1")
    assert query(dsn, "SELECT notifyq.complete(%s, 'other', '1')", j) == [(False,)]
    assert query(dsn, "SELECT notifyq.complete(%s, 'w1', '1', %s)", j, attempt + 1) == [(False,)]
    assert job(dsn, j) == ("running", 1)
    # The lease expires and the job is rescued, then claimed again by the same worker:
    # the first attempt's late completion, naming its attempt, changes nothing.
    query(dsn, "UPDATE notifyq.jobs SET lease_expires_at = now() - interval '1 s' WHERE id = %s", j)
    query(dsn, "SELECT * FROM notifyq.rescue_jobs('rescuer', '2 s', '0 s', true, 100)")
    assert job(dsn, j) == ("queued", 1)
    assert query(dsn, "SELECT notifyq.complete(%s, 'w1', '{\"late\": 1}')", j) == [(False,)]
    assert claim(dsn, "w1")[0][4] == 2
    assert query(dsn, "SELECT notifyq.complete(%s, 'w1', '{\"late\": 1}', 1)", j) == [(False,)]
    assert query(dsn, "SELECT notifyq.complete(%s, 'w1', '{\"ok\": 2}', 2)", j) == [(True,)]
    assert job(dsn, j, "status, attempts, result") == ("succeeded", 2, {"ok": 2})
    assert query(dsn, "SELECT notifyq.complete(%s, 'w1', NULL, 2)", j) == [(False,)]


def test_fail_applies_the_task_retry_policy(dsn: str) -> None:
    query(
        dsn,
        "INSERT INTO notifyq.tasks (task, max_attempts, backoff_base, backoff_factor)"
        " VALUES ('t', 2, '100 seconds', 3)",
    )
    (j,) = insert(dsn, "('t')")
    claim(dsn, "w")
    assert query(dsn, "SELECT notifyq.fail(%s, 'w', 'boom')", j) == [("queued",)]
    status, error, delay = job(dsn, j, "status, last_error, run_at - now()")
    assert (status, error) == ("queued", "boom")
    assert timedelta(seconds=49) < delay <= timedelta(seconds=100)  # [base/2, base]
    query(dsn, "UPDATE notifyq.jobs SET run_at = now() WHERE id = %s", j)
    claim(dsn, "w")
    # The second attempt was the last: failing it is final, whatever retryable says.
    assert query(dsn, "SELECT notifyq.fail(%s, 'w', 'boom again')", j) == [("dead",)]
    assert job(dsn, j, "status, attempts, last_error") == ("dead", 2, "boom again")
    assert query(dsn, "SELECT notifyq.fail(%s, 'w', 'too late')", j) == [(None,)]


def test_fail_not_retryable_and_retry_in(dsn: str) -> None:
    a, b = insert(dsn, "('t'), ('t')")
    claim(dsn, "w", "NULL, 2")
    assert query(dsn, "SELECT notifyq.fail(%s, 'w', 'bad input', false)", a) == [("dead",)]
    assert query(
        dsn, "SELECT notifyq.fail(%s, 'w', 'rate limited', retry_in => '10 minutes')", b
    ) == [("queued",)]
    (delay,) = job(dsn, b, "run_at - now()")
    assert timedelta(minutes=9) < delay <= timedelta(minutes=10)


def test_heartbeat_renews_leases_and_says_which_jobs_are_still_held(dsn: str) -> None:
    a, b, other = insert(dsn, "('t'), ('t'), ('t')")
    claim(dsn, "w", "NULL, 2, lease => '10 seconds'")
    claim(dsn, "someone")
    query(dsn, "SELECT notifyq.cancel_job(%s)", b)
    held = query(
        dsn,
        "SELECT * FROM notifyq.heartbeat('w', ARRAY[%s, %s, %s]::bigint[], '1 hour')",
        a,
        b,
        other,
    )
    assert held == [(a,)]
    (left, renewed_at) = job(dsn, a, "lease_expires_at - now(), lease_expires_at")
    assert left > timedelta(minutes=59)
    # Called again at once: the lease has most of its time left, so the row is not rewritten.
    assert query(dsn, "SELECT * FROM notifyq.heartbeat('w', ARRAY[%s]::bigint[])", a) == [(a,)]
    assert job(dsn, a, "lease_expires_at") == (renewed_at,)
    # The registry row: a SQL worker, seen now, holding one job.
    row = query(
        dsn,
        "SELECT kind, state, running FROM notifyq.dispatcher_status WHERE claimant = 'w'",
    )
    assert row == [("sql", "running", 1)]


def test_progress_is_written_announced_and_checkpoints_reach_the_next_attempt(dsn: str) -> None:
    (j,) = insert(dsn, "('t')")
    claim(dsn, "w")
    with psycopg.connect(dsn, autocommit=True) as listener:
        listen_on(listener, channels.PROGRESS)
        assert query(
            dsn, "SELECT notifyq.progress(%s, 'w', 40, 'reading', '{\"page\": 7}')", j
        ) == [(True,)]
        (note,) = list(listener.notifies(timeout=5, stop_after=1))
    report = json.loads(note.payload)
    assert report == {
        "id": j,
        "queue": "default",
        "task": "t",
        "attempt": 1,
        "progress": 40,
        "message": "reading",
    }
    assert query(dsn, "SELECT notifyq.progress(%s, 'other', 50)", j) == [(False,)]
    assert query(dsn, "SELECT notifyq.fail(%s, 'w', 'crash', retry_in => '0')", j) == [("queued",)]
    (row,) = query(dsn, "SELECT id, attempt, checkpoint FROM notifyq.claim('w')")
    assert row == (j, 2, {"page": 7})


def test_hand_back_and_stop_worker_do_not_charge_the_attempt(dsn: str) -> None:
    a, b, c = insert(dsn, "('t'), ('t'), ('t')")
    claim(dsn, "w", "NULL, 3")
    assert query(dsn, "SELECT * FROM notifyq.hand_back('w', ARRAY[%s]::bigint[])", a) == [(a,)]
    assert job(dsn, a) == ("queued", 0)
    assert query(dsn, "SELECT notifyq.stop_worker('w')") == [(2,)]
    assert {job(dsn, x) for x in (b, c)} == {("queued", 0)}
    assert query(
        dsn, "SELECT kind, state, running FROM notifyq.dispatcher_status WHERE claimant = 'w'"
    ) == [("sql", "stopped", 0)]


def test_a_held_session_that_ends_gets_its_jobs_rescued(dsn: str) -> None:
    (j,) = insert(dsn, "('t')")
    rescue = "SELECT id, cause FROM notifyq.rescue_jobs('rescuer', '0 s', '0 s', true, 100)"
    with psycopg.connect(dsn, autocommit=True) as session:
        assert session.execute("SELECT notifyq.hold_session('w')").fetchone() == (True,)
        with psycopg.connect(dsn, autocommit=True) as other:
            # One session holds the worker's liveness: another cannot take it.
            assert other.execute("SELECT notifyq.hold_session('w')").fetchone() == (False,)
        session.execute("SELECT * FROM notifyq.claim('w')")
        assert [r for r in query(dsn, rescue) if r[0] is not None] == []
    # The session ended (the process died): rescued by its session, not its lease.
    # notifyq.rescue is the same sweep, for deployments without notifyq serve; it waits
    # out the two seconds' grace, so it finds the job once those have passed.
    assert (
        wait_until(
            lambda: query(dsn, "SELECT notifyq.rescue('sweeper')")[0][0], message="the rescue"
        )
        == 1
    )
    assert job(dsn, j, "status, attempts, left(last_error, 40)") == (
        "queued",
        1,
        "attempt 1 lost: the database session of ",
    )


def test_caps_and_rate_limits_hold_for_sql_workers(dsn: str) -> None:
    query(dsn, "INSERT INTO notifyq.queue_limits (queue, max_running) VALUES ('capped', 2)")
    insert(dsn, "('capped', 't'), ('capped', 't'), ('capped', 't')", "queue, task")
    assert len(claim(dsn, "w1", "ARRAY['capped'], 10")) == 2
    assert claim(dsn, "w2", "ARRAY['capped'], 10") == []
    query(dsn, "INSERT INTO notifyq.rate_limits (rate_key, per_second, burst) VALUES ('api', 1, 1)")
    insert(dsn, "('t', 'api'), ('t', 'api'), ('t', 'api')", "task, rate_key")
    assert len(claim(dsn, "w3", "ARRAY['default'], 10")) == 1  # the others got later slots


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ("notifyq.claim('w', max_jobs => 0)", "max_jobs must be from 1 to 1000"),
        ("notifyq.claim('w', lease => '0 seconds')", "lease must be from 1 second to 1 day"),
        ("notifyq.claim('', max_jobs => 1)", "worker must name the worker"),
        ("notifyq.claim('w', ARRAY[NULL]::text[])", "queues and tasks must not contain NULL"),
        ("notifyq.heartbeat('w', '{}', '2 days')", "lease must be from 1 second to 1 day"),
        (
            "notifyq.finish_jobs('w', '{1}', outcomes => '{retry}')",
            "an outcome must be succeeded, failed or dead",
        ),
        ("notifyq.progress(1, 'w', 150)", "jobs_progress_range"),
    ],
)
def test_bad_arguments_are_refused_with_a_clear_error(dsn: str, call: str, message: str) -> None:
    insert(dsn, "('t')")
    query(dsn, "SELECT notifyq.claim('w')")
    with pytest.raises(psycopg.Error, match=message):
        query(dsn, f"SELECT * FROM {call}")


def test_only_the_worker_role_runs_the_protocol(dsn: str, roles: Roles) -> None:  # noqa: F811
    (j,) = insert(dsn, "('t')")
    producer = make_conninfo(dsn, user=roles.producer_login)
    worker = make_conninfo(dsn, user=roles.worker_login)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        query(producer, "SELECT * FROM notifyq.claim('p')")
    assert [r[0] for r in query(worker, "SELECT id FROM notifyq.claim('w')")] == [j]
    assert query(worker, "SELECT notifyq.fail(%s, 'w', 'x', retry_in => '0')", j) == [("queued",)]
    query(worker, "SELECT * FROM notifyq.claim('w')")
    assert query(worker, "SELECT * FROM notifyq.heartbeat('w', ARRAY[%s]::bigint[])", j) == [(j,)]
    assert query(worker, "SELECT notifyq.complete(%s, 'w')", j) == [(True,)]
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        query(producer, "SELECT notifyq.complete(%s, 'p')", j)


@pytest.mark.anyio
async def test_serve_writes_its_task_settings_and_applies_them_like_sql_workers(dsn: str) -> None:
    app = notifyq.App()

    @app.task(
        name="flaky", max_attempts=4, backoff=Backoff(base=30, factor=3, max_delay=600), timeout=12
    )
    def flaky(payload: Any) -> None:
        raise RuntimeError("down")

    (j,) = insert(dsn, "('flaky')")
    worker = app.worker(Settings(concurrency=2, poll_interval=0.2), dsn=dsn)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        with anyio.fail_after(20):
            # Polling the table: no event says the retry was written.
            while await anyio.to_thread.run_sync(job, dsn, j) != ("queued", 1):  # noqa: ASYNC110
                await anyio.sleep(0.02)
        worker.stop()
    row = query(
        dsn,
        "SELECT max_attempts, backoff_base, backoff_factor, backoff_max, timeout"
        " FROM notifyq.tasks WHERE task = 'flaky'",
    )
    assert row == [(4, timedelta(seconds=30), 3.0, timedelta(minutes=10), timedelta(seconds=12))]
    # The retry waits out the task's backoff, as a SQL worker's fail would.
    (delay,) = job(dsn, j, "run_at - now()")
    assert timedelta(seconds=10) < delay <= timedelta(seconds=30)
    # Settings unchanged: a restart writes nothing.
    (before,) = query(dsn, "SELECT updated_at FROM notifyq.tasks WHERE task = 'flaky'")
    worker = app.worker(Settings(concurrency=2, poll_interval=0.2), dsn=dsn)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await worker.ready.wait()
        with anyio.fail_after(10):
            while not worker.dispatcher.claims:  # noqa: ASYNC110 - no event for a claim
                await anyio.sleep(0.02)
        worker.stop()
    assert query(dsn, "SELECT updated_at FROM notifyq.tasks WHERE task = 'flaky'") == [before]
