"""HTTP handlers: `notifyq serve` POSTs jobs to web endpoints (issue 16)."""

from notifyq.errors import SignatureError
from notifyq.http.signing import SIGNATURE_HEADER, sign, verify

__all__ = ["SIGNATURE_HEADER", "SignatureError", "sign", "verify"]
