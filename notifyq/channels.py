"""The NOTIFY channels notifyq uses, each named once for all of Python.

The SQL side (the triggers and functions in schema.sql) sends on them; what
each payload holds is documented where it is sent and in docs/channels.md.
Every payload is a hint, never the queue: a listener that misses one finds
the work by polling.
"""

from __future__ import annotations

from typing import Final

JOBS: Final = "notifyq_jobs"
"""A queue got work it can claim now (payload: the queue's name)."""

STATUS: Final = "notifyq_status"
"""A job changed status (payload: {"queue", "status"})."""

PROGRESS: Final = "notifyq_progress"
"""A handler reported progress (ctx.progress)."""

EVENTS: Final = "notifyq_events"
"""Per-job events, for the queues that asked for them (notifyq.set_events)."""

INTERNAL: Final = "notifyq_internal"
"""The dispatchers' own messages (probes, cap changes); not part of the public contract."""
