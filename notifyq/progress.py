"""Progress reports and checkpoints from running handlers to the table.

Progress is a hint for people watching, so it must never slow or fail a job:
`progress()` only records the latest report per job (from the event loop or
a handler's thread) and wakes the writer, which sends every pending report in
one fenced statement, then rests GAP seconds so a handler reporting in a
tight loop costs a few writes a second, not one per call.  A write that fails
is dropped (the next report carries newer news anyway).

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
        self._pending: dict[int, tuple[int, float, str | None]] = {}
        self._lock = threading.Lock()  # handlers' threads report too
        self._wake = anyio.Event()
        self._loop_thread = threading.get_ident()
        self.written = 0

    def progress(self, job_id: int, attempt: int, percent: float, message: str | None) -> None:
        with self._lock:
            self._pending[job_id] = (attempt, percent, message)
        if threading.get_ident() == self._loop_thread:
            self._wake.set()
        else:
            anyio.from_thread.run_sync(self._wake.set)

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

    async def run(self) -> None:
        self._loop_thread = threading.get_ident()
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            with self._lock:
                pending, self._pending = self._pending, {}
            if pending:
                reports = [(job_id, *report) for job_id, report in pending.items()]
                try:
                    self.written += await self._store.save_progress(reports, self._claimant)
                except DatabaseUnavailable as exc:
                    log.debug("progress of %d jobs not written (%s)", len(reports), exc)
            await anyio.sleep(GAP)
