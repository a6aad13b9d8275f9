"""The lease keeper's word on lost leases, against a real table.

A lease is reported lost only when the row left `running` under our claim
while we still expected to write its outcome: an outcome whose write began
before the renewal is no loss, though the ledger drops it only after the
commit (that window gave false alarms for jobs that had succeeded).
"""

from __future__ import annotations

import logging
import time

import pytest

from notifyq.leases import LeaseKeeper
from notifyq.ledger import Ledger
from notifyq.store import Store
from tests.conftest import query

pytestmark = pytest.mark.anyio

CLAIMANT = "test-host:1:abc"


def running_job(dsn: str) -> int:
    rows = query(
        dsn,
        "INSERT INTO notifyq.jobs (task, status, attempts, claimed_by, lease_expires_at)"
        " VALUES ('t', 'running', 1, %s, now() + interval '30 seconds') RETURNING id",
        CLAIMANT,
    )
    return int(rows[0][0])


async def test_an_outcome_being_written_is_no_lost_lease_but_a_rescued_job_is(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = Ledger()
    keeper = LeaseKeeper(
        Store(dsn, "leases"),
        CLAIMANT,
        lease=30,
        heartbeat=10,
        rescue_interval=5,
        ledger=ledger,
        loop_beat=time.monotonic,
        max_stall=300,
    )
    succeeded, rescued, kept = running_job(dsn), running_job(dsn), running_job(dsn)
    for job_id in (succeeded, rescued, kept):
        ledger.claimed((job_id, 1))
    # The completer began writing this outcome, and it committed before the renewal ...
    ledger.writing({(succeeded, 1)})
    query(
        dsn,
        "UPDATE notifyq.jobs SET status = 'succeeded', claimed_by = NULL,"
        " lease_expires_at = NULL, finished_at = now() WHERE id = %s",
        succeeded,
    )
    # ... while this one was taken from us (another dispatcher's rescue).
    query(
        dsn,
        "UPDATE notifyq.jobs SET status = 'queued', claimed_by = NULL,"
        " lease_expires_at = NULL WHERE id = %s",
        rescued,
    )
    try:
        with caplog.at_level(logging.WARNING, logger="notifyq.leases"):
            await keeper.renew()
    finally:
        await keeper._store.close()
    lost = [r.getMessage() for r in caplog.records if "lost the lease" in r.getMessage()]
    assert lost == [
        f"lost the lease of job attempts {rescued}#1 (rescued or cancelled elsewhere); "
        "their outcome will not be written"
    ]
    # The one still ours was renewed.
    assert query(
        dsn,
        "SELECT lease_expires_at > now() + interval '25 seconds' FROM notifyq.jobs WHERE id = %s",
        kept,
    ) == [(True,)]
