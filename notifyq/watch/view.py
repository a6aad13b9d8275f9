"""The view: a Snapshot drawn as one screen of rich renderables, fitted to the
terminal's width (tables.py) and, in the live view, its height (layout.py).

The header line, then the queues with a note per queue that no dispatcher would
drain (red: ready jobs no dispatcher would claim; yellow: an empty queue that no
dispatcher serves) and per task whose circuit breaker holds its jobs back (red),
the dispatchers, the jobs running longest and the latest failures.
"""

from __future__ import annotations

import io
import time

from rich.console import Console, Group, RenderableType
from rich.text import Text

from .layout import Section, allot
from .snapshot import Snapshot, UnservedRow
from .tables import dispatcher_table, duration, failure_table, queue_table, running_table

MORE_STYLE = "dim"
UNSERVED_SHOWN = 5  # lines about jobs no dispatcher would claim; the rest are counted


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


def breaker_lines(snap: Snapshot) -> list[Text]:
    """A line per task whose circuit breaker holds its jobs back."""
    lines = []
    for b in snap.breakers:
        if b.state == "half_open":
            now = f"half-open, probe job {b.probe_job} running" if b.probe_job else "half-open"
        else:
            now = f"open, probe in {duration(b.reopen_in or 0.0)}"
        lines.append(
            Text(f"circuit breaker of task {b.task}: {now} (opened {b.opens}x)", style="bold red")
        )
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
        for note in (*empty_queue_lines(snap), *unserved_lines(snap), *breaker_lines(snap))
        for line in note.wrap(measure, width)
    ]
    lost = [d for d in snap.dispatchers if d.state == "lost"]
    summary = _line(f"dispatchers: {sum(d.state == 'running' for d in snap.dispatchers)} running")
    if lost:
        summary.append(f", {len(lost)} lost", style="bold red")
    queues = Section("queues", max(1, len(snap.queues)), 2, lambda n: [queue_table(snap, width, n)])
    notes_ = Section("alerts", len(notes), 0, lambda n: list(notes[:n]))
    dispatchers = Section(
        "dispatchers",
        max(1, len(snap.dispatchers)),
        3,
        lambda n: [summary, dispatcher_table(snap, width, n)],
    )
    running = Section(
        "running longest",
        len(snap.running),
        3,
        lambda n: [_line("running longest"), running_table(snap, width, n)],
    )
    failures = Section(
        "latest failures",
        len(snap.failures),
        3,
        lambda n: [_line("latest failures"), failure_table(snap, width, n)],
    )
    # The failures before the running jobs: their ids are what a user looks up next.
    allot([queues, notes_, dispatchers, failures, running], None if height is None else height - 1)
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
