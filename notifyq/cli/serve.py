"""`notifyq serve`: flags in, one `Settings` out, then the app's dispatcher.

The flags that map to a Settings field carry the field's name, take their
default from the field (so `--help` shows Settings' defaults) and are checked by
Settings alone: a refusal becomes a usage error naming the flag, before --app is
imported or anything connects.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import click

from .. import migrate
from ..errors import InvalidSetting
from ..settings import MAX_BATCH, MAX_CONCURRENCY, Settings
from .common import (
    F,
    app_shape,
    database,
    dsn_option,
    duration,
    format_age,
    load_app,
    log_option,
)
from .web import require_web, web_token


def _setting(*decls: str, age: bool = False, **kwargs: Any) -> Callable[[F], F]:
    """A flag for the Settings field of the same name, defaulting to the field's default."""
    default = Settings.default(decls[0].lstrip("-").replace("-", "_"))
    if age:
        default = format_age(default)  # shown as 7d, not 604800.0; the callback parses it
    return click.option(*decls, default=default, show_default=default is not None, **kwargs)


def _queue_list(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    # Split only; Settings checks the names (and that there is one).
    return None if value is None else tuple(q.strip() for q in value.split(",") if q.strip())


@click.command(name="serve")
@log_option
@click.option(
    "--app",
    "app_target",
    envvar="NOTIFYQ_APP",
    required=True,
    metavar="MODULE:ATTR",
    callback=app_shape,
    help="The notifyq.App whose tasks to run, e.g. examples.hello:app (also NOTIFYQ_APP).",
)
@dsn_option
@_setting(
    "--concurrency",
    "-c",
    type=int,
    help=f"Jobs run at once by this process, 1 to {MAX_CONCURRENCY:,} (async handlers as "
    "tasks, sync ones in threads).",
)
@click.option(
    "--queues",
    "-q",
    metavar="Q1,Q2",
    default=None,
    callback=_queue_list,
    help="Comma-separated queues to serve. Default: 'default' and every queue "
    "the app's tasks name.",
)
@_setting(
    "--batch-size",
    type=int,
    help=f"Most jobs claimed per statement, 1 to {MAX_BATCH:,}. Default: the concurrency.",
)
@_setting(
    "--poll-interval",
    type=float,
    help="Seconds between fallback polls, which catch jobs whose notification was lost.",
)
@_setting(
    "--lease",
    type=float,
    help="Seconds a claim holds without a heartbeat: a frozen process's jobs are rescued "
    "after this (a killed one's within seconds, through its database session).",
)
@_setting(
    "--shutdown-timeout",
    type=float,
    help="On SIGTERM/SIGINT, seconds running jobs get to finish before they are "
    "handed back to the queue (a second signal exits at once).",
)
@click.option(
    "--no-listen",
    is_flag=True,
    help="Do not LISTEN; find work by polling only (for PgBouncer in transaction mode).",
)
@click.option(
    "--migrate/--no-migrate",
    "do_migrate",
    default=False,
    help="Apply the notifyq schema before serving (always done for the private server).",
)
@_setting(
    "--retain-succeeded",
    age=True,
    callback=duration(forever=True),
    metavar="AGE",
    help="Delete succeeded jobs (and their history) this long after they finished: "
    "90s, 30m, 12h, 7d, 2w, or 'forever'.",
)
@_setting(
    "--retain-cancelled",
    age=True,
    callback=duration(forever=True),
    metavar="AGE",
    help="Delete cancelled jobs this long after they were cancelled, or 'forever'.",
)
@_setting(
    "--retain-dead",
    age=True,
    callback=duration(forever=True),
    metavar="AGE",
    help="Delete dead jobs this long after they died, or 'forever'.",
)
@_setting(
    "--metrics-port",
    type=int,
    metavar="PORT",
    help="Serve Prometheus metrics on http://HOST:PORT/metrics (HOST: --metrics-host), with "
    "/healthz and /readyz. Needs prometheus-client: pip install 'notifyq[metrics]'.",
)
@_setting(
    "--metrics-host",
    metavar="HOST",
    help="Address the metrics endpoint binds: this machine only by default (it has no "
    "authentication); 0.0.0.0 for every interface, e.g. for a scraper in another container.",
)
@click.option(
    "--web-port",
    type=click.IntRange(0, 65535),
    metavar="PORT",
    default=None,
    help="Serve the dashboard (notifyq web) on http://WEB-HOST:PORT in this process, beside "
    "the dispatcher. Needs the web extra: pip install 'notifyq[web]'.",
)
@click.option(
    "--web-host",
    default="127.0.0.1",
    show_default=True,
    metavar="HOST",
    help="Address the dashboard binds; anything but loopback needs NOTIFYQ_WEB_TOKEN.",
)
@click.option(
    "--until-empty",
    is_flag=True,
    help="One-shot run: exit 0 once no job of the served queues is to start now and every "
    "job taken has finished (delayed jobs and retries in backoff are left for a later run).",
)
@_setting("--max-jobs", type=int, metavar="N", help="Claim at most N jobs, let them finish, exit.")
@_setting(
    "--max-runtime",
    callback=duration(),
    metavar="DURATION",
    help="After this long (90s, 30m, 2h), claim no more and stop as on SIGTERM: running "
    "jobs get --shutdown-timeout to finish, then are handed back. With --until-empty, "
    "reaching this or --max-jobs first exits 3.",
)
@_setting(
    "--secrets-file",
    type=click.Path(dir_okay=False),
    metavar="PATH",
    help="Signing secrets of HTTP tasks, NAME=VALUE lines (chmod 600); the environment's "
    "NOTIFYQ_SECRET_<NAME> wins over the file. See docs/http.md.",
)
@click.pass_context
def serve(
    ctx: click.Context,
    /,
    app_target: str,
    dsn: str | None,
    no_listen: bool,
    do_migrate: bool,
    web_port: int | None,
    web_host: str,
    **given: Any,
) -> None:
    """Run the dispatcher: LISTEN, claim in batches, run the app's handlers.

    Exit status: 0 after SIGTERM/SIGINT or a one-shot run's end; 3 when --until-empty
    was given but --max-jobs or --max-runtime ended the run first; 2 for a bad option;
    1 on an error."""
    try:
        settings = Settings(listen=not no_listen, **given)
    except InvalidSetting as exc:
        flag = next((p for p in ctx.command.params if p.name == exc.setting), None)
        raise click.BadParameter(exc.reason, ctx=ctx, param=flag) from None
    if settings.metrics_port is not None:
        from ..metrics import require_prometheus  # fail before connecting, not after

        require_prometheus()
    web, token = None, None
    if web_port is not None:  # fail before connecting, not after
        web = require_web("--web-port")
        token = web_token(web_host, "--web-host")
    app = load_app(app_target)
    dsn = dsn or app.dsn
    if dsn and do_migrate:
        migrate.migrate(dsn)
    dsn = database(dsn)
    migrate.check(dsn)
    beside = []
    if web is not None:
        dashboard = web.create_app(dsn, token=token)
        beside.append(partial(web.serve_beside, dashboard, web_host, web_port))
    sys.exit(app.serve(settings, dsn=dsn, beside=beside))
