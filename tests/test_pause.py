"""Pausing a queue or one task of it (notifyq.queue_pauses): every claim refuses the paused
work on every dispatcher and SQL worker, running jobs finish, the cap is kept, and a resume
wakes the dispatchers at once (their poll is an hour away in these tests)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import psycopg
import pytest
from rich.console import Console

import notifyq
from notifyq import admin, health, watch
from tests.conftest import REPO, query, statuses
from tests.helpers import eventually, serving

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def two(app: notifyq.App, dsn: str, **settings: Any) -> AsyncIterator[list[notifyq.Worker]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(serving(app, dsn, **settings)) for _ in range(2)]


def sql_claim(dsn: str, queue: str) -> list[tuple[Any, ...]]:
    """What a SQL worker's claim gets (rolled back: it only looks)."""
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction(force_rollback=True):
        return conn.execute(
            "SELECT id FROM notifyq.claim('sql-worker', ARRAY[%s], 10)", (queue,)
        ).fetchall()


async def test_pause_starts_nothing_on_either_dispatcher_and_resume_runs_at_once(
    dsn: str,
) -> None:
    app = notifyq.App(dsn)
    release = anyio.Event()
    started: list[int] = []

    @app.task(name="hold", queue="q")
    async def hold(payload: Any, ctx: notifyq.JobContext) -> None:
        started.append(ctx.id)
        await release.wait()

    async with two(app, dsn, concurrency=2, poll_interval=3600) as workers:
        query(
            dsn,
            "INSERT INTO notifyq.jobs (task, queue) SELECT 'hold', 'q' FROM generate_series(1, 10)",
        )
        await eventually(lambda: statuses(dsn) == {"running": 4, "queued": 6})
        assert await app.pause("q") is True
        assert await app.pause("q") is False  # already paused
        release.set()
        # The running jobs finish; each dispatcher's freed slots claim again, and the claim
        # finds the queue without room (paused): it is among their full queues.  Before the
        # pause no claim said so (the queue has no cap).
        await eventually(lambda: statuses(dsn) == {"succeeded": 4, "queued": 6})
        await eventually(lambda: all(w.dispatcher.full == {"q"} for w in workers))
        assert len(started) == 4
        assert sql_claim(dsn, "q") == []  # nor does a SQL worker's claim take any
        assert query(dsn, "SELECT paused, paused_tasks FROM notifyq.queue_stats") == [(True, [])]
        assert await app.resume("q") is True
        assert await app.resume("q") is False
        # Only the resume's notification can wake them: the poll is an hour away.
        await eventually(lambda: statuses(dsn) == {"succeeded": 10})
        assert len(started) == 10
    await app.aclose()


async def test_a_paused_task_waits_while_the_queues_other_tasks_run(dsn: str) -> None:
    app = notifyq.App(dsn)
    ran: list[str] = []

    @app.task(name="a", queue="q")
    async def a(payload: Any) -> None:
        ran.append("a")

    @app.task(name="b", queue="q")
    async def b(payload: Any) -> None:
        ran.append("b")

    app.pause_sync("q", task="a")
    async with two(app, dsn, concurrency=3, poll_interval=3600):
        # a's jobs first: unpaused, they would be claimed before b's.
        query(
            dsn, "INSERT INTO notifyq.jobs (task, queue) SELECT 'a', 'q' FROM generate_series(1, 5)"
        )
        query(
            dsn, "INSERT INTO notifyq.jobs (task, queue) SELECT 'b', 'q' FROM generate_series(1, 5)"
        )
        await eventually(lambda: statuses(dsn) == {"succeeded": 5, "queued": 5})
        assert ran == ["b"] * 5
        assert query(dsn, "SELECT DISTINCT task FROM notifyq.jobs WHERE status = 'queued'") == [
            ("a",)
        ]
        assert query(dsn, "SELECT paused, paused_tasks FROM notifyq.queue_stats") == [
            (False, ["a"])
        ]
        assert sql_claim(dsn, "q") == []
        assert app.resume_sync("q") is False  # the queue itself was never paused
        assert app.resume_sync("q", task="a") is True
        await eventually(lambda: statuses(dsn) == {"succeeded": 10})
    await app.aclose()


async def test_the_cap_survives_pause_and_resume(dsn: str) -> None:
    app = notifyq.App(dsn)
    running = peak = 0

    @app.task(name="t", queue="capped")
    async def t(payload: Any) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.02)  # long enough for claims to overlap it
        running -= 1

    admin.set_queue_limit(dsn, "capped", 2)
    await app.pause("capped")
    assert admin.queue_limits(dsn) == [{"queue": "capped", "max_running": 2, "running": 0}]
    async with two(app, dsn, concurrency=5, poll_interval=3600) as workers:
        query(
            dsn,
            "INSERT INTO notifyq.jobs (task, queue)"
            " SELECT 't', 'capped' FROM generate_series(1, 20)",
        )
        await eventually(lambda: all(w.dispatcher.full == {"capped"} for w in workers))
        assert statuses(dsn) == {"queued": 20}
        await app.resume("capped")
        await eventually(lambda: statuses(dsn) == {"succeeded": 20})
    assert peak == 2  # 10 free slots, the cap of 2 held after the resume
    assert admin.queue_limits(dsn)[0]["max_running"] == 2
    await app.aclose()


async def test_until_empty_ends_with_a_paused_queue_left(dsn: str) -> None:
    app = notifyq.App(dsn)

    @app.task(name="t", queue="p")
    async def t(payload: Any) -> None:
        pass

    await app.enqueue("t", {})
    await app.pause("p")
    worker = app.worker(notifyq.Settings(until_empty=True), dsn=dsn)
    with anyio.fail_after(20):
        await worker.run()
    assert worker.dispatcher.stopped_by == "until-empty"
    assert statuses(dsn) == {"queued": 1}
    await app.aclose()


async def test_watch_health_and_metrics_show_what_is_paused(dsn: str) -> None:
    admin.pause_queue(dsn, "quiet")
    admin.pause_queue(dsn, "busy", "send")
    query(dsn, "INSERT INTO notifyq.jobs (task, queue) VALUES ('t', 'busy'), ('send', 'busy')")
    snap = await watch.once(dsn)
    rows = {q.queue: q for q in snap.queues}
    assert rows["quiet"].paused and "paused" in rows["quiet"].alerts  # shown though empty
    assert not rows["busy"].paused and rows["busy"].paused_tasks == ["send"]
    console = Console(width=120, record=True)
    console.print(watch.render(snap, 120))
    assert "quiet (paused)" in console.export_text()
    check = next(c for c in health.check(dsn).checks if c.name == "paused")
    assert check.status == health.OK
    assert "queue 'quiet'" in check.message and "task 'send' of queue 'busy'" in check.message
    assert check.details["paused"][0] == {
        "queue": "busy",
        "task": "send",
        "paused_seconds": check.details["paused"][0]["paused_seconds"],
        "ready": 1,
        "more": False,
    }
    prometheus = pytest.importorskip("prometheus_client", reason="the metrics extra")
    from notifyq.metrics import Figures, Metrics

    metrics = Metrics(dsn, lambda: Figures(0, 0, 0, 0, 0, 0, 0, 0, 1.0, None, True))
    metrics.refresh()
    scraped = prometheus.generate_latest(metrics.registry).decode()
    metrics.close()
    assert 'notifyq_queue_paused{queue="quiet",task="*"} 1.0' in scraped
    assert 'notifyq_queue_paused{queue="busy",task="send"} 1.0' in scraped


def cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "notifyq", *args, "--dsn", dsn],
        cwd=REPO,
        capture_output=True,
        text=True,
    )


def test_pause_and_resume_commands(dsn: str) -> None:
    assert cli(dsn, "pause").stdout == "nothing is paused\n"
    assert cli(dsn, "pause", "mail").stdout == (
        "mail: paused (running jobs finish; nothing new starts)\n"
    )
    assert cli(dsn, "pause", "mail").stdout == "mail: already paused\n"
    assert cli(dsn, "pause", "mail", "--task", "send.bulk").stdout.startswith(
        "mail: task send.bulk: paused"
    )
    listed = cli(dsn, "pause").stdout.splitlines()
    assert [line.split(": paused since")[0] for line in listed] == ["mail", "mail: task send.bulk"]
    assert all(line.endswith("(0 ready)") for line in listed)
    assert cli(dsn, "resume", "mail").stdout == "mail: resumed\n"
    assert cli(dsn, "resume", "mail").stdout == (
        "mail: was not paused (its tasks paused on their own: send.bulk; use --task)\n"
    )
    assert cli(dsn, "resume", "mail", "--task", "send.bulk").stdout == (
        "mail: task send.bulk: resumed\n"
    )
    assert query(dsn, "SELECT count(*) FROM notifyq.queue_pauses") == [(0,)]


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("pause", "Bad Queue"), "invalid queue name 'Bad Queue'"),
        (("pause", "mail", "--task", "no spaces"), "invalid task name 'no spaces'"),
        (("pause", "--task", "t"), "name the queue: notifyq pause QUEUE --task TASK"),
        (("resume",), "Missing argument 'QUEUE'"),
        (("resume", "-x"), "No such option '-x'"),
    ],
)
def test_pause_and_resume_refuse_bad_input_before_connecting(
    args: tuple[str, ...], said: str
) -> None:
    # An unreachable DSN: the refusal comes before any connection.
    done = cli("postgresql://nobody@127.0.0.1:1/none", *args)
    assert done.returncode == 2, done.stderr
    assert said in done.stderr


def test_sql_functions_refuse_a_missing_queue_and_bad_names(dsn: str) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="name the queue to pause"):
        query(dsn, "SELECT notifyq.pause_queue(NULL)")
    with pytest.raises(psycopg.errors.CheckViolation, match="queue_pauses_task_format"):
        query(dsn, "SELECT notifyq.pause_queue('q', 'bad task')")
    # Plain SQL works too: the task defaults to '*', the whole queue.
    query(dsn, "INSERT INTO notifyq.queue_pauses (queue) VALUES ('q')")
    assert query(dsn, "SELECT notifyq.resume_queue('q')") == [(True,)]
