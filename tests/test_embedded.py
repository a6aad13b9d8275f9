"""The private PostgreSQL's users (embedded.py): every notifyq command that starts or joins
the server leaves the list of its users when it ends, whatever ended it (bar SIGKILL, whose
entry the next command prunes), and the last one to leave stops the server.

Real commands (`notifyq watch`, `serve`, `stats`) with no DSN, each test in a data directory
of its own; a fresh directory costs an initdb and a server start (about a second).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from notifyq import embedded
from tests.conftest import REPO, query, wait_until


@dataclass(frozen=True)
class Server:
    pid: int
    socket: Path


def _no_core_dumps() -> None:
    # SIGQUIT's default action dumps core; the test wants the exit, not the file.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


class Private:
    """A data directory of the test's own, and the notifyq commands started on it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.directory = root / "pgdata"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFYQ_")}
        self.env |= {"NOTIFYQ_DATA_DIR": str(self.directory), "PYTHONPATH": str(REPO)}
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with (
            open(self.root / f"{name}.out", "wb") as out,
            open(self.root / f"{name}.log", "wb") as err,
        ):
            proc = subprocess.Popen(
                [sys.executable, "-m", "notifyq", *args],
                cwd=REPO,
                env=self.env,
                stdout=out,
                stderr=err,
                preexec_fn=_no_core_dumps,
            )
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def watch(self, name: str = "watch") -> subprocess.Popen[bytes]:
        """`notifyq watch --json`, once it printed its first snapshot (the server is up)."""
        proc = self.spawn(name, "watch", "--json", "--interval", "60")
        wait_until(
            lambda: (self.root / f"{name}.out").read_bytes() or proc.poll() is not None,
            timeout=60,
            message=f"{name}'s first snapshot",
        )
        assert proc.poll() is None, self.log(name)
        return proc

    def serve(self, *args: str, name: str = "serve") -> subprocess.Popen[bytes]:
        """`notifyq serve` of tests.apps.idle, once it serves."""
        proc = self.spawn(name, "serve", "--app", "tests.apps.idle:app", *args)
        wait_until(
            lambda: "serving queues=" in self.log(name) or proc.poll() is not None,
            timeout=60,
            message=f"{name} to serve",
        )
        assert proc.poll() is None, self.log(name)
        return proc

    def server(self) -> Server:
        lines = (self.directory / "postmaster.pid").read_text().splitlines()
        assert lines[7].strip() == "ready"
        return Server(int(lines[0]), Path(lines[4].strip()) / f".s.PGSQL.{lines[3].strip()}")

    def dsn(self) -> str:
        dsn = embedded.running_dsn(self.directory)
        assert dsn is not None
        return dsn

    def running(self, server: Server) -> bool:
        return alive(server.pid) and server.socket.exists()

    def wait_stopped(self, server: Server, timeout: float = 30.0) -> None:
        wait_until(
            lambda: (
                not alive(server.pid)
                and not server.socket.exists()
                and not (self.directory / "postmaster.pid").exists()
            ),
            timeout=timeout,
            message="the private server to stop",
        )

    def users(self) -> list[int]:
        """The pids in the users file (beside the data directory), live or not."""
        path = self.directory.with_name(self.directory.name + ".users")
        if not path.exists():
            return []
        return [int(line.split()[0]) for line in path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
        try:
            pid = int((self.directory / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        if alive(pid):  # a test that failed left it running
            os.kill(pid, signal.SIGINT)
            wait_until(lambda: not alive(pid), timeout=60, message="the left-over server to stop")


@pytest.fixture
def private(tmp_path: Path) -> Iterator[Private]:
    p = Private(tmp_path)
    try:
        yield p
    finally:
        p.close()


@pytest.mark.parametrize(
    ("signum", "status"),
    [
        (signal.SIGTERM, -signal.SIGTERM),
        (signal.SIGHUP, -signal.SIGHUP),  # the terminal was closed
        (signal.SIGQUIT, -signal.SIGQUIT),
        (signal.SIGINT, 0),  # Ctrl-C: watch quits normally
    ],
    ids=lambda v: v.name if isinstance(v, signal.Signals) else str(v),
)
def test_a_signal_to_the_only_user_stops_the_server(
    private: Private, signum: signal.Signals, status: int
) -> None:
    proc = private.watch()
    server = private.server()
    proc.send_signal(signum)
    # The exit status is still the signal's: the handler leaves, then dies of it.
    assert proc.wait(timeout=30) == status, private.log("watch")
    private.wait_stopped(server)
    assert private.users() == []


def test_serve_ended_by_sighup_stops_the_server(private: Private) -> None:
    # Serve owns SIGTERM and SIGINT while it runs (a graceful drain); SIGHUP is not one.
    proc = private.serve()
    server = private.server()
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=30) == -signal.SIGHUP, private.log("serve")
    private.wait_stopped(server)
    assert private.users() == []


def test_serve_ended_by_a_second_signal_stops_the_server(private: Private) -> None:
    proc = private.serve("--shutdown-timeout", "600")
    server = private.server()
    dsn = private.dsn()
    query(dsn, "INSERT INTO notifyq.jobs (task) VALUES ('idle.nap')")
    wait_until(
        lambda: query(dsn, "SELECT status FROM notifyq.jobs") == [("running",)],
        message="the nap to run",
    )
    proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "shutting down gracefully" in private.log("serve"), message="the drain")
    proc.send_signal(signal.SIGTERM)  # "again to exit at once": os._exit, no finally
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM, private.log("serve")
    private.wait_stopped(server)
    assert private.users() == []


def test_the_server_stays_up_for_a_second_user_and_stops_with_it(private: Private) -> None:
    first = private.watch()
    server = private.server()
    second = private.serve()
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=30) == -signal.SIGTERM
    # The first left before it died: had it stopped the server, that would show by now.
    assert private.running(server)
    assert second.poll() is None
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=60) == 0, private.log("serve")
    private.wait_stopped(server)
    assert private.users() == []


def test_a_killed_user_is_pruned_by_the_next_command(private: Private) -> None:
    first = private.watch()
    server = private.server()
    first.kill()  # SIGKILL: it cannot leave
    first.wait(timeout=30)
    assert private.running(server)
    result = private.spawn("stats", "stats", "--json")
    assert result.wait(timeout=60) == 0, private.log("stats")
    # `stats` found the killed user dead, so it was the last user when it exited.
    private.wait_stopped(server)
    assert private.users() == []


def test_a_killed_user_is_pruned_by_the_last_user_leaving(private: Private) -> None:
    first = private.watch("first")
    server = private.server()
    second = private.watch("second")
    first.kill()
    first.wait(timeout=30)
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=30) == -signal.SIGTERM
    private.wait_stopped(server)
    assert private.users() == []


def test_a_reused_pid_is_not_taken_for_a_user(private: Private) -> None:
    proc = private.watch()
    server = private.server()
    # A user that died without leaving, whose pid the kernel has since given to another
    # process (this test's): same pid, another start time.
    users = private.directory.with_name(private.directory.name + ".users")
    with users.open("a") as f:
        f.write(f"{os.getpid()} 1\n")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM
    private.wait_stopped(server)
    assert private.users() == []


@pytest.mark.parametrize(
    ("signum", "statuses"),
    [
        (signal.SIGTERM, {-signal.SIGTERM}),
        # KeyboardInterrupt: from the start (click's "Aborted!", 1), or from the live view
        # had the start been done when the signal came (0).
        (signal.SIGINT, {1, 0}),
    ],
    ids=["SIGTERM", "SIGINT"],
)
def test_a_signal_during_the_start_waits_for_it_then_leaves(
    private: Private, signum: signal.Signals, statuses: set[int]
) -> None:
    proc = private.spawn("watch", "watch", "--json", "--interval", "60")
    # Listed as a user; the server is still being made (initdb, start) under the lock.
    wait_until(lambda: proc.pid in private.users(), timeout=60, message="watch to join")
    proc.send_signal(signum)
    assert proc.wait(timeout=60) in statuses, private.log("watch")
    wait_until(
        lambda: not (private.directory / "postmaster.pid").exists(),
        message="no server left running",
    )
    assert private.users() == []


@pytest.mark.faults
def test_commands_starting_and_stopping_at_once_all_get_a_server(private: Private) -> None:
    """Short commands three at a time, each started as soon as an earlier one exited: the
    last to leave stops the server while the next may be starting it, and every one of them
    must find a server that stays up until it is done."""
    procs: list[subprocess.Popen[bytes]] = []
    for i in range(18):
        if i >= 3:
            assert procs[i - 3].wait(timeout=60) == 0, private.log(f"stats-{i - 3}")
        procs.append(private.spawn(f"stats-{i}", "stats", "--json"))
    for i, proc in enumerate(procs):
        assert proc.wait(timeout=60) == 0, private.log(f"stats-{i}")
    assert not (private.directory / "postmaster.pid").exists()
    assert private.users() == []
