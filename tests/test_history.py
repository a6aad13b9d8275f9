"""The status history (notifyq.job_history) and retention (serve deletes old finished jobs)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import anyio
import pytest

import notifyq
from notifyq import DoNotRetry, admin
from tests.conftest import REPO, query, statuses
from tests.helpers import serving

pytestmark = pytest.mark.anyio


def history(dsn: str, job_id: int) -> list[tuple[Any, ...]]:
    return query(
        dsn,
        "SELECT from_status, to_status, attempt, coalesce(split_part(error, E'\\n', 1), ''), "
        "dispatcher IS NOT NULL FROM notifyq.job_history WHERE job_id = %s ORDER BY id",
        job_id,
    )


async def test_every_transition_is_recorded_with_attempt_error_and_dispatcher(dsn: str) -> None:
    app = notifyq.App(dsn)

    @app.task(name="flaky", max_attempts=3, backoff=notifyq.Backoff(base=0.01))
    async def flaky(payload: Any, ctx: notifyq.JobContext) -> None:
        if ctx.attempt == 1:
            raise RuntimeError("first try fails")
        if payload.get("give_up"):
            raise DoNotRetry("no point")

    async with serving(app, dsn):
        ok = await app.enqueue(flaky)
        dead = await app.enqueue(flaky, {"give_up": True})
        await app.wait(ok, timeout=20)
        with pytest.raises(notifyq.JobFailed):
            await app.wait(dead, timeout=20)
    assert history(dsn, ok) == [
        (None, "queued", 0, "", False),
        ("queued", "running", 1, "", True),
        ("running", "queued", 1, "RuntimeError: first try fails", True),
        ("queued", "running", 2, "", True),
        ("running", "succeeded", 2, "", True),
    ]
    assert history(dsn, dead)[-1] == ("running", "dead", 2, "DoNotRetry: no point", True)
    # A plain SQL change is recorded too: the audit trail does not depend on notifyq.
    query(dsn, "UPDATE notifyq.jobs SET status = 'queued', attempts = 0 WHERE id = %s", dead)
    assert history(dsn, dead)[-1] == ("dead", "queued", 0, "", False)
    await app.aclose()


def test_history_can_be_switched_off_and_on(dsn: str) -> None:
    def notifyq_cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "notifyq", *args, "--dsn", dsn],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout

    assert notifyq_cli("history") == "history is on\n"
    assert notifyq_cli("history", "off") == "history is off\n"
    query(dsn, "INSERT INTO notifyq.jobs (task) VALUES ('t')")
    query(dsn, "UPDATE notifyq.jobs SET status = 'cancelled'")
    assert query(dsn, "SELECT count(*) FROM notifyq.job_history") == [(0,)]
    assert notifyq_cli("history", "on") == "history is on\n"
    query(dsn, "UPDATE notifyq.jobs SET status = 'queued'")
    assert query(dsn, "SELECT from_status, to_status FROM notifyq.job_history") == [
        ("cancelled", "queued")
    ]
    job_id = query(dsn, "SELECT id FROM notifyq.jobs")[0][0]
    shown = notifyq_cli("jobs", "show", str(job_id))
    assert "history:\n" in shown and "cancelled -> queued" in shown


def insert_finished(dsn: str, status: str, age: str, n: int = 1) -> None:
    query(
        dsn,
        "INSERT INTO notifyq.jobs (task, status, finished_at) "
        f"SELECT 't', %s, now() - interval '{age}' FROM generate_series(1, %s)",
        status,
        n,
    )


async def test_serve_deletes_finished_jobs_past_their_retention_only(dsn: str) -> None:
    insert_finished(dsn, "succeeded", "8 days", n=2500)  # more than one batch
    insert_finished(dsn, "succeeded", "6 days")
    insert_finished(dsn, "cancelled", "8 days")
    insert_finished(dsn, "dead", "8 days")
    insert_finished(dsn, "dead", "31 days")
    query(
        dsn,
        "INSERT INTO notifyq.jobs (task, queue) VALUES ('t', 'idle')",
    )
    assert query(dsn, "SELECT count(*) FROM notifyq.job_history") == [(2505,)]
    app = notifyq.App(dsn)
    async with serving(app, dsn, queues=("default",), retention_interval=0.1) as worker:
        with anyio.fail_after(20):
            while worker.retention.deleted < 2502:  # noqa: ASYNC110 - a counter, not an event
                await anyio.sleep(0.05)
    assert statuses(dsn) == {"succeeded": 1, "dead": 1, "queued": 1}
    # History went with the jobs it describes.
    assert query(dsn, "SELECT count(*) FROM notifyq.job_history") == [(3,)]


async def test_retention_forever_keeps_everything(dsn: str) -> None:
    insert_finished(dsn, "succeeded", "400 days")
    app = notifyq.App(dsn)
    settings: dict[str, Any] = {
        "retain_succeeded": None,
        "retain_cancelled": None,
        "retain_dead": None,
        "retention_interval": 0.05,
    }
    async with serving(app, dsn, **settings) as worker:
        assert await worker.retention.sweep() == 0
    assert statuses(dsn) == {"succeeded": 1}


def test_purge_batch_refuses_what_is_not_finished(dsn: str) -> None:
    with pytest.raises(notifyq.OperationRefused, match="finished jobs only"):
        admin.purge(dsn, 0, ["queued"])
    with pytest.raises(
        notifyq.ConfigurationError, match=r"Settings\.retain_dead must be at least 0 seconds"
    ):
        notifyq.Settings(retain_dead=-1)
