"""ASGI apps (FastAPI, Starlette): open and close a notifyq App with the web app.

    from notifyq.contrib.asgi import lifespan

    jobs = notifyq.App()
    api = FastAPI(lifespan=lifespan(jobs))

At start-up the lifespan checks that the database answers and has the schema this
notifyq needs (a web app deployed before `notifyq migrate` fails at once, not at its
first enqueue); at shutdown it closes the connections the App opened (its enqueue and
wait connections open on first use).
With `serve=Settings(...)` it also runs a dispatcher for the App's tasks in the web
process, stopped gracefully (running jobs finish or are handed back) at shutdown: for
development and small deployments; `notifyq serve` in its own process is the usual way.
`then` chains the web app's own lifespan inside notifyq's.

To enqueue inside the request's transaction, pass that transaction's connection or
session as `conn=` (a psycopg connection, or a SQLAlchemy session: contrib/sqlalchemy.py);
examples/fastapi/app.py does it with a psycopg connection.  Nothing here imports a web
framework.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import Any

import anyio

from .. import migrate
from ..app import App, resolve_dsn
from ..settings import Settings

Lifespan = Callable[[Any], AbstractAsyncContextManager[Any]]


def lifespan(
    app: App,
    *,
    serve: Settings | None = None,
    check_schema: bool = True,
    then: Lifespan | None = None,
) -> Lifespan:
    """A lifespan for `FastAPI(lifespan=...)` / `Starlette(lifespan=...)` (see above)."""

    @asynccontextmanager
    async def run(web_app: Any) -> AsyncIterator[Any]:
        dsn = resolve_dsn(app.dsn)
        if check_schema:
            await anyio.to_thread.run_sync(migrate.check, dsn)
        try:
            async with anyio.create_task_group() as tg:
                worker = app.worker(serve, dsn=dsn) if serve is not None else None
                if worker is not None:
                    tg.start_soon(worker.run)
                try:
                    async with then(web_app) if then is not None else nullcontext() as state:
                        yield state
                finally:
                    if worker is not None:
                        worker.stop()  # graceful: the task group waits for it
        finally:
            await app.aclose()

    return run
