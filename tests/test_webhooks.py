"""Completion webhooks: a job with a callback_url is POSTed, signed, to a real receiver on
127.0.0.1 when it ends (notifyq/http/webhooks.py, schema.sql "Completion webhooks")."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.abc
import httpx
import psycopg
import pytest

import notifyq
from notifyq import DoNotRetry, InvalidJob, store
from notifyq.http import verify, webhooks
from notifyq.http.endpoints import Secrets
from notifyq.http.webhooks import WebhookSender
from tests.conftest import query
from tests.helpers import eventually, serving
from tests.test_http import Endpoints, app, ok, web  # noqa: F401 - fixtures used by name

pytestmark = pytest.mark.anyio

SECRET = "webhook-secret-value"


@pytest.fixture
def allowed(dsn: str, web: Endpoints) -> Iterator[str]:  # noqa: F811 - the fixture above
    """The receiver's /hooks/ allowed, signed with the secret named HOOKS."""
    prefix = web.url("/hooks/")
    query(
        dsn, "INSERT INTO notifyq.webhook_allowlist (prefix, secret) VALUES (%s, 'HOOKS')", prefix
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NOTIFYQ_SECRET_HOOKS", SECRET)
        yield prefix


def deliveries(dsn: str) -> list[tuple[Any, ...]]:
    return query(
        dsn,
        "SELECT job_id, status, attempts, last_error FROM notifyq.webhook_deliveries ORDER BY id",
    )


async def test_delivered_and_signed(
    app: notifyq.App,  # noqa: F811
    dsn: str,
    web: Endpoints,  # noqa: F811
    allowed: str,
) -> None:
    url = web.on("/hooks/done", ok())

    @app.task(name="wh.report", callback_url=url)
    async def report(payload: Any) -> dict[str, int]:
        return {"pages": payload["n"]}

    async with serving(app, dsn):
        job = await app.enqueue("wh.report", {"n": 3})
        assert await app.wait(job, timeout=20) == {"pages": 3}
        await eventually(lambda: deliveries(dsn) and deliveries(dsn)[0][1] == "delivered")
    (request,) = web.at("/hooks/done")
    verify(SECRET, request.headers, request.body)  # raises unless signed with the secret
    body = request.json
    assert {k: body[k] for k in ("id", "task", "status", "attempts", "result", "error")} == {
        "id": job,
        "task": "wh.report",
        "status": "succeeded",
        "attempts": 1,
        "result": {"pages": 3},
        "error": None,
    }
    assert request.headers["notifyq-job-id"] == str(job)
    assert deliveries(dsn) == [(job, "delivered", 1, None)]


async def test_retried_after_a_500_then_delivered(
    app: notifyq.App,  # noqa: F811
    dsn: str,
    web: Endpoints,  # noqa: F811
    allowed: str,
) -> None:
    url = web.on("/hooks/flaky", (500, {}, b"busy"), ok())

    @app.task(name="wh.fails")
    async def fails(payload: Any) -> None:
        raise DoNotRetry("no such customer")

    async with serving(app, dsn):
        job = await app.enqueue("wh.fails", {}, callback_url=url)  # the enqueue's own URL
        await eventually(lambda: deliveries(dsn) and deliveries(dsn)[0][1] == "delivered")
    first, second = web.at("/hooks/flaky")
    assert first.body == second.body  # the same frozen outcome, sent again
    assert second.json["status"] == "dead" and "no such customer" in second.json["error"]
    ((job_id, status, attempts, error),) = deliveries(dsn)
    assert (job_id, status, attempts) == (job, "delivered", 2)
    assert "HTTP 500" in error  # the failed attempt's error stays for the record


async def test_a_url_outside_the_allow_list_is_refused_by_the_database(
    app: notifyq.App,  # noqa: F811
    dsn: str,
    allowed: str,
) -> None:
    outside = "http://169.254.169.254/latest/meta-data/"
    with (
        psycopg.connect(dsn, autocommit=True) as conn,
        pytest.raises(psycopg.errors.CheckViolation, match=r"not allowed.*webhook_allowlist"),
    ):
        conn.execute("INSERT INTO notifyq.jobs (task, callback_url) VALUES ('t', %s)", (outside,))
    # A prefix cannot be stretched to another host.
    stretched = allowed.rstrip("/") + ".evil.example/"
    with pytest.raises(InvalidJob, match="not allowed"):
        await app.enqueue("t", {}, callback_url=stretched)
    with pytest.raises(InvalidJob, match="callback_url must be"):
        await app.enqueue("t", {}, callback_url="ftp://files.example.com/")
    # enqueue_many gives every job of the batch the URL.
    many = await app.enqueue_many("t", [{}, {}], callback_url=allowed + "batch")
    urls = query(dsn, "SELECT callback_url FROM notifyq.jobs WHERE id = ANY(%s)", list(many))
    assert urls == [(allowed + "batch",)] * 2
    # Nor can an allowed job be pointed elsewhere later.
    job = await app.enqueue("t", {}, callback_url=allowed + "ok")
    with (
        psycopg.connect(dsn, autocommit=True) as conn,
        pytest.raises(psycopg.errors.CheckViolation),
    ):
        conn.execute("UPDATE notifyq.jobs SET callback_url = %s WHERE id = %s", (outside, job))


async def test_a_job_without_callback_costs_no_delivery_row(
    app: notifyq.App,  # noqa: F811
    dsn: str,
) -> None:
    @app.task(name="wh.plain")
    async def plain(payload: Any) -> int:
        return 1

    async with serving(app, dsn):
        job = await app.enqueue("wh.plain", {})
        assert await app.wait(job, timeout=20) == 1
    doomed = await app.enqueue("wh.plain", {}, delay=3600)
    await app.cancel(doomed)
    assert deliveries(dsn) == []


async def test_two_dispatchers_deliver_each_once(
    dsn: str,
    web: Endpoints,  # noqa: F811
    allowed: str,
    anyio_backend: str,
) -> None:
    """Forty outcomes queued by SQL (jobs cancelled by an UPDATE), two senders on their own
    connections sharing them: every one arrives exactly once."""
    url = web.on("/hooks/many", ok())
    query(
        dsn,
        "INSERT INTO notifyq.jobs (task, callback_url) SELECT 't', %s FROM generate_series(1, 40)",
        url,
    )
    query(dsn, "UPDATE notifyq.jobs SET status = 'cancelled', finished_at = now()")
    assert len(deliveries(dsn)) == 40
    stores = [store.Store(dsn, "webhooks-a"), store.Store(dsn, "webhooks-b")]
    senders = [WebhookSender(st, Secrets(), poll_interval=0.05) for st in stores]
    try:
        async with anyio.create_task_group() as tg:
            for sender in senders:
                tg.start_soon(sender.run)
            await eventually(
                lambda: all(status == "delivered" for _, status, _, _ in deliveries(dsn))
            )
            tg.cancel_scope.cancel()
    finally:
        for st in stores:
            await st.close()
    seen = Counter(r.headers["notifyq-delivery-id"] for r in web.at("/hooks/many"))
    assert len(seen) == 40 and set(seen.values()) == {1}, seen
    assert sum(s.sent for s in senders) == 40
    for request in web.at("/hooks/many"):
        verify(SECRET, request.headers, request.body)


@pytest.mark.parametrize(
    "tail",
    [
        "../admin",
        "x/../../admin",
        "%2e%2e/admin",
        ".%2E/admin",
        "..%2fadmin",
        "..\\admin",
        "..;/admin",
        "./x",
        "..",
    ],
)
async def test_a_dot_segment_cannot_climb_out_of_the_prefix(
    app: notifyq.App,  # noqa: F811
    dsn: str,
    web: Endpoints,  # noqa: F811
    tail: str,
) -> None:
    """starts_with alone lets https://host/hooks/../admin through, and the client (httpx
    normalises dot segments) or the receiver POSTs it to /admin, outside the prefix."""
    query(dsn, "INSERT INTO notifyq.webhook_allowlist (prefix) VALUES (%s)", web.url("/hooks/"))
    with pytest.raises(InvalidJob, match=r"\"\.\.\" path segment"):
        await app.enqueue("t", {}, callback_url=web.url("/hooks/") + tail)
    # Dots that are not a whole segment stay allowed.
    await app.enqueue("t", {}, callback_url=web.url("/hooks/v1.2/a..b/.well"))


async def one_round(dsn: str, read_timeout: float = 10.0) -> None:
    """One claim-send-settle round of a sender, as `notifyq serve` runs it."""
    st = store.Store(dsn, "webhooks-round")
    try:
        async with httpx.AsyncClient(follow_redirects=False, timeout=read_timeout) as client:
            await WebhookSender(st, Secrets(), poll_interval=None).round(client)
    finally:
        await st.close()


def finished_with_callbacks(dsn: str, *urls: str) -> None:
    for url in urls:
        query(dsn, "INSERT INTO notifyq.jobs (task, callback_url) VALUES ('t', %s)", url)
    query(dsn, "UPDATE notifyq.jobs SET status = 'cancelled', finished_at = now()")


async def test_an_answer_with_a_nul_does_not_lose_the_batch(
    dsn: str,
    web: Endpoints,  # noqa: F811
    allowed: str,
) -> None:
    """PostgreSQL text holds no NUL: one receiver's answer with one must not fail the
    settle of the whole batch (whose sent rows would be POSTed again after the lease)."""
    bad = web.on("/hooks/nul", (500, {}, b"broken\x00answer"))
    good = web.on("/hooks/good", ok())
    finished_with_callbacks(dsn, bad, good)
    await one_round(dsn)
    (_, status_bad, attempts_bad, error), (_, status_good, _, _) = deliveries(dsn)
    assert (status_bad, attempts_bad, status_good) == ("pending", 1, "delivered")
    assert "broken\\x00answer" in error


async def test_an_invalid_url_is_given_up_not_a_crash(dsn: str, allowed: str) -> None:
    """A control character passes the URL's CHECK but httpx refuses the URL with
    InvalidURL, which is not an HTTPError: it must end that delivery, not the sender
    (and with it `notifyq serve`, again after every lease)."""
    finished_with_callbacks(dsn, allowed + "x\x01y")
    await one_round(dsn)
    ((_, status, attempts, error),) = deliveries(dsn)
    assert (status, attempts) == ("failed", 1)
    assert "invalid URL" in error


async def test_an_answer_trickled_past_the_timeout_is_cut(
    dsn: str, allowed: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """httpx's timeout bounds each read: a receiver answering a byte at a time would hold
    the request past the claim's lease, and another sender would POST the row again while
    this one still waits.  The sender bounds the whole request by TIMEOUT."""
    monkeypatch.setattr(webhooks, "TIMEOUT", 0.5)

    async def trickle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await stream.receive()
            await stream.send(b"HTTP/1.1 200 OK\r\ncontent-length: 40\r\n\r\n")
            # 8 s in all, far past TIMEOUT, each byte well within a read timeout.
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                for _ in range(40):
                    await stream.send(b"x")
                    await anyio.sleep(0.2)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    query(
        dsn,
        "INSERT INTO notifyq.webhook_allowlist (prefix) VALUES (%s)",
        f"http://127.0.0.1:{port}/",
    )
    finished_with_callbacks(dsn, f"http://127.0.0.1:{port}/slow")
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, trickle)
        await one_round(dsn, read_timeout=0.5)
        tg.cancel_scope.cancel()
    ((_, status, attempts, error),) = deliveries(dsn)
    assert (status, attempts) == ("pending", 1)
    assert "no complete answer within 0.5 s" in error
