"""The command line's rough edges (issue 15): bad arguments are usage errors found
before anything connects, an app that fails to import shows its own frames, a
payload of the wrong shape is flagged, `cap` (and `limit`) show one queue, the
metrics endpoint binds loopback and fails early, and `jobs show` gives every
failed attempt its error."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import Any, TypedDict

import psutil
import pytest

import notifyq
from notifyq.cli import payload
from notifyq.cli.jobs import attempt_errors
from tests.apps.ledger import LEDGER_DDL
from tests.conftest import REPO, query, serve_process, statuses, wait_until
from tests.test_cli import notifyq as notifyq_cli


def offline(tmp_path: Path) -> dict[str, str]:
    """No DSN anywhere, and a private server's data directory that does not exist yet:
    whatever connects or starts the private server leaves it behind."""
    return {"NOTIFYQ_DSN": "", "NOTIFYQ_DATA_DIR": str(tmp_path / "pgdata")}


SERVE = ["serve", "--app", "examples.hello:app"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["enqueue", "bad task!"], "Invalid value for 'TASK': invalid task name 'bad task!'"),
        (["enqueue", "t", "--priority", "5000"], "Invalid value for '--priority': 5000"),
        (["enqueue", "t", "--max-attempts", "0"], "Invalid value for '--max-attempts': 0"),
        (
            ["enqueue", "t", "--queue=-x"],
            "Invalid value for '--queue': invalid queue name '-x': it starts with '-'",
        ),
        (
            ["enqueue", "t", "--queue", "Pdf"],
            "invalid queue name 'Pdf': 'P' not allowed (lower case only)",
        ),
        (["enqueue", "t", "{bad"], "Invalid value for '[PAYLOAD]': not valid JSON"),
        (["retry"], "give either a job ID or --dead"),
        (["retry", "7", "--queue", "q"], "--queue, --task and --tag go with --dead"),
        (["limit", "slow", "-1"], "the cap must be a whole number of jobs"),
        (["cap", "slow", "lots"], "not 'lots'"),
        (["cap", "slow", "1000001"], "from 0 (pauses the queue) to 1,000,000, or 'none'"),
        (["cap", "slow", "\u00b2"], "not '\u00b2'"),  # isdigit() says yes, int() no
        (["cap", "slow", "--", "--1"], "not '--1'"),
        (["stats", "--queue", "Pdf"], "Invalid value for '--queue': invalid queue name 'Pdf'"),
        (["watch", "--queue", "ok", "--queue=-x"], "invalid queue name '-x': it starts"),
        (["jobs", "list", "--task", "a b"], "Invalid value for '--task': invalid task name"),
        (["retry", "--dead", "--task", "a b"], "Invalid value for '--task': invalid task name"),
        (["enqueue", "t", "--app", "examples.hello"], "Invalid value for '--app': must look"),
        (["serve", "--app", "examples.hello:"], "Invalid value for '--app': must look like"),
        (["events", "on"], "name the queue: notifyq events on QUEUE"),
        (["purge", "--older-than", "soon"], "Invalid value for '--older-than': not a duration"),
        (
            [*SERVE, "--concurrency", "0"],
            "Invalid value for '--concurrency' / '-c': must be from 1 to 10000, not 0",
        ),
        ([*SERVE, "--batch-size", "5000"], "Invalid value for '--batch-size': must be from 1"),
        ([*SERVE, "--lease", "0.5"], "Invalid value for '--lease': must be at least 1 second"),
        ([*SERVE, "--queues=a,-x"], "Invalid value for '--queues' / '-q': invalid queue name"),
        ([*SERVE, "--queues", ","], "Invalid value for '--queues' / '-q': must name at least"),
        ([*SERVE, "--metrics-port", "70000"], "Invalid value for '--metrics-port': must be"),
        ([*SERVE, "--retain-dead", "soon"], "Invalid value for '--retain-dead': not a duration"),
    ],
)
def test_bad_arguments_are_usage_errors_before_anything_starts(
    tmp_path: Path, args: list[str], message: str
) -> None:
    done = notifyq_cli(*args, env=offline(tmp_path))
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert done.stderr.startswith("Usage: ")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "pgdata").exists()  # the private server was not started


def test_an_app_that_raises_on_import_shows_its_own_frames(tmp_path: Path) -> None:
    (tmp_path / "brokenapp.py").write_text(
        "import notifyq\n"
        "app = notifyq.App()\n"
        "def settings():\n"
        "    return {'a': 1}['b']\n"
        "LIMIT = settings()\n"
    )
    (tmp_path / "typoapp.py").write_text("import notifyq\napp = notifyq.App(\n")
    env = {**offline(tmp_path), "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}

    broken = notifyq_cli("serve", "--app", "brokenapp:app", env=env)
    assert broken.returncode == 1
    lines = broken.stderr.splitlines()
    assert lines[0] == "notifyq: error: importing 'brokenapp' for --app raised KeyError: 'b'"
    assert lines[1] == "Traceback (the app's frames, most recent call last):"
    assert f'  File "{tmp_path / "brokenapp.py"}", line 5, in <module>' in lines
    assert f'  File "{tmp_path / "brokenapp.py"}", line 4, in settings' in lines
    assert lines[-1] == "KeyError: 'b'"
    for machinery in ("importlib", "click", "notifyq/cli"):
        assert machinery not in broken.stderr
    assert len(lines) < 12

    typo = notifyq_cli("serve", "--app", "typoapp:app", env=env)
    assert typo.returncode == 1
    assert typo.stderr.startswith(
        "notifyq: error: importing 'typoapp' for --app raised SyntaxError"
    )
    assert f'File "{tmp_path / "typoapp.py"}", line 2' in typo.stderr
    assert "importlib" not in typo.stderr


def test_a_payload_that_is_no_object_is_warned_about_or_refused(dsn: str) -> None:
    warned = notifyq_cli("enqueue", "hello.greet", "[1,2]", "--dsn", dsn)
    assert warned.returncode == 0, warned.stderr
    assert warned.stderr.startswith(
        "notifyq: warning: PAYLOAD is a JSON array, not an object: handlers usually take an object"
    )
    assert "give --app MODULE:ATTR" in warned.stderr
    assert query(dsn, "SELECT payload FROM notifyq.jobs") == [([1, 2],)]

    # With the app, hello.greet's `payload: dict[str, str]` rules an array out.
    app = ("--app", "examples.hello:app", "--dsn", dsn)
    refused = notifyq_cli("enqueue", "hello.greet", "[1,2]", *app)
    assert refused.returncode == 2
    assert (
        "Invalid value for '[PAYLOAD]': the handler of hello.greet takes a JSON object "
        "(its annotation), not array" in refused.stderr
    )
    fine = notifyq_cli("enqueue", "hello.greet", '{"name": "Ada"}', *app)
    assert fine.returncode == 0 and fine.stderr == ""
    assert query(dsn, "SELECT count(*) FROM notifyq.jobs") == [(2,)]


def test_enqueue_with_app_takes_the_tasks_queue_and_max_attempts(dsn: str, tmp_path: Path) -> None:
    (tmp_path / "reportsapp.py").write_text(
        "import notifyq\n"
        "app = notifyq.App()\n"
        "@app.task(name='report.build', queue='reports', max_attempts=2)\n"
        "def build(payload: dict[str, int]) -> None: ...\n"
    )
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    app = ("--app", "reportsapp:app", "--dsn", dsn)
    assert notifyq_cli("enqueue", "report.build", *app, env=env).returncode == 0
    given = ("--queue", "urgent", "--max-attempts", "9")
    assert notifyq_cli("enqueue", "report.build", *given, *app, env=env).returncode == 0
    assert notifyq_cli("enqueue", "report.build", "--dsn", dsn).returncode == 0  # no --app
    assert query(dsn, "SELECT queue, max_attempts FROM notifyq.jobs ORDER BY id") == [
        ("reports", 2),
        ("urgent", 9),
        ("default", None),
    ]


class Greeting(TypedDict):
    name: str


def test_the_payload_check_reads_the_handlers_annotation() -> None:
    app = notifyq.App("postgresql://unused")

    @app.task(name="t.typed")
    def typed(p: Greeting) -> None: ...

    @app.task(name="t.items")
    def items(p: list[int] | None) -> None: ...

    @app.task(name="t.bare")
    def bare(p, ctx):  # type: ignore[no-untyped-def]
        ...

    @app.task(name="t.anything")
    def anything(p: Any) -> None: ...

    with pytest.raises(ValueError, match="takes a JSON object"):
        payload.check("t.typed", "text", app)
    assert payload.check("t.typed", {"name": "Ada"}, app) is None
    assert payload.check("t.items", [1], app) is None
    assert payload.check("t.items", None, app) is None
    with pytest.raises(ValueError, match="takes a JSON array or null"):
        payload.check("t.items", {"a": 1}, app)
    for unknown in ("t.bare", "t.anything"):
        assert payload.check(unknown, {}, app) is None
        assert "no annotation that says it takes one" in (payload.check(unknown, 3, app) or "")
    assert "registers no task 't.other'" in (payload.check("t.other", {}, app) or "")
    assert payload.check("t.typed", {}, None) is None
    assert "JSON string, not an object" in (payload.check("t.typed", "x", None) or "")


def test_cap_shows_one_queue_and_limit_is_its_older_name(dsn: str) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return notifyq_cli(*args, "--dsn", dsn)

    assert cli("cap", "slow").stdout == "slow: no cap\n"
    assert cli("cap", "slow", "2").stdout == "slow: at most 2 running (0 now)\n"
    assert cli("limit", "slow").stdout == "slow: at most 2 running (0 now)\n"
    assert cli("limit", "fast", "0").stdout == "fast: at most 0 running (0 now)\n"
    assert cli("cap").stdout == (
        "fast: at most 0 running (0 now)\nslow: at most 2 running (0 now)\n"
    )
    assert cli("cap", "slow", "none").stdout == "slow: no cap\n"
    listed = notifyq_cli("--help").stdout
    assert "cap      Show the concurrency caps" in listed
    assert "limit    Same as `notifyq cap` (its older name)." in listed
    # limit's help is cap's, paragraphs and all, not cap's docstring with its indentation.
    assert notifyq_cli("limit", "--help").stdout.split("Options:")[0] == (
        notifyq_cli("cap", "--help")
        .stdout.split("Options:")[0]
        .replace("notifyq cap", "notifyq limit")
        .replace("\n\n", "\n\n  Same as `notifyq cap` (its older name).\n\n", 1)
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening_on(pid: int, port: int) -> list[str]:
    return [
        c.laddr.ip
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]


def test_metrics_bind_loopback_by_default_and_a_taken_port_fails_first(
    dsn: str, tmp_path: Path
) -> None:
    query(dsn, LEDGER_DDL)
    port = free_port()
    log = tmp_path / "serve.log"
    with serve_process(dsn, "--metrics-port", str(port), log=log) as proc:
        ips = wait_until(lambda: listening_on(proc.pid, port), message="the metrics port")
        assert ips == ["127.0.0.1"]
        wait_until(
            lambda: f"metrics on http://127.0.0.1:{port}/metrics" in log.read_text(),
            message="the metrics line",
        )

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with serve_process(dsn, "--metrics-port", str(port), log=log) as proc:
            assert proc.wait(timeout=60) == 1
    text = log.read_text()
    assert (
        f"notifyq: error: cannot serve metrics on 127.0.0.1:{port} (--metrics-port {port}, "
        "--metrics-host 127.0.0.1): the port is taken by another process"
    ) in text
    assert "serving queues=" not in text


def test_jobs_show_gives_each_failed_attempt_its_error(dsn: str, tmp_path: Path) -> None:
    query(dsn, LEDGER_DDL)
    (job_id,) = query(dsn, "INSERT INTO notifyq.jobs (task) VALUES ('bad.raise') RETURNING id")[0]
    with serve_process(dsn, app="tests.apps.misbehaving:app", log=tmp_path / "serve.log"):
        wait_until(lambda: statuses(dsn) == {"dead": 1}, message="both attempts to fail")
    shown = notifyq_cli("jobs", "show", str(job_id), "--dsn", dsn).stdout
    failures = [
        line for line in shown.splitlines() if "running -> queued" in line or "-> dead" in line
    ]
    assert len(failures) == 2
    for line in failures:
        assert line.endswith("RuntimeError: the handler failed on purpose"), shown


def test_attempt_errors_repeat_an_unchanged_error_but_not_for_a_hand_back() -> None:
    def row(frm: str | None, to: str, attempt: int, error: str | None = None) -> dict[str, Any]:
        return {"from_status": frm, "to_status": to, "attempt": attempt, "error": error}

    history = [
        row(None, "queued", 0),
        row("queued", "running", 1),
        row("running", "queued", 1, "E: boom"),
        row("queued", "running", 2),
        row("running", "queued", 2),  # failed the same way: the history recorded no error
        row("queued", "running", 3),
        row("running", "queued", 2),  # handed back at shutdown: the attempt was not counted
        row("queued", "running", 3),
        row("running", "dead", 3),
    ]
    assert attempt_errors(history) == [
        None,
        None,
        "E: boom",
        None,
        "E: boom",
        None,
        None,
        None,
        "E: boom",
    ]
