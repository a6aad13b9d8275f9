"""Progress reports and checkpoints: written by the dispatcher running the job,
announced on notifyq_progress, shown by notifyq watch, handed to the next attempt."""

from __future__ import annotations

import json
import threading
from typing import Any

import anyio
import psycopg
import pytest

import notifyq
from notifyq import JobContext, OperationRefused, channels, watch
from notifyq.progress import Reports
from notifyq.store import Store
from tests.conftest import query, statuses
from tests.helpers import eventually, listen_on, serving

pytestmark = pytest.mark.anyio


def progress_of(dsn: str) -> list[tuple[Any, ...]]:
    return query(dsn, "SELECT progress, progress_message FROM notifyq.jobs")


async def test_progress_is_written_announced_and_shown_by_watch(dsn: str) -> None:
    app = notifyq.App(dsn)
    reported = anyio.Event()
    release = anyio.Event()

    @app.task(name="long")
    async def long(payload: Any, ctx: JobContext) -> None:
        for step in range(1, 101):  # a tight loop: coalesced, not 100 writes
            ctx.progress(step * 0.42, f"page {step}")
        reported.set()
        await release.wait()

    with psycopg.connect(dsn, autocommit=True) as listener:
        listen_on(listener, channels.PROGRESS)
        async with serving(app, dsn) as worker:
            job = await app.enqueue(long)
            await reported.wait()
            await eventually(lambda: progress_of(dsn) == [(42.0, "page 100")])
            snap = await watch.once(dsn)
            assert [(r.id, r.progress, r.message) for r in snap.running] == [
                (job, 42.0, "page 100")
            ]
            assert "42% page 100" in render_text(snap)
            release.set()
            await eventually(lambda: statuses(dsn) == {"succeeded": 1})
            assert worker.reports.written < 10
        notes = [json.loads(n.payload) for n in listener.notifies(timeout=1.0)]
    assert notes and notes[-1] == {
        "id": job,
        "queue": "default",
        "task": "long",
        "attempt": 1,
        "progress": 42.0,
        "message": "page 100",
    }
    await app.aclose()


def render_text(snap: watch.Snapshot) -> str:
    from rich.console import Console

    console = Console(width=120, record=True)
    console.print(watch.render(snap, 120))
    return console.export_text()


async def test_sync_handler_reports_progress_from_its_thread(dsn: str) -> None:
    app = notifyq.App(dsn)
    release = threading.Event()

    @app.task(name="sync")
    def sync(payload: Any, ctx: JobContext) -> None:
        ctx.progress(50, "half")
        release.wait(20)

    async with serving(app, dsn):
        await app.enqueue(sync)
        await eventually(lambda: progress_of(dsn) == [(50.0, "half")])
        release.set()
        await eventually(lambda: statuses(dsn) == {"succeeded": 1})
    await app.aclose()


async def test_the_last_report_before_returning_lands_with_the_outcome(dsn: str) -> None:
    """A report just before the handler returns would otherwise wait out the writer's gap
    and arrive after the outcome, which the fence then drops: reported 100, the row 80."""
    app = notifyq.App(dsn)

    @app.task(name="quick")
    async def quick(payload: Any, ctx: JobContext) -> None:
        ctx.progress(80, "almost")
        ctx.progress(100, "done")

    @app.task(name="quick_sync")
    def quick_sync(payload: Any, ctx: JobContext) -> None:
        ctx.progress(80, "almost")
        ctx.progress(100, "done")

    async with serving(app, dsn, concurrency=10):
        await app.enqueue_many(quick, [{}] * 50)
        await app.enqueue_many(quick_sync, [{}] * 50)
        await eventually(lambda: statuses(dsn) == {"succeeded": 100})
    rows = query(
        dsn,
        "SELECT task, progress, progress_message, count(*) FROM notifyq.jobs"
        " GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
    )
    assert rows == [("quick", 100.0, "done", 50), ("quick_sync", 100.0, "done", 50)]
    await app.aclose()


async def test_a_failed_attempts_last_report_lands_with_its_retry_or_death(dsn: str) -> None:
    app = notifyq.App(dsn)

    @app.task(name="fails", max_attempts=1)
    async def fails(payload: Any, ctx: JobContext) -> None:
        ctx.progress(30, "step 3 of 10")
        raise RuntimeError("step 4 failed")

    @app.task(name="retries", max_attempts=2, backoff=notifyq.Backoff(base=3600))
    def retries(payload: Any, ctx: JobContext) -> None:
        ctx.progress(60, "step 6 of 10")
        raise RuntimeError("step 7 failed")

    async with serving(app, dsn):
        dead = await app.enqueue(fails)
        queued = await app.enqueue(retries)
        await eventually(
            lambda: (
                query(
                    dsn,
                    "SELECT count(*) FROM notifyq.jobs WHERE attempts = 1 AND "
                    "status IN ('dead', 'queued')",
                )
                == [(2,)]
            )
        )
    assert query(
        dsn, "SELECT id, status, progress, progress_message FROM notifyq.jobs ORDER BY id"
    ) == [(dead, "dead", 30.0, "step 3 of 10"), (queued, "queued", 60.0, "step 6 of 10")]
    await app.aclose()


async def test_reports_are_kept_per_attempt_and_taken_once() -> None:
    """A handler abandoned at its timeout may still report while the job's next attempt
    runs here: neither report replaces the other, and each outcome takes its own."""
    # Nothing here reaches the database: a Store connects on its first statement.
    reports = Reports(Store("postgresql://unused@127.0.0.1:1/unused", "test"), "me")
    assert reports.take(7, 2) is None
    reports.progress(7, 2, 50.0, "attempt 2")
    reports.progress(7, 1, 10.0, "attempt 1, abandoned")
    assert reports.take(7, 2) == (50.0, "attempt 2")
    assert reports.take(7, 2) is None
    assert reports.take(7, 1) == (10.0, "attempt 1, abandoned")


def test_bad_progress_reports_are_refused_at_the_call() -> None:
    ctx = JobContext(1, "default", "t", 1, 5)
    for bad in (-1, 100.5, float("nan"), "50"):
        with pytest.raises(ValueError, match="progress must be a number from 0 to 100"):
            ctx.progress(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="a progress message must be a string"):
        ctx.progress(5, 7)  # type: ignore[arg-type]


async def test_next_attempt_resumes_from_the_saved_checkpoint(dsn: str) -> None:
    app = notifyq.App(dsn)
    seen: list[Any] = []

    @app.task(name="resumable", max_attempts=3, backoff=notifyq.Backoff(base=0.01))
    async def resumable(payload: Any, ctx: JobContext) -> dict[str, int]:
        seen.append(ctx.checkpoint)
        done = (ctx.checkpoint or {}).get("done", 0)
        for item in range(done, 10):
            if item == 4 and ctx.attempt == 1:
                raise RuntimeError("lost the connection to the API")
            await ctx.save_checkpoint({"done": item + 1})
        return {"items": 10}

    async with serving(app, dsn):
        job = await app.enqueue(resumable)
        assert await app.wait(job, timeout=20) == {"items": 10}
    assert seen == [None, {"done": 4}]
    assert query(dsn, "SELECT attempts, checkpoint FROM notifyq.jobs") == [(2, {"done": 10})]
    await app.aclose()


async def test_sync_handler_saves_a_checkpoint(dsn: str) -> None:
    app = notifyq.App(dsn)

    @app.task(name="sync")
    def sync(payload: Any, ctx: JobContext) -> None:
        ctx.save_checkpoint_sync({"cursor": "abc"})

    async with serving(app, dsn):
        job = await app.enqueue(sync)
        await app.wait(job, timeout=20)
    assert query(dsn, "SELECT checkpoint FROM notifyq.jobs") == [({"cursor": "abc"},)]
    await app.aclose()


async def test_a_checkpoint_holding_nan_is_refused_not_stored_as_null(dsn: str) -> None:
    app = notifyq.App(dsn)
    errors: list[ValueError] = []

    @app.task(name="t")
    async def t(payload: Any, ctx: JobContext) -> None:
        await ctx.save_checkpoint({"done": 1, "rate": 0.5})
        try:
            await ctx.save_checkpoint({"done": 2, "rate": float("nan")})
        except ValueError as exc:
            errors.append(exc)

    async with serving(app, dsn):
        job = await app.enqueue(t)
        await app.wait(job, timeout=20)
    assert len(errors) == 1
    assert str(errors[0]).startswith("a checkpoint must be JSON: JSON has no NaN or Infinity")
    assert "['rate'] is nan" in str(errors[0])
    assert query(dsn, "SELECT checkpoint FROM notifyq.jobs") == [({"done": 1, "rate": 0.5},)]
    await app.aclose()


async def test_checkpoint_of_an_attempt_that_lost_the_job_is_refused(dsn: str) -> None:
    app = notifyq.App(dsn)
    started = anyio.Event()
    proceed = anyio.Event()
    errors: list[BaseException] = []

    @app.task(name="t")
    def t(payload: Any, ctx: JobContext) -> None:
        anyio.from_thread.run_sync(started.set)
        ctx.cancelled.wait(20)
        anyio.from_thread.run(proceed.wait)
        try:
            ctx.save_checkpoint_sync({"late": True})
        except OperationRefused as exc:
            errors.append(exc)
        try:
            ctx.save_checkpoint_sync({"x": object()})
        except ValueError as exc:
            errors.append(exc)

    async with serving(app, dsn):
        job = await app.enqueue(t)
        await started.wait()
        await app.cancel(job)
        proceed.set()
        await eventually(lambda: len(errors) == 2)
    assert "no longer holds the job" in str(errors[0])
    assert "a checkpoint must be JSON" in str(errors[1])
    assert query(dsn, "SELECT status, checkpoint FROM notifyq.jobs") == [("cancelled", None)]
    await app.aclose()
