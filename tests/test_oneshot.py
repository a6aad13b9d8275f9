"""One-shot runs of `notifyq serve`: --until-empty, --max-jobs, --max-runtime, and the
exit status each ends with (0, or 3 when --until-empty was cut short by a limit)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from notifyq import ConfigurationError, Settings
from tests.apps.ledger import LEDGER_DDL
from tests.conftest import REPO, query, serve_process, statuses, wait_until

EXIT_TIMEOUT = 60  # seconds a run may take to end by itself before the test fails


def enqueue(dsn: str, task: str, count: int = 1, **columns: str) -> list[int]:
    extra = "".join(f", {value} AS {name}" for name, value in columns.items())
    names = "".join(f", {name}" for name in columns)
    rows = query(
        dsn,
        f"INSERT INTO notifyq.jobs (task{names}) SELECT %s{extra} FROM generate_series(1, %s)"
        " RETURNING id",
        task,
        count,
    )
    return [r[0] for r in rows]


def ran(dsn: str) -> list[int]:
    return [r[0] for r in query(dsn, "SELECT job_id FROM ledger WHERE event = 'ran'")]


def started(dsn: str) -> set[int]:
    return {r[0] for r in query(dsn, "SELECT job_id FROM ledger WHERE event = 'started'")}


def run_to_end(dsn: str, tmp_path: Path, *args: str) -> int:
    log = tmp_path / "serve.log"
    with serve_process(dsn, *args, log=log) as proc:
        try:
            return proc.wait(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"serve {args} did not exit:\n{log.read_text()}") from None


def test_until_empty_runs_what_is_ready_and_leaves_what_is_delayed(
    dsn: str, tmp_path: Path
) -> None:
    query(dsn, LEDGER_DDL)
    ready = enqueue(dsn, "ledger.record", 40)
    later = enqueue(dsn, "ledger.record", 3, run_at="now() + interval '1 hour'")
    # Another app's job in the same queue: not this run's to wait for.
    (other,) = enqueue(dsn, "hello.greet")
    # Released only by its dependency's outcome: the run must look again after writing it.
    (dependent,) = query(
        dsn,
        "INSERT INTO notifyq.jobs (task, depends_on) VALUES ('ledger.record', %s) RETURNING id",
        [ready[-1]],
    )[0]
    assert run_to_end(dsn, tmp_path, "--until-empty", "-c", "4") == 0
    assert sorted(ran(dsn)) == sorted([*ready, dependent])  # each once
    assert statuses(dsn) == {"succeeded": 41, "queued": 4}
    assert {r[0] for r in query(dsn, "SELECT id FROM notifyq.jobs WHERE status = 'queued'")} == (
        {*later, other}
    )


def test_until_empty_on_an_empty_queue_exits_at_once(dsn: str, tmp_path: Path) -> None:
    assert run_to_end(dsn, tmp_path, "--until-empty") == 0
    assert statuses(dsn) == {}


def test_until_empty_waits_for_jobs_a_rate_limit_spreads_out(dsn: str, tmp_path: Path) -> None:
    query(dsn, LEDGER_DDL)
    query(dsn, "INSERT INTO notifyq.rate_limits (rate_key, per_second, burst) VALUES ('api', 5, 1)")
    jobs = enqueue(dsn, "ledger.record", 8, rate_key="'api'")
    assert run_to_end(dsn, tmp_path, "--until-empty") == 0
    assert sorted(ran(dsn)) == sorted(jobs)
    assert statuses(dsn) == {"succeeded": 8}


def test_max_jobs_claims_exactly_that_many(dsn: str, tmp_path: Path) -> None:
    query(dsn, LEDGER_DDL)
    enqueue(dsn, "ledger.record", 25)
    assert run_to_end(dsn, tmp_path, "--max-jobs", "7", "-c", "5") == 0
    assert len(ran(dsn)) == 7
    assert statuses(dsn) == {"succeeded": 7, "queued": 18}


def test_until_empty_cut_short_by_max_jobs_exits_3(dsn: str, tmp_path: Path) -> None:
    query(dsn, LEDGER_DDL)
    enqueue(dsn, "ledger.record", 5)
    assert run_to_end(dsn, tmp_path, "--until-empty", "--max-jobs", "2") == 3
    assert statuses(dsn) == {"succeeded": 2, "queued": 3}


def test_until_empty_that_empties_within_max_jobs_exits_0(dsn: str, tmp_path: Path) -> None:
    query(dsn, LEDGER_DDL)
    enqueue(dsn, "ledger.record", 2)
    assert run_to_end(dsn, tmp_path, "--until-empty", "--max-jobs", "10") == 0
    assert statuses(dsn) == {"succeeded": 2}


def test_max_jobs_lets_its_jobs_finish_past_the_shutdown_grace(dsn: str, tmp_path: Path) -> None:
    query(dsn, LEDGER_DDL)
    (job,) = enqueue(dsn, "ledger.hold")
    log = tmp_path / "serve.log"
    with serve_process(dsn, "--max-jobs", "1", "--shutdown-timeout", "0", log=log) as proc:
        wait_until(lambda: job in started(dsn), message="the held job to start")
        # With a grace of 0, a stop that hurried would hand the job back at once.
        wait_until(lambda: b"claiming no more" in log.read_bytes(), message="claims to stop")
        assert proc.poll() is None
        query(dsn, "INSERT INTO release VALUES (%s)", job)
        assert proc.wait(timeout=EXIT_TIMEOUT) == 0
    assert query(dsn, "SELECT status, attempts FROM notifyq.jobs") == [("succeeded", 1)]


def test_max_runtime_stops_like_sigterm_and_hands_back(dsn: str, tmp_path: Path) -> None:
    query(dsn, LEDGER_DDL)
    (job,) = enqueue(dsn, "ledger.hold")
    code = run_to_end(dsn, tmp_path, "--max-runtime", "1s", "--shutdown-timeout", "0")
    assert code == 0
    assert job in started(dsn)
    # Handed back, not charged: the next run starts it as attempt 1 again.
    assert query(dsn, "SELECT status, attempts FROM notifyq.jobs") == [("queued", 0)]


def test_until_empty_cut_short_by_max_runtime_exits_3(dsn: str, tmp_path: Path) -> None:
    query(dsn, LEDGER_DDL)
    (job,) = enqueue(dsn, "ledger.hold")
    args = ("--until-empty", "--max-runtime", "1", "--shutdown-timeout", "0")
    assert run_to_end(dsn, tmp_path, *args) == 3
    assert job in started(dsn)
    assert statuses(dsn) == {"queued": 1}


def test_bad_one_shot_options_are_refused_before_connecting(tmp_path: Path) -> None:
    def serve(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "notifyq", "serve", "--app", "tests.apps.ledger:app", *args],
            cwd=REPO,
            env={"PATH": "/usr/bin:/bin", "NOTIFYQ_DSN": "postgresql://nobody@127.0.0.1:1/x"},
            capture_output=True,
            text=True,
            timeout=60,
        )

    bad_runtime = serve("--max-runtime", "soon")
    assert bad_runtime.returncode == 2
    assert "Invalid value for '--max-runtime': not a duration: 'soon'" in bad_runtime.stderr
    bad_jobs = serve("--max-jobs", "0")
    assert bad_jobs.returncode == 2
    assert "--max-jobs" in bad_jobs.stderr


def test_settings_refuse_bad_one_shot_limits() -> None:
    with pytest.raises(ConfigurationError, match=r"Settings\.max_jobs must be at least 1"):
        Settings(max_jobs=0)
    with pytest.raises(ConfigurationError, match=r"Settings\.max_runtime must be positive"):
        Settings(max_runtime=0)
