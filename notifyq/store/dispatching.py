"""The dispatcher's statements, each on the `Store` of its role, and the one
LISTEN connection.

A `Store` owns one autocommit connection for one role (claims, completions,
maintenance) and reconnects lazily after a failure: the caller decides when to
try again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from contextlib import suppress
from dataclasses import dataclass, fields
from datetime import datetime
from operator import itemgetter
from typing import Any, NamedTuple, TypeVar

import anyio
import psycopg
from psycopg import sql
from psycopg.rows import BaseRowFactory, RowMaker, class_row, scalar_row

from .. import failpoints
from ..breaker import CircuitBreaker
from ..errors import DatabaseUnavailable, LockTimeout, PoolerInTheWay
from ..job import Job, JobState
from .connection import QUERIES, connect, translated
from .rows import (
    ClaimRow,
    DependencyResult,
    EndpointRow,
    Fired,
    HeldAttempt,
    Purged,
    RescueRow,
    Schedule,
    ScheduleRow,
    Upkeep,
    WrittenRow,
)

log = logging.getLogger("notifyq.store")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What an attempt came to, as completion.py writes it (notifyq.finish_jobs)."""

    job_id: int
    attempt: int
    # succeeded | failed (retried under the task's policy while attempts are left) | dead
    status: str
    error: str | None = None
    result: str | None = None  # JSON text the handler returned (succeeded only)
    # The attempt's last progress report, if it may not be written yet (None: keep the row's).
    progress: float | None = None
    progress_message: str | None = None
    retry_in: float | None = None  # failed: seconds before the next attempt (None: backoff)


@dataclass(frozen=True, slots=True)
class TaskSettings:
    """A task's row in notifyq.tasks: what every worker's claims and failures apply."""

    task: str
    max_attempts: int
    backoff_base: float  # seconds
    backoff_factor: float
    backoff_max: float  # seconds
    timeout: float | None  # seconds
    # Its row in notifyq.circuit_breakers (failures, window, cooldown); None: left alone.
    circuit_breaker: CircuitBreaker | None = None


class Claim(NamedTuple):
    """What one claim statement returned."""

    jobs: list[Job]
    next_in: float | None  # seconds until the next scheduled job (or rate slot) of our queues
    full: frozenset[str]  # served queues at their concurrency cap (notifyq.queue_limits)
    deferred: int  # candidates the rate limits gave a later slot instead of starting now


class Settled(NamedTuple):
    status: str  # succeeded | queued (a retry, or handed back) | dead
    run_at: datetime  # when a retried job runs again


class Written(NamedTuple):
    """What a fenced write (`complete`, `hand_back`) did."""

    applied: dict[tuple[int, int], Settled]  # (job id, attempt) written, and what it became
    # Attempts still ours whose rows another transaction held locked, so the write
    # skipped them: try again.  Each maps to who held it, as far as PostgreSQL tells.
    # The attempts neither applied nor busy are no longer ours (fenced).
    busy: dict[tuple[int, int], str]


# The claim and the completion return a row per job, thousands a second, so their rows
# are built by position, without class_row's dict per row and without an intermediate
# frozen dataclass (each costs microseconds a job).  The positions come from the row
# types' fields, whose names and order tests/test_store_seam.py checks against the
# queries' columns.
_CLAIM_ID = [f.name for f in fields(ClaimRow)].index("id")
_JOB_FIELDS = itemgetter(*([f.name for f in fields(ClaimRow)].index(f.name) for f in fields(Job)))


def _claim_rows(cursor: Any) -> RowMaker[Job | ClaimRow]:
    """A claimed job's row as the Job itself; the closing row (id NULL) as a ClaimRow."""

    def make(values: Sequence[Any]) -> Job | ClaimRow:
        if values[_CLAIM_ID] is None:
            return ClaimRow(*values)
        return Job(*_JOB_FIELDS(values))

    return make


def _written_rows(cursor: Any) -> RowMaker[WrittenRow]:
    return lambda values: WrittenRow(*values)


def _written(rows: Sequence[WrittenRow]) -> Written:
    """The rows notifyq.finish_jobs and hand_back_jobs return; status 'busy' for rows
    another transaction held locked."""
    applied: dict[tuple[int, int], Settled] = {}
    busy: dict[tuple[int, int], str] = {}
    for r in rows:
        if r.status == "busy":
            busy[r.id, r.attempt] = r.holder or "released"
        else:
            applied[r.id, r.attempt] = Settled(r.status, r.run_at)
    return Written(applied, busy)


class Rescued(NamedTuple):
    job_id: int
    status: str  # queued again, or dead (no attempts left)
    cause: str  # session (its dispatcher's session ended) or lease (its lease expired)


class Rescue(NamedTuple):
    """What one rescue sweep did."""

    jobs: list[Rescued]
    watched: int  # other claimants with running jobs whose sessions were checked


class Store:
    """One autocommit connection for one role, reopened on the next call after a failure.

    `lock_timeout`: seconds any statement may wait for a lock before it fails with
    LockTimeout (None: PostgreSQL's setting).  On a direct connection it is the
    session's setting; without prepared statements (a pooler in transaction mode)
    each statement runs in a transaction of its own that sets it, as a session
    setting would stay on whichever server connection the pooler lent.
    """

    def __init__(
        self,
        dsn: str,
        role: str,
        *,
        prepare: bool = True,
        generic_plans: bool = False,
        lock_timeout: float | None = None,
    ) -> None:
        self._dsn = dsn
        self._role = role
        self._prepare = prepare
        self._generic_plans = generic_plans
        self._lock_timeout = None if lock_timeout is None else f"{round(lock_timeout * 1000)}ms"
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._connecting = anyio.Lock()
        # Tasks share a Store (the claim store serves the scheduler, progress reports and
        # probes too): a statement in a transaction of its own (below) must not have
        # another task's statement run inside that transaction.
        self._one_at_a_time = anyio.Lock()
        # Whether this connection's statements set lock_timeout themselves (see above).
        self._timeout_per_statement = False
        self.lock_waits = 0  # statements that gave up waiting for a lock
        self.statements = 0  # statements sent (an idle dispatcher should send none)

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            # Two tasks may share a Store (the claim store also sends the listener's
            # probe): one connects, the other waits for that connection.
            async with self._connecting:
                if self._conn is None or self._conn.closed:
                    conn = await connect(
                        self._dsn, application_name=f"notifyq:{self._role}", prepare=self._prepare
                    )
                    try:
                        with translated(self._dsn):
                            await self._configure(conn)
                    except BaseException:
                        await conn.close()
                        raise
                    self._conn = conn
                    log.debug("connected role=%s", self._role)
        return self._conn

    async def _configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if self._generic_plans:
            # The claim's plan cannot see how few rows it takes (a LIMIT per (queue, task)
            # probe whose size is a column), so its estimated cost grows with the backlog:
            # past jit_above_cost PostgreSQL would compile it to machine code on every
            # execution, 50-700 ms each, to run a few index probes.  Nothing this
            # connection runs is worth compiling.
            await conn.execute("SET jit = off")
        if self._generic_plans and self._prepare:
            # The claim is one long statement over a table with many indexes: planning
            # it anew for every execution (PostgreSQL keeps choosing custom plans for
            # it) cost about as much as running it.  Its plan does not depend on the
            # parameters' values (tests/test_plans.py checks the generic one), so a
            # prepared claim is planned once.
            await conn.execute("SET plan_cache_mode = force_generic_plan")
        self._timeout_per_statement = self._lock_timeout is not None and not self._prepare
        if self._lock_timeout is not None and self._prepare:
            await conn.execute(
                QUERIES["lock_timeout"], {"lock_timeout": self._lock_timeout, "local": False}
            )

    async def _run(
        self,
        name: str,
        params: dict[str, Any],
        row: BaseRowFactory[T],
        *,
        failpoint: str | None = None,
        wrote: Callable[[T], bool] = lambda _: True,
    ) -> list[T]:
        """Run one named query; its rows built by `row`.  Under NOTIFYQ_FAILPOINT,
        `failpoint` strikes before the COMMIT once a row satisfies `wrote`."""
        conn = await self._connection()
        self.statements += 1
        try:
            with translated():
                async with self._one_at_a_time:
                    failing = failpoint is not None and failpoints.ACTIVE
                    if not (failing or self._timeout_per_statement):
                        cur = conn.cursor(row_factory=row)
                        await cur.execute(QUERIES[name], params)
                        return await cur.fetchall() if cur.description else []
                    return await self._run_in_transaction(conn, name, params, row, failpoint, wrote)
        except LockTimeout as exc:
            self.lock_waits += 1
            # The connection is fine: only the statement gave up.
            raise LockTimeout(f"{name} ({self._role} connection): {exc}") from exc
        except DatabaseUnavailable as exc:
            if isinstance(exc, PoolerInTheWay) and self._prepare:
                self._prepare = False
                log.warning("%s (role %s)", exc, self._role)
            await self._drop()
            raise

    async def _run_in_transaction(
        self,
        conn: psycopg.AsyncConnection[Any],
        name: str,
        params: dict[str, Any],
        row: BaseRowFactory[T],
        failpoint: str | None,
        wrote: Callable[[T], bool],
    ) -> list[T]:
        """The statement in a transaction of its own: with the lock timeout set for it
        alone (see the class), and under NOTIFYQ_FAILPOINT so the failpoint can strike
        between the statement and its COMMIT."""
        async with conn.transaction():
            if self._timeout_per_statement:
                await conn.execute(
                    QUERIES["lock_timeout"], {"lock_timeout": self._lock_timeout, "local": True}
                )
            cur = conn.cursor(row_factory=row)
            await cur.execute(QUERIES[name], params)
            rows = await cur.fetchall() if cur.description else []
            if failpoint is not None and failpoints.ACTIVE and any(wrote(r) for r in rows):
                failpoints.hit(failpoint)
        return rows

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            with suppress(psycopg.Error):  # already broken: closing is best effort
                await conn.close()

    async def close(self) -> None:
        await self._drop()

    async def claim(
        self,
        *,
        queues: Sequence[str],
        limit: int,
        claimant: str,
        lease: float,
        tasks: Collection[str],
    ) -> Claim:
        """Claim up to `limit` jobs (see `Claim` for what else the statement tells)."""
        rows = await self._run(
            "claim",
            {
                "queues": list(queues),
                "limit": limit,
                "claimant": claimant,
                "lease": lease,
                "task_names": list(tasks),
            },
            _claim_rows,
            failpoint="claim-before-commit",
            wrote=lambda r: isinstance(r, Job),
        )
        jobs = [r for r in rows if isinstance(r, Job)]
        last = next((r for r in rows if isinstance(r, ClaimRow)), None)
        if failpoints.ACTIVE and jobs:
            failpoints.hit("claim-after-commit")
        if last is None:
            return Claim(jobs, None, frozenset(), 0)
        return Claim(jobs, last.next_in, frozenset(last.full_queues or ()), last.deferred or 0)

    async def complete(self, outcomes: Sequence[Outcome], claimant: str) -> Written:
        """Write outcomes, skipping rows locked by another transaction (see Written)."""
        bare = all(
            o.status == JobState.SUCCEEDED and o.result is None and o.progress is None
            for o in outcomes
        )
        # The common batch, bare successes: two arrays to send instead of seven.
        rows = await self._run(
            "complete",
            {
                "claimant": claimant,
                "ids": [o.job_id for o in outcomes],
                "attempts": [o.attempt for o in outcomes],
                "outcomes": None if bare else [o.status for o in outcomes],
                "errors": None if bare else [o.error for o in outcomes],
                "results": None if bare else [o.result for o in outcomes],
                "progresses": None if bare else [o.progress for o in outcomes],
                "progress_messages": None if bare else [o.progress_message for o in outcomes],
                "retry_in": None if bare else [o.retry_in for o in outcomes],
            },
            _written_rows,
            failpoint="completion-commit",
        )
        return _written(rows)

    async def renew_leases(
        self, ids: Collection[int], claimant: str, lease: float
    ) -> set[tuple[int, int]]:
        """Extend our leases of these jobs; returns the (job id, attempt) renewed."""
        rows = await self._run(
            "renew_leases",
            {"ids": list(ids), "claimant": claimant, "lease": lease},
            class_row(HeldAttempt),
        )
        return {(r.id, r.attempts) for r in rows}

    async def still_claimed(self, ids: Collection[int], claimant: str) -> set[tuple[int, int]]:
        """(job id, attempt) of these jobs still running under our claim (no lock taken)."""
        rows = await self._run(
            "still_claimed", {"ids": list(ids), "claimant": claimant}, class_row(HeldAttempt)
        )
        return {(r.id, r.attempts) for r in rows}

    async def save_progress(
        self, reports: Sequence[tuple[int, int, float, str | None]], claimant: str
    ) -> int:
        """Write (job id, attempt, percent, message) reports; returns how many applied."""
        rows = await self._run(
            "save_progress",
            {
                "ids": [job_id for job_id, _, _, _ in reports],
                "attempts": [attempt for _, attempt, _, _ in reports],
                "percents": [percent for _, _, percent, _ in reports],
                "messages": [message for _, _, _, message in reports],
                "claimant": claimant,
            },
            scalar_row,
        )
        return len(rows)

    async def save_checkpoint(
        self, job_id: int, attempt: int, checkpoint: str, claimant: str
    ) -> bool:
        """Store a checkpoint (JSON text); False if the attempt no longer holds the job."""
        rows = await self._run(
            "save_checkpoint",
            {"id": job_id, "attempt": attempt, "checkpoint": checkpoint, "claimant": claimant},
            scalar_row,
        )
        return bool(rows)

    async def dependency_results(self, job_id: int) -> dict[int, Any]:
        """The results of the dependencies of `job_id` that succeeded, by id."""
        rows = await self._run("dependency_results", {"id": job_id}, class_row(DependencyResult))
        return {row.id: row.result for row in rows if row.status == JobState.SUCCEEDED}

    async def expire_unique_windows(self, limit: int) -> int:
        """Delete up to `limit` unique_for windows that ended; how many."""
        (deleted,) = await self._run("expire_unique_windows", {"limit": limit}, scalar_row)
        return int(deleted)

    async def purge_batch(self, seconds: float, statuses: Sequence[str], limit: int) -> Purged:
        """Delete up to `limit` jobs of `statuses` finished over `seconds` ago: how many,
        and when a row left may be old enough (see the query)."""
        params = {"seconds": seconds, "statuses": list(statuses), "limit": limit}
        (purged,) = await self._run("purge_batch", params, class_row(Purged))
        return purged

    async def cancelled_among(self, ids: Collection[int]) -> set[int]:
        return set(await self._run("cancelled_among", {"ids": list(ids)}, scalar_row))

    async def work_left(self, queues: Sequence[str], tasks: Collection[str]) -> bool:
        params = {"queues": list(queues), "tasks": list(tasks)}
        (left,) = await self._run("work_left", params, scalar_row)
        return bool(left)

    async def hand_back(self, attempts: Sequence[tuple[int, int]], claimant: str) -> Written:
        """Return (job id, attempt) pairs to the queue, skipping locked rows (see Written)."""
        rows = await self._run(
            "hand_back",
            {
                "ids": [job_id for job_id, _ in attempts],
                "attempts": [attempt for _, attempt in attempts],
                "claimant": claimant,
            },
            _written_rows,
        )
        return _written(rows)

    async def sync_tasks(self, tasks: Sequence[TaskSettings]) -> list[str]:
        """Write our tasks' settings to notifyq.tasks; returns the tasks whose row changed."""
        return await self._run(
            "sync_tasks",
            {
                "tasks": [t.task for t in tasks],
                "max_attempts": [t.max_attempts for t in tasks],
                # Floats all: psycopg refuses a list that mixes int and float.
                "bases": [float(t.backoff_base) for t in tasks],
                "factors": [float(t.backoff_factor) for t in tasks],
                "max_delays": [float(t.backoff_max) for t in tasks],
                "timeouts": [None if t.timeout is None else float(t.timeout) for t in tasks],
            },
            scalar_row,
        )

    async def sync_breakers(self, tasks: Sequence[TaskSettings]) -> list[str]:
        """Write our tasks' circuit breaker settings; returns the tasks whose row changed."""
        given = [(t.task, t.circuit_breaker) for t in tasks if t.circuit_breaker is not None]
        if not given:
            return []
        return await self._run(
            "sync_breakers",
            {
                "tasks": [task for task, _ in given],
                "failures": [b.failures for _, b in given],
                "windows": [float(b.window) for _, b in given],
                "cooldowns": [float(b.cooldown) for _, b in given],
            },
            scalar_row,
        )

    async def endpoints(self) -> list[EndpointRow]:
        """The rows of notifyq.endpoints (HTTP tasks declared in SQL)."""
        return await self._run("endpoints", {}, class_row(EndpointRow))

    async def release_orphans(self, claimant: str, held: Collection[int]) -> set[int]:
        params = {"claimant": claimant, "held": list(held)}
        return set(await self._run("release_orphans", params, scalar_row))

    async def set_appetite(
        self, claimant: str, queues: Sequence[str], state: str | None, ttl: float
    ) -> None:
        """State our appetite for these queues: hungry, draining (for `ttl` seconds), or
        None (forget it)."""
        params = {"claimant": claimant, "queues": list(queues), "state": state, "ttl": ttl}
        await self._run("set_appetite", params, scalar_row)

    async def appetite_barrier(self, queues: Sequence[str]) -> bool:
        """Wait for producers that may have read these queues draining; False: one
        still holds its transaction open (try again later)."""
        (passed,) = await self._run("appetite_barrier", {"queues": list(queues)}, scalar_row)
        return bool(passed)

    async def notify(self, channel: str, payload: str) -> None:
        await self._run("notify", {"channel": channel, "payload": payload}, scalar_row)

    async def rescue(
        self,
        claimant: str,
        *,
        session_grace: float,
        restart_grace: float,
        trust_sessions: bool = True,
        limit: int = 1000,
    ) -> Rescue:
        """Re-queue the jobs of dispatchers whose session ended or whose lease expired;
        `trust_sessions` false: by lease only (our own connection has just come back)."""
        rows = await self._run(
            "rescue",
            {
                "claimant": claimant,
                "session_grace": session_grace,
                "restart_grace": restart_grace,
                "trust_sessions": trust_sessions,
                "limit": limit,
            },
            class_row(RescueRow),
        )
        jobs = [Rescued(r.id, r.status or "", r.cause or "") for r in rows if r.id is not None]
        watched = next((r.watched or 0 for r in rows if r.id is None), 0)
        return Rescue(jobs, watched)

    async def register(self, registration: dict[str, Any], running: int) -> None:
        """Upsert this dispatcher's registry row (prunes day-old stopped/lost rows too)."""
        await self._run("register_dispatcher", {**registration, "running": running}, scalar_row)

    async def alive(self, claimant: str) -> None:
        await self._run("alive", {"claimant": claimant}, scalar_row)

    async def unregister(self, claimant: str) -> None:
        await self._run("dispatcher_stopped", {"claimant": claimant}, scalar_row)

    async def define_periodic(self, definition: dict[str, Any]) -> bool:
        """Create or update one schedule; whether its row changed."""
        return bool(await self._run("periodic_define", definition, scalar_row))

    async def periodic_schedules(self) -> tuple[datetime, list[Schedule]]:
        """The database clock's now() and every schedule not paused."""
        rows = await self._run("periodic_schedules", {}, class_row(ScheduleRow))
        schedules = [
            Schedule(r.name, r.schedule, r.timezone, r.since)
            for r in rows
            if r.name is not None
            and r.schedule is not None
            and r.timezone is not None
            and r.since is not None
        ]
        return rows[0].now, schedules

    async def fire_periodic(
        self, name: str, schedule: str, timezone: str, instant: datetime, grace: float
    ) -> Fired | None:
        """Deal with one instant of one schedule (see periodic_fire): None when another
        dispatcher did, or it is not due; else whether a job was enqueued, and its id."""
        rows = await self._run(
            "periodic_fire",
            {
                "name": name,
                "schedule": schedule,
                "timezone": timezone,
                "instant": instant,
                "instant_text": instant.isoformat(),
                "grace": grace,
            },
            class_row(Fired),
        )
        return rows[0] if rows else None


class Note(NamedTuple):
    """One notification: the channel it came on and its payload."""

    channel: str
    payload: str


class Listener:
    """The one LISTEN connection: autocommit, never inside a transaction."""

    def __init__(self, dsn: str, *channels: str, liveness: str | None = None) -> None:
        self._dsn = dsn
        self._channels = channels
        # The claimant whose liveness lock this connection holds while it lives
        # (notifyq.rescue_jobs); None: no lock, the dispatcher is rescued by lease only.
        self._liveness = liveness
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self.holds_liveness = False

    async def open(self) -> None:
        await self.close()
        conn = await connect(self._dsn, application_name="notifyq:listen")
        try:
            with translated():
                # A session timeout would cut an idle listener off: exempt this connection.
                await conn.execute("SET idle_session_timeout = 0")
                for channel in self._channels:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        self.holds_liveness = False
        await self.take_liveness()

    async def upkeep(
        self, claimant: str, queues: Sequence[str], tasks: Collection[str], answer_within: float
    ) -> Upkeep:
        """The fallback poll on this connection (see the query), which is also its ping:
        unanswered within `answer_within` seconds, the connection counts as dead."""
        conn = self._conn
        if conn is None:
            raise DatabaseUnavailable("the listener is not connected")
        params = {"claimant": claimant, "queues": list(queues), "tasks": list(tasks)}
        try:
            with translated(), anyio.fail_after(answer_within):
                cur = conn.cursor(row_factory=class_row(Upkeep))
                await cur.execute(QUERIES["upkeep"], params)
                found = await cur.fetchone()
        except TimeoutError:
            await self.close()
            raise DatabaseUnavailable("the listener's upkeep went unanswered") from None
        except DatabaseUnavailable:
            await self.close()
            raise
        assert found is not None
        return found

    async def take_liveness(self) -> bool:
        """Take the liveness lock if it is ours to take and not held yet; whether held."""
        conn = self._conn
        if self._liveness is None or self.holds_liveness or conn is None:
            return self.holds_liveness
        with translated():
            cur = conn.cursor(row_factory=scalar_row)
            await cur.execute(QUERIES["liveness_lock"], {"claimant": self._liveness})
            self.holds_liveness = bool(await cur.fetchone())
        return self.holds_liveness

    async def wait(self, ping_after: float, *, ping: bool = True) -> list[Note]:
        """Notifications that arrived within `ping_after` seconds; [] after a successful ping
        (`ping` false: the caller pings otherwise, with `upkeep`)."""
        conn = self._conn
        if conn is None:
            raise DatabaseUnavailable("the listener is not connected")
        notes: list[Note] = []
        try:
            with translated():
                async for note in conn.notifies(timeout=ping_after, stop_after=1):
                    notes.append(Note(note.channel, note.payload))
                if not notes and ping:
                    # Quiet for a whole interval: make sure the socket is still alive.  A
                    # path that swallows packets must not hang us: the answer has as long.
                    with anyio.fail_after(max(ping_after, 1.0)):
                        await conn.execute("SELECT 1")
        except TimeoutError:
            await self.close()
            raise DatabaseUnavailable("the listener's ping went unanswered") from None
        except DatabaseUnavailable:
            await self.close()
            raise
        return notes

    async def drain(self) -> int:
        """Consume the notifications already received; returns how many."""
        conn = self._conn
        if conn is None:
            raise DatabaseUnavailable("the listener is not connected")
        count = 0
        with translated():
            async for _ in conn.notifies(timeout=0.0):
                count += 1
        return count

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            with suppress(psycopg.Error):  # already broken: closing is best effort
                await conn.close()
