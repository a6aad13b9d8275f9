"""The one LISTEN connection: wake the dispatcher when a served queue gets work.

Notifications are hints, never the queue: payloads only name a queue, and a
burst of them between two claims collapses into one wake-up (the dispatcher
reads a flag, not a count).  After every (re)connect the listener wakes the
dispatcher once, because anything inserted while nobody listened sent its
notification to no one.  While quiet, it pings so a dead socket is noticed.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Collection

import anyio

from . import failpoints
from .errors import DatabaseUnavailable
from .store import Listener

log = logging.getLogger("notifyq.listener")

CHANNEL = "notifyq_jobs"


async def listen(
    dsn: str,
    queues: Collection[str],
    *,
    on_notify: Callable[[], None],
    on_connected: Callable[[], None],
    ping_interval: float = 30.0,
) -> None:
    """Run until cancelled, reconnecting with capped, jittered backoff.

    `on_connected` runs after every successful LISTEN (the caller should claim
    at once: anything inserted while nobody listened notified no one);
    `on_notify` runs once per batch of notifications naming a served queue.
    """
    served = frozenset(queues)
    listener = Listener(dsn, CHANNEL)
    failures = 0
    try:
        while True:
            try:
                await listener.open()
                if failures:
                    log.info("listener reconnected after %d failed attempts", failures)
                failures = 0
                if failpoints.ACTIVE:
                    failpoints.hit("listen-before-poll")
                on_connected()
                while True:
                    payloads = await listener.wait(ping_interval)
                    if any(p in served for p in payloads):
                        on_notify()
            except DatabaseUnavailable as exc:
                failures += 1
                delay = min(10.0, 0.2 * 2 ** min(failures, 6)) * random.uniform(0.5, 1.0)
                log.warning("listener lost the database (%s); reconnecting in %.1fs", exc, delay)
                await anyio.sleep(delay)
    finally:
        with anyio.CancelScope(shield=True):
            await listener.close()
