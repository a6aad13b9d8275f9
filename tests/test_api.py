"""The public Python surface and the pure parts behind it."""

from __future__ import annotations

import random

import pytest

import notifyq
from notifyq import Backoff

PUBLIC = {
    "App",
    "Backoff",
    "BatchItem",
    "CircuitBreaker",
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
    "Retry",
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
        "Retry",
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


def test_the_enqueue_methods_take_the_documented_keywords_and_refuse_others() -> None:
    """The keywords are written once (enqueue.EnqueueOptions, ManyOptions); each method
    still takes every documented one, and an unknown keyword is a TypeError up front,
    before any connection is opened."""
    from notifyq import enqueue

    every, many = enqueue.ENQUEUE_OPTIONS, enqueue.MANY_OPTIONS
    assert every == {
        "queue",
        "priority",
        "delay",
        "run_at",
        "max_attempts",
        "dedupe_key",
        "unique_for",
        "on_duplicate",
        "rate_key",
        "depends_on",
        "on_dependency_failure",
        "tags",
        "callback_url",
    }
    assert every - many == {"dedupe_key", "unique_for", "on_duplicate"}
    # Nothing listens there: only a call that got past the keywords would try to connect.
    app = notifyq.App("postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(
        TypeError, match=r"enqueue_sync\(\) got an unexpected keyword argument 'prio'"
    ):
        app.enqueue_sync("t", prio=3)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"enqueue_many_sync\(\) .* 'dedupe_key'"):
        app.enqueue_many_sync("t", [{}], dedupe_key="k")  # type: ignore[call-arg]
    job = enqueue.build(
        app.registry,
        "t",
        {"a": 1},
        {"queue": "q", "priority": 2, "delay": 5.0, "max_attempts": 3, "dedupe_key": "k",
         "rate_key": "r", "depends_on": [7], "on_dependency_failure": "run"},
    )  # fmt: skip
    assert (job.queue, job.priority, job.delay, job.max_attempts) == ("q", 2, 5.0, 3)
    assert (job.dedupe_key, job.rate_key, job.depends_on) == ("k", "r", [7])
    assert job.on_dependency_failure == "run" and job.payload_json == '{"a":1}'
    defaults = enqueue.build(app.registry, "t", None, {})
    assert (defaults.queue, defaults.priority, defaults.delay, defaults.run_at) == (
        "default",
        0,
        0.0,
        None,
    )
    assert defaults.on_dependency_failure == "cancel" and defaults.depends_on is None


@pytest.mark.anyio
async def test_the_async_enqueue_methods_refuse_unknown_keywords_before_connecting() -> None:
    """As their sync twins do: the TypeError names the method, and nothing connects (the
    DSN points at a closed port, so a call that got past the keywords would fail otherwise)."""
    app = notifyq.App("postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(TypeError, match=r"^enqueue\(\) got an unexpected keyword argument 'prio'"):
        await app.enqueue("t", prio=3)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"^enqueue_many\(\) .* 'dedupe_key'"):
        await app.enqueue_many("t", [{}], dedupe_key="k")  # type: ignore[call-arg]
