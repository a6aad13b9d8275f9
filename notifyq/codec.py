"""JSON in and out of PostgreSQL; the only module that imports orjson.

PostgreSQL stores JSON that orjson cannot decode: nesting deeper than 1024
levels (jsonb itself accepts over 10,000 with the default max_stack_depth of
2 MB, and fails beyond with SQLSTATE 54001, "stack depth limit exceeded") and
numbers beyond a double's range (`1e400`).  Connections configured here decode
such a value as an `Undecodable` instead of raising mid-fetch: one bad row
would otherwise fail a whole claim whose jobs are already marked running.
Every task's decode step refuses an `Undecodable` with a PayloadError
(registry.py), so its job goes dead after one attempt, saying why.

The other way, orjson writes a float NaN or infinity as `null`: a payload, a
result or a checkpoint would change silently on its way to the table.  `dumps`
refuses them instead; only output that has a `null` in it can hold one, so the
usual value costs a substring search, not a walk.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

import orjson
from psycopg.abc import AdaptContext
from psycopg.types.json import set_json_dumps, set_json_loads


def dumps(value: Any) -> str:
    """Encode a payload; raises TypeError for values JSON cannot hold (its
    `__cause__` says why), NaN and infinities included.  An `Undecodable` read back
    from the database (`notifyq jobs show`) is written as a string saying why."""
    try:
        text = orjson.dumps(value, default=_describe_undecodable).decode()
    except orjson.JSONEncodeError as exc:
        raise TypeError(f"payload is not JSON-serialisable: {exc}") from exc
    # In str, not bytes: `in` on bytes costs several times more.
    if "null" in text and not _finite(value):
        reason = ValueError(
            f"JSON has no NaN or Infinity, and {_non_finite(value, '')}: "
            "use None, a string or a finite number there instead"
        )
        raise TypeError(f"payload is not JSON-serialisable: {reason}") from reason
    return text


def _finite(value: Any) -> bool:
    """Whether `value` holds no float NaN or infinity.  The plain JSON types are
    tested inline (this runs for every value whose JSON has a null in it); anything
    else orjson writes (subclasses, dataclasses, enums) takes `_non_finite`'s walk.
    Recursive: orjson has already refused anything nested over 255 levels."""
    kind = type(value)
    if kind is dict:
        children = value.values()
    elif kind is list or kind is tuple:
        children = value
    elif kind is float:
        return not value - value  # inf - inf and nan - anything are nan, which is true
    elif kind is str or kind is int or kind is bool or value is None:
        return True
    else:
        return _non_finite(value, "") is None
    for child in children:
        kind = type(child)
        if kind is float:
            if child - child:
                return False
        elif kind is str or kind is int or child is None or kind is bool:
            continue
        elif not _finite(child):
            return False
    return True


def _non_finite(value: Any, path: str) -> str | None:
    """Where a float NaN or infinity sits in `value` (as orjson walks it), or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path or 'the value itself'} is {value}"
    if isinstance(value, enum.Enum):
        return _non_finite(value.value, path)
    if isinstance(value, dict):
        items: Any = ((f"{path}[{key!r}]", child) for key, child in value.items())
    elif isinstance(value, list | tuple):
        items = ((f"{path}[{i}]", child) for i, child in enumerate(value))
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.fields(value)
        items = ((f"{path}.{f.name}", getattr(value, f.name)) for f in fields)
    else:
        return None
    return next((found for at, child in items if (found := _non_finite(child, at))), None)


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
