"""Circuit breakers per task (notifyq.circuit_breakers): shared by every dispatcher and
SQL worker, enforced by the claim, fed by the completion's failure writes.

Cool-downs are short to keep the tests quick, but nothing here depends on them
being met on time: every wait polls a condition (the breaker's row, the jobs'
statuses) with a deadline, and the outage ends when the test says so.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import psycopg
import pytest

import notifyq
from notifyq import CircuitBreaker, ConfigurationError, DoNotRetry, OperationRefused, admin
from tests.conftest import query, statuses
from tests.helpers import eventually, serving

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def dispatchers(
    app: notifyq.App, dsn: str, n: int, **settings: Any
) -> AsyncIterator[list[notifyq.Worker]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(serving(app, dsn, **settings)) for _ in range(n)]


def breaker(dsn: str, task: str) -> dict[str, Any]:
    found = [row for row in admin.circuit_breakers(dsn) if row["task"] == task]
    assert found, f"{task} has no circuit breaker"
    return found[0]


def open_breaker(dsn: str, task: str, *, cooled: bool) -> None:
    """Open `task`'s breaker by hand, its cool-down over (`cooled`) or an hour away."""
    query(
        dsn,
        "UPDATE notifyq.circuit_breakers SET state = 'open', opens = opens + 1,"
        " opened_at = now() - CASE WHEN %s THEN cooldown ELSE interval '0' END"
        " WHERE task = %s",
        cooled,
        task,
    )


async def test_an_outage_kills_no_job_and_costs_the_threshold_and_the_probes(dsn: str) -> None:
    """The issue's test: a handler that fails until the test says the service is back,
    two dispatchers.  No job goes dead; the attempts made during the outage are the
    failures that opened the breaker, those already running then, and one per probe;
    after recovery every job succeeds."""
    app = notifyq.App(dsn)
    down = threading.Event()
    down.set()
    attempts_while_down = 0
    threshold, concurrency, dispatcher_count = 3, 1, 2

    @app.task(
        name="mail.send",
        max_attempts=threshold + 1,  # more than the failures one job can take before it opens
        backoff=notifyq.Backoff(base=0.01, max_delay=0.05),
        circuit_breaker=CircuitBreaker(failures=threshold, window=600, cooldown=0.2),
    )
    def send(payload: Any) -> None:
        nonlocal attempts_while_down
        if down.is_set():
            attempts_while_down += 1
            raise ConnectionError("smtp.example.com: connection refused")

    jobs = 30
    async with dispatchers(app, dsn, dispatcher_count, concurrency=concurrency, poll_interval=0.2):
        assert breaker(dsn, "mail.send")["failures"] == threshold  # synced at start-up
        query(
            dsn,
            "INSERT INTO notifyq.jobs (task) SELECT 'mail.send' FROM generate_series(1, %s)",
            jobs,
        )
        await eventually(lambda: breaker(dsn, "mail.send")["state"] != "closed")
        # Let it probe and fail a few times: each failed probe opens it again.
        await eventually(lambda: breaker(dsn, "mail.send")["opens"] >= 4)
        down.clear()
        opens = breaker(dsn, "mail.send")["opens"]
        await eventually(lambda: statuses(dsn) == {"succeeded": jobs}, within=60)
    state = breaker(dsn, "mail.send")
    assert state["state"] == "closed"
    failed_probes = opens - 1  # every open after the first was a probe that failed
    # A probe may have been running as the service came back (and succeeded), and the
    # jobs already claimed when the breaker opened still ran: at most what the
    # dispatchers hold, twice their concurrency each (claimed, and outcome unwritten).
    in_flight = dispatcher_count * 2 * concurrency
    assert attempts_while_down <= threshold + in_flight + failed_probes + 1, (
        attempts_while_down,
        opens,
    )
    # Nothing was charged for the outage beyond what opened the breaker.
    charged = query(dsn, "SELECT coalesce(sum(attempts), 0) - count(*) FROM notifyq.jobs")[0][0]
    assert charged <= threshold + in_flight
    await app.aclose()


async def test_half_open_lets_exactly_one_probe_through_two_dispatchers(dsn: str) -> None:
    app = notifyq.App(dsn)
    release = anyio.Event()
    started: list[int] = []

    @app.task(name="api.call", circuit_breaker=CircuitBreaker(failures=1, window=60, cooldown=0.1))
    async def call(payload: Any, ctx: notifyq.JobContext) -> None:
        started.append(ctx.id)
        await release.wait()

    query(dsn, "INSERT INTO notifyq.jobs (task) SELECT 'api.call' FROM generate_series(1, 20)")
    admin.set_circuit_breaker(dsn, "api.call", CircuitBreaker(failures=1, window=60, cooldown=0.1))
    open_breaker(dsn, "api.call", cooled=True)
    async with dispatchers(app, dsn, 2, concurrency=5, poll_interval=0.1) as (one, two):
        probe = await eventually(lambda: breaker(dsn, "api.call")["probe_job"])
        await eventually(lambda: started)
        before = (one.dispatcher.claims, two.dispatcher.claims)
        # More jobs, so both dispatchers claim again while the probe runs: they get none.
        query(dsn, "INSERT INTO notifyq.jobs (task) SELECT 'api.call' FROM generate_series(1, 5)")
        await eventually(
            lambda: one.dispatcher.claims > before[0] and two.dispatcher.claims > before[1]
        )
        assert started == [probe]
        assert statuses(dsn) == {"running": 1, "queued": 24}
        assert breaker(dsn, "api.call")["state"] == "half_open"
        release.set()  # the probe succeeds: closed, and the rest run
        await eventually(lambda: statuses(dsn) == {"succeeded": 25})
    assert breaker(dsn, "api.call")["state"] == "closed"
    await app.aclose()


def test_two_claims_at_once_start_one_probe(dsn: str) -> None:
    """The SQL worker protocol: a claim that finds the breaker locked by another claim
    starting its probe skips it, and once that one commits, sees its probe running."""
    query(dsn, "SELECT notifyq.set_circuit_breaker('t', 1, '1 minute', '1 hour')")
    query(dsn, "INSERT INTO notifyq.jobs (task) SELECT 't' FROM generate_series(1, 10)")
    open_breaker(dsn, "t", cooled=True)
    with psycopg.connect(dsn) as a, psycopg.connect(dsn) as b:
        first = a.execute("SELECT id FROM notifyq.claim('a', max_jobs => 5)").fetchall()
        assert len(first) == 1  # a's transaction is open: the breaker's row stays locked
        assert b.execute("SELECT id FROM notifyq.claim('b', max_jobs => 5)").fetchall() == []
        b.commit()
        a.commit()
        assert b.execute("SELECT id FROM notifyq.claim('b', max_jobs => 5)").fetchall() == []
        b.commit()
        row = breaker(dsn, "t")
        assert (row["state"], row["probe_job"]) == ("half_open", first[0][0])
        # The probe fails through the protocol: open again, and its attempt not charged.
        assert a.execute("SELECT notifyq.fail(%s, 'a', 'down')", first[0]).fetchone() == ("queued",)
        a.commit()
    assert breaker(dsn, "t")["state"] == "open"
    assert query(dsn, "SELECT attempts FROM notifyq.jobs WHERE id = %s", first[0][0]) == [(0,)]
    # Open again: a claim takes nothing, and its timer is the new cool-down's end.
    (info,) = query(
        dsn,
        "SELECT id, next_in FROM notifyq.claim_jobs('c', '{default}', '{t}', 5, '30 s')",
    )
    assert info[0] is None and 3000 < info[1] <= 3600, info


def test_a_pause_holds_the_probe_and_sets_no_cool_down_timer(dsn: str) -> None:
    """Pause and breakers together (schema 17 and 18): a cooled breaker takes its probe
    from a served queue where neither the queue nor the task is paused, and starts none
    while every served queue pauses it; a held task paused everywhere does not time the
    claim by its cool-down."""
    query(dsn, "SELECT notifyq.set_circuit_breaker('t', 1, '1 minute', '1 hour')")
    query(
        dsn,
        "INSERT INTO notifyq.jobs (queue, task) SELECT q, 't'"
        " FROM unnest('{a,b}'::text[]) AS q, generate_series(1, 3)",
    )
    open_breaker(dsn, "t", cooled=True)
    claim = "SELECT id, queue, next_in FROM notifyq.claim_jobs('w', '{a,b}', '{t}', 5, '30 s')"
    query(dsn, "SELECT notifyq.pause_queue('a')")
    query(dsn, "SELECT notifyq.pause_queue('b', 't')")
    *claimed, _info = query(dsn, claim)
    assert claimed == []
    assert breaker(dsn, "t")["state"] == "open"  # no probe started: none could run

    query(dsn, "SELECT notifyq.resume_queue('b', 't')")
    *claimed, _info = query(dsn, claim)
    assert [row[1] for row in claimed] == ["b"]  # the probe, from the queue not paused
    row = breaker(dsn, "t")
    assert (row["state"], row["probe_job"]) == ("half_open", claimed[0][0])
    query(dsn, "SELECT notifyq.fail(%s, 'w', 'down')", claimed[0][0])
    assert breaker(dsn, "t")["state"] == "open"  # a new cool-down, an hour long

    (info,) = query(dsn, claim)
    assert 3000 < info[2] <= 3600, info  # b serves t: the cool-down's end is the timer
    query(dsn, "SELECT notifyq.pause_queue('b', 't')")
    (info,) = query(dsn, claim)
    assert info[2] is None, info  # paused wherever it is served: no timer


async def test_reset_by_hand_releases_the_held_jobs(dsn: str) -> None:
    app = notifyq.App(dsn)

    @app.task(name="sms.send", circuit_breaker=CircuitBreaker(failures=2, window=60, cooldown=3600))
    async def sms(payload: Any) -> None:
        pass

    async with serving(app, dsn, poll_interval=0.1) as worker:
        open_breaker(dsn, "sms.send", cooled=False)
        query(dsn, "INSERT INTO notifyq.jobs (task) SELECT 'sms.send' FROM generate_series(1, 5)")
        # Held: the claims that the inserts caused took nothing, and the listener's polls
        # (several of them) caused none: their upkeep says the held jobs are not ready.
        # The count starts once the wake-ups of the insert and of the breaker's change
        # (notifyq_internal) have been heard: two upkeeps later.
        settled = worker.upkeeps + 2
        await eventually(lambda: worker.upkeeps >= settled)
        upkeeps, claims = worker.upkeeps, worker.dispatcher.claims
        await eventually(lambda: worker.upkeeps >= upkeeps + 5)
        assert statuses(dsn) == {"queued": 5}
        assert worker.dispatcher.claims <= claims + 1
        assert await app.reset_circuit_breaker("sms.send") == "open"
        await eventually(lambda: statuses(dsn) == {"succeeded": 5})
    with pytest.raises(OperationRefused, match="no circuit breaker"):
        app.reset_circuit_breaker_sync("nothing.here")
    await app.aclose()


async def test_a_breaker_set_in_sql_opens_on_failures_but_not_on_do_not_retry(dsn: str) -> None:
    app = notifyq.App(dsn)

    @app.task(name="hook.post", max_attempts=10, backoff=notifyq.Backoff(base=0.01))
    async def post(payload: Any) -> None:
        if payload.get("bad"):
            raise DoNotRetry("422: the payload is refused")
        raise ConnectionError("503")

    query(dsn, "SELECT notifyq.set_circuit_breaker('hook.post', 3, '10 minutes', '1 hour')")
    async with serving(app, dsn, concurrency=1, poll_interval=0.1):
        query(dsn, "INSERT INTO notifyq.jobs (task, payload) VALUES ('hook.post', '{\"bad\": 1}')")
        await eventually(lambda: statuses(dsn) == {"dead": 1})
        assert breaker(dsn, "hook.post")["failed"] == 0  # permanent failures do not count
        query(dsn, "INSERT INTO notifyq.jobs (task) SELECT 'hook.post' FROM generate_series(1, 4)")
        await eventually(lambda: breaker(dsn, "hook.post")["state"] == "open")
        await eventually(lambda: statuses(dsn).get("running", 0) == 0)
    row = breaker(dsn, "hook.post")
    assert row["opens"] == 1 and row["reopen_in"] > 3000
    # The app names no breaker for the task: the one set in SQL was kept at start-up.
    assert (row["failures"], row["cooldown_seconds"]) == (3, 3600)
    assert statuses(dsn) == {"dead": 1, "queued": 4}
    await app.aclose()


def test_circuit_breaker_settings_are_checked() -> None:
    assert CircuitBreaker() == CircuitBreaker(failures=5, window=60, cooldown=30)
    for bad in ({"failures": 0}, {"failures": 1.5}, {"window": 0}, {"cooldown": -1}):
        with pytest.raises(ConfigurationError, match="circuit_breaker"):
            CircuitBreaker(**bad)
    app = notifyq.App("postgresql://unused")
    with pytest.raises(ConfigurationError, match=r"notifyq\.CircuitBreaker"):
        wrong: Any = {"failures": 3}
        app.task(name="x", circuit_breaker=wrong)(lambda payload: None)


def test_an_open_breaker_shows_in_health_watch_metrics_and_the_cli(dsn: str) -> None:
    from click.testing import CliRunner
    from prometheus_client import generate_latest

    from notifyq import health, watch
    from notifyq.cli import main
    from notifyq.metrics import Figures, Metrics
    from tests.test_watch import snapshot

    runner = CliRunner()
    done = runner.invoke(
        main,
        [
            "breaker",
            "set",
            "pay.charge",
            "--failures",
            "4",
            "--window",
            "2m",
            "--cooldown",
            "90s",
            "--dsn",
            dsn,
        ],
    )
    assert done.exit_code == 0, done.output
    assert "pay.charge: closed; 4 failures in 2m, cool-down 90s" in done.output
    assert health.check(dsn).status == "ok"
    open_breaker(dsn, "pay.charge", cooled=False)

    report = health.check(dsn)
    (found,) = [c for c in report.checks if c.name == "breakers"]
    assert found.status == "warning" and "pay.charge (open)" in found.message

    snap = snapshot(dsn)
    assert [(b.task, b.state) for b in snap.breakers] == [("pay.charge", "open")]
    assert any(
        "circuit breaker of task pay.charge: open" in str(line)
        for line in watch.breaker_lines(snap)
    )

    metrics = Metrics(dsn, lambda: Figures(0, 0, 0, 0, 0, 0, 0, 0, 1.0, None, True))
    try:
        metrics.refresh()
        text = generate_latest(metrics.registry).decode()
    finally:
        metrics.close()
    assert 'notifyq_circuit_breaker_state{state="open",task="pay.charge"} 1.0' in text
    assert 'notifyq_circuit_breaker_state{state="closed",task="pay.charge"} 0.0' in text
    assert 'notifyq_circuit_breaker_opens_total{task="pay.charge"} 1.0' in text

    listed = runner.invoke(main, ["breaker", "list", "--dsn", dsn])
    assert "pay.charge: OPEN (probes in" in listed.output
    reset = runner.invoke(main, ["breaker", "reset", "pay.charge", "--dsn", dsn])
    assert reset.output == "pay.charge: closed (was open)\n"
    assert breaker(dsn, "pay.charge")["state"] == "closed"
    missing = runner.invoke(main, ["breaker", "reset", "no.such", "--dsn", dsn])
    assert missing.exit_code == 1 and "no.such has no circuit breaker" in missing.output
    removed = runner.invoke(main, ["breaker", "remove", "pay.charge", "--dsn", dsn])
    assert removed.output == "pay.charge: circuit breaker removed\n"


async def test_an_http_tasks_breaker_is_its_endpoints(dsn: str) -> None:
    """An endpoint that refuses connections (a 'failed' outcome, like a 5xx): its task's
    breaker opens after the failures set in App.http_task, and its jobs wait, queued."""
    pytest.importorskip("httpx", reason="HTTP tasks need the notifyq[http] extra")
    with socket.socket() as s:  # a port nothing listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = notifyq.App(dsn)
    app.http_task(
        "crm.sync",
        url=f"http://127.0.0.1:{port}/hook",
        max_attempts=5,
        backoff=notifyq.Backoff(base=0.01, max_delay=0.05),
        circuit_breaker=CircuitBreaker(failures=2, window=60, cooldown=3600),
    )
    async with serving(app, dsn, concurrency=1, poll_interval=0.1):
        query(dsn, "INSERT INTO notifyq.jobs (task) SELECT 'crm.sync' FROM generate_series(1, 6)")
        await eventually(lambda: breaker(dsn, "crm.sync")["state"] == "open")
        await eventually(lambda: statuses(dsn).get("running", 0) == 0)
    row = breaker(dsn, "crm.sync")
    assert (row["failures"], row["window_seconds"], row["cooldown_seconds"]) == (2, 60, 3600)
    assert statuses(dsn) == {"queued": 6}
    await app.aclose()
