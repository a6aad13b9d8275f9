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
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
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
