"""Tasks named in OPTIONS["MODULES"] by the tests that need them (not autodiscovered:
the project's own app keeps its count of tasks)."""

from __future__ import annotations

import time

import anyio
from django.tasks import task


@task
async def sleep_async(seconds: float) -> None:
    await anyio.sleep(seconds)


@task
def sleep_sync(seconds: float) -> str:
    time.sleep(seconds)
    return "done"
