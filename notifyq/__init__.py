"""notifyq: a PostgreSQL job dispatcher.

Plain SQL in (`INSERT INTO notifyq.jobs (task, payload) ...`), one
dispatcher out (`notifyq serve --app module:app`).
"""

from .app import App
from .errors import (
    ConfigurationError,
    DatabaseUnavailable,
    DoNotRetry,
    InvalidJob,
    JobFailure,
    NotifyqError,
    OperationRefused,
    PayloadError,
    SchemaMissing,
)
from .job import JobContext, JobState
from .retry import Backoff
from .worker import Settings, Worker

__version__ = "0.1.0"

__all__ = [
    "App",
    "Backoff",
    "ConfigurationError",
    "DatabaseUnavailable",
    "DoNotRetry",
    "InvalidJob",
    "JobContext",
    "JobFailure",
    "JobState",
    "NotifyqError",
    "OperationRefused",
    "PayloadError",
    "SchemaMissing",
    "Settings",
    "Worker",
    "__version__",
]
