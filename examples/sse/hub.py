"""One LISTEN connection for every browser: notifyq_events, fanned out in-process.

However many streams are open, the app holds one connection that LISTENs on
notifyq_events; each notification (a JSON array of events, see the channel
docs) is split by job id and handed to the queues of the streams following
those jobs.  After the connection is lost and back, every stream is told to
read its job again (`RESYNC`): notifications sent meanwhile went to no one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import psycopg
from psycopg import sql

from notifyq import channels

log = logging.getLogger("examples.sse")

RESYNC: dict[str, Any] = {"kind": "resync"}  # "read the job again": events may have been lost


class Hub:
    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._followers: dict[int, set[asyncio.Queue[dict[str, Any]]]] = defaultdict(set)
        self.listening = asyncio.Event()

    @contextmanager
    def follow(self, job_id: int) -> Iterator[asyncio.Queue[dict[str, Any]]]:
        """A queue of the events of `job_id`, for as long as the block runs."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._followers[job_id].add(queue)
        try:
            yield queue
        finally:
            self._followers[job_id].discard(queue)
            if not self._followers[job_id]:
                del self._followers[job_id]

    async def run(self) -> None:
        """LISTEN until cancelled, reconnecting with backoff."""
        failures = 0
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._dsn, autocommit=True, application_name="sse-example:listen"
                ) as conn:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channels.EVENTS)))
                    if failures:
                        self._broadcast(RESYNC)
                    failures = 0
                    self.listening.set()
                    async for note in conn.notifies():
                        self._dispatch(note.payload)
            except psycopg.OperationalError as exc:
                self.listening.clear()
                failures += 1
                delay = min(10.0, 0.2 * 2**failures) * random.uniform(0.5, 1.0)
                log.warning("LISTEN connection lost (%s); reconnecting in %.1fs", exc, delay)
                await asyncio.sleep(delay)

    def _dispatch(self, payload: str) -> None:
        events: Any = None
        with suppress(ValueError):
            events = json.loads(payload)
        if not isinstance(events, list):
            return  # anyone may NOTIFY any channel: ignore what is not ours
        for event in events:
            if isinstance(event, dict) and event.get("v") == 1:
                for queue in self._followers.get(event.get("id", 0), ()):
                    queue.put_nowait(event)

    def _broadcast(self, event: dict[str, Any]) -> None:
        for queues in self._followers.values():
            for queue in queues:
                queue.put_nowait(event)
