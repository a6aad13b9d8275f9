"""Serving the dashboard: on its own (`notifyq web`), or beside a dispatcher in the
same event loop (`notifyq serve --web-port`), where the dispatcher owns the signals."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from starlette.types import ASGIApp


class _Beside(uvicorn.Server):
    """uvicorn without its signal handlers: the dispatcher's SIGTERM/SIGINT handling
    (graceful shutdown, a second signal exits at once) stays the only one."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def run(app: ASGIApp, host: str, port: int) -> None:
    """Serve until SIGTERM/SIGINT (`notifyq web`)."""
    uvicorn.run(app, host=host, port=port, log_level="info", proxy_headers=False)


async def serve_beside(app: ASGIApp, host: str, port: int) -> None:
    """Serve in the caller's event loop until cancelled (`notifyq serve --web-port`)."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
    await _Beside(config).serve()
