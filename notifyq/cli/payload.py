"""`notifyq enqueue`'s look at PAYLOAD's shape, before anything connects.

The database takes any JSON document, but handlers nearly always take an
object (`payload["name"]`): an array or a scalar is accepted, then fails every
attempt with AttributeError or TypeError.  The command line has no app loaded,
so what it can say depends on `--app`:

- without --app, a payload that is not an object is enqueued with a warning;
- with --app, the task's handler decides through the annotation of its first
  parameter: a payload of a kind the annotation cannot be (an array for a
  `dict`, a TypedDict or a Mapping; an object for a `list`, ...) is refused as
  a usage error; a kind it names passes silently; no annotation, `Any`, or a
  class of the app's own (which a task's `decode=` builds) means "unknown",
  and a non-object payload is warned about as without --app;
- a dataclass or pydantic model (typed_payloads.py) validates PAYLOAD itself:
  a payload it refuses is a usage error naming the model's complaint.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from ..app import App

_JSON_KINDS = ((bool, "boolean"), ((int, float), "number"), (str, "string"), (dict, "object"))


def kind(value: Any) -> str:
    """The JSON kind of a decoded document: object, array, string, number, boolean, null."""
    if value is None:
        return "null"
    for python, name in _JSON_KINDS:
        if isinstance(value, python):
            return name
    return "array"


def check(task: str, payload: Any, app: App | None) -> str | None:
    """None when the payload looks right for `task`, else a warning to print.
    Raises ValueError (a usage error) when the handler's annotation rules it out."""
    have = kind(payload)
    if app is None:
        if have == "object":
            return None
        return (
            f"PAYLOAD is a JSON {have}, not an object: handlers usually take an object "
            '(payload["key"]), so the job may fail every attempt; enqueuing it anyway '
            "(give --app MODULE:ATTR to check it against the task's handler)"
        )
    registered = app.registry.get(task)
    if registered is None:
        return (
            f"the app registers no task {task!r}: its dispatchers will not run this job "
            "(another app's may)"
        )
    if registered.model is not None and registered.decode is not None:
        try:
            registered.decode(payload)
        except Exception as exc:  # the model's own validation error, whatever its type
            raise ValueError(
                f"the handler of {task} takes {registered.model.__name__}, which PAYLOAD "
                f"does not fit: {type(exc).__name__}: {exc}"
            ) from None
        return None
    accepted = _accepted_kinds(registered.handler)
    if accepted is None:
        if have == "object":
            return None
        return (
            f"PAYLOAD is a JSON {have}, not an object, and the handler of {task} has no "
            "annotation that says it takes one; enqueuing it anyway"
        )
    if have not in accepted:
        takes = " or ".join(sorted(accepted))
        raise ValueError(f"the handler of {task} takes a JSON {takes} (its annotation), not {have}")
    return None


def _accepted_kinds(handler: Any) -> set[str] | None:
    """The JSON kinds the handler's payload annotation allows, or None if unknown."""
    try:
        first = next(iter(inspect.signature(handler).parameters.values()))
        hints = typing.get_type_hints(handler)
    except (StopIteration, TypeError, ValueError, NameError):
        return None
    return _kinds(hints.get(first.name, Any))


def _kinds(annotation: Any) -> set[str] | None:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _kinds(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        found: set[str] = set()
        for member in typing.get_args(annotation):
            member_kinds = _kinds(member)
            if member_kinds is None:
                return None
            found |= member_kinds
        return found
    if annotation is None or annotation is type(None):
        return {"null"}
    if typing.is_typeddict(annotation):
        return {"object"}
    cls = origin or annotation
    if not isinstance(cls, type) or cls is object:
        return None  # Any, a TypeVar, ...
    if issubclass(cls, bool):
        return {"boolean"}
    if issubclass(cls, int | float):
        return {"number"}
    if issubclass(cls, str):
        return {"string"}
    if issubclass(cls, Mapping):
        return {"object"}
    if issubclass(cls, Sequence):
        return {"array"}
    return None  # a class of the app's own: what a decode= makes of the payload
