"""Keep our leases alive; rescue the jobs of dispatchers that died.

A running job carries `lease_expires_at`, set by the claim.  While we hold a
job (from claim until its outcome is written: the ledger's attempts) this
dispatcher renews the lease every `heartbeat` seconds in one statement for all
of them; the heartbeat is a third of the lease (`heartbeat_for`), so two renewals
can fail before a lease runs out.

Rescue (notifyq.rescue_jobs) finds lost jobs two ways.  A dispatcher that
listens holds a liveness lock on its listening connection, which PostgreSQL
frees the moment that session dies, and while it holds jobs this keeper
writes a beat (`alive_at`) every ALIVE_BEAT seconds from its own connection.
A claimant whose lock is free and who has shown no sign of life (beat or
claim) for SESSION_GRACE is dead: its running jobs are queued again, so a
kill -9 costs seconds, whatever the lease.  Either witness alone keeps a live
dispatcher's jobs: the beat when only its listening connection dropped, the
lock when the process is frozen or its keeper slow.  The lease is the backstop
for what a session cannot show (a frozen process whose socket is open, a
partition the server has not noticed, a pooler): any job whose lease expired
is re-queued.  After this keeper's own connection failed and came back (a
server restart or failover: every lock was free, every beat stopped), it
rescues by lease only for RESTART_GRACE, giving live dispatchers time to
reconnect and beat.
The sweep runs every FAST_SWEEP seconds while other dispatchers with a
liveness lock run jobs (the last sweep saw some), and for FAST_WINDOW after
the status channel announced activity (`poke`: a claim, say, by a dispatcher
that may die before its first beat).  Otherwise it runs every
`rescue_interval` seconds, except while the listening connection's upkeep
(listener.py) vouches (`cover`): that statement, run at every fallback poll,
asks notifyq.rescue_due whether a sweep would find anything (an expired
lease, a dispatcher with running jobs whose lock is free), and pokes this
keeper when it would.  So an idle dispatcher that listens sweeps once at
start and then only when there is something to rescue.  All times are the
database's clock (`now()` in SQL), never this host's.

The keeper runs in a thread of its own, with its own event loop and
connection: an `async def` handler that blocks the dispatcher's loop (a
`time.sleep`, a CPU-bound loop) must not cost every other job its lease.
It watches the main loop's heartbeat instead: a loop stalled for longer than
a heartbeat gets a warning that names the likely cause; past `max_stall` the
keeper stops renewing, so the jobs of a wedged process are rescued by others
rather than held forever.  Rescued
jobs wake the dispatchers through their status notification (and the
fallback poll), so the keeper never has to call into the main loop.

The registry row of this dispatcher in notifyq.dispatchers (what `notifyq
watch` shows, with the number of jobs held) is written at start, on a
heartbeat when what it says changed (jobs held, tasks served), and on every
heartbeat while the listening connection does not vouch: a listening
dispatcher's liveness lock tells that it is alive (notifyq.dispatcher_status),
so an idle one writes nothing.  On a graceful stop the row is marked stopped.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import anyio

from .errors import DatabaseUnavailable, NotifyqError
from .ledger import Ledger
from .retry import reconnect_delay
from .store import Store

log = logging.getLogger("notifyq.leases")

SESSION_GRACE = 2.0
"""Seconds without a sign of life (beat or claim) after which a dispatcher whose liveness
lock is free counts as dead: two beats missed."""
ALIVE_BEAT = 1.0
"""Seconds between two beats (notifyq.dispatchers.alive_at) while this dispatcher holds
jobs; none while it holds nothing, so an idle dispatcher writes nothing for it."""
RESTART_GRACE = 5.0
"""Seconds after the server (re)started, or this keeper's connection came back, during
which no free liveness lock counts: every dispatcher is reconnecting then."""
HEARTBEATS_PER_LEASE = 3
"""Renewals within one lease: two may fail (a slow statement, a reconnect) before it lapses."""
FAST_SWEEP = 0.5
"""Seconds between two rescue sweeps while other dispatchers' sessions are watched: with
SESSION_GRACE, a dead dispatcher's jobs are queued again about 3 s after it died."""
FAST_WINDOW = 2.0
"""Seconds of fast sweeps after a poke (a status change heard, or the upkeep saw something
to rescue): long enough for a sweep to see the claimant beat (ALIVE_BEAT), after which
it watches that claimant by itself."""


def heartbeat_for(lease: float) -> float:
    """Seconds between two renewals of a `lease` of that many seconds: the one place this
    is worked out (the keeper, the registry row, the readiness probe all read it)."""
    return lease / HEARTBEATS_PER_LEASE


class LeaseKeeper:
    def __init__(
        self,
        store: Store,
        claimant: str,
        *,
        lease: float,
        heartbeat: float | None = None,  # None: `heartbeat_for(lease)`; tests shorten it
        rescue_interval: float,
        ledger: Ledger,
        loop_beat: Callable[[], float],
        max_stall: float,
        registration: dict[str, Any] | None = None,
    ) -> None:
        self._store = store
        self._claimant = claimant
        self._lease = lease
        self.heartbeat = heartbeat_for(lease) if heartbeat is None else heartbeat
        self._rescue_interval = rescue_interval
        self._ledger = ledger  # thread-safe: the main loop changes it meanwhile
        self._loop_beat = loop_beat  # time.monotonic() of the main loop's last tick
        self._max_stall = max_stall
        # The registry row's fixed columns (claimant, host, pid, queues, tasks, concurrency,
        # liveness_lock), and the heartbeat this keeper keeps.
        self._registration = (
            None if registration is None else {**registration, "heartbeat": self.heartbeat}
        )
        self.beat_at: float | None = None  # time.monotonic() of the last heartbeat written
        self.contact_at: float | None = None  # time.monotonic() of our last statement's reply
        # time.monotonic() until which the listening connection's upkeep vouches for this
        # dispatcher (its lock held, its fallback poll asking notifyq.rescue_due); set
        # from the main loop, a float store, safe across threads.
        self._covered_until = 0.0
        self._registered: tuple[int, tuple[str, ...]] | None = None  # what the row says
        self._stall_warned = False
        self._register_warned = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rescued = 0
        self.sweeps = 0
        self.failure: BaseException | None = None  # why the thread died, for the main loop
        # time.monotonic() until which rescue sweeps run every FAST_SWEEP seconds.
        self._watch_until = 0.0
        # anyio clock before which free liveness locks are not trusted (see RESTART_GRACE).
        # Trusted from the start: a dispatcher started beside one that dies at once must
        # rescue within seconds (the server's own restart is covered in SQL).
        self._trust_sessions_at = 0.0

    def serve_tasks(self, tasks: list[str]) -> None:
        """The tasks this dispatcher claims changed (HTTP endpoints): registered from the
        next heartbeat on.  One reference swapped: the keeper's thread reads it whole."""
        if self._registration is not None:
            self._registration = {**self._registration, "tasks": sorted(tasks)}

    def poke(self) -> None:
        """Jobs changed status somewhere, or the upkeep saw something to rescue: sweep
        often for a while.  Called from the main loop; a float store, safe across threads."""
        self._watch_until = time.monotonic() + FAST_WINDOW

    def cover(self, seconds: float) -> None:
        """The listening connection's upkeep answered, holding the liveness lock: no
        registry write without a change and no slow sweep for `seconds` (0: it stopped
        vouching, the connection dropped).  From the main loop, like `poke`."""
        self._covered_until = time.monotonic() + seconds if seconds > 0 else 0.0

    @property
    def covered(self) -> bool:
        return time.monotonic() < self._covered_until

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
                # Abandoned if `run` fails: the failure then reaches the main loop at once.
                await anyio.to_thread.run_sync(self._stop.wait, abandon_on_cancel=True)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                if self._registration is not None:
                    with suppress(DatabaseUnavailable), anyio.move_on_after(5):
                        await self._store.unregister(self._claimant)
                await self._store.close()

    async def run(self) -> None:
        clock = anyio.current_time
        next_rescue = clock()  # at start-up: the jobs of a dispatcher that died before us
        next_beat = clock()  # the first heartbeat registers this dispatcher at once
        next_alive = clock()
        watched = 0  # other claimants the last sweep watches (fast sweeps while any)
        was_covered = False
        # The start-up sweep runs even if the upkeep vouches already: it finds the peers
        # holding jobs now (their alive beats), whose death only fast sweeps catch within
        # seconds; no status change of theirs may come to poke us.
        swept = False
        failures = 0
        while True:
            # Wakes at least every FAST_SWEEP to see whether a poke moved the sweep earlier,
            # whether jobs are held (ALIVE_BEAT) and whether the upkeep still vouches.
            await anyio.sleep(max(0.0, min(next_rescue, next_beat, clock() + FAST_SWEEP) - clock()))
            fast = watched > 0 or time.monotonic() < self._watch_until
            if fast:
                next_rescue = min(next_rescue, clock() + FAST_SWEEP)
            covered = self.covered
            if was_covered and not covered:
                # The listening connection dropped: the lock no longer shows us alive, the
                # registry row's heartbeat must, from now on.
                next_beat = clock()
            was_covered = covered
            talked = False  # whether this pass reached the database at all
            try:
                if clock() >= next_beat:
                    talked = await self.renew()
                    next_beat = clock() + self.heartbeat
                if clock() >= next_alive and self._ledger and self._loop_alive(warn=False):
                    await self._store.alive(self._claimant)
                    next_alive = clock() + ALIVE_BEAT
                    talked = True
                if clock() >= next_rescue:
                    if covered and not fast and failures == 0 and swept:
                        pass  # the upkeep asks notifyq.rescue_due meanwhile, and pokes
                    else:
                        watched = await self.rescue(
                            trust_sessions=clock() >= self._trust_sessions_at
                        )
                        swept = talked = True
                    interval = FAST_SWEEP if watched else self._rescue_interval
                    # Jitter spreads many dispatchers' rescues apart.
                    next_rescue = clock() + interval * random.uniform(0.8, 1.2)
                if talked:
                    self.contact_at = time.monotonic()
                if failures and talked:
                    # Back after an outage others may have had too: give them time.
                    self._trust_sessions_at = clock() + RESTART_GRACE
                    failures = 0
            except DatabaseUnavailable as exc:
                failures += 1
                # Until the connection is back (and RESTART_GRACE after): other
                # dispatchers may have lost theirs too.
                self._trust_sessions_at = math.inf
                # Capped below the heartbeat, so a short outage costs no lease.
                delay = reconnect_delay(failures, first=0.2, cap=self.heartbeat)
                log.warning("lease upkeep failed (%s); retrying in %.1fs", exc, delay)
                next_beat = next_rescue = clock() + delay

    def _loop_alive(self, *, warn: bool = True) -> bool:
        stalled = time.monotonic() - self._loop_beat()
        if not warn:
            return stalled <= self._max_stall
        if stalled > self.heartbeat:
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

    async def renew(self) -> bool:
        """Renew the leases held and write the registry row if it is due; whether any
        statement ran."""
        held = self._ledger.attempts()
        if not self._loop_alive():
            return False  # neither leases nor the registry: a wedged process shows as lost
        talked = False
        if held:
            ids = {job_id for job_id, _ in held}
            renewed = await self._store.renew_leases(ids, self._claimant, self._lease)
            talked = True
            # Asked after the renewal: an outcome whose write began before it is no loss,
            # though its row has left `running` (the ledger drops it only once written).
            lost = self._ledger.still_expected(held - renewed)
            if lost:  # or merely locked at that moment: ask without waiting for the lock
                claimed = await self._store.still_claimed({i for i, _ in lost}, self._claimant)
                lost = self._ledger.still_expected(lost - claimed)
            if lost:
                log.warning(
                    "lost the lease of job attempts %s (rescued or cancelled elsewhere); "
                    "their outcome will not be written",
                    ", ".join(f"{job_id}#{attempt}" for job_id, attempt in sorted(lost)),
                )
        if self._registration is not None:
            says = (len(held), tuple(self._registration["tasks"]))
            if says != self._registered or not self.covered:
                await self._register(says)
                talked = True
        return talked

    async def _register(self, says: tuple[int, tuple[str, ...]]) -> None:
        """The registry is for monitors: a failure there must never cost a lease."""
        assert self._registration is not None
        try:
            await self._store.register(self._registration, running=says[0])
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
        self._registered = says
        self.beat_at = time.monotonic()

    async def rescue(self, *, trust_sessions: bool = True) -> int:
        """One sweep; returns how many other dispatchers' sessions it watches."""
        self.sweeps += 1
        rescue = await self._store.rescue(
            self._claimant,
            session_grace=SESSION_GRACE,
            restart_grace=RESTART_GRACE,
            trust_sessions=trust_sessions,
        )
        self.rescued += len(rescue.jobs)
        for job in rescue.jobs:
            why = "its dispatcher's session ended" if job.cause == "session" else "lease expired"
            log.info("rescued job=%s (%s) -> %s", job.job_id, why, job.status)
        return rescue.watched
