"""Completion webhooks: POST each job's outcome to its callback_url, from the outbox.

A job with a callback_url that reaches a final state gets a row in
notifyq.webhook_deliveries, written by a trigger in the same transaction (schema.sql,
"Completion webhooks"): the job's completion never waits for the network.  Every
`notifyq serve` runs one sender, which claims due rows with SKIP LOCKED (so several
dispatchers share them and no row is sent by two at once), POSTs each, and writes
the outcome fenced by the attempt it claimed:

    2xx                delivered
    anything else      failed: due again after a backoff (1 s doubling to an hour,
                       jittered), given up after MAX_ATTEMPTS
    URL not allowed    given up at once (its prefix left notifyq.webhook_allowlist)

The body is the JSON the trigger froze ({"id", "queue", "task", "status",
"attempts", "result", "error", "finished_at"}), sent as those bytes, and signed like
a delivery to an HTTP task (signing.py) with the secret its allow-list prefix names.
A claim holds a row for LEASE seconds, longer than a request may take, so a row is
sent twice only if its sender dies (or loses the database) between the response and
writing it down: receivers deduplicate by Notifyq-Delivery-Id.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import anyio
import httpx

from .. import store
from ..errors import ConfigurationError, DatabaseUnavailable, NotifyqError
from ..retry import Backoff
from ..store.rows import WebhookClaimed
from ..store.webhooks import WebhookOutcome
from .delivery import PREVIEW, USER_AGENT, shown
from .endpoints import Secrets
from .signing import SIGNATURE_HEADER, sign

log = logging.getLogger("notifyq.webhooks")

BATCH = 20  # deliveries claimed (and sent concurrently) at once
TIMEOUT = 10.0  # seconds a receiver has to answer
LEASE = TIMEOUT * 3  # a claimed row is ours this long: well past a request's timeout
MAX_ATTEMPTS = 10
BACKOFF = Backoff(base=1.0, factor=2.0, max_delay=3600.0)
RETRY_AFTER_ERROR = 5.0  # seconds before trying the database again after a failed round


class WebhookSender:
    """Claims and sends due completion webhooks until cancelled.  `changed()` is the
    listener's hint that new ones were queued (and its call after every reconnect): with
    it (`poll_interval` None) an idle sender runs no statement at all until told, or until
    the next retry is due; without a listener it looks every `poll_interval` seconds."""

    def __init__(
        self,
        st: store.Store,
        secrets: Secrets,
        *,
        poll_interval: float | None,
        observe: Callable[[str], None] | None = None,
        backoff: Backoff = BACKOFF,
    ) -> None:
        self._store = st
        self._secrets = secrets
        self._poll = poll_interval
        self._observe = observe
        self._backoff = backoff
        self._wake = anyio.Event()
        self.sent = 0
        self.failed = 0

    def changed(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        async with httpx.AsyncClient(
            follow_redirects=False, headers={"User-Agent": USER_AGENT}, timeout=TIMEOUT
        ) as client:
            while True:
                wait = math.inf if self._poll is None else self._poll
                try:
                    if await self.round(client) == BATCH:
                        continue  # a full claim: more may be due
                    due = await store.webhooks.next_due(self._store)
                    if due is not None:
                        wait = max(0.0, min(due, wait))
                except DatabaseUnavailable as exc:
                    log.warning("webhook sender paused (%s); trying again", exc)
                    wait = min(wait, RETRY_AFTER_ERROR)
                except NotifyqError as exc:
                    log.error("webhook sender failed: %s", exc)
                    wait = min(wait, RETRY_AFTER_ERROR)
                with anyio.move_on_after(wait):
                    await self._wake.wait()
                self._wake = anyio.Event()

    async def round(self, client: httpx.AsyncClient) -> int:
        """Claim, send and settle one batch; how many were claimed."""
        claimed = await store.webhooks.claim(self._store, BATCH, LEASE)
        outcomes: list[WebhookOutcome] = []
        async with anyio.create_task_group() as tg:
            for delivery in claimed:
                tg.start_soon(self._send, client, delivery, outcomes)
        # Shielded: a stop while settling would leave sent rows to be sent again.
        with anyio.CancelScope(shield=True):
            await store.webhooks.settle(self._store, outcomes)
        return len(claimed)

    async def _send(
        self, client: httpx.AsyncClient, d: WebhookClaimed, outcomes: list[WebhookOutcome]
    ) -> None:
        where = f"webhook {d.id} of job {d.job_id}: POST {shown(d.url)}"
        if not d.allowed:
            outcomes.append(self._give_up(d, f"{where}: the URL is no longer allowed"))
            return
        body = d.body.encode()
        headers = {
            "Content-Type": "application/json",
            "Notifyq-Job-Id": str(d.job_id),
            "Notifyq-Delivery-Id": str(d.id),
            "Idempotency-Key": f"notifyq-webhook-{d.id}",
        }
        try:
            if d.secret is not None:
                headers[SIGNATURE_HEADER] = sign(self._secrets.keys(d.secret), body)
            # httpx's timeout bounds each read, not the request: a receiver trickling its
            # answer would outlast LEASE, and another sender would POST the row again.
            with anyio.fail_after(TIMEOUT):
                response = await client.post(d.url, content=body, headers=headers)
        except ConfigurationError as exc:  # the prefix names a secret this process lacks
            outcomes.append(self._retry(d, f"{where}: {exc}"))
            return
        except TimeoutError:
            outcomes.append(self._retry(d, f"{where}: no complete answer within {TIMEOUT:g} s"))
            return
        except httpx.InvalidURL as exc:  # not an HTTPError; sending it again cannot help
            outcomes.append(self._give_up(d, f"{where}: invalid URL: {exc}"))
            return
        except httpx.HTTPError as exc:
            outcomes.append(self._retry(d, f"{where}: {type(exc).__name__}: {exc or 'failed'}"))
            return
        if 200 <= response.status_code < 300:
            self.sent += 1
            if self._observe is not None:
                self._observe("sent")
            outcomes.append(WebhookOutcome(d.id, d.attempts, delivered=True))
            return
        text = response.text[:PREVIEW]
        outcomes.append(self._retry(d, f"{where}: HTTP {response.status_code}: {text}".rstrip()))

    def _retry(self, d: WebhookClaimed, error: str) -> WebhookOutcome:
        if d.attempts >= MAX_ATTEMPTS:
            return self._give_up(d, f"{error} (gave up after {d.attempts} attempts)")
        self.failed += 1
        if self._observe is not None:
            self._observe("failed")
        log.warning("%s; trying again", error)
        return WebhookOutcome(
            d.id,
            d.attempts,
            delivered=False,
            error=_storable(error),
            retry_in=self._backoff.delay(d.attempts),
        )

    def _give_up(self, d: WebhookClaimed, error: str) -> WebhookOutcome:
        self.failed += 1
        if self._observe is not None:
            self._observe("given_up")
        log.error("%s", error)
        return WebhookOutcome(
            d.id, d.attempts, delivered=False, error=_storable(error), retry_in=None
        )


def _storable(text: str) -> str:
    # PostgreSQL text holds no NUL nor lone surrogate, and a receiver's answer may: one
    # such error would fail the settle of the whole batch, whose sent rows go out again.
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")
