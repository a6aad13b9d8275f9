"""Follow one job from a browser: Server-Sent Events fed by notifyq_events.

    notifyq events on demo                      # the queue's jobs announce each change
    notifyq serve --app examples.sse.app:jobs   # runs demo.steps
    uvicorn examples.sse.app:app                # then open http://127.0.0.1:8000

`POST /jobs` enqueues a demo job and answers its id and the URL of its event
stream, which carries the job's token: whoever has that URL may follow that job
and no other (the app itself needs no more than the producer role).
`GET /jobs/{id}/events?token=...` streams the job: a `status` event with where it
stands, then `status` and `progress` events as they happen, then `done` with its
result or error.  Events may repeat (a change that happened while the stream
started is in the first `status` too); each carries the job's whole state of its
kind, so showing the latest one is always right.

All streams share one LISTEN connection (hub.py).  pip install -e '.[examples]'.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import notifyq
from notifyq.app import resolve_dsn

from .hub import RESYNC, Hub

QUEUE = "demo"
KEEP_ALIVE = 15.0  # seconds: a comment line keeps proxies from closing a quiet stream
PAGE = (Path(__file__).parent / "index.html").read_text()

jobs = notifyq.App()


@jobs.task(name="demo.steps", queue=QUEUE)
async def steps(payload: dict[str, Any], ctx: notifyq.JobContext) -> dict[str, Any]:
    """The demo job: `steps` steps of `delay` seconds, reporting progress after each."""
    count, delay = int(payload.get("steps", 10)), float(payload.get("delay", 0.5))
    for step in range(1, count + 1):
        await anyio.sleep(delay)  # the work
        ctx.progress(100 * step / count, f"step {step} of {count}")
    return {"steps": count}


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n"


def snapshot(status: notifyq.JobStatus) -> list[str]:
    """Where the job stands, as the events a stream sends."""
    events = [sse("status", {"id": status.id, "status": status.status, "attempt": status.attempts})]
    if status.progress is not None:
        events.append(
            sse("progress", {"progress": status.progress, "message": status.progress_message})
        )
    return events


def create_app(dsn: str | None = None) -> Starlette:
    producer = notifyq.App(dsn)  # enqueues by task name: no handler needed here

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        hub = Hub(resolve_dsn(dsn))
        app.state.hub = hub
        async with anyio.create_task_group() as tg:
            tg.start_soon(hub.run)
            await hub.listening.wait()  # no stream starts before the LISTEN is in place
            yield
            tg.cancel_scope.cancel()
        await producer.aclose()

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE)

    async def enqueue(request: Request) -> Response:
        options = await request.json() if await request.body() else {}
        payload = {k: options[k] for k in ("steps", "delay") if k in options}
        job = await producer.enqueue("demo.steps", payload, queue=QUEUE)
        url = request.url_for("events", job_id=int(job)).include_query_params(token=job.token)
        return JSONResponse({"id": job, "events": str(url)})

    async def events(request: Request) -> Response:
        job_id = int(request.path_params["job_id"])
        try:
            token = uuid.UUID(request.query_params.get("token", ""))
        except ValueError:
            return JSONResponse({"error": "a token is needed"}, status_code=400)
        if await producer.status(job_id, token=token) is None:
            return JSONResponse({"error": "no such job"}, status_code=404)
        stream = follow(request.app.state.hub, job_id, token)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)

    async def follow(hub: Hub, job_id: int, token: uuid.UUID) -> AsyncIterator[str]:
        with hub.follow(job_id) as queue:
            # Read after subscribing: nothing that happens from here on is missed.
            status = await producer.status(job_id, token=token)
            if status is None:
                return
            for line in snapshot(status):
                yield line
            while not status.finished:
                with anyio.move_on_after(KEEP_ALIVE) as quiet:
                    event = await queue.get()
                if quiet.cancelled_caught:
                    yield ": keep-alive\n\n"
                    continue
                if event is RESYNC or event["kind"] == "status":
                    status = await producer.status(job_id, token=token) or status
                if event is RESYNC:
                    for line in snapshot(status):
                        yield line
                elif event["kind"] == "progress":
                    yield sse("progress", {k: event[k] for k in ("progress", "message")})
                else:
                    yield sse("status", {k: event[k] for k in ("id", "status", "attempt")})
            yield sse(
                "done",
                {"status": status.status, "result": status.result, "error": status.last_error},
            )

    return Starlette(
        routes=[
            Route("/", page),
            Route("/jobs", enqueue, methods=["POST"]),
            Route("/jobs/{job_id:int}/events", events, name="events"),
        ],
        lifespan=lifespan,
    )


app = create_app()
