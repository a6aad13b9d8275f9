"""Handlers that log through stdlib logging, as users' handlers do: their lines must
name the job they ran for (tests/test_logs.py)."""

from __future__ import annotations

import logging

import notifyq

app = notifyq.App()
log = logging.getLogger("tests.chatty")


@app.task(name="chatty.sync")
def sync(payload: dict[str, int]) -> None:
    # A plain def: it runs in a worker thread, which must see the attempt's context.
    log.info("sync handler says %s", payload["n"])


@app.task(name="chatty.async", queue="loud")
async def async_(payload: dict[str, int]) -> None:
    log.warning("async handler says %s", payload["n"])
