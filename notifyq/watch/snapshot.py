"""What one refresh of `notifyq watch` found: the rows on screen and in `watch --json`.

Plain data, no I/O: model.py fills a Snapshot, view.py draws it, `--json` prints
`Snapshot.as_dict()`.  Every table heading on screen is the key of the value it shows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class QueueRow:
    queue: str
    ready: int
    scheduled: int
    running: int
    succeeded_1m: int
    failed_1m: int
    dead: int
    rate: float  # jobs finished per second, over the last 10 s
    p50: float | None  # enqueue-to-start wait, seconds, of starts in the last minute
    p95: float | None
    oldest_ready: float | None  # seconds the oldest ready job has waited
    trend: list[float | None] = field(default_factory=list)
    alerts: list[str] = field(default_factory=list)
    paused: bool = False  # the whole queue is paused (notifyq pause)
    paused_tasks: list[str] = field(default_factory=list)  # its tasks paused on their own


@dataclass(slots=True)
class DispatcherRow:
    claimant: str
    host: str
    pid: int
    queues: list[str]
    concurrency: int
    running: int
    state: str  # running | stopped | lost
    up: float
    silent: float  # seconds since its last heartbeat
    kind: str = "serve"  # serve | sql (a worker using the SQL worker protocol)


@dataclass(slots=True)
class FailureRow:
    id: int
    queue: str
    task: str
    attempt: int
    status: str
    error: str
    age: float


@dataclass(slots=True)
class UnservedRow:
    """Ready jobs of one (queue, task) that no live dispatcher would claim."""

    queue: str
    task: str
    jobs: int
    oldest: float  # seconds the oldest of them has been ready
    queue_served: bool  # some live dispatcher serves the queue (but not the task)
    more: bool = False  # more than the `jobs` counted (the count stops at 10,000)


@dataclass(slots=True)
class BreakerRow:
    """A task's circuit breaker that is not closed: its jobs are held back."""

    task: str
    state: str  # open | half_open
    reopen_in: float | None  # open: seconds until its cool-down ends and a probe may run
    probe_job: int | None  # half_open: the probe running
    opens: int  # times it opened, ever


@dataclass(slots=True)
class RunningRow:
    id: int
    queue: str
    task: str
    attempt: int
    claimant: str
    running_for: float  # seconds since this attempt started
    progress: float | None = None  # the handler's last report, percent
    message: str | None = None


@dataclass(slots=True)
class Snapshot:
    """One refresh, as `watch --json` prints it (an object per line; `stats --json` prints
    its `queues` and `unserved`).  Every table heading on screen is the key of the value
    it shows.  Times are seconds; `null` where there is nothing to measure.

    - at (Unix time), connected, problem (why the database is unreachable), refreshes,
      queries_per_second (this watch's, since it started)
    - queues: queue, ready (queued and due), scheduled (queued for later), running,
      succeeded_1m, failed_1m (jobs whose last attempt failed in the last minute: waiting
      for a retry, or dead), dead, rate (jobs finished per second over the last 10 s; the
      table adds "/s"), p50 and p95 (enqueue-to-start wait of the last minute's starts),
      oldest_ready (how long the oldest ready job has waited), trend (the highest rate in
      each 30 s of the last 5 minutes, oldest first, null before watch started), alerts
      (any of dead, oldest, failed, growing), paused (the whole queue is paused: nothing
      of it starts), paused_tasks (its tasks paused on their own); with `--tag`, the
      counts are of the jobs that have every tag given
    - dispatchers: claimant (its name on screen and in jobs.claimed_by), host, pid, queues,
      concurrency, running (its jobs running now, from the jobs table; the table shows
      running/concurrency), state (running, stopped, lost), up (since it started), silent
      (since its last heartbeat), kind (serve, or sql for a SQL worker)
    - running (longest first): id, queue, task, attempt, claimant, running_for, progress
      (percent, as the handler last reported), message
    - failures (newest first): id, queue, task, attempt, status (queued: waiting for a
      retry; dead), error (its first line), age (since that attempt started)
    - unserved: queue, task, jobs, oldest, queue_served, more (see UnservedRow)
    - breakers (circuit breakers not closed, whose tasks' jobs are held back): task,
      state (open, half_open), reopen_in, probe_job, opens (see BreakerRow)
    """

    at: float
    connected: bool = True
    problem: str | None = None  # why the database is unreachable
    queues: list[QueueRow] = field(default_factory=list)
    dispatchers: list[DispatcherRow] = field(default_factory=list)
    failures: list[FailureRow] = field(default_factory=list)
    running: list[RunningRow] = field(default_factory=list)  # the longest-running first
    unserved: list[UnservedRow] = field(default_factory=list)
    breakers: list[BreakerRow] = field(default_factory=list)
    refreshes: int = 0
    queries_per_second: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
