"""Test a notifyq app's tasks: run its jobs without sleeping, assert what was enqueued.

Two ways to run jobs in a test:

    with eager(app) as jobs:          # unit tests, no database
        app.enqueue_sync("mail.send", {"to": "ada@example.com"})   # runs the handler now
        jobs.assert_enqueued("mail.send", count=1)

    queue = TestQueue(app, dsn)       # the real queue, on a test database
    await app.enqueue("mail.send", {"to": "ada@example.com"})
    outcomes = await queue.drain()    # every job due now, until none is; retries too

Eager: enqueue validates the job as it always does, then calls the handler at once,
in the caller's task (a plain `def` handler in a worker thread, as a dispatcher runs it),
and its exception is raised from enqueue.  Nothing is written: `conn=` is ignored,
delays and dependencies are not waited for, and a job of a task the app has no
handler for stays "queued" (enqueued for a worker elsewhere).

Real queue: `drain()` runs a dispatcher until no job is due now or running; a job that
failed and waits out its backoff is made due at once, so the drain ends with every job
it ran succeeded, dead or cancelled.  Delayed jobs are
not run: `Clock.advance` moves the database's timestamps back to bring them due.

The pytest plugin (notifyq/pytest_plugin.py) makes fixtures of these: a migrated
database per session, emptied before each test.

    jobs.py      EnqueuedJob and the assertions both modes share
    eager.py     eager mode
    queue.py     the real queue's drain(), and the Clock
    database.py  the session's database, and a private server for it
"""

from __future__ import annotations

from .database import TestDatabase, private_server
from .eager import EagerQueue, eager
from .jobs import EnqueuedJob
from .queue import Clock, Outcome, TestQueue

__all__ = [
    "Clock",
    "EagerQueue",
    "EnqueuedJob",
    "Outcome",
    "TestDatabase",
    "TestQueue",
    "eager",
    "private_server",
]
