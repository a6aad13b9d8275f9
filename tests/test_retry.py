"""The reconnect backoff is one formula (retry.reconnect_delay), and every loop that waits
out a lost database uses it instead of writing its own."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from notifyq.retry import reconnect_delay

PACKAGE = Path(__file__).resolve().parents[1] / "notifyq"


def test_the_delay_doubles_to_its_cap_with_jitter_in_half_to_whole() -> None:
    assert [reconnect_delay(n, first=0.1, cap=1.0, jitter=False) for n in range(6)] == [
        0.1,
        0.2,
        0.4,
        0.8,
        1.0,
        1.0,
    ]
    for n in range(1, 8):
        ceiling = reconnect_delay(n, first=0.1, cap=5.0, jitter=False)
        assert all(
            ceiling / 2 <= reconnect_delay(n, first=0.1, cap=5.0) <= ceiling for _ in range(50)
        )


@pytest.mark.parametrize("failures", [10**6, 10**18])
def test_no_outage_is_long_enough_to_overflow(failures: int) -> None:
    assert reconnect_delay(failures, first=0.2, cap=10.0, jitter=False) == 10.0


def test_every_module_that_waits_out_a_lost_database_asks_retry_py() -> None:
    """A module with an `except DatabaseUnavailable` that sleeps in that handler takes its
    delay from reconnect_delay; no module but retry.py raises anything to a power (the
    tell of a backoff written out again)."""
    own_backoff: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):  # the store and cli packages too
        if path.name == "retry.py":
            continue
        tree = ast.parse(path.read_text())
        where = path.relative_to(PACKAGE)
        for node in ast.walk(tree):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
                own_backoff.append(f"{where}:{node.lineno}: a power")
            if not isinstance(node, ast.ExceptHandler) or "DatabaseUnavailable" not in ast.unparse(
                node.type or ast.Constant(None)
            ):
                continue
            body = "\n".join(ast.unparse(statement) for statement in node.body)
            if "sleep(" in body and "reconnect_delay(" not in body:
                own_backoff.append(f"{where}:{node.lineno}: sleeps without reconnect_delay")
    assert own_backoff == []
