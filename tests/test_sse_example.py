"""examples/sse: a browser follows a job through Server-Sent Events.

The example app runs under a real uvicorn server on a free port, a real
`notifyq serve` runs the demo jobs, and an HTTP client reads the streams as a
browser's EventSource would.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import query, serve_process, wait_until

httpx = pytest.importorskip("httpx", reason="pip install -e '.[test]' (httpx)")
uvicorn = pytest.importorskip("uvicorn", reason="pip install -e '.[test]' (uvicorn)")
pytest.importorskip("starlette", reason="pip install -e '.[test]' (starlette)")

from examples.sse.app import create_app  # noqa: E402 - only once its dependencies are known

Event = tuple[str, dict[str, Any], float]  # name, data, when it arrived (monotonic)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def web_server(dsn: str) -> Iterator[str]:
    """The example app under uvicorn, in a thread; its base URL."""
    port = free_port()
    config = uvicorn.Config(create_app(dsn), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), message="uvicorn to start")
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def read_stream(client: Any, url: str) -> list[Event]:
    """Every event of one stream, until the server ends it."""
    events: list[Event] = []
    name, data = "message", ""
    with client.stream("GET", url) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = line.removeprefix("data: ")
            elif line == "" and data:
                events.append((name, json.loads(data), time.monotonic()))
                name, data = "message", ""
    return events


def listeners(dsn: str) -> int:
    return int(
        query(
            dsn,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'sse-example:listen'",
        )[0][0]
    )


def test_a_browser_follows_jobs_to_their_end_over_one_listen(dsn: str, tmp_path: Path) -> None:
    query(dsn, "SELECT notifyq.set_events('demo', true)")
    log = tmp_path / "serve.log"
    with (
        serve_process(dsn, app="examples.sse.app:jobs", log=log) as proc,
        web_server(dsn) as base,
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        page = client.get("/")
        assert page.status_code == 200
        assert "<progress" in page.text and "new EventSource(" in page.text
        assert "<script src" not in page.text and "<link" not in page.text  # no CDN

        jobs = [client.post("/jobs", json={"steps": 5, "delay": 0.3}).json() for _ in range(2)]
        streams: list[list[Event]] = [[], []]

        def follow(i: int) -> None:
            with httpx.Client(timeout=30) as own:  # a browser tab of its own
                streams[i] += read_stream(own, jobs[i]["events"])

        threads = [threading.Thread(target=follow, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert proc.poll() is None, log.read_text()
        # Both streams ran at once from one LISTEN connection.
        assert listeners(dsn) == 1

        # A stream needs the job's own token.
        url = jobs[0]["events"]
        assert client.get(url.replace(url.split("token=")[1], "0" * 32)).status_code == 404
        assert client.get(url.split("?")[0]).status_code == 400

    for job, events in zip(jobs, streams, strict=True):
        names = [name for name, _, _ in events]
        assert names[0] == "status" and names[-1] == "done", names
        assert events[-1][1] == {"status": "succeeded", "result": {"steps": 5}, "error": None}
        states = [data["status"] for name, data, _ in events if name == "status"]
        assert all(data["id"] == job["id"] for name, data, _ in events if name == "status")
        # In order: never back to an earlier state, ending with the final one.
        order = ["queued", "running", "succeeded"]
        assert [order.index(s) for s in states] == sorted(order.index(s) for s in states)
        assert states[-1] == "succeeded"
        progress = [data for name, data, _ in events if name == "progress"]
        assert [p["progress"] for p in progress] == sorted(p["progress"] for p in progress)
        assert progress[-1] == {"progress": 100.0, "message": "step 5 of 5"}
        assert len(progress) >= 2
        # Streamed as it happened, not buffered until the end: the job ran for 1.5 s.
        first_progress = next(when for name, _, when in events if name == "progress")
        assert events[-1][2] - first_progress > 0.5
