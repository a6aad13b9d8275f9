"""The POST of one job to its endpoint, and what the response means for the job.

    POST <url>
    Content-Type: application/json
    User-Agent: notifyq/<version>
    Notifyq-Job-Id: 42              Notifyq-Attempt: 1         Notifyq-Task: report.generate
    Idempotency-Key: notifyq-42     (the same for every attempt of one job)
    Notifyq-Signature: t=...,v1=... (when the endpoint names a secret: signing.py)
    <the endpoint's own headers>

    {"id": 42, "task": "report.generate", "queue": "default", "attempt": 1,
     "max_attempts": 5, "payload": {...}, "checkpoint": null, "worker": "<claimant>"}

`worker` is the claim the attempt runs under: with the id and attempt it lets the
endpoint report progress through SQL, `notifyq.progress(id, worker, ...)`, which is
fenced by that claim like every write of the worker protocol.

What the response means (docs/http.md has the table):

    2xx                             succeeded; a JSON body is the result (empty: none;
                                    not JSON: the text, as a JSON string)
    429, 503 with Retry-After       failed; runs again no earlier than it says (Retry)
    408, 425, 429, 5xx, a timeout,
    no connection                   failed; runs again after the task's backoff
    3xx (never followed), other 4xx dead at once (DoNotRetry): sending it again would
                                    get the same answer

The attempt runs as any async handler does (worker_pool.py), so leases, retries,
dead letters, cancel and history are the dispatcher's: a cancelled job's scope is
cancelled, which aborts the request (the endpoint sees the connection close).

httpx is the client: it runs on anyio (no second concurrency model in the loop),
keeps an HTTP/1.1 keep-alive pool per dispatcher, has per-phase timeouts, and
streams response bodies, so a body over the cap is cut without being read whole.
"""

from __future__ import annotations

import email.utils
import importlib.metadata
import logging
import math
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx

from .. import codec
from ..errors import ConfigurationError, DoNotRetry, JobFailure, ResultError, Retry, redact
from ..job import JobContext
from ..worker_pool import MAX_RESULT
from .endpoints import Endpoint, Secrets
from .signing import SIGNATURE_HEADER, sign

log = logging.getLogger("notifyq.http")

CONNECTIONS_PER_CLIENT = 8  # see Session.__init__
# From the installed package's metadata: importing notifyq for its __version__ would be a
# cycle (notifyq imports the app, which imports this module).
try:
    USER_AGENT = f"notifyq/{importlib.metadata.version('notifyq')}"
except importlib.metadata.PackageNotFoundError:  # a source tree never installed
    USER_AGENT = "notifyq"
PREVIEW = 500  # characters of a failed response's body kept in last_error
REASON = 100  # characters of a status line's reason phrase kept in last_error
MAX_RETRY_AFTER = 86400.0  # seconds: a Retry-After beyond a day is read as a day
RETRYABLE = frozenset({408, 425, 429})  # and every 5xx
# What an observer hears per request: task, code (the status, "timeout" or "error"), seconds.
Observer = Callable[[str, str, float], None]


class DeliveryFailed(JobFailure):
    """The endpoint could not take the job now (a retryable status, a timeout, no
    connection): the attempt failed and the task's backoff decides when it runs again."""


class DeliveryRefused(DoNotRetry):
    """The endpoint refused the job (a 4xx other than 408, 425, 429; or a redirect, which
    is never followed): the job goes dead; sending it again would get the same answer."""


class Delivery:
    """The handler of an HTTP task.  As declared (`App.http_task`) it has no session;
    the dispatcher binds it to its own (`Session.bind`) before serving it."""

    def __init__(self, endpoint: Endpoint, session: Session | None = None) -> None:
        self.endpoint = endpoint
        self._session = session
        self._keys: list[str] = [] if session is None else session.keys_for(endpoint)

    async def __call__(self, payload: Any, ctx: JobContext) -> Any:
        if self._session is None:
            raise ConfigurationError(
                f"HTTP task {self.endpoint.task!r} is delivered by a dispatcher "
                "(notifyq serve, App.worker), not called directly"
            )
        return await self._session.deliver(self.endpoint, self._keys, payload, ctx)


class Session:
    """One dispatcher's HTTP client: a keep-alive pool shared by every endpoint, and the
    per-endpoint concurrency limiters.  `aclose()` when the dispatcher stops."""

    def __init__(
        self,
        claimant: str,
        secrets: Secrets,
        concurrency: int,
        observe: Observer | None = None,
    ) -> None:
        # httpx logs every request at INFO, URL and all: notifyq logs each outcome itself,
        # so unless the user set a level for it, httpx says only what goes wrong.
        httpx_log = logging.getLogger("httpx")
        if httpx_log.level == logging.NOTSET:
            httpx_log.setLevel(logging.WARNING)
        self.claimant = claimant
        self._secrets = secrets
        self._observe = observe
        self._limiters: dict[str, anyio.CapacityLimiter] = {}
        # httpcore's pool scans every connection it holds for each request it starts and
        # ends (a readability poll each): its CPU per request grows with the pool, and at
        # 50 connections it dominates a delivery.  So the connections are split across
        # clients of at most CONNECTIONS_PER_CLIENT each, taken in turn: as many
        # connections as slots in all, each scan short.  A request goes to the client with
        # the fewest in flight, which always has a connection free (slots <= connections).
        shards = max(1, math.ceil(concurrency / CONNECTIONS_PER_CLIENT))
        per_client = min(concurrency, CONNECTIONS_PER_CLIENT)
        # One TLS context for all (verification on, httpx's CA bundle and SSL_CERT_FILE):
        # verify=True builds one per client, loading the CA bundle each time, which
        # blocked the loop for about 80 ms per client (2 s at concurrency 200).
        tls = httpx.create_ssl_context()
        self._clients = [
            httpx.AsyncClient(
                follow_redirects=False,
                verify=tls,
                # identity: a body is capped as it is decoded, and httpx decodes a whole
                # received chunk at once, so a compressed 64 KiB chunk could become
                # ~64 MiB in memory before the cap sees it.  A server that compresses
                # anyway still can; one that honours this header cannot.
                headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
                limits=httpx.Limits(
                    max_connections=per_client, max_keepalive_connections=per_client
                ),
            )
            for _ in range(shards)
        ]
        self._in_flight = [0] * shards

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()

    def keys_for(self, endpoint: Endpoint) -> list[str]:
        """The endpoint's signing secrets; ConfigurationError naming the variable if unset."""
        return [] if endpoint.secret is None else self._secrets.keys(endpoint.secret)

    def bind(self, endpoint: Endpoint) -> Delivery:
        """The handler that delivers `endpoint`'s jobs through this session."""
        if endpoint.max_concurrency is not None:
            limiter = self._limiters.get(endpoint.task)
            if limiter is None:
                self._limiters[endpoint.task] = anyio.CapacityLimiter(endpoint.max_concurrency)
            else:
                limiter.total_tokens = endpoint.max_concurrency
        else:
            self._limiters.pop(endpoint.task, None)
        return Delivery(endpoint, self)

    async def deliver(
        self, endpoint: Endpoint, keys: Sequence[str], payload: Any, ctx: JobContext
    ) -> Any:
        limiter = self._limiters.get(endpoint.task)
        if limiter is None:
            return await self._post(endpoint, keys, payload, ctx)
        # The dispatcher claims no more of a task than its endpoint's room (serving.py);
        # only jobs claimed before a reload lowered the cap wait here.
        async with limiter:
            return await self._post(endpoint, keys, payload, ctx)

    async def _post(
        self, endpoint: Endpoint, keys: Sequence[str], payload: Any, ctx: JobContext
    ) -> Any:
        body = codec.dumps(
            {
                "id": ctx.id,
                "task": ctx.task,
                "queue": ctx.queue,
                "attempt": ctx.attempt,
                "max_attempts": ctx.max_attempts,
                "payload": payload,
                "checkpoint": ctx.checkpoint,
                "worker": self.claimant,
            }
        ).encode()
        headers = dict(endpoint.headers)
        headers.update(
            {
                "Content-Type": "application/json",
                "Notifyq-Job-Id": str(ctx.id),
                "Notifyq-Attempt": str(ctx.attempt),
                "Notifyq-Task": ctx.task,
                "Idempotency-Key": f"notifyq-{ctx.id}",
            }
        )
        if keys:
            headers[SIGNATURE_HEADER] = sign(keys, body)
        where = f"POST {shown(endpoint.url)}"
        code = "error"
        began = time.monotonic()
        try:
            with anyio.fail_after(endpoint.timeout):
                shard = self._in_flight.index(min(self._in_flight))
                client = self._clients[shard]
                request = client.build_request(
                    "POST", endpoint.url, content=body, headers=headers, timeout=endpoint.timeout
                )
                self._in_flight[shard] += 1
                try:
                    response = await client.send(request, stream=True)
                    try:
                        code = str(response.status_code)
                        ok = 200 <= response.status_code < 300
                        # A success's body is the result, up to the result cap; a failure's
                        # is only previewed in last_error.
                        data, cut = await _read(response, MAX_RESULT if ok else PREVIEW * 4)
                    finally:
                        # A body cut short, or a cancel: the connection is dropped, not
                        # reused.  Shielded: under a cancel an unshielded close would not run.
                        with anyio.CancelScope(shield=True):
                            await response.aclose()
                finally:
                    self._in_flight[shard] -= 1
        except TimeoutError:
            code = "timeout"
            raise DeliveryFailed(f"{where}: no response within {endpoint.timeout:g}s") from None
        except httpx.TimeoutException:
            code = "timeout"
            raise DeliveryFailed(f"{where}: no response within {endpoint.timeout:g}s") from None
        except httpx.HTTPError as exc:
            raise DeliveryFailed(f"{where}: {type(exc).__name__}: {exc or 'failed'}") from None
        except anyio.get_cancelled_exc_class():
            code = "cancelled"
            raise
        finally:
            if self._observe is not None:
                self._observe(endpoint.task, code, time.monotonic() - began)
        return _outcome(where, response, data, cut, [*keys, headers.get(SIGNATURE_HEADER, "")])


async def _read(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """At most `limit` bytes of the body, and whether there was more (not read)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(chunks)[:limit], True
    return b"".join(chunks), False


def _outcome(
    where: str, response: httpx.Response, data: bytes, cut: bool, secrets: list[str]
) -> Any:
    status = response.status_code
    # The reason phrase is the server's text (up to h11's 16 KiB line): capped like the
    # body's preview and cleaned of secrets like it.
    reason = redact(response.reason_phrase[:REASON], [s for s in secrets if s])
    line = f"HTTP {status} {reason}".rstrip()
    if 200 <= status < 300:
        if cut:
            raise ResultError(
                f"{where}: {line} with a body over {MAX_RESULT} bytes, the result size limit: "
                "the body was cut and the job is dead (the endpoint ran; return a reference "
                "to a large result instead)"
            )
        if not data.strip():
            return None
        try:
            return codec.loads(data)
        except ValueError:
            return data.decode("utf-8", "replace")  # not JSON: kept as text
    text = data[: PREVIEW * 4].decode("utf-8", "replace")[:PREVIEW]
    preview = redact(text, [s for s in secrets if s])
    said = f"{where}: {line}" + (f": {preview}" if preview.strip() else "")
    if 300 <= status < 400:
        target = response.headers.get("location")
        to = f" (to {shown(target)})" if target else ""
        raise DeliveryRefused(f"{where}: {line}: redirects are not followed{to}")
    after = retry_after(response.headers.get("retry-after")) if status in (429, 503) else None
    if after is not None:
        raise Retry(f"{said} (Retry-After: {after:g}s)", after=after)
    if status in RETRYABLE or 500 <= status < 600:
        raise DeliveryFailed(said)
    raise DeliveryRefused(said)


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a Retry-After header asks to wait (delta-seconds or an HTTP date), capped at
    MAX_RETRY_AFTER; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    # isdigit() alone takes "²" or "٣" (a header decoded as Latin-1 can hold them), which
    # float() refuses or reads as another number: delta-seconds are ASCII digits.
    if value.isascii() and value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    clock = datetime.now(UTC).timestamp() if now is None else now
    seconds = when.timestamp() - clock
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def shown(url: str) -> str:
    """A URL as messages show it: no user:password, no query (either may hold a token)."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError too: out of range, or not a number
    except ValueError:
        return "<unreadable URL>"
    host = parts.hostname or ""
    if port is not None:
        host = f"{host}:{port}"
    query = "?..." if parts.query else ""
    return f"{parts.scheme}://{host}{parts.path}{query}" if parts.scheme else parts.path + query
