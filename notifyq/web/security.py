"""Who may use the dashboard and which requests are the user's own.

- Binding: loopback unless a token is set (`check_bind`); the dashboard can change
  jobs, so it is never reachable from the network without a credential.
- Authentication (`Guard`): with a token (NOTIFYQ_WEB_TOKEN), every request carries
  it, as `Authorization: Bearer TOKEN` or as HTTP Basic's password (any user name:
  the browser's own login prompt).  Compared in constant time.
- CSRF: a double-submit token.  The first page sets a random `notifyq_csrf` cookie
  (HttpOnly, SameSite=Strict) and puts the same value in every form; a POST whose form
  value differs, or whose Origin (or Referer) names another site, is refused (403).
- Headers on every response: a Content-Security-Policy with no inline script or style,
  no framing, no caching, no referrer to other sites.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import secrets
from collections.abc import Mapping
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ConfigurationError

CSRF_COOKIE = "notifyq_csrf"
TOKEN_ENV = "NOTIFYQ_WEB_TOKEN"

HEADERS = {
    b"content-security-policy": b"default-src 'self'; img-src 'self' data:; "
    b"frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    b"x-frame-options": b"DENY",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"same-origin",
    b"cache-control": b"no-store",
}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token."""
    if not is_loopback(host) and not token:
        raise ConfigurationError(
            f"refusing to serve the dashboard on {host} without authentication: set "
            f"{TOKEN_ENV} (a long random string), or bind 127.0.0.1 and put it behind a "
            "reverse proxy with your own authentication"
        )


def authorized(headers: Mapping[str, str], token: str) -> bool:
    given = headers.get("authorization", "")
    scheme, _, credentials = given.partition(" ")
    if scheme.lower() == "bearer":
        return hmac.compare_digest(credentials.strip().encode(), token.encode())
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return False
        return hmac.compare_digest(decoded.partition(":")[2].encode(), token.encode())
    return False


class Guard:
    """ASGI middleware: the token check (when there is a token) and the headers."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self._app = app
        self._token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        if self._token and not authorized(Request(scope).headers, self._token):
            await _refuse(send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *HEADERS.items()]
            await send(message)

        await self._app(scope, receive, with_headers)


async def _refuse(send: Send) -> None:
    body = b"authentication required: the token of NOTIFYQ_WEB_TOKEN\n"
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"www-authenticate", b'Basic realm="notifyq", charset="UTF-8"'),
        (b"content-length", str(len(body)).encode()),
        *HEADERS.items(),
    ]
    await send({"type": "http.response.start", "status": 401, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def csrf_token(request: Request) -> tuple[str, bool]:
    """The session's token, and whether it is new (the response must set the cookie)."""
    token = request.cookies.get(CSRF_COOKIE, "")
    if len(token) == 43 and token.replace("-", "").replace("_", "").isalnum():
        return token, False
    return secrets.token_urlsafe(32), True


def same_origin(request: Request) -> bool:
    """The POST came from a page of this host (Origin, else Referer; a client that sends
    neither is not a browser acting for someone else)."""
    if request.headers.get("sec-fetch-site") == "cross-site":
        return False
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source or source == "null":
        return source != "null"
    return urlsplit(source).netloc.lower() == request.headers.get("host", "").lower()


def csrf_ok(request: Request, form: Mapping[str, str]) -> bool:
    cookie = request.cookies.get(CSRF_COOKIE, "")
    given = form.get("csrf", "")
    matches = bool(cookie) and hmac.compare_digest(cookie.encode(), given.encode())
    return matches and same_origin(request)
