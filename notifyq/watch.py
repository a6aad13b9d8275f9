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
Every heading is the `--json` key of what its column shows (see Snapshot).  A
table is laid out here, not by rich: when the terminal is narrower than it needs,
the columns that may shrink (the error, the task, the progress) are cut with "…"
first, then the least useful columns are dropped; the job id and the attempt are
never squeezed.  A dispatcher has one name, its claimant, in every table.  In the
live view the frame fits the terminal's height: rows are cut from the lower
sections first and the screen says how many rows, or which sections, it left out;
a resize clears the screen and draws the last snapshot again at once.
"""

from __future__ import annotations

import io
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Generic, TypeVar

import anyio
from rich import box
from rich.console import Console, Group, JustifyMethod, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from . import channels, store
from .errors import DatabaseUnavailable
from .job import JobState
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
R = TypeVar("R")


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
      (any of dead, oldest, failed, growing)
    - dispatchers: claimant (its name on screen and in jobs.claimed_by), host, pid, queues,
      concurrency, running (its jobs running now, from the jobs table; the table shows
      running/concurrency), state (running, stopped, lost), up (since it started), silent
      (since its last heartbeat), kind (serve, or sql for a SQL worker)
    - running (longest first): id, queue, task, attempt, claimant, running_for, progress
      (percent, as the handler last reported), message
    - failures (newest first): id, queue, task, attempt, status (queued: waiting for a
      retry; dead), error (its first line), age (since that attempt started)
    - unserved: queue, task, jobs, oldest, queue_served, more (see UnservedRow)
    """

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

GAP = 2  # cells between two columns: a column's right padding and the (blank) divider
MORE_STYLE = "dim"


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
class Column(Generic[R]):
    """One column of a table.  The header is the JSON key of what the column shows (a
    script reading `--json` finds what it saw on screen under the same name)."""

    header: str
    cell: Callable[[R], Text]
    keep: int  # higher stays longer when the terminal is narrow
    right: bool = False  # right-justified (numbers)
    shrink: int = 0  # 0: never narrower than its content; else it may shrink to this, cut "…"
    extra: bool = False  # dropped before any column is cut


def _num(value: int, style: str = "") -> Text:
    return Text(str(value), style=style)


def _alert(q: QueueRow, name: str, style: str) -> str:
    return style if name in q.alerts else ""


QUEUE_COLUMNS: list[Column[QueueRow]] = [
    Column("queue", lambda q: Text(q.queue, style="bold"), 100, shrink=8),
    Column("ready", lambda q: _num(q.ready, _alert(q, "growing", "yellow")), 90, True),
    Column("scheduled", lambda q: _num(q.scheduled), 75, True),
    Column("running", lambda q: _num(q.running), 80, True),
    Column(
        "succeeded_1m",
        lambda q: _num(q.succeeded_1m, "green" if q.succeeded_1m else ""),
        50,
        True,
    ),
    Column("failed_1m", lambda q: _num(q.failed_1m, _alert(q, "failed", "yellow")), 60, True),
    Column("dead", lambda q: _num(q.dead, _alert(q, "dead", "bold red")), 95, True),
    Column("rate", lambda q: Text(f"{q.rate:.1f}/s"), 70, True),
    Column("trend", lambda q: Text(sparkline(q.trend), style="cyan"), 55, True),
    Column("p50", lambda q: Text(duration(q.p50)), 30, True),
    Column("p95", lambda q: Text(duration(q.p95)), 20, True),
    Column(
        "oldest_ready",
        lambda q: Text(duration(q.oldest_ready), _alert(q, "oldest", "bold red")),
        85,
        True,
    ),
]


def _dispatcher_name(d: DispatcherRow) -> Text:
    # The claimant, as jobs.claimed_by, the running table and serve's log line have it;
    # a SQL worker's host and pid are its database session's, so only its kind is added.
    name = Text(d.claimant)
    if d.kind == "sql":
        name.append(" (sql)", style="dim")
    return name


_STATE_COLOURS = {"running": "green", "stopped": "dim", "lost": "bold red"}

DISPATCHER_COLUMNS: list[Column[DispatcherRow]] = [
    Column("claimant", _dispatcher_name, 100),  # never cut: it is the name in every table
    Column("state", lambda d: Text(d.state, style=_STATE_COLOURS.get(d.state, "")), 90),
    Column("running", lambda d: Text(f"{d.running}/{d.concurrency}"), 80, True),
    Column("up", lambda d: Text(duration(d.up)), 50, True),
    Column("silent", lambda d: Text(duration(d.silent)), 60, True),
    Column("queues", lambda d: Text(",".join(d.queues)), 40, shrink=6),
]

RUNNING_COLUMNS: list[Column[RunningRow]] = [
    Column("id", lambda r: Text(str(r.id)), 100, True),
    Column("task", lambda r: Text(r.task), 90, shrink=8),
    Column("attempt", lambda r: Text(str(r.attempt)), 80, True),
    Column("running_for", lambda r: Text(duration(r.running_for)), 85, True),
    Column("progress", lambda r: Text(_progress(r)), 60, shrink=8),
    Column("claimant", lambda r: Text(r.claimant), 70),  # whole, or not at all
]

FAILURE_COLUMNS: list[Column[FailureRow]] = [
    Column("id", lambda f: Text(str(f.id)), 100, True),
    Column(
        "status",
        lambda f: Text(f.status, style="red" if f.status == JobState.DEAD else "yellow"),
        50,
        extra=True,  # its colour says it too
    ),
    Column("task", lambda f: Text(f.task), 80, shrink=8),
    Column("attempt", lambda f: Text(str(f.attempt)), 95, True),
    Column("age", lambda f: Text(duration(f.age)), 40, True, extra=True),
    Column(
        "error",
        lambda f: Text(f.error, style="red" if f.status == JobState.DEAD else "yellow"),
        90,
        shrink=20,
    ),
]


def _layout(columns: Sequence[Column[Any]], cells: list[list[Text]], width: int) -> list[int]:
    """The width of each column, 0 for a dropped one.  While the table is too wide, the
    extra columns go, the least useful first; then the least useful columns go until the
    rest fit with the shrinkable ones at their `shrink`; then the shrinkable columns give
    up cells, the widest first.  The result fits `width` (unless one column alone does
    not), so rich never squeezes a column itself: it would take cells from the job id."""
    natural = [
        max([len(c.header)] + [row[i].cell_len for row in cells]) for i, c in enumerate(columns)
    ]
    least = [
        min(n, max(c.shrink, len(c.header))) if c.shrink else n
        for n, c in zip(natural, columns, strict=True)
    ]
    shown = list(range(len(columns)))

    def need(widths: list[int]) -> int:
        return sum(widths[i] for i in shown) + GAP * (len(shown) - 1)

    while need(natural) > width and any(columns[i].extra for i in shown):
        shown.remove(min((i for i in shown if columns[i].extra), key=lambda i: columns[i].keep))
    while len(shown) > 1 and need(least) > width:
        shown.remove(min(shown, key=lambda i: columns[i].keep))
    widths = [natural[i] if i in shown else 0 for i in range(len(columns))]
    for _ in range(need(widths) - width):
        shrinkable = [i for i in shown if widths[i] > least[i]]
        if not shrinkable:
            break
        widths[max(shrinkable, key=lambda i: widths[i])] -= 1
    return widths


def _table(columns: Sequence[Column[R]], rows: Sequence[R], width: int, empty: str = "") -> Table:
    """`rows` as a table at most `width` wide; `empty`: what its one row says without rows."""
    cells = [[c.cell(row) for c in columns] for row in rows]
    if not rows and empty:
        cells = [[Text(empty, style="dim")] + [Text("") for _ in columns[1:]]]
    widths = _layout(columns, cells, width)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0), show_edge=False)
    for c, w in zip(columns, widths, strict=True):
        if w:
            justify: JustifyMethod = "right" if c.right else "left"
            table.add_column(c.header, justify=justify, width=w, no_wrap=True, overflow="ellipsis")
    for row_cells in cells:
        table.add_row(*(cell for cell, w in zip(row_cells, widths, strict=True) if w))
    return table


def queue_table(snap: Snapshot, width: int, limit: int | None = None) -> Table:
    return _table(QUEUE_COLUMNS, snap.queues[:limit], width, "no jobs yet")


def dispatcher_table(snap: Snapshot, width: int, limit: int | None = None) -> Table:
    return _table(DISPATCHER_COLUMNS, snap.dispatchers[:limit], width, "none registered")


def failure_table(snap: Snapshot, width: int, limit: int | None = None) -> Table:
    return _table(FAILURE_COLUMNS, snap.failures[:limit], width)


def running_table(snap: Snapshot, width: int, limit: int | None = None) -> Table:
    return _table(RUNNING_COLUMNS, snap.running[:limit], width)


def _progress(r: RunningRow) -> str:
    if r.progress is None:
        return "-"
    text = f"{r.progress:.0f}%"
    return f"{text} {r.message}" if r.message else text


def _line(text: str, style: str = "") -> Text:
    """One screen line: cut with "…" rather than wrapped (the layout counts lines)."""
    return Text(text, style=style, no_wrap=True, overflow="ellipsis")


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


def empty_queue_lines(snap: Snapshot) -> list[Text]:
    """A line per queue shown with nothing in it and no live dispatcher serving it: a
    queue named with --queue that nothing uses (a typo, or a queue not started yet),
    rather than a row of silent zeros."""
    served = {q for d in snap.dispatchers if d.state == "running" for q in d.queues}
    return [
        Text(f"queue {q.queue!r} has no jobs and no dispatcher serving it", style="yellow")
        for q in snap.queues
        if q.queue not in served
        and not (q.ready or q.scheduled or q.running or q.succeeded_1m or q.failed_1m or q.dead)
    ]


@dataclass(slots=True)
class _Section:
    """A part of the screen that can be cut: a title line, a table's header and rule (the
    overhead) and rows, of which the first `shown` appear."""

    name: str
    rows: int
    overhead: int
    body: Callable[[int], list[RenderableType]]
    shown: int = 0


def _allot(sections: list[_Section], height: int | None) -> None:
    """How many rows of each section fit in `height` lines.  `sections` come most
    important first: the queue table (always shown) and the alerts below it take what
    they need; then each other section gets a row, in order, and they share what is left,
    a row each in turn.  A section cut short costs a line saying how many rows are not
    shown; the sections left out share one line that names them."""
    if height is None:
        for s in sections:
            s.shown = s.rows
        return

    def lines() -> int:
        used = sum(s.overhead + s.shown + (s.shown < s.rows) for s in sections if s.shown)
        return used + any(s.rows and not s.shown for s in sections)

    def grow(s: _Section) -> bool:
        s.shown += 1
        if lines() > height:
            s.shown -= 1
            return False
        return True

    sections[0].shown = 1  # the queue table, whatever the terminal's size
    for s in sections[:2]:
        while s.shown < s.rows and grow(s):
            pass
    for s in sections[2:]:
        if s.rows:
            grow(s)
    grew = True
    while grew:
        grew = False
        for s in sections[2:]:
            if 0 < s.shown < s.rows:
                grew = grow(s) or grew


def render(
    snap: Snapshot, width: int, height: int | None = None, *, title: str = "notifyq watch"
) -> RenderableType:
    """The screen: the header line, the queues (with a note per queue no dispatcher would
    drain), the dispatchers, the jobs running longest and the latest failures.  With a
    `height`, the frame fits it: rows are cut from the lower sections first, and the
    screen says how many rows, or which sections, it left out."""
    stamp = time.strftime("%H:%M:%S", time.localtime(snap.at))
    head = Text(f"{title}  {stamp}", style="bold", no_wrap=True, overflow="ellipsis")
    if snap.connected:
        head.append(f"  refresh #{snap.refreshes}", style="dim")
        if width >= 60 and snap.refreshes > 1:  # a rate means nothing after one refresh
            head.append(f"  ~{snap.queries_per_second:.1f} queries/s", style="dim")
    else:
        head.append(f"  reconnecting… ({snap.problem})", style="bold red")
    measure = Console(width=width, file=io.StringIO())
    # Screen lines, so that the layout can count them: a long note wraps.
    notes = [
        line
        for note in (*empty_queue_lines(snap), *unserved_lines(snap))
        for line in note.wrap(measure, width)
    ]
    lost = [d for d in snap.dispatchers if d.state == "lost"]
    summary = _line(f"dispatchers: {sum(d.state == 'running' for d in snap.dispatchers)} running")
    if lost:
        summary.append(f", {len(lost)} lost", style="bold red")
    queues = _Section(
        "queues", max(1, len(snap.queues)), 2, lambda n: [queue_table(snap, width, n)]
    )
    notes_ = _Section("alerts", len(notes), 0, lambda n: list(notes[:n]))
    dispatchers = _Section(
        "dispatchers",
        max(1, len(snap.dispatchers)),
        3,
        lambda n: [summary, dispatcher_table(snap, width, n)],
    )
    running = _Section(
        "running longest",
        len(snap.running),
        3,
        lambda n: [_line("running longest"), running_table(snap, width, n)],
    )
    failures = _Section(
        "latest failures",
        len(snap.failures),
        3,
        lambda n: [_line("latest failures"), failure_table(snap, width, n)],
    )
    # The failures before the running jobs: their ids are what a user looks up next.
    _allot([queues, notes_, dispatchers, failures, running], None if height is None else height - 1)
    sections = [queues, notes_, dispatchers, running, failures]  # as they appear
    parts: list[RenderableType] = [head]
    for s in sections:
        if s.shown:
            parts += s.body(s.shown)
        if 0 < s.shown < s.rows:
            rest = s.rows - s.shown
            parts.append(
                _line(f"… {rest} more {'row' if rest == 1 else 'rows'} not shown", MORE_STYLE)
            )
    left_out = [s.name for s in sections if s.rows and not s.shown]
    if left_out:
        parts.append(_line(f"not shown: {', '.join(left_out)}", MORE_STYLE))
    return Group(*parts)


class LiveView:
    """Draws snapshots in the terminal with rich's Live, each frame the terminal's size.
    After a resize the whole screen is cleared and drawn again: Live moves the cursor up
    by the last frame's height, which the terminal has rewrapped meanwhile, and would
    leave part of the old frame on screen."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._live = Live(console=console, auto_refresh=False, redirect_stderr=False)
        self._last: Snapshot | None = None
        self._size: tuple[int, int] | None = None

    def start(self) -> None:
        self._live.start()

    def stop(self) -> None:
        self._live.stop()

    def show(self, snap: Snapshot) -> None:
        self._last = snap
        width, height = self._console.size
        if self._size is not None and self._size != (width, height):
            self._console.clear()  # Live's next cursor moves start from the top: a no-op
        self._size = (width, height)
        # The last line stays free: with a frame as tall as the terminal, whatever the
        # terminal echoes after it (the ^C that ends watch) scrolls the screen by a line.
        self._live.update(render(snap, width, height - 1), refresh=True)

    def redraw(self) -> None:
        """The last snapshot again, at the terminal's current size (on SIGWINCH)."""
        if self._last is not None:
            self.show(self._last)


# --- the loop


async def follow(
    dsn: str,
    show: Callable[[Snapshot], None],
    *,
    queues: Sequence[str] | None = None,
    interval: float = 2.0,
    max_age: float = 60.0,
    on_resize: Callable[[], None] | None = None,
) -> None:
    """Refresh on notifications (coalesced) and every `interval`; never returns.
    `on_resize` is called when the terminal's size changes (SIGWINCH), to draw the last
    snapshot again at once rather than at the next refresh."""
    if on_resize is None or not hasattr(signal, "SIGWINCH"):  # Windows has no SIGWINCH
        await _follow(dsn, show, queues, interval, max_age)
        return
    async with anyio.create_task_group() as tg:
        tg.start_soon(_call_on_resize, on_resize)
        await _follow(dsn, show, queues, interval, max_age)


async def _call_on_resize(callback: Callable[[], None]) -> None:
    with anyio.open_signal_receiver(signal.SIGWINCH) as signals:
        async for _ in signals:
            callback()


async def _follow(
    dsn: str,
    show: Callable[[Snapshot], None],
    queues: Sequence[str] | None,
    interval: float,
    max_age: float,
) -> None:
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
