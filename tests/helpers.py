"""Helpers shared by the in-process dispatcher tests: run a Worker, poll a condition.

Import them from here (`from tests.helpers import eventually, serving`); fixtures
and the server set-up live in conftest.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import psycopg
from psycopg import sql

import notifyq
from notifyq import Settings


@asynccontextmanager
async def serving(app: notifyq.App, dsn: str, **settings: Any) -> AsyncIterator[notifyq.Worker]:
    """Run a Worker in the background; stop it gracefully on exit."""
    worker = app.worker(Settings(**settings), dsn=dsn)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        with anyio.fail_after(10):
            await worker.ready.wait()
            if worker.settings.listen:
                await worker.listening.wait()
            # Let the start-up claim finish, so tests see the steady state.
            while worker.dispatcher.claims == 0:  # noqa: ASYNC110 - a counter, not an event
                await anyio.sleep(0.005)
        try:
            yield worker
        finally:
            worker.stop()


async def eventually(condition: Any, within: float = 20.0) -> Any:
    """Poll a (blocking) condition off the event loop until it holds; fail after `within` s."""
    with anyio.fail_after(within):
        while True:
            value = await anyio.to_thread.run_sync(condition)
            if value:
                return value
            await anyio.sleep(0.02)


def listen_on(conn: psycopg.Connection[Any], *names: str) -> None:
    """LISTEN on each channel (named by notifyq.channels) on the caller's connection."""
    for name in names:
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(name)))
