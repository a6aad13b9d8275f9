"""`notifyq watch`: the numbers on screen against a database with known contents, the
narrow layout, --once/--json, a live run in a pseudo-terminal, coalesced refreshes and
a database restart."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from typing import Any

import anyio
import psycopg
from rich.console import Console

from notifyq import store, watch
from tests.conftest import REPO, EmbeddedServer, query, wait_until

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def fill(dsn: str) -> None:
    """Queue 'mail': 3 ready, 2 scheduled, 1 dead; queue 'default': 1 ready."""
    query(
        dsn,
        "INSERT INTO notifyq.jobs (queue, task, run_at) VALUES"
        " ('mail', 'mail.send', now() - interval '200 seconds'),"
        " ('mail', 'mail.send', now()), ('mail', 'mail.send', now()),"
        " ('mail', 'mail.send', now() + interval '1 hour'),"
        " ('mail', 'mail.send', now() + interval '2 hours'),"
        " ('default', 'x.y', now())",
    )
    add_dead(dsn)


def add_dead(dsn: str, queue: str = "mail") -> None:
    query(
        dsn,
        "INSERT INTO notifyq.jobs (queue, task, status, attempts, started_at, finished_at,"
        " last_error) VALUES (%s, 'mail.send', 'dead', 5, now(), now(),"
        " E'SMTPError: relay refused\\n\\nTraceback ...')",
        queue,
    )


def screen(snap: watch.Snapshot, width: int, **console: Any) -> str:
    out = Console(record=True, width=width, **console)
    out.print(watch.render(snap, width))
    return out.export_text(styles=bool(console))


def cells(text: str, first: str) -> dict[str, str]:
    """The queue table's row whose first cell is `first`, by header."""
    lines = [ANSI.sub("", line) for line in text.splitlines()]
    header = next(line for line in lines if line.startswith("queue "))
    row = next(line for line in lines if line.split()[:1] == [first])
    return dict(zip(header.split(), row.split(), strict=True))


def snapshot(dsn: str, model: watch.Model | None = None) -> watch.Snapshot:
    async def take() -> watch.Snapshot:
        st = store.Store(dsn, "watch")
        try:
            return await (model or watch.Model(st)).snapshot()
        finally:
            await st.close()

    return anyio.run(take)


def test_screen_shows_the_numbers_of_each_queue(dsn: str) -> None:
    fill(dsn)
    text = screen(snapshot(dsn), 80)
    assert max(len(line) for line in text.splitlines()) <= 80
    mail = cells(text, "mail")
    assert (mail["ready"], mail["sched"], mail["run"], mail["dead"]) == ("3", "2", "0", "1")
    assert mail["err/1m"] == "1"  # the dead job's last attempt failed this minute
    assert mail["oldest"] == "3m"
    assert cells(text, "default")["ready"] == "1"
    assert "SMTPError: relay refused" in text  # the latest failures, first line only
    assert "Traceback" not in text
    assert "none registered" in text


def test_dead_jobs_appearing_and_an_old_backlog_turn_red(dsn: str) -> None:
    fill(dsn)
    st = store.Store(dsn, "watch")

    async def twice() -> tuple[watch.Snapshot, watch.Snapshot]:
        try:
            model = watch.Model(st, max_age=60)
            first = await model.snapshot()
            await anyio.to_thread.run_sync(add_dead, dsn)
            return first, await model.snapshot()
        finally:
            await st.close()

    first, second = anyio.run(twice)
    mail = {q.queue: q for q in first.queues}["mail"]
    assert "dead" not in mail.alerts  # dead jobs there before watch started: no alarm
    assert "oldest" in mail.alerts  # waited 200 s, over --max-age 60
    mail = {q.queue: q for q in second.queues}["mail"]
    assert "dead" in mail.alerts
    coloured = screen(second, 80, force_terminal=True, color_system="standard")
    assert re.search(r"\x1b\[1;31m\s*2\x1b\[0m", coloured)  # the dead count, bold red
    assert re.search(r"\x1b\[1;31m\s*3m\x1b\[0m", coloured)  # the oldest, over --max-age


def test_running_jobs_longest_first_with_attempt_and_dispatcher(dsn: str) -> None:
    query(
        dsn,
        "INSERT INTO notifyq.jobs (queue, task, status, attempts, started_at, claimed_by,"
        " lease_expires_at) VALUES"
        " ('mail', 'mail.recent', 'running', 1, now() - interval '5 seconds', 'hostb:7:x',"
        "  now() + interval '30 seconds'),"
        " ('mail', 'mail.slow', 'running', 2, now() - interval '90 seconds', 'hosta:42:y',"
        "  now() + interval '30 seconds')",
    )
    snap = snapshot(dsn)
    assert [(r.task, r.attempt, r.claimant) for r in snap.running] == [
        ("mail.slow", 2, "hosta:42:y"),
        ("mail.recent", 1, "hostb:7:x"),
    ]
    lines = screen(snap, 80).splitlines()
    at = lines.index(next(line for line in lines if line.startswith("running longest")))
    slow = next(line for line in lines[at:] if "mail.slow" in line).split()
    assert slow[2:] == ["2", "90s", "-", "hosta:42:y"]  # job, task, try, for, done, on
    assert cells(screen(snap, 80), "mail")["run"] == "2"


def test_narrow_terminal_drops_columns_but_keeps_the_essentials(dsn: str) -> None:
    fill(dsn)
    text = screen(snapshot(dsn), 50)
    assert max(len(line) for line in text.splitlines()) <= 50
    mail = cells(text, "mail")
    assert mail["ready"] == "3" and mail["dead"] == "1" and mail["run"] == "0"
    assert mail["sched"] == "2"
    for dropped in ("jobs/s", "p95", "trend", "ok/1m"):
        assert dropped not in mail


def notifyq(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "notifyq", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "80"},
    )


def test_once_and_json_from_the_command_line(dsn: str) -> None:
    fill(dsn)
    done = notifyq("watch", "--once", "--dsn", dsn)
    assert done.returncode == 0, done.stderr
    assert cells(done.stdout, "mail")["ready"] == "3"
    done = notifyq("watch", "--once", "--json", "--dsn", dsn, "--queue", "mail")
    assert done.returncode == 0, done.stderr
    snap = json.loads(done.stdout)
    assert [q["queue"] for q in snap["queues"]] == ["mail"]
    mail = snap["queues"][0]
    assert (mail["ready"], mail["scheduled"], mail["running"], mail["dead"]) == (3, 2, 0, 1)
    assert snap["failures"][0]["error"] == "SMTPError: relay refused"
    done = notifyq("stats", "--json", "--dsn", dsn)
    assert {q["queue"]: q["ready"] for q in json.loads(done.stdout)["queues"]} == {
        "default": 1,
        "mail": 3,
    }


def read_until(fd: int, pattern: str, seen: list[str], timeout: float = 20) -> str:
    """Read the pty until the screen (ANSI stripped) matches `pattern`."""
    deadline = time.monotonic() + timeout
    regex = re.compile(pattern)
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536).decode(errors="replace")
            except OSError:
                break
            seen.append(ANSI.sub("", chunk))
            if regex.search("".join(seen)[-4000:]):
                return "".join(seen)
    raise AssertionError(f"timed out waiting for {pattern!r}; last output: {''.join(seen)[-800:]}")


def _own_terminal() -> None:
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def test_watch_in_a_terminal_follows_a_change_live_and_quits_on_ctrl_c(dsn: str) -> None:
    query(dsn, "INSERT INTO notifyq.jobs (queue, task) VALUES ('live', 'x.y')")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen(
        # A long fallback interval: only the notification can make the change show up soon.
        [sys.executable, "-m", "notifyq", "watch", "--dsn", dsn, "--interval", "30"],
        cwd=REPO,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**env, "TERM": "xterm-256color"},
        preexec_fn=_own_terminal,  # so Ctrl-C on it sends SIGINT, as in a real terminal
    )
    os.close(slave)
    seen: list[str] = []
    try:
        read_until(master, r"live\s+1\s", seen)
        query(dsn, "UPDATE notifyq.jobs SET status = 'cancelled', finished_at = now()")
        query(
            dsn,
            "INSERT INTO notifyq.jobs (queue, task)"
            " SELECT 'live', 'x.y' FROM generate_series(1, 4)",
        )
        read_until(master, r"live\s+4\s", seen)
        os.write(master, b"\x03")  # Ctrl-C, through the terminal's line discipline
        assert proc.wait(timeout=20) == 0
        rest = []
        while select.select([master], [], [], 0.2)[0]:
            try:
                rest.append(os.read(master, 65536).decode(errors="replace"))
            except OSError:
                break
        assert "Traceback" not in "".join(seen + rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_a_flood_of_notifications_costs_a_few_refreshes_a_second(dsn: str) -> None:
    snaps: list[watch.Snapshot] = []
    stop = threading.Event()

    def flood() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO notifyq.jobs (task) VALUES ('x.y')")
            while not stop.is_set():  # one status notification per statement
                conn.execute("UPDATE notifyq.jobs SET status = 'cancelled', finished_at = now()")
                conn.execute("UPDATE notifyq.jobs SET status = 'queued', finished_at = NULL")

    async def run() -> float:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: watch.follow(dsn, snaps.append, interval=10))
            await anyio.to_thread.run_sync(lambda: wait_until(lambda: snaps, message="a snapshot"))
            started = anyio.current_time()
            thread = threading.Thread(target=flood)
            thread.start()
            await anyio.sleep(3)  # the behaviour under test is a rate over real time
            stop.set()
            await anyio.to_thread.run_sync(thread.join)
            tg.cancel_scope.cancel()
        return anyio.current_time() - started

    elapsed = anyio.run(run)
    refreshes = len(snaps) - 1
    assert 3 <= refreshes <= watch.MAX_REFRESHES * elapsed + 2, refreshes


def test_watch_says_reconnecting_and_recovers_after_a_restart(
    private_server: EmbeddedServer,
) -> None:
    dsn = private_server.dsn
    proc = subprocess.Popen(
        [sys.executable, "-m", "notifyq", "watch", "--json", "--dsn", dsn, "--interval", "0.5"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    states: list[bool] = []

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            states.append(json.loads(line)["connected"])

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        wait_until(lambda: states, message="a first snapshot")
        private_server.restart("fast")
        wait_until(lambda: False in states, message="a reconnecting snapshot")
        wait_until(
            lambda: states[-1] and states.index(False) < len(states) - 1,
            message="a connected snapshot after the restart",
        )
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=20)
        thread.join(timeout=10)
        proc.stdout.close()
    assert code == 0


def test_sql_workers_appear_beside_dispatchers(dsn: str) -> None:
    query(dsn, "INSERT INTO notifyq.jobs (task) VALUES ('t'), ('t')")
    query(dsn, "SELECT * FROM notifyq.claim('report-worker-1', max_jobs => 2)")
    snap = snapshot(dsn)
    (worker,) = snap.dispatchers
    assert (worker.claimant, worker.kind, worker.state) == ("report-worker-1", "sql", "running")
    assert "report-worker-1 (sql)" in screen(snap, 100)
