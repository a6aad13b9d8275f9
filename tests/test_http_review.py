"""HTTP tasks, from the review of issue 16: rows of notifyq.endpoints a dispatcher cannot
serve, Retry-After values an endpoint should not send, and a response body that never
ends.  Endpoints are real servers on 127.0.0.1 (tests/test_http.py has the fixtures)."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import notifyq
from notifyq import ConfigurationError
from notifyq.http.delivery import retry_after, shown
from notifyq.http.endpoints import endpoint
from notifyq.worker_pool import encode_result
from tests.conftest import query
from tests.helpers import eventually, serving
from tests.test_http import Endpoints, app, asgi_server, job_row, ok, status_of, web

uvicorn = pytest.importorskip("uvicorn", reason="pip install -e '.[test]' (uvicorn)")

pytestmark = pytest.mark.anyio

__all__ = ["app", "web"]  # fixtures, imported to be used here


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://host:99999/x", "cannot be parsed"),
        ("http://host:abc/x", "cannot be parsed"),
        ("http://[::1/x", "cannot be parsed"),
        ("http://host/a b", "space or a control character"),
        ("http://host/\x7f", "space or a control character"),
        ("http://user:token-123@host/x", "user or password"),
        ("http://:@/x", "no host"),
    ],
)
def test_an_endpoint_url_no_request_could_use_is_refused(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as caught:
        endpoint("t", url)
    assert "token-123" not in str(caught.value)


def test_a_wrong_scheme_is_quoted_without_its_password() -> None:
    with pytest.raises(ConfigurationError, match="http:// or https://") as caught:
        endpoint("t", "ftp://user:token-123@host/x")
    assert "token-123" not in str(caught.value)


@pytest.mark.parametrize("value", ["café", "a\x01b", "x\x7f"])
def test_a_header_value_httpx_cannot_send_is_refused(value: str) -> None:
    with pytest.raises(ConfigurationError, match="printable ASCII"):
        endpoint("t", "http://host/x", headers={"X-Tag": value})


def test_a_header_value_may_hold_spaces_and_tabs() -> None:
    ep = endpoint("t", "http://host/x", headers={"X-Tag": "a b\tc"})
    assert ep.headers == (("X-Tag", "a b\tc"),)


def test_a_url_with_a_bad_port_is_shown_not_raised() -> None:
    assert shown("http://user:pw@host:99999/x?k=1") == "<unreadable URL>"


def test_retry_after_refuses_what_is_not_ascii_seconds_or_a_date() -> None:
    # A header byte 0xB2 decodes (Latin-1) to "²", which isdigit() but float() refuses.
    assert retry_after("\xb2") is None
    assert retry_after("-5") is None
    assert retry_after("1.5") is None
    assert retry_after("garbage") is None
    assert retry_after(" 12 ") == 12.0
    assert retry_after("9" * 400) == 86400.0  # huge: a day
    assert retry_after("Thu, 01 Jan 1970 00:00:00 GMT") == 0.0  # past: at once
    assert retry_after("Fri, 31 Dec 9999 23:59:59 GMT") == 86400.0


async def test_rows_that_cannot_be_served_leave_the_others_served(
    app: notifyq.App, dsn: str, web: Endpoints, caplog: pytest.LogCaptureFixture
) -> None:
    # Each of these rows passes the table's CHECKs.  Before the review, the bad port
    # raised ValueError in the reload (shown()), which stopped the dispatcher.
    rows = {
        "bad.port": "http://127.0.0.1:99999/x",
        "with.password": "http://user:token-123@127.0.0.1/x",
        "no.secret": web.url("/never"),
        "good": web.on("/good", ok({"served": True})),
    }
    for task, url in rows.items():
        query(dsn, "INSERT INTO notifyq.endpoints (task, url) VALUES (%s, %s)", task, url)
    query(dsn, "UPDATE notifyq.endpoints SET secret = 'NOT_SET_ANYWHERE' WHERE task = 'no.secret'")
    with caplog.at_level(logging.INFO, logger="notifyq.http"):
        async with serving(app, dsn) as worker:
            assert worker.http.tasks == ["good"]
            waiting = [await app.enqueue(task) for task in ("bad.port", "with.password")]
            good = await app.enqueue("good")
            assert await app.wait(good, timeout=20) == {"served": True}
            # A reload after a change reads the bad rows again, and still serves.
            query(dsn, "UPDATE notifyq.endpoints SET timeout = 5 WHERE task = 'good'")
            await eventually(lambda: worker.registry.get("good").handler.endpoint.timeout == 5)  # type: ignore[union-attr]
            again = await app.enqueue("good")
            assert await app.wait(again, timeout=20) == {"served": True}
    assert [status_of(dsn, job) for job in waiting] == ["queued", "queued"]
    assert "bad.port" in caplog.text and "cannot be parsed" in caplog.text
    assert "NOTIFYQ_SECRET_NOT_SET_ANYWHERE" in caplog.text
    assert "with.password" in caplog.text and "token-123" not in caplog.text
    assert web.at("/never") == []


async def test_a_retry_after_that_is_not_a_number_is_retried_with_backoff(
    app: notifyq.App, dsn: str, web: Endpoints
) -> None:
    url = web.on("/busy", (503, {"retry-after": "soon"}, b"busy"), ok("done"))
    app.http_task("busy", url=url, max_attempts=3)
    async with serving(app, dsn):
        job = await app.enqueue("busy")
        assert await app.wait(job, timeout=30) == "done"
    assert job_row(dsn, job)[:2] == ("succeeded", 2)


class EndlessBody:
    """An endpoint that answers 200 and streams a body that never ends, until the client
    goes away: a cap checked only after reading the whole body would never return."""

    def __init__(self) -> None:
        self.sent = 0
        self.disconnected = threading.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        chunk = b"x" * 65536

        async def stream() -> None:
            while True:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                self.sent += len(chunk)
                # After a disconnect uvicorn's send returns at once: let the loop breathe.
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(stream)
            # The request was read: the next message is the client going away.
            while (await receive())["type"] != "http.disconnect":
                pass
            self.disconnected.set()
            tg.cancel_scope.cancel()


@pytest.fixture
def endless() -> Iterator[tuple[EndlessBody, str]]:
    body = EndlessBody()
    with asgi_server(body) as base:
        yield body, f"{base}/endless"


async def test_a_body_that_never_ends_is_cut_while_streaming(
    app: notifyq.App, dsn: str, endless: tuple[EndlessBody, str]
) -> None:
    body, url = endless
    app.http_task("endless", url=url, timeout=60)
    async with serving(app, dsn):
        job = await app.enqueue("endless")
        # Well before the 60 s timeout: the cap, not the clock, ends the request.
        await eventually(lambda: status_of(dsn, job) == "dead", within=20)
    _, attempts, result, last_error, _ = job_row(dsn, job)
    assert (attempts, result) == (1, None)
    assert "over 1048576 bytes" in last_error
    await eventually(body.disconnected.is_set)  # the connection was dropped, not drained


async def test_responses_are_asked_for_uncompressed(
    app: notifyq.App, dsn: str, web: Endpoints
) -> None:
    app.http_task("plain", url=web.on("/plain", ok("plain")))
    async with serving(app, dsn):
        job = await app.enqueue("plain")
        assert await app.wait(job, timeout=20) == "plain"
    assert [r.headers["accept-encoding"] for r in web.at("/plain")] == ["identity"]


def test_accept_encoding_cannot_be_configured() -> None:
    with pytest.raises(ConfigurationError, match="cannot be configured"):
        endpoint("t", "http://host/x", headers={"Accept-Encoding": "gzip"})


async def test_a_result_postgresql_cannot_store_fails_the_job_once(
    app: notifyq.App, dsn: str, web: Endpoints
) -> None:
    # jsonb refuses \u0000: before the review the completion's write failed, and the
    # rescuer ran the job again each time its lease expired.
    app.http_task("nul", url=web.on("/nul", (200, {}, b'"a\\u0000b"')))
    async with serving(app, dsn):
        job = await app.enqueue("nul")
        await eventually(lambda: status_of(dsn, job) == "dead")
    _, attempts, result, last_error, _ = job_row(dsn, job)
    assert (attempts, result) == (1, None)
    assert "ResultError" in last_error and "NUL character" in last_error
    assert len(web.at("/nul")) == 1


def test_a_literal_backslash_u0000_is_a_storable_result() -> None:
    assert encode_result("t", "a\\u0000b") == '"a\\\\u0000b"'


@pytest.fixture
def raw_server() -> Iterator[tuple[list[bytes], str]]:
    """A plain socket server that answers every request with `replies[0]`, as raw bytes:
    for status lines uvicorn would not send."""
    replies: list[bytes] = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    # accept() wakes every 0.1 s to look at `stop`: closing a listening socket does not
    # wake a thread blocked in accept() on Linux, and the teardown would wait its join out.
    listener.settimeout(0.1)
    stop = threading.Event()

    def answer() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(
                    next(
                        line.split(b":")[1]
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    )
                )
                while len(body) < length:
                    body += conn.recv(65536)
                conn.sendall(replies[0])

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield replies, f"http://127.0.0.1:{listener.getsockname()[1]}/raw"
    finally:
        stop.set()
        listener.close()
        thread.join(10)


async def test_the_reason_phrase_is_capped_and_cleaned_in_last_error(
    app: notifyq.App, dsn: str, raw_server: tuple[list[bytes], str], monkeypatch: Any
) -> None:
    replies, url = raw_server
    secret = "reason-secret-value"
    monkeypatch.setenv("NOTIFYQ_SECRET_RAW", secret)
    reason = (secret + " " + "r" * 5000).encode()
    replies.append(
        b"HTTP/1.1 400 " + reason + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno"
    )
    app.http_task("raw", url=url, secret="RAW")
    async with serving(app, dsn):
        job = await app.enqueue("raw")
        await eventually(lambda: status_of(dsn, job) == "dead")
    last_error = job_row(dsn, job)[3]
    assert "HTTP 400 ***" in last_error and "rrr" in last_error
    assert secret not in last_error
    assert "r" * 200 not in last_error
