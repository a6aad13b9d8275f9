"""The ledger's contract: one count of the attempts a dispatcher holds, by stage."""

from __future__ import annotations

import sys
import threading

from notifyq.ledger import Ledger


def test_an_attempt_takes_a_slot_until_finished_and_a_lease_until_written() -> None:
    ledger = Ledger()
    ledger.claimed((1, 1))
    ledger.claimed((2, 1))
    assert (ledger.running, ledger.pending, len(ledger)) == (2, 0, 2)
    ledger.finished((1, 1))
    assert (ledger.running, ledger.pending, len(ledger)) == (1, 1, 2)
    assert ledger.attempts() == {(1, 1), (2, 1)}  # both leases are still kept
    ledger.written({(1, 1)})
    assert (ledger.running, ledger.pending, len(ledger)) == (1, 0, 1)
    assert ledger.attempts() == {(2, 1)}
    assert ledger.ids() == {2}


def test_attempts_of_one_job_are_told_apart() -> None:
    """A job rescued from under a stalled attempt comes back as a new attempt: writing
    the old one's outcome must leave the new one held."""
    ledger = Ledger()
    ledger.claimed((7, 1))
    ledger.claimed((7, 2))
    ledger.finished((7, 1))
    ledger.written({(7, 1)})
    assert ledger.attempts() == {(7, 2)}
    assert ledger.running == 1
    assert ledger.ids() == {7}


def test_an_attempt_already_running_is_not_counted_twice() -> None:
    """A retried job starts its attempts over: claimed again while the same attempt still
    runs, it is refused (the pool makes it wait its turn), never counted as a second slot
    that the first one's end would then free."""
    ledger = Ledger()
    assert ledger.claimed((5, 1))
    assert not ledger.claimed((5, 1))
    assert ledger.running == 1
    ledger.finished((5, 1))
    assert ledger.claimed((5, 1))  # its outcome waits to be written: no slot of its own
    assert (ledger.running, ledger.pending) == (1, 1)


def test_only_attempts_held_and_not_being_written_are_still_expected() -> None:
    ledger = Ledger()
    for attempt in [(1, 1), (2, 1), (3, 1)]:
        ledger.claimed(attempt)
        ledger.finished(attempt)
    ledger.writing({(1, 1)})
    # (1, 1): its write may have committed; (4, 1): never ours; (2, 1): ours, and gone
    # from `running` under our claim means someone else took it.
    assert ledger.still_expected({(1, 1), (2, 1), (4, 1)}) == {(2, 1)}
    ledger.write_failed({(1, 1)})  # the write will be retried: plainly held again
    assert ledger.still_expected({(1, 1)}) == {(1, 1)}
    assert ledger.pending == 3
    ledger.writing({(1, 1), (2, 1)})
    ledger.written({(1, 1), (2, 1)})
    assert ledger.attempts() == {(3, 1)}
    assert ledger.still_expected({(1, 1), (2, 1), (3, 1)}) == {(3, 1)}


def test_the_lease_keeper_reads_while_the_loop_writes() -> None:
    """Reads from another thread see each change whole: an attempt moving from running to
    pending is held all along, never caught between the two (which would report its lease
    lost), and no set changes size in a reader's hands."""
    ledger = Ledger()
    stop = threading.Event()
    errors: list[BaseException] = []
    current: list[tuple[int, int]] = []  # the attempt last claimed (and never written)

    def read() -> None:
        try:
            while not stop.is_set():
                if current:
                    attempt = current[-1]
                    assert ledger.still_expected({attempt}) == {attempt}, attempt
                ledger.attempts()
        except BaseException as exc:
            errors.append(exc)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # hand the GIL over often: between any two statements
    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(40_000):
            ledger.claimed((n, 1))
            current.append((n, 1))
            ledger.finished((n, 1))
    finally:
        stop.set()
        reader.join()
        sys.setswitchinterval(switch)
    assert errors == []
    assert (ledger.running, ledger.pending) == (0, 40_000)
