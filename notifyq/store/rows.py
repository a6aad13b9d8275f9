"""The rows the store returns, one type per query result, named after its columns.

Each is a frozen dataclass that psycopg builds by column name
(`psycopg.rows.class_row`): a field is the column of that name in the query's
SELECT list (sql/queries.sql), so adding, dropping or reordering a column never
shifts a value into the wrong field.  psycopg matches names only when a row is
fetched, so tests/test_store_seam.py has the server describe every query and
compares its columns with its row type's fields (names, order, types).

Dataclasses rather than NamedTuples on purpose: a NamedTuple can still be
indexed and unpacked (`r[7]`, `a, b = r`), which is exactly the knowledge of
column positions this module exists to keep out of callers.

A status column is a `JobState` value (a str: compare it with JobState).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

# --- producers (enqueue, App.wait)


@dataclass(frozen=True, slots=True)
class Inserted:
    """enqueue, enqueue_many: the new job's id."""

    id: int


@dataclass(frozen=True, slots=True)
class Deduped:
    """enqueue_deduped: the job holding the key, and whether it is the one just inserted."""

    id: int
    created: bool


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """wait_outcomes(_by_token): where an awaited job stands."""

    id: int
    queue: str
    status: str  # a JobState value
    result: Any  # decoded JSON, once succeeded
    last_error: str | None


# --- the dispatcher's statements


@dataclass(frozen=True, slots=True)
class ClaimRow:
    """claim: a claimed job (id not NULL), or the closing row (id NULL) whose
    next_in, full_queues and deferred describe the claim as a whole."""

    id: int | None
    queue: str | None
    task: str | None
    payload: Any
    attempt: int | None
    max_attempts: int | None
    next_in: float | None
    checkpoint: Any
    full_queues: list[str] | None
    deferred: int | None
    trace_context: Any  # decoded JSON, as its producer set it (unchecked)


@dataclass(frozen=True, slots=True)
class EndpointRow:
    """endpoints: a row of notifyq.endpoints (an HTTP task declared in SQL)."""

    task: str
    url: str
    timeout: float
    max_concurrency: int | None
    headers: Any  # decoded JSON: an object of header names to values, checked by notifyq.http
    secret: str | None


@dataclass(frozen=True, slots=True)
class WrittenRow:
    """complete, hand_back: what a fenced write did to one attempt ('busy': skipped)."""

    id: int
    attempt: int
    status: str  # a JobState value, or 'busy'
    run_at: datetime
    holder: str | None


@dataclass(frozen=True, slots=True)
class HeldAttempt:
    """renew_leases, still_claimed: a job still running under our claim."""

    id: int
    attempts: int


@dataclass(frozen=True, slots=True)
class RescueRow:
    """rescue: a job re-queued (id not NULL), or the closing row with `watched`."""

    id: int | None
    status: str | None
    cause: str | None
    watched: int | None


@dataclass(frozen=True, slots=True)
class Purged:
    """purge_batch: jobs deleted, and seconds until a row left may be old enough."""

    deleted: int
    next_in: float | None


@dataclass(frozen=True, slots=True)
class DependencyResult:
    """dependency_results: one dependency of a job, its status (None: deleted) and result."""

    id: int
    status: str | None
    result: Any


@dataclass(frozen=True, slots=True)
class Upkeep:
    """upkeep: a served job is ready; a rescue sweep has something to look at."""

    ready: bool
    rescue: bool


@dataclass(frozen=True, slots=True)
class ScheduleRow:
    """periodic_schedules: the database clock, and one schedule (name NULL: none)."""

    now: datetime
    name: str | None
    schedule: str | None
    timezone: str | None
    since: datetime | None


@dataclass(frozen=True, slots=True)
class Schedule:
    """A schedule not paused: its next instant is due once after `since`."""

    name: str
    schedule: str
    timezone: str
    since: datetime


@dataclass(frozen=True, slots=True)
class Fired:
    """periodic_fire: this call dealt with the instant; whether it enqueued, and the job."""

    enqueue: bool
    job_id: int | None


# --- operations (notifyq jobs/history/events/limit)


@dataclass(frozen=True, slots=True)
class JobSummary:
    """jobs_list: one line of `notifyq jobs list`."""

    id: int
    queue: str
    task: str
    status: str  # a JobState value
    attempts: int
    max_attempts: int | None
    priority: int
    run_at: datetime
    created_at: datetime
    finished_at: datetime | None
    error: str | None  # the first line of last_error
    tags: list[str] | None


@dataclass(frozen=True, slots=True)
class JobRecord:
    """job_show: every column of one job."""

    id: int
    queue: str
    task: str
    status: str  # a JobState value
    priority: int
    attempts: int
    max_attempts: int | None
    dedupe_key: str | None
    run_at: datetime
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    claimed_by: str | None
    lease_expires_at: datetime | None
    depends_on: list[int] | None
    on_dependency_failure: str
    rate_key: str | None
    rate_reserved: bool
    progress: float | None
    progress_message: str | None
    payload: Any
    checkpoint: Any
    result: Any
    last_error: str | None
    trace_context: Any
    tags: list[str] | None


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """job_history: one recorded status change."""

    at: datetime
    from_status: str | None  # None: the job was inserted
    to_status: str
    attempt: int
    dispatcher: str | None
    error: str | None  # the first line


@dataclass(frozen=True, slots=True)
class QueueLimit:
    """queue_limits: a queue's cap, and how many of its jobs run now."""

    queue: str
    max_running: int
    running: int


@dataclass(frozen=True, slots=True)
class QueuePause:
    """queue_pauses: a paused queue (task '*') or task of a queue, and its ready jobs."""

    queue: str
    task: str  # '*': the whole queue
    paused_at: datetime
    paused_for: float  # seconds
    ready: int  # its jobs ready now, counted up to 10,000
    more: bool  # more than the 10,000 counted


@dataclass(frozen=True, slots=True)
class QueueEvents:
    """queue_events: a queue whose jobs announce their changes on notifyq_events."""

    queue: str
    enabled_at: datetime


@dataclass(frozen=True, slots=True)
class BreakerState:
    """circuit_breakers: a task's circuit breaker, its settings and where it stands."""

    task: str
    state: str  # closed | open | half_open
    failures: int  # failures within window_seconds that open it
    window_seconds: float
    cooldown_seconds: float
    failed: int  # failures counted in the current window (closed only)
    opened_at: datetime | None
    reopen_in: float | None  # open: seconds until the cool-down ends (0: the next claim probes)
    probe_job: int | None  # half_open: the probe's job id
    opens: int  # times it opened, ever


# --- monitoring (notifyq health, watch, the metrics)


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """health_server."""

    version: str
    database: str


@dataclass(frozen=True, slots=True)
class OldestTransaction:
    """health_oldest_transaction: the oldest open transaction other than ours."""

    pid: int
    age: float  # seconds
    application_name: str
    state: str


@dataclass(frozen=True, slots=True)
class ExpiredLeases:
    """health_expired_leases: running jobs whose lease expired long ago."""

    jobs: int
    oldest: float  # seconds since the oldest expired


@dataclass(frozen=True, slots=True)
class TupleCounts:
    """health_jobs_table: notifyq.jobs' live and dead tuples (statistics)."""

    n_live_tup: int
    n_dead_tup: int


@dataclass(frozen=True, slots=True)
class LostDispatchers:
    """health_lost_dispatchers."""

    lost: int
    which: str  # host:pid, comma-separated


@dataclass(frozen=True, slots=True)
class UnservedJobs:
    """unserved_jobs: ready jobs of one (queue, task) no live dispatcher would claim."""

    queue: str
    task: str
    jobs: int  # counted up to 10,000
    oldest: float  # seconds the oldest has been ready
    served: bool  # a live dispatcher serves the queue (but has no handler for the task)
    more: bool  # more than the 10,000 counted


@dataclass(frozen=True, slots=True)
class Wakeups:
    """wakeups: inserts that notified, and those that skipped it (every dispatcher of
    their queue was draining)."""

    sent: int
    skipped: int


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """metrics_depth: queued jobs of one queue."""

    queue: str
    ready: int
    scheduled: int


@dataclass(frozen=True, slots=True)
class StartWait:
    """metrics_waits: enqueue-to-start wait of one attempt."""

    queue: str
    task: str
    wait: float  # seconds


@dataclass(frozen=True, slots=True)
class QueueStats:
    """watch_queues: one queue's line in `notifyq watch`."""

    queue: str
    ready: int
    scheduled: int
    running: int
    succeeded_1m: int
    failed_1m: int
    dead: int
    done_10s: int
    p50: float | None  # enqueue-to-start wait, seconds
    p95: float | None
    oldest_ready: float | None  # seconds
    paused: bool  # the whole queue (notifyq.queue_pauses)
    paused_tasks: list[str]  # its tasks paused on their own


@dataclass(frozen=True, slots=True)
class FailedJob:
    """watch_failures: a job whose last attempt failed."""

    id: int
    queue: str
    task: str
    attempts: int
    status: str  # a JobState value: queued (for a retry) or dead
    error: str
    age: float  # seconds since that attempt started


@dataclass(frozen=True, slots=True)
class RunningJob:
    """watch_running: a job running now."""

    id: int
    queue: str
    task: str
    attempts: int
    claimed_by: str
    running_for: float  # seconds
    progress: float | None
    progress_message: str | None


@dataclass(frozen=True, slots=True)
class DispatcherState:
    """watch_dispatchers: one row of notifyq.dispatcher_status."""

    claimant: str
    host: str
    pid: int
    queues: list[str]
    concurrency: int
    running: int  # its jobs running now, counted in the jobs table (not its heartbeat's)
    state: str  # running | stopped | lost
    up: float  # seconds since it started
    silent: float  # seconds since its last heartbeat
    kind: str  # serve | sql


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """task_record: a job as a framework's result API shows it (contrib/django)."""

    id: int
    queue: str
    task: str
    status: str
    priority: int
    attempts: int
    run_at: datetime
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    claimed_by: str | None
    payload_json: str
    result_json: str | None
    last_error: str | None


@dataclass(frozen=True, slots=True)
class AttemptEntry:
    """task_attempts: one recorded status change, its error whole."""

    at: datetime
    from_status: str | None  # None: the job was inserted
    to_status: str
    attempt: int
    dispatcher: str | None  # the claimant, for a claim
    error: str | None  # last_error, when this change set it


# --- notifyq web


@dataclass(frozen=True, slots=True)
class PeriodicEntry:
    """web_periodic: one schedule, paused or not, and the database clock."""

    now: datetime
    name: str
    task: str
    queue: str
    schedule: str
    timezone: str
    missed: str  # skip | once
    paused: bool
    last_instant: datetime | None  # the latest instant dealt with; None before the first
    since: datetime  # its next instant is the first one after this


@dataclass(frozen=True, slots=True)
class FailedAttempt:
    """monitor_failed_recent: a recent failed attempt (notifyq.failed_recent)."""

    id: int
    queue: str
    task: str
    status: str  # a JobState value: queued (for a retry) or dead
    attempts: int
    max_attempts: int | None
    error: str  # last_error, whole
    started_at: datetime  # when the failed attempt started
    finished_at: datetime | None  # dead jobs only


@dataclass(frozen=True, slots=True)
class StuckJob:
    """monitor_stuck: a running job past its lease or running too long (notifyq.stuck)."""

    id: int
    queue: str
    task: str
    attempts: int
    claimed_by: str
    started_at: datetime
    lease_expires_at: datetime
    running_for: float  # seconds
    lease_expired: bool


@dataclass(frozen=True, slots=True)
class WebhookClaimed:
    """webhook_claim: a completion webhook to send now (notifyq.webhook_deliveries)."""

    id: int
    job_id: int
    url: str
    body: str  # the JSON to POST, as text: signed as these bytes
    attempts: int  # this attempt's number
    secret: str | None  # the allow-list prefix's signing secret name; None: unsigned
    allowed: bool  # the URL still starts with an allowed prefix


@dataclass(frozen=True, slots=True)
class NextDue:
    """webhook_next_due: seconds until the next pending webhook is due."""

    seconds: float | None


@dataclass(frozen=True, slots=True)
class Settled:
    """webhook_settle: a delivery whose outcome was written."""

    id: int
