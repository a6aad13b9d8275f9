"""How a dispatcher runs: the one source of `notifyq serve`'s options.

Every default and every range is written here once.  `Settings` checks itself
when it is built and names the field it refuses (InvalidSetting); the command
line builds one from its flags (their defaults shown in `--help` are read from
here) and turns a refusal into a usage error naming the flag.  Everything else
reads the fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from . import retention
from .errors import ConfigurationError, InvalidSetting
from .job import JobState
from .registry import check_queue_name

MAX_CONCURRENCY = 10_000  # slots in one process; beyond this, run more processes
MAX_BATCH = 1000  # jobs claimed per statement


@dataclass(frozen=True, slots=True)
class Settings:
    """How a dispatcher runs; `notifyq serve --help` documents each field but
    retention_interval, which has no flag (docs/python.md lists them all)."""

    concurrency: int = 10
    queues: tuple[str, ...] | None = None  # None: 'default' and the queues of the app's tasks
    batch_size: int | None = None  # None: up to `concurrency` per claim
    poll_interval: float = 5.0
    lease: float = 30.0
    shutdown_timeout: float = 30.0
    listen: bool = True
    metrics_port: int | None = None  # serve Prometheus metrics, /healthz and /readyz there
    # This machine only unless told otherwise: the endpoints have no authentication.
    metrics_host: str = "127.0.0.1"
    # Seconds after finishing that a job is deleted (None: kept forever); retention.py.
    retain_succeeded: float | None = retention.DEFAULTS[JobState.SUCCEEDED]
    retain_cancelled: float | None = retention.DEFAULTS[JobState.CANCELLED]
    retain_dead: float | None = retention.DEFAULTS[JobState.DEAD]
    retention_interval: float = retention.INTERVAL
    # One-shot runs (cron, CI, Cloud Run jobs): stop by themselves; see Worker.exit_code.
    until_empty: bool = False  # stop once nothing in the served queues is to start now
    max_jobs: int | None = None  # stop claiming after this many jobs, let them finish
    max_runtime: float | None = None  # seconds; then as on SIGTERM
    # HTTP tasks' signing secrets, NAME=VALUE lines (notifyq/http/endpoints.py); the
    # environment's NOTIFYQ_SECRET_<NAME> override it.
    secrets_file: str | None = None

    def __post_init__(self) -> None:
        _at_least("concurrency", self.concurrency, 1, MAX_CONCURRENCY)
        if self.batch_size is not None:
            _at_least("batch_size", self.batch_size, 1, MAX_BATCH)
        _at_least("poll_interval", self.poll_interval, 0.01, unit=" seconds")
        _at_least("lease", self.lease, 1, unit=" second")
        _at_least("shutdown_timeout", self.shutdown_timeout, 0, unit=" seconds")
        if self.queues is not None:
            if isinstance(self.queues, str):  # would be served as one queue per character
                raise InvalidSetting(
                    "queues", f"must be a tuple of queue names, not the string {self.queues!r}"
                )
            if not self.queues:
                raise InvalidSetting("queues", "must name at least one queue")
            for queue in self.queues:
                try:
                    check_queue_name(queue)
                except ConfigurationError as exc:
                    raise InvalidSetting("queues", str(exc), str(exc)) from None
        if self.metrics_port is not None:
            _at_least("metrics_port", self.metrics_port, 0, 65535)
        if not self.metrics_host.strip():
            raise InvalidSetting("metrics_host", "cannot be empty (0.0.0.0: every interface)")
        for status, age in self.retention_ages().items():
            if age is not None:
                _at_least(f"retain_{status}", age, 0, unit=" seconds")
        _positive("retention_interval", self.retention_interval)
        if self.max_jobs is not None:
            _at_least("max_jobs", self.max_jobs, 1)
        if self.max_runtime is not None:
            _positive("max_runtime", self.max_runtime)
        if self.secrets_file is not None and not str(self.secrets_file).strip():
            raise InvalidSetting("secrets_file", "cannot be empty")

    @classmethod
    def default(cls, field: str) -> Any:
        """A field's default: what `notifyq serve --help` shows."""
        return {f.name: f.default for f in dataclasses.fields(cls)}[field]

    @property
    def lock_timeout(self) -> float:
        """Seconds any dispatcher statement may wait for a lock another transaction holds:
        short of a heartbeat (lease / 3) with room to try again, and never over 5 s."""
        return min(5.0, self.lease / 6)

    def retention_ages(self) -> dict[str, float | None]:
        return {
            JobState.SUCCEEDED: self.retain_succeeded,
            JobState.CANCELLED: self.retain_cancelled,
            JobState.DEAD: self.retain_dead,
        }


def _at_least(
    field: str, value: float, low: float, high: float | None = None, unit: str = ""
) -> None:
    # `not low <= value` also refuses NaN, which every comparison answers False.
    if high is None and not low <= value:
        raise InvalidSetting(field, f"must be at least {low:g}{unit}, not {value:g}")
    if high is not None and not low <= value <= high:
        raise InvalidSetting(field, f"must be from {low:g} to {high:g}{unit}, not {value:g}")


def _positive(field: str, value: float) -> None:
    if not value > 0:
        raise InvalidSetting(field, f"must be positive, not {value:g}")
