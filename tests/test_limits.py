"""Per-queue concurrency caps (notifyq.queue_limits), enforced at claim time across every
dispatcher, without a busy loop while a queue is full."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import pytest

import notifyq
from notifyq import admin
from tests.conftest import REPO, query, statuses
from tests.helpers import eventually, serving

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def dispatchers(
    app: notifyq.App, dsn: str, n: int, **settings: Any
) -> AsyncIterator[list[notifyq.Worker]]:
    """n Workers of one app: n dispatchers, each with its own connections and claims."""
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(serving(app, dsn, **settings)) for _ in range(n)]


async def test_cap_holds_across_dispatchers(dsn: str) -> None:
    app = notifyq.App(dsn)
    running = peak = 0

    @app.task(name="pdf.render", queue="pdf")
    async def render(payload: Any) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.02)  # the work: long enough for claims to overlap it
        running -= 1

    admin.set_queue_limit(dsn, "pdf", 3)
    async with dispatchers(app, dsn, 3, concurrency=5, queues=("pdf",)):
        query(
            dsn,
            "INSERT INTO notifyq.jobs (task, queue)"
            " SELECT 'pdf.render', 'pdf' FROM generate_series(1, 60)",
        )
        await eventually(lambda: statuses(dsn) == {"succeeded": 60})
    # 15 free slots in all, 3 allowed: every dispatcher claimed within the cap.
    assert peak == 3
    await app.aclose()


async def test_capped_and_uncapped_queues_of_one_dispatcher(dsn: str) -> None:
    app = notifyq.App(dsn)
    peaks = {"slow": 0, "fast": 0}
    running = {"slow": 0, "fast": 0}

    async def work(payload: Any, ctx: notifyq.JobContext) -> None:
        running[ctx.queue] += 1
        peaks[ctx.queue] = max(peaks[ctx.queue], running[ctx.queue])
        await anyio.sleep(0.02)
        running[ctx.queue] -= 1

    app.task(name="slow.t", queue="slow")(work)
    admin.set_queue_limit(dsn, "slow", 1)
    async with dispatchers(app, dsn, 2, concurrency=4, queues=("fast", "slow")):
        query(
            dsn,
            "INSERT INTO notifyq.jobs (task, queue) SELECT 'slow.t', q FROM generate_series(1, 20),"
            " unnest(ARRAY['slow', 'fast']) AS q",
        )
        await eventually(lambda: statuses(dsn) == {"succeeded": 40})
    assert peaks["slow"] == 1 and peaks["fast"] > 1
    await app.aclose()


async def test_a_paused_queue_runs_when_its_cap_is_lifted_without_a_poll(dsn: str) -> None:
    app = notifyq.App(dsn)

    @app.task(name="t", queue="paused")
    async def t(payload: Any) -> None:
        pass

    admin.set_queue_limit(dsn, "paused", 0)
    async with serving(app, dsn, poll_interval=3600) as worker:
        query(dsn, "INSERT INTO notifyq.jobs (task, queue) VALUES ('t', 'paused'), ('t', 'paused')")
        await eventually(lambda: worker.dispatcher.full == {"paused"})
        assert statuses(dsn) == {"queued": 2}
        done = await anyio.run_process(
            [sys.executable, "-m", "notifyq", "limit", "paused", "none", "--dsn", dsn], cwd=REPO
        )
        assert done.stdout.decode() == "paused: no cap\n"
        # Only the cap's notification can have woken it: the poll is an hour away.
        await eventually(lambda: statuses(dsn) == {"succeeded": 2})
    await app.aclose()


async def test_inserts_into_a_full_queue_do_not_cause_claims(dsn: str) -> None:
    app = notifyq.App(dsn)
    release = anyio.Event()

    @app.task(name="hold", queue="one")
    async def hold(payload: Any) -> None:
        await release.wait()

    @app.task(name="quick", queue="two")
    async def quick(payload: Any) -> None:
        pass

    admin.set_queue_limit(dsn, "one", 1)
    async with serving(app, dsn, concurrency=4, poll_interval=3600) as worker:
        query(dsn, "INSERT INTO notifyq.jobs (task, queue) VALUES ('hold', 'one')")
        await eventually(lambda: statuses(dsn) == {"running": 1})
        await eventually(lambda: worker.dispatcher.full == {"one"})
        claims = worker.dispatcher.claims
        for _ in range(100):  # 100 statements: 100 notifications naming the full queue
            query(dsn, "INSERT INTO notifyq.jobs (task, queue) VALUES ('hold', 'one')")
        # Notifications arrive in commit order: once this one has been acted on, so
        # have the 100 before it.  The poll is an hour away.
        query(dsn, "INSERT INTO notifyq.jobs (task, queue) VALUES ('quick', 'two')")
        await eventually(lambda: statuses(dsn) == {"running": 1, "queued": 100, "succeeded": 1})
        # The claim for 'two', and at most a stray wake-up or two from elsewhere (a lease
        # sweep, a reconnect): without the full-queue rule it would be one per notification.
        assert claims + 1 <= worker.dispatcher.claims <= claims + 3
        release.set()  # each finish frees room, which the status notification announces
        await eventually(lambda: statuses(dsn) == {"succeeded": 102})
    await app.aclose()


def test_limit_command_sets_lists_and_refuses_bad_input(dsn: str) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "notifyq", "limit", *args, "--dsn", dsn],
            cwd=REPO,
            capture_output=True,
            text=True,
        )

    assert cli("pdf", "3").stdout == "pdf: at most 3 running (0 now)\n"
    assert cli("pdf", "5").stdout == "pdf: at most 5 running (0 now)\n"
    assert query(dsn, "SELECT queue, max_running FROM notifyq.queue_limits") == [("pdf", 5)]
    bad = cli("pdf", "lots")
    assert bad.returncode == 2
    assert "whole number of jobs from 0 (pauses the queue) to 1,000,000, or 'none'" in bad.stderr
    assert cli("pdf", "--", "-1").returncode == 2
    # Over the schema's CHECK: a usage error, not the database's refusal (exit 1).
    bad = cli("pdf", "1000001")
    assert bad.returncode == 2 and "to 1,000,000, or 'none', not '1000001'" in bad.stderr
    assert cli("pdf", "1000000").stdout == "pdf: at most 1000000 running (0 now)\n"
    assert cli("pdf", "5").stdout == "pdf: at most 5 running (0 now)\n"
    bad = cli("Bad Queue", "1")
    assert bad.returncode == 2 and "queue" in bad.stderr
    assert cli("pdf").stdout == "pdf: at most 5 running (0 now)\n"  # one queue's cap
    assert query(dsn, "SELECT queue, max_running FROM notifyq.queue_limits") == [("pdf", 5)]
