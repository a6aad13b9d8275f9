"""A test app with an every-second periodic job whose handler records its instant."""

from __future__ import annotations

import os

import psycopg

import notifyq

app = notifyq.App()


@app.periodic("* * * * * *", name="tick.every_second", payload={"source": "test"})
def every_second(payload: dict[str, str], ctx: notifyq.JobContext) -> None:
    # The test creates the table `ran` before it starts dispatchers.
    with psycopg.connect(os.environ["NOTIFYQ_DSN"], autocommit=True) as conn:
        conn.execute(
            "INSERT INTO ran VALUES (%s, %s, %s)", (ctx.id, payload["instant"], os.getpid())
        )
