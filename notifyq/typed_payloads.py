"""Typed payloads: a handler whose payload parameter is annotated with a dataclass or
a pydantic model receives an instance, built and validated from the job's JSON.

The annotation is read once, at registration (`model_of`), so it must resolve then: a
class defined before the handler (with `from __future__ import annotations`, one defined
after it, or local to a function, is not found: a warning says so, and the payload
stays plain JSON).  pydantic stays optional:
a pydantic model is recognised by the methods pydantic 2 gives it (`model_validate`,
`model_dump`), never by importing pydantic here.  A dataclass is validated by
pydantic's TypeAdapter when pydantic is installed (field types, nested dataclasses,
coercions as pydantic does them); without pydantic it is built field by field: a
payload that is not an object, lacks a required field or has an unknown one is
refused, and the fields' types are not checked.  Either way a key the dataclass has no
field for is refused (pydantic alone would drop it), so a payload is accepted or
refused alike wherever pydantic happens to be installed.

A payload the model refuses fails with the validation error; the pool makes that a
PayloadError, so the job goes dead at once, never retried (the same payload would
fail again).  Enqueue takes an instance of the model, and checks a plain object
against it before anything is sent (`to_payload`).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import types
import typing
from collections.abc import Callable
from functools import cache
from typing import Any

from .errors import ConfigurationError

log = logging.getLogger("notifyq.registry")

Decode = Callable[[Any], Any]


def model_of(handler: Callable[..., Any], *, batch: bool = False) -> type | None:
    """The dataclass or pydantic model the handler's first parameter is annotated with
    (with `batch`, a batch handler's: `list[BatchItem[Model]]` or any sequence of them).
    Only that annotation is resolved: another one that names a class imported under
    TYPE_CHECKING must not make the payload untyped."""
    try:
        first = next(iter(inspect.signature(handler).parameters.values()))
    except (StopIteration, TypeError, ValueError):
        return None  # no signature (a builtin), or no parameter: describe_handler says so
    annotation = first.annotation
    if annotation is inspect.Parameter.empty:
        return None
    if isinstance(annotation, str):
        holder = types.SimpleNamespace(__annotations__={"payload": annotation})
        try:
            annotation = typing.get_type_hints(
                holder, globalns=getattr(handler, "__globals__", None), include_extras=True
            )["payload"]
        except Exception as exc:  # NameError mostly: a class defined after the handler
            log.warning(
                "the payload annotation %r of %s does not resolve when the task is registered "
                "(%s: %s): its handler receives the JSON as decoded; define the class before "
                "the handler to have the payload built and validated",
                annotation,
                getattr(handler, "__qualname__", handler),
                type(exc).__name__,
                exc,
            )
            return None
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if batch:
        annotation = _item_payload(annotation)
    if isinstance(annotation, type) and (_is_pydantic(annotation) or _is_dataclass(annotation)):
        return annotation
    return None


def _item_payload(annotation: Any) -> Any:
    """X of a batch handler's `Sequence[BatchItem[X]]` (None when it says no X)."""
    items = typing.get_args(annotation)
    if len(items) != 1:
        return None
    payload = typing.get_args(items[0])
    return payload[0] if len(payload) == 1 else None


def decoder(model: type) -> Decode:
    """The function that turns a decoded JSON payload into an instance of `model`."""
    if _is_pydantic(model):
        validate: Decode = model.model_validate  # type: ignore[attr-defined]
        return validate
    adapter = _type_adapter(model)
    if adapter is not None:
        return lambda payload: adapter(_known_fields(model, payload))
    return lambda payload: _build_dataclass(model, payload)


def to_payload(value: Any, model: type | None = None, decode: Decode | None = None) -> Any:
    """What enqueue sends: a dataclass or pydantic instance becomes the JSON object it
    dumps to.  For a task whose handler takes `model`, whatever is not already an
    instance of it is checked with `decode`, so a producer learns of a bad payload from
    its enqueue, not from a dead job: raises what `decode` raises (ValueError, TypeError,
    pydantic's ValidationError)."""
    if model is not None and isinstance(value, model):
        return _dump(value)
    data = _dump(value) if _is_pydantic(type(value)) or _is_dataclass(type(value)) else value
    if model is not None and decode is not None:
        decode({} if data is None else data)
    return data


def _dump(value: Any) -> Any:
    if _is_pydantic(type(value)):
        # By alias: what model_validate reads back by default.
        return value.model_dump(mode="json", by_alias=True)
    return dataclasses.asdict(value)


def _is_pydantic(cls: type) -> bool:
    return callable(getattr(cls, "model_validate", None)) and callable(
        getattr(cls, "model_dump", None)
    )


def _is_dataclass(cls: type) -> bool:
    return dataclasses.is_dataclass(cls)


@cache
def _pydantic_type_adapter() -> Any:
    try:
        from pydantic import TypeAdapter
    except ImportError:
        return None
    return TypeAdapter


def _type_adapter(model: type) -> Decode | None:
    adapter_class = _pydantic_type_adapter()
    if adapter_class is None:
        return None
    try:
        validate: Decode = adapter_class(model).validate_python
    except Exception as exc:  # pydantic's schema error: a field type it cannot validate
        raise ConfigurationError(
            f"pydantic cannot validate the dataclass {model.__qualname__} a handler takes "
            f"({type(exc).__name__}: {exc}); give the task decode= to build it yourself"
        ) from exc
    return validate


def _known_fields(model: type, payload: Any) -> Any:
    """The payload, if it names no field the dataclass lacks (else ValueError)."""
    if isinstance(payload, dict):
        unknown = sorted(set(payload) - {f.name for f in dataclasses.fields(model) if f.init})
        if unknown:
            raise ValueError(f"{model.__name__} has no field {', '.join(map(repr, unknown))}")
    return payload


def _build_dataclass(model: type, payload: Any) -> Any:
    if not isinstance(payload, dict):
        raise ValueError(f"{model.__name__} takes a JSON object, not {type(payload).__name__}")
    _known_fields(model, payload)
    fields = {f.name: f for f in dataclasses.fields(model) if f.init}
    missing = [
        name
        for name, f in fields.items()
        if name not in payload
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"{model.__name__} needs field {', '.join(map(repr, missing))}")
    return model(**payload)
