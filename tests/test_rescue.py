"""notifyq.rescue_jobs, the rule itself: a dispatcher is taken for dead through its
session only when its liveness lock is free AND it has shown no sign of life (a beat
in alive_at, or a claim) for the session grace; the lease is the backstop.

Each case sets up a registry row and running jobs by hand and holds (or not) the
claimant's liveness lock on a connection of its own, so nothing here is timing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest

from tests.conftest import query

GRACE = "2 seconds"


def dispatcher(dsn: str, claimant: str, *, alive_ago: str | None, lock: bool = True) -> None:
    query(
        dsn,
        "INSERT INTO notifyq.dispatchers (claimant, host, pid, queues, concurrency, heartbeat,"
        " liveness_lock, alive_at) VALUES (%s, 'h', 1, '{default}', 1, 10, %s,"
        " now() - %s::interval)",
        claimant,
        lock,
        alive_ago,
    )


def running(
    dsn: str, claimant: str, *, started_ago: str = "1 minute", lease_in: str = "1 hour", **kw: Any
) -> int:
    attempts = kw.get("attempts", 1)
    return int(
        query(
            dsn,
            "INSERT INTO notifyq.jobs (task, status, attempts, max_attempts, started_at,"
            " claimed_by, lease_expires_at) VALUES ('t', 'running', %s, %s,"
            " now() - %s::interval, %s, now() + %s::interval) RETURNING id",
            attempts,
            kw.get("max_attempts", 5),
            started_ago,
            claimant,
            lease_in,
        )[0][0]
    )


def rescue(
    dsn: str, me: str = "me", *, trust: bool = True, restart_grace: str = "0 seconds"
) -> tuple[list[tuple[int, str, str]], int]:
    rows = query(
        dsn,
        "SELECT id, status, cause, watched FROM notifyq.rescue_jobs(%s, %s::interval,"
        " %s::interval, %s, 1000)",
        me,
        GRACE,
        restart_grace,
        trust,
    )
    return [(r[0], r[1], r[2]) for r in rows if r[0] is not None], rows[-1][3]


@contextmanager
def liveness_held(dsn: str, claimant: str) -> Iterator[None]:
    """The claimant's liveness lock, held by a session of the test's (as its listener would)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(28274, hashtext(%s))", (claimant,))
        yield


def test_a_free_lock_and_no_sign_of_life_is_a_dead_dispatcher(dsn: str) -> None:
    dispatcher(dsn, "x", alive_ago="10 seconds")
    job = running(dsn, "x")
    assert rescue(dsn) == ([(job, "queued", "session")], 0)
    status, attempts, error = query(
        dsn, "SELECT status, attempts, last_error FROM notifyq.jobs WHERE id = %s", job
    )[0]
    assert (status, attempts) == ("queued", 1)
    assert error.startswith("attempt 1 lost: the database session of dispatcher x ended")


def test_a_held_lock_keeps_a_silent_dispatcher_alive(dsn: str) -> None:
    """Frozen (SIGSTOP, a long pause): its session is open, only the lease may tell."""
    dispatcher(dsn, "x", alive_ago="10 minutes")
    running(dsn, "x")
    with liveness_held(dsn, "x"):
        assert rescue(dsn) == ([], 0)  # nothing to sweep for soon: the lease will tell


def test_a_recent_beat_keeps_a_dispatcher_without_its_lock_alive(dsn: str) -> None:
    """Its listening connection dropped (or never got the lock): the keeper still beats."""
    dispatcher(dsn, "x", alive_ago="0.5 seconds")
    running(dsn, "x")
    assert rescue(dsn) == ([], 1)


def test_a_recent_claim_is_a_sign_of_life(dsn: str) -> None:
    """A dispatcher that never beat yet but has just claimed keeps all its jobs."""
    dispatcher(dsn, "x", alive_ago=None)
    running(dsn, "x", started_ago="10 minutes")
    running(dsn, "x", started_ago="0.5 seconds")
    assert rescue(dsn) == ([], 1)


@pytest.mark.parametrize(
    ("trust", "restart_grace"),
    [(False, "0 seconds"), (True, "1000 years")],
    ids=["own-connection-just-back", "server-just-started"],
)
def test_sessions_are_not_trusted_right_after_an_outage(
    dsn: str, trust: bool, restart_grace: str
) -> None:
    dispatcher(dsn, "x", alive_ago="10 minutes")
    running(dsn, "x")
    assert rescue(dsn, trust=trust, restart_grace=restart_grace) == ([], 1)


def test_the_rescuer_never_rescues_itself_nor_a_dispatcher_without_liveness(dsn: str) -> None:
    dispatcher(dsn, "me", alive_ago="10 minutes")
    dispatcher(dsn, "no-listen", alive_ago="10 minutes", lock=False)
    running(dsn, "me")
    running(dsn, "no-listen")
    assert rescue(dsn) == ([], 0)


def test_the_lease_is_the_backstop_whatever_the_session(dsn: str) -> None:
    dispatcher(dsn, "x", alive_ago="0 seconds")
    job = running(dsn, "x", lease_in="-1 second")
    last = running(dsn, "x", lease_in="-1 second", attempts=3, max_attempts=3)
    with liveness_held(dsn, "x"):
        jobs, _ = rescue(dsn)
    assert sorted(jobs) == [(job, "queued", "lease"), (last, "dead", "lease")]


def test_a_rescuer_checking_a_claimant_makes_another_skip_it_and_change_nothing(
    dsn: str,
) -> None:
    dispatcher(dsn, "x", alive_ago="10 seconds")
    job = running(dsn, "x")
    with psycopg.connect(dsn) as first:  # a rescuer inside its statement: lock tried, held
        first.execute("SELECT pg_try_advisory_xact_lock(28274, hashtext('x'))")
        assert rescue(dsn, "other") == ([], 0)  # the other rescuer has it
        assert query(dsn, "SELECT status FROM notifyq.jobs WHERE id = %s", job) == [("running",)]
        first.rollback()
    assert rescue(dsn, "other") == ([(job, "queued", "session")], 0)
