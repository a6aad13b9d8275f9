"""notifyq.testing and its pytest plugin: eager mode, drain, the clock, the assertions,
the clean state per test, and the plugin as another project's test run uses it."""

from __future__ import annotations

import logging
import textwrap
from typing import Any

import pytest

import notifyq
from notifyq import Backoff, InvalidJob, JobContext
from notifyq.logs import JobContextFilter
from notifyq.testing import Clock, TestQueue, eager
from tests.conftest import query

pytest_plugins = ["pytester"]


def flaky_app() -> tuple[notifyq.App, list[int]]:
    """Tasks that succeed, fail once, always fail; backoffs of an hour (a drain that
    waited them out would time the test out)."""
    app = notifyq.App()
    calls: list[int] = []
    hour = Backoff(base=3600, max_delay=3600)

    @app.task(name="t.ok")
    async def ok(payload: dict[str, Any]) -> dict[str, Any]:
        return {"echo": payload}

    @app.task(name="t.flaky", backoff=hour)
    async def flaky(payload: dict[str, Any], ctx: JobContext) -> str:
        calls.append(ctx.attempt)
        if ctx.attempt < 2:
            raise ConnectionError("first attempt fails")
        return "second time lucky"

    @app.task(name="t.broken", max_attempts=3, backoff=hour)
    def broken(payload: dict[str, Any]) -> None:
        raise ValueError("always")

    return app, calls


# --- eager


def test_eager_runs_handlers_at_enqueue_and_their_exceptions_surface() -> None:
    app = notifyq.App(dsn="postgresql://nobody@127.0.0.1:1/none")  # never reached
    seen: list[tuple[str, Any]] = []

    @app.task(name="mail.send")
    def send(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
        ctx.progress(50, "half")
        ctx.save_checkpoint_sync({"sent": 1})
        seen.append(("send", payload))
        return {"sent_to": payload["to"]}

    @app.task(name="signup")
    async def signup(payload: dict[str, Any]) -> None:
        # Jobs enqueued by a handler run inline too.
        await app.enqueue("mail.send", {"to": payload["email"]})

    @app.task(name="mail.bounce")
    def bounce(payload: dict[str, Any]) -> None:
        raise ConnectionRefusedError("smtp down")

    with eager(app) as jobs:
        first = app.enqueue_sync("signup", {"email": "ada@example.com"}, delay=3600)
        assert first == 1
        assert seen == [("send", {"to": "ada@example.com"})]
        with pytest.raises(ConnectionRefusedError, match="smtp down"):
            app.enqueue_sync("mail.bounce", {})
        app.enqueue_sync("elsewhere.task", {"x": 1})  # no handler here: stays queued
        with pytest.raises(InvalidJob):
            app.enqueue_sync("mail.send", {"bad": float("nan")})
        assert [(j.task, j.status, j.attempts) for j in jobs.jobs()] == [
            ("signup", "succeeded", 1),
            ("mail.send", "succeeded", 1),
            ("mail.bounce", "dead", 1),
            ("elsewhere.task", "queued", 0),
        ]
        sent = jobs.assert_enqueued("mail.send", {"to": "ada@example.com"}, count=1)
        assert sent[0].result == {"sent_to": "ada@example.com"}
        assert (sent[0].progress, sent[0].checkpoint) == (50, {"sent": 1})
        assert jobs.enqueued("mail.bounce")[0].error == "ConnectionRefusedError: smtp down"
    assert "enqueue_sync" not in vars(app)  # the app's own methods again


@pytest.mark.anyio
async def test_eager_from_async_code() -> None:
    app = notifyq.App(dsn="postgresql://nobody@127.0.0.1:1/none")

    @app.task(name="double")
    def double(payload: dict[str, int]) -> int:
        return payload["n"] * 2

    with eager(app) as jobs:
        await app.enqueue("double", {"n": 2})
        await app.enqueue_many("double", [{"n": 3}, {"n": 4}])
        app.enqueue_sync("double", {"n": 5})  # from a loop's thread: a loop of its own
    assert [j.result for j in jobs.jobs()] == [4, 6, 8, 10]


def test_eager_handlers_log_lines_carry_their_job(caplog: pytest.LogCaptureFixture) -> None:
    """As under `notifyq serve`: a handler's log lines, in its thread or the loop, get the
    job's fields through notifyq.logs.JobContextFilter on the logging handler."""
    app = notifyq.App(dsn="postgresql://nobody@127.0.0.1:1/none")
    log = logging.getLogger("tests.eager")

    @app.task(name="say.sync", queue="chat")
    def say_sync(payload: str) -> None:
        log.info("sync %s", payload)

    @app.task(name="say.async")
    async def say_async(payload: str) -> None:
        log.info("async %s", payload)

    caplog.handler.addFilter(JobContextFilter())
    with caplog.at_level(logging.INFO, "tests.eager"), eager(app):
        first = app.enqueue_sync("say.sync", "hi")
        second = app.enqueue_sync("say.async", "ho")
        log.info("outside")
    fields = [
        (r.getMessage(), getattr(r, "job_id", None), getattr(r, "task", None),
         getattr(r, "queue", None), getattr(r, "attempt", None))
        for r in caplog.records
    ]  # fmt: skip
    assert fields == [
        ("sync hi", first, "say.sync", "chat", 1),
        ("async ho", second, "say.async", "default", 1),
        ("outside", None, None, None, None),
    ]


# --- the real queue


@pytest.mark.anyio
async def test_drain_runs_retries_at_once_until_success_or_dead(notifyq_dsn: str) -> None:
    app, calls = flaky_app()
    queue = TestQueue(app)  # NOTIFYQ_DSN names the test's database
    ok = await app.enqueue("t.ok", {"n": 1})
    flaky = await app.enqueue("t.flaky", {})
    broken = await app.enqueue("t.broken", {})
    later = await app.enqueue("t.ok", {"n": 2}, delay=600)
    try:
        outcomes = await queue.drain()
    finally:
        await app.aclose()
    assert [(o.id, o.task, o.status, o.attempts) for o in outcomes] == [
        (ok, "t.ok", "succeeded", 1),
        (flaky, "t.flaky", "succeeded", 2),
        (broken, "t.broken", "dead", 3),
    ]
    assert calls == [1, 2]
    assert outcomes[0].result == {"echo": {"n": 1}}
    assert outcomes[1].result == "second time lucky"
    assert isinstance(outcomes[2].exception, ValueError)
    assert outcomes[2].error is not None and "ValueError: always" in outcomes[2].error
    # The delayed job was not due: drain leaves it for the clock.
    assert query(notifyq_dsn, "SELECT status, attempts FROM notifyq.jobs WHERE id = %s", later) == [
        ("queued", 0)
    ]


@pytest.mark.anyio
async def test_drain_fails_with_an_assertion_naming_what_it_gave_up_on(notifyq_dsn: str) -> None:
    app, _ = flaky_app()
    queue = TestQueue(app)
    always = await app.enqueue("t.broken", {}, max_attempts=1000)
    with pytest.raises(
        AssertionError, match=rf"gave up after 2 rounds of retries: jobs \[{always}\]"
    ):
        await queue.drain(max_rounds=2)
    query(notifyq_dsn, "UPDATE notifyq.jobs SET status = 'cancelled', finished_at = now()")
    # A queue capped at 0 never lets its job start: the drain gives up, it does not hang.
    query(
        notifyq_dsn, "INSERT INTO notifyq.queue_limits (queue, max_running) VALUES ('default', 0)"
    )
    held = await app.enqueue("t.ok", {})
    with pytest.raises(
        AssertionError, match=rf"gave up after 0.5 s .*{held} \(t.ok, queue default, queued\)"
    ):
        await queue.drain(give_up_after=0.5)
    await app.aclose()


def test_advance_brings_a_delayed_job_due(notifyq_dsn: str, notifyq_clock: Clock) -> None:
    app, _ = flaky_app()
    queue = TestQueue(app)
    job = app.enqueue_sync("t.ok", {"n": 1}, delay=600)
    try:
        assert queue.drain_sync() == []
        notifyq_clock.advance(599)
        assert queue.drain_sync() == []
        assert notifyq_clock.advance(1) == 1
        assert [(o.id, o.status) for o in queue.drain_sync()] == [(job, "succeeded")]
    finally:
        app.close()
    assert notifyq_clock.advanced == 600


def test_advance_moves_a_rate_limits_slots(notifyq_dsn: str, notifyq_clock: Clock) -> None:
    app, _ = flaky_app()
    queue = TestQueue(app)
    query(notifyq_dsn, "INSERT INTO notifyq.rate_limits (rate_key, per_second) VALUES ('k', 0.01)")
    try:
        first, second = app.enqueue_many_sync("t.ok", [{"n": 1}, {"n": 2}], rate_key="k")
        # One start per 100 s: the second waits for its slot, which a drain does not.
        assert [o.id for o in queue.drain_sync(max_rounds=1)] == [first]
        assert query(notifyq_dsn, "SELECT rate_reserved FROM notifyq.jobs WHERE id = %s", second)
        notifyq_clock.advance(100)
        assert [o.id for o in queue.drain_sync()] == [second]
    finally:
        app.close()


def test_assertions_list_what_was_enqueued(notifyq_dsn: str) -> None:
    app, _ = flaky_app()
    queue = TestQueue(app)
    try:
        with pytest.raises(AssertionError) as nothing:
            queue.assert_enqueued("t.ok")
        assert str(nothing.value) == (
            "expected at least 1 job(s) of 't.ok', found 0; no job was enqueued"
        )
        app.enqueue_sync("t.ok", {"n": 1})
        app.enqueue_sync("t.ok", {"n": 2}, queue="other")
        assert [j.payload for j in queue.assert_enqueued("t.ok", count=2)] == [{"n": 1}, {"n": 2}]
        queue.assert_enqueued("t.ok", {"n": 2}, queue="other", count=1)
        queue.assert_not_enqueued("t.flaky")
        with pytest.raises(AssertionError) as wrong:
            queue.assert_enqueued("t.ok", {"n": 3}, count=1)
        assert str(wrong.value) == (
            "expected 1 job(s) of 't.ok' with payload {'n': 3}, found 0; the jobs enqueued (2):\n"
            "  #1 t.ok queue=default status=queued payload={'n': 1}\n"
            "  #2 t.ok queue=other status=queued payload={'n': 2}"
        )
        with pytest.raises(AssertionError, match=r"expected no job\(s\) of 't.ok' in queue"):
            queue.assert_not_enqueued("t.ok", queue="other")
    finally:
        app.close()


NOTIFYQ_TABLES = """
SELECT c.oid::regclass::text FROM pg_class c
WHERE c.relnamespace = 'notifyq'::regnamespace AND c.relkind = 'r'
  AND c.relname <> 'schema_version'
"""


@pytest.mark.parametrize("run", [1, 2])
def test_every_test_starts_from_a_clean_database(notifyq_dsn: str, run: int) -> None:
    """Whichever runs second sees nothing of the first: no row in any notifyq table but
    the schema's version, ids from 1."""
    tables = [name for (name,) in query(notifyq_dsn, NOTIFYQ_TABLES)]
    assert len(tables) > 5
    counts = {name: query(notifyq_dsn, f"SELECT count(*) FROM {name}")[0][0] for name in tables}
    assert counts == dict.fromkeys(tables, 0)
    assert query(notifyq_dsn, "SELECT count(*) FROM notifyq.schema_version")[0][0] > 0
    app, _ = flaky_app()
    try:
        assert app.enqueue_sync("t.ok", {"run": run}) == 1  # and its history row
        query(notifyq_dsn, "INSERT INTO notifyq.rate_limits VALUES ('k', 1)")
        query(notifyq_dsn, "INSERT INTO notifyq.queue_limits (queue, max_running) VALUES ('q', 1)")
        TestQueue(app).drain_sync()  # a dispatcher's row, the tasks' settings
    finally:
        app.close()


# --- the plugin, in another project's test run


def test_the_plugin_in_a_project_of_its_own(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import pytest
        import notifyq

        app = notifyq.App()

        @app.task(name="shop.confirm", max_attempts=2)
        async def confirm(payload):
            if payload.get("fail"):
                raise RuntimeError("no stock")
            return {"confirmed": payload["order"]}

        @pytest.fixture
        def notifyq_app():
            return app
        """
    )
    pytester.makepyfile(
        textwrap.dedent(
            """
            import pytest
            from conftest import app

            def test_eager(notifyq_eager):
                app.enqueue_sync("shop.confirm", {"order": 1})
                notifyq_eager.assert_enqueued("shop.confirm", {"order": 1}, count=1)
                with pytest.raises(RuntimeError, match="no stock"):
                    app.enqueue_sync("shop.confirm", {"order": 2, "fail": True})

            def test_queue(notifyq_queue, notifyq_clock):
                app.enqueue_sync("shop.confirm", {"order": 1})
                app.enqueue_sync("shop.confirm", {"order": 2, "fail": True})
                app.enqueue_sync("shop.confirm", {"order": 3}, delay=60)
                outcomes = notifyq_queue.drain_sync()
                assert [(o.status, o.attempts) for o in outcomes] == [
                    ("succeeded", 1), ("dead", 2)]
                notifyq_clock.advance(60)
                assert [o.result for o in notifyq_queue.drain_sync()] == [{"confirmed": 3}]

            def test_clean(notifyq_queue):
                assert notifyq_queue.jobs() == []

            @pytest.fixture
            def anyio_backend():
                return "asyncio"

            # Async tests enqueue on a connection of their own event loop, which ends
            # with the test: the fixture must close it (else a ResourceWarning, an error
            # under -W error, when it is collected).
            @pytest.mark.anyio
            @pytest.mark.parametrize("order", [4, 5, 6])
            async def test_async(notifyq_queue, order):
                await app.enqueue("shop.confirm", {"order": order})
                outcomes = await notifyq_queue.drain()
                assert [o.result for o in outcomes] == [{"confirmed": order}]
                import gc; gc.collect()
            """
        )
    )
    # No -p: the installed package's pytest11 entry point loads the plugin, as for a user.
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error")
    result.assert_outcomes(passed=6)


def test_the_plugin_is_declared_as_an_entry_point() -> None:
    import tomllib

    from tests.conftest import REPO

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["pytest11"] == {"notifyq": "notifyq.pytest_plugin"}


@pytest.mark.anyio
async def test_drain_runs_the_rest_and_leaves_a_paused_queue_queued(notifyq_dsn: str) -> None:
    """As `serve --until-empty` does: a paused job starts on no claim, so the drain does not
    wait `give_up_after` for it and fail."""
    app = notifyq.App()

    @app.task(name="p.t", queue="paused")
    async def paused(payload: Any) -> None:
        pass

    @app.task(name="o.t")
    async def other(payload: Any) -> None:
        pass

    queue = TestQueue(app)
    held = await app.enqueue("p.t", {})
    ran = await app.enqueue("o.t", {})
    await app.pause("paused")
    try:
        outcomes = await queue.drain(give_up_after=10)
    finally:
        await app.aclose()
    assert [(o.id, o.status) for o in outcomes] == [(ran, "succeeded")]
    assert query(notifyq_dsn, "SELECT status FROM notifyq.jobs WHERE id = %s", held) == [
        ("queued",)
    ]
