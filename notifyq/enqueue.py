"""Build a job row from Python arguments and INSERT it.

With `conn=` the INSERT runs on the caller's connection, inside whatever
transaction it has open: the job exists if and only if that transaction
commits (PostgreSQL holds the trigger's notification until then too).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from numbers import Integral
from typing import Any, TypedDict

from . import codec, store, typed_payloads
from .errors import ConfigurationError, InvalidJob
from .registry import (
    DEFAULT_QUEUE,
    Handler,
    Registry,
    Task,
    check_callback_url,
    check_queue_name,
    check_tags,
    check_task_name,
)

MAX_DELAY = 10 * 365 * 24 * 3600.0
MAX_DEDUPE_KEY = 255  # characters, as the schema's jobs_dedupe_key_length says
MAX_DEPENDENCIES = 1000
ON_DUPLICATE = ("refuse", "replace")
ON_DEPENDENCY_FAILURE = ("cancel", "run")
MAX_PAYLOAD_DEPTH = 100
"""Arrays and objects nested deeper than this are refused at enqueue.  Far beyond
what a real payload needs; the dispatcher itself decodes up to 1024 levels (a row
inserted by SQL that is deeper goes dead after one attempt, see codec.py)."""


class ManyOptions(TypedDict, total=False):
    """The keyword arguments of `App.enqueue_many(_sync)`, each optional: the one
    place they are written (App's methods take them as `**options`)."""

    queue: str | None  # default: the task's queue, else "default"
    priority: int | None  # default 0; higher runs first
    delay: float | None  # seconds from now (not with run_at)
    run_at: datetime | None  # timezone-aware
    max_attempts: int | None  # default: the task's
    rate_key: str | None  # shares the rate limit of that key (notifyq.rate_limits)
    depends_on: Iterable[int] | None  # ids of jobs that must succeed first
    on_dependency_failure: str  # "cancel" (default) or "run"
    tags: Iterable[str] | None  # labels to find jobs by, added to the task's own
    callback_url: str | None  # POSTed to when the job ends (default: the task's)


class EnqueueOptions(ManyOptions, total=False):
    """The keyword arguments of `App.enqueue(_sync)`: those of enqueue_many, and
    a dedupe_key (one job per key while unfinished) with what else it means."""

    dedupe_key: str | None
    # The key is held this long after the enqueue, even once the job finished.
    unique_for: timedelta | float | None
    # "replace": a queued job holding the key, enqueued with "replace" too, gets this
    # payload and run_at (debounce).
    on_duplicate: str | None


MANY_OPTIONS = frozenset(ManyOptions.__annotations__)
ENQUEUE_OPTIONS = frozenset(EnqueueOptions.__annotations__)  # a TypedDict's include its bases'


def build(
    registry: Registry,
    task: str | Handler,
    payload: Any,
    options: EnqueueOptions,
    *,
    accepts: frozenset[str] = ENQUEUE_OPTIONS,
    caller: str = "enqueue",
    with_payload: bool = True,
) -> store.NewJob:
    """Validate in Python what can be checked without a round trip.  `accepts`: the
    options `caller` takes (a keyword it does not is a TypeError, as Python's own);
    `with_payload` False: the payloads come apart (enqueue_many: `encode_all`)."""
    for key in options:
        if key not in accepts:
            raise TypeError(f"{caller}() got an unexpected keyword argument {key!r}")
    queue = options.get("queue")
    priority = options.get("priority")
    delay = options.get("delay")
    run_at = options.get("run_at")
    max_attempts = options.get("max_attempts")
    dedupe_key = options.get("dedupe_key")
    rate_key = options.get("rate_key")
    if isinstance(task, str):
        name = check_task_name(task)
        known = registry.get(name)
    else:
        known = registry.for_handler(task) if callable(task) else None
        if known is None:
            raise InvalidJob(f"{task!r} is not a task name or a handler registered with this app")
        name = known.name
    if queue is None and known is not None:
        queue = known.queue
    if queue is not None:
        check_queue_name(queue)
    if delay is not None and run_at is not None:
        raise InvalidJob("give either delay or run_at, not both")
    if delay is not None and not 0 <= delay <= MAX_DELAY:  # also rejects NaN
        raise InvalidJob(f"delay must be from 0 to {MAX_DELAY:.0f} seconds (10 years), got {delay}")
    if run_at is not None and run_at.tzinfo is None:
        raise InvalidJob("run_at must be timezone-aware (naive datetimes are ambiguous)")
    if rate_key is not None and not (isinstance(rate_key, str) and 1 <= len(rate_key) <= 200):
        raise InvalidJob(f"rate_key must be a string of 1 to 200 characters, got {rate_key!r}")
    if dedupe_key is not None and not (
        isinstance(dedupe_key, str) and 1 <= len(dedupe_key) <= MAX_DEDUPE_KEY
    ):
        raise InvalidJob(
            f"dedupe_key must be a string of 1 to {MAX_DEDUPE_KEY} characters, got {dedupe_key!r}"
        )
    unique_for = window(options.get("unique_for"), dedupe_key)
    on_duplicate = duplicate_policy(options.get("on_duplicate"), dedupe_key, unique_for)
    return store.NewJob(
        task=name,
        payload_json=encode(payload, task=known) if with_payload else "{}",
        # Explicit values, as the INSERT names every column (the schema's defaults agree).
        queue=queue if queue is not None else DEFAULT_QUEUE,
        priority=priority if priority is not None else 0,
        delay=delay or 0.0,
        run_at=run_at,
        max_attempts=max_attempts
        if max_attempts is not None
        else (known.max_attempts if known is not None else None),
        dedupe_key=dedupe_key,
        rate_key=rate_key,
        depends_on=dependencies(options.get("depends_on")),
        on_dependency_failure=failure_policy(options.get("on_dependency_failure", "cancel")),
        unique_for=unique_for,
        on_duplicate=on_duplicate,
        tags=job_tags(known, options.get("tags")),
        callback_url=job_callback_url(known, options),
    )


def job_callback_url(task: Task | None, options: ManyOptions) -> str | None:
    """The enqueue's callback_url if it names one (None too: no callback), else the task's."""
    url = (
        options.get("callback_url")
        if "callback_url" in options or task is None
        else (task.callback_url)
    )
    try:
        return check_callback_url(url)
    except ConfigurationError as exc:
        raise InvalidJob(str(exc)) from None


def job_tags(task: Task | None, tags: Iterable[str] | None) -> list[str] | None:
    """The task's tags, then the enqueue's not already among them; None when there are none."""
    try:
        given = check_tags(tags)
    except ConfigurationError as exc:
        raise InvalidJob(str(exc)) from None
    own = task.tags if task is not None else ()
    merged = [*own, *(tag for tag in dict.fromkeys(given) if tag not in own)]
    try:
        return list(check_tags(merged)) or None
    except ConfigurationError as exc:
        raise InvalidJob(f"{exc} (the task's tags and the enqueue's together)") from None


def window(unique_for: timedelta | float | None, dedupe_key: str | None) -> float | None:
    """unique_for in seconds (the schema's jobs_unique_for_valid, checked before sending)."""
    if unique_for is None:
        return None
    if isinstance(unique_for, timedelta):
        seconds = unique_for.total_seconds()
    elif isinstance(unique_for, int | float) and not isinstance(unique_for, bool):
        seconds = float(unique_for)
    else:
        raise InvalidJob(f"unique_for must be a timedelta or seconds, not {unique_for!r}")
    if not 0 < seconds <= MAX_DELAY:  # also rejects NaN
        raise InvalidJob(
            f"unique_for must be more than 0 and at most {MAX_DELAY:.0f} seconds (10 years), "
            f"got {seconds}"
        )
    if dedupe_key is None:
        raise InvalidJob("unique_for needs a dedupe_key: the key is what it keeps unique")
    return seconds


def duplicate_policy(
    on_duplicate: str | None, dedupe_key: str | None, unique_for: float | None
) -> str | None:
    if on_duplicate is None:
        return None
    if on_duplicate not in ON_DUPLICATE:
        raise InvalidJob(f"on_duplicate must be 'refuse' or 'replace', not {on_duplicate!r}")
    if dedupe_key is None:
        raise InvalidJob("on_duplicate needs a dedupe_key: the key names the job to replace")
    if on_duplicate == "replace" and unique_for is not None:
        raise InvalidJob("on_duplicate='replace' cannot be combined with unique_for")
    return on_duplicate


def dependencies(depends_on: Iterable[int] | None) -> list[int] | None:
    """Job ids as a list (that they exist, the database checks at INSERT)."""
    if depends_on is None:
        return None
    if isinstance(depends_on, (str, bytes, dict)) or not isinstance(depends_on, Iterable):
        raise InvalidJob(f"depends_on must be a list of job ids, not {depends_on!r}")
    ids = list(depends_on)
    for job_id in ids:
        if isinstance(job_id, bool) or not isinstance(job_id, Integral) or job_id < 1:
            raise InvalidJob(f"depends_on must hold job ids (positive integers), not {job_id!r}")
    if len(ids) > MAX_DEPENDENCIES:
        raise InvalidJob(f"depends_on holds {len(ids)} ids; at most {MAX_DEPENDENCIES}")
    return [int(job_id) for job_id in ids] or None


def failure_policy(on_dependency_failure: str) -> str:
    if on_dependency_failure not in ON_DEPENDENCY_FAILURE:
        raise InvalidJob(
            f"on_dependency_failure must be 'cancel' or 'run', not {on_dependency_failure!r}"
        )
    return on_dependency_failure


def encode(payload: Any, where: str = "", *, task: Task | None = None) -> str:
    """The payload as JSON text, or InvalidJob saying why not (`where`: which one).
    A dataclass or pydantic instance is sent as what it dumps to; for a `task` whose
    handler takes a model, anything else must validate against it (typed_payloads.py)."""
    model = task.model if task is not None else None
    try:
        payload = typed_payloads.to_payload(
            payload, model, task.decode if task is not None else None
        )
    except Exception as exc:  # the model's own validation error, whatever its type
        what = (
            f"{model.__name__}, which the handler of {task.name} takes"
            if task and model
            else "JSON"
        )
        raise InvalidJob(
            f"job rejected{where}: the payload does not fit {what}: {type(exc).__name__}: {exc}"
        ) from exc
    if isinstance(payload, codec.Undecodable):
        raise InvalidJob(f"job rejected{where}: {payload}")
    try:
        payload_json = codec.dumps({} if payload is None else payload)
    except TypeError as exc:
        raise InvalidJob(f"job rejected{where}: {exc}") from exc
    if codec.depth_exceeds(payload_json, MAX_PAYLOAD_DEPTH):
        raise InvalidJob(
            f"job rejected{where}: payload nests arrays and objects more than "
            f"{MAX_PAYLOAD_DEPTH} levels deep"
        )
    return payload_json


def encode_all(batch: Iterable[Any], task: Task | None = None) -> list[str]:
    """Every payload encoded before anything is sent: one bad payload refuses the batch."""
    if isinstance(batch, (str, bytes, dict)):
        raise InvalidJob(
            f"payloads must be an iterable of payloads (a list, say), not a {type(batch).__name__}"
        )
    return [encode(payload, f" (payload #{i})", task=task) for i, payload in enumerate(batch)]
