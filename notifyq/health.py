"""`notifyq health`: is this database fit to run notifyq jobs right now?

Checks, in order; a failed one stops the rest that depend on it:

    reachable        the server answers                                   else FAILED
    schema           notifyq's schema is installed at the version we need  else FAILED
                     (newer than we know: WARNING, this notifyq is older)
    transactions     no transaction in the database has been open longer
                     than --max-transaction-age (default 300 s)           else WARNING:
                     it holds back vacuum of notifyq.jobs, whose dead tuples
                     (old row versions, not dead jobs) then pile up and slow claims
    leases           no running job's lease expired over a minute ago      else WARNING:
                     nobody is rescuing them (no dispatcher alive)
    dispatchers      no registered dispatcher is lost (heartbeat silent    else WARNING
                     for three intervals without a graceful stop)
    unserved         every ready job has a live dispatcher that would      else WARNING:
                     claim it (one serving its queue, with a handler for
                     its task); the others wait, queued, until one starts
    breakers         no task's circuit breaker is open or half-open        else WARNING:
                     its jobs stay queued until a probe succeeds (or
                     `notifyq breaker reset TASK`)
    paused           which queues and tasks are paused (notifyq pause),   never a verdict:
                     since when and how many ready jobs wait on them       OK either way

Exit status: 0 healthy, 1 a check FAILED, 2 only warnings.  The dead-tuple
count of notifyq.jobs is reported too (information, never a verdict).

Seeing other roles' transactions needs `pg_read_all_stats` (or superuser):
without it PostgreSQL hides their `xact_start` and this check cannot see them.
The SQL is in sql/queries.sql (blocks `health_*`, `unserved_jobs`, `queue_pauses`,
`circuit_breakers`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg

from . import migrate, store
from .errors import NotifyqError

OK, WARNING, FAILED = "ok", "warning", "failed"
EXIT = {OK: 0, FAILED: 1, WARNING: 2}
LEASE_GRACE = 60.0  # seconds past expiry before an unrescued lease is reported


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: str  # ok | warning | failed
    message: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Report:
    checks: list[Check] = field(default_factory=list)

    @property
    def status(self) -> str:
        found = {c.status for c in self.checks}
        return FAILED if FAILED in found else WARNING if WARNING in found else OK

    @property
    def exit_code(self) -> int:
        return EXIT[self.status]

    def lines(self) -> list[str]:
        return [f"{c.status.upper()}: {c.name}: {c.message}" for c in self.checks]

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "exit_code": self.exit_code,
            "checks": [asdict(c) for c in self.checks],
        }


def check(dsn: str, *, max_transaction_age: float = 300.0) -> Report:
    """Run every check against `dsn`; never raises for what it finds."""
    report = Report()
    try:
        conn = store.connect_sync(dsn)
    except NotifyqError as exc:
        report.checks.append(Check("reachable", FAILED, f"cannot connect: {exc}"))
        return report
    with conn:
        try:
            _run(conn, report, max_transaction_age)
        except NotifyqError as exc:  # lost the connection half-way, say
            report.checks.append(Check("query", FAILED, str(exc)))
    return report


def _run(conn: psycopg.Connection[Any], report: Report, max_age: float) -> None:
    server = store.monitoring.server_info(conn)
    report.checks.append(
        Check(
            "reachable",
            OK,
            f"database {server.database!r} on PostgreSQL {server.version}",
            {"database": server.database, "server_version": server.version},
        )
    )
    schema = _schema(conn)
    report.checks.append(schema)
    report.checks.append(_transactions(conn, max_age))
    if schema.status == FAILED:
        return
    expired = store.monitoring.expired_leases(conn, LEASE_GRACE)
    if expired.jobs:
        report.checks.append(
            Check(
                "leases",
                WARNING,
                f"{expired.jobs} running jobs' leases expired more than {LEASE_GRACE:.0f}s ago "
                f"(the oldest {expired.oldest:.0f}s ago): no dispatcher is rescuing them; "
                "is any `notifyq serve` alive?",
                {"jobs": expired.jobs, "oldest_expired_seconds": round(expired.oldest, 1)},
            )
        )
    else:
        report.checks.append(Check("leases", OK, "no expired lease left unrescued"))
    report.checks.append(_dispatchers(conn))
    report.checks.append(_unserved(conn))
    report.checks.append(_breakers(conn))
    report.checks.append(_paused(conn))
    tuples = store.monitoring.jobs_table(conn)
    if tuples is not None:
        live, dead = tuples.n_live_tup, tuples.n_dead_tup
        report.checks.append(
            Check(
                "jobs table",
                OK,
                f"notifyq.jobs has about {live} live and {dead} dead tuples (old row versions "
                "VACUUM reclaims, not dead jobs)",
                {"live_tuples": live, "dead_tuples": dead},
            )
        )


def _schema(conn: psycopg.Connection[Any]) -> Check:
    have, need = store.schema_version(conn), migrate.latest_version()
    details = {"version": have, "expected": need}
    if have is None:
        return Check(
            "schema", FAILED, "the notifyq schema is not installed: run `notifyq migrate`", details
        )
    if have < need:
        return Check(
            "schema",
            FAILED,
            f"the schema is at version {have}, this notifyq needs {need}: run `notifyq migrate`",
            details,
        )
    if have > need:
        return Check(
            "schema",
            WARNING,
            f"the schema is at version {have}, newer than this notifyq knows ({need}): "
            "upgrade notifyq",
            details,
        )
    return Check("schema", OK, f"version {have}", details)


def _transactions(conn: psycopg.Connection[Any], max_age: float) -> Check:
    oldest = store.monitoring.oldest_transaction(conn)
    if oldest is None:
        return Check("transactions", OK, "no other transaction open", {"oldest": None})
    pid, age, app, state = oldest.pid, oldest.age, oldest.application_name, oldest.state
    details = {"pid": pid, "age_seconds": round(age, 1), "application_name": app, "state": state}
    if age <= max_age:
        return Check(
            "transactions", OK, f"the oldest is {age:.0f}s old (limit {max_age:.0f}s)", details
        )
    return Check(
        "transactions",
        WARNING,
        f"pid {pid} (application_name {app!r}, state {state!r}) has had a transaction open "
        f"for {age:.0f}s (limit {max_age:.0f}s): it holds back vacuum of notifyq.jobs, "
        "whose dead tuples (old row versions) pile up until it ends",
        details,
    )


def _dispatchers(conn: psycopg.Connection[Any]) -> Check:
    found = store.monitoring.lost_dispatchers(conn)
    lost, which = found.lost, found.which
    if not lost:
        return Check("dispatchers", OK, "no lost dispatcher", {"lost": 0})
    return Check(
        "dispatchers",
        WARNING,
        f"{lost} dispatchers stopped sending heartbeats without a graceful exit ({which}): "
        "killed, hung or cut off from the database; their jobs are rescued once their "
        "database session is gone, or their leases expire",
        {"lost": lost, "which": which},
    )


def _paused(conn: psycopg.Connection[Any]) -> Check:
    """Reported, not judged: a pause is an operator's decision (but one easy to forget)."""
    found = store.monitoring.queue_pauses(conn)
    if not found:
        return Check("paused", OK, "no queue or task is paused", {"paused": []})
    parts = [
        (f"queue {p.queue!r}" if p.task == "*" else f"task {p.task!r} of queue {p.queue!r}")
        + f" for {p.paused_for:.0f}s ({p.ready}{'+' if p.more else ''} ready jobs wait)"
        for p in found
    ]
    return Check(
        "paused",
        OK,
        f"paused: {'; '.join(parts)}. Resume with `notifyq resume QUEUE [--task TASK]`",
        {
            "paused": [
                {
                    "queue": p.queue,
                    "task": None if p.task == "*" else p.task,
                    "paused_seconds": round(p.paused_for, 1),
                    "ready": p.ready,
                    "more": p.more,
                }
                for p in found
            ]
        },
    )


UNSERVED_NAMED = 5  # (queue, task) pairs the message names; details list them all


def _unserved(conn: psycopg.Connection[Any]) -> Check:
    found = store.monitoring.unserved_jobs(conn)
    if not found:
        return Check("unserved", OK, "every ready job has a dispatcher that runs it", {"jobs": 0})
    total = sum(r.jobs for r in found)
    plus = "+" if any(r.more for r in found) else ""
    parts = [
        f"{r.jobs}{'+' if r.more else ''} of task {r.task!r} in queue {r.queue!r} ("
        + (
            "no live dispatcher has a handler for the task"
            if r.served
            else "no live dispatcher serves the queue"
        )
        + ")"
        for r in found[:UNSERVED_NAMED]
    ]
    if len(found) > UNSERVED_NAMED:
        parts.append(f"and {len(found) - UNSERVED_NAMED} more (queue, task) pairs")
    return Check(
        "unserved",
        WARNING,
        f"{total}{plus} ready jobs wait for a dispatcher that can run them: {'; '.join(parts)}. "
        "They stay queued until `notifyq serve` runs with an app that registers the task "
        "and serves the queue (--queues)",
        {
            "jobs": total,
            "unserved": [
                {
                    "queue": r.queue,
                    "task": r.task,
                    "jobs": r.jobs,
                    "more": r.more,  # more than the 10,000 counted
                    "oldest_seconds": round(r.oldest, 1),
                    "queue_served": r.served,
                }
                for r in found
            ],
        },
    )


def _breakers(conn: psycopg.Connection[Any]) -> Check:
    found = store.monitoring.circuit_breakers(conn)
    tripped = [b for b in found if b.state != "closed"]
    details = {
        "breakers": len(found),
        "tripped": [
            {
                "task": b.task,
                "state": b.state,
                "opened_at": None if b.opened_at is None else b.opened_at.isoformat(),
                "probe_in_seconds": None if b.reopen_in is None else round(b.reopen_in, 1),
                "probe_job": b.probe_job,
            }
            for b in tripped
        ],
    }
    if not tripped:
        return Check(
            "breakers", OK, f"no circuit breaker open ({len(found)} tasks have one)", details
        )
    parts = [
        f"{b.task} ({'half-open, its probe running' if b.state == 'half_open' else 'open'})"
        for b in tripped
    ]
    return Check(
        "breakers",
        WARNING,
        f"{len(tripped)} tasks' circuit breakers hold their jobs back: {', '.join(parts)}. "
        "Their handlers kept failing; a probe after each cool-down closes the breaker once "
        "one succeeds, or close it now with `notifyq breaker reset TASK`",
        details,
    )
