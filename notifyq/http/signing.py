"""The signature on every request `notifyq serve` delivers to an HTTP endpoint.

    Notifyq-Signature: t=1733450000,v1=5257a869...,v1=9e1c...

`t` is the Unix time of signing in seconds; each `v1` is the lowercase hex HMAC-SHA256,
keyed with one secret (UTF-8), of ``f"{t}.".encode() + body``.  One `v1` per secret the
dispatcher holds, so a secret can be rotated without a window where deliveries fail: give
`serve` the new and the old secret, move the endpoint to the new one, then drop the old.
Signing the timestamp with the body lets a receiver refuse a captured request replayed
later (`tolerance`), in the style of Stripe's webhook signatures.

The receiver must verify the bytes it received, before parsing them: JSON parsed and
serialised again is not the same bytes (key order, spacing, escapes), and the signature
no longer matches.

    Flask:      verify(secret, request.headers, request.get_data())
    Starlette:  verify(secret, request.headers, await request.body())
    FastAPI:    the same as Starlette, with `request: Request` as a parameter

Nothing here does I/O or imports the rest of notifyq but its errors: a receiver can
install notifyq only to call `verify`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Mapping, Sequence

from notifyq.errors import SignatureError

SIGNATURE_HEADER = "Notifyq-Signature"
DEFAULT_TOLERANCE = 300.0

_HEX_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_UNIX_SECONDS = re.compile(r"[0-9]{1,12}")


def sign(secrets: str | Sequence[str], body: bytes, timestamp: int | None = None) -> str:
    """The `Notifyq-Signature` header value for `body`: one `v1=` per secret, in order.

    `timestamp` (Unix seconds) defaults to now; tests pass one to get a fixed value.
    """
    keys = [secrets] if isinstance(secrets, str) else list(secrets)
    if not keys:
        raise ValueError("sign() needs at least one secret")
    if not all(isinstance(key, str) and key for key in keys):
        raise ValueError("every signing secret must be a non-empty string")
    data = _raw(body)
    if timestamp is None:
        timestamp = int(time.time())
    elif isinstance(timestamp, bool) or not isinstance(timestamp, int) or timestamp < 0:
        raise ValueError(f"timestamp must be Unix seconds as a non-negative int, not {timestamp!r}")
    return ",".join([f"t={timestamp}", *(f"v1={_digest(key, timestamp, data)}" for key in keys)])


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> None:
    """Check that `body` was signed with `secret` less than `tolerance` seconds from `now`.

    Returns None when the request is authentic; raises `SignatureError` saying which
    check failed otherwise: answer 401 and do not run the job.  (`notifyq serve` does not
    retry a 401: the job goes to `dead`, where `notifyq retry` finds it once the
    secrets agree again.)
    `headers` is any mapping of the request's headers (a dict, or Starlette, Werkzeug
    or httpx headers); the name is matched whatever its case.  `body` is the raw request
    body as bytes, exactly as received.

    The signature is checked before the timestamp, so "too old" and "in the future"
    are only said of requests the secret signed: they point at a replay or at a clock
    that is off on one side, never at a wrong secret.
    """
    if not isinstance(secret, str) or not secret:
        raise ValueError("verify() needs the endpoint's secret as a non-empty string")
    if not tolerance >= 0:  # NaN too: it would compare false and accept any timestamp
        raise ValueError(f"tolerance must be >= 0 seconds, not {tolerance!r}")
    data = _raw(body)
    value = _header(headers)
    if value is None:
        raise SignatureError(f"no {SIGNATURE_HEADER} header: the request was not signed")
    timestamp, candidates = _parse(value)
    expected = _digest(secret, timestamp, data).encode()
    # Every candidate is compared, in constant time, whatever matched before it.
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(expected, candidate.lower().encode())
    if not matched:
        raise SignatureError(
            f"no v1 signature in {SIGNATURE_HEADER} matches this body and secret: a wrong "
            "secret, or a body that is not the raw bytes received (parsed and re-serialised "
            "JSON differs), or a changed request"
        )
    clock = time.time() if now is None else now
    if timestamp < clock - tolerance:
        raise SignatureError(
            f"{SIGNATURE_HEADER} timestamp is {clock - timestamp:.0f} s old, more than the "
            f"tolerance of {tolerance:g} s: a replayed request, or a clock that is off"
        )
    if timestamp > clock + tolerance:
        raise SignatureError(
            f"{SIGNATURE_HEADER} timestamp is {timestamp - clock:.0f} s in the future, more "
            f"than the tolerance of {tolerance:g} s: a clock that is off on one side"
        )


def _digest(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def _raw(body: object) -> bytes:
    if isinstance(body, str):
        raise TypeError(
            "the body must be the raw request bytes, not str: pass request.get_data() "
            "(Flask) or await request.body() (Starlette, FastAPI), before any JSON parsing"
        )
    if not isinstance(body, bytes | bytearray | memoryview):
        raise TypeError(f"the body must be bytes, not {type(body).__name__}")
    return bytes(body)


def _header(headers: Mapping[str, str]) -> str | None:
    # Starlette, Werkzeug and httpx headers ignore case in get(); a plain dict does not,
    # so fall back to a scan that does.
    value = headers.get(SIGNATURE_HEADER)
    if value is None:
        wanted = SIGNATURE_HEADER.lower()
        value = next((v for k, v in headers.items() if k.lower() == wanted), None)
    return value


def _parse(value: object) -> tuple[int, list[str]]:
    if not isinstance(value, str):
        raise SignatureError(f"malformed {SIGNATURE_HEADER} header: not a string")
    timestamps: list[str] = []
    candidates: list[str] = []
    for part in value.split(","):
        key, _, item = part.strip().partition("=")
        if key == "t":
            timestamps.append(item)
        elif key == "v1":
            if not _HEX_SHA256.fullmatch(item):
                raise SignatureError(
                    f"malformed {SIGNATURE_HEADER} header: v1 must be 64 hex digits"
                )
            candidates.append(item)
        # Other keys (a later scheme, v2=...) are skipped, so senders can add one.
    if len(timestamps) != 1 or not _UNIX_SECONDS.fullmatch(timestamps[0]):
        raise SignatureError(
            f"malformed {SIGNATURE_HEADER} header: expected one t=<unix seconds>, "
            f"as in t=1733450000,v1=<hex>"
        )
    if not candidates:
        raise SignatureError(f"malformed {SIGNATURE_HEADER} header: no v1=<hex> signature")
    return int(timestamps[0]), candidates
