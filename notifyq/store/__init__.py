"""The only package that executes SQL; every row it returns has a name.

Split by role, each module a seam of its own:

    connection.py   connections, the named queries of sql/queries.sql, driver errors
                    translated to errors.py (`translated`)
    rows.py         one named, typed row per query result: no caller knows a column's
                    position
    producing.py    enqueue, App.wait's and App.status's reads (the caller's connection)
    dispatching.py  `Store`: one connection per dispatcher role, a typed method per
                    statement; `Listener`, the LISTEN connection
    operations.py   the operator's statements (admin.py, `notifyq jobs/retry/...`)
    monitoring.py   health checks, metrics and `notifyq watch`'s reads
    dashboard.py    `notifyq web`'s other reads: job search, a job's attempts, schedules
    migrations.py   the schema, its numbered migrations, the roles script
    task_results.py a job and its attempts for a framework's result API (contrib/django)
    testing.py      notifyq.testing's: a test's clean state, its jobs, its clock
    webhooks.py     the completion webhook sender's outbox: claim, settle

Every query runs through a typed function here; nothing outside this package
names a query or reads a row by position (tests/test_store_seam.py checks).
"""

from . import dashboard, monitoring, operations, rows, task_results, testing, webhooks
from .connection import CONNECT_OPTIONS, QUERIES, connect, connect_sync, translated
from .dispatching import (
    Claim,
    Listener,
    Note,
    Outcome,
    Rescue,
    Rescued,
    Settled,
    Store,
    TaskSettings,
    Written,
)
from .migrations import (
    apply_roles,
    apply_script,
    lock_migrations,
    migration_scripts,
    migration_sql,
    roles_script,
    schema_version,
)
from .producing import (
    DEDUPE_TRIES,
    ENQUEUE_CHUNK,
    NewJob,
    enqueue,
    enqueue_many,
    enqueue_many_sync,
    enqueue_sync,
    job_status,
    job_status_sync,
    wait_outcomes,
)
from .rows import Fired, JobOutcome, Schedule, Upkeep

__all__ = [
    "CONNECT_OPTIONS",
    "DEDUPE_TRIES",
    "ENQUEUE_CHUNK",
    "QUERIES",
    "Claim",
    "Fired",
    "JobOutcome",
    "Listener",
    "NewJob",
    "Note",
    "Outcome",
    "Rescue",
    "Rescued",
    "Schedule",
    "Settled",
    "Store",
    "TaskSettings",
    "Upkeep",
    "Written",
    "apply_roles",
    "apply_script",
    "connect",
    "connect_sync",
    "dashboard",
    "enqueue",
    "enqueue_many",
    "enqueue_many_sync",
    "enqueue_sync",
    "job_status",
    "job_status_sync",
    "lock_migrations",
    "migration_scripts",
    "migration_sql",
    "monitoring",
    "operations",
    "roles_script",
    "rows",
    "schema_version",
    "task_results",
    "testing",
    "translated",
    "wait_outcomes",
    "webhooks",
]
