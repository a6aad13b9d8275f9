"""Worker processes: start one per system run, watch it, and always end it.

A worker that exits early fails the run with the tail of its log; one that
does not stop within STOP_GRACE seconds of SIGTERM is killed with its whole
process group and the run reports it.  Nothing is left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from .systems.base import cpu_file

REPO = Path(__file__).resolve().parents[1]
STOP_GRACE = 15.0


class RunFailed(Exception):
    """A run that produced no figure: the worker died, hung or never finished."""


class Worker:
    def __init__(self, system: str, dsn: str, workdir: Path, args: list[str]) -> None:
        self.system = system
        self.stamps = workdir / f"{system}.stamps"
        self.stamps.write_bytes(b"")
        self._cpu_file = Path(cpu_file(str(self.stamps)))
        self._cpu_file.unlink(missing_ok=True)
        self.log = workdir / f"{system}.log"
        self._log = self.log.open("wb")
        cmd = [sys.executable, "-m", "benchmarks.worker", system, "--dsn", dsn]
        cmd += ["--stamps", str(self.stamps), *args]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.killed = False

    def check(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise RunFailed(f"{self.system} worker exited with status {code}: {self.tail()}")

    def tail(self, lines: int = 3) -> str:
        text = self.log.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) or "(no output)"

    def starts(self) -> dict[int, float]:
        """Job id -> unix time its handler started (the first start, if it ran twice)."""
        out: dict[int, float] = {}
        for line in self.stamps.read_text().splitlines():
            job, at = line.split()
            out.setdefault(int(job), float(at))
        return out

    def cpu(self) -> float | None:
        """CPU seconds (user + system) the worker, and any process it started, used
        since its first handler started; None before that, or if it is gone."""
        import psutil

        try:
            first = float(self._cpu_file.read_text())
            root = psutil.Process(self.proc.pid)
            total = 0.0
            for p in [root, *root.children(recursive=True)]:
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
        except (FileNotFoundError, ValueError, psutil.Error):
            return None
        return total - first

    def count(self) -> int:
        return self.stamps.read_bytes().count(b"\n")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.killed = True
        with suppress(ProcessLookupError):  # the worker if it hung, and anything it started
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()


@contextmanager
def worker(system: str, dsn: str, workdir: Path, *args: str) -> Iterator[Worker]:
    w = Worker(system, dsn, workdir, list(args))
    failed = False
    try:
        yield w
    except BaseException:
        failed = True
        raise
    finally:
        w.stop()
        if w.killed and not failed:
            raise RunFailed(f"{system} worker hung on SIGTERM and was killed")


def wait(
    condition: Callable[[], bool],
    what: str,
    timeout: float,
    w: Worker | None = None,
    interval: float = 0.02,
) -> None:
    if not reached(condition, timeout, w, interval):
        raise RunFailed(f"timed out after {timeout:.0f}s waiting for {what}")


def reached(
    condition: Callable[[], bool], timeout: float, w: Worker | None = None, interval: float = 0.02
) -> bool:
    """Whether the condition came true within the timeout (the worker must stay up)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if w is not None:
            w.check()
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True
