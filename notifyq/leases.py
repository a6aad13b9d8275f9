"""Keep our leases alive; rescue the jobs of dispatchers that stopped keeping theirs.

A running job carries `lease_expires_at`, set by the claim.  While we hold a
job (from claim until its outcome is written) this dispatcher renews the
lease every `heartbeat` seconds in one statement for all of them.  Every
`rescue_interval` seconds it also re-queues any job whose lease expired,
whoever claimed it: that dispatcher was killed or lost the database.  All
times are the database's clock (`now()` in SQL), never this host's.

The keeper runs in a thread of its own, with its own event loop and
connection: an `async def` handler that blocks the dispatcher's loop (a
`time.sleep`, a CPU-bound loop) must not cost every other job its lease.
It watches the main loop's heartbeat instead: a loop stalled for longer than
a heartbeat gets a warning that names the likely cause; past `max_stall` the
keeper stops renewing, so the jobs of a wedged process are rescued by others
rather than held forever.  Rescued
jobs wake the dispatchers through their status notification (and the
fallback poll), so the keeper never has to call into the main loop.

Each heartbeat also upserts this dispatcher's row in notifyq.dispatchers (the
registry `notifyq watch` shows, with the number of jobs held), first at start;
on a graceful stop the row is marked stopped.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import anyio

from .errors import DatabaseUnavailable, NotifyqError
from .store import Store

log = logging.getLogger("notifyq.leases")


class LeaseKeeper:
    def __init__(
        self,
        store: Store,
        claimant: str,
        *,
        lease: float,
        heartbeat: float,
        rescue_interval: float,
        held_ids: Callable[[], set[int]],
        loop_beat: Callable[[], float],
        max_stall: float,
        registration: dict[str, Any] | None = None,
    ) -> None:
        self._store = store
        self._claimant = claimant
        self._lease = lease
        self._heartbeat = heartbeat
        self._rescue_interval = rescue_interval
        self._held_ids = held_ids  # called from the keeper's thread: must be thread-safe
        self._loop_beat = loop_beat  # time.monotonic() of the main loop's last tick
        self._max_stall = max_stall
        # The registry row's fixed columns (claimant, host, pid, queues, concurrency, heartbeat).
        self._registration = registration
        self.beat_at: float | None = None  # time.monotonic() of the last heartbeat written
        self._stall_warned = False
        self._register_warned = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rescued = 0
        self.failure: BaseException | None = None  # why the thread died, for the main loop

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="notifyq-leases", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing and rescuing; blocks until the thread has closed its connection."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _main(self) -> None:
        try:
            anyio.run(self._run_until_stopped)
        except BaseException as exc:  # reported to the main loop, which stops serving
            log.exception("the lease keeper failed")
            self.failure = exc

    async def _run_until_stopped(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.run)
                await anyio.to_thread.run_sync(self._stop.wait)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                if self._registration is not None:
                    with suppress(DatabaseUnavailable), anyio.move_on_after(5):
                        await self._store.unregister(self._claimant)
                await self._store.close()

    async def run(self) -> None:
        clock = anyio.current_time
        next_rescue = clock() + self._rescue_interval * random.uniform(0.5, 1.0)
        next_beat = clock()  # the first heartbeat registers this dispatcher at once
        failures = 0
        while True:
            await anyio.sleep(max(0.0, min(next_rescue, next_beat) - clock()))
            try:
                if clock() >= next_beat:
                    await self.renew()
                    next_beat = clock() + self._heartbeat
                if clock() >= next_rescue:
                    await self.rescue()
                    # Jitter spreads many dispatchers' rescues apart.
                    next_rescue = clock() + self._rescue_interval * random.uniform(0.8, 1.2)
                failures = 0
            except DatabaseUnavailable as exc:
                failures += 1
                # Capped below the heartbeat, so a short outage costs no lease.
                delay = min(self._heartbeat, 0.2 * 2**failures) * random.uniform(0.5, 1.0)
                log.warning("lease upkeep failed (%s); retrying in %.1fs", exc, delay)
                next_beat = min(next_beat, clock() + delay)
                next_rescue = min(next_rescue, clock() + delay)

    def _loop_alive(self) -> bool:
        stalled = time.monotonic() - self._loop_beat()
        if stalled > self._heartbeat:
            if not self._stall_warned:
                self._stall_warned = True
                log.warning(
                    "the event loop has not run for %.1fs: an async handler is blocking it "
                    "(make it a plain def, or use anyio.to_thread); leases are still renewed "
                    "for up to %.0fs of this",
                    stalled,
                    self._max_stall,
                )
        else:
            self._stall_warned = False
        if stalled > self._max_stall:
            log.error(
                "the event loop has been blocked for %.0fs: no longer renewing leases, so "
                "other dispatchers rescue this one's jobs",
                stalled,
            )
            return False
        return True

    async def renew(self) -> None:
        ids = self._held_ids()
        if not self._loop_alive():
            return  # neither leases nor the registry: a wedged process shows as lost
        if ids:
            renewed = await self._store.renew_leases(list(ids), self._claimant, self._lease)
            # An outcome written meanwhile also drops out of `renewed`: only what we still
            # hold is lost.
            lost = (ids - renewed) & self._held_ids()
            if lost:  # or merely locked at that moment: ask without waiting for the lock
                lost -= await self._store.still_claimed(lost, self._claimant)
            if lost:
                log.warning(
                    "lost the lease of jobs %s (rescued or cancelled elsewhere); their outcome "
                    "will not be written",
                    sorted(lost),
                )
        if self._registration is not None:
            await self._register(len(ids))

    async def _register(self, running: int) -> None:
        """The registry is for monitors: a failure there must never cost a lease."""
        assert self._registration is not None
        try:
            await self._store.register(self._registration, running=running)
        except DatabaseUnavailable:
            raise  # retried with the leases
        except NotifyqError as exc:
            if not self._register_warned:
                self._register_warned = True
                log.warning(
                    "cannot update the dispatcher registry (%s); `notifyq watch` "
                    "will not list this dispatcher",
                    exc,
                )
            return
        self.beat_at = time.monotonic()

    async def rescue(self) -> None:
        rescued = await self._store.rescue()
        if rescued:
            self.rescued += len(rescued)
            for job_id, status in rescued:
                log.info("rescued job=%s (lease expired) -> %s", job_id, status)
