"""Circuit breakers: `breaker list`, `reset`, `set`, `remove`."""

from __future__ import annotations

from typing import Any

import click

from .. import codec
from .common import Group, database, dsn_option, duration, format_age, task_name


@click.group(name="breaker", cls=Group)
def breaker() -> None:
    """Show, reset and set the tasks' circuit breakers (docs/lifecycle.md).

    A task's breaker opens after a number of failures within a window: its jobs
    then stay queued (no attempt charged) until a cool-down has passed, when one
    job runs as a probe; its success closes the breaker, its failure reopens it."""


def describe(row: dict[str, Any]) -> str:
    """One line per breaker: where it stands, then its settings."""
    settings = (
        f"{row['failures']} failures in {format_age(row['window_seconds'])}, "
        f"cool-down {format_age(row['cooldown_seconds'])}"
    )
    if row["state"] == "open":
        when = (
            "probes at the next claim"
            if not row["reopen_in"]
            else f"probes in {row['reopen_in']:.0f}s"
        )
        now = f"OPEN ({when})"
    elif row["state"] == "half_open":
        now = f"HALF-OPEN (probe: job {row['probe_job']})" if row["probe_job"] else "HALF-OPEN"
    else:
        now = f"closed ({row['failed']} failures in this window)" if row["failed"] else "closed"
    return f"{row['task']}: {now}; {settings}; opened {row['opens']} times"


@breaker.command(name="list")
@dsn_option
@click.option("--json", "as_json", is_flag=True, help="Print the breakers as JSON.")
def breaker_list(dsn: str | None, as_json: bool) -> None:
    """Every task's circuit breaker: its state and settings."""
    from .. import admin

    found = admin.circuit_breakers(database(dsn))
    if as_json:
        click.echo(codec.dumps(found))
        return
    if not found:
        click.echo("no task has a circuit breaker")
    for row in found:
        click.echo(describe(row))


@breaker.command(name="reset")
@click.argument("task", callback=task_name)
@dsn_option
def breaker_reset(task: str, dsn: str | None) -> None:
    """Close TASK's circuit breaker now: its held jobs start at once, and the failures
    counted so far are forgotten (notifyq.reset_circuit_breaker)."""
    from .. import admin

    was = admin.reset_circuit_breaker(database(dsn), task)
    click.echo(f"{task}: closed (was {was.replace('_', '-')})")


@breaker.command(name="set")
@click.argument("task", callback=task_name)
@click.option(
    "--failures",
    type=click.IntRange(1, 1_000_000),
    required=True,
    metavar="N",
    help="Failures within the window that open the breaker.",
)
@click.option(
    "--window",
    required=True,
    callback=duration(),
    metavar="DURATION",
    help="The window the failures are counted in (90s, 5m, ...).",
)
@click.option(
    "--cooldown",
    required=True,
    callback=duration(),
    metavar="DURATION",
    help="How long an open breaker holds the task's jobs back before a probe.",
)
@dsn_option
def breaker_set(task: str, failures: int, window: float, cooldown: float, dsn: str | None) -> None:
    """Give TASK a circuit breaker, or change its settings; its state is kept
    (notifyq.set_circuit_breaker).  An app's @app.task(circuit_breaker=...) writes its
    own settings again when a dispatcher starts."""
    from .. import admin
    from ..breaker import CircuitBreaker
    from ..errors import ConfigurationError

    try:
        settings = CircuitBreaker(failures, window, cooldown)
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from None
    dsn = database(dsn)
    admin.set_circuit_breaker(dsn, task, settings)
    for row in admin.circuit_breakers(dsn):
        if row["task"] == task:
            click.echo(describe(row))


@breaker.command(name="remove")
@click.argument("task", callback=task_name)
@dsn_option
def breaker_remove(task: str, dsn: str | None) -> None:
    """TASK has no circuit breaker from now on (its held jobs start at once)."""
    from .. import admin

    if admin.remove_circuit_breaker(database(dsn), task):
        click.echo(f"{task}: circuit breaker removed")
    else:
        click.echo(f"{task}: had no circuit breaker")
