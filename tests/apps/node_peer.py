"""The Python side of tests/test_node_worker.py: handlers under the task names of the Node
worker's examples (examples/node-worker/tasks.js), so `notifyq serve` and the Node worker
work one queue together."""

from __future__ import annotations

from typing import Any

import anyio

import notifyq

app = notifyq.App()


@app.task(name="example.noop")
async def noop(payload: object) -> None:
    return None


@app.task(name="example.sleep")
async def sleep(payload: dict[str, Any]) -> dict[str, Any]:
    ms = payload.get("ms", 1000)
    await anyio.sleep(ms / 1000)
    return {"slept": ms}
