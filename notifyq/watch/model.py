"""The model: one Snapshot per refresh, read through the typed store
(`notifyq.store.monitoring`), and what a refresh is compared against.

Six statements per refresh (sql/queries.sql `watch_queues`, `watch_failures`,
`watch_running`, `watch_dispatchers`, `unserved_jobs`, `circuit_breakers`: a row per
task that has a breaker), those of notifyq.jobs each along a partial index,
never a count of the whole table: ready/scheduled/oldest from jobs_claim_idx, running
jobs from jobs_lease_idx, dead from jobs_dead_idx, the last minute's successes and
enqueue-to-start waits from jobs_finished_idx, failures from jobs_failed_idx, and the
ready jobs no live dispatcher would claim (no dispatcher serves their queue, or none
has a handler for their task) from jobs_claim_idx.
Throughput is the jobs finished in the last 10 s; its history (the sparkline) is kept
in memory, as is the backlog's, to tell a growing backlog.  The alerts are judged
here: dead jobs appeared since watch started, the oldest ready job older than
`max_age`, failures in the last minute, a backlog growing over the last 30 s.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence

from .. import store
from .snapshot import (
    BreakerRow,
    DispatcherRow,
    FailureRow,
    QueueRow,
    RunningRow,
    Snapshot,
    UnservedRow,
)

HISTORY = 300.0  # seconds of throughput and backlog samples kept
SPARK_BUCKETS = 10  # the sparkline: 10 buckets of 30 s, the last 5 minutes
GROWTH_WINDOW = 30.0  # a backlog larger than this many seconds ago is growing
FAILURES_SHOWN = 5
RUNNING_SHOWN = 5
QUERIES_PER_REFRESH = 6


class Model:
    """Queries one snapshot at a time and remembers what the view compares against."""

    def __init__(
        self,
        st: store.Store,
        queues: Sequence[str] | None = None,
        *,
        max_age: float = 60.0,
        tags: Sequence[str] | None = None,
    ) -> None:
        self._store = st
        self._queues = list(queues) if queues else None
        self._tags = list(tags) if tags else None  # only jobs with every one of them
        self.max_age = max_age
        self._samples: dict[str, deque[tuple[float, float, int]]] = {}  # (t, rate, ready)
        self._dead_at_start: dict[str, int] | None = None
        self._started = time.monotonic()
        self.refreshes = 0
        self.queries = 0
        self.last: Snapshot | None = None

    async def snapshot(self) -> Snapshot:
        reads = store.monitoring
        queue_rows = await reads.queue_stats(self._store, self._queues, self._tags)
        failures = await reads.recent_failures(
            self._store, self._queues, FAILURES_SHOWN, self._tags
        )
        running = await reads.longest_running(self._store, self._queues, RUNNING_SHOWN, self._tags)
        dispatchers = await reads.dispatchers(self._store)
        unserved = await reads.unserved(self._store, self._queues)
        breakers = await reads.breaker_states(self._store)
        self.queries += QUERIES_PER_REFRESH
        self.refreshes += 1
        now = time.monotonic()
        snap = Snapshot(at=time.time(), refreshes=self.refreshes)
        snap.queries_per_second = self.queries / max(now - self._started, 1.0)
        snap.queues = [self._queue(now, row) for row in queue_rows]
        if self._dead_at_start is None:
            self._dead_at_start = {q.queue: q.dead for q in snap.queues}
        for q in snap.queues:
            self._judge(now, q)
        snap.failures = [_failure(f) for f in failures]
        snap.running = [_running(r) for r in running]
        snap.dispatchers = [_dispatcher(d) for d in dispatchers]
        snap.unserved = [_unserved(u) for u in unserved]
        snap.breakers = [
            BreakerRow(b.task, b.state, b.reopen_in, b.probe_job, b.opens)
            for b in breakers
            if b.state != "closed"
        ]
        self.last = snap
        return snap

    def unreachable(self, problem: str) -> Snapshot:
        """The last snapshot, marked disconnected (the view says "reconnecting")."""
        snap = Snapshot(at=time.time(), refreshes=self.refreshes)
        if self.last is not None:
            snap.queues, snap.dispatchers = self.last.queues, self.last.dispatchers
            snap.failures, snap.running = self.last.failures, self.last.running
            snap.unserved, snap.breakers = self.last.unserved, self.last.breakers
        snap.connected, snap.problem = False, problem
        return snap

    def _queue(self, now: float, stats: store.rows.QueueStats) -> QueueRow:
        rate = stats.done_10s / 10.0
        samples = self._samples.setdefault(stats.queue, deque())
        samples.append((now, rate, stats.ready))
        while samples and samples[0][0] < now - HISTORY:
            samples.popleft()
        row = QueueRow(
            queue=stats.queue,
            ready=stats.ready,
            scheduled=stats.scheduled,
            running=stats.running,
            succeeded_1m=stats.succeeded_1m,
            failed_1m=stats.failed_1m,
            dead=stats.dead,
            rate=rate,
            p50=stats.p50,
            p95=stats.p95,
            oldest_ready=stats.oldest_ready,
            paused=stats.paused,
            paused_tasks=list(stats.paused_tasks),
        )
        row.trend = _buckets(samples, now)
        return row

    def _judge(self, now: float, q: QueueRow) -> None:
        if q.paused or q.paused_tasks:
            q.alerts.append("paused")
        if q.dead > (self._dead_at_start or {}).get(q.queue, 0):
            q.alerts.append("dead")
        if q.oldest_ready is not None and q.oldest_ready > self.max_age:
            q.alerts.append("oldest")
        if q.failed_1m:
            q.alerts.append("failed")
        before = [ready for t, _, ready in self._samples[q.queue] if t <= now - GROWTH_WINDOW]
        if before and q.ready > before[-1]:
            q.alerts.append("growing")


def _failure(f: store.rows.FailedJob) -> FailureRow:
    return FailureRow(
        id=f.id,
        queue=f.queue,
        task=f.task,
        attempt=f.attempts,
        status=f.status,
        error=f.error,
        age=f.age,
    )


def _running(r: store.rows.RunningJob) -> RunningRow:
    return RunningRow(
        id=r.id,
        queue=r.queue,
        task=r.task,
        attempt=r.attempts,
        claimant=r.claimed_by,
        running_for=r.running_for,
        progress=r.progress,
        message=r.progress_message,
    )


def _dispatcher(d: store.rows.DispatcherState) -> DispatcherRow:
    return DispatcherRow(
        claimant=d.claimant,
        host=d.host,
        pid=d.pid,
        queues=d.queues,
        concurrency=d.concurrency,
        running=d.running,
        state=d.state,
        up=d.up,
        silent=d.silent,
        kind=d.kind,
    )


def _unserved(u: store.rows.UnservedJobs) -> UnservedRow:
    return UnservedRow(
        queue=u.queue,
        task=u.task,
        jobs=u.jobs,
        oldest=u.oldest,
        queue_served=u.served,
        more=u.more,
    )


def _buckets(samples: deque[tuple[float, float, int]], now: float) -> list[float | None]:
    """The highest rate seen in each 30-second bucket of the last 5 minutes."""
    width = HISTORY / SPARK_BUCKETS
    out: list[float | None] = [None] * SPARK_BUCKETS
    for t, rate, _ in samples:
        i = SPARK_BUCKETS - 1 - int((now - t) // width)
        if 0 <= i < SPARK_BUCKETS:
            current = out[i]
            out[i] = rate if current is None else max(current, rate)
    return out
