"""`Settings` checks itself when it is built and names the field it refuses; the command
line maps that field to its flag (test_cli_usage.py)."""

from __future__ import annotations

from typing import Any

import pytest

from notifyq import Settings
from notifyq.errors import ConfigurationError, InvalidSetting


@pytest.mark.parametrize(
    ("given", "field", "reason"),
    [
        ({"concurrency": 0}, "concurrency", "must be from 1 to 10000, not 0"),
        ({"batch_size": 1001}, "batch_size", "must be from 1 to 1000, not 1001"),
        ({"poll_interval": float("nan")}, "poll_interval", "must be at least 0.01 seconds"),
        ({"lease": 0.5}, "lease", "must be at least 1 second, not 0.5"),
        ({"queues": ()}, "queues", "must name at least one queue"),
        ({"queues": ("ok", "Bad")}, "queues", "invalid queue name 'Bad'"),
        ({"queues": "default"}, "queues", "must be a tuple of queue names, not the string"),
        ({"metrics_port": 65536}, "metrics_port", "must be from 0 to 65535"),
        ({"metrics_host": " "}, "metrics_host", "cannot be empty"),
        ({"retain_dead": -1.0}, "retain_dead", "must be at least 0 seconds"),
        ({"max_jobs": 0}, "max_jobs", "must be at least 1, not 0"),
        ({"max_runtime": 0.0}, "max_runtime", "must be positive, not 0"),
    ],
)
def test_a_refused_field_is_named(given: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(InvalidSetting) as refused:
        Settings(**given)
    assert refused.value.setting == field
    assert reason in refused.value.reason
    assert isinstance(refused.value, ConfigurationError)


def test_defaults_are_what_serve_help_shows() -> None:
    assert Settings.default("concurrency") == Settings().concurrency == 10
    assert Settings.default("metrics_host") == "127.0.0.1"
    assert Settings.default("queues") is None
