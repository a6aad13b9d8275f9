"""Retention: `notifyq serve` deletes finished jobs once they are old enough.

Each dispatcher sweeps every `interval` (jittered, so many dispatchers do not
sweep in step), calling notifyq.purge_batch (schema.sql) once per batch, each
in its own short transaction: a sweep never holds locks for long, never
touches queued or running rows, and steps around rows another dispatcher's
sweep holds (SKIP LOCKED), so any number of dispatchers may sweep at once.
A job's history rows go with it.  Statuses kept equally long share their
batches (succeeded and cancelled, by default): one statement per age.  Each
sweep also deletes the unique_for windows that ended (notifyq.unique_windows),
even where jobs are kept forever.

Each batch also says when a row left could next be old enough (the oldest
finished row younger than the cutoff, plus the age): until then a sweep would
find nothing, so none runs, however short `interval` is, up to a day.  An idle
dispatcher of a database whose finished jobs are all recent sweeps once at
start and then about once a day, not every ten minutes.
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
        groups: dict[float, list[str]] = {}
        for status, age in ages.items():
            if age is not None:
                groups.setdefault(age, []).append(status)
        self._groups = sorted(groups.items())  # (age, statuses)
        self._interval = interval
        self.deleted = 0
        self.sweeps = 0
        self.windows_expired = 0  # unique_for windows deleted
        self._next_in: float | None = None  # seconds from the last sweep to the next due

    async def run(self) -> None:
        # Jobs kept forever still have unique_for windows that end: those are swept.
        # Dispatchers started together would otherwise sweep together.
        await anyio.sleep(random.uniform(0.0, min(self._interval, 60.0)))
        while True:
            await self.sweep()
            await anyio.sleep(self.next_wait())

    def next_wait(self) -> float:
        """Seconds from the last sweep to the next: the interval, or longer while nothing
        can be old enough (at most a day: a row written by hand with an old finish)."""
        wait = self._interval * random.uniform(0.9, 1.1)
        if self._next_in is not None:
            wait = max(wait, min(self._next_in, DAY))
        return wait

    async def sweep(self) -> int:
        """Delete what is old enough, batch by batch; returns how many jobs went."""
        swept = 0
        due: list[float] = []
        try:
            for age, statuses in self._groups:
                while True:
                    purged = await self._store.purge_batch(age, statuses, BATCH)
                    swept += purged.deleted
                    if purged.deleted < BATCH:
                        due.append(age if purged.next_in is None else purged.next_in)
                        break
                    # Let claims and completions in between batches.
                    await anyio.lowlevel.checkpoint()
            self.windows_expired += await self._expire_windows()
        except DatabaseUnavailable as exc:
            log.warning("retention sweep stopped (%s); the next sweep goes on", exc)
        except NotifyqError as exc:
            log.error("retention sweep failed: %s", exc)
        # A group not swept to the end (a failure) is due at once: no skipping then.
        self._next_in = min(due) if due and len(due) == len(self._groups) else None
        if swept:
            log.info("retention deleted %d finished jobs", swept)
        self.deleted += swept
        self.sweeps += 1
        return swept

    async def _expire_windows(self) -> int:
        """Delete the unique_for windows that ended (notifyq.expire_unique_windows).  Not
        part of next_in: a window's end is not a finished job's age, and a sweep that finds
        none costs one probe of a small index."""
        expired = 0
        while True:
            batch = await self._store.expire_unique_windows(BATCH)
            expired += batch
            if batch < BATCH:
                return expired
            await anyio.lowlevel.checkpoint()
