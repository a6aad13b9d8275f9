"""The example apps tested as their users would, with notifyq's pytest plugin:
examples/fastapi on the real queue (drain), examples/hello in eager mode."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

import notifyq
from notifyq import PayloadError
from notifyq.testing import EagerQueue, TestQueue

pytestmark = pytest.mark.anyio


@pytest.fixture
def notifyq_app(request: pytest.FixtureRequest) -> notifyq.App:
    app: notifyq.App = request.param
    return app


@pytest.fixture
async def shop(notifyq_dsn: str) -> AsyncIterator[httpx.AsyncClient]:
    from examples.fastapi.app import api

    async with api.router.lifespan_context(api):
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as http:
            yield http


def fastapi_jobs() -> notifyq.App:
    from examples.fastapi.app import jobs

    return jobs


def hello_app() -> notifyq.App:
    from examples.hello import app

    return app


@pytest.mark.parametrize("notifyq_app", [fastapi_jobs()], indirect=True)
async def test_an_order_enqueues_its_confirmation_which_runs(
    shop: httpx.AsyncClient, notifyq_queue: TestQueue
) -> None:
    from examples.fastapi.app import Confirmation

    created = await shop.post("/orders", json={"id": 7, "email": "ada@example.com"})
    assert created.status_code == 201, created.text
    # A model compares as what it dumps to.
    [job] = notifyq_queue.assert_enqueued(
        "orders.confirm", Confirmation(order=7, email="ada@example.com"), count=1
    )
    again = await shop.post("/orders", json={"id": 7, "email": "bo@example.com"})
    assert again.status_code == 409
    notifyq_queue.assert_enqueued("orders.confirm", count=1)  # rolled back with the order

    [outcome] = await notifyq_queue.drain()
    assert (outcome.id, outcome.status) == (job.id, "succeeded")
    assert outcome.result == {"sent_to": "ada@example.com", "order": 7}
    shown: dict[str, Any] = (await shop.get("/orders/7")).json()
    assert shown["confirmation"] == {"job": job.id, "status": "succeeded"}


@pytest.mark.parametrize("notifyq_app", [hello_app()], indirect=True)
def test_hello_in_eager_mode(notifyq_eager: EagerQueue, notifyq_app: notifyq.App) -> None:
    notifyq_app.enqueue_sync("hello.greet", {"name": "Ada"})
    notifyq_app.enqueue_sync("hello.shout", {"name": "ada"})
    notifyq_eager.assert_enqueued("hello.shout", {"name": "ada"}, count=1)
    with pytest.raises(PayloadError, match="needs a 'name'"):
        notifyq_app.enqueue_sync("hello.shout", {})
    assert [j.status for j in notifyq_eager.jobs()] == ["succeeded", "succeeded", "dead"]
