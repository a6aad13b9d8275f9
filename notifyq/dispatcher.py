"""Decide when to claim, claim up to the free slots, hand the jobs to the pool.

The loop sleeps until one of: a wake-up (notification, reconnect, rescue),
the fallback poll timer, the precise timer for the next scheduled job, a
freed slot (only when the last claim came back full, i.e. more work is
waiting), or stop.  Then it claims at most `min(free slots, batch_size)` in
one statement.  A claim that came back full is followed by another as soon
as there is room; a short one means the ready backlog is drained.

What is held is read from the ledger (ledger.py), never counted here: an
attempt takes a slot while it is `running` there (from its hand-over to the
pool until its handler returns), and a row while it is `pending` (until its
outcome is written).  So a slot frees when its handler returns, before the
outcome is written; the pool's report calls `slot_freed` to wake the loop.  If
writes fall behind (a slow or locked database), claims stop once the
outcomes waiting to be written exceed the concurrency, so the jobs this
dispatcher holds as `running` stay below twice its concurrency instead of
growing with the backlog; every write that lands wakes the loop again.

A queue at its concurrency cap (notifyq.queue_limits, cluster-wide) yields no
jobs however much is ready; the claim says which served queues are full, and
until a status notification says a job of such a queue finished (or the next
poll), notifications naming only full queues wake nothing: a flood of inserts
into a capped queue does not turn into a flood of empty claims.

A task with a per-dispatcher cap (an HTTP endpoint's max_concurrency) is claimed
for no more than its room: in a claim of its own when that room is below the
claim's limit, left out when it is full (`rooms`, from notifyq/http/serving.py).

A candidate whose rate_key is over its rate limit (notifyq.rate_limits) is not
started but given its slot as run_at; the claim's timer (next_in) includes the
earliest slot, so nothing polls for it.

`polls_with_work` counts fallback polls that found a job nobody announced: no
notification named its queue since the claim before, no wake-up said "look at
every queue" (start-up, reconnect, room freed), the last claim was not full and
no scheduled job came due.  A job whose notification came while every slot was
busy waited for a slot, not for the poll, even if the claim that finally took
it ran after the poll timer fell due; it is not counted.

While the listening connection vouches for this dispatcher (`cover_polls`), it
runs the fallback poll instead, as a cheap "is anything ready?" (listener.py),
and the loop's own poll timer is off: `poll_found_work` makes the next claim
count as a poll.  An idle dispatcher then claims nothing until there is work.

One-shot runs stop the loop themselves.  With `max_jobs`, claims ask for no more
than the jobs left to that total, and the loop stops once it is reached.  With
`until_empty`, the loop stops when a claim found nothing while no job of ours is
running or waiting to be written, and `Store.work_left` confirms that nothing else
is to be started now: jobs kept from us by a cap held elsewhere, or spread out by a
rate limit, are waited for; delayed jobs and retries in backoff are not.  Each
written outcome that leaves us idle asks for that last claim, since the outcome may
have released a dependent job or queued a retry due at once.

A batch task (`@app.task(batch_size=N)`, batch.py) is claimed apart, in claims
of its own of up to N jobs, each claim's jobs handed to the pool as one batch
that takes one slot.  Free slots are offered in turn, a different group first on
each pass: each batch task, then every other task together, so neither a backlog
of batches nor one of single jobs starves the other.  A batch task's claims go on
while they come back full and slots are left.  Its jobs still count one each
where the database counts: a queue's concurrency cap, rate limits, `max_jobs`.
With `batch_wait`, a batch claim that came back short holds the task's next claim
for that long, so the next batch gathers what arrives meanwhile; the claim's
timer wakes the loop when the hold ends, so a job waits `batch_wait` at most.

With an `Appetite` (a listening dispatcher), each claim tells it whether it came
back full, which decides whether inserts notify (appetite.py); a short claim
that turned the rows hungry is followed by the barrier and one more claim before
the loop waits.

Any role can NOTIFY any channel, so notifications are never trusted: claims
that a notification alone caused and that found nothing draw on a token
bucket (a burst, then a steady rate), which bounds what a flood of forged
or stale notifications can make a dispatcher do.  Claims that find work
cost nothing, so a real producer is never slowed.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import NamedTuple

import anyio

from .appetite import Appetite
from .errors import DatabaseUnavailable, LockTimeout
from .job import Job
from .ledger import Ledger
from .logs import job_fields
from .registry import Batching
from .retry import reconnect_delay
from .store import Claim, Store, TaskSettings

log = logging.getLogger("notifyq.dispatcher")

REFILL_WAIT = 0.002  # seconds a backlog claim may wait for more free slots
EMPTY_CLAIM_BURST = 50  # empty claims notifications may cause at once ...
EMPTY_CLAIM_RATE = 50.0  # ... and per second after that


class EmptyClaimBudget:
    """A token bucket for claims that only a notification caused and that found nothing."""

    def __init__(self, burst: int, rate: float, now: float) -> None:
        self._burst = float(burst)
        self._rate = rate
        self._tokens = float(burst)
        self._at = now

    def _refill(self, now: float) -> None:
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now

    def wait(self, now: float) -> float:
        """Seconds until such a claim may run (0: now)."""
        self._refill(now)
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self._rate

    def spend(self, now: float) -> None:
        self._refill(now)
        self._tokens -= 1


Work = Job | tuple[Job, ...]  # what a slot takes: a job, or a batch (worker_pool.py)


class Pass(NamedTuple):
    """What one pass's claims took, together."""

    claim: Claim  # every job claimed, and what the statements told
    work: list[Work]  # the jobs grouped into what the slots take
    full: bool  # some claim came back full: ready jobs may be left


class Dispatcher:
    def __init__(
        self,
        store: Store,
        claimant: str,
        *,
        queues: Sequence[str],
        concurrency: int,
        batch_size: int,
        poll_interval: float,
        lease: float,
        tasks: Sequence[TaskSettings],
        submit: Callable[[Work], None],
        ledger: Ledger,
        max_jobs: int | None = None,
        until_empty: bool = False,
        rooms: Callable[[], Mapping[str, int]] = dict,
        appetite: Appetite | None = None,
        batches: Mapping[str, Batching] | None = None,
    ) -> None:
        self._store = store
        self._claimant = claimant
        # Sorted: the claim locks capped queues in this order (see notifyq.claim_room).
        self._queues = sorted(queues)
        self._concurrency = concurrency
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._lease = lease
        # Written to notifyq.tasks before the first claim (the claim and failures read them).
        self._tasks = list(tasks)
        self._task_names = sorted(t.task for t in tasks)
        self._tasks_synced = False
        # Capped tasks (HTTP endpoints' max_concurrency) -> attempts they may still start.
        self._rooms = rooms
        self._batches = dict(batches or {})  # batch tasks -> their batching
        self._held: dict[str, float] = {}  # batch tasks -> until when batch_wait holds them
        self._turn = 0  # which group of tasks is offered the free slots first
        # Outcomes waiting to be written before claims stop: the most the slots can hold.
        self._unwritten_cap = concurrency * max([1, *(b.size for b in self._batches.values())])
        self._appetite = appetite
        self._submit = submit  # hands a job to the pool, which enters it in the ledger
        self._ledger = ledger
        self._max_jobs = max_jobs
        self._until_empty = until_empty
        self._idle_recheck = False  # until_empty: the last outcome was written; claim again
        self.stopped_by: str | None = None  # 'until-empty', 'max-jobs', or None: stop()
        self._orphans_possible = False  # a claim failed: it may have committed unseen
        self._refill_at = max(1, min(batch_size, concurrency) // 2)
        self._signal = anyio.Event()
        self._notified = True  # the first pass claims at once
        self._covered = False  # the listener's upkeep polls for us (cover_polls)
        self._poll_due = False  # the upkeep found a ready job: claim as a poll would
        self.full: frozenset[str] = frozenset()  # served queues at their cap, per the last claim
        self._stopping = False
        self.claims = 0
        self.claimed = 0
        self.deferred = 0  # candidates a rate limit moved to a later slot
        self.polls_with_work = 0  # polls that found jobs no notification announced
        self.polls = 0  # claims the poll timer caused (an upkeep's finding: worker.upkeeps)
        self._waiting_for_slot = False  # work is known to wait: a freed slot claims it
        # Queues that wake-ups named since the last claim began; None: every queue (a
        # wake-up without names, or work known to be left waiting).
        self._heard: set[str] | None = None
        self.empty_notified_claims = 0  # a flood of forged notifications would show here
        self.passes = 0  # loop iterations: a busy loop would show here

    @property
    def running(self) -> int:
        """Claimed and handed to the pool, handler not done (the ledger's count)."""
        return self._ledger.running

    # Called from the listener, the pool and the app; all on the event loop.

    def wake(self, queues: Collection[str] | None = None) -> None:
        """Claim soon; `queues`: the queues a notification named (None: any)."""
        # Heard even when it wakes nothing: a full queue's job was announced, not lost.
        if queues is None:
            self._heard = None
        elif self._heard is not None:
            self._heard.update(queues)
        if queues is not None and self.full.issuperset(queues):
            return  # only queues at their cap: a claim would find no room
        self._notified = True
        self._signal.set()

    @property
    def task_names(self) -> list[str]:
        """The tasks claimed right now (the app's, and HTTP endpoints')."""
        return self._task_names

    def cover_polls(self, covered: bool) -> None:
        """Whether the listener's upkeep runs the fallback poll for us (no poll timer)."""
        if covered != self._covered:
            self._covered = covered
            self._signal.set()  # uncovered: the poll timer is back

    def poll_found_work(self) -> None:
        """The upkeep saw a ready job: claim now, counted as a poll (polls_with_work)."""
        if self._waiting_for_slot:
            return  # we know, and every slot is busy: a freed one claims it
        self._poll_due = True
        self._signal.set()

    def room_freed(self, queues: Collection[str]) -> None:
        """Jobs of these queues left `running` somewhere: a full one may have room again."""
        if self.full.isdisjoint(queues):
            return
        self.full = self.full.difference(queues)
        self.wake()

    def serve_tasks(self, names: Collection[str]) -> None:
        """Claim jobs of these tasks from now on (HTTP endpoints came or went); the
        settings synced to notifyq.tasks stay those given at start."""
        self._task_names = sorted(names)
        self.wake()

    def slot_freed(self) -> None:
        """A handler returned (the ledger already counts its slot free): claim if waiting."""
        self._signal.set()

    def outcomes_written(self) -> None:
        if self._until_empty and self._idle():
            self._idle_recheck = True
        self._signal.set()  # room again, if unwritten outcomes were holding claims back

    def _idle(self) -> bool:
        return self._ledger.running == 0 and self._ledger.pending == 0

    def _finish(self, reason: str) -> None:
        log.info("stopping: %s", "nothing left to claim" if reason == "until-empty" else reason)
        self.stopped_by = reason
        self._stopping = True

    def stop(self) -> None:
        self._stopping = True
        self._signal.set()

    async def run(self) -> None:
        clock = anyio.current_time
        more_waiting = False  # there may be ready jobs we have not claimed
        more_waiting_full = False  # ... because the last claim came back full
        refill_by: float | None = None
        next_poll = clock() + self._jittered_poll()
        next_due = math.inf  # the next scheduled job's run_at, on our monotonic clock
        # The same instant measured from when the claim was sent, not from its reply: from
        # then on a job may be due that no notification will announce.
        due_from = math.inf
        failures = 0
        budget = EmptyClaimBudget(EMPTY_CLAIM_BURST, EMPTY_CLAIM_RATE, clock())
        while not self._stopping:
            self.passes += 1
            now = clock()
            if self._appetite is not None and now >= self._appetite.barrier_at:
                if await self._barrier():
                    more_waiting = True  # the claim after the barrier
                continue
            by_upkeep = self._poll_due  # that poll is counted as the listener's upkeep
            polled = by_upkeep or (not self._covered and now >= next_poll)
            timers = polled or now >= next_due
            notified_only = self._notified and not timers and not more_waiting
            if notified_only and (hold := budget.wait(now)) > 0:
                await self._sleep(hold)  # the flag stays set: the claim is late, not lost
                continue
            if self._notified or timers or self._idle_recheck:
                more_waiting = True
                self._notified = self._idle_recheck = self._poll_due = False
            backlog = self._ledger.pending - self._unwritten_cap
            free = self._concurrency - self._ledger.slots - max(backlog, 0)
            if more_waiting and free > 0:
                if more_waiting_full and free < self._refill_at:
                    # Draining a backlog: let a few more slots free up (briefly) so one
                    # claim fills many, instead of one claim per finished job.
                    if refill_by is None:
                        refill_by = clock() + REFILL_WAIT
                    if clock() < refill_by:
                        await self._sleep(refill_by - clock())
                        continue
                refill_by = None
                limit = min(free, self._batch_size)
                left = None if self._max_jobs is None else self._max_jobs - self.claimed
                if left is not None:
                    limit = min(limit, left)
                # Work known to be waiting: left behind by a full claim, or scheduled and due.
                known = more_waiting_full or now >= due_from
                sent = clock()
                self.polls += polled and not by_upkeep
                heard, self._heard = (None if known else self._heard), set()
                try:
                    (jobs, next_in, self.full, deferred), work, full = await self._claim(
                        limit, left
                    )
                    failures = 0
                except DatabaseUnavailable as exc:
                    failures += 1
                    delay = reconnect_delay(failures, first=0.05, cap=5.0)
                    log.warning("claim failed (%s); retrying in %.2fs", exc, delay)
                    self._notified = True  # after reconnecting, catch up at once
                    self._heard = None  # ... which is no poll finding lost notifications
                    await self._sleep(delay)
                    continue
                next_poll = clock() + self._jittered_poll()
                next_due = clock() + max(next_in, 0.0) if next_in is not None else math.inf
                due_from = sent + max(next_in, 0.0) if next_in is not None else math.inf
                # Candidates deferred by a rate limit took places in this claim: ready
                # jobs behind them may be waiting.
                more_waiting = more_waiting_full = full
                if notified_only and not jobs:
                    budget.spend(clock())
                    self.empty_notified_claims += 1
                if polled and jobs and heard is not None:
                    # Work found by the poll alone means a notification went missing.  One
                    # heard while the claim ran may be the announcement of a job it found.
                    heard |= self._heard if self._heard is not None else {j.queue for j in jobs}
                    unannounced = sum(1 for job in jobs if job.queue not in heard)
                    if unannounced:
                        self.polls_with_work += 1
                        log.info("fallback poll found %d jobs", unannounced)
                for unit in work:
                    self._submit(unit)
                if self._appetite is not None:
                    await self._state_appetite(more_waiting_full)
                if self._max_jobs is not None and self.claimed >= self._max_jobs:
                    self._finish("max-jobs")
                elif self._until_empty and not jobs and not deferred and self._idle():
                    try:
                        left = await self._store.work_left(self._queues, self._task_names)
                    except DatabaseUnavailable as exc:
                        log.warning("could not tell whether work is left (%s)", exc)
                        left = True  # the next wake-up asks again
                    if not left:
                        self._finish("until-empty")
                continue
            if more_waiting:
                # Work is known and every slot is busy: the timers have nothing to add
                # until a slot frees (which signals); sleeping on them would spin.
                self._waiting_for_slot = True
                try:
                    await self._sleep(math.inf)
                finally:
                    self._waiting_for_slot = False
            else:
                barrier_at = math.inf if self._appetite is None else self._appetite.barrier_at
                poll_at = math.inf if self._covered else next_poll
                await self._sleep(min(poll_at, next_due, barrier_at) - now)
        if self._appetite is not None:
            try:
                await self._appetite.forget()
            except DatabaseUnavailable as exc:
                # A draining row expires on its own; a hungry one only costs notifications.
                log.warning("could not drop this dispatcher's appetite rows (%s)", exc)

    async def _state_appetite(self, full: bool) -> None:
        assert self._appetite is not None
        try:
            await self._appetite.claimed(full)
        except DatabaseUnavailable as exc:
            # Our rows may still say draining: claim again soon, which states them again.
            log.warning("could not write this dispatcher's appetite (%s)", exc)
            self._notified = True

    async def _barrier(self) -> bool:
        assert self._appetite is not None
        try:
            return await self._appetite.barrier()
        except DatabaseUnavailable as exc:
            log.warning("appetite barrier failed (%s)", exc)
            self._appetite.missed()
            return False

    async def _claim(self, limit: int, left: int | None) -> Pass:
        """Claim for `limit` free slots, and `left` jobs at most (None: no bound)."""
        if not self._tasks_synced:
            changed = await self._store.sync_tasks(self._tasks)
            breakers = await self._store.sync_breakers(self._tasks)
            self._tasks_synced = True
            if changed:
                log.info("task settings written to notifyq.tasks: %s", ", ".join(changed))
            if breakers:
                log.info(
                    "circuit breakers written to notifyq.circuit_breakers: %s",
                    ", ".join(breakers),
                )
        if self._orphans_possible:
            released = await self._store.release_orphans(self._claimant, self._ledger.ids())
            self._orphans_possible = False
            if released:
                log.warning("returned %d jobs whose claim reply was lost", len(released))
        try:
            if not self._batches:
                claim = await self._claim_once(self._task_names, limit)
                return Pass(claim, list(claim.jobs), len(claim.jobs) + claim.deferred == limit)
            return await self._claim_groups(limit, left)
        except LockTimeout:
            raise  # the statement failed before its COMMIT: nothing was claimed
        except DatabaseUnavailable:
            self._orphans_possible = True
            raise

    async def _claim_groups(self, slots: int, left: int | None) -> Pass:
        """Offer `slots` to each batch task and to the other tasks, in turn (see above)."""
        served = set(self._task_names)
        groups: list[str | None] = [t for t in self._batches if t in served]
        groups.append(None)  # every other task
        start = self._turn % len(groups)
        self._turn += 1
        parts: list[Claim] = []
        work: list[Work] = []
        full = False
        now = anyio.current_time()
        hold_ends: list[float] = []
        try:
            for group in groups[start:] + groups[:start]:
                if slots <= 0 or left == 0:
                    break
                if group is None:
                    tasks = [t for t in self._task_names if t not in self._batches]
                    if not tasks:
                        continue
                    limit = slots if left is None else min(slots, left)
                    part = await self._claim_once(tasks, limit)
                    parts.append(part)
                    work.extend(part.jobs)
                    taken = len(part.jobs) + part.deferred
                    full = full or taken == limit
                    slots -= taken
                    left = None if left is None else left - len(part.jobs)
                    continue
                if (until := self._held.get(group, 0.0)) > now:
                    hold_ends.append(until)
                    continue
                batching = self._batches[group]
                while slots > 0 and left != 0:
                    limit = batching.size if left is None else min(batching.size, left)
                    part = await self._claim_tasks([group], limit)
                    parts.append(part)
                    # A claim counts a slot even when a rate limit deferred all it found:
                    # else such claims go on, in this pass, through the whole backlog (the
                    # shared claim counts its deferred ones as taken too).
                    if part.jobs or part.deferred:
                        slots -= 1
                    if part.jobs:
                        work.append(tuple(part.jobs))
                        left = None if left is None else left - len(part.jobs)
                    if len(part.jobs) + part.deferred < limit:
                        if part.jobs and batching.wait > 0:
                            self._held[group] = now + batching.wait
                        break
                    full = full or slots == 0
        except (DatabaseUnavailable, LockTimeout):
            if not parts:
                raise
            # Jobs already claimed are handed over; what the failed claim may have
            # committed unseen is released before the next one.
            self._orphans_possible = True
        nexts = [p.next_in for p in parts if p.next_in is not None]
        # A held batch task's hold ends on the timer: what gathered meanwhile is claimed.
        nexts.extend(until - anyio.current_time() for until in hold_ends)
        claim = Claim(
            [job for p in parts for job in p.jobs],
            min(nexts) if nexts else None,
            frozenset().union(*(p.full for p in parts)),
            sum(p.deferred for p in parts),
        )
        return Pass(claim, work, full)

    async def _claim_once(self, tasks: Sequence[str], limit: int) -> Claim:
        rooms = self._rooms()
        if not rooms:
            return await self._claim_tasks(tasks, limit)
        # A capped task with less room than the limit gets a claim of its own, bounded by
        # its room: in the shared one it could take every free slot, and its surplus would
        # wait for the endpoint holding slots (and leases) other tasks could use.  Claimed
        # first, so a backlog of other tasks cannot starve it; a full one is left out.
        small = {t: n for t, n in rooms.items() if n < limit}
        parts: list[Claim] = []
        left = limit
        try:
            for task in tasks:
                room = small.get(task)
                if room is not None and room > 0 and left > 0:
                    part = await self._claim_tasks([task], min(room, left))
                    parts.append(part)
                    left -= len(part.jobs) + part.deferred
            rest = [t for t in tasks if t not in small]
            if left > 0 and (rest or not parts):
                parts.append(await self._claim_tasks(rest, left))
        except (DatabaseUnavailable, LockTimeout):
            if not parts:
                raise
            # Jobs already claimed are handed over; what the failed claim may have
            # committed unseen is released before the next one.
            self._orphans_possible = True
        nexts = [p.next_in for p in parts if p.next_in is not None]
        return Claim(
            [job for p in parts for job in p.jobs],
            min(nexts) if nexts else None,
            frozenset().union(*(p.full for p in parts)),
            sum(p.deferred for p in parts),
        )

    async def _claim_tasks(self, tasks: Sequence[str], limit: int) -> Claim:
        claim = await self._store.claim(
            queues=self._queues,
            limit=limit,
            claimant=self._claimant,
            lease=self._lease,
            tasks=tasks,
        )
        self.claims += 1
        self.claimed += len(claim.jobs)
        self.deferred += claim.deferred
        if claim.jobs and log.isEnabledFor(logging.DEBUG):
            for job in claim.jobs:
                log.debug(
                    "claimed job=%s task=%s queue=%s attempt=%s/%s",
                    job.id,
                    job.task,
                    job.queue,
                    job.attempt,
                    job.max_attempts,
                    extra=job_fields(job, "job.claimed"),
                )
        return claim

    async def _sleep(self, seconds: float) -> None:
        """Sleep until the timeout or any signal, whichever comes first."""
        with anyio.move_on_after(max(seconds, 0.0)):
            await self._signal.wait()
        self._signal = anyio.Event()

    def _jittered_poll(self) -> float:
        # Jitter keeps many dispatchers from polling in lockstep.
        return self._poll_interval * random.uniform(0.9, 1.1)
