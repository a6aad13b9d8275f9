"""The only module that executes SQL.

Queries come from sql/queries.sql, loaded once.  Every driver error leaves
this module translated by errors.translate(), so callers handle notifyq
errors only.  A `Store` owns one autocommit connection for one role (claims,
completions, maintenance) and reconnects lazily after a failure: the caller
decides when to try again.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from typing import Any, LiteralString, NamedTuple

import anyio
import psycopg
from psycopg import sql

from . import codec, failpoints
from .errors import (
    ConfigurationError,
    DatabaseUnavailable,
    LockTimeout,
    OperationRefused,
    PoolerInTheWay,
    dsn_secrets,
    redact,
    translate,
)
from .job import Job, JobId, JobState, JobStatus

log = logging.getLogger("notifyq.store")

_BLOCK = re.compile(r"^-- name: (\w+)\n", re.MULTILINE)

CONNECT_OPTIONS: dict[str, Any] = {
    "connect_timeout": 10,
    # Notice a peer that vanished without closing the socket within ~30 s.
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    # ... and a query whose packets go unacknowledged (keepalives do not cover that).
    "tcp_user_timeout": 30_000,
}


def _load_queries() -> dict[str, LiteralString]:
    text = resources.files("notifyq").joinpath("sql/queries.sql").read_text()
    parts = _BLOCK.split(text)[1:]
    # The SQL is our own file, never user input: typing it as LiteralString is honest.
    return {name: body.strip() for name, body in zip(parts[::2], parts[1::2], strict=True)}


QUERIES = _load_queries()


def roles_script(producer: str, worker: str) -> sql.Composed:
    """sql/roles.sql with the role names filled in, quoted by psycopg."""
    text: LiteralString = resources.files("notifyq").joinpath("sql/roles.sql").read_text()
    return sql.SQL(text).format(
        producer=sql.Identifier(producer),
        worker=sql.Identifier(worker),
        producer_name=sql.Literal(producer),
        worker_name=sql.Literal(worker),
    )


def apply_roles(conn: psycopg.Connection[Any], script: sql.Composed) -> None:
    """Run the roles script in one transaction on the caller's connection."""
    with translated(), conn.transaction():
        conn.execute(script)


def migration_scripts() -> list[tuple[int, LiteralString]]:
    """Every numbered migration, from 0001_initial.sql on, in order: (version, script)."""
    folder = resources.files("notifyq").joinpath("sql/migrations")
    found = []
    for entry in folder.iterdir():
        match = re.fullmatch(r"(\d{4})_\w+\.sql", entry.name)
        if match:
            found.append((int(match.group(1)), entry.read_text()))
    return sorted(found)


@contextmanager
def translated(dsn: str | None = None) -> Iterator[None]:
    """Re-raise driver errors as the notifyq errors they mean; while connecting, `dsn`
    names the password to keep out of the message (libpq may echo the string)."""
    try:
        yield
    except psycopg.ProgrammingError as exc:
        if exc.sqlstate is None:  # raised by the driver itself, e.g. a malformed DSN
            reason = redact(str(exc).strip(), dsn_secrets(dsn))
            # `from None`: the driver's own exception would carry the password along.
            raise ConfigurationError(f"invalid connection string: {reason}") from None
        raise translate(exc, dsn=dsn) from exc
    except psycopg.Error as exc:
        error = translate(exc, dsn=dsn)
        if dsn and redact(str(exc), dsn_secrets(dsn)) != str(exc):
            raise error from None  # the driver's message held the password
        raise error from exc


def connect_sync(dsn: str, *, autocommit: bool = True) -> psycopg.Connection[Any]:
    with translated(dsn):
        conn = psycopg.connect(dsn, autocommit=autocommit, **CONNECT_OPTIONS)
    codec.configure(conn)
    return conn


async def connect(
    dsn: str, *, application_name: str = "notifyq", prepare: bool = True
) -> psycopg.AsyncConnection[Any]:
    """An autocommit connection; `prepare=False` for poolers that cannot keep prepared
    statements across transactions (PgBouncer in transaction mode)."""
    with translated(dsn):
        conn = await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, application_name=application_name, **CONNECT_OPTIONS
        )
    if not prepare:
        conn.prepare_threshold = None
    codec.configure(conn)
    return conn


# --- enqueue: runs on whatever connection the caller gives, inside its transaction


@dataclass(frozen=True, slots=True)
class NewJob:
    task: str
    payload_json: str
    queue: str
    priority: int
    delay: float
    run_at: Any
    max_attempts: int | None
    dedupe_key: str | None = None
    rate_key: str | None = None
    depends_on: list[int] | None = None
    on_dependency_failure: str = "cancel"
    # The job's token (see JobId): random, from the operating system's CSPRNG.
    token: uuid.UUID = field(default_factory=uuid.uuid4)

    def params(self) -> dict[str, Any]:
        return {
            "token": self.token,
            "dedupe_key": self.dedupe_key,
            "rate_key": self.rate_key,
            "task": self.task,
            "payload": self.payload_json,
            "queue": self.queue,
            "priority": self.priority,
            "delay": self.delay,
            "run_at": self.run_at,
            "max_attempts": self.max_attempts,
            "depends_on": self.depends_on,
            "on_dependency_failure": self.on_dependency_failure,
        }


DEDUPE_TRIES = 5
"""Rounds of `enqueue_deduped` before giving up: each one that finds neither a new
row nor a holder saw the holder commit or finish in between, which is rare."""


async def enqueue(conn: psycopg.AsyncConnection[Any], job: NewJob) -> JobId:
    with translated():
        if job.dedupe_key is None:
            cur = await conn.execute(QUERIES["enqueue"], job.params())
            row = await cur.fetchone()
            assert row is not None
            return JobId(row[0], job.token)
        for _ in range(DEDUPE_TRIES):
            cur = await conn.execute(QUERIES["enqueue_deduped"], job.params())
            row = await cur.fetchone()
            if row is not None:
                return _enqueued(job, row)
    raise _dedupe_unsettled(job)


def enqueue_sync(conn: psycopg.Connection[Any], job: NewJob) -> JobId:
    with translated():
        if job.dedupe_key is None:
            row = conn.execute(QUERIES["enqueue"], job.params()).fetchone()
            assert row is not None
            return JobId(row[0], job.token)
        for _ in range(DEDUPE_TRIES):
            row = conn.execute(QUERIES["enqueue_deduped"], job.params()).fetchone()
            if row is not None:
                return _enqueued(job, row)
    raise _dedupe_unsettled(job)


def _enqueued(job: NewJob, row: Any) -> JobId:
    """(id, created) of enqueue_deduped: our token only if our row went in."""
    return JobId(row[0], job.token if row[1] else None)


def _dedupe_unsettled(job: NewJob) -> OperationRefused:
    # Only a snapshot that never moves (REPEATABLE READ or SERIALIZABLE) gets here
    # every round: the holder committed after it was taken, so it can never be seen.
    return OperationRefused(
        f"could not enqueue with dedupe_key {job.dedupe_key!r}: another transaction "
        f"holds the key and this one cannot see its job (a REPEATABLE READ or SERIALIZABLE "
        f"transaction); retry the transaction, or enqueue in READ COMMITTED"
    )


async def wait_outcomes(
    conn: psycopg.AsyncConnection[Any], jobs: dict[int, uuid.UUID | None]
) -> list[tuple[int, str, str, Any, str | None]]:
    """id, queue, status, result, last_error of these jobs (App.wait's read): by token
    (notifyq.job_status) those whose token is known, the others from the table."""
    by_token = {job_id: token for job_id, token in jobs.items() if token is not None}
    by_id = [job_id for job_id, token in jobs.items() if token is None]
    rows = []
    with translated():
        if by_token:
            params = {"ids": list(by_token), "tokens": list(by_token.values())}
            cur = await conn.execute(QUERIES["wait_outcomes_by_token"], params)
            rows += await cur.fetchall()
        if by_id:
            cur = await conn.execute(QUERIES["wait_outcomes"], {"ids": by_id})
            rows += await cur.fetchall()
    return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]


async def job_status(
    conn: psycopg.AsyncConnection[Any], job_id: int, token: uuid.UUID | None
) -> JobStatus | None:
    """App.status: by token through notifyq.job_status, else from the table."""
    with translated():
        if token is None:
            cur = await conn.execute(QUERIES["job_status_by_id"], {"id": job_id})
        else:
            cur = await conn.execute(QUERIES["job_status"], {"id": job_id, "token": token})
        row = await cur.fetchone()
    return None if row is None else _job_status(row)


def job_status_sync(
    conn: psycopg.Connection[Any], job_id: int, token: uuid.UUID | None
) -> JobStatus | None:
    with translated():
        if token is None:
            row = conn.execute(QUERIES["job_status_by_id"], {"id": job_id}).fetchone()
        else:
            params = {"id": job_id, "token": token}
            row = conn.execute(QUERIES["job_status"], params).fetchone()
    return None if row is None else _job_status(row)


def _job_status(row: Sequence[Any]) -> JobStatus:
    (job_id, queue, task, status, attempts, max_attempts, progress, message, result, error,
     run_at, created_at, started_at, finished_at) = row  # fmt: skip
    return JobStatus(
        id=job_id,
        queue=queue,
        task=task,
        status=JobState(status),
        attempts=attempts,
        max_attempts=max_attempts,
        progress=progress,
        progress_message=message,
        result=result,
        last_error=error,
        run_at=run_at,
        created_at=created_at,
        started_at=started_at,
        finished_at=finished_at,
    )


ENQUEUE_CHUNK = 5_000
"""Payloads per INSERT in enqueue_many: bounds one statement's parameter size;
the chunks share one transaction, so PostgreSQL still delivers one
notification per queue (it folds identical notifications of a transaction)."""


def _chunks(job: NewJob, payloads: Sequence[str]) -> Iterator[dict[str, Any]]:
    """The parameters of each INSERT, with a new token per payload."""
    common = job.params()
    del common["payload"], common["token"]
    for start in range(0, len(payloads), ENQUEUE_CHUNK):
        chunk = list(payloads[start : start + ENQUEUE_CHUNK])
        yield {**common, "payloads": chunk, "tokens": [uuid.uuid4() for _ in chunk]}


def _ids(params: dict[str, Any], rows: list[Any]) -> list[JobId]:
    """Identity values are drawn in the payloads' order: sorted, they pair with the tokens."""
    ids = sorted(int(row[0]) for row in rows)
    return [JobId(i, token) for i, token in zip(ids, params["tokens"], strict=True)]


async def enqueue_many(
    conn: psycopg.AsyncConnection[Any], job: NewJob, payloads: Sequence[str]
) -> list[JobId]:
    """Insert one job per payload (JSON text) with `job`'s other columns; ids in order."""
    ids: list[JobId] = []
    with translated():
        # An autocommit connection gets a transaction of its own (all or nothing, one
        # notification); any other joins the caller's, which commits it or not.
        async with conn.transaction() if conn.autocommit else nullcontext():
            for params in _chunks(job, payloads):
                cur = await conn.execute(QUERIES["enqueue_many"], params)
                ids += _ids(params, await cur.fetchall())
    return ids


def enqueue_many_sync(
    conn: psycopg.Connection[Any], job: NewJob, payloads: Sequence[str]
) -> list[JobId]:
    ids: list[JobId] = []
    with translated(), conn.transaction() if conn.autocommit else nullcontext():
        for params in _chunks(job, payloads):
            ids += _ids(params, conn.execute(QUERIES["enqueue_many"], params).fetchall())
    return ids


# --- the schema


def schema_version(conn: psycopg.Connection[Any]) -> int | None:
    with translated():
        row = conn.execute(QUERIES["schema_present"]).fetchone()
        if not row or not row[0]:
            return None
        row = conn.execute(QUERIES["schema_version"]).fetchone()
    return int(row[0]) if row else 0


def apply_script(conn: psycopg.Connection[Any], version: int, script: LiteralString) -> None:
    """Run one migration script and record its version; the caller holds the transaction."""
    with translated():
        # No parameters: psycopg sends the script whole, several statements at once.
        conn.execute(script)
        conn.execute(QUERIES["record_version"], {"version": version})


def lock_migrations(conn: psycopg.Connection[Any]) -> None:
    with translated():
        conn.execute(QUERIES["migrate_lock"])


# --- operations: the admin functions, listings, metrics (sync, on the caller's connection)


def rows(conn: psycopg.Connection[Any], name: str, params: dict[str, Any]) -> list[Any]:
    """Run one named query; an admin function's refusal becomes OperationRefused."""
    with translated():
        try:
            cur = conn.execute(QUERIES[name], params)
        except psycopg.Error as exc:
            refusal = _refusal(exc)
            if refusal is None:
                raise
            raise refusal from exc
        return cur.fetchall() if cur.description else []


def records(
    conn: psycopg.Connection[Any], name: str, params: dict[str, Any]
) -> list[dict[str, Any]]:
    """Rows of a named query as dicts by column name."""
    with translated():
        cur = conn.execute(QUERIES[name], params)
        names = [d.name for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _refusal(exc: psycopg.Error) -> OperationRefused | None:
    """The notifyq.* admin functions RAISE with a message starting 'notifyq: '."""
    message = exc.diag.message_primary or ""
    if not message.startswith("notifyq: "):
        return None
    hint = exc.diag.message_hint
    return OperationRefused(message.removeprefix("notifyq: ") + (f" ({hint})" if hint else ""))


# --- the dispatcher's statements, each on the Store of its role


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


@dataclass(frozen=True, slots=True)
class TaskSettings:
    """A task's row in notifyq.tasks: what every worker's claims and failures apply."""

    task: str
    max_attempts: int
    backoff_base: float  # seconds
    backoff_factor: float
    backoff_max: float  # seconds
    timeout: float | None  # seconds


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


def _written(rows: Sequence[Any]) -> Written:
    """The rows notifyq.finish_jobs and hand_back_jobs return: (id, attempt, status, run_at,
    holder); status 'busy' for rows another transaction held locked."""
    return Written(
        {(r[0], r[1]): Settled(r[2], r[3]) for r in rows if r[2] != "busy"},
        {(r[0], r[1]): r[4] or "released" for r in rows if r[2] == "busy"},
    )


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
        self, name: str, params: dict[str, Any], *, failpoint: str | None = None
    ) -> list[Any]:
        conn = await self._connection()
        try:
            with translated():
                async with self._one_at_a_time:
                    failing = failpoint is not None and failpoints.ACTIVE
                    if not (failing or self._timeout_per_statement):
                        cur = await conn.execute(QUERIES[name], params)
                        return await cur.fetchall() if cur.description else []
                    return await self._run_in_transaction(conn, name, params, failpoint)
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
        failpoint: str | None,
    ) -> list[Any]:
        """The statement in a transaction of its own: with the lock timeout set for it
        alone (see the class), and under NOTIFYQ_FAILPOINT so the failpoint can strike
        between the statement and its COMMIT."""
        async with conn.transaction():
            if self._timeout_per_statement:
                await conn.execute(
                    QUERIES["lock_timeout"], {"lock_timeout": self._lock_timeout, "local": True}
                )
            cur = await conn.execute(QUERIES[name], params)
            rows = await cur.fetchall() if cur.description else []
            if failpoint is not None and failpoints.ACTIVE and any(r[0] is not None for r in rows):
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
            failpoint="claim-before-commit",
            params={
                "queues": list(queues),
                "limit": limit,
                "claimant": claimant,
                "lease": lease,
                "task_names": list(tasks),
            },
        )
        jobs = [Job(r[0], r[1], r[2], r[3], r[4], r[5], r[7]) for r in rows if r[0] is not None]
        last = next((r for r in rows if r[0] is None), None)
        if failpoints.ACTIVE and jobs:
            failpoints.hit("claim-after-commit")
        if last is None:
            return Claim(jobs, None, frozenset(), 0)
        return Claim(jobs, last[6], frozenset(last[8] or ()), last[9] or 0)

    async def complete(self, outcomes: Sequence[Outcome], claimant: str) -> Written:
        """Write outcomes, skipping rows locked by another transaction (see Written)."""
        bare = all(
            o.status == "succeeded" and o.result is None and o.progress is None for o in outcomes
        )
        # The common batch, bare successes: two arrays to send instead of seven.
        rows = await self._run(
            "complete",
            failpoint="completion-commit",
            params={
                "claimant": claimant,
                "ids": [o.job_id for o in outcomes],
                "attempts": [o.attempt for o in outcomes],
                "outcomes": None if bare else [o.status for o in outcomes],
                "errors": None if bare else [o.error for o in outcomes],
                "results": None if bare else [o.result for o in outcomes],
                "progresses": None if bare else [o.progress for o in outcomes],
                "progress_messages": None if bare else [o.progress_message for o in outcomes],
            },
        )
        return _written(rows)

    async def renew_leases(
        self, ids: Collection[int], claimant: str, lease: float
    ) -> set[tuple[int, int]]:
        """Extend our leases of these jobs; returns the (job id, attempt) renewed."""
        rows = await self._run(
            "renew_leases", {"ids": list(ids), "claimant": claimant, "lease": lease}
        )
        return {(r[0], r[1]) for r in rows}

    async def still_claimed(self, ids: Collection[int], claimant: str) -> set[tuple[int, int]]:
        """(job id, attempt) of these jobs still running under our claim (no lock taken)."""
        rows = await self._run("still_claimed", {"ids": list(ids), "claimant": claimant})
        return {(r[0], r[1]) for r in rows}

    async def save_progress(
        self, reports: Sequence[tuple[int, int, float, str | None]], claimant: str
    ) -> int:
        """Write (job id, attempt, percent, message) reports; returns how many applied."""
        rows = await self._run(
            "save_progress",
            {
                "ids": [r[0] for r in reports],
                "attempts": [r[1] for r in reports],
                "percents": [r[2] for r in reports],
                "messages": [r[3] for r in reports],
                "claimant": claimant,
            },
        )
        return len(rows)

    async def save_checkpoint(
        self, job_id: int, attempt: int, checkpoint: str, claimant: str
    ) -> bool:
        """Store a checkpoint (JSON text); False if the attempt no longer holds the job."""
        rows = await self._run(
            "save_checkpoint",
            {"id": job_id, "attempt": attempt, "checkpoint": checkpoint, "claimant": claimant},
        )
        return bool(rows)

    async def purge_batch(self, seconds: float, status: str, limit: int) -> int:
        rows = await self._run(
            "purge_batch", {"seconds": seconds, "status": status, "limit": limit}
        )
        return int(rows[0][0])

    async def cancelled_among(self, ids: Collection[int]) -> set[int]:
        rows = await self._run("cancelled_among", {"ids": list(ids)})
        return {r[0] for r in rows}

    async def work_left(self, queues: Sequence[str], tasks: Collection[str]) -> bool:
        rows = await self._run("work_left", {"queues": list(queues), "tasks": list(tasks)})
        return bool(rows[0][0])

    async def hand_back(self, attempts: Sequence[tuple[int, int]], claimant: str) -> Written:
        """Return (job id, attempt) pairs to the queue, skipping locked rows (see Written)."""
        rows = await self._run(
            "hand_back",
            {
                "ids": [job_id for job_id, _ in attempts],
                "attempts": [attempt for _, attempt in attempts],
                "claimant": claimant,
            },
        )
        return _written(rows)

    async def sync_tasks(self, tasks: Sequence[TaskSettings]) -> list[str]:
        """Write our tasks' settings to notifyq.tasks; returns the tasks whose row changed."""
        rows = await self._run(
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
        )
        return [r[0] for r in rows]

    async def release_orphans(self, claimant: str, held: Collection[int]) -> set[int]:
        rows = await self._run("release_orphans", {"claimant": claimant, "held": list(held)})
        return {r[0] for r in rows}

    async def notify(self, channel: str, payload: str) -> None:
        await self._run("notify", {"channel": channel, "payload": payload})

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
        )
        jobs = [Rescued(r[0], r[1], r[2]) for r in rows if r[0] is not None]
        watched = next((r[3] for r in rows if r[0] is None), 0)
        return Rescue(jobs, watched)

    async def register(self, registration: dict[str, Any], running: int) -> None:
        """Upsert this dispatcher's registry row (prunes day-old stopped/lost rows too)."""
        await self._run("register_dispatcher", {**registration, "running": running})

    async def alive(self, claimant: str) -> None:
        await self._run("alive", {"claimant": claimant})

    async def unregister(self, claimant: str) -> None:
        await self._run("dispatcher_stopped", {"claimant": claimant})

    async def define_periodic(self, definition: dict[str, Any]) -> bool:
        """Create or update one schedule; whether its row changed."""
        return bool(await self._run("periodic_define", definition))

    async def periodic_schedules(self) -> tuple[datetime, list[tuple[str, str, str, datetime]]]:
        """The database clock's now() and every schedule not paused:
        (name, schedule, timezone, since: the instant after which the next is due)."""
        rows = await self._run("periodic_schedules", {})
        return rows[0][0], [(r[1], r[2], r[3], r[4]) for r in rows if r[1] is not None]

    async def fire_periodic(
        self, name: str, schedule: str, timezone: str, instant: datetime, grace: float
    ) -> tuple[bool, int | None] | None:
        """Deal with one instant of one schedule (see periodic_fire): None when another
        dispatcher did, or it is not due; else (enqueued, job id)."""
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
        )
        return (bool(rows[0][0]), rows[0][1]) if rows else None

    async def fetch(self, name: str, params: dict[str, Any]) -> list[Any]:
        """Rows of a read-only named query (notifyq watch's)."""
        return await self._run(name, params)


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

    async def take_liveness(self) -> bool:
        """Take the liveness lock if it is ours to take and not held yet; whether held."""
        conn = self._conn
        if self._liveness is None or self.holds_liveness or conn is None:
            return self.holds_liveness
        with translated():
            cur = await conn.execute(QUERIES["liveness_lock"], {"claimant": self._liveness})
            row = await cur.fetchone()
        self.holds_liveness = bool(row and row[0])
        return self.holds_liveness

    async def wait(self, ping_after: float) -> list[Note]:
        """Notifications that arrived within `ping_after` seconds; [] after a successful ping."""
        conn = self._conn
        if conn is None:
            raise DatabaseUnavailable("the listener is not connected")
        notes: list[Note] = []
        try:
            with translated():
                async for note in conn.notifies(timeout=ping_after, stop_after=1):
                    notes.append(Note(note.channel, note.payload))
                if not notes:
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
