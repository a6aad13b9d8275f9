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
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

import anyio

from .errors import DatabaseUnavailable, DoNotRetry, NotifyqError
from .ledger import Attempt, Ledger
from .store import Outcome, Store
from .worker_pool import Finished, UnknownTask

log = logging.getLogger("notifyq.completion")

MAX_BATCH = 1000
Report = tuple[float, str | None]  # a progress report: percent, message
_ERROR_LIMIT = 64 * 1024  # bytes of error text kept per attempt


def decide(finished: Finished) -> Outcome:
    """succeeded, queued again after a backoff, or dead: the retry policy, applied."""
    job = finished.job
    if finished.error is None:
        return Outcome(job.id, job.attempt, "succeeded", result=finished.result)
    error = _describe(finished.error, finished.trace)
    final = isinstance(finished.error, DoNotRetry | UnknownTask)
    if final or job.attempt >= job.max_attempts:
        return Outcome(job.id, job.attempt, "dead", error=error)
    backoff = finished.task.backoff if finished.task else None
    delay = backoff.delay(job.attempt) if backoff else 0.0
    return Outcome(job.id, job.attempt, "queued", delay=delay, error=error)


def _describe(error: BaseException, trace: str | None) -> str:
    head = f"{type(error).__name__}: {error}".rstrip(": ")
    text = f"{head}\n\n{trace}" if trace else head
    if len(text) > _ERROR_LIMIT:
        text = text[: _ERROR_LIMIT - 20] + "\n... (truncated)"
    # PostgreSQL text cannot hold NUL or lone surrogates: escape them, never fail the write.
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def _log_outcome(finished: Finished, outcome: Outcome) -> None:
    job = finished.job
    if outcome.status == "succeeded":
        log.debug("succeeded job=%s task=%s attempt=%s", job.id, job.task, job.attempt)
        return
    first_line = (outcome.error or "").split("\n", 1)[0]
    if outcome.status == "queued":
        log.info(
            "failed job=%s task=%s attempt=%s/%s: %s; retry in %.1fs",
            job.id,
            job.task,
            job.attempt,
            job.max_attempts,
            first_line,
            outcome.delay,
        )
    else:
        log.warning(
            "dead job=%s task=%s attempt=%s/%s: %s",
            job.id,
            job.task,
            job.attempt,
            job.max_attempts,
            first_line,
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
        self._outcomes: list[Outcome] = []
        self._handed: list[tuple[int, int]] = []  # (job id, attempt) to hand back
        self._wake = anyio.Event()
        self._closing = False
        self._give_up_at = float("inf")
        self.written = 0
        self.fenced = 0
        self.decided: Counter[str] = Counter()  # outcomes by status, for the summaries

    def submit(self, finished: Finished) -> None:
        if finished.cancelled:
            # The row already says cancelled: nothing to write, whatever the handler did.
            job = finished.job
            log.info(
                "cancelled job=%s task=%s attempt=%s: interrupted", job.id, job.task, job.attempt
            )
            self.decided["cancelled"] += 1
            self._release({(job.id, job.attempt)})
            return
        if finished.interrupted:
            self._handed.append((finished.job.id, finished.job.attempt))
        else:
            outcome = decide(finished)
            job = finished.job
            # Succeeded, retried or dead: the attempt's last report lands with it.
            if (report := self._last_report(job.id, job.attempt)) is not None:
                outcome = replace(outcome, progress=report[0], progress_message=report[1])
            self._outcomes.append(outcome)
            self.decided[outcome.status] += 1
            _log_outcome(finished, outcome)
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._outcomes) + len(self._handed)

    def close(self, give_up_after: float) -> None:
        """Write what is pending, then let `run` return; stop retrying after the deadline."""
        self._closing = True
        self._give_up_at = anyio.current_time() + give_up_after
        self._wake.set()

    async def run(self) -> None:
        failures = 0
        while True:
            if not self._outcomes and not self._handed:
                if self._closing:
                    return
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
                delay = min(5.0, 0.1 * 2**failures) * random.uniform(0.5, 1.0)
                log.warning("completion write failed (%s); retrying in %.1fs", exc, delay)
                await anyio.sleep(delay)

    async def _flush(self) -> None:
        """Write one batch of outcomes, then one of hand-backs.

        DatabaseUnavailable leaves the batch in place for `run` to retry; any other
        error would fail forever, so that batch is given up to the rescuer instead.
        """
        if self._outcomes:
            batch = self._outcomes[:MAX_BATCH]
            pairs = {(o.job_id, o.attempt) for o in batch}
            self._ledger.writing(pairs)
            try:
                applied = await self._store.complete(batch, self._claimant)
            except DatabaseUnavailable:
                self._ledger.unwritten(pairs)
                raise
            except NotifyqError as exc:
                del self._outcomes[: len(batch)]
                self._give_up(pairs, exc)
            else:
                del self._outcomes[: len(batch)]
                self._account(pairs, applied, "completion")
        if self._handed:
            handed = self._handed[:MAX_BATCH]
            self._ledger.writing(handed)
            try:
                applied = await self._store.hand_back(handed, self._claimant)
            except DatabaseUnavailable:
                self._ledger.unwritten(handed)
                raise
            except NotifyqError as exc:
                del self._handed[: len(handed)]
                self._give_up(set(handed), exc)
            else:
                del self._handed[: len(handed)]
                self._account(set(handed), applied, "hand-back")
                if applied:
                    log.info("handed back %d unfinished jobs to the queue", len(applied))

    def _release(self, pairs: set[Attempt]) -> None:
        self._ledger.written(pairs)
        self._on_written()

    def _give_up(self, pairs: set[Attempt], exc: NotifyqError) -> None:
        # Released from what we hold, their leases lapse and the rescuer runs them again.
        log.error(
            "could not write outcomes of jobs %s (%s); leaving them to the rescuer",
            sorted(job_id for job_id, _ in pairs),
            exc,
        )
        self._release(pairs)

    def _account(self, pairs: set[Attempt], applied: set[int], what: str) -> None:
        lost = sorted(job_id for job_id, _ in pairs if job_id not in applied)
        self.written += len(pairs) - len(lost)
        self.fenced += len(lost)
        for job_id in lost:
            log.warning(
                "%s of job=%s not written: it is no longer running under this dispatcher's "
                "claim (its lease expired and it was rescued or cancelled)",
                what,
                job_id,
            )
        self._release(pairs)
