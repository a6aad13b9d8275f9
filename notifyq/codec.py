"""JSON in and out of PostgreSQL; the only module that imports orjson.

PostgreSQL stores JSON that orjson cannot decode: nesting deeper than 1024
levels (jsonb itself accepts over 10,000 with the default max_stack_depth of
2 MB, and fails beyond with SQLSTATE 54001, "stack depth limit exceeded") and
numbers beyond a double's range (`1e400`).  Connections configured here decode
such a value as an `Undecodable` instead of raising mid-fetch: one bad row
would otherwise fail a whole claim whose jobs are already marked running.
Every task's decode step refuses an `Undecodable` with a PayloadError
(registry.py), so its job goes dead after one attempt, saying why.
"""

from __future__ import annotations

from typing import Any

import orjson
from psycopg.abc import AdaptContext
from psycopg.types.json import set_json_dumps, set_json_loads


def dumps(value: Any) -> str:
    """Encode a payload; raises TypeError for values JSON cannot hold.  An
    `Undecodable` read back from the database (`notifyq jobs show`) is written as
    a string saying why."""
    try:
        return orjson.dumps(value, default=_describe_undecodable).decode()
    except orjson.JSONEncodeError as exc:
        raise TypeError(f"payload is not JSON-serialisable: {exc}") from exc


def loads(text: str | bytes) -> Any:
    """Decode JSON text; raises ValueError with orjson's reason."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc}") from exc


class Undecodable:
    """A json/jsonb value read from PostgreSQL that orjson could not decode.  Not a
    dataclass, which orjson would write as if it were the payload."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"Undecodable({self.reason!r})"

    def __str__(self) -> str:
        return (
            f"the payload stored in PostgreSQL cannot be decoded in Python ({self.reason}); "
            "notifyq decodes at most 1024 levels of nesting and numbers within a double's range"
        )


def _describe_undecodable(value: Any) -> str:
    if isinstance(value, Undecodable):
        return f"<{value}>"
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")


def _loads_column(data: str | bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        return Undecodable(str(exc))


def depth_exceeds(encoded: str, limit: int) -> bool:
    """Whether JSON text (as `dumps` wrote it) nests arrays and objects over `limit` deep.

    Cheap for the usual payload: fewer brackets than the limit, even counting those
    inside strings, cannot nest deeper.  Otherwise the decoded value is walked."""
    if encoded.count("[") + encoded.count("{") <= limit:
        return False
    root = orjson.loads(encoded)
    stack: list[tuple[Any, int]] = [(root, 1)] if isinstance(root, dict | list) else []
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def configure(context: AdaptContext) -> None:
    """Make a connection decode and encode json/jsonb with orjson."""
    set_json_loads(_loads_column, context)
    set_json_dumps(orjson.dumps, context)
