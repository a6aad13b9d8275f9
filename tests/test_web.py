"""notifyq web, the dashboard: every page with real data, the search, the actions
through the SQL functions, the refusals (CSRF, token, read-only), hidden payloads,
escaping, and the live stream fed by the one LISTEN connection."""

from __future__ import annotations

import base64
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import psycopg
import pytest
from anyio.streams.memory import MemoryObjectSendStream
from click.testing import CliRunner
from psycopg.conninfo import make_conninfo
from starlette.applications import Starlette
from starlette.routing import Mount

import notifyq
from notifyq.cli import main
from notifyq.errors import ConfigurationError
from notifyq.web import check_bind, create_app
from tests.conftest import REPO, query, serve_process
from tests.helpers import eventually, serving
from tests.test_cli_usage import free_port

pytestmark = pytest.mark.anyio

XSS = "<script>alert('x')</script>"


def dead_job(dsn: str, task: str = "web.flaky", error: str = "boom") -> int:
    (row,) = query(
        dsn,
        "INSERT INTO notifyq.jobs (task, payload, status, attempts, max_attempts, last_error,"
        " started_at, finished_at) VALUES (%s, '{\"n\": 1}', 'dead', 1, 1, %s, now(), now())"
        " RETURNING id",
        task,
        error,
    )
    return int(row[0])


@asynccontextmanager
async def client(app: Any, **kwargs: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app with its lifespan entered (the hub runs; its connections close)."""
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://testserver", **kwargs) as c,
    ):
        yield c


async def csrf(c: httpx.AsyncClient, path: str = "/") -> str:
    page = await c.get(path)
    assert page.status_code == 200
    found = re.search(r'<meta name="csrf" content="([^"]+)">', page.text)
    assert found is not None
    assert c.cookies.get("notifyq_csrf") == found.group(1)
    return found.group(1)


async def test_every_page_renders_with_real_data(dsn: str) -> None:
    query(
        dsn,
        "INSERT INTO notifyq.jobs (task, queue, payload, tags) VALUES"
        " ('mail.send', 'mail', '{\"to\": \"ada@example.com\"}', '{welcome}'),"
        " ('mail.send', 'mail', '{\"to\": \"bob@example.com\"}', NULL)",
    )
    dead = dead_job(dsn, error="Traceback (most recent call last):\n  File x\nValueError: bad")
    query(
        dsn,
        "INSERT INTO notifyq.periodic (name, task, schedule)"
        " VALUES ('nightly', 'report', '0 3 * * *')",
    )
    async with client(create_app(dsn)) as c:
        home = await c.get("/")
        assert home.status_code == 200
        assert "mail" in home.text and "web.flaky" in home.text  # the queue; the failure
        assert 'id="live"' in home.text and "p95 wait" in home.text
        assert "default-src 'self'" in home.headers["content-security-policy"]
        jobs = await c.get("/jobs", params={"queue": "mail"})
        assert jobs.text.count("mail.send") == 2
        detail = await c.get(f"/jobs/{dead}")
        assert "ValueError: bad" in detail.text and "Traceback" in detail.text
        assert "&quot;n&quot;: 1" in detail.text  # the payload, as JSON
        assert "Retry" in detail.text
        assert (await c.get("/jobs/999999")).status_code == 404
        dispatchers = await c.get("/dispatchers")
        assert "No dispatcher" in dispatchers.text
        schedules = await c.get("/schedules")
        assert "nightly" in schedules.text and "0 3 * * *" in schedules.text
        assert re.search(r'<time datetime="[^"]+T03:00:00', schedules.text)  # next instant
        assert (await c.get("/purge")).status_code == 200
        assert (await c.get("/static/dashboard.js")).status_code == 200
        assert "postgresql://" not in home.text + detail.text + jobs.text


async def test_the_search_filters_by_every_field(dsn: str) -> None:
    query(
        dsn,
        "INSERT INTO notifyq.jobs (task, queue, payload, created_at) VALUES"
        " ('a.one', 'q1', '{\"user\": 7, \"kind\": \"x\"}', '2026-01-01 10:00+00'),"
        " ('a.two', 'q2', '{\"user\": 8}', '2026-02-01 10:00+00')",
    )
    (first,) = query(dsn, "SELECT id FROM notifyq.jobs WHERE task = 'a.one'")
    async with client(create_app(dsn)) as c:

        async def found(**params: str) -> set[str]:
            page = await c.get("/jobs", params=params)
            assert page.status_code == 200, page.text
            return set(re.findall(r">(a\.\w+)<", page.text))

        assert await found() == {"a.one", "a.two"}
        assert await found(task="a.two") == {"a.two"}
        assert await found(queue="q1") == {"a.one"}
        assert await found(status="queued") == {"a.one", "a.two"}
        assert await found(status="dead") == set()
        assert await found(id=str(first[0])) == {"a.one"}
        assert await found(key="user", value="8") == {"a.two"}
        assert await found(key="kind", value="x") == {"a.one"}
        assert await found(key="user' OR 1=1 --", value="8") == set()  # a parameter, not SQL
        assert await found(since="2026-01-15T00:00") == {"a.two"}
        assert await found(until="2026-01-15T00:00") == {"a.one"}
        assert (await c.get("/jobs", params={"id": "1 OR 1=1"})).status_code == 400
        assert (await c.get("/jobs", params={"since": "yesterday"})).status_code == 400


async def test_a_dead_job_retried_from_the_page_then_succeeds(dsn: str) -> None:
    app = notifyq.App(dsn)

    @app.task(name="web.flaky")
    async def flaky(payload: Any) -> dict[str, int]:
        return {"n": payload["n"] + 1}

    job = dead_job(dsn)
    async with client(create_app(dsn)) as c:
        token = await csrf(c, f"/jobs/{job}")
        answer = await c.post(f"/jobs/{job}/retry", data={"csrf": token})
        assert answer.status_code == 303
        assert answer.headers["location"] == f"/jobs/{job}?done=retry"
        assert query(dsn, "SELECT status FROM notifyq.jobs WHERE id = %s", job) == [("queued",)]
        history = query(dsn, "SELECT to_status FROM notifyq.job_history WHERE job_id = %s", job)
        assert ("queued",) in history  # notifyq.retry_job's update, recorded like the CLI's
        async with serving(app, dsn) as worker:
            await eventually(
                lambda: (
                    query(dsn, "SELECT status FROM notifyq.jobs WHERE id = %s", job)
                    == [("succeeded",)]
                )
            )
            page = await c.get("/dispatchers")
            assert worker.claimant in page.text
        done = await c.get(f"/jobs/{job}")
        assert "succeeded" in done.text and "&quot;n&quot;: 2" in done.text  # the result
        again = await c.post(f"/jobs/{job}/cancel", data={"csrf": token})
        assert again.status_code == 409  # the SQL function's refusal, shown
        assert "succeeded" in again.text


async def test_cancel_pause_resume_and_purge_go_through_the_sql_functions(dsn: str) -> None:
    (row,) = query(dsn, "INSERT INTO notifyq.jobs (task, queue) VALUES ('t', 'q') RETURNING id")
    old = dead_job(dsn)
    query(
        dsn, "UPDATE notifyq.jobs SET finished_at = now() - '30 days'::interval WHERE id = %s", old
    )
    async with client(create_app(dsn)) as c:
        token = await csrf(c)
        assert (await c.post(f"/jobs/{row[0]}/cancel", data={"csrf": token})).status_code == 303
        assert query(dsn, "SELECT status FROM notifyq.jobs WHERE id = %s", row[0]) == [
            ("cancelled",)
        ]
        assert (await c.post("/queues/q/pause", data={"csrf": token})).status_code == 303
        assert query(dsn, "SELECT queue, task FROM notifyq.queue_pauses") == [("q", "*")]
        assert "paused" in (await c.get("/")).text
        assert (await c.post("/queues/q/resume", data={"csrf": token})).status_code == 303
        assert query(dsn, "SELECT count(*) FROM notifyq.queue_pauses") == [(0,)]
        refused = await c.post("/queues/Bad%20Name/pause", data={"csrf": token})
        assert refused.status_code == 409
        form = {"csrf": token, "older_than": "7d", "status": "dead"}
        unconfirmed = await c.post("/purge", data=form)
        assert unconfirmed.status_code == 400
        assert query(dsn, "SELECT count(*) FROM notifyq.jobs WHERE id = %s", old) == [(1,)]
        purged = await c.post("/purge", data={**form, "confirm": "purge"})
        assert purged.status_code == 200 and "Deleted 1 job(s)" in purged.text
        assert query(dsn, "SELECT count(*) FROM notifyq.jobs WHERE id = %s", old) == [(0,)]


async def test_a_post_without_the_session_token_or_from_elsewhere_is_refused(dsn: str) -> None:
    job = dead_job(dsn)
    async with client(create_app(dsn)) as c:
        token = await csrf(c)
        assert (await c.post(f"/jobs/{job}/retry")).status_code == 403
        assert (await c.post(f"/jobs/{job}/retry", data={"csrf": "x" * 43})).status_code == 403
        cross = await c.post(
            f"/jobs/{job}/retry", data={"csrf": token}, headers={"Origin": "http://evil.example"}
        )
        assert cross.status_code == 403
        site = await c.post(
            f"/jobs/{job}/retry", data={"csrf": token}, headers={"Sec-Fetch-Site": "cross-site"}
        )
        assert site.status_code == 403
    async with client(create_app(dsn)) as fresh:  # no cookie: a forged form from elsewhere
        assert (await fresh.post(f"/jobs/{job}/retry", data={"csrf": token})).status_code == 403
    assert query(dsn, "SELECT status FROM notifyq.jobs WHERE id = %s", job) == [("dead",)]


async def test_a_token_is_required_when_set(dsn: str) -> None:
    app = create_app(dsn, token="s3cret-token")
    async with client(app) as c:
        refused = await c.get("/")
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Basic")
        assert (await c.get("/", headers={"Authorization": "Bearer wrong"})).status_code == 401
        assert (await c.get("/events")).status_code == 401
        ok = await c.get("/", headers={"Authorization": "Bearer s3cret-token"})
        assert ok.status_code == 200
        basic = base64.b64encode(b"anyone:s3cret-token").decode()
        assert (await c.get("/", headers={"Authorization": f"Basic {basic}"})).status_code == 200


def test_binding_beyond_loopback_needs_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("0.0.0.0", "token")
    with pytest.raises(ConfigurationError, match="NOTIFYQ_WEB_TOKEN"):
        check_bind("0.0.0.0", None)
    monkeypatch.delenv("NOTIFYQ_WEB_TOKEN", raising=False)
    result = CliRunner().invoke(main, ["web", "--host", "0.0.0.0", "--dsn", "postgresql://x/y"])
    assert result.exit_code == 2 and "NOTIFYQ_WEB_TOKEN" in result.output
    serve = ["serve", "--app", "examples.hello:app", "--web-port", "0", "--web-host", "10.1.2.3"]
    result = CliRunner().invoke(main, serve)
    assert result.exit_code == 2 and "NOTIFYQ_WEB_TOKEN" in result.output


async def test_read_only_refuses_every_action(dsn: str) -> None:
    job = dead_job(dsn)
    async with client(create_app(dsn, read_only=True)) as c:
        token = await csrf(c, f"/jobs/{job}")
        page = await c.get(f"/jobs/{job}")
        assert "Retry" not in page.text and "read-only" in page.text
        for path in (f"/jobs/{job}/retry", "/queues/default/pause", "/purge"):
            assert (await c.post(path, data={"csrf": token})).status_code == 403
        assert (await c.get("/purge")).status_code == 403
    assert query(dsn, "SELECT status FROM notifyq.jobs WHERE id = %s", job) == [("dead",)]


async def test_hidden_payloads_are_never_rendered(dsn: str) -> None:
    (row,) = query(
        dsn,
        "INSERT INTO notifyq.jobs (task, payload, status, attempts, started_at, finished_at,"
        " result) VALUES ('t', '{\"card\": \"4111-SECRET\"}', 'succeeded', 1, now(), now(),"
        ' \'{"token": "RESULT-SECRET"}\') RETURNING id',
    )
    async with client(create_app(dsn, show_payloads=False)) as c:
        page = await c.get(f"/jobs/{row[0]}")
        assert page.status_code == 200
        assert "SECRET" not in page.text and "hidden" in page.text


async def test_hidden_payloads_cannot_be_searched(dsn: str) -> None:
    # A match (or none) would tell a hidden payload's value, one guess at a time.
    (row,) = query(
        dsn,
        "INSERT INTO notifyq.jobs (task, payload) VALUES ('t', '{\"pin\": \"4711\"}') RETURNING id",
    )
    async with client(create_app(dsn, show_payloads=False)) as c:
        guess = await c.get("/jobs", params={"key": "pin", "value": "4711"})
        assert guess.status_code == 400 and "hidden" in guess.text
        assert f"/jobs/{row[0]}" not in guess.text
        assert 'name="key"' not in (await c.get("/jobs")).text


async def test_markup_in_a_payload_an_error_and_tags_is_escaped(dsn: str) -> None:
    # Task and queue names cannot hold markup (the jobs_task_format and jobs_queue_format
    # CHECKs); what a producer or a handler writes freely can.
    (row,) = query(
        dsn,
        "INSERT INTO notifyq.jobs (task, payload, tags) VALUES ('t', %s::jsonb, %s) RETURNING id",
        '{"name": "' + XSS.replace("'", "\\u0027") + '"}',
        ["<b>tag</b>"],
    )
    dead_job(dsn, error=f'<img src=x onerror="alert(1)">{XSS}')
    async with client(create_app(dsn)) as c:
        pages = [
            await c.get(f"/jobs/{row[0]}"),
            await c.get("/"),
            await c.get("/jobs"),
            await c.get("/jobs", params={"key": XSS, "value": XSS}),
        ]
        for page in pages:
            assert page.status_code == 200
            assert "<script>alert" not in page.text and "<img" not in page.text
            assert "<b>tag" not in page.text
        assert "&lt;script&gt;" in pages[0].text and "&lt;b&gt;tag" in pages[0].text
        assert "&lt;img src=x" in pages[1].text


async def read_events(app: Any, chunks: MemoryObjectSendStream[str]) -> None:
    """GET /events as a raw ASGI call (httpx's ASGI transport waits for the whole body)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/events",
        "raw_path": b"/events",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }
    asked = False

    async def receive() -> dict[str, Any]:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await anyio.sleep_forever()
        raise AssertionError  # unreachable

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            assert message["status"] == 200
        elif message["type"] == "http.response.body":
            await chunks.send(message.get("body", b"").decode())

    await app(scope, receive, send)


async def test_the_live_stream_delivers_a_job_enqueued_by_sql(dsn: str) -> None:
    app = create_app(dsn)
    send, chunks = anyio.create_memory_object_stream[str](100)

    async def until(word: str) -> str:
        with anyio.fail_after(20):
            async for chunk in chunks:
                if word in chunk:
                    return chunk
        raise AssertionError("the stream ended")

    async with (
        send,
        chunks,
        app.router.lifespan_context(app),
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(read_events, app, send)
        first = await until("event: overview")
        assert "fresh" not in first
        hub = app.state.hub
        before = hub.statements
        await anyio.to_thread.run_sync(
            query, dsn, "INSERT INTO notifyq.jobs (task, queue) VALUES ('t', 'fresh')"
        )
        event = await until("fresh")
        assert event.startswith("id: ") and "event: overview\ndata: " in event
        assert hub.statements - before >= 5  # one refresh: the watch model's statements
        tg.cancel_scope.cancel()


async def test_the_listen_connection_closes_when_the_last_tab_does(dsn: str) -> None:
    # Left open and unread, it would hold back PostgreSQL's notification queue (every
    # NOTIFY fails once that is full) for as long as no one looks at the dashboard.
    def listeners() -> int:
        (row,) = query(
            dsn,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'notifyq:listen'",
        )
        return int(row[0])

    app = create_app(dsn, interval=0.2)
    send, chunks = anyio.create_memory_object_stream[str](100)
    async with send, chunks, app.router.lifespan_context(app):
        async with anyio.create_task_group() as tg:
            tg.start_soon(read_events, app, send)
            with anyio.fail_after(20):
                async for chunk in chunks:
                    if "event: overview" in chunk:
                        break
            assert listeners() == 1
            tg.cancel_scope.cancel()  # the tab closes
        await eventually(lambda: listeners() == 0)
        async with anyio.create_task_group() as tg:  # a new tab: it listens again
            tg.start_soon(read_events, app, send)
            await eventually(lambda: listeners() == 1)
            tg.cancel_scope.cancel()


async def test_the_stream_says_why_without_the_lifespan_and_mounts_under_a_prefix(
    dsn: str,
) -> None:
    dead_job(dsn)
    dashboard = create_app(dsn)
    outer = Starlette(routes=[Mount("/admin/queue", app=dashboard)])
    transport = httpx.ASGITransport(app=outer)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        page = await c.get("/admin/queue/")
        assert page.status_code == 200
        assert 'href="/admin/queue/jobs"' in page.text
        assert 'src="/admin/queue/static/dashboard.js"' in page.text
        stream = await c.get("/admin/queue/events")
        assert stream.status_code == 503 and "lifespan" in stream.text
    await dashboard.state.hub.store.close()  # what the lifespan's end does


def test_serve_runs_the_dashboard_beside_the_dispatcher_and_stops_on_sigterm(
    dsn: str, tmp_path: Path
) -> None:
    """One process, one loop: the dispatcher registers, the dashboard shows it, and
    SIGTERM stops both, an open live stream included (the hub ends it), exit 0."""
    port = free_port()
    log = tmp_path / "serve.log"
    with serve_process(dsn, "--web-port", str(port), app="examples.hello:app", log=log) as proc:
        base = f"http://127.0.0.1:{port}"

        def dispatcher_shown() -> bool:
            try:
                return "serve" in httpx.get(f"{base}/dispatchers", timeout=2).text
            except httpx.TransportError:
                return False

        deadline = time.monotonic() + 20
        while not dispatcher_shown():
            assert time.monotonic() < deadline, log.read_text()
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
        with httpx.stream("GET", f"{base}/events", timeout=10) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("retry:")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0, log.read_text()
    assert "Traceback" not in log.read_text()


READ_GRANTS = """
GRANT USAGE ON SCHEMA notifyq TO {role};
GRANT SELECT ON notifyq.jobs, notifyq.job_history, notifyq.dispatcher_status,
    notifyq.queue_pauses, notifyq.circuit_breakers, notifyq.periodic,
    notifyq.schema_version TO {role};
GRANT EXECUTE ON FUNCTION notifyq.liveness_held(text),
    notifyq.queue_health(text[], text[]) TO {role};
"""
ACTION_GRANTS = """
GRANT EXECUTE ON FUNCTION notifyq.retry_job(bigint), notifyq.cancel_job(bigint),
    notifyq.lock_job(bigint), notifyq.dependency_status(bigint[], text),
    notifyq.pause_queue(text, text),
    notifyq.resume_queue(text, text), notifyq.purge(interval, text[], text[]),
    notifyq.purge_batch(interval, text[], integer, text[]) TO {role};
GRANT UPDATE ON notifyq.jobs TO {role};
GRANT INSERT, DELETE ON notifyq.queue_pauses TO {role};
"""


@asynccontextmanager
async def role_with(dsn: str, *grants: str) -> AsyncIterator[str]:
    """A LOGIN role with the grants docs/web.md lists (the same text); its DSN."""
    role = f"notifyq_dash_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'dash'".encode())
        for text in grants:
            conn.execute(text.format(role=role).encode())
    try:
        yield make_conninfo(dsn, user=role, password="dash")
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}".encode())
            conn.execute(f"DROP ROLE {role}".encode())


def test_docs_list_exactly_the_grants_the_tests_use() -> None:
    doc = (REPO / "docs" / "web.md").read_text()
    for grants in (READ_GRANTS, ACTION_GRANTS):
        text = grants.format(role="notifyq_dashboard").strip()
        assert text in doc


async def test_the_documented_grants_are_enough(dsn: str) -> None:
    job = dead_job(dsn)
    query(dsn, "INSERT INTO notifyq.periodic (name, task, schedule) VALUES ('n', 't', '* * * * *')")
    async with role_with(dsn, READ_GRANTS) as reader, client(create_app(reader)) as c:
        for path in ("/", "/jobs", f"/jobs/{job}", "/dispatchers", "/schedules"):
            assert (await c.get(path)).status_code == 200, path
        token = await csrf(c)
        refused = await c.post(f"/jobs/{job}/retry", data={"csrf": token})
        assert refused.status_code == 409 and "permission denied" in refused.text
    async with (
        role_with(dsn, READ_GRANTS, ACTION_GRANTS) as operator,
        client(create_app(operator)) as c,
    ):
        token = await csrf(c)
        retried = await c.post(f"/jobs/{job}/retry", data={"csrf": token})
        assert retried.status_code == 303, retried.text
        assert (await c.post(f"/jobs/{job}/cancel", data={"csrf": token})).status_code == 303
        assert (await c.post("/queues/q/pause", data={"csrf": token})).status_code == 303
        assert (await c.post("/queues/q/resume", data={"csrf": token})).status_code == 303
        form = {"csrf": token, "older_than": "0s", "status": "cancelled", "confirm": "purge"}
        purged = await c.post("/purge", data=form)
        assert purged.status_code == 200 and "Deleted 1 job(s)" in purged.text


async def test_the_overview_lists_the_circuit_breakers_holding_jobs_back(dsn: str) -> None:
    query(dsn, "SELECT notifyq.set_circuit_breaker('api.call', 1, '1 minute', '1 hour')")
    query(dsn, "SELECT notifyq.set_circuit_breaker('api.other', 1, '1 minute', '1 hour')")
    query(
        dsn,
        "UPDATE notifyq.circuit_breakers SET state = 'open', opens = 1, opened_at = now()"
        " WHERE task = 'api.call'",
    )
    async with client(create_app(dsn)) as c:
        home = (await c.get("/")).text
    assert "Circuit breakers holding jobs back" in home
    assert "api.call" in home and "open" in home
    assert "api.other" not in home  # closed: holds nothing back
