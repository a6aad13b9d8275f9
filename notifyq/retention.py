"""Retention: `notifyq serve` deletes finished jobs once they are old enough.

Each dispatcher sweeps every `interval` (jittered, so many dispatchers do not
sweep in step), calling notifyq.purge_batch (schema.sql) once per batch, each
in its own short transaction: a sweep never holds locks for long, never
touches queued or running rows, and steps around rows another dispatcher's
sweep holds (SKIP LOCKED), so any number of dispatchers may sweep at once.
A job's history rows go with it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping

import anyio
import anyio.lowlevel

from .errors import DatabaseUnavailable, NotifyqError
from .job import JobState
from .store import Store

log = logging.getLogger("notifyq.retention")

DAY = 86400.0
DEFAULTS: Mapping[str, float | None] = {
    JobState.SUCCEEDED: 7 * DAY,
    JobState.CANCELLED: 7 * DAY,
    JobState.DEAD: 30 * DAY,  # the dead-letter queue is kept longer: someone should look at it
}
BATCH = 1000  # rows per transaction
INTERVAL = 600.0  # seconds between sweeps


class Retention:
    def __init__(
        self, store: Store, ages: Mapping[str, float | None], interval: float = INTERVAL
    ) -> None:
        self._store = store
        self._ages = {status: age for status, age in ages.items() if age is not None}
        self._interval = interval
        self.deleted = 0

    async def run(self) -> None:
        if not self._ages:
            return  # kept forever
        # Dispatchers started together would otherwise sweep together.
        await anyio.sleep(random.uniform(0.0, min(self._interval, 60.0)))
        while True:
            await self.sweep()
            await anyio.sleep(self._interval * random.uniform(0.9, 1.1))

    async def sweep(self) -> int:
        """Delete what is old enough, batch by batch; returns how many jobs went."""
        swept = 0
        try:
            for status, age in self._ages.items():
                while True:
                    deleted = await self._store.purge_batch(age, status, BATCH)
                    swept += deleted
                    if deleted < BATCH:
                        break
                    # Let claims and completions in between batches.
                    await anyio.lowlevel.checkpoint()
        except DatabaseUnavailable as exc:
            log.warning("retention sweep stopped (%s); the next sweep goes on", exc)
        except NotifyqError as exc:
            log.error("retention sweep failed: %s", exc)
        if swept:
            log.info("retention deleted %d finished jobs", swept)
        self.deleted += swept
        return swept
