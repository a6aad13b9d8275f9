"""`notifyq roles`: the producer and worker group roles, with least privilege.

The SQL is sql/roles.sql (what each role may do is written there); this
module checks the names and runs or renders it through the store.
"""

from __future__ import annotations

from . import store
from .errors import ConfigurationError

PRODUCER = "notifyq_producer"
WORKER = "notifyq_worker"


def check_names(producer: str, worker: str) -> None:
    """Any name PostgreSQL keeps whole is fine (psycopg quotes it); refuse the rest."""
    for name in (producer, worker):
        if not name or "\x00" in name or len(name.encode()) > 63:
            raise ConfigurationError(
                f"invalid role name {name!r}: use 1-63 bytes (PostgreSQL would truncate longer)"
            )
        if name.lower().startswith("pg_") or name.lower() == "public":
            raise ConfigurationError(f"invalid role name {name!r}: it is reserved by PostgreSQL")
    if producer == worker:
        raise ConfigurationError("the producer and worker roles must have different names")


def script(producer: str = PRODUCER, worker: str = WORKER) -> str:
    """The SQL `install` runs, as text (for --print)."""
    check_names(producer, worker)
    return store.roles_script(producer, worker).as_string(None)


def install(dsn: str, producer: str = PRODUCER, worker: str = WORKER) -> None:
    """Create the roles if missing and grant them their privileges, in one transaction."""
    check_names(producer, worker)
    with store.connect_sync(dsn) as conn:
        store.apply_roles(conn, store.roles_script(producer, worker))
