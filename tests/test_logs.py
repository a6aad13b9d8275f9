"""Logs for machines: `notifyq serve --log-format json` writes one JSON object per line,
and the lines about a job carry its fields (logs.py)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from notifyq.errors import redact
from notifyq.job import Job
from notifyq.logs import JsonFormatter, job_fields
from tests.apps.ledger import LEDGER_DDL
from tests.conftest import REPO, query, serve_process

EXIT_TIMEOUT = 60


def record(message: str, *args: Any, exc_info: Any = None, **extra: Any) -> logging.LogRecord:
    return logging.getLogger("notifyq.test").makeRecord(
        "notifyq.test", logging.INFO, __file__, 1, message, args, exc_info, extra=extra
    )


def test_serve_logs_each_outcome_as_json_with_the_jobs_fields(dsn: str, tmp_path: Path) -> None:
    query(dsn, LEDGER_DDL)
    (ok,) = query(dsn, "INSERT INTO notifyq.jobs (task) VALUES ('ok.record') RETURNING id")[0]
    (retried,) = query(
        dsn, "INSERT INTO notifyq.jobs (task, queue) VALUES ('bad.raise', 'other') RETURNING id"
    )[0]
    (dead,) = query(
        dsn, "INSERT INTO notifyq.jobs (task, max_attempts) VALUES ('bad.raise', 1) RETURNING id"
    )[0]
    log = tmp_path / "serve.log"
    args = ("--log-format", "json", "--until-empty", "--queues", "default,other")
    with serve_process(dsn, *args, app="tests.apps.misbehaving:app", log=log) as proc:
        try:
            assert proc.wait(timeout=EXIT_TIMEOUT) == 0, log.read_text()
        except subprocess.TimeoutExpired:
            raise AssertionError(f"serve did not exit:\n{log.read_text()}") from None
    lines = [json.loads(line) for line in log.read_text().splitlines()]  # every line parses
    assert all({"time", "level", "logger", "event", "message"} <= line.keys() for line in lines)
    by_event = {(line["event"], line.get("job_id")): line for line in lines}
    succeeded = by_event[("job.succeeded", ok)]
    assert succeeded["task"] == "ok.record" and succeeded["queue"] == "default"
    assert succeeded["attempt"] == 1 and succeeded["outcome"] == "succeeded"
    assert isinstance(succeeded["duration"], float) and succeeded["duration"] >= 0
    assert succeeded["level"] == "debug"  # serve_process asks for debug
    assert by_event[("job.claimed", ok)]["task"] == "ok.record"
    again = by_event[("job.retried", retried)]
    assert (again["queue"], again["outcome"], again["level"]) == ("other", "retried", "info")
    assert "the handler failed on purpose" in again["message"]
    gone = by_event[("job.dead", dead)]
    assert (gone["outcome"], gone["level"], gone["attempt"]) == ("dead", "warning", 1)
    # Lines about no job name their message template, which stays the same run to run.
    assert any(line["event"].startswith("stopping: ") for line in lines if "job_id" not in line)


def test_lines_a_handler_logs_carry_its_job_sync_or_async(dsn: str, tmp_path: Path) -> None:
    """The handler's own `logging` lines, in the event loop (async) or a worker thread
    (sync), get job_id, task, queue and attempt from the attempt's context (logs.py)."""
    in_thread, in_loop = chatty_jobs(dsn)
    json_log, text_log = tmp_path / "json.log", tmp_path / "text.log"
    args = ("--until-empty", "--queues", "default,loud")
    with serve_process(dsn, "--log-format", "json", *args, app=APP, log=json_log) as proc:
        assert proc.wait(timeout=EXIT_TIMEOUT) == 0, json_log.read_text()
    lines = [json.loads(line) for line in json_log.read_text().splitlines()]
    said = {line["message"]: line for line in lines if line["logger"] == "tests.chatty"}
    assert said["sync handler says 1"] | {"time": None} == {
        "time": None,
        "level": "info",
        "logger": "tests.chatty",
        "event": "sync handler says %s",
        "message": "sync handler says 1",
        "job_id": in_thread,
        "task": "chatty.sync",
        "queue": "default",
        "attempt": 1,
    }
    loop_line = said["async handler says 2"]
    assert (loop_line["job_id"], loop_line["task"]) == (in_loop, "chatty.async")
    assert (loop_line["queue"], loop_line["attempt"]) == ("loud", 1)
    # Once the attempt is over, the context is gone: lines about no job have no job_id.
    assert any(line["event"].startswith("stopping: ") and "job_id" not in line for line in lines)

    in_thread, in_loop = chatty_jobs(dsn)
    with serve_process(dsn, *args, app=APP, log=text_log) as proc:
        assert proc.wait(timeout=EXIT_TIMEOUT) == 0, text_log.read_text()
    text = text_log.read_text()
    assert f" tests.chatty job={in_thread}: sync handler says 1\n" in text
    assert f" tests.chatty job={in_loop}: async handler says 2\n" in text
    assert " job=" not in "".join(line for line in text.splitlines() if "stopping: " in line)


APP = "tests.apps.chatty:app"


def chatty_jobs(dsn: str) -> tuple[int, int]:
    """A job for the sync handler (queue default), one for the async one (queue loud)."""
    rows = query(
        dsn,
        """INSERT INTO notifyq.jobs (task, queue, payload)
        VALUES ('chatty.sync', 'default', '{"n": 1}'), ('chatty.async', 'loud', '{"n": 2}')
        RETURNING id""",
    )
    return rows[0][0], rows[1][0]


def test_the_json_formatter_redacts_passwords_before_encoding() -> None:
    formatter = JsonFormatter(clean=lambda text: redact(text, {'se"cret'}))
    line = json.loads(
        formatter.format(record("connecting to %s", 'postgresql://u:se"cret@host/db'))
    )
    assert 'se"cret' not in json.dumps(line)
    assert line["message"] == "connecting to postgresql://u:***@host/db"
    assert line["event"] == "connecting to %s"


def test_the_json_formatter_keeps_a_traceback_and_survives_odd_fields() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = record("failed", exc_info=sys.exc_info(), task=object())
    line = json.loads(JsonFormatter().format(rec))
    assert "ValueError: boom" in line["error"] and "Traceback" in line["error"]
    assert line["task"].startswith("<object object")


def test_job_fields_name_the_attempt() -> None:
    job = Job(7, "mail", "mail.send", {}, 2, 5)
    assert job_fields(job, "job.claimed") == {
        "event": "job.claimed",
        "job_id": 7,
        "task": "mail.send",
        "queue": "mail",
        "attempt": 2,
    }


def test_the_commands_own_warnings_and_errors_are_json_lines_too() -> None:
    """fail() and warn() (cli/common.py) print to stderr as before, but under
    --log-format json as JSON objects like every other line, the password redacted."""
    result = subprocess.run(
        [
            *(sys.executable, "-m", "notifyq", "--log-format", "json", "--log-level", "error"),
            *("serve", "--app", "no_such_module:app"),
            *("--dsn", "postgresql://u:hunter2@127.0.0.1:1/x"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT,
    )
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    lines = [json.loads(line) for line in result.stderr.splitlines()]  # every line parses
    # The warning is shown under --log-level error: these lines are the command's answer.
    warning, error = lines
    assert (warning["level"], warning["event"], warning["logger"]) == (
        "warning",
        "cli.warning",
        "notifyq.cli",
    )
    assert "the password in --dsn is visible" in warning["message"]
    assert (error["level"], error["event"]) == ("error", "cli.error")
    assert error["message"].startswith("cannot import 'no_such_module'")
    assert {"time", "level", "logger", "event", "message"} <= error.keys()
    assert "hunter2" not in result.stderr
