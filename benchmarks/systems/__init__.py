"""The systems the suite compares, in table order."""

from __future__ import annotations

import importlib.util

from .base import System, WorkerOptions
from .minimal import Minimal
from .notifyq import Notifyq
from .pgqueuer import PgQueuer
from .procrastinate import Procrastinate
from .raw import Raw

SYSTEMS: dict[str, System] = {
    s.name: s
    for s in (
        Notifyq(),
        Raw(),
        Minimal(),
        PgQueuer("asyncpg"),
        PgQueuer("psycopg"),
        Procrastinate(),
    )
}

NOT_INSTALLED = "not installed (pip install -r benchmarks/requirements.txt)"


def installed(system: System) -> bool:
    if system.requires is None:
        return True
    if importlib.util.find_spec(system.requires) is None:
        return False
    return system.name != "pgqueuer-asyncpg" or importlib.util.find_spec("asyncpg") is not None


__all__ = ["NOT_INSTALLED", "SYSTEMS", "System", "WorkerOptions", "installed"]
