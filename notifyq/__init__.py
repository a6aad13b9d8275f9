"""notifyq: a PostgreSQL job dispatcher.

Plain SQL in (`INSERT INTO notifyq.jobs (task, payload) ...`), one
dispatcher out (`notifyq serve --app module:app`).
"""

from .app import App
from .batch import BatchItem
from .breaker import CircuitBreaker
from .errors import (
    ConfigurationError,
    DatabaseUnavailable,
    DoNotRetry,
    InvalidJob,
    JobFailed,
    JobFailure,
    LockTimeout,
    NotifyqError,
    OperationRefused,
    PayloadError,
    ResultError,
    Retry,
    SchemaMissing,
)
from .job import JobContext, JobId, JobState, JobStatus
from .retry import Backoff
from .settings import Settings
from .worker import Worker

__version__ = "0.1.0"

__all__ = [
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
]
