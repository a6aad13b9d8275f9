"""The public Python surface and the pure parts behind it."""

from __future__ import annotations

import random

import pytest

import notifyq
from notifyq import Backoff

PUBLIC = {
    "App",
    "Backoff",
    "ConfigurationError",
    "DatabaseUnavailable",
    "DoNotRetry",
    "InvalidJob",
    "JobContext",
    "JobFailed",
    "JobFailure",
    "JobId",
    "JobState",
    "JobStatus",
    "LockTimeout",
    "NotifyqError",
    "OperationRefused",
    "PayloadError",
    "ResultError",
    "SchemaMissing",
    "Settings",
    "Worker",
    "__version__",
}


def test_all_is_the_documented_public_surface() -> None:
    # Changing the public API is a decision: this test makes it a visible one.
    assert set(notifyq.__all__) == PUBLIC
    for name in notifyq.__all__:
        assert hasattr(notifyq, name), name


def test_every_error_has_one_root() -> None:
    for name in (
        "ConfigurationError",
        "DatabaseUnavailable",
        "DoNotRetry",
        "InvalidJob",
        "JobFailed",
        "JobFailure",
        "PayloadError",
        "ResultError",
        "SchemaMissing",
    ):
        assert issubclass(getattr(notifyq, name), notifyq.NotifyqError)


def test_backoff_grows_exponentially_within_half_jitter() -> None:
    backoff = Backoff(base=2, factor=3, max_delay=100)
    rng = random.Random(7)
    for attempt, ceiling in [(1, 2), (2, 6), (3, 18), (4, 54), (5, 100), (9, 100)]:
        for _ in range(50):
            assert ceiling / 2 <= backoff.delay(attempt, rng) <= ceiling


def test_backoff_of_huge_attempt_numbers_is_capped_not_an_overflow() -> None:
    assert 50 <= Backoff(factor=10, max_delay=100).delay(400) <= 100


def test_backoff_rejects_nonsense() -> None:
    with pytest.raises(notifyq.ConfigurationError, match="backoff needs"):
        Backoff(factor=0.5)


def test_settings_reject_nonsense() -> None:
    with pytest.raises(notifyq.ConfigurationError, match="concurrency"):
        notifyq.Settings(concurrency=0)
    with pytest.raises(notifyq.ConfigurationError, match="invalid queue name"):
        notifyq.Settings(queues=("ok", "Not;OK"))
    with pytest.raises(notifyq.ConfigurationError, match="lease"):
        notifyq.Settings(lease=0.5)
