"""Task name -> handler, and the `@app.task` decorator's bookkeeping. No I/O."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .breaker import CircuitBreaker
from .codec import Undecodable
from .errors import ConfigurationError, PayloadError
from .retry import Backoff

# Mirrors the CHECK constraints in schema.sql, so a bad name fails at import
# time in Python instead of at the first INSERT.
TASK_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,199}")
QUEUE_NAME = re.compile(r"[a-z0-9_][a-z0-9_-]{0,62}")
DEFAULT_QUEUE = "default"
DEFAULT_MAX_ATTEMPTS = 5
MAX_TAGS = 20  # jobs_tags_valid: at most 20 tags ...
MAX_TAGS_LENGTH = 1000  # ... of 1000 characters in all, none empty

Handler = Callable[..., Any]


def check_queue_name(queue: str) -> str:
    if not isinstance(queue, str) or not QUEUE_NAME.fullmatch(queue):
        raise ConfigurationError(f"invalid queue name {queue!r}: {_queue_rule_broken(queue)}")
    return queue


def _queue_rule_broken(queue: object) -> str:
    """Which rule of QUEUE_NAME a name breaks, first found, so the message says what to fix."""
    rules = "use 1-63 characters of a-z, 0-9, '_' and '-', not starting with '-'"
    if not isinstance(queue, str) or not queue:
        return f"it is empty; {rules}"
    if len(queue) > 63:
        return f"it is {len(queue)} characters long, over the 63 allowed"
    bad = sorted({c for c in queue if not QUEUE_NAME.fullmatch("a" + c)})
    if bad:
        upper = " (lower case only)" if any(c.isupper() for c in bad) else ""
        return f"{', '.join(repr(c) for c in bad)} not allowed{upper}; {rules}"
    return "it starts with '-': a queue name starts with a-z, 0-9 or '_'"


def check_task_name(name: str) -> str:
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
        raise ConfigurationError(
            f"invalid task name {name!r}: use 1-200 characters of letters, digits, "
            "'_', '.', ':' and '-', starting with a letter or '_'"
        )
    return name


MAX_BATCH_SIZE = 1000  # jobs one batch handler call takes at most: a claim's most


@dataclass(frozen=True, slots=True)
class Batching:
    """A batch handler's settings (batch.py): up to `size` jobs a call; after a call
    that was not full, the task's next claim waits up to `wait` seconds for more."""

    size: int
    wait: float = 0.0


def check_batching(batch_size: int | None, batch_wait: float | None) -> Batching | None:
    if batch_size is None:
        if batch_wait is not None:
            raise ConfigurationError("batch_wait needs batch_size: it is a batch handler's")
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise ConfigurationError(f"batch_size must be an integer, got {batch_size!r}")
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ConfigurationError(
            f"batch_size must be from 1 to {MAX_BATCH_SIZE} (the most one claim takes), "
            f"got {batch_size}"
        )
    wait = 0.0 if batch_wait is None else batch_wait
    if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait <= 60:
        raise ConfigurationError(
            f"batch_wait must be from 0 to 60 seconds (the most a job may wait for a fuller "
            f"batch), got {batch_wait!r}"
        )
    return Batching(batch_size, float(wait))


def check_batch_handler(handler: Handler) -> None:
    """A batch handler is called with its list alone: one that needs a second argument
    (a JobContext, as a plain handler may take) would fail every call with a TypeError."""
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):  # builtins without a signature: called with the list
        return
    try:
        signature.bind([])
    except TypeError:
        raise ConfigurationError(
            f"batch handler {getattr(handler, '__qualname__', handler)!r} must take the list "
            f"of BatchItem as its only argument, not {signature}: each item has its job's "
            "context (item.ctx)"
        ) from None


def check_tags(tags: Iterable[str] | None) -> tuple[str, ...]:
    """Tags as the schema's CHECK jobs_tags_valid takes them (a tuple; empty: none)."""
    if tags is None:
        return ()
    if isinstance(tags, (str, bytes)) or not isinstance(tags, Iterable):
        raise ConfigurationError(f"tags must be a list of strings, not {tags!r}")
    found = tuple(tags)
    for tag in found:
        if not isinstance(tag, str) or not tag:
            raise ConfigurationError(f"each tag must be a non-empty string, not {tag!r}")
    if len(found) > MAX_TAGS:
        raise ConfigurationError(f"a job has at most {MAX_TAGS} tags, not {len(found)}")
    if sum(len(tag) for tag in found) > MAX_TAGS_LENGTH:
        raise ConfigurationError(
            f"a job's tags are at most {MAX_TAGS_LENGTH} characters in all, not "
            f"{sum(len(tag) for tag in found)}"
        )
    return found


# jobs_callback_url_format, checked before a round trip; the allow-list is the database's.
_CALLBACK_URL = re.compile(r"https?://[^/?#@\s]+/\S*", re.IGNORECASE)


def check_callback_url(url: str | None) -> str | None:
    """A callback URL as the schema's CHECK jobs_callback_url_format takes it (None: none).
    Whether it is allowed is the database's to say (notifyq.webhook_allowlist)."""
    if url is None:
        return None
    if not isinstance(url, str) or len(url) > 2048 or not _CALLBACK_URL.fullmatch(url):
        raise ConfigurationError(
            f"callback_url must be an http:// or https:// URL with a host and a path (at "
            f"least /), no spaces, at most 2048 characters, not {url!r}"
        )
    return url


@dataclass(frozen=True, slots=True)
class Task:
    """A registered handler and the settings its jobs run with."""

    name: str
    handler: Handler
    queue: str = DEFAULT_QUEUE
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    backoff: Backoff = field(default_factory=Backoff)
    timeout: float | None = None
    decode: Callable[[Any], Any] | None = None
    # The dataclass or pydantic model the handler takes (typed_payloads.py), which `decode`
    # builds and enqueue checks payloads against; None: the payload as JSON decodes.
    model: type | None = None
    is_async: bool = False
    wants_context: bool = False
    # Written to notifyq.circuit_breakers at start-up; None leaves that table alone (a
    # breaker set there in SQL stays).
    circuit_breaker: CircuitBreaker | None = None
    # Set for a batch handler, which takes a list of BatchItem (batch.py); None: one job a call.
    batch: Batching | None = None
    tags: tuple[str, ...] = ()  # every job of the task gets them (enqueue adds its own)
    callback_url: str | None = None  # every job of the task gets it, unless enqueue names one

    def __post_init__(self) -> None:
        # Every task decodes through _refuse_undecodable first, so a payload PostgreSQL
        # holds but Python cannot decode (codec.Undecodable: nested over 1024 levels, a
        # number beyond a double) fails its attempt with a PayloadError and goes dead,
        # whether or not the handler would have looked at it.
        user = self.decode
        guard = _refuse_undecodable if user is None else _guarded(user)
        object.__setattr__(self, "decode", guard)


def _refuse_undecodable(payload: Any) -> Any:
    if isinstance(payload, Undecodable):
        raise PayloadError(str(payload))
    return payload


def _guarded(decode: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def guarded(payload: Any) -> Any:
        return decode(_refuse_undecodable(payload))

    return guarded


def describe_handler(handler: Handler) -> tuple[bool, bool]:
    """(is_async, wants_context): decided once at registration, never per job."""
    if not callable(handler):
        raise ConfigurationError(f"task handler {handler!r} is not callable")
    # Callable objects with an `async def __call__` count as async too.
    is_async = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        type(handler).__call__
    )
    try:
        params = list(inspect.signature(handler).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature: payload only
        return is_async, False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    variadic = any(p.kind is p.VAR_POSITIONAL for p in params)
    if not positional and not variadic:
        raise ConfigurationError(
            f"task handler {handler.__qualname__} must accept the payload as its first argument"
        )
    return is_async, variadic or len(positional) >= 2


class Registry:
    """The tasks one App knows, by name."""

    def __init__(self) -> None:
        self._tasks: dict[str, Task] = {}
        self._by_handler: dict[Handler, Task] = {}

    def add(self, task: Task) -> None:
        if task.name in self._tasks:
            raise ConfigurationError(f"task {task.name!r} is registered twice")
        self._tasks[task.name] = task
        self._by_handler[task.handler] = task

    def put(self, task: Task) -> None:
        """Add or replace `task` (a dispatcher's own copy, serving HTTP endpoints)."""
        old = self._tasks.get(task.name)
        if old is not None:
            self._by_handler.pop(old.handler, None)
        self._tasks[task.name] = task
        self._by_handler[task.handler] = task

    def clone(self) -> Registry:
        twin = Registry()
        twin._tasks = dict(self._tasks)
        twin._by_handler = dict(self._by_handler)
        return twin

    def get(self, name: str) -> Task | None:
        return self._tasks.get(name)

    def for_handler(self, handler: Handler) -> Task | None:
        return self._by_handler.get(handler)

    def __iter__(self) -> Any:
        return iter(self._tasks.values())

    def __len__(self) -> int:
        return len(self._tasks)

    def queues(self) -> list[str]:
        """The queues this app's tasks live on, plus the default queue."""
        return sorted({DEFAULT_QUEUE, *(t.queue for t in self._tasks.values())})
