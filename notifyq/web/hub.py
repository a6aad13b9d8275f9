"""The live part of `notifyq web`: one LISTEN connection and one watch Model per
server process, whatever the number of open tabs.

A notification on notifyq_status, notifyq_jobs or notifyq_progress starts a refresh,
coalesced to at most MAX_REFRESHES per second however many arrive, and a quiet
`interval` refreshes anyway (ages move).  A refresh is the watch Model's six
statements; its snapshot is rendered to HTML once and that fragment is handed to
every open Server-Sent Events stream: a tab costs the database nothing, the server
one render per refresh shared by all and one SSE message per refresh per tab.  With
no tab open the hub refreshes nothing and its LISTEN connection is closed (one nobody
reads would hold back the server's notification queue, and NOTIFY fails once it is full).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import anyio

from .. import channels, store
from ..errors import NotifyqError
from ..retry import reconnect_delay
from ..watch import Model, Snapshot

log = logging.getLogger("notifyq.web")

MAX_REFRESHES = 1.0  # per second, fanned out to every tab
FRESH = 1.0  # seconds a snapshot serves page loads before they refresh it


class Hub:
    """Refreshes on notifications while a tab listens; page loads share its snapshots."""

    def __init__(
        self, dsn: str, render: Callable[[Snapshot], str], *, interval: float = 5.0
    ) -> None:
        self._dsn = dsn
        self._render = render
        self.interval = interval
        # Not prepared: the search's filters are optional (NULL: any), and only a plan made
        # for the values given uses the index they allow (a generic plan of `id = $1 OR $1
        # IS NULL` walks the whole table).  Planning each statement is cheap at this rate.
        self.store = store.Store(dsn, "web", prepare=False)
        self._model = Model(self.store)
        self._lock = anyio.Lock()  # one refresh at a time: the Model keeps history
        self._changed = anyio.Event()
        self._wanted = anyio.Event()
        self._last: Snapshot | None = None
        self._last_at = 0.0
        self.fragment = ""
        self.version = 0
        self.listeners = 0  # open SSE streams
        self.running = False  # run() is live: without it streams would never hear a thing
        self.ending = False  # the server shuts down: the streams end

    @property
    def statements(self) -> int:
        """Statements this process's dashboard has run (page loads and refreshes)."""
        return self.store.statements

    async def snapshot(self) -> Snapshot:
        """A snapshot at most FRESH seconds old (page loads: a burst of them shares one)."""
        async with self._lock:
            if self._last is not None and time.monotonic() - self._last_at < FRESH:
                return self._last
            return await self._refresh()

    def forget(self) -> None:
        """After an action: the next page load reads afresh (and sees what it did)."""
        self._last = None

    async def _refresh(self) -> Snapshot:
        snap = await self._model.snapshot()
        self._last, self._last_at = snap, time.monotonic()
        return snap

    def _publish(self, snap: Snapshot) -> None:
        self.fragment = self._render(snap)
        self.version += 1
        self._changed.set()
        self._changed = anyio.Event()

    def end_streams(self) -> None:
        self.ending = True
        self._changed.set()

    @contextmanager
    def listening(self) -> Iterator[None]:
        self.listeners += 1
        self._wanted.set()
        try:
            yield
        finally:
            self.listeners -= 1
            if not self.listeners:
                self._wanted = anyio.Event()

    async def next(self, seen: int, within: float) -> str | None:
        """The fragment of a refresh newer than version `seen`; None after `within` seconds
        or once the hub stops or the server shuts down."""
        with anyio.move_on_after(within):
            while self.version <= seen and self.running and not self.ending:
                await self._changed.wait()
        return self.fragment if self.version > seen else None

    async def run(self) -> None:
        """Until cancelled: LISTEN, refresh (coalesced) while a tab listens, reconnect
        with backoff when the database goes away (the tabs are told)."""
        listener = store.Listener(self._dsn, channels.STATUS, channels.JOBS, channels.PROGRESS)
        failures = 0
        self.running = True
        try:
            while True:
                try:
                    await self._wanted.wait()
                    await listener.open()
                    while self._wanted.is_set():
                        async with self._lock:
                            snap = await self._refresh()
                        self._publish(snap)
                        failures = 0
                        last = anyio.current_time()
                        await listener.wait(ping_after=self.interval)
                        await anyio.sleep(max(0.0, last + 1 / MAX_REFRESHES - anyio.current_time()))
                        await listener.drain()  # all that arrived meanwhile: one refresh
                    # No tab: closed rather than left unread, since a listener that reads
                    # nothing holds back the server's notification queue for everyone.
                    await listener.close()
                except NotifyqError as exc:
                    # Unreachable, or refused (a missing grant): said in the log and on the
                    # pages, then tried again with backoff rather than ending the server.
                    log.warning("dashboard: the live view's refresh failed: %s", exc)
                    self._publish(self._model.unreachable("the refresh failed"))
                    await listener.close()
                    await self.store.close()
                    failures += 1
                    await anyio.sleep(reconnect_delay(failures, first=0.25, cap=5.0, jitter=False))
        finally:
            self.running = False
            self._changed.set()  # the streams see the hub gone and end
            with anyio.CancelScope(shield=True):
                await listener.close()
                await self.store.close()
