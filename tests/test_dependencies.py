"""Job dependencies: depends_on, the waiting status, release by the finishing statement,
cancellation with a reason (and its cascade), the 'run' policy, and the races between a
dependent's INSERT and its dependencies finishing."""

from __future__ import annotations

import json
import threading
from typing import Any

import anyio
import psycopg
import pytest

import notifyq
from notifyq import InvalidJob, JobContext, channels, store
from notifyq.completion import Completer
from notifyq.ledger import Ledger
from notifyq.worker_pool import Finished
from tests.conftest import query, statuses, wait_until
from tests.helpers import eventually, listen_on, serving


def insert(dsn: str, task: str = "t", depends_on: list[int] | None = None, **columns: Any) -> int:
    names = ["task", "depends_on", *columns]
    marks = ", ".join(["%s"] * len(names))
    rows = query(
        dsn,
        f"INSERT INTO notifyq.jobs ({', '.join(names)}) VALUES ({marks}) RETURNING id",
        task,
        depends_on,
        *columns.values(),
    )
    return int(rows[0][0])


def finish(dsn: str, job_id: int, status: str) -> None:
    query(
        dsn,
        "UPDATE notifyq.jobs SET status = %s, finished_at = now() WHERE id = %s",
        status,
        job_id,
    )


def status(dsn: str, job_id: int) -> str:
    return str(query(dsn, "SELECT status FROM notifyq.jobs WHERE id = %s", job_id)[0][0])


def blocked_on_a_lock(dsn: str) -> bool:
    return bool(
        query(
            dsn,
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )[0][0]
    )


pytestmark = pytest.mark.anyio


async def test_a_chain_runs_in_order_with_a_live_dispatcher(dsn: str) -> None:
    app = notifyq.App(dsn)
    ran: list[int] = []

    @app.task(name="step")
    async def step(payload: Any, ctx: JobContext) -> None:
        ran.append(ctx.id)

    try:
        a = await app.enqueue("step", delay=0.3)
        b = await app.enqueue("step", depends_on=[a])
        c = app.enqueue_sync("step", depends_on=[b])
        fan = await app.enqueue_many("step", [{}, {}], depends_on=[a, b])
        assert [status(dsn, i) for i in (a, b, c, *fan)] == ["queued", *["waiting"] * 4]
        # A poll interval of an hour: only the notification of a release can start them.
        async with serving(app, dsn, poll_interval=3600, concurrency=4):
            await eventually(lambda: len(ran) == 5)
    finally:
        await app.aclose()
    assert ran[:2] == [a, b] and set(ran[2:]) == {c, *fan}
    assert query(dsn, "SELECT DISTINCT status FROM notifyq.jobs") == [("succeeded",)]


async def test_waiting_jobs_are_never_claimed(dsn: str) -> None:
    a = insert(dsn)
    b = insert(dsn, depends_on=[a])
    claims = store.Store(dsn, "test")
    try:
        for expected in ([a], []):
            jobs, *_ = await claims.claim(
                queues=["default"],
                limit=10,
                claimant="h:1:x",
                lease=30,
                tasks=["t"],  # a claim takes only the tasks it names
            )
            assert [j.id for j in jobs] == expected
    finally:
        await claims.close()
    assert status(dsn, b) == "waiting"


def test_plain_sql_enqueue_waits_for_every_dependency(dsn: str) -> None:
    a, b = insert(dsn), insert(dsn)
    (c,) = query(
        dsn,
        "INSERT INTO notifyq.jobs (task, payload, depends_on) VALUES ('t', '{}', ARRAY[%s, %s])"
        " RETURNING id",
        a,
        b,
    )[0]
    with psycopg.connect(dsn, autocommit=True) as listener:
        listen_on(listener, channels.JOBS)
        finish(dsn, a, "succeeded")
        assert status(dsn, c) == "waiting"
        finish(dsn, b, "succeeded")
        assert status(dsn, c) == "queued"
        # The release wakes the dispatchers like an insert does.
        woken = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
    assert woken == ["default"]
    # Dependencies already finished: queued at once.
    assert status(dsn, insert(dsn, depends_on=[a, b])) == "queued"


def test_a_dead_dependency_cancels_its_dependents_with_the_reason_and_it_cascades(
    dsn: str,
) -> None:
    a = insert(dsn)
    b = insert(dsn, depends_on=[a])
    c = insert(dsn, depends_on=[b])
    d = insert(dsn, depends_on=[c])
    runs_anyway = insert(dsn, depends_on=[a], on_dependency_failure="run")
    runs_after_c = insert(dsn, depends_on=[c], on_dependency_failure="run")
    finish(dsn, a, "dead")
    rows = dict(
        (r[0], r[1:])
        for r in query(
            dsn, "SELECT id, status, last_error, finished_at IS NOT NULL FROM notifyq.jobs"
        )
    )
    assert rows[b] == (
        "cancelled",
        f"cancelled: job {a}, which this job depends on, ended dead",
        True,
    )
    reason = "cancelled: job {}, which this job depends on, was cancelled"
    assert rows[c] == ("cancelled", reason.format(b), True)
    assert rows[d] == ("cancelled", reason.format(c), True)
    assert rows[runs_anyway][0] == "queued"
    assert rows[runs_after_c][0] == "queued"
    # A dependent inserted after the failure is cancelled at once.
    late = insert(dsn, depends_on=[a])
    assert query(dsn, "SELECT status, last_error FROM notifyq.jobs WHERE id = %s", late) == [
        ("cancelled", f"cancelled: job {a}, which this job depends on, ended dead")
    ]


def test_a_long_chain_cancels_in_one_statement(dsn: str) -> None:
    """Far deeper than nested trigger calls could go (max_stack_depth)."""
    head = insert(dsn)
    query(
        dsn,
        "DO $$ DECLARE prev bigint := %s; BEGIN FOR i IN 1..2000 LOOP"
        " INSERT INTO notifyq.jobs (task, depends_on) VALUES ('t', ARRAY[prev])"
        " RETURNING id INTO prev; END LOOP; END $$".replace("%s", str(head)),
    )
    finish(dsn, head, "cancelled")
    assert query(dsn, "SELECT status, count(*) FROM notifyq.jobs GROUP BY 1 ORDER BY 1") == [
        ("cancelled", 2001)
    ]


def test_cancel_and_retry_follow_the_dependencies(dsn: str) -> None:
    a = insert(dsn)
    b = insert(dsn, depends_on=[a])
    c = insert(dsn, depends_on=[b])
    assert query(dsn, "SELECT notifyq.cancel_job(%s)", b) == [("waiting",)]
    assert status(dsn, c) == "cancelled"
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
        query(dsn, "SELECT notifyq.retry_job(%s)", insert(dsn, depends_on=[a]))  # waiting
    finish(dsn, a, "dead")
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as caught:
        query(dsn, "SELECT notifyq.retry_job(%s)", b)
    assert caught.value.diag.message_hint == "Retry the jobs it depends on first."
    # A retried dead job does not bring its cancelled dependents back by itself ...
    assert query(dsn, "SELECT notifyq.retry_job(%s)", a) == [("dead",)]
    assert status(dsn, b) == "cancelled"
    # ... a retried dependent waits for it again.
    assert query(dsn, "SELECT notifyq.retry_job(%s)", b) == [("cancelled",)]
    assert status(dsn, b) == "waiting"
    finish(dsn, a, "succeeded")
    assert status(dsn, b) == "queued"


def test_unknown_dependencies_and_bad_arguments_are_refused(dsn: str) -> None:
    a = insert(dsn)
    with pytest.raises(psycopg.errors.ForeignKeyViolation) as caught:
        insert(dsn, depends_on=[a, 987654])
    assert caught.value.diag.message_primary == (
        "notifyq: job depends on job 987654, which does not exist"
    )
    assert "inserted before this one" in (caught.value.diag.message_hint or "")
    with pytest.raises(psycopg.errors.CheckViolation) as check:
        insert(dsn, depends_on=[a], on_dependency_failure="ignore")
    assert check.value.diag.constraint_name == "jobs_on_dependency_failure_valid"
    with pytest.raises(psycopg.errors.CheckViolation) as check:
        query(dsn, "INSERT INTO notifyq.jobs (task, depends_on) VALUES ('t', ARRAY[1, NULL])")
    assert check.value.diag.constraint_name == "jobs_depends_on_valid"

    app = notifyq.App(dsn)
    try:
        with pytest.raises(InvalidJob, match="job 987654, which does not exist"):
            app.enqueue_sync("t", depends_on=[987654])
        for bad in ([True], ["1"], [0], 5, "12"):
            with pytest.raises(InvalidJob, match="depends_on"):
                app.enqueue_sync("t", depends_on=bad)
        with pytest.raises(InvalidJob, match="on_dependency_failure"):
            app.enqueue_sync("t", depends_on=[a], on_dependency_failure="skip")
    finally:
        app.close()
    assert query(dsn, "SELECT count(*) FROM notifyq.jobs") == [(1,)]
    # Empty means no dependencies.
    assert status(dsn, insert(dsn, depends_on=[])) == "queued"


def race(dsn: str, first: bytes, second: bytes) -> None:
    """Run `first` in a transaction, then `second` in another, which must wait for the
    first's row lock; commit the first, then the second."""
    with psycopg.connect(dsn) as holder, psycopg.connect(dsn) as waiter:
        holder.execute(first)
        blocked = threading.Thread(target=lambda: (waiter.execute(second), waiter.commit()))
        blocked.start()
        wait_until(lambda: blocked_on_a_lock(dsn), message="the second to wait on a lock")
        holder.commit()
        blocked.join(timeout=20)
        assert not blocked.is_alive()


def dependent_of(job_id: int, policy: str = "cancel") -> bytes:
    return (
        "INSERT INTO notifyq.jobs (task, depends_on, on_dependency_failure)"
        f" VALUES ('t', ARRAY[{job_id}], '{policy}') RETURNING id"
    ).encode()


FINISH = b"UPDATE notifyq.jobs SET status = %s, finished_at = now() WHERE id = %s"


def finisher(dsn: str, *, autocommit: bool) -> psycopg.Connection[Any]:
    """A connection that finishes jobs and never waits long for a lock: before version 9
    a producer's open transaction made it wait until that transaction ended."""
    conn = psycopg.connect(dsn, autocommit=autocommit)
    conn.execute("SET lock_timeout = '5s'")
    if not autocommit:
        conn.commit()
    return conn


def outcome_of(dsn: str, job_id: int) -> tuple[Any, ...]:
    return query(dsn, "SELECT status, last_error FROM notifyq.jobs WHERE id = %s", job_id)[0]


WHAT_IT_CALLS_FOR = [
    ("succeeded", "cancel", "queued", None),
    ("dead", "cancel", "cancelled", "cancelled: job {}, which this job depends on, ended dead"),
    (
        "cancelled",
        "cancel",
        "cancelled",
        "cancelled: job {}, which this job depends on, was cancelled",
    ),
    ("dead", "run", "queued", None),
]


@pytest.mark.parametrize(("finished_as", "policy", "expected", "reason"), WHAT_IT_CALLS_FOR)
def test_a_dependency_finishes_while_its_dependents_transaction_is_open(
    dsn: str, finished_as: str, policy: str, expected: str, reason: str | None
) -> None:
    """The producer's transaction inserted a dependent and stays open: finishing the
    dependency does not wait for it, and the producer's COMMIT gives the dependent what
    the finished dependency calls for; it is not left waiting."""
    a = insert(dsn)
    with psycopg.connect(dsn) as producer:
        row = producer.execute(dependent_of(a, policy)).fetchone()
        assert row is not None
        b = int(row[0])
        with finisher(dsn, autocommit=True) as conn:
            conn.execute(FINISH, (finished_as, a))
        assert status(dsn, a) == finished_as
        producer.commit()
    assert outcome_of(dsn, b) == (expected, reason and reason.format(a))


@pytest.mark.parametrize("finish_commits", [True, False], ids=["committed", "rolled-back"])
def test_a_dependency_finishing_during_its_dependents_commit(
    dsn: str, finish_commits: bool
) -> None:
    """The finishing UPDATE holds the dependency's row when the producer commits: the
    COMMIT waits for it to end, and then sees what it did."""
    a = insert(dsn)
    with psycopg.connect(dsn) as producer, finisher(dsn, autocommit=False) as conn:
        row = producer.execute(dependent_of(a)).fetchone()
        assert row is not None
        b = int(row[0])
        conn.execute(FINISH, ("succeeded", a))
        committing = threading.Thread(target=producer.commit)
        committing.start()
        wait_until(lambda: blocked_on_a_lock(dsn), message="the COMMIT to wait for the UPDATE")
        if finish_commits:
            conn.commit()
        else:
            conn.rollback()
        committing.join(timeout=20)
        assert not committing.is_alive()
    if finish_commits:
        assert status(dsn, b) == "queued"
    else:
        assert status(dsn, b) == "waiting"
        finish(dsn, a, "succeeded")
        assert status(dsn, b) == "queued"


def test_a_dependency_finishing_before_its_dependent_is_inserted(dsn: str) -> None:
    """The INSERT comes after the finishing UPDATE, which has not committed yet: the
    INSERT goes on (it takes no lock), its COMMIT waits for the UPDATE's."""
    a = insert(dsn)
    finished = (
        f"UPDATE notifyq.jobs SET status = 'succeeded', finished_at = now() WHERE id = {a}"
    ).encode()
    race(dsn, finished, dependent_of(a))
    assert [r[0] for r in query(dsn, "SELECT status FROM notifyq.jobs ORDER BY id")] == [
        "succeeded",
        "queued",
    ]


def test_the_commit_cancels_what_depends_on_a_dependency_that_died_meanwhile(dsn: str) -> None:
    """Jobs inserted together, each depending on the one before, the first on a job that
    ends dead before they commit: the COMMIT cancels the chain (the cascade runs in the
    producer's transaction); a job that runs whatever is queued."""
    a = insert(dsn)
    with psycopg.connect(dsn) as producer:
        chain = [a]
        for policy in ("cancel", "cancel", "run"):
            row = producer.execute(dependent_of(chain[-1], policy)).fetchone()
            assert row is not None
            chain.append(int(row[0]))
        with finisher(dsn, autocommit=True) as conn:
            conn.execute(FINISH, ("dead", a))
        producer.commit()
    _, b, c, d = chain
    reason = "cancelled: job {}, which this job depends on, {}"
    assert outcome_of(dsn, b) == ("cancelled", reason.format(a, "ended dead"))
    assert outcome_of(dsn, c) == ("cancelled", reason.format(b, "was cancelled"))
    assert outcome_of(dsn, d)[0] == "queued"


@pytest.mark.anyio
async def test_a_completion_skips_a_row_a_producer_holds_and_writes_it_later(dsn: str) -> None:
    """SET CONSTRAINTS ALL IMMEDIATE makes the producer check its dependencies at once,
    and hold the lock on them until its transaction ends.  The dispatcher's completion
    leaves that row out (busy, with who holds it) instead of waiting, writes the others,
    and writes it once the producer is done."""
    a, c = insert(dsn), insert(dsn)
    claims = store.Store(dsn, "test")
    claimant = "h:1:x"
    done = [store.Outcome(a, 1, "succeeded"), store.Outcome(c, 1, "succeeded")]
    try:
        jobs, *_ = await claims.claim(
            queues=["default"],
            limit=10,
            claimant=claimant,
            lease=30,
            tasks=["t"],  # the claim takes only the tasks it is given
        )
        assert sorted(j.id for j in jobs) == [a, c]
        with psycopg.connect(dsn, application_name="a producer") as producer:
            producer.execute("SET CONSTRAINTS ALL IMMEDIATE")
            row = producer.execute(dependent_of(a)).fetchone()
            assert row is not None
            b = int(row[0])
            with anyio.fail_after(10):
                written = await claims.complete(done, claimant)
            assert list(written.applied) == [(c, 1)]
            assert written.applied[(c, 1)].status == "succeeded"
            assert list(written.busy) == [(a, 1)]
            holder = written.busy[(a, 1)]
            assert f"pid {producer.info.backend_pid}, application 'a producer'" in holder
            producer.commit()
        with anyio.fail_after(10):
            written = await claims.complete(done[:1], claimant)
        assert list(written.applied) == [(a, 1)] and not written.busy
    finally:
        await claims.close()
    assert status(dsn, b) == "queued"


def test_two_dependencies_finishing_in_concurrent_transactions(dsn: str) -> None:
    """Each alone would see the other's job unfinished: the second waits for the lock
    on the dependent, then sees the first one's job finished."""
    a, b = insert(dsn), insert(dsn)
    c = insert(dsn, depends_on=[a, b])
    finished = "UPDATE notifyq.jobs SET status = 'succeeded', finished_at = now() WHERE id = {}"
    race(dsn, finished.format(a).encode(), finished.format(b).encode())
    assert status(dsn, c) == "queued"


def test_release_finds_dependents_through_the_gin_index(dsn: str) -> None:
    query(
        dsn,
        "INSERT INTO notifyq.jobs (task, status, attempts, finished_at)"
        " SELECT 't', 'succeeded', 1, now() FROM generate_series(1, 20000)",
    )
    a, other = insert(dsn), insert(dsn)
    query(
        dsn,
        "INSERT INTO notifyq.jobs (task, depends_on)"
        " SELECT 't', ARRAY[%s] FROM generate_series(1, 2000)",
        other,
    )
    released = insert(dsn, depends_on=[a])
    query(dsn, "VACUUM ANALYZE notifyq.jobs")
    plans: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            conn.execute("LOAD 'auto_explain'")
        except psycopg.Error as exc:
            pytest.skip(f"auto_explain is not available: {exc}")
        for setting in (
            "auto_explain.log_min_duration = 0",
            "auto_explain.log_nested_statements = on",
            "auto_explain.log_format = json",
            "client_min_messages = log",
        ):
            conn.execute(f"SET {setting}".encode())
        conn.add_notice_handler(lambda diag: plans.append(diag.message_primary or ""))
        conn.execute(
            "UPDATE notifyq.jobs SET status = 'succeeded', finished_at = now() WHERE id = %s", (a,)
        )
    lookups = [p for p in plans if "'waiting'" in p and "&&" in p and "FOR UPDATE" in p]
    assert lookups, plans
    plan = json.loads(lookups[0][lookups[0].index("{") :])
    text = json.dumps(plan)
    assert "jobs_waiting_idx" in text
    assert '"Seq Scan"' not in text
    assert status(dsn, released) == "queued"


@pytest.mark.anyio
async def test_a_write_that_waits_for_a_lock_is_split_until_the_waiting_outcome_is_alone(
    dsn: str,
) -> None:
    """Writing one outcome must release the job waiting on it, whose row another
    transaction holds: the batch gives up after lock_timeout, is written in halves
    until that outcome is alone, the others land, and it lands once the lock goes.
    Meanwhile it stays `writing` in the ledger (its lease is renewed, no loss reported)."""
    ids = [insert(dsn) for _ in range(8)]
    culprit = ids[5]
    waiting = insert(dsn, depends_on=[culprit])
    claimant = "h:1:x"
    claims = store.Store(dsn, "claims")
    writes = store.Store(dsn, "complete", lock_timeout=0.2)
    ledger = Ledger()
    try:
        jobs, *_ = await claims.claim(
            queues=["default"],
            limit=10,
            claimant=claimant,
            lease=30,
            tasks=["t"],  # the claim takes only the tasks it is given
        )
        assert sorted(j.id for j in jobs) == ids
        for job in jobs:
            ledger.claimed((job.id, job.attempt))
            ledger.finished((job.id, job.attempt))  # as the pool reports it
        completer = Completer(writes, claimant, ledger, on_written=lambda: None)
        with psycopg.connect(dsn) as blocker:
            blocker.execute("SELECT 1 FROM notifyq.jobs WHERE id = %s FOR UPDATE", (waiting,))
            async with anyio.create_task_group() as tg:
                tg.start_soon(completer.run)
                for job in sorted(jobs, key=lambda j: j.id):
                    completer.submit(Finished(job, None))
                with anyio.fail_after(20):
                    while not (  # noqa: ASYNC110 - the table and a counter, no event
                        statuses(dsn).get("succeeded") == 7 and completer.pending == 1
                    ):
                        await anyio.sleep(0.02)
                assert status(dsn, culprit) == "running"
                assert ledger.attempts() == {(culprit, 1)}
                assert ledger.still_expected({(culprit, 1)}) == set()  # being written
                # 8 -> 4 -> 2 -> 1 outcomes: one timeout each, and the lone one's own.
                assert writes.lock_waits >= 4
                blocker.rollback()
                with anyio.fail_after(20):
                    while status(dsn, waiting) != "queued":  # noqa: ASYNC110 - the table
                        await anyio.sleep(0.02)
                completer.close(give_up_after=5)
        assert status(dsn, culprit) == "succeeded"
        assert len(ledger) == 0
        assert (completer.written, completer.fenced) == (8, 0)
    finally:
        await claims.close()
        await writes.close()
