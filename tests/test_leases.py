"""The lease keeper's word on lost leases, against a real table.

A lease is reported lost only when the row left `running` under our claim
while we still expected to write its outcome: an outcome whose write began
before the renewal is no loss, though the ledger drops it only after the
commit (that window gave false alarms for jobs that had succeeded).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from notifyq.leases import LeaseKeeper
from notifyq.ledger import Ledger
from notifyq.store import Store
from tests.conftest import query, wait_until

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


def keeper_for(dsn: str, **kwargs: float) -> LeaseKeeper:
    return LeaseKeeper(
        Store(dsn, "leases"),
        CLAIMANT,
        lease=kwargs.get("lease", 3.0),
        heartbeat=kwargs.get("heartbeat", 1.0),
        rescue_interval=kwargs.get("rescue_interval", 0.2),
        ledger=Ledger(),
        loop_beat=time.monotonic,
        max_stall=300,
    )


def test_the_keeper_backs_off_while_the_database_is_unreachable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each failure waits longer (a busy loop of retries once burned a CPU and, after a
    thousand failures, overflowed the delay and killed the keeper silently)."""
    caplog.set_level(logging.WARNING, logger="notifyq.leases")
    keeper = keeper_for("postgresql://postgres@127.0.0.1:1/unreachable?connect_timeout=2")
    failures = lambda: [r for r in caplog.records if "lease upkeep failed" in r.getMessage()]  # noqa: E731
    started = time.monotonic()
    keeper.start()
    try:
        wait_until(lambda: len(failures()) >= 4, timeout=30, message="four failed attempts")
    finally:
        keeper.stop()
    # At least 0.2 + 0.4 + 0.5 s between them: the smallest jittered delays.
    assert time.monotonic() - started >= 1.1
    assert keeper.failure is None


def test_a_keeper_that_fails_reports_it_at_once(dsn: str) -> None:
    keeper = keeper_for(dsn)

    async def broken() -> None:
        raise RuntimeError("keeper bug")

    keeper.run = broken  # type: ignore[method-assign]
    keeper.start()
    try:
        wait_until(lambda: keeper.failure is not None, timeout=10, message="the failure")
    finally:
        keeper.stop()
    assert isinstance(keeper.failure, BaseExceptionGroup | RuntimeError)


def test_free_liveness_locks_are_not_trusted_after_a_reconnect(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failover frees every dispatcher's lock and stops every beat for a moment: the
    sweeps right after this keeper reconnected must rescue by lease only."""
    sweeps: list[tuple[float, bool]] = []
    real = Store.rescue

    async def spy(self: Store, claimant: str, **kwargs: Any) -> Any:
        began = time.monotonic()
        result = await real(self, claimant, **kwargs)
        sweeps.append((began, kwargs["trust_sessions"]))  # the sweeps that ran
        return result

    monkeypatch.setattr(Store, "rescue", spy)
    keeper = keeper_for(dsn)
    keeper.start()
    try:
        wait_until(lambda: sweeps and sweeps[-1][1], timeout=20, message="a trusting sweep")
        query(
            dsn,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'notifyq:leases' AND datname = current_database()",
        )
        cut = time.monotonic()
        wait_until(lambda: [trust for at, trust in sweeps if at > cut], message="a sweep after it")
    finally:
        keeper.stop()
    # The first sweep on the new connection did not trust sessions.
    assert next(trust for at, trust in sweeps if at > cut) is False
