"""The `notifyq` command: parse, call, print.

One module per command group; this one only assembles them under `main`:

    common.py   the DSN and log options, error handling, --app loading, argument checks
    serve.py    serve (its flags build one notifyq.Settings)
    jobs.py     enqueue, jobs list/show, retry, cancel, purge (payload.py: PAYLOAD's shape)
    queues.py   stats, cap (and its older name limit), pause, resume, events
    breakers.py breaker list, reset, set, remove
    watch.py    watch
    web.py      web (the dashboard; serve --web-port uses it too)
    schema.py   migrate, schema sql, roles, dsn, health, history

A bad argument is a usage error (exit 2) found before anything connects; an
error from the database or the app is one line on stderr (exit 1).
"""

from __future__ import annotations

import click

from . import breakers, jobs, queues, schema, serve, watch, web
from .common import Group, default_log_level, log_option, remember_environment


@click.group(cls=Group)
@log_option
@click.version_option(package_name="notifyq")
def main() -> None:
    """notifyq: a PostgreSQL job dispatcher.

    Enqueue from anywhere with plain SQL:
    INSERT INTO notifyq.jobs (task, payload) VALUES ('hello.greet', '{"name": "Ada"}');
    """
    remember_environment()
    default_log_level(click.get_current_context())


for command in (
    serve.serve,
    schema.migrate_command,
    schema.schema_group,
    schema.roles_command,
    jobs.enqueue,
    schema.dsn_command,
    schema.health_command,
    watch.watch_command,
    web.web_command,
    queues.stats,
    jobs.jobs,
    schema.history_command,
    queues.events,
    queues.cap,
    queues.limit,
    breakers.breaker,
    queues.pause,
    queues.resume,
    jobs.retry,
    jobs.cancel,
    jobs.purge,
):
    main.add_command(command)

__all__ = ["main"]
