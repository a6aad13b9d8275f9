"""Appetite: inserts skip their notification while every dispatcher of the queue drains,
and no job waits for the fallback poll because of it (notifyq.queue_appetite)."""

from __future__ import annotations

import random
import threading
import time
import uuid
from typing import Any

import anyio
import psycopg
import pytest
from psycopg import sql

import notifyq
from notifyq import channels, migrate, store
from tests.conftest import query, wait_until
from tests.helpers import eventually, listen_on, serving

SENTINEL = "sentinel"


def set_appetite(dsn: str, claimant: str, queue: str, state: str, ttl: float = 10) -> None:
    query(
        dsn,
        "SELECT notifyq.set_appetite(%s, ARRAY[%s], %s, make_interval(secs => %s))",
        claimant,
        queue,
        state,
        ttl,
    )


def wakeups(dsn: str) -> tuple[int, int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        w = store.monitoring.wakeups(conn)
    return w.sent, w.skipped


def notified(listener: psycopg.Connection[Any], dsn: str, insert: str) -> list[str]:
    """What the insert sent on notifyq_jobs: the producer's connection sends a sentinel
    in a transaction before it and one after it, and notifications arrive in commit
    order, so whatever came between the two is all the insert sent."""
    with psycopg.connect(dsn, autocommit=True) as producer:
        producer.execute("SELECT pg_notify(%s, %s)", (channels.JOBS, SENTINEL + " before"))
        producer.execute(insert.encode())
        producer.execute("SELECT pg_notify(%s, %s)", (channels.JOBS, SENTINEL))
    got: list[str] = []
    deadline = time.monotonic() + 10
    while SENTINEL not in got and time.monotonic() < deadline:
        got += [n.payload for n in listener.notifies(timeout=0.2)]
    assert SENTINEL in got
    return got[got.index(SENTINEL + " before") + 1 : got.index(SENTINEL)]


INSERT = "INSERT INTO notifyq.jobs (task, queue) VALUES ('t', 'q')"


def test_an_insert_skips_its_notification_only_while_every_consumer_drains(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as listener:
        listen_on(listener, channels.JOBS)
        assert notified(listener, dsn, INSERT) == ["q"]  # no appetite known: notify
        set_appetite(dsn, "d1", "q", "draining")
        before = wakeups(dsn)
        assert notified(listener, dsn, INSERT) == []
        assert wakeups(dsn) == (before[0], before[1] + 1)
        # Another queue's dispatchers say nothing of this one.
        assert notified(listener, dsn, INSERT.replace("'q'", "'other'")) == ["other"]
        set_appetite(dsn, "d2", "q", "hungry")  # one hungry consumer is enough
        assert notified(listener, dsn, INSERT) == ["q"]
        query(dsn, "SELECT notifyq.set_appetite('d2', ARRAY['q'], NULL)")
        assert notified(listener, dsn, INSERT) == []
        # A SQL worker counts as hungry on the queues it claims from ('*': all of them).
        query(dsn, "SELECT count(*) FROM notifyq.claim('w1', NULL, 1, '30 seconds')")
        assert query(dsn, "SELECT queue, state FROM notifyq.queue_appetite WHERE claimant = 'w1'")
        assert notified(listener, dsn, INSERT) == ["q"]
        query(dsn, "SELECT notifyq.stop_worker('w1')")
        assert notified(listener, dsn, INSERT) == []
        # A producer in REPEATABLE READ reads with its transaction's snapshot: it notifies.
        with psycopg.connect(dsn) as producer:
            producer.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            producer.execute(INSERT)
            producer.commit()
        assert [n.payload for n in listener.notifies(timeout=5, stop_after=1)] == ["q"]


def test_a_dead_dispatchers_draining_row_stops_counting_when_it_expires(dsn: str) -> None:
    """A dispatcher killed while draining cannot clear its row: the row expires."""
    with psycopg.connect(dsn, autocommit=True) as listener:
        listen_on(listener, channels.JOBS)
        set_appetite(dsn, "ghost", "q", "draining", ttl=0.5)
        assert notified(listener, dsn, INSERT) == []
        wait_until(
            lambda: query(
                dsn, "SELECT bool_and(expires_at < clock_timestamp()) FROM notifyq.queue_appetite"
            )[0][0],
            message="the row to expire",
        )
        assert notified(listener, dsn, INSERT) == ["q"]


def test_rows_of_consumers_whose_session_ended_are_forgotten(dsn: str) -> None:
    """A killed dispatcher's hungry row would cost notifications forever: the next
    dispatcher that states its appetite for the queue drops it once its liveness lock is
    free; a live one's row stays."""
    query(
        dsn,
        "INSERT INTO notifyq.dispatchers (claimant, host, pid, queues, concurrency, running,"
        " heartbeat, liveness_lock) VALUES ('dead', 'h', 1, '{q}', 1, 0, 1, true),"
        " ('alive', 'h', 2, '{q}', 1, 0, 1, true)",
    )
    set_appetite(dsn, "dead", "q", "hungry")
    set_appetite(dsn, "alive", "q", "hungry")
    # Past the grace a new consumer's row has before its registry row may exist, and
    # with no heartbeat for as long: only the liveness lock tells the two apart.
    query(dsn, "UPDATE notifyq.queue_appetite SET since = now() - interval '2 minutes'")
    query(dsn, "UPDATE notifyq.dispatchers SET heartbeat_at = now() - interval '2 minutes'")
    with psycopg.connect(dsn, autocommit=True) as alive:
        alive.execute("SELECT pg_advisory_lock(28274, hashtext('alive'))")
        set_appetite(dsn, "peer", "q", "draining")
        rows = query(dsn, "SELECT claimant FROM notifyq.queue_appetite ORDER BY claimant")
    assert rows == [("alive",), ("peer",)]


def test_migration_lets_existing_workers_state_their_appetite(empty_dsn: str) -> None:
    """A worker role that `notifyq roles` made before appetite existed may state it (and
    read the counts) once the database is migrated, without running `notifyq roles` again."""
    (appetite,) = [v for v, script in store.migration_scripts() if "queue_appetite (" in script]
    with psycopg.connect(empty_dsn) as conn:
        for version, script in store.migration_scripts():
            if version < appetite:
                store.apply_script(conn, version, script)
    role = f"nq_old_worker_{uuid.uuid4().hex[:10]}"
    try:
        for statement in (
            "CREATE ROLE {} NOLOGIN",
            "GRANT USAGE ON SCHEMA notifyq TO {}",
            "GRANT EXECUTE ON FUNCTION notifyq.claim_room(text, integer) TO {}",
            # What `notifyq roles` gave a worker at the version before appetite's.
            "GRANT EXECUTE ON FUNCTION notifyq.liveness_held(text) TO {}",
            "GRANT SELECT, INSERT, UPDATE, DELETE ON notifyq.dispatchers TO {}",
        ):
            query(empty_dsn, sql.SQL(statement).format(sql.Identifier(role)).as_string(None))
        migrate.migrate(empty_dsn)
        with psycopg.connect(empty_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
            conn.execute("SELECT notifyq.set_appetite('w', ARRAY['q'], 'draining')")
            conn.execute("SELECT notifyq.appetite_barrier(ARRAY['q'])")
            assert store.monitoring.wakeups(conn) == store.rows.Wakeups(0, 0)
    finally:
        query(
            empty_dsn,
            sql.SQL("DROP OWNED BY {0}; DROP ROLE {0}")
            .format(sql.Identifier(role))
            .as_string(None),
        )


def test_a_live_idle_dispatchers_rows_survive_a_peers_cleanup(dsn: str) -> None:
    """An idle dispatcher that listens writes no heartbeat: a day later its hungry row
    must still stand while its liveness lock is held, or inserts would skip its wake-up."""
    query(
        dsn,
        "INSERT INTO notifyq.dispatchers (claimant, host, pid, queues, concurrency, heartbeat,"
        " liveness_lock, heartbeat_at, alive_at) VALUES ('idle', 'h', 1, '{q}', 1, 10, true,"
        " now() - interval '2 days', now() - interval '2 days')",
    )
    set_appetite(dsn, "idle", "q", "hungry")
    query(dsn, "UPDATE notifyq.queue_appetite SET since = now() - interval '2 days'")
    with psycopg.connect(dsn, autocommit=True) as owner:
        owner.execute("SELECT pg_advisory_lock(28274, hashtext('idle'))")  # it lives
        set_appetite(dsn, "peer", "q", "draining")
        assert query(dsn, "SELECT claimant FROM notifyq.queue_appetite ORDER BY 1") == [
            ("idle",),
            ("peer",),
        ]
    # Its session gone (lock free) and its row two days old: now it goes.
    set_appetite(dsn, "peer", "q", "draining")
    assert query(dsn, "SELECT claimant FROM notifyq.queue_appetite") == [("peer",)]


def test_the_barrier_waits_for_a_producer_that_read_the_queue_draining(dsn: str) -> None:
    set_appetite(dsn, "d1", "q", "draining")
    with psycopg.connect(dsn) as producer:
        producer.execute(INSERT)  # skips: d1 drains; the transaction stays open
        set_appetite(dsn, "d1", "q", "hungry")
        # The job is not visible yet, and the barrier says so instead of passing.
        assert query(dsn, "SELECT notifyq.appetite_barrier(ARRAY['q'])") == [(False,)]
        producer.commit()
    assert query(dsn, "SELECT notifyq.appetite_barrier(ARRAY['q'])") == [(True,)]
    # Behind a barrier that passed, the claim sees the job.
    assert query(dsn, "SELECT count(*) FROM notifyq.claim('d1', ARRAY['q'], 10)") == [(1,)]


def burst(dsn: str, jobs: int, committed: dict[int, float], lock: threading.Lock) -> None:
    """Jobs one transaction each, held open a few milliseconds after the INSERT (as an
    application's transaction would be): the window in which the dispatcher may turn
    hungry after the producer read its appetite."""
    rng = random.Random()
    with psycopg.connect(dsn) as conn:
        for _ in range(jobs):
            row = conn.execute("INSERT INTO notifyq.jobs (task) VALUES ('t') RETURNING id")
            job = row.fetchone()
            assert job is not None
            time.sleep(rng.uniform(0, 0.01))
            conn.commit()
            with lock:
                committed[job[0]] = time.monotonic()


@pytest.mark.anyio
async def test_no_job_waits_for_the_poll_while_the_dispatcher_drains_and_hungers(
    dsn: str,
) -> None:
    """Rounds of concurrent producers against a dispatcher that drains each round's
    burst and turns hungry at its end, then silence: the poll is a minute, so a job whose
    skipped notification the claim after the barrier did not make up for waits for it."""
    app = notifyq.App()
    started: dict[int, float] = {}

    @app.task(name="t")
    async def t(payload: Any, ctx: notifyq.JobContext) -> None:
        started[ctx.id] = time.monotonic()
        await anyio.sleep(0.002)

    committed: dict[int, float] = {}
    lock = threading.Lock()
    sent0, skipped0 = wakeups(dsn)
    async with serving(app, dsn, concurrency=4, poll_interval=60) as worker:
        for _ in range(20):
            async with anyio.create_task_group() as producers:
                for _ in range(4):
                    producers.start_soon(
                        anyio.to_thread.run_sync, burst, dsn, random.randint(5, 25), committed, lock
                    )
            # Then silence: every job of the round starts within seconds of its commit,
            # or only the poll (a minute) would start it.
            deadline = time.monotonic() + 10
            while len(started) < len(committed) and time.monotonic() < deadline:  # noqa: ASYNC110 - a count, not an event
                await anyio.sleep(0.01)
            waiting = {i: round(time.monotonic() - c, 1) for i, c in committed.items()}
            waiting = {i: age for i, age in waiting.items() if i not in started}
            appetite = worker.appetite
            assert appetite is not None
            assert not waiting, (
                waiting,
                appetite.state,
                appetite.barriers,
                worker.dispatcher.claims,
            )
    assert worker.dispatcher.polls_with_work == 0
    sent, skipped = wakeups(dsn)
    assert skipped > skipped0  # skipping happened ...
    assert sent > sent0  # ... and so did notifying, after the dispatcher turned hungry
    assert appetite.barriers >= 2  # draining -> hungry more than once


@pytest.mark.anyio
async def test_a_job_of_a_producer_that_held_its_transaction_open_starts_after_commit(
    dsn: str,
) -> None:
    """The producer read the queue draining, the dispatcher turned hungry, and the
    barrier could not pass while the producer's transaction stayed open: the dispatcher
    tries it again until it passes, then claims the job, long before the poll."""
    app = notifyq.App()
    started: dict[int, float] = {}

    @app.task(name="t")
    async def t(payload: Any, ctx: notifyq.JobContext) -> None:
        started[ctx.id] = time.monotonic()
        await anyio.sleep(0.005)

    query(dsn, "INSERT INTO notifyq.jobs (task) SELECT 't' FROM generate_series(1, 200)")
    async with serving(app, dsn, concurrency=2, batch_size=2, poll_interval=60) as worker:
        appetite = worker.appetite
        assert appetite is not None
        await eventually(lambda: appetite.state == "draining")
        with psycopg.connect(dsn) as producer:
            job = producer.execute(
                "INSERT INTO notifyq.jobs (task) VALUES ('t') RETURNING id"
            ).fetchone()
            assert job is not None
            await eventually(lambda: appetite.state == "hungry" and appetite.barriers_missed > 0)
            assert job[0] not in started
            producer.commit()
            committed = time.monotonic()
        await eventually(lambda: job[0] in started, within=10)
    assert worker.dispatcher.polls_with_work == 0
    assert started[job[0]] - committed < 2.0
