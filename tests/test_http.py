"""HTTP tasks: a dispatcher POSTs jobs to a real endpoint on 127.0.0.1 and maps its
answers to outcomes (notifyq/http/).  The endpoint is a small ASGI app under uvicorn in
a thread; each test scripts what it answers and reads what it received."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import shutil
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import anyio
import pytest

import notifyq
from notifyq import ConfigurationError, Retry, channels, watch
from notifyq.http import verify
from notifyq.http.delivery import retry_after, shown
from notifyq.http.endpoints import Secrets, endpoint
from tests.conftest import query, serve_process, wait_until
from tests.helpers import eventually, serving
from tests.test_http_examples import endpoint as node_endpoint

uvicorn = pytest.importorskip("uvicorn", reason="pip install -e '.[test]' (uvicorn)")

pytestmark = pytest.mark.anyio

SECRET = "s3cr3t-value-that-must-not-leak"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


Reply = tuple[int, dict[str, str], bytes]
Route = Callable[[Received, Any], Awaitable[Reply]]


@dataclass
class Endpoints:
    """The test's web service: `routes[path]` answers; `received` is what came in."""

    base: str = ""
    routes: dict[str, Route] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)  # slow routes end
    disconnected: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def on(self, path: str, *replies: Reply) -> str:
        """Answer `path` with these replies in turn (the last one repeats)."""
        queue = list(replies)

        async def route(request: Received, receive: Any) -> Reply:
            return queue.pop(0) if len(queue) > 1 else queue[0]

        self.routes[path] = route
        return self.url(path)

    def at(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = Received(
            scope["path"], {k.decode().lower(): v.decode() for k, v in scope["headers"]}, body
        )
        self.received.append(request)
        status, headers, content = await self.routes[scope["path"]](request, receive)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
            }
        )
        await send({"type": "http.response.body", "body": content})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def asgi_server(app: Any) -> Iterator[str]:
    """Run an ASGI app under uvicorn in a thread on 127.0.0.1; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="off",
        ws="none",
        interface="asgi3",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), message="uvicorn to start")
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture
def web() -> Iterator[Endpoints]:
    endpoints = Endpoints()
    with asgi_server(endpoints.app) as base:
        endpoints.base = base
        try:
            yield endpoints
        finally:
            endpoints.release.set()  # slow routes end before the server is asked to stop


@pytest.fixture
async def app(dsn: str, anyio_backend: str) -> AsyncIterator[notifyq.App]:
    app = notifyq.App(dsn)
    yield app
    await app.aclose()


def ok(value: Any = None, status: int = 200) -> Reply:
    body = b"" if value is None else json.dumps(value).encode()
    return status, {"content-type": "application/json"}, body


def job_row(dsn: str, job: int) -> tuple[Any, ...]:
    return query(
        dsn,
        "SELECT status, attempts, result, last_error, run_at FROM notifyq.jobs WHERE id = %s",
        job,
    )[0]


def status_of(dsn: str, job: int) -> str:
    return str(job_row(dsn, job)[0])


async def test_success_stores_the_json_body_as_the_result(
    app: notifyq.App, dsn: str, web: Endpoints
) -> None:
    app.http_task("report.make", url=web.on("/make", ok({"pages": 3})))
    async with serving(app, dsn):
        job = await app.enqueue("report.make", {"month": "2026-11"})
        assert await app.wait(job, timeout=20) == {"pages": 3}
    assert job_row(dsn, job)[:2] == ("succeeded", 1)


async def test_what_the_endpoint_receives(app: notifyq.App, dsn: str, web: Endpoints) -> None:
    app.http_task(
        "mail.send",
        url=web.on("/send", ok()),
        queue="mail",
        max_attempts=3,
        headers={"X-Tenant": "acme"},
        secret="MAIL",
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NOTIFYQ_SECRET_MAIL", SECRET)
        async with serving(app, dsn) as worker:
            job = await app.enqueue("mail.send", {"to": "ada@example.com"})
            assert await app.wait(job, timeout=20) is None  # an empty body: no result
    (request,) = web.at("/send")
    assert request.json == {
        "id": job,
        "task": "mail.send",
        "queue": "mail",
        "attempt": 1,
        "max_attempts": 3,
        "payload": {"to": "ada@example.com"},
        "checkpoint": None,
        "worker": worker.claimant,
    }
    h = request.headers
    assert h["content-type"] == "application/json"
    assert h["user-agent"] == f"notifyq/{notifyq.__version__}"
    assert (h["notifyq-job-id"], h["notifyq-attempt"], h["notifyq-task"]) == (
        str(job),
        "1",
        "mail.send",
    )
    assert h["idempotency-key"] == f"notifyq-{job}"
    assert h["x-tenant"] == "acme"
    verify(SECRET, h, request.body)  # raises if the signature does not match


async def test_the_endpoint_reports_progress_through_sql(
    app: notifyq.App, dsn: str, web: Endpoints
) -> None:
    answers: list[bool] = []

    async def reporting(request: Received, receive: Any) -> Reply:
        job = request.json
        (accepted,) = await asyncio.to_thread(
            lambda: query(
                dsn,
                "SELECT notifyq.progress(%s, %s, 50, 'half way', '{\"page\": 7}', %s)",
                job["id"],
                job["worker"],
                job["attempt"],
            )[0]
        )
        answers.append(accepted)
        return ok()

    web.routes["/report"] = reporting
    app.http_task("reporting", url=web.url("/report"))
    async with serving(app, dsn):
        job = await app.enqueue("reporting")
        await app.wait(job, timeout=20)
    assert answers == [True]
    assert query(
        dsn, "SELECT progress, progress_message, checkpoint FROM notifyq.jobs WHERE id = %s", job
    ) == [(50.0, "half way", {"page": 7})]


async def test_a_500_is_retried_then_succeeds(app: notifyq.App, dsn: str, web: Endpoints) -> None:
    url = web.on("/flaky", (500, {}, b"database is down"), ok({"done": True}))
    app.http_task("flaky", url=url, backoff=notifyq.Backoff(base=0.05, max_delay=0.05))
    async with serving(app, dsn):
        job = await app.enqueue("flaky")
        assert await app.wait(job, timeout=20) == {"done": True}
    status, attempts, _, last_error, _ = job_row(dsn, job)
    assert (status, attempts, len(web.at("/flaky"))) == ("succeeded", 2, 2)
    history = query(
        dsn, "SELECT error FROM notifyq.job_history WHERE job_id = %s AND error IS NOT NULL", job
    )
    assert last_error is None or "HTTP 500" in last_error
    assert not history or "HTTP 500 Internal Server Error" in history[0][0]


async def test_429_with_retry_after_runs_again_no_earlier(
    app: notifyq.App, dsn: str, web: Endpoints
) -> None:
    url = web.on("/busy", (429, {"retry-after": "120"}, b"slow down"))
    app.http_task("busy", url=url, backoff=notifyq.Backoff(base=0.05, max_delay=0.05))
    async with serving(app, dsn):
        job = await app.enqueue("busy")
        await eventually(lambda: job_row(dsn, job)[1] == 1 and status_of(dsn, job) == "queued")
    (delay, last_error) = query(
        dsn, "SELECT run_at - now(), last_error FROM notifyq.jobs WHERE id = %s", job
    )[0]
    assert delay > timedelta(seconds=100)  # the backoff alone would have said 0.05 s
    assert "HTTP 429 Too Many Requests" in last_error and "Retry-After: 120s" in last_error


async def test_a_python_handler_can_raise_retry_after(app: notifyq.App, dsn: str) -> None:

    @app.task(name="later")
    async def later(payload: Any) -> None:
        raise Retry("quota used up", after=300)

    async with serving(app, dsn):
        job = await app.enqueue("later")
        await eventually(lambda: status_of(dsn, job) == "queued" and job_row(dsn, job)[1] == 1)
    (delay,) = query(dsn, "SELECT run_at - now() FROM notifyq.jobs WHERE id = %s", job)[0]
    assert timedelta(seconds=250) < delay <= timedelta(seconds=300)


@pytest.mark.parametrize("after", [-1, math.nan, math.inf, Retry.MAX_AFTER + 1, True, "5"])
def test_retry_refuses_an_after_the_database_cannot_add(after: Any) -> None:
    with pytest.raises(ValueError, match=r"Retry\(after=\.\.\.\) takes a number of seconds"):
        Retry(after=after)


async def test_the_longest_retry_after_is_written(app: notifyq.App, dsn: str) -> None:
    """Ten years (Retry.MAX_AFTER) is a wait PostgreSQL adds to now(); 1e13 s was refused
    by the outcome's write ("interval out of range"), leaving the job to the rescuer."""

    @app.task(name="much.later")
    async def much_later(payload: Any) -> None:
        raise Retry(after=Retry.MAX_AFTER)

    assert Retry(after=0).after == 0.0
    async with serving(app, dsn):
        job = await app.enqueue("much.later")
        await eventually(lambda: status_of(dsn, job) == "queued" and job_row(dsn, job)[1] == 1)
    (delay,) = query(dsn, "SELECT run_at - now() FROM notifyq.jobs WHERE id = %s", job)[0]
    assert timedelta(days=3649) < delay <= timedelta(days=3650)


async def test_a_400_is_dead_after_one_attempt(app: notifyq.App, dsn: str, web: Endpoints) -> None:
    app.http_task("strict", url=web.on("/strict", (400, {}, b'{"error": "no such user"}')))
    async with serving(app, dsn):
        job = await app.enqueue("strict")
        await eventually(lambda: status_of(dsn, job) == "dead")
    _, attempts, _, last_error, _ = job_row(dsn, job)
    assert attempts == 1
    assert last_error.startswith(
        f"DeliveryRefused: POST {web.url('/strict')}: HTTP 400 Bad Request: "
        '{"error": "no such user"}'
    )


async def test_a_timeout_fails_the_attempt(app: notifyq.App, dsn: str, web: Endpoints) -> None:
    async def never(request: Received, receive: Any) -> Reply:
        await asyncio.to_thread(web.release.wait, 30)
        return ok()

    web.routes["/slow"] = never
    app.http_task("slow", url=web.url("/slow"), timeout=0.3, max_attempts=1)
    async with serving(app, dsn):
        job = await app.enqueue("slow")
        await eventually(lambda: status_of(dsn, job) == "dead")
    assert "no response within 0.3s" in job_row(dsn, job)[3]


async def test_connection_refused_is_retried(app: notifyq.App, dsn: str) -> None:
    url = f"http://127.0.0.1:{free_port()}/nobody"  # nothing listens there
    app.http_task("gone", url=url, max_attempts=2, backoff=notifyq.Backoff(base=0.05))
    async with serving(app, dsn):
        job = await app.enqueue("gone")
        await eventually(lambda: status_of(dsn, job) == "dead")
    _, attempts, _, last_error, _ = job_row(dsn, job)
    assert attempts == 2  # retried once, then out of attempts
    assert last_error.startswith(f"DeliveryFailed: POST {url}: ConnectError")


async def test_a_redirect_is_not_followed(app: notifyq.App, dsn: str, web: Endpoints) -> None:
    web.on("/target", ok({"reached": True}))
    url = web.on("/moved", (302, {"location": web.url("/target?token=abc")}, b""))
    app.http_task("moved", url=url)
    async with serving(app, dsn):
        job = await app.enqueue("moved")
        await eventually(lambda: status_of(dsn, job) == "dead")
    assert web.at("/target") == []
    last_error = job_row(dsn, job)[3]
    assert f"HTTP 302 Found: redirects are not followed (to {web.url('/target')}?...)" in (
        last_error
    )
    assert "token=abc" not in last_error


async def test_an_oversized_response_is_cut_and_fails_cleanly(
    app: notifyq.App, dsn: str, web: Endpoints
) -> None:
    huge = b'"' + b"x" * (3 * 1024 * 1024) + b'"'
    app.http_task("huge", url=web.on("/huge", (200, {}, huge)))
    async with serving(app, dsn):
        job = await app.enqueue("huge")
        await eventually(lambda: status_of(dsn, job) == "dead")
    _, attempts, result, last_error, _ = job_row(dsn, job)
    assert (attempts, result) == (1, None)
    assert "ResultError" in last_error and "over 1048576 bytes" in last_error


async def test_cancel_mid_request_aborts_it(app: notifyq.App, dsn: str, web: Endpoints) -> None:
    started = threading.Event()

    async def hang(request: Received, receive: Any) -> Reply:
        started.set()
        message = await receive()  # the next event of this request: the client left
        if message["type"] == "http.disconnect":
            web.disconnected.set()
        return ok()

    web.routes["/hang"] = hang
    app.http_task("hang", url=web.url("/hang"))
    async with serving(app, dsn):
        job = await app.enqueue("hang")
        await anyio.to_thread.run_sync(started.wait, 20)
        await app.cancel(job)
        assert await anyio.to_thread.run_sync(web.disconnected.wait, 20)
    assert status_of(dsn, job) == "cancelled"


async def test_shutdown_aborts_a_request_after_its_grace_and_hands_the_job_back(
    app: notifyq.App, dsn: str, web: Endpoints
) -> None:
    """A graceful stop lets the request run for shutdown_timeout, then aborts it (the
    endpoint sees the client leave) and hands the job back uncharged; the session's
    connections are closed."""
    started = threading.Event()

    async def hang(request: Received, receive: Any) -> Reply:
        started.set()
        message = await receive()
        if message["type"] == "http.disconnect":
            web.disconnected.set()
        return ok()

    web.routes["/hang"] = hang
    app.http_task("hang.on", url=web.url("/hang"))
    async with serving(app, dsn, shutdown_timeout=0.5) as worker:
        job = await app.enqueue("hang.on")
        await anyio.to_thread.run_sync(started.wait, 20)
        session = worker.http._session
        assert session is not None
    # Leaving `serving` stopped the worker gracefully and waited for it.
    assert web.disconnected.is_set()
    assert job_row(dsn, job)[:2] == ("queued", 0)  # handed back, the attempt not counted
    assert all(c.is_closed for c in session._clients)


async def test_a_slow_endpoint_outlives_its_lease(
    app: notifyq.App, dsn: str, web: Endpoints
) -> None:
    started = threading.Event()

    async def slow(request: Received, receive: Any) -> Reply:
        started.set()
        await asyncio.to_thread(web.release.wait, 30)
        return ok({"slow": True})

    web.routes["/slow"] = slow
    app.http_task("slow", url=web.url("/slow"))
    async with serving(app, dsn, lease=1.0) as worker:
        job = await app.enqueue("slow")
        await anyio.to_thread.run_sync(started.wait, 20)
        (first,) = query(dsn, "SELECT lease_expires_at FROM notifyq.jobs WHERE id = %s", job)[0]
        # Three leases go by while the request is in flight; renewals keep it ours.
        await eventually(
            lambda: query(
                dsn,
                "SELECT lease_expires_at > %s + interval '3 seconds' FROM notifyq.jobs "
                "WHERE id = %s",
                first,
                job,
            )[0][0]
        )
        assert worker.leases.rescued == 0 and status_of(dsn, job) == "running"
        snap = await watch.once(dsn)  # an HTTP task shows in `notifyq watch` like any task
        assert [(r.id, r.task) for r in snap.running] == [(job, "slow")]
        web.release.set()
        assert await app.wait(job, timeout=20) == {"slow": True}
    assert len(web.at("/slow")) == 1


async def test_endpoints_from_the_table_are_served_and_reloaded(
    app: notifyq.App, dsn: str, web: Endpoints
) -> None:
    web.on("/v1", ok({"version": 1}))
    web.on("/v2", ok({"version": 2}))
    query(dsn, "INSERT INTO notifyq.endpoints (task, url) VALUES ('sql.task', %s)", web.url("/v1"))
    async with serving(app, dsn) as worker:
        assert "sql.task" in worker.http.tasks
        first = await app.enqueue("sql.task", {"n": 1})
        assert await app.wait(first, timeout=20) == {"version": 1}
        query(dsn, "UPDATE notifyq.endpoints SET url = %s WHERE task = 'sql.task'", web.url("/v2"))

        def serves_v2() -> bool:
            task = worker.registry.get("sql.task")
            endpoint = getattr(task.handler, "endpoint", None) if task else None
            return endpoint is not None and endpoint.url == web.url("/v2")

        await eventually(serves_v2)
        second = await app.enqueue("sql.task", {"n": 2})
        assert await app.wait(second, timeout=20) == {"version": 2}
        query(dsn, "DELETE FROM notifyq.endpoints")
        await eventually(lambda: "sql.task" not in worker.http.tasks)
        claims = worker.dispatcher.claims
        third = await app.enqueue("sql.task", {"n": 3})
        await eventually(lambda: worker.dispatcher.claims > claims)  # a claim ran, without it
        assert status_of(dsn, third) == "queued"
        # Not claimed, but still delivered if a claim sent before the reload took a job.
        assert worker.registry.get("sql.task") is not None
        query(
            dsn, "INSERT INTO notifyq.endpoints (task, url) VALUES ('sql.task', %s)", web.url("/v1")
        )
        assert await app.wait(third, timeout=20) == {"version": 1}  # back: not the app's task
    assert [r.json["payload"] for r in web.received] == [{"n": 1}, {"n": 2}, {"n": 3}]


async def test_a_declared_task_wins_over_its_row(
    app: notifyq.App, dsn: str, web: Endpoints, caplog: pytest.LogCaptureFixture
) -> None:
    app.http_task("both", url=web.on("/python", ok("python")))
    web.on("/sql", ok("sql"))
    query(dsn, "INSERT INTO notifyq.endpoints (task, url) VALUES ('both', %s)", web.url("/sql"))
    with caplog.at_level(logging.WARNING, logger="notifyq.http"):
        async with serving(app, dsn):
            job = await app.enqueue("both")
            assert await app.wait(job, timeout=20) == "python"
    assert "both" in caplog.text and "the app's wins" in caplog.text


async def test_a_declared_endpoint_without_its_secret_does_not_start(
    app: notifyq.App, dsn: str
) -> None:
    app.http_task("signed", url="https://example.invalid/x", secret="NOT_SET_ANYWHERE")
    with pytest.raises(ConfigurationError, match="NOTIFYQ_SECRET_NOT_SET_ANYWHERE"):
        app.worker(notifyq.Settings(), dsn=dsn)


async def test_secrets_are_never_logged(
    app: notifyq.App,
    dsn: str,
    web: Endpoints,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def echo(request: Received, receive: Any) -> Reply:
        # A careless endpoint echoes the request's headers in its error.
        return 500, {}, json.dumps(request.headers).encode()

    web.routes["/echo"] = echo
    monkeypatch.setenv("NOTIFYQ_SECRET_ECHO", SECRET)
    app.http_task("echo", url=web.url("/echo"), secret="ECHO", max_attempts=1)
    with caplog.at_level(logging.DEBUG):
        async with serving(app, dsn):
            job = await app.enqueue("echo")
            await eventually(lambda: status_of(dsn, job) == "dead")
    (request,) = web.at("/echo")
    signature = request.headers["notifyq-signature"]
    last_error = job_row(dsn, job)[3]
    assert "HTTP 500" in last_error
    for text in (caplog.text, last_error):
        assert SECRET not in text
        assert signature not in text


def test_secrets_come_from_the_environment_and_the_file(tmp_path: Any) -> None:
    path = tmp_path / "secrets"
    path.write_text("# signing secrets\nMAIL=from-file\nMAIL_PREVIOUS=old\nHOOK=hook\n")
    path.chmod(0o600)
    secrets = Secrets(path, env={"NOTIFYQ_SECRET_HOOK": "from-env"})
    assert secrets.keys("MAIL") == ["from-file", "old"]
    assert secrets.keys("HOOK") == ["from-env"]
    with pytest.raises(ConfigurationError, match=r"set the environment variable NOTIFYQ_SECRET_X"):
        secrets.keys("X")
    path.write_text("not a pair with s3cret\n")
    with pytest.raises(ConfigurationError, match="line 1") as refused:
        Secrets(path)
    assert "s3cret" not in str(refused.value)


def test_a_secrets_file_others_can_read_is_warned_of(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "secrets"
    path.write_text("HOOK=value\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="notifyq.http"):
        Secrets(path)
    assert f"chmod 600 {path}" in caplog.text and "value" not in caplog.text


def test_an_http_task_without_httpx_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("notifyq.http.serving.httpx_installed", lambda: False)
    with pytest.raises(ConfigurationError, match=r"pip install 'notifyq\[http\]'"):
        notifyq.App().http_task("t", url="http://example.com/")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"url": "ftp://x/y"}, "http:// or https://"),
        ({"url": "http://x", "headers": {"Authorization": "Bearer t"}}, "credential"),
        ({"url": "http://x", "headers": {"Notifyq-Job-Id": "1"}}, "set by the delivery"),
        ({"url": "http://x", "timeout": 0}, "timeout"),
        ({"url": "http://x", "max_concurrency": 0}, "max_concurrency"),
        ({"url": "http://x", "secret": "lower"}, "NAME of a secret"),
    ],
)
def test_an_endpoint_is_checked(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        endpoint("t", **kwargs)


async def test_a_sessions_clients_share_one_verifying_tls_context() -> None:
    """Concurrency 200 is 25 clients: one TLS context for all (each its own loaded the CA
    bundle again, blocking the loop for seconds), with verification on."""
    import ssl

    from notifyq.http.delivery import Session

    session = Session("claimant", Secrets(env={}), 200)
    try:
        contexts = {id(c._transport._pool._ssl_context) for c in session._clients}
        tls = session._clients[0]._transport._pool._ssl_context
    finally:
        await session.aclose()
    assert len(session._clients) == 25 and len(contexts) == 1
    assert tls.verify_mode == ssl.CERT_REQUIRED and tls.check_hostname


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert retry_after("120") == 120.0
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480.0 - 30) == 30.0
    assert retry_after("soon") is None
    assert retry_after("99999999") == 86400.0


def test_urls_are_shown_without_credentials() -> None:
    assert shown("https://user:pw@host:8443/p?key=1") == "https://host:8443/p?..."


async def test_the_table_only_changes_announce_on_the_internal_channel(dsn: str) -> None:
    import psycopg

    from tests.helpers import listen_on

    with psycopg.connect(dsn, autocommit=True) as conn:
        listen_on(conn, channels.INTERNAL)
        query(
            dsn,
            "INSERT INTO notifyq.endpoints (task, url) VALUES ('a', 'http://x'), ('b', 'http://y')",
        )
        notes = [n.payload for n in conn.notifies(timeout=1.0, stop_after=2)]
    assert notes == ["endpoints"]  # one per statement


async def test_a_body_that_is_not_json_is_kept_as_text(
    app: notifyq.App, dsn: str, web: Endpoints
) -> None:
    app.http_task("plain", url=web.on("/plain", (200, {"content-type": "text/plain"}, b"done")))
    async with serving(app, dsn):
        job = await app.enqueue("plain")
        assert await app.wait(job, timeout=20) == "done"


async def test_a_capped_endpoint_is_not_claimed_past_its_cap(
    app: notifyq.App, dsn: str, web: Endpoints
) -> None:
    in_flight = [0, 0]  # now, most ever

    async def held(request: Received, receive: Any) -> Reply:
        in_flight[0] += 1
        in_flight[1] = max(in_flight)
        await asyncio.to_thread(web.release.wait, 30)
        in_flight[0] -= 1
        return ok()

    web.routes["/one"] = held
    app.http_task("one.at.a.time", url=web.url("/one"), max_concurrency=1)
    async with serving(app, dsn, concurrency=10) as worker:
        first = await app.enqueue("one.at.a.time", {"n": 0})
        await eventually(lambda: len(web.at("/one")) == 1)
        claims = worker.dispatcher.claims
        rest = [await app.enqueue("one.at.a.time", {"n": n}) for n in (1, 2)]
        await eventually(lambda: worker.dispatcher.claims > claims)
        # Nine slots are free, but the claim leaves the task out while its endpoint is full.
        assert status_of(dsn, rest[0]) == status_of(dsn, rest[1]) == "queued"
        web.release.set()
        for job in [first, *rest]:
            await app.wait(job, timeout=20)
    assert len(web.at("/one")) == 3
    assert in_flight[1] == 1


async def test_one_claim_takes_no_more_than_a_capped_endpoints_room(
    app: notifyq.App, dsn: str, web: Endpoints
) -> None:
    """A backlog of a capped endpoint's jobs, older than a Python task's: the claim takes
    only the endpoint's room of them, so the other slots run the Python jobs instead of
    holding jobs that wait for the endpoint."""

    async def held(request: Received, receive: Any) -> Reply:
        await asyncio.to_thread(web.release.wait, 30)
        return ok()

    web.routes["/two"] = held
    app.http_task("two.at.a.time", url=web.url("/two"), max_concurrency=2)

    @app.task(name="quick")
    async def quick(payload: Any) -> None:
        pass

    capped = [await app.enqueue("two.at.a.time", {"n": n}) for n in range(10)]
    others = [await app.enqueue("quick") for _ in range(3)]
    async with serving(app, dsn, concurrency=10) as worker:
        for job in others:  # while the endpoint still holds its two requests
            await app.wait(job, timeout=20)
        await eventually(lambda: len(web.at("/two")) == 2)
        statuses = [status_of(dsn, job) for job in capped]
        assert statuses.count("running") == 2 and statuses.count("queued") == 8
        assert worker.held.running == 2
        web.release.set()
        for job in capped:
            await app.wait(job, timeout=20)
    assert len(web.at("/two")) == 10


async def test_a_cap_added_by_a_reload_counts_the_requests_in_flight(
    app: notifyq.App, dsn: str, web: Endpoints
) -> None:
    async def held(request: Received, receive: Any) -> Reply:
        await asyncio.to_thread(web.release.wait, 30)
        return ok()

    web.routes["/grow"] = held
    query(dsn, "INSERT INTO notifyq.endpoints (task, url) VALUES ('grow', %s)", web.url("/grow"))
    async with serving(app, dsn, concurrency=10) as worker:
        jobs = [await app.enqueue("grow") for _ in range(2)]
        await eventually(lambda: len(web.at("/grow")) == 2)
        query(dsn, "UPDATE notifyq.endpoints SET max_concurrency = 1 WHERE task = 'grow'")
        await eventually(lambda: "grow" in worker.http.rooms())
        assert worker.http.rooms() == {"grow": 0}  # two in flight: over the new cap of one
        claims = worker.dispatcher.claims
        jobs.append(await app.enqueue("grow"))
        await eventually(lambda: worker.dispatcher.claims > claims)
        assert status_of(dsn, jobs[2]) == "queued"
        web.release.set()
        for job in jobs:
            await app.wait(job, timeout=20)
    assert len(web.at("/grow")) == 3


async def test_http_requests_are_counted_in_the_metrics(
    app: notifyq.App, dsn: str, web: Endpoints
) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    app.http_task(
        "counted",
        url=web.on("/counted", (503, {}, b""), ok({"ok": 1})),
        backoff=notifyq.Backoff(base=0.05, max_delay=0.05),
    )
    async with serving(app, dsn, metrics_port=0) as worker:
        job = await app.enqueue("counted")
        await app.wait(job, timeout=20)
        assert worker.metrics is not None
        text = prometheus_client.generate_latest(worker.metrics.registry).decode()
    assert 'notifyq_http_requests_total{code="503",task="counted"} 1.0' in text
    assert 'notifyq_http_requests_total{code="200",task="counted"} 1.0' in text
    assert 'notifyq_http_request_seconds_count{task="counted"} 2.0' in text


def test_kill_9_mid_request_then_rescue_delivers_it_again(dsn: str, web: Endpoints) -> None:
    """A real `notifyq serve` killed while its request is in flight: the job is rescued
    (its session ended) and a second dispatcher delivers it again, with the same
    Idempotency-Key and the next attempt number (at least once)."""
    arrived = threading.Event()

    async def first_hangs(request: Received, receive: Any) -> Reply:
        if request.headers["notifyq-attempt"] == "1":
            arrived.set()
            await asyncio.to_thread(web.release.wait, 60)
        return ok({"attempt": request.headers["notifyq-attempt"]})

    web.routes["/crash"] = first_hangs
    query(dsn, "INSERT INTO notifyq.endpoints (task, url) VALUES ('crash', %s)", web.url("/crash"))
    (job,) = query(dsn, "INSERT INTO notifyq.jobs (task) VALUES ('crash') RETURNING id")[0]
    args = ("--lease", "2", "--poll-interval", "0.5")
    with serve_process(dsn, *args, app="tests.apps.idle:app") as victim:
        assert arrived.wait(30), "the first dispatcher never delivered the job"
        victim.kill()  # SIGKILL: no hand-back, no outcome
        victim.wait(30)
    assert status_of(dsn, job) == "running"
    with serve_process(dsn, *args, app="tests.apps.idle:app"):
        wait_until(lambda: status_of(dsn, job) == "succeeded", timeout=30, message="the rescue")
    first, second = web.at("/crash")
    assert (first.headers["notifyq-attempt"], second.headers["notifyq-attempt"]) == ("1", "2")
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"]
    assert job_row(dsn, job)[2] == {"attempt": "2"}


async def test_the_node_endpoint_verifies_real_deliveries(
    app: notifyq.App, dsn: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """examples/http/endpoint-node.mjs (verify-node.mjs inside) against a dispatcher's
    own requests: signed with its secret they succeed, with another one they are refused
    (401, so dead at once)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("examples/http needs node (>= 20) on PATH (Debian: nodejs)")
    monkeypatch.setenv("NOTIFYQ_SECRET_NODE", SECRET)
    monkeypatch.setenv("NOTIFYQ_SECRET_WRONG", "not-the-endpoints-secret")
    with node_endpoint(node, tmp_path / "node.log", secret=SECRET) as server:
        app.http_task("node.signed", url=server.url, secret="NODE")
        app.http_task("node.forged", url=server.url, secret="WRONG")
        async with serving(app, dsn):
            good = await app.enqueue("node.signed", {"n": "é"})
            bad = await app.enqueue("node.forged")
            assert await app.wait(good, timeout=20) == {"ok": True, "id": good}
            await eventually(lambda: status_of(dsn, bad) == "dead")
        lines = server.lines()
    assert "HTTP 401 Unauthorized" in job_row(dsn, bad)[3]
    assert sorted(line.split()[2] for line in lines) == ["200", "401"]
