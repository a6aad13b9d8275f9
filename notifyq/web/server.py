"""Serving the dashboard: on its own (`notifyq web`), or beside a dispatcher in the
same event loop (`notifyq serve --web-port`), where the dispatcher owns the signals.

Live streams never end by themselves: at shutdown the hub ends them first (uvicorn
waits for open responses before it runs the lifespan's end), and any connection still
open after GRACE seconds is closed.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import uvicorn
from starlette.types import ASGIApp

from .hub import Hub

GRACE = 3  # seconds open connections (live streams) get at shutdown


class _Server(uvicorn.Server):
    """uvicorn that ends the dashboard's live streams when it shuts down."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        hub = getattr(getattr(self.config.app, "state", None), "hub", None)
        if isinstance(hub, Hub):
            hub.end_streams()
        await super().shutdown(sockets)


class _Beside(_Server):
    """Without uvicorn's signal handlers: the dispatcher's SIGTERM/SIGINT handling
    (graceful shutdown, a second signal exits at once) stays the only one."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def run(app: ASGIApp, host: str, port: int) -> None:
    """Serve until SIGTERM/SIGINT (`notifyq web`)."""
    config = uvicorn.Config(
        app, host=host, port=port, log_level="info", timeout_graceful_shutdown=GRACE
    )
    _Server(config).run()


async def serve_beside(app: ASGIApp, host: str, port: int) -> None:
    """Serve in the caller's event loop until cancelled (`notifyq serve --web-port`).
    Cancelled, it asks uvicorn to shut down and waits for it (uvicorn's own shutdown,
    the app's lifespan included, would log a traceback if it were cancelled instead)."""
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=GRACE
    )
    server = _Beside(config)

    async def serve() -> None:
        with anyio.CancelScope(shield=True):
            await server.serve()

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve)
        try:
            await anyio.sleep_forever()
        finally:
            server.should_exit = True
