"""What both modes of notifyq.testing share: the jobs a test sees, the assertions on
them, and running a coroutine from synchronous test code."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, TypeVar

import anyio

from .. import codec, enqueue
from ..app import App
from ..errors import InvalidJob

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class EnqueuedJob:
    """A job as a test sees it: what was enqueued, and where it stands."""

    __test__: ClassVar[bool] = False

    id: int
    task: str
    queue: str
    payload: Any
    status: str  # a JobState value
    attempts: int
    priority: int = 0
    run_at: datetime | None = None
    max_attempts: int | None = None
    dedupe_key: str | None = None
    result: Any = None
    error: str | None = None
    progress: float | None = None
    checkpoint: Any = None


_UNSET: Any = object()


class Assertions:
    """assert_enqueued and friends, over the jobs a mode knows of."""

    app: App

    def jobs(self) -> list[EnqueuedJob]:
        """Every job enqueued in this test, in enqueue order, whatever became of it."""
        raise NotImplementedError

    def enqueued(
        self,
        task: str | Callable[..., Any],
        payload: Any = _UNSET,
        *,
        queue: str | None = None,
        status: str | None = None,
    ) -> list[EnqueuedJob]:
        """The jobs of `task` (a name, or the handler), optionally only those with this
        payload (compared as JSON: a dataclass or pydantic model is dumped first), in
        this queue, or in this status."""
        name = self._task_name(task)
        wanted = _as_json(payload)
        return [
            job
            for job in self.jobs()
            if job.task == name
            and (payload is _UNSET or job.payload == wanted)
            and (queue is None or job.queue == queue)
            and (status is None or job.status == status)
        ]

    def assert_enqueued(
        self,
        task: str | Callable[..., Any],
        payload: Any = _UNSET,
        *,
        count: int | None = None,
        queue: str | None = None,
    ) -> list[EnqueuedJob]:
        """Fail unless `task` was enqueued (exactly `count` times, if given), with this
        payload and in this queue if given; the matching jobs.  Jobs count whatever
        became of them: a job that already ran was enqueued all the same."""
        found = self.enqueued(task, payload, queue=queue)
        if (count is None and not found) or (count is not None and len(found) != count):
            expected = "at least 1" if count is None else str(count)
            raise AssertionError(
                f"expected {expected} {self._what(task, payload, queue)}, found {len(found)}"
                + self._listing()
            )
        return found

    def assert_not_enqueued(
        self, task: str | Callable[..., Any], payload: Any = _UNSET, *, queue: str | None = None
    ) -> None:
        """Fail if `task` was enqueued (with this payload, in this queue, if given)."""
        found = self.enqueued(task, payload, queue=queue)
        if found:
            raise AssertionError(
                f"expected no {self._what(task, payload, queue)}, found {len(found)}"
                + self._listing()
            )

    def _task_name(self, task: str | Callable[..., Any]) -> str:
        if isinstance(task, str):
            return task
        known = self.app.registry.for_handler(task)
        if known is None:
            raise InvalidJob(f"{task!r} is not a handler registered with this app")
        return known.name

    def _what(self, task: str | Callable[..., Any], payload: Any, queue: str | None) -> str:
        what = f"job(s) of {self._task_name(task)!r}"
        if payload is not _UNSET:
            what += f" with payload {_as_json(payload)!r}"
        if queue is not None:
            what += f" in queue {queue!r}"
        return what

    def _listing(self) -> str:
        jobs = self.jobs()
        if not jobs:
            return "; no job was enqueued"
        lines = [f"; the jobs enqueued ({len(jobs)}):"]
        lines += [
            f"  #{j.id} {j.task} queue={j.queue} status={j.status} payload={_short(j.payload)}"
            for j in jobs
        ]
        return "\n".join(lines)


def _as_json(payload: Any) -> Any:
    """A payload as it compares with a stored one: model instances as what they dump to."""
    if payload is _UNSET:
        return payload
    if dataclasses.is_dataclass(payload) or hasattr(payload, "model_dump"):
        return codec.loads(enqueue.encode(payload))
    return payload


def _short(payload: Any, limit: int = 200) -> str:
    text = repr(payload)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_sync(call: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run a coroutine function to its end from synchronous code: on an event loop of
    its own, in a thread of its own if this one runs a loop already."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return anyio.run(call, *args)
    with ThreadPoolExecutor(1, thread_name_prefix="notifyq-testing") as pool:
        return pool.submit(anyio.run, call, *args).result()
