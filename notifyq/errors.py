"""Every error notifyq raises, under one root.

    NotifyqError
    ├── ConfigurationError      bad settings: no DSN and no embedded server, bad --app, ...
    │   └── InvalidSetting      one Settings field out of its range (names the field)
    ├── DatabaseUnavailable     cannot reach PostgreSQL (retryable: the dispatcher reconnects)
    │   ├── PoolerInTheWay      prepared statements vanish: a pooler in transaction mode
    │   └── LockTimeout         a statement waited longer than lock_timeout for a row lock
    ├── SchemaMissing           the notifyq schema is absent or older than this code
    ├── InvalidJob              PostgreSQL rejected a job at INSERT (names the rule it broke)
    ├── OperationRefused        an admin function refused (unknown job id, wrong state, ...)
    ├── JobFailed               App.wait(): the job ended dead or cancelled
    ├── SignatureError          notifyq.http.verify(): a request's signature does not hold
    ├── OutcomeAlreadySet       a batch handler settled an item twice, or after its call
    └── JobFailure              raised *by handlers* to steer what happens to the job
        ├── Retry               fail this attempt; run again no earlier than `after` seconds
        └── DoNotRetry          fail this attempt and send the job to `dead` at once
            ├── PayloadError    the payload cannot be used by this task
            └── ResultError     the handler returned what cannot be stored as JSON

Driver errors are translated at one seam (notifyq/store/) with `translate()`; no
other module looks at psycopg exceptions.

A DSN's password must never reach a message or a log line: `redact()` is the
one place that removes it (libpq echoes a malformed connection string in its
error, password and all), used by the store's seam and the command line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict


class NotifyqError(Exception):
    """Root of every notifyq error."""


class ConfigurationError(NotifyqError):
    """The settings do not describe something notifyq can run."""


class InvalidSetting(ConfigurationError):
    """One `Settings` field is out of its range.  `setting` names the field (the command
    line maps it to its flag), `reason` says what the field must be."""

    def __init__(self, setting: str, reason: str, message: str | None = None) -> None:
        self.setting = setting
        self.reason = reason
        super().__init__(message or f"Settings.{setting} {reason}")


class DatabaseUnavailable(NotifyqError):
    """PostgreSQL cannot be reached or the connection broke; retrying may succeed."""


class PoolerInTheWay(DatabaseUnavailable):
    """A prepared statement vanished or clashed between two statements of one connection:
    a pooler in transaction mode (PgBouncer) hands each transaction to another server
    connection.  The Store that sees it stops preparing statements and retries."""


class LockTimeout(DatabaseUnavailable):
    """A statement gave up waiting for a lock another transaction holds (lock_timeout,
    SQLSTATE 55P03).  The connection is fine and the statement can be tried again;
    the message says what waited, for what."""


class SchemaMissing(NotifyqError):
    """The database has no notifyq schema, or an older version than this code needs."""


class InvalidJob(NotifyqError):
    """PostgreSQL refused a job; the message names the rule it broke."""


class OperationRefused(NotifyqError):
    """An admin function (notifyq.retry_job, cancel_job, purge, ...) refused: the message
    says why and what to do instead."""


class JobFailure(NotifyqError):
    """Base for the exceptions a handler raises on purpose."""


class Retry(JobFailure):
    """Raise from a handler: this attempt failed, and the job runs again no earlier than
    `after` seconds from now (instead of the task's backoff).  The attempt still counts:
    with none left, the job goes to `dead` as with any failure."""

    # Ten years: far past any sensible wait, and well inside what PostgreSQL can add to
    # now() (a larger `after` made the outcome unwritable: "interval out of range").
    MAX_AFTER = 10 * 365 * 86400.0

    def __init__(self, message: str = "", *, after: float) -> None:
        if isinstance(after, bool) or not (
            isinstance(after, int | float) and 0 <= after <= Retry.MAX_AFTER
        ):
            raise ValueError(
                f"Retry(after=...) takes a number of seconds from 0 to {Retry.MAX_AFTER:g} "
                f"(ten years), got {after!r}"
            )
        self.after = float(after)
        super().__init__(message or f"retry in {self.after:g}s")


class DoNotRetry(JobFailure):
    """Raise from a handler: the job goes to `dead` now, whatever attempts remain."""


class ResultError(DoNotRetry):
    """The handler's return value cannot be stored: not JSON-serialisable (NaN and
    infinities included: JSON has neither), or over 1 MiB as JSON.  Retrying would
    return the same, so the job goes dead."""


class JobFailed(NotifyqError):
    """What `App.wait` raises for a job that ended `dead` or `cancelled`."""

    def __init__(self, job_id: int, status: str, error: str | None) -> None:
        self.job_id = job_id
        self.status = status
        self.error = error
        first = (error or "").split("\n", 1)[0]
        super().__init__(f"job {job_id} is {status}" + (f": {first}" if first else ""))


class OutcomeAlreadySet(NotifyqError):
    """A batch handler settled an item that already had its outcome, or after the call
    ended (batch.py): each item is settled at most once, before the handler returns."""


class SignatureError(NotifyqError):
    """`notifyq.http.verify` refused a request: the Notifyq-Signature header is missing
    or malformed, no signature in it matches the body and secret, or its timestamp is
    outside the tolerance.  The message says which; answer 401."""


class PayloadError(DoNotRetry):
    """Raise from a handler (or a task's decoder) when the payload cannot be used."""


# What each CHECK constraint means, for messages a producer can act on.
_CONSTRAINTS = {
    "jobs_queue_format": "queue must be 1-63 characters of a-z, 0-9, '_' and '-', "
    "not starting with '-'",
    "jobs_task_format": "task must be 1-200 characters of letters, digits, '_', '.', ':' "
    "and '-', starting with a letter or '_'",
    "jobs_priority_range": "priority must be an integer from -1000 to 1000",
    "jobs_max_attempts_range": "max_attempts must be NULL or an integer from 1 to 1000",
    "jobs_attempts_nonnegative": "attempts cannot be negative",
    "jobs_payload_size": "payload must be at most 1 MiB as jsonb (before compression)",
    "jobs_status_valid": "status must be one of queued, running, succeeded, dead, cancelled, "
    "waiting",
    "jobs_running_has_lease": "a running job needs claimed_by and lease_expires_at",
    "jobs_on_dependency_failure_valid": "on_dependency_failure must be 'cancel' or 'run'",
    "jobs_depends_on_valid": "depends_on must hold at most 1000 job ids, none of them NULL",
    "jobs_trace_context_valid": "trace_context must be a JSON object of strings, at most "
    "4096 bytes as jsonb",
    "jobs_unique_for_valid": "unique_for must be more than 0 and at most 10 years, with a "
    "dedupe_key",
    "jobs_on_duplicate_valid": "on_duplicate must be 'refuse' or 'replace', with a dedupe_key "
    "(and 'replace' not with unique_for)",
}


# A URI's userinfo password (scheme://user:PASSWORD@host) and a keyword's value
# (password=PASSWORD, quoted or not), wherever they appear in a text.
_URI_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:/?#@\[]*:)[^\s/?#]*@")
_KEYWORD_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s&'\"]+)", re.I)
REDACTED = "***"


def dsn_secrets(dsn: str | None) -> set[str]:
    """The password a connection string carries, as written and decoded, even when
    the string is malformed (its error message may still echo it)."""
    if not dsn:
        return set()
    found: set[str] = set()
    try:
        password = conninfo_to_dict(dsn).get("password")
    except psycopg.Error:
        password = None
    if password:
        found.add(str(password))
    match = re.match(r"[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)@", dsn)
    if match and ":" in match.group(1):
        raw = match.group(1).split(":", 1)[1]
        found.update({raw, unquote(raw)})
    for keyword in _KEYWORD_PASSWORD.finditer(dsn):
        value = keyword.group(2)
        found.update({value, value.strip("'")})
    return {secret for secret in found if secret}


def has_password(dsn: str | None) -> bool:
    return bool(dsn_secrets(dsn))


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` without the given secrets and without any password a URI or a
    password=... keyword in it carries."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    text = _URI_PASSWORD.sub(lambda m: m.group(1) + REDACTED + "@", text)
    return _KEYWORD_PASSWORD.sub(lambda m: m.group(1) + REDACTED, text)


def translate(exc: psycopg.Error, *, dsn: str | None = None) -> NotifyqError:
    """The notifyq error a driver error means; the message keeps PostgreSQL's words
    (less any password: `dsn`, when given, names the one to look for)."""
    error = _translate(exc)
    text = str(error)
    clean = redact(text, dsn_secrets(dsn))
    if clean != text:
        error = type(error)(clean)
    return error


def _translate(exc: psycopg.Error) -> NotifyqError:
    state = exc.sqlstate or ""
    message = exc.diag.message_primary or _first_line(exc)
    if isinstance(exc, pg_errors.CheckViolation):
        name = exc.diag.constraint_name or ""
        return InvalidJob(f"job rejected: {_CONSTRAINTS.get(name, message)}")
    if isinstance(exc, pg_errors.ForeignKeyViolation):  # depends_on names no such job
        return InvalidJob(f"job rejected: {message.removeprefix('notifyq: ')}")
    if isinstance(exc, pg_errors.NotNullViolation):
        return InvalidJob(f"job rejected: {exc.diag.column_name} cannot be NULL")
    if isinstance(exc, pg_errors.DataError):  # class 22: a value PostgreSQL cannot store
        return InvalidJob(f"job rejected: {message}")
    if isinstance(exc, pg_errors.UndefinedTable | pg_errors.InvalidSchemaName):
        return SchemaMissing(
            "the notifyq schema is not installed in this database: run `notifyq migrate`"
        )
    if state.startswith("28") or state == "3D000":  # authentication; no such database
        return ConfigurationError(f"PostgreSQL refused the connection: {message}")
    if isinstance(exc, pg_errors.InsufficientPrivilege):
        return ConfigurationError(f"PostgreSQL: {message} (check the role's privileges)")
    if not state or state[:2] in ("08", "53", "57"):
        # No SQLSTATE: libpq could not connect or lost the socket.  08 connection,
        # 53 resources (too many connections), 57 shutdown or cancellation.
        return DatabaseUnavailable(f"cannot reach PostgreSQL: {_first_line(exc)}")
    if state == "55P03":  # lock_not_available: lock_timeout ran out (or NOWAIT)
        context = (exc.diag.context or "").strip().splitlines()
        where = f" ({context[0]})" if context else ""
        return LockTimeout(f"PostgreSQL: {message}{where}")
    if state in ("26000", "42P05"):  # prepared statement does not exist / already exists
        return PoolerInTheWay(
            f"PostgreSQL: {message}: a pooler in transaction mode (PgBouncer?) sits in front "
            "of PostgreSQL; notifyq stops preparing statements on this connection. Serve "
            "with --no-listen there, or give notifyq a direct DSN"
        )
    if state == "25006" or state.startswith("40"):  # read-only after failover; deadlock
        return DatabaseUnavailable(f"PostgreSQL: {message} (will retry)")
    return NotifyqError(f"PostgreSQL error {state}: {message}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
