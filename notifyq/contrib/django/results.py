"""A notifyq job, with its recorded attempts, as a Django TaskResult.

Statuses: queued and waiting (for dependencies) are READY, as is a job waiting out
its backoff for another attempt; running is RUNNING; succeeded is SUCCESSFUL;
dead and cancelled are FAILED (Django has no cancelled state).

An attempt is a claim in notifyq.job_history: `worker_ids` are the claimants, one
per attempt (an attempt handed back at shutdown is not counted, as notifyq does
not count it).  `errors` are the failed attempts' errors, each parsed from the
text notifyq stores ("Name: message", a blank line, the traceback): the class
path from the traceback's last line, the traceback whole.  With the history
switched off (`notifyq history off`), only the job row remains: its claimant, its
last error, and "unrecorded" for the claimants of earlier attempts.
"""

from __future__ import annotations

import builtins
import dataclasses
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from django.tasks import Task, TaskResult, TaskResultStatus
from django.tasks.base import TaskError
from django.tasks.exceptions import InvalidTask

from ... import codec
from ...store.rows import AttemptEntry, TaskRecord

STATUS = {
    "queued": TaskResultStatus.READY,
    "waiting": TaskResultStatus.READY,
    "running": TaskResultStatus.RUNNING,
    "succeeded": TaskResultStatus.SUCCESSFUL,
    "dead": TaskResultStatus.FAILED,
    "cancelled": TaskResultStatus.FAILED,
}
UNRECORDED = "unrecorded"
"""The worker id of an attempt the history did not record."""


class AttemptLost(Exception):
    """An attempt that never ended in the handler: the process running it died, or was
    cut off from the database until its lease expired.  notifyq records no exception
    for it; its TaskError has this class and notifyq's message as the traceback."""


_LOST = re.compile(r"attempt \d+ lost: ")


def arguments(payload: Any) -> tuple[list[Any], dict[str, Any]] | None:
    """(args, kwargs) of a Django task's payload, or None if it is not one."""
    if not isinstance(payload, dict) or set(payload) != {"args", "kwargs"}:
        return None
    args, kwargs = payload["args"], payload["kwargs"]
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        return None
    return args, kwargs


def task_result(
    task: Task, record: TaskRecord, history: Sequence[AttemptEntry], backend: str
) -> TaskResult:
    args, kwargs = arguments(codec.loads(record.payload_json)) or ([], {})
    status = STATUS[record.status]
    claims: dict[int, str] = {}
    errors: list[TaskError] = []
    starts: list[datetime] = []
    error_text: str | None = None
    claimed: int | None = None
    for entry in history:
        if entry.error is not None:
            error_text = entry.error
        if entry.to_status == "running":
            claims[entry.attempt] = entry.dispatcher or UNRECORDED
            claimed = entry.attempt
            starts.append(entry.at)
        elif entry.from_status == "running":
            if claimed is not None and entry.attempt != claimed:  # handed back, uncounted
                claims.pop(claimed, None)
            elif entry.to_status in ("queued", "dead") and error_text is not None:
                # A failure: the history keeps an error only when it changed, so the
                # same error twice leaves the second one to the text before it.
                errors.append(task_error(error_text))
            claimed = None
    workers = [claims[attempt] for attempt in sorted(claims)]
    if len(workers) < record.attempts:  # the history was off for some attempts
        missing = record.attempts - len(workers)
        last = [record.claimed_by] if record.claimed_by and not workers else []
        workers = [UNRECORDED] * (missing - len(last)) + last + workers
    if not errors and record.last_error and record.attempts and status != "SUCCESSFUL":
        errors.append(task_error(record.last_error))
    result = TaskResult(
        task=_as_enqueued(task, record),
        id=str(record.id),
        status=status,
        enqueued_at=record.created_at,
        started_at=starts[0] if starts else record.started_at,
        last_attempted_at=starts[-1] if starts else record.started_at,
        finished_at=record.finished_at,
        args=args,
        kwargs=kwargs,
        backend=backend,
        errors=errors,
        worker_ids=workers,
    )
    if status == TaskResultStatus.SUCCESSFUL and record.result_json is not None:
        object.__setattr__(result, "_return_value", codec.loads(record.result_json))
    return result


def _as_enqueued(task: Task, record: TaskRecord) -> Task:
    """The declared task with the job's queue, priority and (when later than its
    enqueue: deferred, or a retry's backoff) run_at."""
    run_after = record.run_at if record.run_at > record.created_at else None
    try:
        return dataclasses.replace(
            task, queue_name=record.queue, priority=record.priority, run_after=run_after
        )
    except InvalidTask:  # a row its backend would refuse now (SQL, or changed settings)
        return task


def task_error(text: str) -> TaskError:
    """A stored error ("Name: message", a blank line, the traceback) as a TaskError."""
    head, blank, trace = text.partition("\n\n")
    if _LOST.match(text):
        path = f"{AttemptLost.__module__}.{AttemptLost.__qualname__}"
    else:
        path = _class_path(head.split(":", 1)[0].strip(), trace)
    return TaskError(exception_class_path=path, traceback=trace if blank else text)


def _class_path(name: str, trace: str) -> str:
    """The exception's class path: the traceback's last line names it with its module
    (builtins' without), the head by its bare name."""
    if not name.isidentifier():
        return "builtins.Exception"
    line = re.compile(rf"((?:[A-Za-z_]\w*\.)*){re.escape(name)}(?::|$)")
    for text in reversed(trace.splitlines()):
        match = line.match(text)
        if match and match.group(1):
            return f"{match.group(1)}{name}"
        if match:
            break
    return f"builtins.{name}" if isinstance(getattr(builtins, name, None), type) else name
