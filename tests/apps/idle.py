"""A test app with one task that naps for an hour: a job that is still running when a
test ends `notifyq serve` (tests/test_embedded.py)."""

from __future__ import annotations

import anyio

import notifyq

app = notifyq.App()


@app.task(name="idle.nap")
async def nap(payload: object, ctx: notifyq.JobContext) -> None:
    await anyio.sleep(3600)
