"""The database clock only: dispatchers whose host clocks are hours off change nothing.

libfaketime moves the clock of each `notifyq serve` process (not PostgreSQL's) by three
hours, one ahead and one behind.  Were any schedule or lease computed from the host's
clock, the one ahead would start a scheduled job early or set leases hours long, and the
one behind would rescue a healthy job at once.
"""

from __future__ import annotations

import glob
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tests.apps.ledger import LEDGER_DDL
from tests.conftest import query, serve_process, statuses, wait_until
from tests.faults.harness import listen_pids

LIBFAKETIME = next(iter(sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))), None)


@pytest.mark.skipif(
    LIBFAKETIME is None,
    reason="libfaketime is not installed (Debian package faketime; .ci/run installs it)",
)
def test_host_clocks_hours_off_change_no_schedule_and_no_lease(dsn: str, tmp_path: Path) -> None:
    assert LIBFAKETIME is not None
    query(dsn, LEDGER_DDL)
    lease = 2.0
    options = ("--lease", str(lease), "--poll-interval", "0.5")

    def skewed(offset: str) -> dict[str, str]:
        return {"LD_PRELOAD": LIBFAKETIME, "FAKETIME": offset}

    with (
        serve_process(dsn, *options, env=skewed("+3h"), log=tmp_path / "ahead.log"),
        serve_process(dsn, *options, env=skewed("-3h"), log=tmp_path / "behind.log"),
    ):
        wait_until(lambda: len(listen_pids(dsn)) == 2, message="both dispatchers")
        # Scheduled 3 s ahead by the database clock: neither may start it before then.
        scheduled, run_at = query(
            dsn,
            "INSERT INTO notifyq.jobs (task, run_at) VALUES ('ledger.record', now() + "
            "interval '3 seconds') RETURNING id, run_at",
        )[0]
        wait_until(lambda: statuses(dsn) == {"succeeded": 1}, message="the scheduled job")
        started = query(dsn, "SELECT at FROM ledger WHERE job_id = %s", scheduled)[0][0]
        assert started >= run_at

        # Held across several leases: renewed on the database clock, rescued by no one.
        held = query(dsn, "INSERT INTO notifyq.jobs (task) VALUES ('ledger.hold') RETURNING id")[0][
            0
        ]
        wait_until(lambda: query(dsn, "SELECT 1 FROM ledger WHERE event = 'started'"))
        first_expiry = query(dsn, "SELECT lease_expires_at FROM notifyq.jobs WHERE id = %s", held)
        # Three leases later, by the database clock.
        wait_until(
            lambda: query(
                dsn,
                "SELECT 1 FROM notifyq.jobs WHERE id = %s AND status = 'running'"
                " AND lease_expires_at > %s + make_interval(secs => %s)",
                held,
                first_expiry[0][0],
                3 * lease,
            ),
            timeout=30,
            message="the lease to be renewed across three lease lengths",
        )
        query(dsn, "INSERT INTO release VALUES (%s)", held)
        wait_until(lambda: statuses(dsn) == {"succeeded": 2}, message="the held job")
    assert query(dsn, "SELECT attempts, last_error FROM notifyq.jobs WHERE id = %s", held) == [
        (1, None)
    ]
    assert len(query(dsn, "SELECT 1 FROM ledger WHERE event = 'started'")) == 1
    # The skew really was in force: each log's timestamps are hours off.
    now = datetime.now()
    assert abs(logged_at(tmp_path / "ahead.log") - now - timedelta(hours=3)) < timedelta(minutes=5)
    assert abs(logged_at(tmp_path / "behind.log") - now + timedelta(hours=3)) < timedelta(minutes=5)


def logged_at(log: Path) -> datetime:
    first = log.read_text().splitlines()[0]
    return datetime.strptime(first[:19], "%Y-%m-%d %H:%M:%S")
