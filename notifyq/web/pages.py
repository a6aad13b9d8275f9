"""The HTML of `notifyq web`: plain functions from rows to strings, no I/O.

Every value that came from the database or the request goes through `e()` (HTML
escaping, quotes included) before it meets markup; the only markup not built here is
none.  The pages carry no inline script or style (the Content-Security-Policy forbids
them): dashboard.js and dashboard.css are served from the package.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

from ..store.rows import AttemptEntry, JobRecord, JobSummary
from ..watch import Snapshot
from ..watch.snapshot import QueueRow
from ..watch.tables import duration

STATUSES = ("waiting", "queued", "running", "succeeded", "dead", "cancelled")
RETRYABLE = ("dead", "cancelled", "queued")  # what notifyq.retry_job accepts (queued: run now)
CANCELLABLE = ("waiting", "queued", "running")


def e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


@dataclass(frozen=True, slots=True)
class Page:
    """What every page needs besides its body: where the app is mounted, the session's
    CSRF token, and what the mode allows."""

    base: str  # the mount point ("" at the root)
    csrf: str
    read_only: bool
    show_payloads: bool

    def url(self, path: str) -> str:
        return e(self.base + path)


def layout(p: Page, title: str, body: str, *, live: bool = False) -> str:
    nav = "".join(
        f'<a href="{p.url(path)}">{label}</a>'
        for path, label in (
            ("/", "Queues"),
            ("/jobs", "Jobs"),
            ("/dispatchers", "Dispatchers"),
            ("/schedules", "Schedules"),
            *(() if p.read_only else (("/purge", "Purge"),)),
        )
    )
    mode = '<span class="badge">read-only</span>' if p.read_only else ""
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="csrf" content="{e(p.csrf)}">'
        f"<title>{e(title)} · notifyq</title>"
        f'<link rel="stylesheet" href="{p.url("/static/dashboard.css")}">'
        f'<script src="{p.url("/static/dashboard.js")}" defer></script></head>'
        f'<body data-events="{p.url("/events")}" data-live="{"overview" if live else "page"}">'
        f"<header><strong>notifyq</strong><nav>{nav}</nav>{mode}"
        '<span id="status" class="status" title="live updates">●</span></header>'
        f'<div id="stale" class="stale" hidden>Changed since this page loaded: '
        f'<a href="">reload</a></div>'
        f"<main><h1>{e(title)}</h1>{body}</main></body></html>\n"
    )


def message(p: Page, title: str, text: str, back: str) -> str:
    return layout(p, title, f'<p class="note">{e(text)}</p><p><a href="{p.url(back)}">Back</a></p>')


def _form(p: Page, action: str, label: str, *, confirm: str | None = None) -> str:
    ask = f' data-confirm="{e(confirm)}"' if confirm else ""
    return (
        f'<form method="post" action="{p.url(action)}" class="inline"{ask}>'
        f'<input type="hidden" name="csrf" value="{e(p.csrf)}">'
        f'<button type="submit">{e(label)}</button></form>'
    )


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], empty: str) -> str:
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if not body:
        return f'<p class="empty">{e(empty)}</p>'
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    return f'<div class="scroll">{table}</div>'


def _job_link(p: Page, job_id: int) -> str:
    return f'<a href="{p.url(f"/jobs/{job_id}")}">{job_id}</a>'


def _status(status: str) -> str:
    return f'<span class="st {e(status)}">{e(status)}</span>'


def _when(at: datetime | None) -> str:
    if at is None:
        return "-"
    return f'<time datetime="{e(at.isoformat())}">{e(at.strftime("%Y-%m-%d %H:%M:%S %Z"))}</time>'


def _progress(percent: float | None, message: str | None) -> str:
    return "-" if percent is None else f"{percent:.0f}% {message or ''}".strip()


# --- the queues overview (also what the SSE stream pushes)


def queue_states(q: QueueRow) -> list[str]:
    """The states a queue's row shows.  Circuit breakers are per task: the overview lists
    those not closed under the queues.  Caps belong here once the snapshot carries them."""
    states = []
    if q.paused:
        states.append("paused")
    elif q.paused_tasks:
        states.append(f"{len(q.paused_tasks)} task(s) paused: " + ", ".join(q.paused_tasks))
    return states


def trend_chart(values: Sequence[float | None]) -> str:
    """Throughput over the last 5 minutes: one bar per 30 s, as inline SVG."""
    top = max((v for v in values if v is not None), default=0.0)
    bars = []
    for i, v in enumerate(values):
        h = 0.0 if v is None or top <= 0 else max(1.0, 20 * v / top)
        bars.append(f'<rect x="{i * 6}" y="{20 - h:.1f}" width="5" height="{h:.1f}"></rect>')
    title = ", ".join("-" if v is None else f"{v:.1f}/s" for v in values)
    return (
        f'<svg class="trend" viewBox="0 0 {len(values) * 6} 20" width="{len(values) * 6}" '
        f'height="20" role="img"><title>{e(title)}</title>{"".join(bars)}</svg>'
    )


def overview(p: Page, snap: Snapshot) -> str:
    """The live part of the overview page: the queues, the failures, the longest running."""
    out = []
    if not snap.connected:
        out.append(
            '<p class="alert">The live view\'s refresh failed (the database is unreachable, '
            "or the dashboard's role lacks a grant; the server's log says which): retrying.</p>"
        )
    rows = []
    for q in snap.queues:
        actions = ""
        if not p.read_only:
            path = f"/queues/{quote(q.queue, safe='')}"
            actions = (
                _form(p, f"{path}/resume", "Resume")
                if q.paused
                else _form(p, f"{path}/pause", "Pause", confirm=f"Pause queue {q.queue}?")
            )
        dead = p.url("/jobs?status=dead&queue=" + quote(q.queue, safe=""))
        alerts = " ".join(f'<span class="tag {e(a)}">{e(a)}</span>' for a in q.alerts)
        rows.append(
            [
                f'<a href="{p.url("/jobs?queue=" + quote(q.queue, safe=""))}">{e(q.queue)}</a>',
                e("; ".join(queue_states(q)) or "active") + " " + alerts,
                e(q.ready),
                e(q.scheduled),
                e(q.running),
                e(q.failed_1m),
                f'<a href="{dead}">{e(q.dead)}</a>',
                e(f"{q.rate:.1f}/s"),
                trend_chart(q.trend),
                e(duration(q.p50)),
                e(duration(q.p95)),
                e(duration(q.oldest_ready)),
                actions,
            ]
        )
    headers = [
        "queue",
        "state",
        "ready",
        "scheduled",
        "running",
        "failed 1m",
        "dead",
        "throughput",
        "last 5 min",
        "p50 wait",
        "p95 wait",
        "oldest ready",
        "",
    ]
    out.append(_table(headers, rows, "No jobs yet."))
    if snap.breakers:
        # Circuit breakers not closed: their tasks' jobs are held back (docs/lifecycle.md).
        held = [
            [
                e(b.task),
                e(b.state.replace("_", "-")),
                e(duration(b.reopen_in)) if b.state == "open" else "",
                _job_link(p, b.probe_job) if b.probe_job is not None else "",
                e(b.opens),
            ]
            for b in snap.breakers
        ]
        out.append("<h2>Circuit breakers holding jobs back</h2>")
        out.append(_table(["task", "state", "probe in", "probe job", "opened"], held, ""))
    if snap.unserved:
        unserved = [
            [e(u.queue), e(u.task), e(f"{u.jobs}{'+' if u.more else ''}"), e(duration(u.oldest))]
            for u in snap.unserved
        ]
        out.append("<h2>Ready jobs no dispatcher would claim</h2>")
        out.append(_table(["queue", "task", "jobs", "oldest"], unserved, ""))
    out.append("<h2>Recent failures</h2>")
    failures = [
        [
            _job_link(p, f.id),
            e(f.queue),
            e(f.task),
            e(f.attempt),
            e(f.status),
            f'<span class="error">{e(f.error)}</span>',
            e(duration(f.age)),
        ]
        for f in snap.failures
    ]
    out.append(
        _table(["id", "queue", "task", "attempt", "status", "error", "age"], failures, "None.")
    )
    out.append("<h2>Longest running</h2>")
    running = [
        [
            _job_link(p, r.id),
            e(r.queue),
            e(r.task),
            e(r.attempt),
            e(r.claimant),
            e(duration(r.running_for)),
            e(_progress(r.progress, r.message)),
        ]
        for r in snap.running
    ]
    out.append(
        _table(
            ["id", "queue", "task", "attempt", "dispatcher", "running for", "progress"],
            running,
            "Nothing is running.",
        )
    )
    return "".join(out)


def overview_page(p: Page, snap: Snapshot) -> str:
    return layout(p, "Queues", f'<div id="live">{overview(p, snap)}</div>', live=True)


# --- dispatchers and workers


def dispatchers_page(p: Page, snap: Snapshot) -> str:
    rows = [
        [
            e(d.claimant),
            e(d.kind),
            e(d.state),
            e(d.host),
            e(d.pid),
            e(", ".join(d.queues)),
            e(f"{d.running}/{d.concurrency}"),
            e(duration(d.up)),
            e(duration(d.silent)),
        ]
        for d in snap.dispatchers
    ]
    headers = ["claimant", "kind", "state", "host", "pid", "queues", "running", "up", "silent"]
    body = _table(headers, rows, "No dispatcher or SQL worker has registered.")
    body += (
        '<p class="note">kind: serve (a notifyq serve process, HTTP tasks included) or sql '
        "(a worker speaking the SQL worker protocol).</p>"
    )
    return layout(p, "Dispatchers and workers", body)


# --- periodic schedules


@dataclass(frozen=True, slots=True)
class ScheduleLine:
    name: str
    task: str
    queue: str
    schedule: str
    timezone: str
    paused: bool
    last_instant: datetime | None
    next_instant: datetime | None
    problem: str | None = None  # why the next instant cannot be computed


def schedules_page(p: Page, lines: Sequence[ScheduleLine]) -> str:
    rows = [
        [
            e(s.name),
            e(s.task),
            e(s.queue),
            f"<code>{e(s.schedule)}</code>",
            e(s.timezone),
            e("paused" if s.paused else "active"),
            _when(s.last_instant),
            e(s.problem) if s.problem else _when(s.next_instant),
        ]
        for s in lines
    ]
    headers = ["name", "task", "queue", "schedule", "zone", "state", "last instant", "next"]
    return layout(p, "Periodic schedules", _table(headers, rows, "No periodic schedule."))


# --- job search


def jobs_page(p: Page, form: dict[str, str], found: Sequence[JobSummary], error: str = "") -> str:
    def field(name: str, label: str, kind: str = "text") -> str:
        return (
            f'<label>{e(label)}<input type="{kind}" name="{name}" '
            f'value="{e(form.get(name, ""))}"></label>'
        )

    options = "".join(
        f'<option value="{s}"{" selected" if form.get("status") == s else ""}>{s}</option>'
        for s in ("", *STATUSES)
    )
    search = (
        f'<form method="get" action="{p.url("/jobs")}" class="search">'
        + field("id", "id")
        + field("task", "task")
        + f'<label>status<select name="status">{options}</select></label>'
        + field("queue", "queue")
        + field("since", "created from", "datetime-local")
        + field("until", "created before", "datetime-local")
        + (field("key", "payload key") + field("value", "payload value") if p.show_payloads else "")
        + '<button type="submit">Search</button></form>'
    )
    if error:
        search += f'<p class="alert">{e(error)}</p>'
    rows = [
        [
            _job_link(p, j.id),
            e(j.queue),
            e(j.task),
            _status(j.status),
            e(f"{j.attempts}/{j.max_attempts or '-'}"),
            _when(j.created_at),
            _when(j.finished_at),
            f'<span class="error">{e(j.error or "")}</span>',
        ]
        for j in found
    ]
    headers = ["id", "queue", "task", "status", "attempts", "created", "finished", "error"]
    return layout(p, "Jobs", search + _table(headers, rows, "No job matches."))


# --- one job


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)


def job_page(p: Page, job: JobRecord, attempts: Sequence[AttemptEntry], done: str = "") -> str:
    out = []
    if done:
        out.append(f'<p class="note">{e(done)}</p>')
    if not p.read_only:
        actions = []
        if job.status in RETRYABLE:
            label = "Run now" if job.status == "queued" else "Retry"
            actions.append(_form(p, f"/jobs/{job.id}/retry", label))
        if job.status in CANCELLABLE:
            ask = f"Cancel job {job.id}?"
            actions.append(_form(p, f"/jobs/{job.id}/cancel", "Cancel", confirm=ask))
        out.append(f'<div class="actions">{"".join(actions)}</div>')
    fields = [
        ("status", _status(job.status)),
        ("queue", e(job.queue)),
        ("task", e(job.task)),
        ("attempts", e(f"{job.attempts}/{job.max_attempts or '-'}")),
        ("priority", e(job.priority)),
        ("tags", e(", ".join(job.tags or [])) or "-"),
        ("created", _when(job.created_at)),
        ("run at", _when(job.run_at)),
        ("started", _when(job.started_at)),
        ("finished", _when(job.finished_at)),
        ("claimed by", e(job.claimed_by or "-")),
        ("lease until", _when(job.lease_expires_at)),
        ("dedupe key", e(job.dedupe_key or "-")),
        ("rate key", e(job.rate_key or "-")),
        ("progress", e(_progress(job.progress, job.progress_message))),
        ("depends on", ", ".join(_job_link(p, d) for d in job.depends_on or []) or "-"),
        ("if a dependency fails", e(job.on_dependency_failure)),
    ]
    listed = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in fields)
    out.append(f'<dl class="fields">{listed}</dl>')
    documents = (("Payload", job.payload), ("Result", job.result), ("Checkpoint", job.checkpoint))
    for label, value in documents:
        out.append(f"<h2>{label}</h2>")
        if not p.show_payloads:
            out.append('<p class="empty">hidden (--hide-payloads)</p>')
        elif value is None:
            out.append('<p class="empty">none</p>')
        else:
            out.append(f"<pre>{e(_json(value))}</pre>")
    if job.last_error:
        out.append(f'<h2>Last error</h2><pre class="error">{e(job.last_error)}</pre>')
    out.append("<h2>History</h2>")
    history = [
        [
            _when(a.at),
            e(a.from_status or "(enqueued)"),
            e(a.to_status),
            e(a.attempt),
            e(a.dispatcher or ""),
            _traceback(a.error),
        ]
        for a in attempts
    ]
    out.append(
        _table(
            ["at", "from", "to", "attempt", "dispatcher", "error"],
            history,
            "No history recorded (notifyq history on).",
        )
    )
    return layout(p, f"Job {job.id}", "".join(out))


def _traceback(error: str | None) -> str:
    return f'<pre class="error">{e(error)}</pre>' if error else ""


# --- purge


def purge_page(p: Page, note: str = "") -> str:
    boxes = "".join(
        f'<label class="check"><input type="checkbox" name="status" value="{s}"'
        f"{' checked' if s != 'dead' else ''}> {s}</label>"
        for s in ("succeeded", "cancelled", "dead")
    )
    body = (
        (f'<p class="alert">{e(note)}</p>' if note else "")
        + f'<form method="post" action="{p.url("/purge")}" class="search">'
        f'<input type="hidden" name="csrf" value="{e(p.csrf)}">'
        '<label>finished more than<input type="text" name="older_than" value="7d"></label>'
        f"<fieldset>{boxes}</fieldset>"
        '<label>type <code>purge</code> to confirm<input type="text" name="confirm" '
        'autocomplete="off"></label><button type="submit">Delete these jobs</button></form>'
        '<p class="note">Deletes the finished jobs of these statuses, and their history, '
        "through notifyq.purge (as <code>notifyq purge</code> does).</p>"
    )
    return layout(p, "Purge finished jobs", body)
