"""One dispatcher's machinery, composed: the only place that knows every piece.

    listener ──wake──> dispatcher ──claim──> worker pool ──Finished──> completer
                           ^                                               │
                           └────────── slot freed / outcome written ───────┘
    lease keeper: renews what we hold, rescues what others lost
    scheduler: enqueues the instants of periodic schedules (cron), each once

Each piece knows only the callbacks it is given; `Worker.run` owns them all
in one task group and shuts them down in order: stop claiming, let running
jobs finish (or interrupt them), write every outcome, then stop the rest.

What this process holds is kept in one place, the ledger (ledger.py): the
pool enters each claimed attempt and marks it finished, the completer drops
it once written; the dispatcher counts its free slots there, the lease keeper
renews what is there, and the cancellation check asks about those ids.
Metrics subscribe to the completer's outcomes and read `figures()`, a
snapshot of the few counts they show; they see nothing else of the Worker.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskStatus

from . import channels, embedded, failpoints, listener, retention, store
from .appetite import Appetite
from .completion import Completer
from .dispatcher import Dispatcher
from .errors import DatabaseUnavailable
from .http.endpoints import Secrets
from .http.serving import HttpServing, check_secrets, httpx_installed
from .job import JobState
from .leases import LeaseKeeper, heartbeat_for
from .ledger import Ledger
from .metrics import Exporter, Figures, Metrics
from .periodic import Periodic, Scheduler
from .progress import Reports
from .registry import Registry
from .settings import MAX_BATCH, Settings
from .store import TaskSettings
from .worker_pool import Finished, Work, WorkerPool

if TYPE_CHECKING:  # imported when httpx is there (the optional http extra)
    from .http.webhooks import WebhookSender

log = logging.getLogger("notifyq")

CANCEL_CHECK_GAP = 0.05  # seconds between two checks for cancelled jobs, at least


class Worker:
    """One dispatcher process's machinery; `run()` until `stop()` or a signal.

    It serves the tasks of `registry` and enqueues the instants of `schedules`
    (an App's `registry` and `schedules`: `App.worker()` builds it)."""

    def __init__(
        self, registry: Registry, schedules: Sequence[Periodic], settings: Settings, dsn: str
    ) -> None:
        failpoints.check()
        if not len(registry):
            log.warning(
                "the app registers no tasks: this dispatcher claims only the jobs of HTTP "
                "tasks in notifyq.endpoints, if any"
            )
        # Our own copy: HTTP endpoints read from notifyq.endpoints come and go in it.
        registry = registry.clone()
        self.registry = registry
        secrets = Secrets(settings.secrets_file)
        check_secrets(registry, secrets)  # a secret not set: fail before anything is built
        self.settings = settings
        self.dsn = dsn
        self.claimant = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.queues = list(settings.queues or registry.queues())
        # Attempts claimed and whose outcome is not yet written: slots taken, leases to
        # keep.  The one count of what this process holds; every piece below shares it.
        self.held = Ledger()
        self._loop_beat = time.monotonic()
        self.ready = anyio.Event()
        self._signalled = False
        self._hurry = anyio.Event()  # stop() was called: running jobs get the shutdown grace
        self.runtime_exceeded = False
        self._cancel_check = anyio.Event()
        self.listening = anyio.Event()
        self.notifications = 0  # wake-ups by a notification naming a served queue
        # Poll-only mode is for poolers in transaction mode: no prepared statements there.
        bounded = settings.lock_timeout
        self._stores = [
            store.Store(
                dsn, "claim", prepare=settings.listen, generic_plans=True, lock_timeout=bounded
            ),
            store.Store(dsn, "complete", prepare=settings.listen, lock_timeout=bounded),
        ]
        claim_store, complete_store = self._stores
        # Used, and closed, only on the lease keeper's own thread and loop.
        self._lease_store = store.Store(
            dsn, "leases", prepare=settings.listen, lock_timeout=bounded
        )
        self.reports = Reports(claim_store, self.claimant)
        self.retention = retention.Retention(
            complete_store, settings.retention_ages(), settings.retention_interval
        )
        self.pool = WorkerPool(
            registry, settings.concurrency, self.held, self._finished, self.reports
        )
        # Only a listening dispatcher needs waking, so only it tells producers when to.
        self.appetite = (
            Appetite(claim_store, self.claimant, self.queues) if settings.listen else None
        )
        self.dispatcher = Dispatcher(
            claim_store,
            self.claimant,
            queues=self.queues,
            concurrency=settings.concurrency,
            batch_size=min(settings.batch_size or settings.concurrency, MAX_BATCH),
            poll_interval=settings.poll_interval,
            lease=settings.lease,
            tasks=[
                TaskSettings(
                    t.name,
                    t.max_attempts,
                    t.backoff.base,
                    t.backoff.factor,
                    t.backoff.max_delay,
                    t.timeout,
                    t.circuit_breaker,
                )
                for t in registry
            ],
            submit=self._submit,
            ledger=self.held,
            max_jobs=settings.max_jobs,
            until_empty=settings.until_empty,
            rooms=lambda: self.http.rooms(),
            appetite=self.appetite,
            batches={t.name: t.batch for t in registry if t.batch is not None},
        )
        self.completer = Completer(
            complete_store,
            self.claimant,
            self.held,
            self.dispatcher.outcomes_written,
            last_report=self.reports.take,
        )
        # Shares the claim connection: a read per instant (or per minute) and a write per
        # instant due; not worth a connection of its own.
        self.scheduler = Scheduler(claim_store, schedules)
        self.metrics: Metrics | None = None
        if settings.metrics_port is not None:
            self.metrics = Metrics(dsn, self.figures)  # needs prometheus-client, optional
            self.completer.subscribe(self.metrics)
        # HTTP tasks: the app's and notifyq.endpoints' (read before the first claim).
        self.http = HttpServing(
            registry,
            claim_store,
            self.claimant,
            secrets,
            settings.concurrency,
            on_tasks=self._serve_tasks,
            on_room=self.dispatcher.wake,
            observe=None if self.metrics is None else self.metrics.http_request,
        )
        # Completion webhooks (http/webhooks.py), when httpx is installed: on the claim
        # connection too (a claim and a settle per batch; a probe per poll when idle).
        self.webhooks: WebhookSender | None = None
        if httpx_installed():
            from .http.webhooks import WebhookSender

            self.webhooks = WebhookSender(
                claim_store,
                secrets,
                # Listening: woken by notifyq_internal's "webhooks" (and on reconnect), so an
                # idle dispatcher still runs one statement per poll, the listener's upkeep.
                poll_interval=None if settings.listen else settings.poll_interval,
                observe=None if self.metrics is None else self.metrics.webhook,
            )
        rescue_interval = min(settings.poll_interval, settings.lease / 2)
        # The listener's upkeep is the fallback poll and the rescue check in one (and the
        # ping, at least every 30 s): as often as either.
        self.upkeep_every = min(rescue_interval, 30.0)
        self._upkeep_at: float | None = None  # time.monotonic() of the last upkeep's reply
        self.upkeeps = 0  # upkeep statements answered
        self.leases = LeaseKeeper(
            self._lease_store,
            self.claimant,
            lease=settings.lease,
            rescue_interval=rescue_interval,
            ledger=self.held,
            loop_beat=lambda: self._loop_beat,
            max_stall=settings.lease * 10,
            registration={
                "claimant": self.claimant,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "queues": self.queues,
                "tasks": sorted(t.name for t in registry),
                "concurrency": settings.concurrency,
                # Only the listening connection holds the liveness lock (listener.py).
                "liveness_lock": settings.listen,
            },
        )

    def stop(self) -> None:
        """Begin a graceful shutdown: claim nothing more, let running jobs finish."""
        self._hurry.set()
        self.dispatcher.stop()

    @property
    def exit_code(self) -> int:
        """0, or 3 when `until_empty` was asked and a limit ended the run first:
        claimable work may be left (the queues were not seen empty)."""
        limited = self.runtime_exceeded or self.dispatcher.stopped_by == "max-jobs"
        return 3 if self.settings.until_empty and limited else 0

    def _serve_tasks(self, tasks: list[str]) -> None:
        self.dispatcher.serve_tasks(tasks)
        self.leases.serve_tasks(tasks)

    def _submit(self, work: Work) -> None:
        for job in work if isinstance(work, tuple) else (work,):
            if self.metrics is not None:
                self.metrics.started(job)
            self.http.claimed(job.task)
        self.pool.submit(work)

    def _finished(self, finished: Finished) -> None:
        self.http.released(finished.job.task)
        self.dispatcher.slot_freed()
        self.completer.submit(finished)

    async def run(self, *, handle_signals: bool = False) -> None:
        s = self.settings
        exporter = None
        if self.metrics is not None:
            # Before "serving" is logged: a port already taken fails the start, not later.
            exporter = Exporter(self.metrics, s.metrics_port or 0, s.metrics_host)
            exporter.start()
        self.leases.start()
        try:
            # Before the first claim: the endpoints' tasks are in the claim's list.
            await self.http.start()
            async with anyio.create_task_group() as background:
                if handle_signals:
                    # Before "serving" is logged: a SIGTERM from then on stops us gracefully
                    # (before it, the default handler, or embedded.py's, ends the process).
                    await background.start(self._signals)
                log.info(
                    "serving queues=%s concurrency=%d claimant=%s poll=%ss lease=%ss listen=%s",
                    ",".join(self.queues),
                    s.concurrency,
                    self.claimant,
                    s.poll_interval,
                    s.lease,
                    s.listen,
                )
                if s.listen:
                    background.start_soon(self._listen)
                background.start_soon(self._beat)
                background.start_soon(self._cancellations)
                background.start_soon(self.scheduler.run)
                background.start_soon(self._summaries)
                background.start_soon(self.reports.run)
                background.start_soon(self.retention.run)
                background.start_soon(self.http.watch)
                if self.webhooks is not None:
                    background.start_soon(self.webhooks.run)
                if s.max_runtime is not None:
                    background.start_soon(self._runtime_limit, s.max_runtime)
                async with anyio.create_task_group() as work:
                    await work.start(self.pool.run)
                    work.start_soon(self.completer.run)
                    self.ready.set()
                    await self.dispatcher.run()
                    await self._drain()
                background.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.leases.stop)
                if exporter is not None:
                    await anyio.to_thread.run_sync(exporter.stop)
                await self.http.aclose()
                for st in self._stores:
                    await st.close()
        log.info("stopped; since start: %s", self._totals_text(self._totals()))

    @property
    def lock_waits(self) -> int:
        """Statements that gave up waiting for a lock, and outcomes whose rows were found
        locked by another transaction (each once)."""
        stores = [*self._stores, self._lease_store]
        return sum(st.lock_waits for st in stores) + self.completer.lock_waits

    def figures(self) -> Figures:
        """The counts metrics show, as one snapshot (read on the HTTP server's threads)."""
        contacts = [t for t in (self.leases.contact_at, self._upkeep_at) if t is not None]
        return Figures(
            notifications=self.notifications,
            polls_with_work=self.dispatcher.polls_with_work,
            claims=self.dispatcher.claims,
            polls=self.dispatcher.polls + self.upkeeps,
            fenced=self.completer.fenced,
            rescued=self.leases.rescued,
            lock_waits=self.lock_waits,
            running=self.held.running,
            # Idle and listening, only the upkeep talks; else the keeper at least once a beat.
            contact_every=max(self.leases.heartbeat, self.upkeep_every * 1.1),
            contact_age=time.monotonic() - max(contacts) if contacts else None,
            listening=self.listening.is_set() or not self.settings.listen,
        )

    def _totals(self) -> dict[str, int]:
        decided = self.completer.decided
        return {
            "claimed": self.dispatcher.claimed,
            "succeeded": decided[JobState.SUCCEEDED],
            "retried": decided[JobState.QUEUED],
            "dead": decided[JobState.DEAD],
            "fenced": self.completer.fenced,
            "rescued": self.leases.rescued,
            "polls_with_work": self.dispatcher.polls_with_work,
            "periodic_enqueued": self.scheduler.enqueued,
            "periodic_skipped": self.scheduler.skipped,
            "lock_waits": self.lock_waits,
        }

    @staticmethod
    def _totals_text(totals: dict[str, int]) -> str:
        return " ".join(f"{k}={v}" for k, v in totals.items())

    async def _summaries(self, every: float = 60.0) -> None:
        """One info line a minute while there is activity: what happened since the last."""
        last = self._totals()
        while True:
            await anyio.sleep(every)
            now = self._totals()
            delta = {k: now[k] - last[k] for k in now}
            if any(delta.values()):
                log.info(
                    "last %ds: %s running=%d", every, self._totals_text(delta), self.pool.running
                )
            last = now

    async def _beat(self) -> None:
        """Show the lease keeper that this loop runs; surface the keeper's failure."""
        interval = min(1.0, heartbeat_for(self.settings.lease) / 4)
        while True:
            self._loop_beat = time.monotonic()
            if self.leases.failure is not None:
                raise self.leases.failure
            await anyio.sleep(interval)

    async def _runtime_limit(self, seconds: float) -> None:
        await anyio.sleep(seconds)
        log.info("stopping: --max-runtime of %ss reached", seconds)
        self.runtime_exceeded = True
        self.stop()

    async def _drain(self) -> None:
        # Claimed jobs, started or still waiting for a slot (the ledger's `running`).
        if not self._hurry.is_set() and self.dispatcher.running:
            # A one-shot run that reached its end (max-jobs): the jobs it took are its
            # work, so they finish however long they take, unless a signal or
            # --max-runtime says to hurry.
            log.info("claiming no more; waiting for %d running jobs", self.dispatcher.running)
            async with anyio.create_task_group() as tg:

                async def idle() -> None:
                    await self.pool.wait_idle()
                    tg.cancel_scope.cancel()

                tg.start_soon(idle)
                await self._hurry.wait()
                tg.cancel_scope.cancel()
        log.info(
            "stopping: claiming no more; waiting up to %ss for %d running jobs",
            self.settings.shutdown_timeout,
            self.dispatcher.running,
        )
        self.pool.signal_stopping()
        with anyio.move_on_after(self.settings.shutdown_timeout):
            await self.pool.wait_idle()
        self.pool.interrupt_all()  # what is still running is handed back
        self.pool.close()
        await self.pool.wait_idle()
        # Leases keep running meanwhile, so nothing we hold is rescued under us.
        self.completer.close(give_up_after=max(self.settings.shutdown_timeout, 5.0))

    async def _listen(self) -> None:
        await listener.listen(
            self.dsn,
            self.queues,
            on_notify=self._notified,
            on_connected=self._connected,
            send_probe=self._send_probe,
            probe_id=self.claimant,
            on_cancelled=self._cancel_requested,
            on_room=self.dispatcher.room_freed,
            on_status=self.leases.poke,
            on_endpoints=self.http.changed,
            on_periodic=self.scheduler.changed,
            on_webhooks=None if self.webhooks is None else self.webhooks.changed,
            on_breaker=self.dispatcher.wake,
            liveness=self.claimant,
            upkeep=listener.Upkeeping(
                every=self.upkeep_every,
                tasks=lambda: self.dispatcher.task_names,
                on_upkeep=self._upkept,
            ),
        )

    def _upkept(self, found: store.Upkeep | None, vouch: bool) -> None:
        """The listener's upkeep answered (None: its connection dropped)."""
        if found is not None:
            self._upkeep_at = time.monotonic()
            self.upkeeps += 1
        # Until the next upkeep is late (jitter, a slow reply): then the others take over.
        self.leases.cover(2.2 * self.upkeep_every + 1.0 if vouch else 0.0)
        self.dispatcher.cover_polls(vouch)
        self.http.heard(vouch)
        self.scheduler.heard(vouch)
        if found is None:
            return
        if found.ready:
            self.dispatcher.poll_found_work()
        if found.rescue:
            self.leases.poke()

    def _cancel_requested(self) -> None:
        self._cancel_check.set()

    async def _cancellations(self) -> None:
        """Interrupt the handlers of jobs cancelled while they run: at once on a status
        notification that names a cancellation, and every poll interval (a notification
        may be lost, or the dispatcher may not listen)."""
        while True:
            with anyio.move_on_after(self.settings.poll_interval):
                await self._cancel_check.wait()
            self._cancel_check = anyio.Event()
            held = self.held.ids()
            if held:
                try:
                    cancelled = await self._stores[0].cancelled_among(held)
                except DatabaseUnavailable as exc:
                    log.warning("could not check for cancelled jobs (%s)", exc)
                    cancelled = set()
                if cancelled and (found := self.pool.cancel(cancelled)):
                    log.info("interrupting cancelled jobs %s", sorted(found))
            # Coalesces a burst of notifications; bounds what forged ones can cost.
            await anyio.sleep(CANCEL_CHECK_GAP)

    async def _send_probe(self, payload: str) -> None:
        try:
            await self._stores[0].notify(channels.INTERNAL, payload)
        except DatabaseUnavailable as exc:
            log.warning("could not send the listener's probe notification (%s)", exc)

    def _notified(self, queues: set[str]) -> None:
        self.notifications += 1
        self.dispatcher.wake(queues)

    def _connected(self) -> None:
        self.listening.set()
        if self.appetite is not None:
            self.appetite.lost()
        self.http.changed()  # a change announced while nobody listened
        if self.webhooks is not None:
            self.webhooks.changed()  # webhooks queued while nobody listened
        self.scheduler.changed()
        self.dispatcher.wake()  # catch up on what was inserted while nobody listened

    async def _signals(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        watched = (signal.SIGTERM, signal.SIGINT)
        # Closing the receiver sets Python's defaults, not what was there before it: put
        # back the handlers that leave the private server's users (embedded.py).
        before = {signum: signal.getsignal(signum) for signum in watched}
        try:
            with anyio.open_signal_receiver(*watched) as signals:
                task_status.started()
                async for signum in signals:
                    if not self._signalled:
                        self._signalled = True
                        log.info(
                            "received %s: shutting down gracefully (again to exit at once)",
                            signal.Signals(signum).name,
                        )
                        self.stop()
                    else:
                        log.warning(
                            "second signal: exiting now; running jobs are rescued once this "
                            "one is gone"
                        )
                        embedded.release()  # os._exit runs no finally and no atexit
                        os._exit(128 + signum)
        finally:
            for signum, handler in before.items():
                if handler is not None:
                    signal.signal(signum, handler)
