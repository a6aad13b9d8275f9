"""The fault-injection harness: real processes, real PostgreSQL, ledgers in the database.

Every scenario works on one database (the `fault_dsn` fixture of
tests/faults/conftest.py, or `prepare(dsn)` on a `private_server`) holding,
beside notifyq's own tables, four ledgers:

    acked(job_id, source, at)        jobs whose INSERT's COMMIT returned OK
                                     (source 'producer', or 'setup' for `seed`)
    ambiguous(job_id, at, error)     jobs whose COMMIT's outcome is unknown (the
                                     connection died during COMMIT): they may exist
    executions(exec_id, job_id, attempt, pid, claimed_by, claimed_at,
               started_at, ended_at, outcome)
                                     written by the app's handlers (tests/faults/app.py)
    faults(kind, at, until, pid, detail)
                                     every fault the test injected, by the database clock
    release(job_id)                  releases faults.hold jobs (NULL releases all)

The app (tests/faults/app.py, `APP`) has handlers faults.record / fail / hold /
sleep / typed / noop; its docstring says what each records.  A scenario in short:

    def test_something(fault_dsn, deadlock_baseline, tmp_path):
        harness.seed(fault_dsn, 100, task="faults.sleep", payload='{"ms": 500}')
        with Dispatcher(fault_dsn, "--lease", "3", "--poll-interval", "0.5",
                        log=tmp_path / "a.log") as proc:
            ...inject a fault, logging it with fault() or kill9()...
            seconds = harness.wait_terminal(fault_dsn)
            harness.record_recovery("my scenario", seconds, bound)
            harness.check_invariants(fault_dsn, deadlocks_before=deadlock_baseline,
                                     listeners=1, logs=[proc.log])
        assert seconds <= bound

Fixtures (tests/faults/conftest.py): `fault_dsn` (a fresh database on every
server under test, ledgers created), `deadlock_baseline`; from tests/conftest.py
`private_server` for scenarios that restart PostgreSQL (call `prepare` on it).
Invariants that depend on the ledger (one success per attempt, the final
attempt's success) apply to jobs of the recording tasks (`RECORDED_TASKS`);
jobs of other apps' tasks are held to the rest.

The API, for scenarios here and in tests/faults/test_failpoints.py and
tests/faults/test_handlers.py:

    prepare(dsn)                     create the ledgers (fault_dsn does it for you)
    seed(dsn, n, task=..., payload=..., queue=..., max_attempts=..., batch=...)
                                     insert n jobs by plain SQL, each committed batch
                                     acked as 'setup'; returns the ids
    seed_rows(dsn, [(task, payload_json), ...], queue=...)
                                     the same for mixed rows, in one transaction
    Producer(dsn, task=..., every=0.01, batch=1, payload=..., queue=...)
                                     a thread inserting jobs by plain SQL until stop(),
                                     through outages, acking or marking ambiguous;
                                     use as a context manager; .acked, .ambiguous
    Dispatcher(dsn, *args, log=path, app=APP, env=None)
                                     `notifyq serve` as a process (debug log to `log`;
                                     `env` adds variables, e.g. NOTIFYQ_FAILPOINT);
                                     .pid .kill() .term() .wait(timeout) .log_text()
                                     .rss_kib(); a context manager that kills it at exit
    RssSampler(pid)                  a thread sampling VmRSS; .peak_kib
    fault(dsn, kind, pid=None, detail=None) -> int  log a fault now (returns its id);
    fault_end(dsn, fault_id)         ... and mark when it ended (restarts take a while)
    kill9(dsn, proc)                 log the fault, SIGKILL, wait
    terminate_backend(dsn, role)     log the fault, pg_terminate_backend a notifyq:<role>
    listen_pids(dsn, role="listen")  backends of application_name notifyq:<role>
    executions(dsn, where="true")    ledger rows
    start_latency(dsn, job_id)       seconds from a job's INSERT to its first start
    wait_terminal(dsn, timeout)      until every acked job is succeeded/dead/cancelled
    unfinished(dsn)                  how many acked jobs are not terminal yet
    dispatchers(dsn, n, *args, logs=dir)  n Dispatchers at once (a context manager)
    rescue_bound(lease, poll)        R, see below
    deadlocks(dsn)                   pg_stat_database.deadlocks for this database
    check_invariants(dsn, deadlocks_before=..., listeners=..., slack=...)
                                     raises InvariantsFailed naming each failed
                                     invariant with up to five example rows
    record_recovery(scenario, seconds, bound, **extra)
                                     keep a measurement for the session's table
                                     (tests/faults/conftest.py prints it, and writes it
                                     to $NOTIFYQ_FAULT_REPORT as JSON); returns seconds

Times that are compared with each other all come from the database clock
(`clock_timestamp()`); durations measured by the test use `time.monotonic()`.
The rescue bound of a dispatcher started with `--lease L --poll-interval P`
is `rescue_bound(L, P)` = L + min(P, L/2) + P: the lease runs out, the next
rescue pass re-queues the job, the wake-up (or at worst the poll) claims it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from tests.conftest import REPO, query, wait_until
from tests.faults.app import APP

LEDGERS_DDL = """
CREATE TABLE IF NOT EXISTS acked (
    job_id bigint PRIMARY KEY,
    source text NOT NULL DEFAULT 'producer',
    at     timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS ambiguous (
    job_id bigint PRIMARY KEY,
    at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    error  text
);
CREATE TABLE IF NOT EXISTS executions (
    exec_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id     bigint NOT NULL,
    attempt    integer NOT NULL,
    pid        integer NOT NULL,
    claimed_by text,
    claimed_at timestamptz,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    ended_at   timestamptz,
    outcome    text NOT NULL
);
CREATE INDEX IF NOT EXISTS executions_job_idx ON executions (job_id);
CREATE TABLE IF NOT EXISTS faults (
    fault_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind     text NOT NULL,
    at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    until    timestamptz,
    pid      integer,
    detail   text
);
CREATE TABLE IF NOT EXISTS release (job_id bigint);
"""

TERMINAL = ("succeeded", "dead", "cancelled")


def prepare(dsn: str) -> str:
    query(dsn, LEDGERS_DDL)
    return dsn


def rescue_bound(lease: float, poll: float) -> float:
    """Lease runs out + the next rescue pass + the claim that follows (worker.py)."""
    return lease + min(poll, lease / 2) + poll


# --- producing jobs


def _insert_sql(
    n: int, task: str, payload: str, queue: str, max_attempts: int | None
) -> tuple[bytes, tuple[Any, ...]]:
    return (
        b"INSERT INTO notifyq.jobs (task, payload, queue, max_attempts) "
        b"SELECT %s, %s::jsonb, %s, %s FROM generate_series(1, %s) RETURNING id",
        (task, payload, queue, max_attempts, n),
    )


def seed(
    dsn: str,
    n: int,
    *,
    task: str = "faults.record",
    payload: str = "{}",
    queue: str = "default",
    max_attempts: int | None = None,
    batch: int = 10_000,
) -> list[int]:
    """Insert n jobs by plain SQL (`batch` per transaction), acked as 'setup'; no faults here."""
    ids: list[int] = []
    with psycopg.connect(dsn) as conn:
        while len(ids) < n:
            sql, params = _insert_sql(min(batch, n - len(ids)), task, payload, queue, max_attempts)
            got = [r[0] for r in conn.execute(sql, params).fetchall()]
            conn.commit()
            conn.execute(
                b"INSERT INTO acked (job_id, source) SELECT unnest(%s::bigint[]), 'setup'", (got,)
            )
            conn.commit()
            ids.extend(got)
    return ids


def seed_rows(dsn: str, rows: Sequence[tuple[str, str]], *, queue: str = "default") -> list[int]:
    """Insert (task, payload JSON) rows in one transaction, in order, acked as 'setup'."""
    with psycopg.connect(dsn) as conn:
        ids = [
            r[0]
            for r in conn.execute(
                b"INSERT INTO notifyq.jobs (task, payload, queue)"
                b" SELECT t, p::jsonb, %s FROM unnest(%s::text[], %s::text[])"
                b" WITH ORDINALITY AS r(t, p, n) ORDER BY n RETURNING id",
                (queue, [t for t, _ in rows], [p for _, p in rows]),
            ).fetchall()
        ]
        conn.commit()
        conn.execute(
            b"INSERT INTO acked (job_id, source) SELECT unnest(%s::bigint[]), 'setup'", (ids,)
        )
        conn.commit()
    return sorted(ids)


class Producer:
    """Inserts jobs by plain SQL in a thread, through outages, and keeps the producer ledger.

    A batch whose COMMIT returned OK goes to `acked`; one whose connection died
    during COMMIT goes to `ambiguous` (it may or may not exist); one that failed
    before COMMIT does not exist and is not recorded.  Ledger writes that fail
    (the database is down) are kept and retried; `stop()` writes them all.
    """

    def __init__(
        self,
        dsn: str,
        *,
        task: str = "faults.record",
        payload: str = "{}",
        queue: str = "default",
        every: float = 0.01,
        batch: int = 1,
        limit: int | None = None,
    ) -> None:
        self.dsn = dsn
        self.task, self.payload, self.queue = task, payload, queue
        self.every, self.batch, self.limit = every, batch, limit
        self.acked: list[int] = []
        self.ambiguous: list[int] = []
        self.errors: list[str] = []
        self._unwritten_acked: list[int] = []
        self._unwritten_ambiguous: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="producer", daemon=True)

    def __enter__(self) -> Producer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Producer:
        return self.__enter__()

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        wait_until(self._flush_ledgers, timeout=timeout, interval=0.2, message="producer ledgers")

    def wait_acked(self, n: int, timeout: float = 30.0) -> None:
        wait_until(lambda: len(self.acked) >= n, timeout=timeout, message=f"{n} jobs acked")

    def _run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        while not self._stop.is_set():
            if self.limit is not None and len(self.acked) >= self.limit:
                break
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, connect_timeout=5)
                self._one_batch(conn)
            except psycopg.OperationalError as exc:
                self.errors.append(str(exc).split("\n", 1)[0])
                if conn is not None:
                    conn.close()
                conn = None
                self._stop.wait(0.1)
                continue
            self._flush_ledgers()
            self._stop.wait(self.every)
        if conn is not None:
            conn.close()

    def _one_batch(self, conn: psycopg.Connection[Any]) -> None:
        sql, params = _insert_sql(self.batch, self.task, self.payload, self.queue, None)
        ids = [r[0] for r in conn.execute(sql, params).fetchall()]
        try:
            conn.commit()
        except psycopg.OperationalError as exc:  # died during COMMIT: outcome unknown
            self.ambiguous.extend(ids)
            self._unwritten_ambiguous.extend((i, str(exc)) for i in ids)
            raise
        self.acked.extend(ids)
        self._unwritten_acked.extend(ids)

    def _flush_ledgers(self) -> bool:
        if not self._unwritten_acked and not self._unwritten_ambiguous:
            return True
        acked, ambiguous = list(self._unwritten_acked), list(self._unwritten_ambiguous)
        try:
            with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
                conn.execute(
                    b"INSERT INTO acked (job_id) SELECT unnest(%s::bigint[]) "
                    b"ON CONFLICT DO NOTHING",
                    (acked,),
                )
                conn.execute(
                    b"INSERT INTO ambiguous (job_id, error) "
                    b"SELECT * FROM unnest(%s::bigint[], %s::text[]) ON CONFLICT DO NOTHING",
                    ([i for i, _ in ambiguous], [e for _, e in ambiguous]),
                )
        except psycopg.OperationalError:
            return False
        del self._unwritten_acked[: len(acked)]
        del self._unwritten_ambiguous[: len(ambiguous)]
        return True


# --- dispatchers as processes


class Dispatcher:
    """`notifyq serve --app tests.faults.app:app` as a real process, logging at debug level."""

    def __init__(
        self, dsn: str, *args: str, log: Path, app: str = APP, env: dict[str, str] | None = None
    ) -> None:
        self.dsn, self.args, self.log, self.app = dsn, args, log, app
        env = {**os.environ, "NOTIFYQ_DSN": dsn, "PYTHONPATH": str(REPO), **(env or {})}
        self._out = open(log, "ab")  # noqa: SIM115 - closed in wait() / __exit__
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "notifyq", "serve", "--app", app, "--log-level", "debug", *args],
            cwd=REPO,
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )
        self.pid = self.proc.pid

    def __enter__(self) -> Dispatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait(30)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.wait(10)

    def term(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is not None:
                self._out.close()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def rss_kib(self) -> int | None:
        return rss_kib(self.pid)


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class RssSampler:
    """Samples a process's VmRSS every `every` seconds in a thread; keeps the peak."""

    def __init__(self, pid: int, every: float = 0.1) -> None:
        self.pid, self.every = pid, every
        self.peak_kib = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = rss_kib(self.pid)
            if value is not None:
                self.peak_kib = max(self.peak_kib, value)
                self.samples += 1
            self._stop.wait(self.every)


@contextmanager
def dispatchers(dsn: str, n: int, *args: str, logs: Path) -> Iterator[list[Dispatcher]]:
    """n dispatchers with the same arguments, each logging to logs/d<i>.log."""
    procs: list[Dispatcher] = []
    try:
        for i in range(n):
            procs.append(Dispatcher(dsn, *args, log=logs / f"d{i}.log"))
        yield procs
    finally:
        for p in procs:
            p.__exit__()


# --- the fault log


def fault(dsn: str, kind: str, *, pid: int | None = None, detail: str | None = None) -> int:
    rows = query(
        dsn,
        "INSERT INTO faults (kind, pid, detail) VALUES (%s, %s, %s) RETURNING fault_id",
        kind,
        pid,
        detail,
    )
    return int(rows[0][0])


def fault_end(dsn: str, fault_id: int) -> None:
    query(dsn, "UPDATE faults SET until = clock_timestamp() WHERE fault_id = %s", fault_id)


def kill9(dsn: str, proc: Dispatcher) -> float:
    """Log the fault, SIGKILL the process, wait for it; returns time.monotonic() of the kill."""
    fault(dsn, "kill -9", pid=proc.pid)
    proc.kill()
    return time.monotonic()


def terminate_backend(dsn: str, role: str) -> int | None:
    """pg_terminate_backend the first notifyq:<role> backend; logs the fault; its pid or None."""
    pids = listen_pids(dsn, role)
    if not pids:
        return None
    fault(dsn, f"pg_terminate_backend notifyq:{role}", pid=pids[0])
    query(dsn, "SELECT pg_terminate_backend(%s)", pids[0])
    return pids[0]


# --- observing


def listen_pids(dsn: str, role: str = "listen") -> list[int]:
    return [
        r[0]
        for r in query(
            dsn,
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = %s ORDER BY pid",
            f"notifyq:{role}",
        )
    ]


def executions(dsn: str, where: str = "true") -> list[tuple[Any, ...]]:
    """(job_id, attempt, pid, outcome) of every execution matching `where`, in start order."""
    return query(
        dsn,
        "SELECT job_id, attempt, pid, outcome FROM executions WHERE "
        + where
        + " ORDER BY started_at, exec_id",
    )


def start_latency(dsn: str, job_id: int) -> float:
    """Seconds from the job's INSERT (created_at) to its first execution's start."""
    rows = query(
        dsn,
        "SELECT extract(epoch FROM min(e.started_at) - j.created_at)::float8"
        " FROM executions e JOIN notifyq.jobs j ON j.id = e.job_id WHERE j.id = %s"
        " GROUP BY j.created_at",
        job_id,
    )
    return float(rows[0][0])


def unfinished(dsn: str) -> int:
    """Acked jobs not yet in a terminal state (a missing row counts too)."""
    rows = query(
        dsn,
        "SELECT count(*) FROM acked a LEFT JOIN notifyq.jobs j ON j.id = a.job_id"
        " WHERE j.status IS NULL OR j.status NOT IN ('succeeded', 'dead', 'cancelled')",
    )
    return int(rows[0][0])


def wait_terminal(dsn: str, timeout: float = 60.0) -> float:
    """Until every acked job is terminal; returns the seconds it took."""
    t0 = time.monotonic()
    wait_until(
        lambda: unfinished(dsn) == 0,
        timeout=timeout,
        interval=0.1,
        message="every acked job to reach a terminal state",
    )
    return time.monotonic() - t0


def deadlocks(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


# --- invariants

# Each: (name, what it means, a query returning the offending rows).
INVARIANTS: list[tuple[str, str, str]] = [
    (
        "acked_jobs_terminal",
        "every acked job exists and reached succeeded, dead or cancelled",
        """SELECT a.job_id, a.source, j.status, j.attempts, j.lease_expires_at
           FROM acked a LEFT JOIN notifyq.jobs j ON j.id = a.job_id
           WHERE j.status IS NULL OR j.status NOT IN ('succeeded', 'dead', 'cancelled')
           ORDER BY a.job_id""",
    ),
    (
        "no_phantom_jobs",
        "every job in notifyq.jobs was acked or is ambiguous",
        """SELECT j.id, j.task, j.status, j.created_at FROM notifyq.jobs j
           WHERE NOT EXISTS (SELECT 1 FROM acked a WHERE a.job_id = j.id)
             AND NOT EXISTS (SELECT 1 FROM ambiguous m WHERE m.job_id = j.id)
           ORDER BY j.id""",
    ),
    (
        "one_success_per_attempt",
        "no attempt of a job recorded two successes",
        """SELECT job_id, attempt, count(*) AS successes, array_agg(pid) AS pids
           FROM executions WHERE outcome = 'success'
           GROUP BY job_id, attempt HAVING count(*) > 1 ORDER BY job_id""",
    ),
    (
        "succeeded_by_final_attempt",
        "a succeeded job has exactly one successful execution of its final attempt",
        """SELECT j.id, j.attempts, j.task,
                  (SELECT count(*) FROM executions e WHERE e.job_id = j.id
                     AND e.outcome = 'success' AND e.attempt = j.attempts) AS final_successes
           FROM notifyq.jobs j
           WHERE j.status = 'succeeded'
             AND j.task = ANY(%(recorded_tasks)s::text[])
             AND (SELECT count(*) FROM executions e WHERE e.job_id = j.id
                    AND e.outcome = 'success' AND e.attempt = j.attempts) <> 1
           ORDER BY j.id""",
    ),
    (
        "reexecutions_explained",
        "every execution before a job's last one failed, was interrupted (handed back), "
        "or is explained by a fault (its pid was killed, or it overlapped a fault)",
        """SELECT e.job_id, e.attempt, e.pid, e.outcome, e.started_at, e.ended_at
           FROM executions e
           WHERE e.outcome NOT IN ('failed', 'interrupted')
             AND EXISTS (SELECT 1 FROM executions later WHERE later.job_id = e.job_id
                           AND later.started_at > e.started_at)
             AND NOT EXISTS (
                 SELECT 1 FROM faults f
                 WHERE f.pid = e.pid
                    OR (e.started_at <= coalesce(f.until, f.at) + %(slack)s * interval '1 second'
                        AND coalesce(e.ended_at, 'infinity')
                            >= f.at - %(slack)s * interval '1 second'))
           ORDER BY e.job_id, e.started_at""",
    ),
    (
        "no_concurrent_executions",
        "no job ran twice at the same time, unless a fault explains the earlier run",
        """SELECT a.job_id, a.attempt, a.pid, b.attempt, b.pid, a.started_at, b.started_at
           FROM executions a JOIN executions b
             ON b.job_id = a.job_id AND b.exec_id <> a.exec_id AND b.started_at > a.started_at
           WHERE b.started_at < coalesce(a.ended_at, 'infinity')
             AND NOT EXISTS (SELECT 1 FROM faults f WHERE f.pid = a.pid
                    OR (a.started_at <= coalesce(f.until, f.at) + %(slack)s * interval '1 second'
                        AND coalesce(a.ended_at, 'infinity')
                            >= f.at - %(slack)s * interval '1 second'))
           ORDER BY a.job_id""",
    ),
    (
        "attempts_within_max",
        "no job's attempts (nor any execution's attempt) exceed its max_attempts",
        """SELECT j.id, j.attempts, j.max_attempts,
                  (SELECT max(e.attempt) FROM executions e WHERE e.job_id = j.id) AS max_exec
           FROM notifyq.jobs j
           WHERE j.attempts > coalesce(j.max_attempts, 1000)
              OR (SELECT max(e.attempt) FROM executions e WHERE e.job_id = j.id)
                 > coalesce(j.max_attempts, 1000)
           ORDER BY j.id""",
    ),
    (
        "no_expired_lease_left",
        "no running job's lease expired more than the slack ago",
        """SELECT id, claimed_by, lease_expires_at, now() - lease_expires_at AS overdue
           FROM notifyq.jobs
           WHERE status = 'running'
             AND lease_expires_at < now() - %(slack)s * interval '1 second'
           ORDER BY id""",
    ),
]


@dataclass
class InvariantsFailed(AssertionError):
    failures: list[tuple[str, str, list[tuple[Any, ...]]]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{len(self.failures)} invariant(s) failed:"]
        for name, meaning, rows in self.failures:
            lines.append(f"- {name}: {meaning}; {len(rows)} offending row(s), e.g.:")
            lines.extend(f"    {row!r}" for row in rows[:5])
        return "\n".join(lines)


RECORDED_TASKS = (
    "faults.record",
    "faults.fail",
    "faults.hold",
    "faults.hold_first",
    "faults.sleep",
    "faults.typed",
)


def check_invariants(
    dsn: str,
    *,
    deadlocks_before: int | None = None,
    listeners: int | None = None,
    slack: float = 3.0,
    logs: Sequence[Path] = (),
    listener_wait: float = 10.0,
) -> None:
    """Check every invariant; raise InvariantsFailed listing each that failed with examples.

    `listeners`: the number of live dispatchers (each must hold exactly one idle
    LISTEN backend; None skips the check).  `deadlocks_before`: the database's
    deadlock count when the scenario began.  `logs`: dispatcher logs, searched
    for PostgreSQL's "deadlock detected".  `slack`: seconds of tolerance when
    matching executions to fault times and for lease expiry.  `listener_wait`:
    how long listeners may take to settle (a reconnect after a restart).
    """
    failed = InvariantsFailed()
    params = {"slack": slack, "recorded_tasks": list(RECORDED_TASKS)}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name, meaning, sql in INVARIANTS:
            rows = conn.execute(sql.encode(), params).fetchall()
            if rows:
                failed.failures.append((name, meaning, rows))
    if listeners is not None:
        try:
            wait_until(
                lambda: _idle_listeners(dsn) == listeners,
                timeout=listener_wait,
                message="one idle listener per live dispatcher",
            )
        except AssertionError:
            failed.failures.append(
                (
                    "one_listener_per_dispatcher",
                    f"exactly one idle notifyq:listen backend per live dispatcher ({listeners})",
                    query(
                        dsn,
                        "SELECT pid, state, backend_start FROM pg_stat_activity"
                        " WHERE datname = current_database()"
                        " AND application_name = 'notifyq:listen'",
                    ),
                )
            )
    if deadlocks_before is not None:
        now = deadlocks(dsn)
        if now > deadlocks_before:
            failed.failures.append(
                (
                    "no_deadlocks",
                    "pg_stat_database.deadlocks did not grow",
                    [
                        (deadlocks_before, now),
                    ],
                )
            )
    hits = [(str(p), line) for p in logs for line in _lines(p) if "deadlock detected" in line]
    if hits:
        failed.failures.append(("no_deadlocks_logged", "no 'deadlock detected' in logs", hits))
    if failed.failures:
        raise failed


def _idle_listeners(dsn: str) -> int:
    rows = query(
        dsn,
        "SELECT count(*) FILTER (WHERE state = 'idle'), count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = 'notifyq:listen'",
    )
    idle, total = rows[0]
    return int(idle) if idle == total else -1


def _lines(path: Path) -> list[str]:
    with suppress(FileNotFoundError):
        return path.read_text(errors="replace").splitlines()
    return []


# --- recovery times


@dataclass
class Recovery:
    scenario: str
    seconds: float
    bound: float
    extra: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.seconds <= self.bound


RECOVERIES: list[Recovery] = []


def record_recovery(scenario: str, seconds: float, bound: float, **extra: Any) -> float:
    """Keep a measurement for the session's table; the caller asserts `seconds <= bound`."""
    RECOVERIES.append(Recovery(scenario, round(seconds, 3), round(bound, 3), extra))
    return seconds
