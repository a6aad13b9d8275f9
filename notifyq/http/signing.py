"""STUB of the signing primitives, written only so the delivery's tests run on this
branch: the `sign` branch's signing.py (same API, full checks) replaces it at merge.

    Notifyq-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of f"{t}." + body>[,v1=...]
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence

from notifyq.errors import NotifyqError

SIGNATURE_HEADER = "Notifyq-Signature"


class SignatureError(NotifyqError):
    """A request's signature is missing, malformed, wrong or too old."""


def sign(secrets: str | Sequence[str], body: bytes, timestamp: int | None = None) -> str:
    keys = [secrets] if isinstance(secrets, str) else list(secrets)
    t = int(time.time()) if timestamp is None else timestamp
    return ",".join([f"t={t}", *(f"v1={_digest(k, t, body)}" for k in keys)])


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance: float = 300,
    now: float | None = None,
) -> None:
    value = next((v for k, v in headers.items() if k.lower() == SIGNATURE_HEADER.lower()), "")
    parts = [p.partition("=") for p in value.split(",")]
    stamps = [int(v) for k, _, v in parts if k == "t"]
    if len(stamps) != 1:
        raise SignatureError(f"no timestamp in {SIGNATURE_HEADER}")
    expected = _digest(secret, stamps[0], body)
    if not any(hmac.compare_digest(expected, v) for k, _, v in parts if k == "v1"):
        raise SignatureError("no signature matches")
    if abs((time.time() if now is None else now) - stamps[0]) > tolerance:
        raise SignatureError("timestamp outside the tolerance")


def _digest(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
