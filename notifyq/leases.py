"""Keep our leases alive; rescue the jobs of dispatchers that stopped keeping theirs.

A running job carries `lease_expires_at`, set by the claim.  While we hold a
job (from claim until its outcome is written) this dispatcher renews the
lease every `heartbeat` seconds in one statement for all of them.  Every
`rescue_interval` seconds it also re-queues any job whose lease expired,
whoever claimed it: that dispatcher was killed or lost the database.  All
times are the database's clock (`now()` in SQL), never this host's.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import anyio

from .errors import DatabaseUnavailable
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
        on_rescued: Callable[[], None],
    ) -> None:
        self._store = store
        self._claimant = claimant
        self._lease = lease
        self._heartbeat = heartbeat
        self._rescue_interval = rescue_interval
        self._held_ids = held_ids
        self._on_rescued = on_rescued
        self.rescued = 0

    async def run(self) -> None:
        clock = anyio.current_time
        next_rescue = clock() + self._rescue_interval * random.uniform(0.5, 1.0)
        next_beat = clock() + self._heartbeat
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

    async def renew(self) -> None:
        ids = self._held_ids()
        if not ids:
            return
        renewed = await self._store.renew_leases(list(ids), self._claimant, self._lease)
        # An outcome written meanwhile also drops out of `renewed`: only what we still hold is lost.
        lost = (ids - renewed) & self._held_ids()
        if lost:
            log.warning(
                "lost the lease of jobs %s (rescued or cancelled elsewhere); their outcome "
                "will not be written",
                sorted(lost),
            )

    async def rescue(self) -> None:
        rescued = await self._store.rescue()
        if rescued:
            self.rescued += len(rescued)
            for job_id, status in rescued:
                log.info("rescued job=%s (lease expired) -> %s", job_id, status)
            self._on_rescued()
