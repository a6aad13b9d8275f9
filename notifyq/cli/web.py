"""`notifyq web`: the dashboard in a browser (the notifyq.web package serves it)."""

from __future__ import annotations

import os
from typing import Any

import click

from .. import migrate
from ..errors import ConfigurationError
from .common import database, dsn_option


def require_web(flag: str) -> Any:
    """The notifyq.web package, or a ConfigurationError saying how to install its extra."""
    try:
        from .. import web
    except ImportError as exc:
        raise ConfigurationError(
            f"{flag} needs Starlette and uvicorn, which are not installed: pip install "
            "'notifyq[web]' (the extra), in the environment notifyq runs from"
        ) from exc
    return web


def web_token(host: str, option: str) -> str | None:
    """NOTIFYQ_WEB_TOKEN, required when binding beyond this machine (a usage error)."""
    from ..web.security import TOKEN_ENV, check_bind

    token = os.environ.get(TOKEN_ENV) or None
    try:
        check_bind(host, token)
    except ConfigurationError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None
    return token


@click.command(name="web")
@dsn_option
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind. Anything but loopback needs NOTIFYQ_WEB_TOKEN (see docs/web.md).",
)
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option(
    "--read-only", is_flag=True, help="Refuse every action (retry, cancel, purge, pause)."
)
@click.option("--hide-payloads", is_flag=True, help="Never show payloads, results or checkpoints.")
def web_command(
    dsn: str | None, host: str, port: int, read_only: bool, hide_payloads: bool
) -> None:
    """Serve the dashboard: queues, jobs, dispatchers, schedules, live (Ctrl-C to quit).

    With NOTIFYQ_WEB_TOKEN set, every request must carry it (Authorization: Bearer
    TOKEN, or as the password of the browser's login prompt)."""
    web = require_web("notifyq web")
    token = web_token(host, "--host")
    dsn = database(dsn)
    migrate.check(dsn)
    app = web.create_app(dsn, read_only=read_only, token=token, show_payloads=not hide_payloads)
    web.run(app, host, port)
