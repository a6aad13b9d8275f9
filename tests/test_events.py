"""Per-job events on notifyq_events (opt-in per queue), and the public channels
carrying only what the contract documents: the dispatchers' own messages travel
on notifyq_internal."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import psycopg
import pytest

import notifyq
from notifyq import JobContext, channels
from tests.conftest import query, serve_process, statuses, wait_until
from tests.helpers import eventually, listen_on, serving
from tests.test_cli import notifyq as notifyq_cli

EVENTS = channels.EVENTS
PUBLIC = (channels.JOBS, channels.STATUS, channels.PROGRESS, EVENTS)
LIMIT = 8000  # PostgreSQL refuses a payload of this many bytes or more
SENTINEL = "sentinel"


@contextmanager
def listening(dsn: str, *names: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        listen_on(conn, *names)
        yield conn


def received(
    listener: psycopg.Connection[Any], dsn: str, channel: str = EVENTS
) -> list[tuple[str, str]]:
    """(channel, payload) of everything that arrived before a sentinel sent now on
    `channel`: notifications are delivered in commit order, so once the sentinel is
    here nothing sent earlier is still on its way."""
    query(dsn, "SELECT pg_notify(%s, %s)", channel, SENTINEL)
    got: list[tuple[str, str]] = []
    for note in listener.notifies(timeout=20):
        if note.channel == channel and note.payload == SENTINEL:
            return got
        got.append((note.channel, note.payload))
    raise AssertionError(f"the sentinel never arrived; got {got[:5]}")


def events(listener: psycopg.Connection[Any], dsn: str) -> list[dict[str, Any]]:
    """The events received, each notification's array unpacked, in order."""
    found: list[dict[str, Any]] = []
    for channel, payload in received(listener, dsn):
        assert channel == EVENTS
        assert len(payload.encode()) < LIMIT
        batch = json.loads(payload)
        assert isinstance(batch, list) and batch
        found += batch
    return found


def status_event(
    job_id: int, status: str, previous: str | None, attempt: int, **where: str
) -> dict[str, Any]:
    return {
        "v": 1,
        "kind": "status",
        "id": job_id,
        "queue": where.get("queue", "default"),
        "task": where.get("task", "t"),
        "status": status,
        "previous": previous,
        "attempt": attempt,
    }


def test_events_are_off_by_default_and_switched_per_queue_from_the_cli(dsn: str) -> None:
    env = {"NOTIFYQ_DSN": dsn}
    assert notifyq_cli("events", env=env).stdout == "no queue has events on\n"
    with listening(dsn, EVENTS) as listener:
        query(dsn, "INSERT INTO notifyq.jobs (task, queue) VALUES ('t', 'a'), ('t', 'b')")
        assert events(listener, dsn) == []

        on = notifyq_cli("events", "on", "a", env=env)
        assert on.returncode == 0, on.stderr
        assert re.fullmatch(r"a: events on since \S+ \S+\n", on.stdout)
        assert notifyq_cli("events", "on", "a", env=env).returncode == 0  # idempotent
        ids = query(
            dsn, "INSERT INTO notifyq.jobs (task, queue) VALUES ('t', 'a'), ('t', 'b') RETURNING id"
        )
        assert events(listener, dsn) == [status_event(ids[0][0], "queued", None, 0, queue="a")]

        off = notifyq_cli("events", "off", "a", env=env)
        assert off.stdout == "no queue has events on\n"
        query(dsn, "INSERT INTO notifyq.jobs (task, queue) VALUES ('t', 'a')")
        assert events(listener, dsn) == []

    for args, message in (
        (["events", "on"], "name the queue: notifyq events on QUEUE"),
        (["events", "on", "Bad;Queue"], "invalid queue name"),
    ):
        bad = notifyq_cli(*args, env=env)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr  # usage errors
    # From SQL, the same switch.
    assert query(dsn, "SELECT notifyq.set_events('b', true)") == [(True,)]
    assert query(dsn, "SELECT queue FROM notifyq.queue_events") == [("b",)]
    assert query(dsn, "SELECT notifyq.set_events('b', false)") == [(False,)]
    assert query(dsn, "SELECT count(*) FROM notifyq.queue_events") == [(0,)]


def test_event_shapes_for_insert_status_changes_progress_and_dependencies(dsn: str) -> None:
    query(dsn, "SELECT notifyq.set_events('default', true)")
    with listening(dsn, EVENTS) as listener:
        [(first,)] = query(dsn, "INSERT INTO notifyq.jobs (task) VALUES ('t') RETURNING id")
        [(second,)] = query(
            dsn,
            "INSERT INTO notifyq.jobs (task, depends_on) VALUES ('t', ARRAY[%s::bigint])"
            " RETURNING id",
            first,
        )
        claim = (
            "UPDATE notifyq.jobs SET status = 'running', attempts = attempts + 1,"
            " claimed_by = 'me', lease_expires_at = now() + interval '1 minute',"
            " started_at = now() WHERE id = %s"
        )
        query(dsn, claim, first)
        report = "UPDATE notifyq.jobs SET progress = 40, progress_message = %s WHERE id = %s"
        query(dsn, report, 'a "b"', first)
        query(dsn, report, 'a "b"', first)  # no change: no event
        query(dsn, "UPDATE notifyq.jobs SET priority = 3")  # nor here
        # The outcome and the last report in one statement, as a completion writes them;
        # the dependent is released by the same statement.
        query(
            dsn,
            "UPDATE notifyq.jobs SET status = 'succeeded', finished_at = now(), progress = 100,"
            " progress_message = 'done', claimed_by = NULL, lease_expires_at = NULL"
            " WHERE id = %s",
            first,
        )
        with psycopg.connect(dsn) as conn:  # rolled back: no event
            conn.execute("UPDATE notifyq.jobs SET status = 'cancelled' WHERE id = %s", [second])
            conn.rollback()
        got = events(listener, dsn)
    progress = {"v": 1, "kind": "progress", "id": first, "queue": "default", "task": "t"}
    assert got == [
        status_event(first, "queued", None, 0),
        status_event(second, "waiting", None, 0),
        status_event(first, "running", "queued", 1),
        {**progress, "attempt": 1, "progress": 40, "message": 'a "b"'},
        {**progress, "attempt": 1, "progress": 100, "message": "done"},
        status_event(first, "succeeded", "running", 1),
        status_event(second, "queued", "waiting", 0),
    ]


def test_a_big_statement_packs_its_events_into_arrays_under_the_payload_limit(dsn: str) -> None:
    task = "t" + "x" * 199  # the longest task name: the longest status events
    count = 3000
    query(dsn, "SELECT notifyq.set_events('default', true)")
    with listening(dsn, EVENTS) as listener:
        inserted = query(
            dsn,
            "INSERT INTO notifyq.jobs (task) SELECT %s FROM generate_series(1, %s) RETURNING id",
            task,
            count,
        )
        notes = received(listener, dsn)
        # Progress messages of every length up to 200 characters, with characters JSON
        # escapes and multi-byte ones, so events differ in size: one UPDATE of them all.
        query(
            dsn,
            "UPDATE notifyq.jobs SET progress = id % 100, progress_message ="
            " left(repeat(E'\"\\\\é\\t€', 50), (id % 201)::int)",
        )
        updated = received(listener, dsn)
    ids = [row[0] for row in inserted]
    for batch, kind in ((notes, "status"), (updated, "progress")):
        assert max(len(payload.encode()) for _, payload in batch) < LIMIT
        unpacked: list[dict[str, Any]] = []
        sizes: list[int] = []
        for _, payload in batch:
            events = json.loads(payload)
            # The documented text, exactly: json_build_object's objects joined by ','.
            texts = [json.dumps(e, separators=(", ", " : "), ensure_ascii=False) for e in events]
            assert payload == "[" + ",".join(texts) + "]"
            unpacked += events
            sizes += [len(text.encode()) for text in texts]
        assert [e["id"] for e in unpacked] == ids  # every job once, in id order
        assert {e["kind"] for e in unpacked} == {kind}
        # As few notifications as the packing allows: an array is cut when its events
        # and commas would pass 7998 - (the statement's largest event) bytes.
        budget = 7998 - max(sizes)
        assert len(batch) <= math.ceil(sum(size + 1 for size in sizes) / budget)
    assert len(notes) > 50  # 3,000 events of ~330 bytes: many notifications


def test_a_served_job_reports_every_step_in_order(dsn: str) -> None:
    def progress(job_id: int) -> Any:
        return query(dsn, "SELECT progress FROM notifyq.jobs WHERE id = %s", job_id)[0][0]

    async def run() -> list[dict[str, Any]]:
        app = notifyq.App(dsn)

        @app.task(name="steps", queue="followed")
        async def steps(payload: Any, ctx: JobContext) -> str:
            for step in (25, 50, 75):
                ctx.progress(step, f"step {step}")
                # Reports are coalesced: wait until this one is written before the next.
                await eventually(lambda: progress(ctx.id) == step)  # noqa: B023
            ctx.progress(100, "done")
            return "ok"

        with listening(dsn, EVENTS) as listener:
            async with serving(app, dsn, queues=("followed",)):
                job = await app.enqueue(steps)
                assert await app.wait(job, timeout=20) == "ok"
            got = await anyio.to_thread.run_sync(events, listener, dsn)
        await app.aclose()
        return got

    query(dsn, "SELECT notifyq.set_events('followed', true)")
    got = anyio.run(run)
    where = {"queue": "followed", "task": "steps"}
    job = got[0]["id"]
    assert got[:2] == [
        status_event(job, "queued", None, 0, **where),
        status_event(job, "running", "queued", 1, **where),
    ]
    assert [(e["progress"], e["message"]) for e in got[2:-1]] == [
        (25, "step 25"),
        (50, "step 50"),
        (75, "step 75"),
        (100, "done"),
    ]
    assert got[-1] == status_event(job, "succeeded", "running", 1, **where)


def test_public_channels_carry_only_documented_payloads(dsn: str, tmp_path: Any) -> None:
    """A dispatcher's probe and a cap change go to notifyq_internal; what arrives on the
    public channels while a dispatcher starts, caps change and jobs run is exactly what
    the contract documents."""
    query(dsn, "SELECT notifyq.set_events('default', true)")
    log = tmp_path / "serve.log"
    with listening(dsn, *PUBLIC, channels.INTERNAL) as listener:
        with serve_process(dsn, app="tests.apps.secure:app", log=log) as proc:
            wait_until(lambda: "listener verified" in log.read_text(), message="the probe")
            query(
                dsn, "INSERT INTO notifyq.queue_limits (queue, max_running) VALUES ('default', 1)"
            )
            query(dsn, "UPDATE notifyq.queue_limits SET max_running = 2")
            query(dsn, "DELETE FROM notifyq.queue_limits")
            query(
                dsn,
                "INSERT INTO notifyq.jobs (task, payload) VALUES ('secure.chain', '{\"n\": 1}')",
            )
            wait_until(lambda: statuses(dsn) == {"succeeded": 2}, message="the jobs to run")
            assert proc.poll() is None, log.read_text()
        got = received(listener, dsn)
    internal = [p for c, p in got if c == channels.INTERNAL]
    assert [p for p in internal if p.startswith("limit:")] == ["limit:default"] * 3
    probes = [p for p in internal if p.startswith("notifyq-probe:")]
    assert probes and len(probes) + 3 == len(internal)
    public = [(c, p) for c, p in got if c != channels.INTERNAL]
    assert {c for c, _ in public} == {channels.JOBS, channels.STATUS, EVENTS}
    for channel, payload in public:
        if channel == channels.JOBS:
            assert re.fullmatch(r"[a-z0-9_][a-z0-9_-]{0,62}", payload), payload
        elif channel == channels.STATUS:
            assert set(json.loads(payload)) == {"queue", "status"}, payload
        else:
            for event in json.loads(payload):
                assert event["v"] == 1 and event["kind"] in ("status", "progress"), payload


def test_a_cap_change_still_reaches_the_dispatcher(dsn: str) -> None:
    """Moved to the internal channel, a lifted cap wakes a dispatcher that found its
    queue full at once, as before (a poll interval of an hour rules the poll out)."""

    async def run() -> None:
        app = notifyq.App(dsn)

        @app.task(name="capped")
        async def capped(payload: Any) -> None:
            pass

        query(dsn, "INSERT INTO notifyq.queue_limits (queue, max_running) VALUES ('default', 0)")
        async with serving(app, dsn, poll_interval=3600):
            await app.enqueue(capped)
            await eventually(lambda: statuses(dsn) == {"queued": 1})
            query(dsn, "DELETE FROM notifyq.queue_limits")
            await eventually(lambda: statuses(dsn) == {"succeeded": 1}, within=10)
        await app.aclose()

    anyio.run(run)


@pytest.mark.parametrize("statement", ["INSERT", "UPDATE"])
def test_an_empty_statement_sends_no_events(dsn: str, statement: str) -> None:
    query(dsn, "SELECT notifyq.set_events('default', true)")
    with listening(dsn, EVENTS) as listener:
        if statement == "INSERT":
            query(dsn, "INSERT INTO notifyq.jobs (task) SELECT 't' WHERE false")
        else:
            query(dsn, "UPDATE notifyq.jobs SET status = 'cancelled' WHERE false")
        assert events(listener, dsn) == []
