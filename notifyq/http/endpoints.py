"""What an HTTP task is: its `Endpoint`, checked once; and the signing secrets it names.

An endpoint is declared in Python (`App.http_task`) or in SQL (a row of
notifyq.endpoints, which only the schema owner or an admin role may write: see
docs/http.md).  Both become the same `Endpoint`, checked here with the same rules
as the table's CHECK constraints, plus what SQL cannot see (header names).

Secrets never live in the database: a row names one (`secret`), and the
dispatcher finds its value, by that name, in its environment

    NOTIFYQ_SECRET_<NAME>            the secret requests are signed with
    NOTIFYQ_SECRET_<NAME>_PREVIOUS   during a rotation, the old one: both sign

or in the file `notifyq serve --secrets-file PATH` names, one `NAME=VALUE` a line
(`NAME_PREVIOUS=...` for the old one; blank lines and `#` comments skipped), which the
environment overrides.  Secret values are never logged nor put in an error message:
messages name the variable to set.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import ConfigurationError, redact
from ..registry import check_task_name

log = logging.getLogger("notifyq.http")

SECRET_NAME = re.compile(r"[A-Z0-9_]{1,64}")  # as endpoints_secret_format in schema.sql
ENV_PREFIX = "NOTIFYQ_SECRET_"
PREVIOUS = "_PREVIOUS"
MAX_TIMEOUT = 86400.0  # seconds, as endpoints_timeout_range
MAX_URL = 2048
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}")  # an RFC 9110 token
# Headers the delivery sets itself (the contract the receiver relies on), the ones httpx
# manages (framing, the connection), and credentials: a header value stored in the
# database is readable by every role that may read notifyq.endpoints (the workers), so
# an Authorization or a Cookie does not belong there (sign requests with a secret).
RESERVED_HEADERS = frozenset(
    {
        "accept-encoding",
        "authorization",
        "connection",
        "content-length",
        "content-type",
        "cookie",
        "host",
        "idempotency-key",
        "proxy-authorization",
        "transfer-encoding",
        "user-agent",
    }
)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how the jobs of one task are delivered."""

    task: str
    url: str
    timeout: float = 30.0  # seconds for the whole request, response body included
    max_concurrency: int | None = None  # requests at once, per dispatcher (None: no cap)
    headers: tuple[tuple[str, str], ...] = field(default=())  # non-secret extra headers
    secret: str | None = None  # the NAME of the signing secret (None: unsigned)


def endpoint(
    task: str,
    url: str,
    *,
    timeout: float = 30.0,
    max_concurrency: int | None = None,
    headers: Mapping[str, Any] | None = None,
    secret: str | None = None,
) -> Endpoint:
    """An `Endpoint`, checked: ConfigurationError naming what is wrong."""
    where = f"HTTP task {task!r}"
    check_task_name(task)
    _check_url(where, url)
    if isinstance(timeout, bool) or not (
        isinstance(timeout, int | float) and 0 < timeout <= MAX_TIMEOUT
    ):
        raise ConfigurationError(
            f"{where}: timeout must be more than 0 and at most {MAX_TIMEOUT:g} seconds, "
            f"not {timeout!r}"
        )
    if max_concurrency is not None and (
        isinstance(max_concurrency, bool)
        or not isinstance(max_concurrency, int)
        or max_concurrency < 1
    ):
        raise ConfigurationError(
            f"{where}: max_concurrency must be None or at least 1, not {max_concurrency!r}"
        )
    if secret is not None and (not isinstance(secret, str) or not SECRET_NAME.fullmatch(secret)):
        raise ConfigurationError(
            f"{where}: secret must be the NAME of a secret (1-64 characters of A-Z, 0-9 and _, "
            f"read from ${ENV_PREFIX}<NAME>), not {secret!r}"
        )
    return Endpoint(
        task,
        url,
        float(timeout),
        max_concurrency,
        _checked_headers(where, headers or {}),
        secret,
    )


def _check_url(where: str, url: object) -> None:
    """What the table's CHECK lets through but no request can use.  A row reaches every
    dispatcher: a URL that only fails at request time would fail each of its jobs, and
    one that fails to parse would break the reload that reads it."""
    if not isinstance(url, str) or not re.match(r"(?i)https?://[^/?#]+", url):
        # Quoted without any password it carries: the message is logged.
        shown = redact(repr(url)) if isinstance(url, str) else repr(url)
        raise ConfigurationError(f"{where}: url must be an http:// or https:// URL, not {shown}")
    if len(url) > MAX_URL:
        raise ConfigurationError(f"{where}: url is over {MAX_URL} characters")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise ConfigurationError(
            f"{where}: url has a space or a control character (percent-encode it: %20)"
        )
    try:
        parts = urlsplit(url)
        _ = parts.port  # a port out of range, or not a number, raises ValueError
    except ValueError as exc:
        raise ConfigurationError(f"{where}: url cannot be parsed: {exc}") from None
    if not parts.hostname:
        raise ConfigurationError(f"{where}: url has no host")
    if parts.username is not None or parts.password is not None:
        # Sent as an Authorization header, and readable by every role that reads the table.
        raise ConfigurationError(
            f"{where}: url carries a user or password (user:password@host), a credential "
            "the workers can read: sign requests with a secret instead (docs/http.md)"
        )


def _checked_headers(where: str, headers: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    if not isinstance(headers, Mapping):
        raise ConfigurationError(f"{where}: headers must be an object of names to strings")
    checked = []
    for name, value in headers.items():
        if not isinstance(name, str) or not HEADER_NAME.fullmatch(name):
            raise ConfigurationError(f"{where}: {name!r} is not a valid header name")
        lower = name.lower()
        if lower in RESERVED_HEADERS or lower.startswith("notifyq-"):
            raise ConfigurationError(
                f"{where}: header {name!r} is set by the delivery or is a credential, and "
                "cannot be configured (sign requests with a secret instead: docs/http.md)"
            )
        # Printable ASCII (and tabs): httpx encodes header values as ASCII, so any other
        # character would fail every request, not the declaration.
        if not isinstance(value, str) or not all(c == "\t" or " " <= c <= "~" for c in value):
            raise ConfigurationError(
                f"{where}: header {name!r} must be a string of printable ASCII characters "
                "(no line breaks)"
            )
        checked.append((name, value))
    return tuple(sorted(checked))


def env_name(secret: str) -> str:
    return f"{ENV_PREFIX}{secret}"


class Secrets:
    """Signing secrets by name: the environment first, then the secrets file."""

    def __init__(
        self, path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
    ) -> None:
        self._env = os.environ if env is None else env
        self._file = {} if path is None else read_secrets_file(Path(path))
        self._where = "" if path is None else f" or in {path}"

    def keys(self, name: str) -> list[str]:
        """The secrets to sign with: the current one, then the previous one if set."""
        current = self._lookup(name)
        if current is None:
            raise ConfigurationError(
                f"no signing secret {name!r}: set the environment variable {env_name(name)}"
                f"{self._where} (see docs/http.md)"
            )
        previous = self._lookup(name + PREVIOUS)
        return [current] if previous is None else [current, previous]

    def _lookup(self, name: str) -> str | None:
        value = self._env.get(env_name(name))
        if value is None:
            value = self._file.get(name)
        return value or None


def read_secrets_file(path: Path) -> dict[str, str]:
    """NAME=VALUE lines; warns when others than the owner may read the file."""
    try:
        info = path.stat()
        text = path.read_text()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the secrets file {path}: {exc.strerror}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "the secrets file %s can be read by its group or others: chmod 600 %s", path, path
        )
    found: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not SECRET_NAME.fullmatch(name.removesuffix(PREVIOUS) or "-"):
            # The line is not quoted back: it may hold a secret.
            raise ConfigurationError(
                f"{path}, line {number}: expected NAME=VALUE with NAME of A-Z, 0-9 and _"
            )
        found[name] = value.strip()
    return found
