"""The statements of the completion webhook sender (webhooks.py): claim due deliveries
from the outbox notifyq.webhook_deliveries, and write their outcomes, fenced by the
attempt claimed (sql/queries.sql, webhook_*)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from psycopg.rows import class_row

from .dispatching import Store
from .rows import NextDue, Settled, WebhookClaimed


@dataclass(frozen=True, slots=True)
class WebhookOutcome:
    """What became of one claimed delivery."""

    id: int
    attempt: int
    delivered: bool
    error: str | None = None
    retry_in: float | None = None  # seconds until it is due again; None: given up (or sent)


async def claim(st: Store, limit: int, lease: float) -> list[WebhookClaimed]:
    """Up to `limit` due deliveries, ours for `lease` seconds."""
    return await st._run(
        "webhook_claim", {"limit": limit, "lease": lease}, class_row(WebhookClaimed)
    )


async def next_due(st: Store) -> float | None:
    """Seconds until the next pending delivery is due; None: none is pending."""
    found = await st._run("webhook_next_due", {}, class_row(NextDue))
    return found[0].seconds if found else None


async def settle(st: Store, outcomes: Sequence[WebhookOutcome]) -> list[int]:
    """Write these outcomes; the ids written (others were claimed again meanwhile)."""
    if not outcomes:
        return []
    params = {
        "ids": [o.id for o in outcomes],
        "attempts": [o.attempt for o in outcomes],
        "delivered": [o.delivered for o in outcomes],
        "errors": [o.error for o in outcomes],
        "retry_in": [o.retry_in for o in outcomes],
    }
    return [row.id for row in await st._run("webhook_settle", params, class_row(Settled))]
