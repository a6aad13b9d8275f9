"""A test app whose handler takes a pydantic model (tests/test_typed_payloads.py)."""

from __future__ import annotations

import pydantic

import notifyq

app = notifyq.App()


class Invoice(pydantic.BaseModel):
    number: int
    lines: list[str]


@app.task(name="typed.invoice")
def invoice(payload: Invoice) -> None:
    pass
