"""`notifyq serve --metrics-port N`: Prometheus metrics, /healthz and /readyz.

The hot path pays one method call per claimed job and one per outcome (a
label lookup and a counter increment): `Metrics` subscribes to the completer
(completion.Subscriber), so what an attempt came to is the completer's word,
not worked out again here.  Everything else is read at scrape time: the
dispatcher's own counters, through `Figures`, a snapshot of the few it needs
(metrics know nothing else of the dispatcher), and from the database the queue
depth (jobs_claim_idx only), the ready jobs no live dispatcher would claim (no
dispatcher serves their queue, or none has a handler for their task: they wait
for one), the paused queues and tasks (notifyq_queue_paused), the
enqueue-to-start wait of the attempts this process started since the last
scrape (by primary key), and how many inserts sent or skipped their wake-up
(two sequences the insert trigger advances: the producers pay one nextval() a
statement for it, no row write; see notifyq.queue_appetite).

    /metrics   Prometheus text format
    /healthz   200 while the process serves HTTP at all (liveness)
    /readyz    200 when the dispatcher is connected (it last heard from the
               database, lease keeper or listener's upkeep, within three of
               its longest regular gaps) and listening; else 503

`prometheus-client` is an optional dependency: `pip install 'notifyq[metrics]'`.
The endpoint listens on 127.0.0.1 unless `--metrics-host` says otherwise.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from . import store
from .errors import ConfigurationError, NotifyqError
from .job import Job, JobState
from .worker_pool import Finished

log = logging.getLogger("notifyq.metrics")

LABELS = ("queue", "task")
# Seconds; from a notification-driven start (milliseconds) to a long backlog or a long job.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
MAX_PENDING_WAITS = 10_000  # started ids kept between two scrapes; older ones are dropped


def require_prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise ConfigurationError(
            "--metrics-port needs prometheus-client, which is not installed: "
            "pip install 'notifyq[metrics]' (the extra), in the environment notifyq runs from"
        ) from exc
    return prometheus_client


@dataclass(frozen=True, slots=True)
class Figures:
    """What the dispatcher counts, as the scrape reads it: totals since start, and the
    state the readiness probe judges."""

    notifications: int  # wake-ups by a notification naming a served queue
    polls_with_work: int  # fallback polls that found jobs no notification announced
    claims: int  # claim statements run
    polls: int  # fallback polls run: claims the poll timer caused, and the listener's upkeeps
    fenced: int  # outcomes dropped: the job was no longer ours
    rescued: int  # jobs this process rescued from dead dispatchers
    lock_waits: int  # statements that gave up on a lock, outcomes found locked
    running: int  # attempts handed to the worker pool whose handler is not done
    contact_every: float  # the longest regular gap between two statements' replies
    contact_age: float | None  # seconds since the database last answered (None: never)
    listening: bool  # the listener is connected, or the dispatcher is not to listen


BREAKER_STATES = ("closed", "open", "half_open")


class Metrics:
    """The dispatcher's Prometheus registry and its hooks: `started` for each job claimed,
    and the completer's outcomes (`decided`, `settled`: a completion.Subscriber)."""

    def __init__(self, dsn: str, figures: Callable[[], Figures]) -> None:
        prom = require_prometheus()
        self._prom = prom
        self._dsn = dsn
        self._figures = figures  # called on the HTTP server's threads
        self.registry = prom.CollectorRegistry(auto_describe=True)
        r = self.registry
        self._started = prom.Counter(
            "notifyq_jobs_started", "Attempts claimed and started.", LABELS, registry=r
        )
        self._succeeded = prom.Counter(
            "notifyq_jobs_succeeded", "Attempts that succeeded.", LABELS, registry=r
        )
        self._failed = prom.Counter(
            "notifyq_jobs_failed",
            "Attempts that failed (retried later, or dead).",
            LABELS,
            registry=r,
        )
        self._dead = prom.Counter(
            "notifyq_jobs_dead", "Jobs that went dead (the dead-letter queue).", LABELS, registry=r
        )
        self._run = prom.Histogram(
            "notifyq_job_run_seconds", "Handler run time.", LABELS, buckets=BUCKETS, registry=r
        )
        self._wait = prom.Histogram(
            "notifyq_job_wait_seconds",
            "Enqueue-to-start wait (started_at - run_at), by the database clock.",
            LABELS,
            buckets=BUCKETS,
            registry=r,
        )
        self._depth = prom.Gauge(
            "notifyq_queue_depth",
            "Queued jobs (all dispatchers'): ready now, or scheduled later; read at scrape time.",
            ["queue", "state"],
            registry=r,
        )
        self._unserved = prom.Gauge(
            "notifyq_unserved_jobs",
            "Ready jobs no live dispatcher would claim (none serves the queue, or none has a "
            "handler for the task): they wait for one; read at scrape time, counted up to "
            "10,000 per queue and task.",
            LABELS,
            registry=r,
        )
        self._paused = prom.Gauge(
            "notifyq_queue_paused",
            "1 for each paused queue (task '*') and each task paused in a queue (notifyq "
            "pause): none of their jobs start until resumed; read at scrape time.",
            LABELS,
            registry=r,
        )
        self._http_requests = prom.Counter(
            "notifyq_http_requests",
            "Requests to HTTP tasks' endpoints, by status code ('timeout': no response in "
            "time; 'error': no connection or a broken one; 'cancelled': the job was).",
            ["task", "code"],
            registry=r,
        )
        self._http_seconds = prom.Histogram(
            "notifyq_http_request_seconds",
            "Time from sending a job to an HTTP task's endpoint to the end of its response.",
            ["task"],
            buckets=BUCKETS,
            registry=r,
        )
        self._webhooks = prom.Counter(
            "notifyq_webhooks",
            "Completion webhook attempts by outcome: sent (a 2xx), failed (to be retried), "
            "given_up (no more tries, or a URL no longer allowed).",
            ["outcome"],
            registry=r,
        )
        self._breakers = prom.Gauge(
            "notifyq_circuit_breaker_state",
            "1 for the state each task's circuit breaker is in (closed, open, half_open), 0 "
            "for the others; read at scrape time (the whole database's).",
            ["task", "state"],
            registry=r,
        )
        self._up = prom.Gauge(
            "notifyq_database_up", "1 if the scrape's queries reached the database.", registry=r
        )
        self._waits: deque[int] = deque(maxlen=MAX_PENDING_WAITS)
        self.wakeups: store.rows.Wakeups | None = None  # the database's, at the last scrape
        self.breakers: list[store.rows.BreakerState] = []  # ditto
        self._conn: Any = None
        self._conn_lock = threading.Lock()
        r.register(_Collector(self))

    # --- hooks: called on the dispatcher's event loop, so kept to a few dict operations

    def started(self, job: Job) -> None:
        self._waits.append(job.id)
        self._started.labels(job.queue, job.task).inc()

    def decided(self, finished: Finished, status: str) -> None:
        """The completer took an attempt's end (completion.Subscriber)."""
        if status not in (JobState.SUCCEEDED, "failed", JobState.DEAD):
            return  # handed back at shutdown, or cancelled: neither success nor failure
        job = finished.job
        labels = (job.queue, job.task)
        if finished.runtime is not None:
            self._run.labels(*labels).observe(finished.runtime)
        if status == JobState.SUCCEEDED:
            self._succeeded.labels(*labels).inc()
        else:
            self._failed.labels(*labels).inc()

    def http_request(self, task: str, code: str, seconds: float) -> None:
        """One request to an HTTP task's endpoint ended (notifyq.http.delivery)."""
        self._http_requests.labels(task, code).inc()
        self._http_seconds.labels(task).observe(seconds)

    def webhook(self, outcome: str) -> None:
        """One completion webhook attempt ended: sent, failed or given_up (webhooks.py)."""
        self._webhooks.labels(outcome).inc()

    def settled(self, job: Job, status: str) -> None:
        """An outcome written: the database applied the retry policy (completion.Subscriber)."""
        if status == JobState.DEAD:
            self._dead.labels(job.queue, job.task).inc()

    # --- scrape time, on the HTTP server's threads

    def figures(self) -> Figures:
        return self._figures()

    def ready(self) -> bool:
        """Connected (the database answered within three regular gaps) and listening."""
        f = self._figures()
        connected = f.contact_age is not None and f.contact_age < 3 * f.contact_every + 1
        return connected and f.listening

    def refresh(self) -> None:
        """Before each scrape: queue depth, unserved jobs, and the waits of attempts started
        since the last."""
        ids = [self._waits.popleft() for _ in range(len(self._waits))]
        try:
            with self._conn_lock:
                if self._conn is None or self._conn.closed:
                    self._conn = store.connect_sync(self._dsn)
                depth = store.monitoring.queue_depth(self._conn)
                unserved = store.monitoring.unserved_jobs(self._conn)
                pauses = store.monitoring.queue_pauses(self._conn)
                waits = store.monitoring.start_waits(self._conn, ids)
                self.wakeups = store.monitoring.wakeups(self._conn)
                self.breakers = store.monitoring.circuit_breakers(self._conn)
        except NotifyqError as exc:
            log.warning("metrics: could not query the database (%s)", exc)
            self.close()
            self._up.set(0)
            return
        self._up.set(1)
        self._depth.clear()
        for d in depth:
            self._depth.labels(d.queue, "ready").set(d.ready)
            self._depth.labels(d.queue, "scheduled").set(d.scheduled)
        self._unserved.clear()
        for u in unserved:
            self._unserved.labels(u.queue, u.task).set(u.jobs)
        self._paused.clear()
        for p in pauses:
            self._paused.labels(p.queue, p.task).set(1)
        for w in waits:
            self._wait.labels(w.queue, w.task).observe(w.wait)
        self._breakers.clear()
        for b in self.breakers:
            for state in BREAKER_STATES:
                self._breakers.labels(b.task, state).set(int(b.state == state))

    def close(self) -> None:
        with self._conn_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class _Collector:
    """What the dispatcher already counts, read at scrape time (no hot-path cost)."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def describe(self) -> list[Any]:
        return []  # the families are fixed, but cheap enough to find by collecting

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        w = self._m.figures()
        counters = {
            "notifyq_notifications": ("Notifications naming a served queue.", w.notifications),
            "notifyq_polls_with_work": (
                "Fallback polls that found jobs no notification had announced "
                "(notifications that went missing).",
                w.polls_with_work,
            ),
            "notifyq_claims": ("Claim statements run.", w.claims),
            "notifyq_polls": (
                "Fallback polls run: by the LISTEN connection (one statement, no claim unless "
                "a job is ready), or by the dispatcher's claim when it does not listen.",
                w.polls,
            ),
            "notifyq_completions_fenced": (
                "Outcomes dropped because the job was no longer ours (rescued or cancelled).",
                w.fenced,
            ),
            "notifyq_rescued": (
                "Jobs this process rescued from dead dispatchers (session ended, lease expired).",
                w.rescued,
            ),
            "notifyq_lock_waits": (
                "Times this process met a lock another transaction held: a statement that "
                "gave up after lock_timeout, or an outcome whose row was locked (written later).",
                w.lock_waits,
            ),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)
        if (wakeups := self._m.wakeups) is not None:
            yield CounterMetricFamily(
                "notifyq_wakeups_sent",
                "Inserts (per statement and queue, in the whole database) that notified "
                "notifyq_jobs.",
                value=wakeups.sent,
            )
            yield CounterMetricFamily(
                "notifyq_wakeups_skipped",
                "Inserts (per statement and queue, in the whole database) that skipped their "
                "notification: every dispatcher of the queue was draining.",
                value=wakeups.skipped,
            )
        if self._m.breakers:
            opens = CounterMetricFamily(
                "notifyq_circuit_breaker_opens",
                "Times each task's circuit breaker opened (or opened again after a failed "
                "probe), since it was created; the whole database's.",
                labels=["task"],
            )
            for b in self._m.breakers:
                opens.add_metric([b.task], b.opens)
            yield opens
        yield GaugeMetricFamily(
            "notifyq_running_jobs", "Jobs running in this process.", value=w.running
        )


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class Exporter:
    """The HTTP endpoint, on a thread of its own; on 127.0.0.1 unless told otherwise
    (the endpoints have no authentication)."""

    def __init__(self, metrics: Metrics, port: int, host: str = "127.0.0.1") -> None:
        self._metrics = metrics
        prom = metrics._prom
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    metrics.refresh()
                    body = prom.generate_latest(metrics.registry)
                    self._reply(200, body, prom.CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._reply(200, b"ok\n")
                elif path == "/readyz":
                    ok = metrics.ready()
                    self._reply(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
                else:
                    self._reply(404, b"not found: try /metrics, /healthz or /readyz\n")

            def _reply(self, code: int, body: bytes, kind: str = "text/plain") -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("%s %s", exporter.address, format % args)

        server = _IPv6Server if ":" in host else ThreadingHTTPServer
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self._server = server((host, port), Handler)
        except OSError as exc:
            taken = exc.errno == errno.EADDRINUSE
            why = "the port is taken by another process" if taken else exc.strerror or str(exc)
            raise ConfigurationError(
                f"cannot serve metrics on {shown} (--metrics-port {port}, --metrics-host "
                f"{host}): {why}"
            ) from exc
        self._server.daemon_threads = True
        self.address = shown.rsplit(":", 1)[0] + f":{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="notifyq-metrics", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        log.info("metrics on http://%s/metrics (also /healthz, /readyz)", self.address)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._metrics.close()
