"""The benchmark's dispatcher app: no-op handlers that note when they start.

Each start is appended as "job_id unix_time" to the file named by
NOTIFYQ_BENCH_OUT (one write per job, no database round trip), so latency
is measured from the producer's commit to the handler's first line.
"""

from __future__ import annotations

import os
import time
from typing import Any

import notifyq

app = notifyq.App()
_out = os.open(os.environ.get("NOTIFYQ_BENCH_OUT", os.devnull), os.O_WRONLY | os.O_APPEND)


@app.task(name="bench.noop")
async def noop(payload: Any) -> None:
    pass


@app.task(name="bench.stamp")
async def stamp(payload: Any, ctx: notifyq.JobContext) -> None:
    os.write(_out, f"{ctx.id} {time.time()}\n".encode())
