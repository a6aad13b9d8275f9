"""The Starlette application: routes, each a read through the store or an action
through admin.py's SQL functions (the CLI's), and the page it answers with.

One Store (one connection) serves every page load and the live refreshes; an action
opens a short connection of its own, like the CLI.  The Hub runs in the app's
lifespan: mounted in another ASGI app, that app's lifespan must enter this one's
(docs/web.md), or the live stream answers 503 saying so.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qsl

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import admin, periodic, store
from ..errors import ConfigurationError, DatabaseUnavailable, NotifyqError, OperationRefused
from ..store.dashboard import JobFilter
from ..watch import Snapshot
from . import pages
from .hub import Hub
from .security import CSRF_COOKIE, Guard, csrf_ok, csrf_token

log = logging.getLogger("notifyq.web")

STATIC = Path(__file__).parent / "static"
KEEPALIVE = 15.0  # seconds between SSE comments on a quiet stream (proxies drop idle ones)
SEARCH_LIMIT = 100

Handler = Callable[[Request], Awaitable[Response]]


def create_app(
    dsn: str,
    *,
    read_only: bool = False,
    token: str | None = None,
    show_payloads: bool = True,
    interval: float = 5.0,
) -> Starlette:
    """The dashboard as an ASGI app.  `token`: every request must carry it (Bearer, or
    Basic's password); `read_only`: every action answers 403; `show_payloads` False:
    payloads, results and checkpoints are never rendered.  `interval`: seconds between
    refreshes of the live view when no notification arrives."""
    dash = _Dashboard(dsn, read_only=read_only, show_payloads=show_payloads, interval=interval)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(dash.hub.run)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()

    routes = [
        Route("/", dash.page(dash.overview)),
        Route("/jobs", dash.page(dash.jobs)),
        Route("/jobs/{job_id:int}", dash.page(dash.job)),
        Route("/jobs/{job_id:int}/{action:str}", dash.action(dash.job_action), methods=["POST"]),
        Route("/queues/{queue:str}/{action:str}", dash.action(dash.queue_action), methods=["POST"]),
        Route("/dispatchers", dash.page(dash.dispatchers)),
        Route("/schedules", dash.page(dash.schedules)),
        Route("/purge", dash.page(dash.purge_form)),
        Route("/purge", dash.action(dash.purge), methods=["POST"]),
        Route("/events", dash.events),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.hub = dash.hub
    app.add_middleware(Guard, token=token)
    return app


class _Dashboard:
    def __init__(self, dsn: str, *, read_only: bool, show_payloads: bool, interval: float) -> None:
        self.dsn = dsn
        self.read_only = read_only
        self.show_payloads = show_payloads
        self.hub = Hub(dsn, self._fragment, interval=interval)

    def _fragment(self, snap: Snapshot) -> str:
        # Shared by every tab: no session's token in it (dashboard.js fills the forms), and
        # links relative to the overview, the one page it replaces a part of (wherever
        # the app is mounted).
        return pages.overview(pages.Page(".", "", self.read_only, self.show_payloads), snap)

    def _page(self, request: Request, csrf: str) -> pages.Page:
        base = request.scope.get("root_path", "")
        return pages.Page(base, csrf, self.read_only, self.show_payloads)

    def page(self, render: Callable[[Request, pages.Page], Awaitable[Response]]) -> Handler:
        """A GET: the session's CSRF cookie set if new; an unreachable database a 503."""

        async def handle(request: Request) -> Response:
            csrf, new = csrf_token(request)
            p = self._page(request, csrf)
            try:
                response = await render(request, p)
            except DatabaseUnavailable as exc:
                log.warning("dashboard: database unreachable: %s", exc)
                text = "The database is unreachable; details are in the server's log."
                response = HTMLResponse(pages.message(p, "Unavailable", text, "/"), 503)
            except NotifyqError as exc:  # a missing grant, most likely: docs/web.md lists them
                log.warning("dashboard: %s", exc)
                response = HTMLResponse(pages.message(p, "Failed", str(exc), "/"), 500)
            if new:
                response.set_cookie(
                    CSRF_COOKIE,
                    csrf,
                    httponly=True,
                    samesite="strict",
                    path=p.base or "/",
                    secure=request.url.scheme == "https",
                )
            return response

        return handle

    def action(
        self, run: Callable[[Request, pages.Page, list[tuple[str, str]]], Awaitable[Response]]
    ) -> Handler:
        """A POST: refused in read-only mode and without the session's CSRF token; a
        refusal of the SQL function is shown with its message."""

        async def handle(request: Request) -> Response:
            csrf, _ = csrf_token(request)
            p = self._page(request, csrf)
            if self.read_only:
                return PlainTextResponse("read-only dashboard: actions are disabled\n", 403)
            form = await _form(request)
            if not csrf_ok(request, dict(form)):
                return PlainTextResponse(
                    "refused: the form's CSRF token or origin does not match this session "
                    "(reload the page and try again)\n",
                    403,
                )
            try:
                return await run(request, p, form)
            except (OperationRefused, ConfigurationError) as exc:
                return HTMLResponse(pages.message(p, "Refused", str(exc), "/"), 409)
            except DatabaseUnavailable as exc:
                log.warning("dashboard: database unreachable: %s", exc)
                text = "The database is unreachable; details are in the server's log."
                return HTMLResponse(pages.message(p, "Unavailable", text, "/"), 503)
            finally:
                self.hub.forget()  # the next page load shows what the action did

        return handle

    # --- pages

    async def overview(self, request: Request, p: pages.Page) -> Response:
        return HTMLResponse(pages.overview_page(p, await self.hub.snapshot()))

    async def dispatchers(self, request: Request, p: pages.Page) -> Response:
        return HTMLResponse(pages.dispatchers_page(p, await self.hub.snapshot()))

    async def schedules(self, request: Request, p: pages.Page) -> Response:
        lines = []
        for s in await store.dashboard.schedules(self.hub.store):
            problem, upcoming = None, None
            try:
                at = max(s.now, s.since)
                upcoming = periodic.next_after(s.schedule, periodic.parse_zone(s.timezone), at)
            except (ConfigurationError, ValueError) as exc:  # a row written by hand, broken
                problem = str(exc)
            lines.append(
                pages.ScheduleLine(
                    s.name,
                    s.task,
                    s.queue,
                    s.schedule,
                    s.timezone,
                    s.paused,
                    s.last_instant,
                    None if s.paused else upcoming,
                    problem,
                )
            )
        return HTMLResponse(pages.schedules_page(p, lines))

    async def jobs(self, request: Request, p: pages.Page) -> Response:
        form = {k: v.strip() for k, v in request.query_params.items() if v.strip()}
        try:
            if not self.show_payloads and ("key" in form or "value" in form):
                # Matches would tell the value of a hidden payload, one guess at a time.
                raise ValueError("payload search is off: payloads are hidden (--hide-payloads)")
            wanted = _job_filter(form)
        except ValueError as exc:
            return HTMLResponse(pages.jobs_page(p, form, [], str(exc)), 400)
        found = await store.dashboard.search_jobs(self.hub.store, wanted)
        return HTMLResponse(pages.jobs_page(p, form, found))

    async def job(self, request: Request, p: pages.Page) -> Response:
        job_id = int(request.path_params["job_id"])
        found = await store.dashboard.job(self.hub.store, job_id)
        if found is None:
            return HTMLResponse(pages.message(p, "Not found", f"No job {job_id}.", "/jobs"), 404)
        history = await store.dashboard.attempts(self.hub.store, job_id)
        done = _DONE.get(request.query_params.get("done", ""), "")
        return HTMLResponse(pages.job_page(p, found, history, done))

    async def purge_form(self, request: Request, p: pages.Page) -> Response:
        if self.read_only:
            return PlainTextResponse("read-only dashboard: actions are disabled\n", 403)
        return HTMLResponse(pages.purge_page(p))

    # --- actions: admin.py's functions, the CLI's, each on a short connection of its own

    async def job_action(
        self, request: Request, p: pages.Page, form: list[tuple[str, str]]
    ) -> Response:
        job_id = int(request.path_params["job_id"])
        action = request.path_params["action"]
        if action == "retry":
            await anyio.to_thread.run_sync(admin.retry_job, self.dsn, job_id)
        elif action == "cancel":
            await anyio.to_thread.run_sync(admin.cancel_job, self.dsn, job_id)
        else:
            return PlainTextResponse("unknown action: retry or cancel\n", 404)
        return RedirectResponse(f"{p.base}/jobs/{job_id}?done={action}", 303)

    async def queue_action(
        self, request: Request, p: pages.Page, form: list[tuple[str, str]]
    ) -> Response:
        queue = request.path_params["queue"]
        action = request.path_params["action"]
        if action == "pause":
            await anyio.to_thread.run_sync(admin.pause_queue, self.dsn, queue)
        elif action == "resume":
            await anyio.to_thread.run_sync(admin.resume_queue, self.dsn, queue)
        else:
            return PlainTextResponse("unknown action: pause or resume\n", 404)
        return RedirectResponse(f"{p.base}/", 303)

    async def purge(self, request: Request, p: pages.Page, form: list[tuple[str, str]]) -> Response:
        statuses = [v for k, v in form if k == "status"]
        fields = dict(form)
        if fields.get("confirm", "").strip() != "purge":
            note = "Not purged: type purge in the confirmation box."
            return HTMLResponse(pages.purge_page(p, note), 400)
        if not statuses or not set(statuses) <= set(admin.FINISHED):
            note = "Not purged: choose among succeeded, cancelled and dead."
            return HTMLResponse(pages.purge_page(p, note), 400)
        older_than = admin.parse_age(fields.get("older_than", ""))
        deleted = await anyio.to_thread.run_sync(admin.purge, self.dsn, older_than, statuses)
        which = ", ".join(statuses)
        text = f"Deleted {deleted} job(s) ({which}) finished over {fields['older_than']} ago."
        return HTMLResponse(pages.message(p, "Purged", text, "/"))

    # --- the live stream

    async def events(self, request: Request) -> Response:
        hub = self.hub
        if not hub.running:
            return PlainTextResponse(
                "live updates are off: the dashboard's lifespan is not running (mounted in "
                "another app, enter its lifespan there: see docs/web.md)\n",
                503,
            )

        async def stream() -> AsyncIterator[str]:
            with hub.listening():
                yield "retry: 3000\n\n"
                seen = 0
                while hub.running and not hub.ending:
                    fragment = await hub.next(seen, KEEPALIVE)
                    if fragment is None:
                        yield ": keep-alive\n\n"
                        continue
                    seen = hub.version
                    data = "".join(f"data: {line}\n" for line in fragment.splitlines())
                    yield f"id: {seen}\nevent: overview\n{data}\n"

        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


_DONE = {"retry": "Retried: the job is queued to run now.", "cancel": "Cancelled."}


async def _form(request: Request) -> list[tuple[str, str]]:
    """The urlencoded form (python-multipart, which Starlette's form() needs, is not a
    dependency: the dashboard's forms are all urlencoded)."""
    return parse_qsl((await request.body()).decode("utf-8", "replace"))


def _job_filter(form: dict[str, str]) -> JobFilter:
    """The search form as a JobFilter; ValueError says which field is wrong."""

    def number(name: str) -> int | None:
        if name not in form:
            return None
        if not form[name].isdigit():
            raise ValueError(f"{name}: a job id is a whole number")
        return int(form[name])

    def instant(name: str) -> datetime | None:
        if name not in form:
            return None
        try:
            at = datetime.fromisoformat(form[name])
        except ValueError:
            raise ValueError(f"{name}: not a date and time (2026-01-31T14:00)") from None
        return at if at.tzinfo else at.replace(tzinfo=UTC)

    if "value" in form and "key" not in form:
        raise ValueError("payload value: give the payload key it belongs to")
    return JobFilter(
        id=number("id"),
        queue=form.get("queue"),
        task=form.get("task"),
        status=form.get("status"),
        since=instant("since"),
        until=instant("until"),
        key=form.get("key"),
        value=form.get("value", "") if "key" in form else None,
        limit=SEARCH_LIMIT,
    )


__all__ = ["create_app"]
