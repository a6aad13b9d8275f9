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
from collections.abc import Sequence
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


def screen(snap: watch.Snapshot, width: int, height: int | None = None, **console: Any) -> str:
    out = Console(record=True, width=width, **console)
    out.print(watch.render(snap, width, height))
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
    assert (mail["ready"], mail["scheduled"], mail["running"], mail["dead"]) == ("3", "2", "0", "1")
    assert mail["failed_1m"] == "1"  # the dead job's last attempt failed this minute
    assert mail["oldest_ready"] == "3m"
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
    assert slow[2:] == ["2", "90s", "-", "hosta:42:y"]  # id, task, attempt, running_for,
    # progress, claimant
    assert cells(screen(snap, 80), "mail")["running"] == "2"


def test_narrow_terminal_drops_columns_but_keeps_the_essentials(dsn: str) -> None:
    fill(dsn)
    text = screen(snapshot(dsn), 50)
    assert max(len(line) for line in text.splitlines()) <= 50
    mail = cells(text, "mail")
    assert mail["ready"] == "3" and mail["dead"] == "1" and mail["running"] == "0"
    assert mail["oldest_ready"] == "3m"
    for dropped in ("rate", "p95", "trend", "succeeded_1m"):
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


LONG_ERROR = "RuntimeError: upstream https://api.example.com/v2/" + "very/long/path/" * 10 + " 503"


def add_failures(dsn: str, n: int, error: str = LONG_ERROR) -> list[int]:
    rows = query(
        dsn,
        "INSERT INTO notifyq.jobs (queue, task, status, attempts, started_at, finished_at,"
        " last_error) SELECT 'mail', 'mail.send', 'dead', 3, now(), now(), %s"
        " FROM generate_series(1, %s) RETURNING id",
        error,
        n,
    )
    return [r[0] for r in rows]


def failure_rows(text: str) -> list[list[str]]:
    lines = text.splitlines()
    at = lines.index("latest failures")
    header = lines[at + 1].split()
    assert header[0] == "id" and "attempt" in header, header
    return [line.split() for line in lines[at + 3 :] if line.strip()]


def test_a_long_error_is_cut_and_the_job_id_and_attempt_stay(dsn: str) -> None:
    ids = add_failures(dsn, 2)
    query(dsn, "UPDATE notifyq.jobs SET last_error = 'short' WHERE id = %s", ids[0])
    snap = snapshot(dsn)
    for width in (120, 80, 70, 50):
        text = screen(snap, width)
        assert max(len(line) for line in text.splitlines()) <= width, width
        rows = failure_rows(text[text.index("latest failures") :])
        # Each row starts with the whole job id and has the attempt.
        assert sorted(int(r[0]) for r in rows) == ids, (width, rows)
        long_row = next(r for r in rows if int(r[0]) == ids[1])
        assert "3" in long_row[1:4], (width, long_row)
        assert long_row[-1].endswith("…"), (width, long_row)  # the error, cut
        assert "RuntimeError:" in " ".join(long_row), width


def test_the_frame_fits_the_terminal_and_says_what_it_left_out(dsn: str) -> None:
    query(
        dsn,
        "INSERT INTO notifyq.jobs (queue, task)"
        " SELECT 'q' || g, 'x.y' FROM generate_series(1, 3) AS g",
    )
    query(
        dsn,
        "INSERT INTO notifyq.jobs (queue, task, status, attempts, started_at, claimed_by,"
        " lease_expires_at) SELECT 'mail', 'mail.slow', 'running', 1, now(), 'h:1:x',"
        " now() + interval '1 hour' FROM generate_series(1, 5)",
    )
    add_failures(dsn, 5)
    snap = snapshot(dsn)
    text = screen(snap, 70, height=40)
    assert "not shown" not in text and "left out" not in text  # room for everything
    assert len(failure_rows(text)) == 5

    lines = screen(snap, 70, height=20).splitlines()
    assert len(lines) <= 20
    assert max(len(line) for line in lines) <= 70
    # The failures come before the jobs running longest; what did not fit is named.
    assert "latest failures" in lines
    assert lines[-1] == "not shown: running longest", lines
    shown = len(failure_rows("\n".join(lines[:-2])))
    assert lines[-2] == f"… {5 - shown} more rows not shown", lines
    assert 1 <= shown < 5

    lines = screen(snap, 70, height=12).splitlines()
    assert len(lines) <= 12
    assert lines[-1] == "not shown: dispatchers, running longest, latest failures", lines
    assert cells("\n".join(lines), "q3")["ready"] == "1"  # every queue still shows


def test_a_dispatcher_has_one_name_and_counts_its_running_jobs_from_the_jobs_table(
    dsn: str,
) -> None:
    claimant = "vm:22156:d3feb4ff"
    # The registry says 0 running (its last heartbeat's count); the jobs table says 2.
    query(
        dsn,
        "INSERT INTO notifyq.dispatchers (claimant, host, pid, queues, concurrency, running,"
        " heartbeat) VALUES (%s, 'vm', 22156, '{mail}', 10, 0, 3600)",
        claimant,
    )
    query(
        dsn,
        "INSERT INTO notifyq.jobs (queue, task, status, attempts, started_at, claimed_by,"
        " lease_expires_at) SELECT 'mail', 'mail.slow', 'running', 1, now(), %s,"
        " now() + interval '1 hour' FROM generate_series(1, 2)",
        claimant,
    )
    snap = snapshot(dsn)
    (d,) = snap.dispatchers
    assert (d.claimant, d.running) == (claimant, 2)
    text = screen(snap, 100)
    lines = text.splitlines()
    row = next(line for line in lines if line.startswith(claimant))
    assert row.split()[:3] == [claimant, "running", "2/10"]
    running = [line for line in lines if "mail.slow" in line]
    assert len(running) == 2 and all(line.split()[-1] == claimant for line in running)
    assert "vm:22156 " not in text  # no second, shorter name


def test_queue_option_rejects_an_invalid_name_and_notes_an_unknown_queue(dsn: str) -> None:
    done = notifyq("watch", "--once", "--dsn", dsn, "--queue", "Mail Queue")
    assert done.returncode == 2, done
    assert "--queue" in done.stderr and "a-z, 0-9, '_' and '-'" in done.stderr, done.stderr
    fill(dsn)
    done = notifyq("watch", "--once", "--dsn", dsn, "--queue", "mial", "--queue", "mail")
    assert done.returncode == 0, done.stderr
    assert "queue 'mial' has no jobs and no dispatcher serving it" in done.stdout
    assert "queue 'mail'" not in done.stdout  # it has jobs: its numbers say enough
    # stats takes the same --queue: checked the same way, noted the same way.
    done = notifyq("stats", "--dsn", dsn, "--queue", "Mail Queue")
    assert done.returncode == 2 and "a-z, 0-9, '_' and '-'" in done.stderr, done
    done = notifyq("stats", "--dsn", dsn, "--queue", "mial", "--queue", "mail")
    assert done.returncode == 0, done.stderr
    assert "queue 'mial' has no jobs and no dispatcher serving it" in done.stdout
    assert "queue 'mail'" not in done.stdout
    # A served queue with nothing in it is just idle.
    query(
        dsn,
        "INSERT INTO notifyq.dispatchers (claimant, host, pid, queues, concurrency, heartbeat)"
        " VALUES ('h:1:x', 'h', 1, '{idle}', 1, 3600)",
    )
    done = notifyq("watch", "--once", "--dsn", dsn, "--queue", "idle")
    assert done.returncode == 0, done.stderr
    assert "has no jobs" not in done.stdout
    assert cells(done.stdout, "idle")["ready"] == "0"


def test_table_headings_are_the_json_keys(dsn: str) -> None:
    fill(dsn)
    query(
        dsn,
        "INSERT INTO notifyq.jobs (queue, task, status, attempts, started_at, claimed_by,"
        " lease_expires_at) VALUES ('mail', 'mail.slow', 'running', 1, now(), 'h:1:x',"
        " now() + interval '1 hour')",
    )
    query(
        dsn,
        "INSERT INTO notifyq.dispatchers (claimant, host, pid, queues, concurrency, heartbeat)"
        " VALUES ('h:1:x', 'h', 1, '{mail}', 1, 3600)",
    )
    done = notifyq("watch", "--once", "--json", "--dsn", dsn)
    assert done.returncode == 0, done.stderr
    snap = json.loads(done.stdout)
    tables: dict[str, Sequence[watch.Column[Any]]] = {
        "queues": watch.QUEUE_COLUMNS,
        "dispatchers": watch.DISPATCHER_COLUMNS,
        "running": watch.RUNNING_COLUMNS,
        "failures": watch.FAILURE_COLUMNS,
    }
    for key, columns in tables.items():
        assert snap[key], key
        headings = {c.header for c in columns}
        assert headings <= set(snap[key][0]), (key, headings - set(snap[key][0]))
    wide = [" ".join(line.split()) for line in screen(snapshot(dsn), 200).splitlines()]
    for columns in tables.values():  # at 200 columns, every column shows
        assert " ".join(c.header for c in columns) in wide
    # The keys scripts read before the headings changed are all still there.
    assert {"rate", "failed_1m", "succeeded_1m", "oldest_ready"} <= set(snap["queues"][0])
    assert {"claimant", "running", "concurrency", "silent"} <= set(snap["dispatchers"][0])


def read_raw_until(fd: int, needle: str, seen: list[str], timeout: float = 20) -> str:
    """Read the pty until its raw output (escape sequences kept) contains `needle`."""
    deadline = time.monotonic() + timeout
    while needle not in "".join(seen) and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.2)[0]:
            seen.append(os.read(fd, 65536).decode(errors="replace"))
    if needle in "".join(seen):
        return "".join(seen)
    raise AssertionError(f"timed out waiting for {needle!r}; last output: {''.join(seen)[-800:]}")


def test_a_resize_redraws_the_whole_screen_at_the_new_size(dsn: str) -> None:
    fill(dsn)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen(
        # No refresh for 30 s and no change to notify: only the resize can redraw.
        [sys.executable, "-m", "notifyq", "watch", "--dsn", dsn, "--interval", "30"],
        cwd=REPO,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**env, "TERM": "xterm-256color"},
        preexec_fn=_own_terminal,
    )
    os.close(slave)
    seen: list[str] = []
    clear = "\x1b[2J"
    try:
        first = read_raw_until(master, "SMTPError", seen)
        assert "succeeded_1m" in ANSI.sub("", first)  # 120 columns: every column
        assert clear not in first
        # The kernel sends SIGWINCH to the terminal's foreground process group.
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 20, 60, 0, 0))
        raw = read_raw_until(master, clear, seen)
        redrawn = raw[raw.rindex(clear) :]
        redrawn = read_raw_until(master, "SMTPError", [redrawn])
        lines = [ANSI.sub("", line) for line in redrawn.split("\n")]
        assert "refresh #1" in lines[0]  # the same snapshot, drawn again, not a refresh
        assert "succeeded_1m" not in redrawn  # laid out for 60 columns
        assert all(len(line.rstrip()) <= 60 for line in lines), lines
        assert cells("\n".join(lines), "mail")["ready"] == "3"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            os.close(master)
