"""JSON in and out of PostgreSQL; the only module that imports orjson."""

from __future__ import annotations

from typing import Any

import orjson
from psycopg.abc import AdaptContext
from psycopg.types.json import set_json_dumps, set_json_loads


def dumps(value: Any) -> str:
    """Encode a payload; raises TypeError for values JSON cannot hold."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError as exc:
        raise TypeError(f"payload is not JSON-serialisable: {exc}") from exc


def loads(text: str | bytes) -> Any:
    """Decode JSON text; raises ValueError with orjson's reason."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc}") from exc


def configure(context: AdaptContext) -> None:
    """Make a connection decode and encode json/jsonb with orjson."""
    set_json_loads(orjson.loads, context)
    set_json_dumps(orjson.dumps, context)
