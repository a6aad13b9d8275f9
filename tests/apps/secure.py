"""A test app for tests/test_security.py: runs under a least-privilege worker role.

`secure.chain` enqueues `secure.leaf` from inside the handler (a worker may
enqueue as a member of the producer role); `secure.echo` reads its payload.
"""

from __future__ import annotations

from typing import Any

import notifyq

app = notifyq.App()


@app.task(name="secure.chain")
def chain(payload: dict[str, Any]) -> None:
    app.enqueue_sync("secure.leaf", {"from": payload["n"]})


@app.task(name="secure.leaf")
def leaf(payload: dict[str, Any]) -> None:
    pass


@app.task(name="secure.echo", max_attempts=5)
def echo(payload: Any) -> None:
    repr(payload)


@app.task(name="secure.double")
def double(payload: dict[str, Any], ctx: notifyq.JobContext) -> int:
    ctx.progress(50, "half way")
    return int(payload["n"]) * 2
