"""Log lines for machines: one JSON object per line (`notifyq serve --log-format json`).

notifyq logs through stdlib logging and adds no handler of its own (the command
line does).  A line about one job carries that job's fields as attributes of its
record (`extra`), so any formatter can use them, `%(job_id)s` included:

    event     what happened: job.claimed, job.succeeded, job.retried, job.dead,
              job.cancelled (other lines: their message template, a stable name)
    job_id    the job's id
    task, queue, attempt
    outcome   succeeded | retried | dead | cancelled (lines about an attempt's end)
    duration  seconds the handler ran (lines about an attempt's end)

`JsonFormatter` writes every line as {"time", "level", "logger", "event",
"message"} plus those of the fields the record has, and "error" with the
traceback when one was logged.

Lines a handler logs itself (`logging.getLogger(__name__).info(...)` inside the
task) know nothing of the job: `enter_attempt` holds the attempt's job_id, task,
queue and attempt in a context variable while the handler runs (`enter_attempt`),
and `JobContextFilter`, on a handler of the logging tree, copies them onto every
record logged meanwhile.  A filter, not a formatter, because filters run in the
thread that logs, where the context variable is: a sync handler's worker thread
gets a copy of the context (anyio.to_thread.run_sync runs the call in
`copy_context()`), but a thread the handler starts itself does not.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Any

from . import codec
from .job import Job

FIELDS = ("job_id", "task", "queue", "attempt", "outcome", "duration")


def job_fields(job: Job, event: str, **more: Any) -> dict[str, Any]:
    """The `extra` of a line about one attempt of `job`."""
    return {
        "event": event,
        "job_id": job.id,
        "task": job.task,
        "queue": job.queue,
        "attempt": job.attempt,
        **more,
    }


_CONTEXT = ("job_id", "task", "queue", "attempt")

# The attempt running in this context: (job_id, task, queue, attempt), in _CONTEXT's order.
_attempt: ContextVar[tuple[int, str, str, int] | None] = ContextVar("notifyq_attempt", default=None)


def enter_attempt(job_id: int, task: str, queue: str, attempt: int) -> Token[Any]:
    """From now on in this context (this task, and the threads it hands a copy of its
    context), records carry the attempt's fields through `JobContextFilter`; until
    `leave_attempt` with the token returned."""
    return _attempt.set((job_id, task, queue, attempt))


def leave_attempt(token: Token[Any]) -> None:
    _attempt.reset(token)


class JobContextFilter(logging.Filter):
    """Adds job_id, task, queue and attempt to the records logged while a handler runs
    (see `enter_attempt`); a field the record has already is kept.  Put it on a logging
    handler (`handler.addFilter(JobContextFilter())`), not on a logger: a logger's
    filters do not see the records of its children.  `notifyq serve` does it for you."""

    def filter(self, record: logging.LogRecord) -> bool:
        running = _attempt.get()
        if running is not None:
            for name, value in zip(_CONTEXT, running, strict=True):
                if getattr(record, name, None) is None:
                    setattr(record, name, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record.  `clean` is applied to every text taken from the
    record (message, event, traceback) before encoding: the command line passes its
    password redaction, which must see the text as it was, not JSON-escaped."""

    def __init__(self, clean: Callable[[str], str] = str) -> None:
        super().__init__()
        self._clean = clean

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": self._clean(str(getattr(record, "event", None) or record.msg)),
            "message": self._clean(record.getMessage()),
        }
        for field in FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                # A field of someone else's record may hold anything: never fail a line.
                line[field] = value if isinstance(value, int | float | str) else str(value)
        if record.exc_info:
            line["error"] = self._clean(self.formatException(record.exc_info))
        elif record.exc_text:
            line["error"] = self._clean(record.exc_text)
        try:
            return codec.dumps(line)
        except TypeError:
            # orjson refuses lone surrogates (an undecodable file name) and integers past
            # 64 bits: the stdlib escapes the one and writes the other, so no line is lost.
            return json.dumps(line, default=str)
