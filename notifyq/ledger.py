"""The attempts a dispatcher holds: claimed, and whose outcome is not yet written.

An attempt is a (job id, attempt) pair, never a job id alone: once a lease
is lost, the job can be rescued and claimed again by this very process while
the old attempt still runs, and both must be told apart until each is gone.

    claimed ──> held ──(completer sends the outcome)──> writing ──> gone
                  └──────────(write failed: kept, retried)<──┘

An outcome whose row another transaction holds locked stays `writing` while
the completer tries it again: its lease is renewed when the lock allows, and
its absence from a renewal is no loss.

The lease keeper renews every held attempt (writing ones too: a write may
fail and be retried) from its own thread, hence the lock.  It warns of a
lost lease only for attempts that are held and not being written: an
outcome that committed removes the row from `running` before the completer
has dropped the attempt from the ledger, and that is no loss.
"""

from __future__ import annotations

import threading
from collections.abc import Collection

Attempt = tuple[int, int]
"""(job id, attempt number)"""


class Ledger:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: set[Attempt] = set()
        self._writing: set[Attempt] = set()

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def claimed(self, attempt: Attempt) -> None:
        with self._lock:
            self._held.add(attempt)

    def writing(self, attempts: Collection[Attempt]) -> None:
        """The completer is sending these outcomes: a row gone from `running` is no loss."""
        with self._lock:
            self._writing.update(attempts)

    def unwritten(self, attempts: Collection[Attempt]) -> None:
        """The write failed and will be retried: these are plainly held again."""
        with self._lock:
            self._writing.difference_update(attempts)

    def written(self, attempts: Collection[Attempt]) -> None:
        """Outcomes written (or given up to the rescuer): no longer ours to keep."""
        with self._lock:
            self._held.difference_update(attempts)
            self._writing.difference_update(attempts)

    def attempts(self) -> set[Attempt]:
        with self._lock:
            return set(self._held)

    def ids(self) -> set[int]:
        with self._lock:
            return {job_id for job_id, _ in self._held}

    def still_expected(self, attempts: Collection[Attempt]) -> set[Attempt]:
        """Those of `attempts` still held and not being written: if their rows left
        `running` under our claim, someone else took them (a rescue, a cancellation)."""
        with self._lock:
            return {a for a in attempts if a in self._held and a not in self._writing}
