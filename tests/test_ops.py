"""Operations: the admin SQL functions from plain SQL and through the CLI, against live
dispatchers, and the dispatcher registry (running, stopped, lost)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from notifyq import channels
from tests.apps.ledger import LEDGER_DDL
from tests.conftest import REPO, query, serve_process, wait_until

FUNCTIONS = ("retry_job", "retry_dead", "cancel_job", "purge", "lock_job")


def notifyq(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "notifyq", *args, "--dsn", dsn],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "100"},
    )


def insert(dsn: str, values: str) -> list[int]:
    """Rows of (queue, task, status, attempts, finished_at, last_error, claimed_by, lease)."""
    rows = query(
        dsn,
        "INSERT INTO notifyq.jobs (queue, task, status, attempts, finished_at, last_error,"
        f" claimed_by, lease_expires_at, started_at) SELECT *, now() FROM (VALUES {values})"
        " AS v RETURNING id",
    )
    return [r[0] for r in rows]


def job(dsn: str, job_id: int) -> dict[str, object]:
    with psycopg.connect(dsn) as conn:
        cur = conn.execute("SELECT * FROM notifyq.jobs WHERE id = %s", (job_id,))
        names = [d.name for d in cur.description or ()]
        row = cur.fetchone()
    return dict(zip(names, row, strict=True)) if row else {}


RUNNING = "('default', 'x.y', 'running', 1, NULL::timestamptz, NULL, 'h:1:a', now() + '1h')"
QUEUED = "('default', 'x.y', 'queued', 0, NULL::timestamptz, NULL, NULL, NULL::timestamptz)"


def test_retry_and_cancel_from_plain_sql(dsn: str) -> None:
    dead, running, succeeded, queued = insert(
        dsn,
        "('default', 'x.y', 'dead', 5, now(), 'boom', NULL, NULL::timestamptz),"
        f" {RUNNING}, ('default', 'x.y', 'succeeded', 1, now(), NULL, NULL, NULL), {QUEUED}",
    )
    assert query(dsn, "SELECT notifyq.retry_job(%s)", dead) == [("dead",)]
    row = job(dsn, dead)
    assert (row["status"], row["attempts"], row["last_error"], row["finished_at"]) == (
        "queued",
        0,
        "boom",
        None,
    )
    with pytest.raises(psycopg.errors.NoDataFound) as caught:
        query(dsn, "SELECT notifyq.retry_job(987654)")
    assert caught.value.diag.message_primary == "notifyq: no job with id 987654"
    assert caught.value.diag.message_hint == "List jobs with: notifyq jobs list"
    for busy, hint in ((running, "cancel it first"), (succeeded, "enqueue a new job")):
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as caught:
            query(dsn, "SELECT notifyq.retry_job(%s)", busy)
        assert hint in (caught.value.diag.message_hint or "")

    assert query(dsn, "SELECT notifyq.cancel_job(%s)", queued) == [("queued",)]
    assert query(dsn, "SELECT notifyq.cancel_job(%s)", running) == [("running",)]
    row = job(dsn, running)
    assert (row["status"], row["claimed_by"], row["lease_expires_at"]) == ("cancelled", None, None)
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="already cancelled"):
        query(dsn, "SELECT notifyq.cancel_job(%s)", queued)
    # A job waiting for a retry's backoff runs now, its attempts kept.
    (waiting,) = insert(
        dsn, QUEUED.replace("0, NULL::timestamptz, NULL,", "2, NULL::timestamptz, 'err',")
    )
    query(dsn, "UPDATE notifyq.jobs SET run_at = now() + interval '1 hour' WHERE id = %s", waiting)
    assert query(dsn, "SELECT notifyq.retry_job(%s)", waiting) == [("queued",)]
    assert query(
        dsn, "SELECT attempts, run_at <= now(), last_error FROM notifyq.jobs WHERE id = %s", waiting
    ) == [(2, True, "err")]
    # A cancelled job can be retried: it starts again from attempt 1.
    assert query(dsn, "SELECT notifyq.retry_job(%s)", running) == [("cancelled",)]
    assert job(dsn, running)["attempts"] == 0


def test_retry_dead_by_queue_and_task(dsn: str) -> None:
    dead = "('{q}', '{t}', 'dead', 3, now(), 'err', NULL, NULL::timestamptz)"
    insert(
        dsn,
        ", ".join(
            dead.format(q=q, t=t)
            for q, t in [("a", "t.1"), ("a", "t.2"), ("b", "t.1"), ("b", "t.1")]
        ),
    )
    assert query(dsn, "SELECT notifyq.retry_dead(queue => 'a', task => 't.1')") == [(1,)]
    assert query(dsn, "SELECT notifyq.retry_dead(task => 't.1')") == [(2,)]
    assert query(dsn, "SELECT notifyq.retry_dead()") == [(1,)]
    assert query(dsn, "SELECT notifyq.retry_dead()") == [(0,)]
    assert query(
        dsn,
        "SELECT count(*) FROM notifyq.jobs WHERE status = 'queued' AND attempts = 0"
        " AND last_error = 'err' AND finished_at IS NULL",
    ) == [(4,)]


def test_purge_deletes_old_finished_jobs_in_batches_and_never_the_queue(dsn: str) -> None:
    old = "now() - interval '2 days'"
    query(
        dsn,
        "INSERT INTO notifyq.jobs (task, status, finished_at)"
        f" SELECT 'x.y', 'succeeded', {old} FROM generate_series(1, 25000)",
    )
    query(
        dsn,
        "INSERT INTO notifyq.jobs (task, status, finished_at) VALUES"
        f" ('x.y', 'cancelled', {old}), ('x.y', 'dead', {old}), ('x.y', 'succeeded', now())",
    )
    queued, running = insert(dsn, f"{QUEUED}, {RUNNING}")
    # A dispatcher holds the queue's rows locked (as a claim does): purge must not wait.
    with psycopg.connect(dsn) as holder:
        holder.execute(
            "SELECT 1 FROM notifyq.jobs WHERE id IN (%s, %s) FOR UPDATE", (queued, running)
        )
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SET lock_timeout = '5s'")
            deleted = conn.execute("SELECT notifyq.purge(interval '1 day')").fetchone()
    assert deleted == (25001,)  # three batches of up to 10,000; the cancelled one too
    left = dict(query(dsn, "SELECT status, count(*) FROM notifyq.jobs GROUP BY status"))
    assert left == {"succeeded": 1, "dead": 1, "queued": 1, "running": 1}
    assert query(dsn, "SELECT notifyq.purge(interval '1 day', '{dead}')") == [(1,)]
    with pytest.raises(psycopg.errors.InvalidParameterValue) as caught:
        query(dsn, "SELECT notifyq.purge(interval '0', '{queued,succeeded}')")
    assert "queued and running jobs are the queue" in (caught.value.diag.message_hint or "")
    assert query(dsn, "SELECT notifyq.purge(interval '0')") == [(1,)]
    assert dict(query(dsn, "SELECT status, count(*) FROM notifyq.jobs GROUP BY status")) == {
        "queued": 1,
        "running": 1,
    }


def test_functions_are_documented_and_not_executable_by_public(dsn: str) -> None:
    rows = query(
        dsn,
        "SELECT p.proname, obj_description(p.oid, 'pg_proc'), p.proacl IS NOT NULL,"
        " EXISTS (SELECT 1 FROM aclexplode(p.proacl) a"
        "         WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE')"
        " FROM pg_proc p WHERE p.pronamespace = 'notifyq'::regnamespace"
        " AND p.proname = ANY(%s)",
        list(FUNCTIONS),
    )
    assert sorted(r[0] for r in rows) == sorted(FUNCTIONS)
    for name, comment, has_acl, public in rows:
        assert comment, name
        assert has_acl and not public, name  # a NULL acl would mean PUBLIC may execute


@pytest.fixture
def ledger_dsn(dsn: str) -> str:
    query(dsn, LEDGER_DDL)
    return dsn


def ran(dsn: str, job_id: int) -> list[tuple[object, ...]]:
    return query(dsn, "SELECT attempt, event FROM ledger WHERE job_id = %s", job_id)


def test_retry_through_the_cli_runs_a_dead_job_again(ledger_dsn: str) -> None:
    dsn = ledger_dsn
    (dead,) = insert(
        dsn, "('default', 'ledger.record', 'dead', 5, now(), 'boom', NULL, NULL::timestamptz)"
    )
    (other,) = insert(
        dsn, "('default', 'ledger.record', 'dead', 5, now(), 'boom', NULL, NULL::timestamptz)"
    )
    with serve_process(dsn):
        done = notifyq(dsn, "retry", str(dead))
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"job {dead}: dead -> queued"
        wait_until(lambda: ran(dsn, dead), message="the retried job to run")
        assert ran(dsn, dead) == [(1, "ran")]  # attempts were reset: this is attempt 1
        done = notifyq(dsn, "retry", "--dead", "--task", "ledger.record")
        assert done.stdout.strip() == "re-queued 1 dead jobs"
        wait_until(lambda: ran(dsn, other), message="the other dead job to run")
        wait_until(lambda: job(dsn, other)["status"] == "succeeded", message="it to succeed")
        assert job(dsn, other)["last_error"] == "boom"  # kept from before
        done = notifyq(dsn, "retry", str(dead))
        assert done.returncode == 1
        assert done.stderr.strip() == (
            f"notifyq: error: job {dead} is succeeded: it cannot be retried "
            "(It has succeeded; enqueue a new job instead.)"
        )


def test_cancel_through_the_cli(ledger_dsn: str, tmp_path: Path) -> None:
    dsn = ledger_dsn
    (cancelled,) = insert(dsn, QUEUED.replace("'x.y'", "'ledger.record'"))
    done = notifyq(dsn, "cancel", str(cancelled))
    assert (done.returncode, done.stdout.strip()) == (0, f"job {cancelled}: queued -> cancelled")
    log = tmp_path / "serve.log"
    with serve_process(dsn, log=log):
        (held,) = insert(dsn, QUEUED.replace("'x.y'", "'ledger.hold'"))
        query(dsn, "SELECT pg_notify(%s, 'default')", channels.JOBS)
        wait_until(lambda: ran(dsn, held), message="the held job to start")
        done = notifyq(dsn, "cancel", str(held))
        assert done.stdout.strip() == (
            f"job {held}: running -> cancelled (the dispatcher running it interrupts its handler)"
        )
        # A sync handler cannot be interrupted: it is told (JobContext.cancelled), and this
        # one ignores that and runs until released; its outcome is then not written.
        query(dsn, "INSERT INTO release VALUES (%s)", held)
        wait_until(
            lambda: f"cancelled job={held} ".encode() in log.read_bytes(),
            message="the cancelled attempt's log line",
        )
        assert b"not written" not in log.read_bytes()
    assert ran(dsn, cancelled) == []  # claimed before the held job, had it been queued
    assert ran(dsn, held) == [(1, "started"), (1, "finished")]
    assert job(dsn, held)["status"] == "cancelled"
    done = notifyq(dsn, "cancel", "987654")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        "notifyq: error: no job with id 987654 (List jobs with: notifyq jobs list)\n"
    )


def test_jobs_list_show_and_purge_through_the_cli(dsn: str) -> None:
    (dead,) = insert(
        dsn,
        "('mail', 'mail.send', 'dead', 5, now() - interval '3 days',"
        " E'SMTPError: refused\\n\\nTraceback (most recent call last):\\n  line 1',"
        " NULL, NULL::timestamptz)",
    )
    insert(dsn, f"{QUEUED}, {QUEUED}")
    done = notifyq(dsn, "jobs", "list", "--status", "dead")
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and lines[1].split()[:4] == [str(dead), "mail", "mail.send", "dead"]
    assert lines[1].endswith("SMTPError: refused")
    assert len(notifyq(dsn, "jobs", "list", "--limit", "2").stdout.splitlines()) == 3
    done = notifyq(dsn, "jobs", "show", str(dead))
    assert "status:           dead" in done.stdout
    assert "Traceback (most recent call last):\n  line 1\nhistory:\n" in done.stdout
    assert done.stdout.splitlines()[-1].split()[2:] == ["inserted", "->", "dead", "attempt", "5"]
    done = notifyq(dsn, "purge", "--older-than", "2d", "--status", "dead")
    assert done.stdout.strip() == "purged 1 jobs (dead) finished over 2d ago"
    done = notifyq(dsn, "purge", "--older-than", "soon")
    assert done.returncode == 2 and "not a duration" in done.stderr  # a usage error
    assert query(dsn, "SELECT count(*) FROM notifyq.jobs") == [(2,)]
    done = notifyq(dsn, "stats", "--json")
    assert json.loads(done.stdout)["queues"][0]["ready"] == 2


def registry(dsn: str, pid: int) -> str | None:
    rows = query(dsn, "SELECT state FROM notifyq.dispatcher_status WHERE pid = %s", pid)
    return rows[0][0] if rows else None


def test_registry_running_stopped_and_lost(dsn: str) -> None:
    query(
        dsn,
        "INSERT INTO notifyq.dispatchers (claimant, host, pid, queues, concurrency, heartbeat,"
        " started_at, heartbeat_at, stopped_at)"
        " SELECT claimant, 'gone', pid, '{default}', 1, 10, now() - interval '3 days',"
        "        now() - interval '2 days', stopped"
        " FROM (VALUES ('gone:1:a', 1, NULL), ('gone:2:b', 2, now() - interval '2 days'))"
        "      AS v(claimant, pid, stopped)",
    )
    with serve_process(dsn, "--lease", "3", "--concurrency", "4") as proc:
        wait_until(lambda: registry(dsn, proc.pid) == "running", message="registered")
        row = query(
            dsn,
            "SELECT host, queues, concurrency, heartbeat FROM notifyq.dispatchers WHERE pid = %s",
            proc.pid,
        )[0]
        assert row[1:] == (["default"], 4, 1.0)
        # Day-old rows of stopped and lost dispatchers went with the first heartbeat.
        assert query(dsn, "SELECT count(*) FROM notifyq.dispatchers WHERE host = 'gone'") == [(0,)]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert registry(dsn, proc.pid) == "stopped"
    with serve_process(dsn, "--lease", "3") as victim:
        wait_until(lambda: registry(dsn, victim.pid) == "running", message="registered")
        victim.kill()
        victim.wait()
        wait_until(lambda: registry(dsn, victim.pid) == "lost", message="lost after 3 heartbeats")
    env = {k: v for k, v in os.environ.items() if k != "NOTIFYQ_DSN"}
    done = subprocess.run(
        [sys.executable, "-m", "notifyq", "health", "--dsn", dsn],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout
    assert "WARNING: dispatchers: 1 dispatchers stopped sending heartbeats" in done.stdout
    assert f":{victim.pid})" in done.stdout
    snap = json.loads(notifyq(dsn, "watch", "--once", "--json").stdout)
    assert {d["pid"]: d["state"] for d in snap["dispatchers"]} == {
        proc.pid: "stopped",
        victim.pid: "lost",
    }
