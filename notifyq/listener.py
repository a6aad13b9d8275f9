"""The one LISTEN connection: wake the dispatcher when a served queue gets work.

Notifications are hints, never the queue: payloads only name a queue, and a
burst of them between two claims collapses into one wake-up (the dispatcher
reads a flag, not a count).  After every (re)connect the listener wakes the
dispatcher once, because anything inserted while nobody listened sent its
notification to no one.  While quiet, it pings so a dead socket is noticed.

With `on_cancelled`, it also listens to the status channel, where every
status change is announced, and calls `on_cancelled` when a job was
cancelled, so the dispatcher can interrupt the handler if the job is one of
its own (the payload names only the queue and the status: the dispatcher
asks the table which of its jobs were cancelled).

With `liveness`, the connection also holds the dispatcher's liveness lock
(notifyq.rescue_jobs in schema.sql) for as long as it lives: this is the
connection that notices a broken socket first, since it always waits on it,
so a live dispatcher whose session dropped takes the lock back within a
reconnect.  Meanwhile the lease keeper's beat, on another connection, vouches
for it: rescuers take a dispatcher for dead only when both have failed.
Reconnects back off to at most RECONNECT_CAP seconds, and a lock still held
by an old session is tried again every LIVENESS_RETRY seconds.

With `upkeep`, the connection also runs the dispatcher's fallback poll: one
statement every `every` seconds (jittered) that asks whether a served job is
ready and whether a rescue sweep would find anything (notifyq.rescue_due),
and doubles as the ping.  `on_upkeep` gets the answer, and whether this
connection vouches for the dispatcher (its probe came back and it holds the
liveness lock): while it does, the dispatcher skips its own poll and the
lease keeper its registry beats and slow sweeps, so an idle dispatcher sends
one statement per poll interval and writes nothing.  `on_upkeep(None, False)`
says the connection dropped.

The dispatchers' own messages (cap changes, the probe below) travel on
notifyq_internal, which the listener LISTENs to as well, so the public
channels carry only what the schema documents for them.

After every LISTEN it also checks that notifications really arrive: another
connection sends a probe, which must come back within PROBE_TIMEOUT.  Behind
a pooler in transaction mode (PgBouncer) the LISTEN stays on a server
connection the pooler has already handed to someone else, so nothing ever
arrives; the probe turns that silent failure into a warning.  Jobs are still
found by the fallback poll meanwhile.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass

import anyio

from . import channels, codec, failpoints
from .errors import DatabaseUnavailable
from .job import FINISHED, JobState
from .retry import reconnect_delay
from .store import Listener, Upkeep

log = logging.getLogger("notifyq.listener")

PROBE_PREFIX = "notifyq-probe:"  # on the internal channel
LIMIT_PREFIX = "limit:"  # internal: notifyq.queue_limits changed for the queue that follows
ENDPOINTS = "endpoints"  # internal: notifyq.endpoints changed (HTTP tasks)
PERIODIC = "periodic"  # internal: notifyq.periodic changed (schedules)
WEBHOOKS = "webhooks"  # internal: completion webhooks were queued (webhook_deliveries)
BREAKER_PREFIX = "breaker:"  # internal: the circuit breaker of the task that follows changed
PROBE_TIMEOUT = 5.0
RECONNECT_CAP = 2.0  # seconds: well inside the rescuers' grace for a lost session
LIVENESS_RETRY = 1.0  # seconds between tries while the lock is not ours yet
LIVENESS_TRIES = 20  # a rescuer holds the lock for one statement; the old session may linger
LEFT_RUNNING = frozenset({*FINISHED, JobState.QUEUED})  # statuses after running


@dataclass(frozen=True, slots=True)
class Upkeeping:
    """The fallback poll the listening connection runs (see the module docstring)."""

    every: float  # seconds between two, jittered
    tasks: Callable[[], Collection[str]]  # the tasks the dispatcher claims right now
    on_upkeep: Callable[[Upkeep | None, bool], None]


def status_change(payload: str) -> tuple[str, str]:
    """(queue, status) of a notifyq_status payload; ("", "") if it is not one."""
    try:
        note = codec.loads(payload)
    except ValueError:
        return "", ""
    if not isinstance(note, dict):
        return "", ""
    return str(note.get("queue", "")), str(note.get("status", ""))


async def listen(
    dsn: str,
    queues: Collection[str],
    *,
    on_notify: Callable[[set[str]], None],
    on_connected: Callable[[], None],
    send_probe: Callable[[str], Awaitable[None]],
    probe_id: str,
    ping_interval: float = 30.0,
    on_cancelled: Callable[[], None] | None = None,
    on_room: Callable[[set[str]], None] | None = None,
    on_status: Callable[[], None] | None = None,
    on_endpoints: Callable[[], None] | None = None,
    on_periodic: Callable[[], None] | None = None,
    on_webhooks: Callable[[], None] | None = None,
    on_breaker: Callable[[], None] | None = None,
    liveness: str | None = None,
    upkeep: Upkeeping | None = None,
) -> None:
    """Run until cancelled, reconnecting with capped, jittered backoff.

    `on_connected` runs after every successful LISTEN (the caller should claim
    at once: anything inserted while nobody listened notified no one);
    `on_notify(queues)` runs once per batch of notifications naming served queues;
    `on_room(queues)` once per batch of status notifications saying jobs of served
    queues left `running`, or of cap changes (room under a concurrency cap);
    `on_status()` once per batch of status notifications (jobs changed status
    somewhere); `on_endpoints()` once per batch saying notifyq.endpoints changed,
    `on_periodic()` notifyq.periodic; `on_webhooks()` completion webhooks were queued;
    `on_breaker()` once per batch saying a circuit
    breaker opened or closed (held jobs to claim, or a cool-down to wait for);
    `send_probe(payload)` must NOTIFY channels.INTERNAL from another connection;
    `liveness`: the claimant whose liveness lock this connection holds (and the
    claimant `upkeep` asks notifyq.rescue_due for).
    """
    served = frozenset(queues)
    names = [channels.JOBS, channels.INTERNAL]
    if on_cancelled is not None:
        names.append(channels.STATUS)
    listener = Listener(dsn, *names, liveness=liveness)
    failures = 0
    connects = 0
    try:
        while True:
            try:
                await listener.open()
                if failures:
                    log.info("listener reconnected after %d failed attempts", failures)
                failures = 0
                connects += 1
                if liveness is not None:
                    await _hold_liveness(listener)
                if failpoints.ACTIVE:
                    failpoints.hit("listen-before-poll")
                on_connected()
                probe = f"{PROBE_PREFIX}{probe_id}:{connects}"
                probe_deadline: float | None = anyio.current_time() + PROBE_TIMEOUT
                verified = False
                next_upkeep = anyio.current_time() + PROBE_TIMEOUT  # or once verified
                await send_probe(probe)
                while True:
                    wait = ping_interval
                    if liveness is not None and not listener.holds_liveness:
                        wait = min(wait, LIVENESS_RETRY)
                    if probe_deadline is not None:
                        wait = max(0.0, probe_deadline - anyio.current_time())
                    if upkeep is not None:
                        wait = max(0.0, min(wait, next_upkeep - anyio.current_time()))
                    notes = await listener.wait(wait, ping=upkeep is None)
                    if (
                        liveness is not None
                        and not listener.holds_liveness
                        and await listener.take_liveness()
                    ):
                        log.info("took this dispatcher's liveness lock")
                    internal = [n.payload for n in notes if n.channel == channels.INTERNAL]
                    if probe_deadline is not None:
                        if probe in internal:
                            probe_deadline = None
                            verified = True
                            next_upkeep = anyio.current_time()  # vouch from now on
                            log.debug("listener verified: its probe notification arrived")
                        elif anyio.current_time() >= probe_deadline:
                            probe_deadline = None
                            log.warning(
                                "LISTEN receives no notifications: a probe sent from another "
                                "connection did not arrive within %.0fs. If this DSN goes "
                                "through a pooler in transaction mode (PgBouncer), serve with "
                                "--no-listen or give the dispatcher a direct DSN. Jobs are "
                                "still found by the fallback poll.",
                                PROBE_TIMEOUT,
                            )
                    named = {n.payload for n in notes if n.channel == channels.JOBS} & served
                    if named:
                        on_notify(named)
                    changes = [
                        status_change(n.payload) for n in notes if n.channel == channels.STATUS
                    ]
                    if on_cancelled is not None and any(
                        s == JobState.CANCELLED for _, s in changes
                    ):
                        on_cancelled()
                    if on_status is not None and changes:
                        on_status()
                    freed = {q for q, s in changes if s in LEFT_RUNNING}
                    freed |= {
                        p.removeprefix(LIMIT_PREFIX) for p in internal if p.startswith(LIMIT_PREFIX)
                    }
                    freed &= served
                    if on_endpoints is not None and ENDPOINTS in internal:
                        on_endpoints()
                    if on_periodic is not None and PERIODIC in internal:
                        on_periodic()
                    if on_webhooks is not None and WEBHOOKS in internal:
                        on_webhooks()
                    if on_breaker is not None and any(
                        p.startswith(BREAKER_PREFIX) for p in internal
                    ):
                        on_breaker()
                    if on_room is not None and freed:
                        on_room(freed)
                    if upkeep is not None and anyio.current_time() >= next_upkeep:
                        found = await listener.upkeep(
                            liveness or probe_id,
                            sorted(served),
                            upkeep.tasks(),
                            answer_within=max(upkeep.every, 2.0),
                        )
                        next_upkeep = anyio.current_time() + upkeep.every * random.uniform(0.9, 1.1)
                        vouch = verified and (liveness is None or listener.holds_liveness)
                        upkeep.on_upkeep(found, vouch)
            except DatabaseUnavailable as exc:
                if upkeep is not None:
                    upkeep.on_upkeep(None, False)
                failures += 1
                delay = reconnect_delay(failures, first=0.2, cap=RECONNECT_CAP)
                log.warning("listener lost the database (%s); reconnecting in %.1fs", exc, delay)
                await anyio.sleep(delay)
    finally:
        with anyio.CancelScope(shield=True):
            await listener.close()


async def _hold_liveness(listener: Listener) -> None:
    """Take the liveness lock, retrying briefly: a rescuer holds it for one statement
    while it checks, and after a reconnect our old session may not have ended yet."""
    for _ in range(LIVENESS_TRIES):
        if await listener.take_liveness():
            return
        await anyio.sleep(0.05)
    log.warning(
        "could not take this dispatcher's liveness lock: another session holds it (an old "
        "connection of this process the server has not noticed is gone?); retrying every "
        "%.0fs. Meanwhile the lease keeper's beat shows this dispatcher alive, and if it "
        "dies its jobs are rescued when their leases expire",
        LIVENESS_RETRY,
    )
