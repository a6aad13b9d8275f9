"""The monitoring functions (notifyq.queue_health, failed_recent, stuck) and their Python
accessors in notifyq.admin: what each returns, on rows written by plain SQL."""

from __future__ import annotations

from notifyq import admin
from tests.conftest import query


def test_queue_health_counts_per_queue_and_says_paused(dsn: str) -> None:
    query(
        dsn,
        "INSERT INTO notifyq.jobs (queue, task, run_at) VALUES ('mail', 't', now()),"
        " ('mail', 't', now() - interval '10 seconds'), ('mail', 't', now() + interval '1 hour')",
    )
    query(
        dsn,
        "INSERT INTO notifyq.jobs (queue, task, status, attempts, last_error, started_at,"
        " finished_at) VALUES ('mail', 't', 'dead', 3, 'boom', now(), now())",
    )
    query(dsn, "SELECT notifyq.pause_queue('mail')")
    (row,) = query(
        dsn,
        "SELECT queue, ready, scheduled, running, dead, failed_1m, paused, oldest_ready >= 10"
        " FROM notifyq.queue_health() WHERE queue = 'mail'",
    )
    assert row == ("mail", 2, 1, 0, 1, 1, True, True)
    (health,) = admin.queue_health(dsn, ["mail"])
    assert (health["ready"], health["scheduled"], health["dead"], health["paused"]) == (
        2,
        1,
        1,
        True,
    )


def test_failed_recent_lists_failed_attempts_newest_first_with_the_whole_error(dsn: str) -> None:
    query(
        dsn,
        "INSERT INTO notifyq.jobs (task, status, attempts, last_error, started_at, finished_at)"
        " VALUES ('old', 'dead', 1, 'e1', now() - interval '2 hours', now()),"
        " ('dead', 'dead', 3, E'Traceback\\nline 2', now() - interval '1 minute', now()),"
        " ('retry', 'queued', 1, 'e3', now(), NULL),"
        " ('fine', 'succeeded', 2, 'e4', now(), now())",
    )
    rows = query(dsn, "SELECT task, status, error FROM notifyq.failed_recent()")
    assert rows == [("retry", "queued", "e3"), ("dead", "dead", "Traceback\nline 2")]
    assert query(dsn, "SELECT count(*) FROM notifyq.failed_recent(interval '3 hours', 1)") == [(1,)]
    listed = admin.failed_recent(dsn, within=3 * 3600)
    assert [f["task"] for f in listed] == ["retry", "dead", "old"]


def test_stuck_finds_expired_leases_and_long_runners(dsn: str) -> None:
    query(
        dsn,
        "INSERT INTO notifyq.jobs (task, status, attempts, started_at, claimed_by,"
        " lease_expires_at) VALUES"
        " ('lost', 'running', 1, now() - interval '1 minute', 'd1', now() - interval '5 seconds'),"
        " ('long', 'running', 1, now() - interval '2 hours', 'd2', now() + interval '30 seconds'),"
        " ('fine', 'running', 1, now() - interval '1 minute', 'd3', now() + interval '30 seconds')",
    )
    rows = query(dsn, "SELECT task, lease_expired FROM notifyq.stuck()")
    assert rows == [("long", False), ("lost", True)]
    longer = query(dsn, "SELECT task FROM notifyq.stuck(interval '30 seconds')")
    assert sorted(task for (task,) in longer) == ["fine", "long", "lost"]
    found = admin.stuck(dsn, longer_than=3600)
    assert [(s["task"], s["lease_expired"]) for s in found] == [("long", False), ("lost", True)]
    assert found[0]["running_for"] >= 7200
