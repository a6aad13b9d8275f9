"""A FastAPI app that enqueues inside its request's transaction.

    pip install -e '.[examples]'                   # FastAPI and uvicorn
    notifyq serve --app examples.fastapi.app:jobs   # runs orders.confirm
    uvicorn examples.fastapi.app:api                # in another terminal (same NOTIFYQ_DSN)
    curl -X POST localhost:8000/orders -H 'content-type: application/json' \\
         -d '{"id": 1, "email": "ada@example.com"}'
    curl localhost:8000/orders/1

`POST /orders` inserts the order and enqueues its confirmation in one transaction: both
or neither (an order id taken already is a 409, and no job is left behind).
`GET /orders/{id}` shows the order and where its confirmation job stands.  The
lifespan (notifyq.contrib.asgi) checks the schema at start-up, creates the app's
table, and closes notifyq's connections at shutdown.  One connection per request keeps
the example short: use a pool (psycopg_pool) in production.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pydantic
from fastapi import FastAPI, HTTPException

import notifyq
from notifyq.app import resolve_dsn
from notifyq.contrib.asgi import lifespan

jobs = notifyq.App()


class Confirmation(pydantic.BaseModel):
    order: int
    email: str


@jobs.task(name="orders.confirm")
async def confirm(confirmation: Confirmation) -> dict[str, Any]:
    """Send the confirmation (here: return what would be sent)."""
    return {"sent_to": confirmation.email, "order": confirmation.order}


class NewOrder(pydantic.BaseModel):
    id: int
    email: str


@asynccontextmanager
async def transaction() -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    async with (
        await psycopg.AsyncConnection.connect(resolve_dsn(jobs.dsn)) as conn,
        conn.transaction(),
    ):
        yield conn


@asynccontextmanager
async def tables(api: FastAPI) -> AsyncIterator[None]:
    async with transaction() as conn:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS shop_orders (id bigint PRIMARY KEY, email text NOT NULL,"
            " confirmation bigint)"
        )
    yield


api = FastAPI(lifespan=lifespan(jobs, then=tables))


@api.post("/orders", status_code=201)
async def create_order(order: NewOrder) -> dict[str, Any]:
    try:
        async with transaction() as conn:
            await conn.execute(
                "INSERT INTO shop_orders (id, email) VALUES (%s, %s)", [order.id, order.email]
            )
            job = await jobs.enqueue(
                "orders.confirm", Confirmation(order=order.id, email=order.email), conn=conn
            )
            await conn.execute(
                "UPDATE shop_orders SET confirmation = %s WHERE id = %s", [job, order.id]
            )
    except psycopg.errors.UniqueViolation:
        raise HTTPException(409, f"order {order.id} exists already") from None
    return {"order": order.id, "confirmation": job}


@api.get("/orders/{order_id}")
async def show_order(order_id: int) -> dict[str, Any]:
    async with transaction() as conn:
        cur = await conn.execute(
            "SELECT email, confirmation FROM shop_orders WHERE id = %s", [order_id]
        )
        row = await cur.fetchone()
    if row is None:
        raise HTTPException(404, f"no order {order_id}")
    email, job = row
    status = await jobs.status(job)
    return {
        "order": order_id,
        "email": email,
        "confirmation": {"job": job, "status": status.status if status else None},
    }
