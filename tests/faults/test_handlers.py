"""Scenario 5: handlers that fail in every way, in a real `notifyq serve`.

A handler may raise, hang past its timeout, block the event loop, return
something no one could store, or kill the process running it.  None of it
may lose a job, run one twice without cause, or leave a dispatcher looping.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.apps.ledger import LEDGER_DDL
from tests.conftest import query, serve_process, statuses, wait_until

APP = "tests.apps.misbehaving:app"


@pytest.fixture
def ledger_dsn(dsn: str) -> str:
    query(dsn, LEDGER_DDL)
    return dsn


def events(dsn: str, event: str) -> list[tuple[int, int, int]]:
    return query(dsn, "SELECT job_id, attempt, pid FROM ledger WHERE event = %s ORDER BY at", event)


def insert(dsn: str, task: str, payload: str = "{}") -> int:
    rows = query(
        dsn, "INSERT INTO notifyq.jobs (task, payload) VALUES (%s, %s) RETURNING id", task, payload
    )
    return int(rows[0][0])


def test_raising_and_hanging_handlers_end_dead_after_their_attempts(
    ledger_dsn: str, tmp_path: Path
) -> None:
    dsn = ledger_dsn
    raised, hung = insert(dsn, "bad.raise"), insert(dsn, "bad.hang")
    good = insert(dsn, "ok.record")
    with serve_process(dsn, "--poll-interval", "0.5", app=APP, log=tmp_path / "serve.log") as p:
        wait_until(
            lambda: statuses(dsn) == {"dead": 2, "succeeded": 1}, message="two dead, one done"
        )
        assert p.poll() is None
    rows = dict(
        (r[0], r[1:]) for r in query(dsn, "SELECT id, attempts, last_error FROM notifyq.jobs")
    )
    assert rows[raised][0] == 2 and "RuntimeError: the handler failed on purpose" in rows[raised][1]
    assert rows[hung][0] == 2 and "ran past its 0.5s timeout" in rows[hung][1]
    assert rows[good][0] == 1
    assert sorted(j for j, _, _ in events(dsn, "ran")) == sorted([raised, raised, hung, hung, good])


def test_a_handler_blocking_the_event_loop_does_not_cost_other_jobs_their_lease(
    ledger_dsn: str, tmp_path: Path
) -> None:
    """The blocked dispatcher's leases are renewed from the keeper's own thread; a second
    dispatcher, rescuing every 0.5 s, would otherwise take the held job after 2 s."""
    dsn = ledger_dsn
    lease = 2.0
    options = ("--lease", str(lease), "--poll-interval", "0.5")
    log = tmp_path / "blocked.log"
    with serve_process(dsn, *options, app=APP, log=log) as blocked:
        held = insert(dsn, "bad.hold")
        wait_until(lambda: events(dsn, "started"), message="the held job to start")
        blocker = insert(dsn, "bad.block_loop", '{"seconds": 6}')
        wait_until(lambda: len(events(dsn, "started")) == 2, message="the loop to block")
        with serve_process(dsn, *options, app=APP, log=tmp_path / "rescuer.log"):
            # Three leases long, the loop stays blocked; the rescuer watches throughout.
            wait_until(lambda: events(dsn, "finished"), timeout=30, message="the block to end")
            query(dsn, "INSERT INTO release VALUES (%s)", held)
            wait_until(lambda: statuses(dsn) == {"succeeded": 2}, message="both to succeed")
    started = events(dsn, "started")
    assert {(j, a, p) for j, a, p in started} == {(held, 1, blocked.pid), (blocker, 1, blocked.pid)}
    assert query(dsn, "SELECT max(attempts), count(last_error) FROM notifyq.jobs") == [(1, 0)]
    assert "the event loop has not run for" in log.read_text()


def test_an_unserializable_return_value_does_not_harm_the_dispatcher(
    ledger_dsn: str, tmp_path: Path
) -> None:
    """Results are stored, so a value JSON cannot hold fails its own job (dead at once: the
    next attempt would return the same) and nothing else."""
    dsn = ledger_dsn
    with serve_process(dsn, app=APP, log=tmp_path / "serve.log") as p:
        bad = insert(dsn, "bad.unserializable")
        insert(dsn, "ok.record")
        wait_until(
            lambda: statuses(dsn) == {"succeeded": 1, "dead": 1},
            message="the good job to succeed and the bad one to die",
        )
        assert p.poll() is None
    assert len(events(dsn, "ran")) == 2
    (error,) = query(dsn, "SELECT last_error FROM notifyq.jobs WHERE id = %s", bad)[0]
    assert error.startswith("ResultError: task 'bad.unserializable' returned a value that cannot")


def test_a_poison_job_that_kills_its_process_ends_dead_without_a_crash_loop(
    ledger_dsn: str, tmp_path: Path
) -> None:
    """A supervisor restarts the dispatcher each time the job kills it; after the task's
    3 attempts the rescue sends the job dead and the dispatcher stays up."""
    dsn = ledger_dsn
    options = ("--lease", "1", "--poll-interval", "0.3")
    poison = insert(dsn, "bad.suicide")
    deaths = 0
    started = time.monotonic()
    while statuses(dsn) != {"dead": 1}:
        assert deaths <= 3, "the poison job killed more dispatchers than it has attempts"
        with serve_process(dsn, *options, app=APP, log=tmp_path / f"serve{deaths}.log") as p:
            wait_until(
                lambda: p.poll() is not None or statuses(dsn) == {"dead": 1},
                timeout=30,
                message="the dispatcher to die or the job to be dead",
            )
            if p.poll() is not None:
                deaths += 1
            else:
                # Dead now: this dispatcher survives and still runs other work.
                insert(dsn, "ok.record")
                wait_until(
                    lambda: statuses(dsn) == {"dead": 1, "succeeded": 1},
                    message="a good job after the poison",
                )
                assert p.poll() is None
                break
    assert deaths == 3
    assert [a for j, a, _ in events(dsn, "ran") if j == poison] == [1, 2, 3]
    attempts, error = query(
        dsn, "SELECT attempts, last_error FROM notifyq.jobs WHERE id = %s", poison
    )[0]
    # The crash ended the process's session, and its 1 s lease ran out about as soon: the
    # rescuer names whichever it saw first.
    assert attempts == 3 and error.startswith(
        ("attempt 3 lost: the database session", "attempt 3 lost: the lease")
    )
    print(f"poison job dead after {deaths} crashes in {time.monotonic() - started:.1f}s")
