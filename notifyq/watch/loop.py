"""The loop: when the model refreshes, and what happens when the database goes away.

LISTEN notifyq_status (every status change notifies it) and notifyq_progress
(handlers' progress reports); a refresh follows a notification, coalesced to at most
MAX_REFRESHES per second however many arrive, and a quiet `interval` (default 2 s)
refreshes anyway.  When the database goes away the view says "reconnecting" and the
loop reconnects with backoff.  `once` is a single refresh, for `watch --once` and
`stats`.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence

import anyio

from .. import channels, store
from ..errors import DatabaseUnavailable
from ..retry import reconnect_delay
from .model import Model
from .snapshot import Snapshot

MAX_REFRESHES = 3.0  # per second, however many notifications arrive


async def follow(
    dsn: str,
    show: Callable[[Snapshot], None],
    *,
    queues: Sequence[str] | None = None,
    interval: float = 2.0,
    max_age: float = 60.0,
    on_resize: Callable[[], None] | None = None,
    tags: Sequence[str] | None = None,
) -> None:
    """Refresh on notifications (coalesced) and every `interval`; never returns.
    `on_resize` is called when the terminal's size changes (SIGWINCH), to draw the last
    snapshot again at once rather than at the next refresh.  `tags`: count only the jobs
    that have every one of them."""
    if on_resize is None or not hasattr(signal, "SIGWINCH"):  # Windows has no SIGWINCH
        await _follow(dsn, show, queues, interval, max_age, tags)
        return
    async with anyio.create_task_group() as tg:
        tg.start_soon(_call_on_resize, on_resize)
        await _follow(dsn, show, queues, interval, max_age, tags)


async def _call_on_resize(callback: Callable[[], None]) -> None:
    with anyio.open_signal_receiver(signal.SIGWINCH) as signals:
        async for _ in signals:
            callback()


async def _follow(
    dsn: str,
    show: Callable[[Snapshot], None],
    queues: Sequence[str] | None,
    interval: float,
    max_age: float,
    tags: Sequence[str] | None,
) -> None:
    st = store.Store(dsn, "watch")
    listener = store.Listener(dsn, channels.STATUS, channels.PROGRESS)
    model = Model(st, queues, max_age=max_age, tags=tags)
    failures = 0
    clock = anyio.current_time
    try:
        while True:
            try:
                await listener.open()
                while True:
                    show(await model.snapshot())
                    failures = 0
                    last = clock()
                    await listener.wait(ping_after=interval)
                    await anyio.sleep(max(0.0, last + 1 / MAX_REFRESHES - clock()))
                    await listener.drain()  # everything that arrived meanwhile: one refresh
            except DatabaseUnavailable as exc:
                show(model.unreachable(str(exc)))
                await listener.close()
                await st.close()
                failures += 1
                await anyio.sleep(reconnect_delay(failures, first=0.25, cap=5.0, jitter=False))
    finally:
        with anyio.CancelScope(shield=True):
            await listener.close()
            await st.close()


async def once(
    dsn: str,
    queues: Sequence[str] | None = None,
    max_age: float = 60.0,
    tags: Sequence[str] | None = None,
) -> Snapshot:
    st = store.Store(dsn, "watch")
    try:
        return await Model(st, queues, max_age=max_age, tags=tags).snapshot()
    finally:
        await st.close()
