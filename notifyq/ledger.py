"""The attempts a dispatcher holds: the one count of its jobs that everything reads.

An attempt is a (job id, attempt) pair, never a job id alone: once a lease
is lost, the job can be rescued and claimed again by this very process while
the old attempt still runs, and both must be told apart until each is gone.

    pool.submit          pool reports it          completer               written
    ──claimed──> running ──finished──> pending ──writing──> being written ──> gone
                                          ^                      │
                                          └───write_failed───────┘

Who moves an attempt, and who reads what:

    worker_pool.py   claimed (a job handed to a slot), finished (its handler is done)
    completion.py    writing, write_failed, written (its outcome written, or given up)
    dispatcher.py    reads `running` and `pending`: free slots, and the back-pressure of
                     unwritten outcomes; `ids()` for the orphans of a lost claim reply
    leases.py        reads `attempts()`, `still_expected()` and `len()` (whether it holds
                     any), from its own thread
    worker.py        reads `ids()` for cancellations, and `running` for the metrics

`running` and `pending` are kept apart because they mean different things to
the dispatcher: a running attempt holds a slot, a pending one only a row.  The
attempts of one batch (a batch handler's, batch.py) share a single slot:
`slots` counts slots taken, `running` attempts.
Both hold a lease, so the lease keeper renews all of them (being written too:
a write may fail and be retried).

An outcome whose row another transaction holds locked stays being written
while the completer tries it again: its lease is renewed when the lock allows,
and its absence from a renewal is no loss.  The lease keeper warns of a lost
lease only for attempts held and not being written: an outcome that committed
removes the row from `running` before the completer has dropped the attempt
from the ledger, and that is no loss.

Every method takes the lock: the lease keeper reads from its own thread while
the event loop changes the ledger.  Changes happen on the event loop only.
"""

from __future__ import annotations

import threading
from collections.abc import Collection

Attempt = tuple[int, int]
"""(job id, attempt number)"""


class Ledger:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[Attempt] = set()  # handed to the pool, handler not done
        self._pending: set[Attempt] = set()  # handler done, outcome not written
        self._writing: set[Attempt] = set()  # of the pending: being written now
        self._sharing = 0  # running attempts that share a batch's slot (all but one each)

    def __len__(self) -> int:
        """Attempts held: running, or whose outcome is not written yet."""
        with self._lock:
            return len(self._running) + len(self._pending)

    @property
    def running(self) -> int:
        """Attempts handed to the pool whose handler is not done: the slots they take."""
        with self._lock:
            return len(self._running)

    @property
    def slots(self) -> int:
        """Slots the running attempts take: one each, one per batch for a batch's."""
        with self._lock:
            return len(self._running) - self._sharing

    @property
    def pending(self) -> int:
        """Attempts whose handler is done and whose outcome is not written yet."""
        with self._lock:
            return len(self._pending)

    # --- changes, on the event loop

    def claimed(self, attempt: Attempt) -> bool:
        """The attempt is ours and handed to the pool.  False, and nothing changed, if
        the same attempt is running already: it is counted once (WorkerPool.submit)."""
        with self._lock:
            if attempt in self._running:
                return False
            self._running.add(attempt)
            return True

    def claimed_batch(self, attempts: Collection[Attempt]) -> list[Attempt]:
        """These attempts are ours and handed to the pool as one batch, in one slot.
        Returns those entered; one already running is left out, as `claimed` does."""
        with self._lock:
            entered = [a for a in dict.fromkeys(attempts) if a not in self._running]
            self._running.update(entered)
            self._sharing += max(len(entered) - 1, 0)
            return entered

    def finished_batch(self, attempts: Collection[Attempt]) -> int:
        """`finished` for every attempt of a batch `claimed_batch` entered, at once: its
        slot is free.  Returns how many attempts are still running."""
        with self._lock:
            self._running.difference_update(attempts)
            self._pending.update(attempts)
            self._sharing -= max(len(attempts) - 1, 0)
            return len(self._running)

    def finished(self, attempt: Attempt) -> int:
        """Its handler is done (or it was interrupted): the outcome waits to be written.
        Returns how many attempts are still running (one lock taken per job, not two)."""
        with self._lock:
            self._running.discard(attempt)
            self._pending.add(attempt)
            return len(self._running)

    def writing(self, attempts: Collection[Attempt]) -> None:
        """The completer is sending these outcomes: a row gone from `running` is no loss."""
        with self._lock:
            self._writing.update(attempts)

    def write_failed(self, attempts: Collection[Attempt]) -> None:
        """The write failed and will be retried: these are plainly held again."""
        with self._lock:
            self._writing.difference_update(attempts)

    def written(self, attempts: Collection[Attempt]) -> None:
        """Outcomes written (or given up to the rescuer): no longer ours to keep."""
        with self._lock:
            self._pending.difference_update(attempts)
            self._writing.difference_update(attempts)

    # --- reads, from any thread

    def attempts(self) -> set[Attempt]:
        with self._lock:
            return self._running | self._pending

    def ids(self) -> set[int]:
        with self._lock:
            return {job_id for job_id, _ in self._running | self._pending}

    def still_expected(self, attempts: Collection[Attempt]) -> set[Attempt]:
        """Those of `attempts` still held and not being written: if their rows left
        `running` under our claim, someone else took them (a rescue, a cancellation)."""
        with self._lock:
            return {
                a
                for a in attempts
                if (a in self._running or a in self._pending) and a not in self._writing
            }
