"""Periodic jobs: cron schedules whose instants become jobs, each exactly once.

    @app.periodic("*/5 * * * *", timezone="Europe/Paris")   a Periodic, checked here (no I/O)
        │ Scheduler.define(), at dispatcher start
        v
    notifyq.periodic, one row per schedule (plain SQL may add, change or pause rows)
        │ Scheduler.tick(): every schedule and the database's now(), then for each
        │ the latest instant at or before now() not yet dealt with -> periodic_fire
        v
    notifyq.jobs, one job per instant, its payload holding the instant

Exactly once: every dispatcher runs a Scheduler, and all of them may race for
the same instant.  `periodic_fire` inserts the job in the statement that moves
the schedule's `last_instant` forward past the instant, conditionally on it
being before; PostgreSQL's row lock makes the loser re-read the winner's row
and do nothing.  The database decides, not timing.

Never a flood: only the latest due instant is considered; older ones are passed
over.  It is on time when reached within MISSED_AFTER seconds; later, it was
missed (every dispatcher was down, or the schedule paused): `missed="skip"`
records it without a job, `missed="once"` enqueues it.

Time: the instant decision uses the database clock only.  Instants are computed
by cronsim in the schedule's zone; around a DST change it follows Debian cron:
a time skipped by the clock going forward runs at the first valid time after
it, a time repeated going back runs once.  The local clock only measures how
long to sleep until the next instant: at most MAX_SLEEP, so rows changed by
SQL are picked up, unless the dispatcher listens (`heard`), since a change of
notifyq.periodic is announced on notifyq_internal (`changed`): then an idle
dispatcher whose schedules are far off (or that has none) reads nothing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio
from cronsim import CronSim, CronSimError

from . import enqueue
from .errors import ConfigurationError, DatabaseUnavailable, InvalidJob, NotifyqError
from .retry import reconnect_delay
from .store import Store

log = logging.getLogger("notifyq.periodic")

MISSED = ("skip", "once")
MISSED_AFTER = 60.0
"""Seconds after its instant when a job not yet enqueued counts as missed."""
MAX_SLEEP = 60.0
"""The scheduler re-reads the schedules at least this often (seconds)."""
INSTANT_KEY = "instant"
"""The payload key that carries the instant (ISO 8601, UTC) to the handler."""


@dataclass(frozen=True, slots=True)
class Periodic:
    """A schedule defined in Python; `row()` is its notifyq.periodic row."""

    name: str
    task: str
    schedule: str
    timezone: str
    missed: str
    queue: str
    payload_json: str
    priority: int

    def row(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "task": self.task,
            "schedule": self.schedule,
            "timezone": self.timezone,
            "missed": self.missed,
            "queue": self.queue,
            "payload": self.payload_json,
            "priority": self.priority,
            # NULL: the claim fills in the task's own max_attempts.
            "max_attempts": None,
        }


def check(
    schedule: str, *, timezone: str, missed: str, payload: Any, priority: int
) -> tuple[ZoneInfo, str]:
    """Validate a definition without I/O: its zone and its payload as JSON text,
    or ConfigurationError saying what is wrong."""
    zone = parse_zone(timezone)
    if next_after(schedule, zone, datetime.now(UTC)) is None:
        raise ConfigurationError(f"schedule {schedule!r} never fires")
    if missed not in MISSED:
        raise ConfigurationError(f"missed must be 'skip' or 'once', not {missed!r}")
    if payload is not None and not isinstance(payload, dict):
        raise ConfigurationError("a periodic job's payload must be a dict (a JSON object)")
    if payload and INSTANT_KEY in payload:
        raise ConfigurationError(f"the payload key {INSTANT_KEY!r} is reserved for the instant")
    if not isinstance(priority, int) or not -1000 <= priority <= 1000:
        raise ConfigurationError("priority must be an integer from -1000 to 1000")
    try:
        return zone, enqueue.encode(payload)
    except InvalidJob as exc:
        raise ConfigurationError(str(exc)) from exc


def parse_zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise ConfigurationError(
            f"unknown time zone {name!r}: use an IANA name such as 'UTC' or 'Europe/Paris'"
        ) from None


def _instants(schedule: str, start: datetime, *, reverse: bool = False) -> CronSim:
    if not isinstance(schedule, str):
        raise ConfigurationError(f"a schedule is a cron expression string, not {schedule!r}")
    try:
        return CronSim(schedule, start, reverse=reverse)
    except CronSimError as exc:
        raise ConfigurationError(
            f"invalid schedule {schedule!r}: {exc} (five cron fields, minute hour "
            "day-of-month month day-of-week, or six with seconds first)"
        ) from None


def next_after(schedule: str, zone: ZoneInfo, at: datetime) -> datetime | None:
    """The schedule's first instant strictly after `at` (in UTC); None if it never fires."""
    return next(_utc(_instants(schedule, at.astimezone(zone))), None)


def latest_at(schedule: str, zone: ZoneInfo, at: datetime) -> datetime | None:
    """The schedule's latest instant at or before `at` (in UTC), if any."""
    # Reversed, cronsim starts strictly before a whole second, or at the whole
    # second a fractional one is in: a microsecond later includes `at` itself.
    start = (at + timedelta(microseconds=1)).astimezone(zone)
    return next(_utc(_instants(schedule, start, reverse=True)), None)


def _utc(instants: CronSim) -> Any:
    for instant in instants:
        yield instant.astimezone(UTC)


class Scheduler:
    """Turns the instants of every schedule in notifyq.periodic into jobs; one per
    dispatcher, racing the others harmlessly (see the module docstring)."""

    def __init__(
        self, store: Store, definitions: Sequence[Periodic], *, grace: float = MISSED_AFTER
    ) -> None:
        self._store = store
        self._definitions = list(definitions)
        self._grace = grace
        self._defined = not self._definitions
        self._unusable: set[tuple[str, str, str]] = set()
        self._changed = anyio.Event()
        self._listening = False  # changes of notifyq.periodic are announced to us
        self.reads = 0  # times the schedules were read
        self.enqueued = 0
        self.skipped = 0

    async def run(self) -> None:
        """Until cancelled; database outages are waited out with capped, jittered backoff."""
        failures = 0
        while True:
            try:
                due_at = anyio.current_time() + await self.tick()
                failures = 0
            except DatabaseUnavailable as exc:
                failures += 1
                wait = reconnect_delay(failures, first=0.2, cap=10.0)
                log.warning(
                    "periodic scheduler lost the database (%s); retrying in %.1fs", exc, wait
                )
                due_at = anyio.current_time() + wait
            while True:
                # Not listening, changes go unheard: read again within MAX_SLEEP.  A sleep
                # capped so, which ends once the listener vouches, goes on uncapped.
                cap = math.inf if self._listening else MAX_SLEEP
                with anyio.move_on_after(min(due_at - anyio.current_time(), cap)):
                    await self._changed.wait()
                if self._changed.is_set() or anyio.current_time() >= due_at or not self._listening:
                    break
            self._changed = anyio.Event()

    def changed(self) -> None:
        """notifyq.periodic changed, or the listener reconnected: read it again."""
        self._changed.set()

    def heard(self, listening: bool) -> None:
        """Whether changes of notifyq.periodic are announced to us (the listener is up)."""
        if self._listening and not listening:
            self._changed.set()  # back to MAX_SLEEP: the current sleep may be longer
        self._listening = listening

    async def define(self) -> None:
        """Write the app's schedules to notifyq.periodic (unchanged rows stay as they are)."""
        for definition in self._definitions:
            if await self._store.define_periodic(definition.row()):
                log.info(
                    "periodic %s defined: %r in %s, missed=%s",
                    definition.name,
                    definition.schedule,
                    definition.timezone,
                    definition.missed,
                )
        self._defined = True

    async def tick(self) -> float:
        """Enqueue what is due now; returns the seconds until the next instant (inf: none)."""
        if not self._defined:
            await self.define()
        now, schedules = await self._store.periodic_schedules()
        self.reads += 1
        read_at = anyio.current_time()
        wait = math.inf
        for row in schedules:
            name, schedule, timezone = row.name, row.schedule, row.timezone
            try:
                zone = parse_zone(timezone)
                due = latest_at(schedule, zone, now)
                upcoming = next_after(schedule, zone, now)
            except ConfigurationError as exc:
                self._unusable_row(name, schedule, timezone, exc)
                continue
            if due is not None and due > row.since:
                await self._fire(name, schedule, timezone, due, now)
            if upcoming is not None:
                wait = min(wait, (upcoming - now).total_seconds())
        # Less the time the writes took; a hair past the instant, so the database's
        # clock has reached it too.
        return max(wait - (anyio.current_time() - read_at), 0.0) + 0.005

    async def _fire(
        self, name: str, schedule: str, timezone: str, instant: datetime, now: datetime
    ) -> None:
        try:
            result = await self._store.fire_periodic(name, schedule, timezone, instant, self._grace)
        except DatabaseUnavailable:
            raise
        except NotifyqError as exc:  # e.g. a row written by SQL whose job PostgreSQL refuses
            log.error("periodic %s: instant %s could not be enqueued: %s", name, instant, exc)
            return
        if result is None:
            return  # another dispatcher dealt with it, or the row changed meanwhile
        if result.enqueue:
            self.enqueued += 1
            log.debug("periodic %s: enqueued job=%s for instant %s", name, result.job_id, instant)
        else:
            self.skipped += 1
            log.warning(
                "periodic %s: instant %s missed by %.0fs (downtime or pause); skipped",
                name,
                instant,
                (now - instant).total_seconds(),
            )

    def _unusable_row(self, name: str, schedule: str, timezone: str, exc: Exception) -> None:
        key = (name, schedule, timezone)
        if key not in self._unusable:  # once per definition, not once per tick
            self._unusable.add(key)
            log.error("periodic %s is not scheduled: %s", name, exc)
