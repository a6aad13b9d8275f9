"""examples/fastapi: a FastAPI app that enqueues inside its request's transaction, run
through the ASGI transport with its lifespan (notifyq.contrib.asgi)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette

import notifyq
from notifyq import SchemaMissing, Settings
from notifyq.contrib.asgi import lifespan
from tests.conftest import query
from tests.helpers import eventually, serving

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def client(api: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with api.router.lifespan_context(api):
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as http:
            yield http


async def test_an_order_and_its_job_commit_together(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFYQ_DSN", dsn)
    from examples.fastapi.app import api, jobs

    async with client(api) as http:
        created = await http.post("/orders", json={"id": 1, "email": "ada@example.com"})
        assert created.status_code == 201, created.text
        job = created.json()["confirmation"]
        # The same order again: the INSERT fails, the transaction rolls back, no job is left.
        again = await http.post("/orders", json={"id": 1, "email": "bo@example.com"})
        assert again.status_code == 409
        assert query(dsn, "SELECT id, task, status FROM notifyq.jobs") == [
            (job, "orders.confirm", "queued")
        ]
        assert query(dsn, "SELECT payload FROM notifyq.jobs") == [
            ({"order": 1, "email": "ada@example.com"},)
        ]
        async with serving(jobs, dsn, poll_interval=3600):
            await eventually(
                lambda: query(dsn, "SELECT status FROM notifyq.jobs") == [("succeeded",)]
            )
        shown = (await http.get("/orders/1")).json()
        assert shown["confirmation"] == {"job": job, "status": "succeeded"}
        assert (await http.get("/orders/2")).status_code == 404
    assert query(dsn, "SELECT result FROM notifyq.jobs") == [
        ({"sent_to": "ada@example.com", "order": 1},)
    ]


async def test_the_lifespan_can_serve_the_apps_tasks_in_process(dsn: str) -> None:
    jobs = notifyq.App(dsn=dsn)
    ran = anyio.Event()

    @jobs.task(name="web.ping")
    async def ping(payload: dict[str, Any]) -> None:
        ran.set()

    web = Starlette(lifespan=lifespan(jobs, serve=Settings(poll_interval=3600)))
    async with web.router.lifespan_context(web):
        await jobs.enqueue("web.ping", {})
        with anyio.fail_after(10):
            await ran.wait()
    # Shut down gracefully: the job's outcome was written before the lifespan ended.
    assert query(dsn, "SELECT status FROM notifyq.jobs") == [("succeeded",)]


async def test_the_lifespan_refuses_to_start_without_the_schema(empty_dsn: str) -> None:
    web = Starlette(lifespan=lifespan(notifyq.App(dsn=empty_dsn)))
    with pytest.raises(SchemaMissing, match="notifyq migrate"):
        async with web.router.lifespan_context(web):
            pass
