"""Rate limits per rate_key (notifyq.rate_limits), enforced at claim time across every
dispatcher: over-limit jobs get a later slot as run_at instead of a busy loop."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import pytest

import notifyq
from notifyq import InvalidJob
from tests.conftest import query, statuses
from tests.helpers import eventually, serving
from tests.test_limits import dispatchers

pytestmark = pytest.mark.anyio


def starts_by_key(dsn: str) -> dict[str, list[float]]:
    """Each rate_key's start times (the claims' database time), in order."""
    found: dict[str, list[float]] = defaultdict(list)
    for key, at in query(
        dsn,
        "SELECT rate_key, extract(epoch FROM at)::float8 FROM notifyq.job_history h"
        " JOIN notifyq.jobs j ON j.id = h.job_id WHERE h.to_status = 'running' ORDER BY at",
    ):
        found[key].append(at)
    return found


async def test_rate_limit_holds_across_dispatchers_without_polling(dsn: str) -> None:
    app = notifyq.App(dsn)

    @app.task(name="api.call")
    async def call(payload: Any) -> None:
        pass

    query(dsn, "INSERT INTO notifyq.rate_limits (rate_key, per_second) VALUES ('api', 10)")
    # An hour between polls: only the claims' own timers can start the deferred jobs.
    async with dispatchers(app, dsn, 3, concurrency=10, poll_interval=3600) as workers:
        begin = time.monotonic()
        ids = await app.enqueue_many("api.call", [{}] * 20, rate_key="api")
        await eventually(lambda: statuses(dsn) == {"succeeded": 20})
        took = time.monotonic() - begin
        claims = sum(w.dispatcher.claims for w in workers)
        deferred = sum(w.dispatcher.deferred for w in workers)
    starts = starts_by_key(dsn)["api"]
    assert len(starts) == 20 and len(ids) == 20
    # 10 a second with no burst: 20 starts spread over at least 1.9 s, in slots 0.1 s apart.
    assert starts[-1] - starts[0] >= 1.9 - 0.01
    assert took >= 1.9
    # Each deferred job was moved once, to its own slot; claims did not spin meanwhile.
    assert deferred == 19
    assert claims < 80, claims
    await app.aclose()


async def test_each_key_has_its_own_budget_under_the_default_row(dsn: str) -> None:
    app = notifyq.App(dsn)

    @app.task(name="tenant.sync")
    async def sync(payload: Any) -> None:
        pass

    query(dsn, "INSERT INTO notifyq.rate_limits (rate_key, per_second, burst) VALUES ('*', 5, 2)")
    async with serving(app, dsn, concurrency=10, poll_interval=3600):
        for tenant in ("a", "b"):
            await app.enqueue_many("tenant.sync", [{}] * 6, rate_key=f"tenant:{tenant}")
        await app.enqueue_many("tenant.sync", [{}] * 6)  # no rate_key: never limited
        await eventually(lambda: statuses(dsn) == {"succeeded": 18}, within=30)
    starts = starts_by_key(dsn)
    for tenant in ("a", "b"):
        mine = starts[f"tenant:{tenant}"]
        # 5 a second, bursts of 2: two at once, then one each 0.2 s: the 6th at 0.8 s.
        assert mine[-1] - mine[0] >= 0.8 - 0.01
        assert mine[1] - mine[0] < 0.1  # the burst
    # The two keys ran side by side, not one after the other.
    assert abs(starts["tenant:a"][-1] - starts["tenant:b"][-1]) < 0.5
    unkeyed = starts[None]  # type: ignore[index]
    assert unkeyed[-1] - unkeyed[0] < 0.5
    await app.aclose()


def test_rate_key_from_plain_sql_and_bad_input(dsn: str) -> None:
    query(dsn, "INSERT INTO notifyq.jobs (task, rate_key) VALUES ('t', 'stripe')")
    assert query(dsn, "SELECT rate_key, rate_reserved FROM notifyq.jobs") == [("stripe", False)]
    app = notifyq.App(dsn)
    with pytest.raises(InvalidJob, match="rate_key must be a string of 1 to 200"):
        app.enqueue_sync("t", rate_key="")
    app.close()
    with pytest.raises(Exception, match="rate_limits_per_second_range"):
        query(dsn, "INSERT INTO notifyq.rate_limits (rate_key, per_second) VALUES ('x', 0)")
