"""A claimed job and the context its handler receives.

The states of a job (column `status`) and who moves it between them:

    INSERT ──> queued ──claim──> running ──success──> succeeded
                 ^                 │ │ └──no attempts left / DoNotRetry──> dead
                 │                 │ └────handed back at shutdown (attempt not counted)──┐
                 └──retry (backoff)┴──lease expired, rescued (attempt counted)───────────┤
                 └───────────────────────────────────────────────────────────────────────┘
    queued/running ──UPDATE by an operator──> cancelled
    dead ──UPDATE by an operator──> queued          (the dead-letter queue is re-queueable)

    INSERT with depends_on ──> waiting ──every dependency succeeded──> queued
                                  └──a dependency ended dead or cancelled──> cancelled
                                     (or queued once all finished, with on_dependency_failure 'run')
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    DEAD = "dead"
    CANCELLED = "cancelled"
    WAITING = "waiting"


@dataclass(frozen=True, slots=True)
class Job:
    """One claimed attempt of a job, as the claim returned it."""

    id: int
    queue: str
    task: str
    payload: Any
    attempt: int
    max_attempts: int


@dataclass(frozen=True, slots=True)
class JobContext:
    """What a handler may know about the attempt it runs.

    `stopping` is set when the dispatcher shuts down: an attempt that does not
    finish within the shutdown timeout is handed back, so a long synchronous
    handler (which cannot be cancelled) can check it and stop early.

    `cancelled` is set when an operator cancels the job while a synchronous
    handler runs it: the handler should return soon (the job stays cancelled
    whatever it returns).  An async handler is cancelled instead (it sees
    CancelledError), and its `cancelled` is never set.
    """

    id: int
    queue: str
    task: str
    attempt: int
    max_attempts: int
    stopping: threading.Event = field(default_factory=threading.Event, compare=False)
    cancelled: threading.Event = field(default_factory=threading.Event, compare=False)
