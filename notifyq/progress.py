"""Progress reports and checkpoints from running handlers to the table (and,
the other way, the results of a job's dependencies, read when a handler asks).

Progress is a hint for people watching, so it must never slow or fail a job:
`progress()` only records the latest report per job (from the event loop or
a handler's thread) and wakes the writer, which sends every pending report in
one fenced statement, then rests GAP seconds so a handler reporting in a
tight loop costs a few writes a second, not one per call.  A write that fails
is dropped (the next report carries newer news anyway).

The last report of an attempt cannot wait for the writer: once the outcome is
written, the fence drops any later progress write.  So when an attempt ends,
the completer takes its report (`take`) and writes it with the outcome, in the
same statement; jobs that reported nothing cost nothing more.  That report is
announced by the outcome's notifyq_status notification, not on notifyq_progress.

A checkpoint is state the next attempt depends on, so `save_checkpoint` is
the opposite: written at once, awaited, and refused loudly when the attempt
no longer holds the job.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import anyio

from . import codec
from .errors import DatabaseUnavailable, OperationRefused
from .store import Store

log = logging.getLogger("notifyq.progress")

GAP = 0.25  # seconds between two progress writes of one dispatcher
MAX_CHECKPOINT = 1024 * 1024  # bytes of JSON


class Reports:
    """The Reporter every JobContext of one dispatcher talks to."""

    def __init__(self, store: Store, claimant: str) -> None:
        self._store = store
        self._claimant = claimant
        # (job id, attempt) -> (percent, message): an attempt's latest report, unsent.
        self._pending: dict[tuple[int, int], tuple[float, str | None]] = {}
        # The reports the writer is sending now: a completion must carry them too, as
        # the write may land after the outcome (and be dropped by the fence).
        self._sending: dict[tuple[int, int], tuple[float, str | None]] = {}
        self._lock = threading.Lock()  # handlers' threads report too
        self._wake = anyio.Event()
        self._loop_thread = threading.get_ident()
        self.written = 0

    def progress(self, job_id: int, attempt: int, percent: float, message: str | None) -> None:
        with self._lock:
            self._pending[(job_id, attempt)] = (percent, message)
        if threading.get_ident() == self._loop_thread:
            self._wake.set()
        else:
            anyio.from_thread.run_sync(self._wake.set)

    def take(self, job_id: int, attempt: int) -> tuple[float, str | None] | None:
        """The ended attempt's latest report that may not have landed, for its outcome to
        carry (None: it reported nothing, or everything it reported is written)."""
        if not self._pending and not self._sending:
            return None  # the usual job reports nothing: no lock
        key = (job_id, attempt)
        with self._lock:
            report = self._pending.pop(key, None)
        return report if report is not None else self._sending.get(key)

    async def save_checkpoint(self, job_id: int, attempt: int, checkpoint: Any) -> None:
        try:
            text = codec.dumps(checkpoint)
        except TypeError as exc:
            raise ValueError(f"a checkpoint must be JSON: {exc.__cause__ or exc}") from None
        if len(text.encode()) > MAX_CHECKPOINT:
            raise ValueError(
                f"a checkpoint is limited to {MAX_CHECKPOINT} bytes of JSON, got "
                f"{len(text.encode())}: keep large state elsewhere and checkpoint a reference"
            )
        if not await self._store.save_checkpoint(job_id, attempt, text, self._claimant):
            raise OperationRefused(
                f"checkpoint of job {job_id} not saved: attempt {attempt} no longer holds the "
                f"job (its lease expired and it was rescued, or it was cancelled)"
            )

    async def dependency_results(self, job_id: int) -> dict[int, Any]:
        return await self._store.dependency_results(job_id)

    async def run(self) -> None:
        self._loop_thread = threading.get_ident()
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            with self._lock:
                pending, self._pending = self._pending, {}
            if pending:
                reports = [(*key, *report) for key, report in pending.items()]
                self._sending = pending
                try:
                    self.written += await self._store.save_progress(reports, self._claimant)
                except DatabaseUnavailable as exc:
                    log.debug("progress of %d jobs not written (%s)", len(reports), exc)
                finally:
                    self._sending = {}
            await anyio.sleep(GAP)
