"""notifyq.http.sign and verify: the Notifyq-Signature header every HTTP delivery carries.

Pure functions (no PostgreSQL): a round trip, secret rotation, each check `verify` makes
failing with its own message, header names in any case, and a fixed test vector that
openssl computes independently of Python's hmac.
"""

from __future__ import annotations

import shutil
import subprocess

import httpx
import pytest
import starlette.datastructures

import notifyq.http
from notifyq.errors import NotifyqError
from notifyq.http import SIGNATURE_HEADER, SignatureError, sign, verify

SECRET = "whsec_test_secret"
BODY = b'{"id":42,"task":"report.generate"}'
T = 1733450000
# HMAC-SHA256(key=SECRET, msg=b"1733450000." + BODY), computed once with openssl:
#   printf '1733450000.{"id":42,"task":"report.generate"}' \
#     | openssl dgst -sha256 -hmac whsec_test_secret
VECTOR = "769264dfa674c5aa9cd3fa1f2f1de412fe87362e411535acf1915e1ae5c53c55"


def signed(value: str) -> dict[str, str]:
    return {SIGNATURE_HEADER: value}


def test_public_names() -> None:
    assert notifyq.http.__all__ == ["SIGNATURE_HEADER", "SignatureError", "sign", "verify"]
    assert SIGNATURE_HEADER == "Notifyq-Signature"
    assert issubclass(SignatureError, NotifyqError)


def test_fixed_vector() -> None:
    assert sign(SECRET, BODY, timestamp=T) == f"t={T},v1={VECTOR}"


def test_fixed_vector_matches_openssl() -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not on PATH; test_fixed_vector checks the stored constant")
    out = subprocess.run(
        [openssl, "dgst", "-sha256", "-hmac", SECRET, "-r"],
        input=f"{T}.".encode() + BODY,
        capture_output=True,
        check=True,
    ).stdout.decode()
    assert out.split()[0] == VECTOR


def test_round_trip() -> None:
    header = sign(SECRET, BODY)
    verify(SECRET, signed(header), BODY)
    verify(SECRET, signed(sign(SECRET, BODY, timestamp=T)), BODY, now=T + 10)


def test_rotation_two_secrets() -> None:
    header = sign(["new-secret", "old-secret"], BODY, timestamp=T)
    assert header.count("v1=") == 2
    verify("new-secret", signed(header), BODY, now=T)
    verify("old-secret", signed(header), BODY, now=T)
    with pytest.raises(SignatureError, match="no v1 signature"):
        verify("third-secret", signed(header), BODY, now=T)


def test_changed_body() -> None:
    header = sign(SECRET, BODY, timestamp=T)
    with pytest.raises(SignatureError, match="matches this body and secret"):
        verify(SECRET, signed(header), BODY.replace(b"42", b"43"), now=T)


def test_changed_timestamp() -> None:
    header = sign(SECRET, BODY, timestamp=T).replace(f"t={T}", f"t={T + 1}")
    with pytest.raises(SignatureError, match="no v1 signature"):
        verify(SECRET, signed(header), BODY, now=T)


def test_old_timestamp() -> None:
    header = sign(SECRET, BODY, timestamp=T)
    verify(SECRET, signed(header), BODY, now=T + 300)  # the edge is still inside
    with pytest.raises(SignatureError, match=r"301 s old, more than the tolerance of 300 s"):
        verify(SECRET, signed(header), BODY, now=T + 301)
    with pytest.raises(SignatureError, match="tolerance of 30 s"):
        verify(SECRET, signed(header), BODY, now=T + 31, tolerance=30)


def test_future_timestamp() -> None:
    header = sign(SECRET, BODY, timestamp=T)
    verify(SECRET, signed(header), BODY, now=T - 300)
    with pytest.raises(SignatureError, match=r"301 s in the future"):
        verify(SECRET, signed(header), BODY, now=T - 301)


def test_wrong_secret() -> None:
    header = sign(SECRET, BODY, timestamp=T)
    with pytest.raises(SignatureError, match="a wrong secret"):
        verify("not-the-secret", signed(header), BODY, now=T)


def test_wrong_secret_on_an_old_request_says_no_match() -> None:
    # The signature is checked first: "too old" is only said of requests the secret signed.
    header = sign("not-the-secret", BODY, timestamp=T)
    with pytest.raises(SignatureError, match="no v1 signature"):
        verify(SECRET, signed(header), BODY, now=T + 10_000)


def test_missing_header() -> None:
    with pytest.raises(SignatureError, match="no Notifyq-Signature header"):
        verify(SECRET, {"Content-Type": "application/json"}, BODY)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("", "expected one t="),
        ("garbage", "expected one t="),
        (f"v1={VECTOR}", "expected one t="),
        (f"t=soon,v1={VECTOR}", "expected one t="),
        (f"t=-5,v1={VECTOR}", "expected one t="),
        (f"t={T},t={T},v1={VECTOR}", "expected one t="),
        (f"t={T}", "no v1=<hex> signature"),
        (f"t={T},v0={VECTOR}", "no v1=<hex> signature"),
        (f"t={T},v1=abc", "v1 must be 64 hex digits"),
        (f"t={T},v1={'é' * 64}", "v1 must be 64 hex digits"),
    ],
)
def test_malformed_header(value: str, says: str) -> None:
    with pytest.raises(SignatureError, match=f"malformed Notifyq-Signature header: {says}"):
        verify(SECRET, signed(value), BODY, now=T)


def test_unknown_schemes_and_spaces_are_tolerated() -> None:
    header = f"t={T}, v2=whatever, v1={VECTOR.upper()}"
    verify(SECRET, signed(header), BODY, now=T)


@pytest.mark.parametrize("name", ["notifyq-signature", "NOTIFYQ-SIGNATURE", "NotifyQ-Signature"])
def test_header_name_in_any_case(name: str) -> None:
    header = sign(SECRET, BODY, timestamp=T)
    verify(SECRET, {"Accept": "*/*", name: header}, BODY, now=T)
    verify(SECRET, httpx.Headers({name: header}), BODY, now=T)
    # What Starlette and FastAPI hand over: lowercased raw ASGI header pairs.
    raw = [(name.lower().encode(), header.encode())]
    verify(SECRET, starlette.datastructures.Headers(raw=raw), BODY, now=T)


def test_body_must_be_bytes() -> None:
    header = sign(SECRET, BODY, timestamp=T)
    with pytest.raises(TypeError, match="raw request bytes"):
        verify(SECRET, signed(header), BODY.decode(), now=T)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="raw request bytes"):
        sign(SECRET, BODY.decode())  # type: ignore[arg-type]
    verify(SECRET, signed(header), bytearray(BODY), now=T)  # type: ignore[arg-type]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least one secret"):
        sign([], BODY)
    with pytest.raises(ValueError, match="non-empty string"):
        sign(["ok", ""], BODY)
    with pytest.raises(ValueError, match="non-negative int"):
        sign(SECRET, BODY, timestamp=-1)
    with pytest.raises(ValueError, match="non-empty string"):
        verify("", signed(sign(SECRET, BODY)), BODY)
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        verify(SECRET, signed(sign(SECRET, BODY)), BODY, tolerance=-1)
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        verify(SECRET, signed(sign(SECRET, BODY)), BODY, tolerance=float("nan"))
