"""Turn finished attempts into batched, fenced state writes.

Workers never write job state: they report `Finished`, and this component
writes whatever has accumulated in one statement (`complete`) while the
previous write is in flight, so under load one round trip carries many
outcomes and an idle dispatcher still writes a single outcome at once.
An outcome carries its attempt's last progress report when that report may not
be written yet: a separate write would land after the outcome, and the fence
would drop it (progress.py).
Interrupted attempts (shutdown) are handed back with `hand_back` instead;
attempts of jobs cancelled while they ran write nothing (the row says so).

A write that fails because the database is gone is kept and retried after
the connection comes back; if the job's lease expired in the meantime the
fence drops the write and the job runs again (at-least-once).

No lock another transaction holds stops the others' outcomes.  A row locked by
someone else (a producer's COMMIT checking the jobs its new jobs depend on, an
operator's UPDATE) is skipped by the write and comes back busy: that outcome is
tried again after RETRY_FIRST seconds, doubling to RETRY_MAX, while the rest are
written.  A write can still wait for a lock (releasing or cancelling the jobs
waiting on one it finishes) until the connection's lock_timeout; then the batch is
split in halves, tried again at once, until the outcome that waits is alone, and
that one is retried like a busy one.  Busy outcomes stay `writing` in the ledger,
so their leases are renewed and no lost lease is reported for them.

The ledger (ledger.py) is the count of what is unwritten: the pool moved each
attempt there to `pending`, and the completer drops it once its outcome is
written, handed back, or given up to the rescuer; `on_written` then wakes the
dispatcher.  Subscribers (`subscribe`) hear of every outcome twice, on the event
loop: `decided` when the completer takes it, with the status it asks for, and
`settled` once written, with the status the database gave (its retry policy).
Metrics count from these; nobody else re-derives what an outcome was.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, deque
from collections.abc import Callable, Collection
from dataclasses import replace
from typing import Protocol

import anyio

from .errors import DatabaseUnavailable, DoNotRetry, LockTimeout, NotifyqError, Retry
from .job import Job, JobState
from .ledger import Attempt, Ledger
from .logs import job_fields
from .retry import reconnect_delay
from .store import Outcome, Settled, Store, Written
from .worker_pool import Finished, UnknownTask

log = logging.getLogger("notifyq.completion")

MAX_BATCH = 1000
RETRY_FIRST = 0.1  # seconds before a write skipped for a locked row is tried again ...
RETRY_MAX = 2.0  # ... doubling while rows stay locked, up to this
Report = tuple[float, str | None]  # a progress report: percent, message
_ERROR_LIMIT = 64 * 1024  # bytes of error text kept per attempt
_LEASE_KEEPER = "application 'notifyq:leases'"  # how a lease keeper holding a row is named


class Subscriber(Protocol):
    """Hears of every outcome, on the event loop: keep it to a few dict operations.
    What it raises is logged and dropped: a subscriber never stops an outcome's write."""

    def decided(self, finished: Finished, status: str) -> None:
        """The completer took this attempt's end: `status` is what it asks the database
        for (succeeded | failed | dead), or interrupted (to hand back) or cancelled
        (nothing to write)."""

    def settled(self, job: Job, status: str) -> None:
        """An outcome was written: `status` is what the row became (succeeded | queued,
        to run again | dead).  Not called for outcomes the fence dropped."""


def decide(finished: Finished) -> Outcome:
    """succeeded, failed (the database applies the task's retry policy), or dead."""
    job = finished.job
    if finished.error is None:
        return Outcome(job.id, job.attempt, JobState.SUCCEEDED, result=finished.result)
    error = _describe(finished.error, finished.trace)
    final = isinstance(finished.error, DoNotRetry | UnknownTask)
    # Retry(after=...): no earlier than the handler asked; the attempt still counts.
    retry_in = finished.error.after if isinstance(finished.error, Retry) else None
    return Outcome(
        job.id, job.attempt, JobState.DEAD if final else "failed", error=error, retry_in=retry_in
    )


def _describe(error: BaseException, trace: str | None) -> str:
    head = f"{type(error).__name__}: {error}".rstrip(": ")
    text = f"{head}\n\n{trace}" if trace else head
    if len(text) > _ERROR_LIMIT:
        text = text[: _ERROR_LIMIT - 20] + "\n... (truncated)"
    # PostgreSQL text cannot hold NUL or lone surrogates: escape them, never fail the write.
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def _log_outcome(finished: Finished, outcome: Outcome, settled: Settled) -> None:
    job = finished.job
    runtime = None if finished.runtime is None else round(finished.runtime, 6)
    if settled.status == JobState.SUCCEEDED:
        extra = job_fields(job, "job.succeeded", outcome="succeeded", duration=runtime)
        log.debug("succeeded job=%s task=%s attempt=%s", job.id, job.task, job.attempt, extra=extra)
        return
    first_line = (outcome.error or "").split("\n", 1)[0]
    if settled.status == JobState.QUEUED:
        log.info(
            "failed job=%s task=%s attempt=%s/%s: %s; retry at %s",
            job.id,
            job.task,
            job.attempt,
            job.max_attempts,
            first_line,
            settled.run_at.isoformat(timespec="milliseconds"),
            extra=job_fields(job, "job.retried", outcome="retried", duration=runtime),
        )
    else:
        log.warning(
            "dead job=%s task=%s attempt=%s/%s: %s",
            job.id,
            job.task,
            job.attempt,
            job.max_attempts,
            first_line,
            extra=job_fields(job, "job.dead", outcome="dead", duration=runtime),
        )


class Completer:
    def __init__(
        self,
        store: Store,
        claimant: str,
        ledger: Ledger,
        on_written: Callable[[], None],
        last_report: Callable[[int, int], Report | None] = lambda job_id, attempt: None,
    ) -> None:
        self._store = store
        self._claimant = claimant
        self._ledger = ledger  # attempts leave it once their outcome is written
        self._on_written = on_written
        self._last_report = last_report  # (job id, attempt) -> its report not yet written
        self._subscribers: list[Subscriber] = []
        self._subscriber_failed: set[int] = set()  # id() of those whose failure was logged
        # The job of each outcome still to write, for the log and the subscribers.
        self._jobs: dict[Attempt, Finished] = {}  # outcomes not written yet
        self._outcomes: list[Outcome] = []
        # Batches to write before new outcomes, in order: the halves of one that gave up
        # waiting for a lock, and busy outcomes whose time to try again came.
        self._retries: deque[list[Outcome]] = deque()
        self._busy: list[Outcome] = []  # rows locked by another transaction: try again later
        self._stuck: list[Outcome] = []  # gave up waiting for a lock alone: try again alone
        self._handed: list[Attempt] = []  # (job id, attempt) to hand back
        self._busy_handed: list[Attempt] = []
        self._waiting_since: dict[Attempt, float] = {}  # busy attempts, since when
        self._retry_at = math.inf
        self._retry_delay = RETRY_FIRST
        self._wake = anyio.Event()
        self._closing = False
        self._give_up_at = float("inf")
        self.written = 0
        self.fenced = 0
        self.lock_waits = 0  # outcomes whose rows were found locked (each counted once)
        self.decided: Counter[str] = Counter()  # settled (or cancelled), by status: summaries

    def subscribe(self, subscriber: Subscriber) -> None:
        """Tell `subscriber` of every outcome from now on (see Subscriber)."""
        self._subscribers.append(subscriber)

    def submit(self, finished: Finished) -> None:
        """Take an attempt's end, one the ledger holds as pending: write it (soon, batched)."""
        job = finished.job
        if finished.cancelled:
            # The row already says cancelled: nothing to write, whatever the handler did.
            log.info(
                "cancelled job=%s task=%s attempt=%s: interrupted",
                job.id,
                job.task,
                job.attempt,
                extra=job_fields(job, "job.cancelled", outcome="cancelled"),
            )
            self.decided[JobState.CANCELLED] += 1
            self._publish(finished, JobState.CANCELLED)
            self._release({(job.id, job.attempt)})
            return
        if finished.interrupted:
            self._publish(finished, "interrupted")
            self._handed.append((job.id, job.attempt))
        else:
            outcome = decide(finished)
            self._publish(finished, outcome.status)
            # Succeeded, retried or dead: the attempt's last report lands with it.
            if (report := self._last_report(job.id, job.attempt)) is not None:
                outcome = replace(outcome, progress=report[0], progress_message=report[1])
            self._outcomes.append(outcome)
            self._jobs[(job.id, job.attempt)] = finished
        self._wake.set()

    def _publish(self, finished: Finished, status: str) -> None:
        for subscriber in self._subscribers:
            try:
                subscriber.decided(finished, status)
            except Exception:
                self._subscriber_error(subscriber, finished.job)

    def _subscriber_error(self, subscriber: Subscriber, job: Job) -> None:
        # Raised from inside submit() (the pool's report) or a write's settling, it would
        # end the dispatcher with the attempt neither written nor released from the
        # ledger.  Logged in full once per subscriber: it fails the same way every time.
        if id(subscriber) in self._subscriber_failed:
            log.debug("subscriber %r failed again (job=%s)", subscriber, job.id, exc_info=True)
            return
        self._subscriber_failed.add(id(subscriber))
        log.exception(
            "subscriber %r failed on the outcome of job=%s attempt=%s; the outcome is "
            "written all the same (further failures of it are logged at debug level)",
            subscriber,
            job.id,
            job.attempt,
        )

    @property
    def pending(self) -> int:
        """Outcomes not written yet (the ledger's count)."""
        return self._ledger.pending

    def close(self, give_up_after: float) -> None:
        """Write what is pending, then let `run` return; stop retrying after the deadline."""
        self._closing = True
        self._give_up_at = anyio.current_time() + give_up_after
        self._wake.set()

    async def run(self) -> None:
        failures = 0
        while True:
            now = anyio.current_time()
            if now >= self._retry_at:
                self._retry_busy()
            if not (self._outcomes or self._retries or self._handed):
                waiting = len(self._busy) + len(self._stuck) + len(self._busy_handed)
                if self._closing and (not waiting or now >= self._give_up_at):
                    if waiting:
                        log.error(
                            "shutting down with %d outcomes unwritten: their rows stayed locked "
                            "by other transactions; their jobs run again once their leases expire",
                            waiting,
                        )
                    return
                wake_at = min(self._retry_at, self._give_up_at if self._closing else math.inf)
                with anyio.move_on_after(wake_at - now):
                    await self._wake.wait()
                self._wake = anyio.Event()
                continue
            try:
                await self._flush()
                failures = 0
            except DatabaseUnavailable as exc:
                if self._closing and anyio.current_time() >= self._give_up_at:
                    log.error(
                        "shutting down with %d outcomes unwritten (%s); their jobs run again "
                        "once this dispatcher is found gone (its session, or its leases)",
                        self.pending,
                        exc,
                    )
                    return
                failures += 1
                delay = reconnect_delay(failures, first=0.1, cap=5.0)
                log.warning("completion write failed (%s); retrying in %.1fs", exc, delay)
                await anyio.sleep(delay)

    async def _flush(self) -> None:
        """Write one batch of outcomes, then one of hand-backs.

        DatabaseUnavailable leaves the batch in place for `run` to retry; any other
        error would fail forever, so that batch is given up to the rescuer instead.
        """
        if self._retries:
            await self._write(self._retries.popleft())
        elif self._outcomes:
            batch = self._outcomes[:MAX_BATCH]
            del self._outcomes[:MAX_BATCH]
            await self._write(batch)
        if self._handed:
            await self._hand_back()

    async def _write(self, batch: list[Outcome]) -> None:
        pairs = {(o.job_id, o.attempt) for o in batch}
        self._ledger.writing(pairs)
        try:
            written = await self._store.complete(batch, self._claimant)
        except LockTimeout as exc:
            self._split(batch, exc)
        except DatabaseUnavailable:
            self._ledger.write_failed(pairs)
            self._retries.appendleft(batch)
            raise
        except NotifyqError as exc:
            self._give_up(pairs, exc)
        else:
            busy = [o for o in batch if (o.job_id, o.attempt) in written.busy]
            self._settle(batch, written)
            self._account(pairs, written, "completion")
            self._wait(busy, written.busy)

    def _split(self, batch: list[Outcome], exc: LockTimeout) -> None:
        """A write gave up waiting for a lock: find the outcomes that wait, by halves."""
        if len(batch) > 1:
            log.warning(
                "writing %d outcomes gave up waiting for a lock (%s); writing them in halves "
                "to find the ones that wait",
                len(batch),
                exc,
            )
            half = len(batch) // 2
            self._retries.extendleft([batch[half:], batch[:half]])
            return
        outcome = batch[0]
        key = (outcome.job_id, outcome.attempt)
        if key not in self._waiting_since:
            self._waiting_since[key] = anyio.current_time()
            log.warning(
                "outcome of job=%s attempt=%s waits for a lock (%s): another transaction holds "
                "a job that depends on it; trying again, the other outcomes go on",
                outcome.job_id,
                outcome.attempt,
                exc,
            )
        self._stuck.append(outcome)
        self._schedule_retry()

    def _settle(self, batch: list[Outcome], written: Written) -> None:
        """Count and log what the database made of each outcome written."""
        for outcome in batch:
            key = (outcome.job_id, outcome.attempt)
            if key in written.busy:
                continue
            finished = self._jobs.pop(key, None)
            settled = written.applied.get(key)
            if settled is None or finished is None:
                continue
            job = finished.job
            self.decided[settled.status] += 1
            _log_outcome(finished, outcome, settled)
            for subscriber in self._subscribers:
                try:
                    subscriber.settled(job, settled.status)
                except Exception:
                    self._subscriber_error(subscriber, job)

    def _wait(self, busy: list[Outcome], holders: dict[Attempt, str]) -> None:
        """Outcomes whose rows were locked: tried again later, still being written."""
        if not busy:
            return
        now = anyio.current_time()
        new = [o for o in busy if (o.job_id, o.attempt) not in self._waiting_since]
        for o in new:
            self._waiting_since[(o.job_id, o.attempt)] = now
        # A lease keeper renewing the row (ours, almost always) holds it for a moment: routine,
        # not the lock wait the counter and the warning are for.
        new = [o for o in new if _LEASE_KEEPER not in holders.get((o.job_id, o.attempt), "")]
        if new:
            self.lock_waits += len(new)
            log.warning(
                "outcomes of jobs %s wait: their rows are locked by another transaction (%s); "
                "the other outcomes are written, these are tried again",
                ", ".join(f"{o.job_id}#{o.attempt}" for o in new),
                "; ".join(
                    f"job {o.job_id}: {holders.get((o.job_id, o.attempt), 'unknown')}"
                    for o in new[:5]
                ),
            )
        self._busy.extend(busy)
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        self._retry_at = min(self._retry_at, anyio.current_time() + self._retry_delay)

    def _retry_busy(self) -> None:
        """The time to try busy writes again came: busy outcomes in batches (a skipped
        row never waits), stuck ones one by one (each may wait for its lock again)."""
        for start in range(0, len(self._busy), MAX_BATCH):
            self._retries.append(self._busy[start : start + MAX_BATCH])
        self._retries.extend([o] for o in self._stuck)
        self._handed[:0] = self._busy_handed
        self._busy, self._stuck, self._busy_handed = [], [], []
        self._retry_at = math.inf
        self._retry_delay = min(RETRY_MAX, self._retry_delay * 2)

    async def _hand_back(self) -> None:
        handed = self._handed[:MAX_BATCH]
        del self._handed[:MAX_BATCH]
        self._ledger.writing(handed)
        try:
            written = await self._store.hand_back(handed, self._claimant)
        except LockTimeout as exc:
            log.warning("handing back %d jobs gave up waiting for a lock (%s)", len(handed), exc)
            self._busy_handed.extend(handed)
            self._schedule_retry()
        except DatabaseUnavailable:
            self._ledger.write_failed(handed)
            self._handed[:0] = handed
            raise
        except NotifyqError as exc:
            self._give_up(set(handed), exc)
        else:
            busy = [a for a in handed if a in written.busy]
            self._account(set(handed), written, "hand-back")
            if len(written.applied):
                log.info("handed back %d unfinished jobs to the queue", len(written.applied))
            if busy:
                log.warning(
                    "handing back jobs %s waits: their rows are locked by another transaction",
                    ", ".join(f"{job_id}#{attempt}" for job_id, attempt in busy),
                )
                self._busy_handed.extend(busy)
                self._schedule_retry()

    def _release(self, pairs: Collection[Attempt]) -> None:
        self._ledger.written(pairs)
        self._on_written()

    def _give_up(self, pairs: set[Attempt], exc: NotifyqError) -> None:
        # Released from what we hold, their leases lapse and the rescuer runs them again.
        log.error(
            "could not write outcomes of jobs %s (%s); leaving them to the rescuer",
            sorted(job_id for job_id, _ in pairs),
            exc,
        )
        self._forget(pairs)
        self._release(pairs)

    def _account(self, pairs: set[Attempt], written: Written, what: str) -> None:
        """Count and release what the write settled; busy attempts stay being written."""
        settled = {key for key in pairs if key not in written.busy}
        lost = sorted(key[0] for key in settled if key not in written.applied)
        self.written += len(settled) - len(lost)
        self.fenced += len(lost)
        for job_id in lost:
            log.warning(
                "%s of job=%s not written: it is no longer running under this dispatcher's "
                "claim (its lease expired and it was rescued or cancelled)",
                what,
                job_id,
            )
        now = anyio.current_time()
        for key in settled:
            since = self._waiting_since.pop(key, None)
            if since is not None:
                log.info(
                    "%s of job=%s attempt=%s done after waiting %.1fs for a lock",
                    what,
                    key[0],
                    key[1],
                    now - since,
                )
        if not (self._busy or self._stuck or self._busy_handed or self._waiting_since):
            self._retry_delay = RETRY_FIRST
        if settled:
            self._release(settled)

    def _forget(self, pairs: Collection[Attempt]) -> None:
        for key in pairs:
            self._waiting_since.pop(key, None)
            self._jobs.pop(key, None)
