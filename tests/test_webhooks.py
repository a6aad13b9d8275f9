"""Completion webhooks: a job with a callback_url is POSTed, signed, to a real receiver on
127.0.0.1 when it ends (notifyq/http/webhooks.py, schema.sql "Completion webhooks")."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import anyio
import psycopg
import pytest

import notifyq
from notifyq import DoNotRetry, InvalidJob, store
from notifyq.http import verify
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
