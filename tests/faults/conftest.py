"""Fixtures of the fault suite, and the recovery-time table printed at the end of the session.

`fault_dsn`: the `dsn` database (on every server under test) with the harness
ledgers created.  `deadlock_baseline`: the database's deadlock count before
the scenario.  The table of `harness.record_recovery` measurements is printed
by `pytest_terminal_summary` and written as JSON to the file named by
NOTIFYQ_FAULT_REPORT when that is set.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.faults import harness


@pytest.fixture
def fault_dsn(dsn: str) -> str:
    return harness.prepare(dsn)


@pytest.fixture
def deadlock_baseline(fault_dsn: str) -> int:
    return harness.deadlocks(fault_dsn)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    rows = harness.RECOVERIES
    if not rows:
        return
    tr = terminalreporter
    tr.section("fault suite: recovery times")
    width = max(len(r.scenario) for r in rows)
    tr.write_line(f"{'scenario':<{width}}  {'seconds':>8}  {'bound':>7}  ok   extra")
    for r in rows:
        extra = " ".join(f"{k}={v}" for k, v in r.extra.items())
        ok = "yes" if r.ok else "NO"
        head = f"{r.scenario:<{width}}  {r.seconds:>8.3f}  {r.bound:>7.2f}  {ok:<3}"
        tr.write_line(f"{head}  {extra}")
    target = os.environ.get("NOTIFYQ_FAULT_REPORT")
    if target:
        data = [
            {"scenario": r.scenario, "seconds": r.seconds, "bound": r.bound, "ok": r.ok, **r.extra}
            for r in rows
        ]
        Path(target).write_text(json.dumps(data, indent=2, default=str) + "\n")
        tr.write_line(f"written to {target}")
