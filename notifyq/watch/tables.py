"""The four tables of a Snapshot (queues, dispatchers, running, failures): their
columns, what each cell shows and in which colour, and a table fitted to a width
(layout.py decides the widths, so rich never squeezes a column itself).

Every heading is the `--json` key of what its column shows (see snapshot.py).  Red
for trouble (dead jobs appeared since watch started, the oldest ready job older than
`max_age`, a lost dispatcher), yellow for a backlog growing over the last 30 s and
failures in the last minute.  A dispatcher has one name, its claimant, in every table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from rich import box
from rich.console import JustifyMethod
from rich.table import Table
from rich.text import Text

from ..job import JobState
from .layout import Column, column_widths
from .snapshot import DispatcherRow, FailureRow, QueueRow, RunningRow, Snapshot

_SPARKS = "▁▂▃▄▅▆▇█"
R = TypeVar("R")


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


def _num(value: int, style: str = "") -> Text:
    return Text(str(value), style=style)


def _alert(q: QueueRow, name: str, style: str) -> str:
    return style if name in q.alerts else ""


def _queue_name(q: QueueRow) -> Text:
    # Marked where the eye reads first: a paused queue's backlog is not a stuck one.
    name = Text(q.queue, style="bold")
    if q.paused:
        name.append(" (paused)", style="bold yellow")
    elif q.paused_tasks:
        name.append(f" ({len(q.paused_tasks)} paused)", style="yellow")
    return name


QUEUE_COLUMNS: list[Column[QueueRow]] = [
    Column("queue", _queue_name, 100, shrink=8),
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


def _table(columns: Sequence[Column[R]], rows: Sequence[R], width: int, empty: str = "") -> Table:
    """`rows` as a table at most `width` wide; `empty`: what its one row says without rows."""
    cells = [[c.cell(row) for c in columns] for row in rows]
    if not rows and empty:
        cells = [[Text(empty, style="dim")] + [Text("") for _ in columns[1:]]]
    widths = column_widths(columns, cells, width)
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
