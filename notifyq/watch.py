"""`notifyq watch`: the live terminal view.  A model that queries, a view that renders.

Model: five statements per refresh (sql/queries.sql `watch_queues`,
`watch_failures`, `watch_running`, `watch_dispatchers`, `unserved_jobs`), each
along a partial index, never a count of the whole table: ready/scheduled/oldest
from jobs_claim_idx, running jobs from jobs_lease_idx, dead from jobs_dead_idx,
the last minute's successes and enqueue-to-start waits from jobs_finished_idx,
failures from jobs_failed_idx, and the ready jobs no live dispatcher would
claim (no dispatcher serves their queue, or none has a handler for their task)
from jobs_claim_idx.
Throughput is the jobs finished in the last 10 s; its history (the sparkline)
is kept in memory, as is the backlog's, to tell a growing backlog.

Loop: LISTEN notifyq_status (every status change notifies it) and
notifyq_progress (handlers' progress reports); a refresh
follows a notification, coalesced to at most MAX_REFRESHES per second however
many arrive, and a quiet `interval` (default 2 s) refreshes anyway.  When the
database goes away the view says "reconnecting" and the loop reconnects with
backoff.

View: rich renderables; red for trouble (dead jobs appeared since watch
started, the oldest ready job older than `max_age`, a lost dispatcher, ready
jobs no dispatcher would claim), yellow for a backlog growing over the last
30 s and failures in the last minute.
Columns are dropped, least useful first, when the terminal is narrower than
they need.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio
from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from . import channels, store
from .errors import DatabaseUnavailable
from .retry import reconnect_delay

MAX_REFRESHES = 3.0  # per second, however many notifications arrive
HISTORY = 300.0  # seconds of throughput and backlog samples kept
SPARK_BUCKETS = 10  # the sparkline: 10 buckets of 30 s, the last 5 minutes
GROWTH_WINDOW = 30.0  # a backlog larger than this many seconds ago is growing
FAILURES_SHOWN = 5
RUNNING_SHOWN = 5
QUERIES_PER_REFRESH = 5
UNSERVED_SHOWN = 5  # lines about jobs no dispatcher would claim; the rest are counted
_SPARKS = "▁▂▃▄▅▆▇█"


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
    at: float
    connected: bool = True
    problem: str | None = None  # why the database is unreachable
    queues: list[QueueRow] = field(default_factory=list)
    dispatchers: list[DispatcherRow] = field(default_factory=list)
    failures: list[FailureRow] = field(default_factory=list)
    running: list[RunningRow] = field(default_factory=list)  # the longest-running first
    unserved: list[UnservedRow] = field(default_factory=list)
    refreshes: int = 0
    queries_per_second: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Model:
    """Queries one snapshot at a time and remembers what the view compares against."""

    def __init__(
        self, st: store.Store, queues: Sequence[str] | None = None, *, max_age: float = 60.0
    ) -> None:
        self._store = st
        self._queues = list(queues) if queues else None
        self.max_age = max_age
        self._samples: dict[str, deque[tuple[float, float, int]]] = {}  # (t, rate, ready)
        self._dead_at_start: dict[str, int] | None = None
        self._started = time.monotonic()
        self.refreshes = 0
        self.queries = 0
        self.last: Snapshot | None = None

    async def snapshot(self) -> Snapshot:
        reads = store.monitoring
        queue_rows = await reads.queue_stats(self._store, self._queues)
        failures = await reads.recent_failures(self._store, self._queues, FAILURES_SHOWN)
        running = await reads.longest_running(self._store, self._queues, RUNNING_SHOWN)
        dispatchers = await reads.dispatchers(self._store)
        unserved = await reads.unserved(self._store, self._queues)
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
        self.last = snap
        return snap

    def unreachable(self, problem: str) -> Snapshot:
        """The last snapshot, marked disconnected (the view says "reconnecting")."""
        snap = Snapshot(at=time.time(), refreshes=self.refreshes)
        if self.last is not None:
            snap.queues, snap.dispatchers = self.last.queues, self.last.dispatchers
            snap.failures, snap.running = self.last.failures, self.last.running
            snap.unserved = self.last.unserved
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
        )
        row.trend = _buckets(samples, now)
        return row

    def _judge(self, now: float, q: QueueRow) -> None:
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


# --- the view


def sparkline(values: Sequence[float | None]) -> str:
    top = max((v for v in values if v is not None), default=0.0)
    chars = []
    for v in values:
        if v is None:
            chars.append(" ")
        elif top <= 0:
            chars.append(_SPARKS[0])
        else:
            chars.append(_SPARKS[min(len(_SPARKS) - 1, int(v / top * (len(_SPARKS) - 1)))])
    return "".join(chars)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 100:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    if seconds < 6000:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


@dataclass(frozen=True, slots=True)
class Column:
    header: str
    cell: Callable[[QueueRow], Text]
    keep: int  # higher stays longer when the terminal is narrow


def _num(value: int, style: str = "") -> Text:
    return Text(str(value), style=style)


def _alert(q: QueueRow, name: str, style: str) -> str:
    return style if name in q.alerts else ""


QUEUE_COLUMNS = [
    Column("queue", lambda q: Text(q.queue, style="bold"), 100),
    Column("ready", lambda q: _num(q.ready, _alert(q, "growing", "yellow")), 90),
    Column("sched", lambda q: _num(q.scheduled), 75),
    Column("run", lambda q: _num(q.running), 80),
    Column("ok/1m", lambda q: _num(q.succeeded_1m, "green" if q.succeeded_1m else ""), 50),
    Column("err/1m", lambda q: _num(q.failed_1m, _alert(q, "failed", "yellow")), 60),
    Column("dead", lambda q: _num(q.dead, _alert(q, "dead", "bold red")), 95),
    Column("jobs/s", lambda q: Text(f"{q.rate:.1f}"), 70),
    Column("trend", lambda q: Text(sparkline(q.trend), style="cyan"), 55),
    Column("p50", lambda q: Text(duration(q.p50)), 30),
    Column("p95", lambda q: Text(duration(q.p95)), 20),
    Column("oldest", lambda q: Text(duration(q.oldest_ready), _alert(q, "oldest", "bold red")), 85),
]


def _fit(columns: list[Column], cells: list[list[Text]], width: int) -> list[int]:
    """Indexes of the columns to show: drop the least useful until the table fits."""
    shown = list(range(len(columns)))

    def need() -> int:
        widths = [max([len(columns[i].header)] + [row[i].cell_len for row in cells]) for i in shown]
        return sum(widths) + 3 * (len(shown) - 1)  # padding 1 + divider + padding 1

    while len(shown) > 1 and need() > width:
        shown.remove(min(shown, key=lambda i: columns[i].keep))
    return shown


def queue_table(snap: Snapshot, width: int) -> Table:
    cells = [[c.cell(q) for c in QUEUE_COLUMNS] for q in snap.queues]
    shown = _fit(QUEUE_COLUMNS, cells, width)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), show_edge=False)
    for i in shown:
        table.add_column(QUEUE_COLUMNS[i].header, justify="left" if i == 0 else "right")
    for row in cells:
        table.add_row(*(row[i] for i in shown))
    if not snap.queues:
        table.add_row(Text("no jobs yet", style="dim"), *([""] * (len(shown) - 1)))
    return table


def dispatcher_table(snap: Snapshot, width: int) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), show_edge=False)
    wide = width >= 70
    table.add_column("dispatcher")
    table.add_column("state")
    table.add_column("jobs", justify="right")
    table.add_column("up", justify="right")
    if wide:
        table.add_column("heartbeat", justify="right")
        table.add_column("queues", overflow="ellipsis", no_wrap=True)
    colour = {"running": "green", "stopped": "dim", "lost": "bold red"}
    for d in snap.dispatchers:
        cells: list[RenderableType] = [
            # A SQL worker's host and pid are its database session's: its name says more.
            f"{d.claimant} (sql)" if d.kind == "sql" else f"{d.host}:{d.pid}",
            Text(d.state, style=colour.get(d.state, "")),
            f"{d.running}/{d.concurrency}",
            duration(d.up),
        ]
        if wide:
            cells += [duration(d.silent) + " ago", ",".join(d.queues)]
        table.add_row(*cells)
    if not snap.dispatchers:
        table.add_row(Text("none registered", style="dim"), "", "", "")
    return table


def failure_table(snap: Snapshot, width: int) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), show_edge=False)
    table.add_column("job", justify="right")
    table.add_column("task", overflow="ellipsis", no_wrap=True, max_width=max(10, width // 4))
    table.add_column("try", justify="right")
    table.add_column("last error", overflow="ellipsis", no_wrap=True, ratio=1)
    for f in snap.failures:
        table.add_row(
            str(f.id),
            f.task,
            str(f.attempt),
            Text(f.error, style="red" if f.status == "dead" else "yellow"),
        )
    return table


def running_table(snap: Snapshot, width: int) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), show_edge=False)
    table.add_column("job", justify="right")
    table.add_column("task", overflow="ellipsis", no_wrap=True, max_width=max(10, width // 3))
    table.add_column("try", justify="right")
    table.add_column("for", justify="right")
    table.add_column("done", overflow="ellipsis", no_wrap=True, max_width=max(5, width // 4))
    if width >= 70:
        table.add_column("on", overflow="ellipsis", no_wrap=True, ratio=1)
    for r in snap.running:
        cells = [str(r.id), r.task, str(r.attempt), duration(r.running_for), _progress(r)]
        if width >= 70:
            cells.append(r.claimant)
        table.add_row(*cells)
    return table


def _progress(r: RunningRow) -> str:
    if r.progress is None:
        return "-"
    text = f"{r.progress:.0f}%"
    return f"{text} {r.message}" if r.message else text


def unserved_lines(snap: Snapshot) -> list[Text]:
    """One line per task that a served queue holds and no dispatcher handles, and per
    queue that no dispatcher serves at all."""
    lines: list[Text] = []
    unserved_queues: dict[str, list[UnservedRow]] = {}
    for u in snap.unserved:
        if u.queue_served:
            lines.append(
                Text(
                    f"no dispatcher handles task {u.task} (queue {u.queue}):"
                    f" {u.jobs}{'+' if u.more else ''} ready,"
                    f" oldest {duration(u.oldest)}",
                    style="bold red",
                )
            )
        else:
            unserved_queues.setdefault(u.queue, []).append(u)
    for queue, rows in unserved_queues.items():
        tasks = ", ".join(u.task for u in rows)
        lines.append(
            Text(
                f"no dispatcher serves queue {queue}: {sum(u.jobs for u in rows)}"
                f"{'+' if any(u.more for u in rows) else ''} ready"
                f" ({tasks}), oldest {duration(max(u.oldest for u in rows))}",
                style="bold red",
            )
        )
    if len(lines) > UNSERVED_SHOWN:
        more = len(lines) - UNSERVED_SHOWN + 1
        lines = [*lines[: UNSERVED_SHOWN - 1], Text(f"... and {more} more", style="bold red")]
    return lines


def render(snap: Snapshot, width: int, *, title: str = "notifyq watch") -> RenderableType:
    stamp = time.strftime("%H:%M:%S", time.localtime(snap.at))
    head = Text(f"{title}  {stamp}", style="bold")
    if snap.connected:
        head.append(f"  refresh #{snap.refreshes}", style="dim")
        if width >= 60 and snap.refreshes > 1:  # a rate means nothing after one refresh
            head.append(f"  ~{snap.queries_per_second:.1f} queries/s", style="dim")
    else:
        head.append(f"  reconnecting… ({snap.problem})", style="bold red")
    parts: list[RenderableType] = [head, queue_table(snap, width), *unserved_lines(snap)]
    lost = [d for d in snap.dispatchers if d.state == "lost"]
    summary = Text(f"dispatchers: {sum(d.state == 'running' for d in snap.dispatchers)} running")
    if lost:
        summary.append(f", {len(lost)} lost", style="bold red")
    parts += [summary, dispatcher_table(snap, width)]
    if snap.running:
        parts += [Text("running longest"), running_table(snap, width)]
    if snap.failures:
        parts += [Text("latest failures"), failure_table(snap, width)]
    return Group(*parts)


# --- the loop


async def follow(
    dsn: str,
    show: Callable[[Snapshot], None],
    *,
    queues: Sequence[str] | None = None,
    interval: float = 2.0,
    max_age: float = 60.0,
) -> None:
    """Refresh on notifications (coalesced) and every `interval`; never returns."""
    st = store.Store(dsn, "watch")
    listener = store.Listener(dsn, channels.STATUS, channels.PROGRESS)
    model = Model(st, queues, max_age=max_age)
    failures = 0
    clock = anyio.current_time
    try:
        while True:
            try:
                await listener.open()
                while True:
                    show(await model.snapshot())
                    failures = 0
                    last = clock()
                    await listener.wait(ping_after=interval)
                    await anyio.sleep(max(0.0, last + 1 / MAX_REFRESHES - clock()))
                    await listener.drain()  # everything that arrived meanwhile: one refresh
            except DatabaseUnavailable as exc:
                show(model.unreachable(str(exc)))
                await listener.close()
                await st.close()
                failures += 1
                await anyio.sleep(reconnect_delay(failures, first=0.25, cap=5.0, jitter=False))
    finally:
        with anyio.CancelScope(shield=True):
            await listener.close()
            await st.close()


async def once(dsn: str, queues: Sequence[str] | None = None, max_age: float = 60.0) -> Snapshot:
    st = store.Store(dsn, "watch")
    try:
        return await Model(st, queues, max_age=max_age).snapshot()
    finally:
        await st.close()
