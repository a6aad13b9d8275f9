"""Queues: `stats`, `cap` (and its older name `limit`), `pause`, `resume`, `events`."""

from __future__ import annotations

import inspect
import re
from typing import Any

import click

from .. import codec
from .common import (
    F,
    NegativeNumbersAreArguments,
    database,
    dsn_option,
    queue_name,
    queue_names,
    task_name,
)

# Mirrors the schema's CHECK queue_limits_max_running_range, so a cap out of range is a
# usage error before anything connects (not the database's refusal, exit 1).
MAX_CAP = 1_000_000


def queues_option(fn: F) -> F:
    """--queue Q, repeatable, each name checked: a usage error before anything connects."""
    return click.option(
        "--queue",
        "queues",
        multiple=True,
        metavar="Q",
        callback=queue_names,
        help="Only this queue (repeatable).",
    )(fn)


@click.command(name="stats")
@dsn_option
@queues_option
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as one JSON document.")
def stats(dsn: str | None, queues: tuple[str, ...], as_json: bool) -> None:
    """Per queue: ready, scheduled, running, the last minute's outcomes, dead, waits; and
    ready jobs no live dispatcher would claim."""
    import anyio

    from .. import watch

    snap = anyio.run(lambda: watch.once(database(dsn), queues or None))
    if as_json:
        found = snap.as_dict()
        click.echo(codec.dumps({"queues": found["queues"], "unserved": found["unserved"]}))
        return
    from rich.console import Console

    console = Console()
    console.print(watch.queue_table(snap, console.width))
    for line in (
        *watch.empty_queue_lines(snap),
        *watch.unserved_lines(snap),
        *watch.breaker_lines(snap),
    ):
        console.print(line)


def cap_value(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """N: a whole number of jobs (0 pauses the queue), or 'none' to lift the cap."""
    if value is None:
        return None
    text = value.strip().lower()
    if text == "none":
        return "none"
    # ASCII digits only: str.isdigit() also takes '²', which int() then refuses.
    if not re.fullmatch(r"-?[0-9]+", text) or not 0 <= int(text) <= MAX_CAP:
        raise click.BadParameter(
            f"the cap must be a whole number of jobs from 0 (pauses the queue) to {MAX_CAP:,}, "
            f"or 'none', not {value!r}",
            ctx=ctx,
            param=param,
        )
    return int(text)


@click.command(name="cap", cls=NegativeNumbersAreArguments)
@click.argument("queue", required=False, callback=queue_name)
@click.argument("max_running", metavar="[N|none]", required=False, callback=cap_value)
@dsn_option
def cap(queue: str | None, max_running: int | str | None, dsn: str | None) -> None:
    """Show the concurrency caps (or QUEUE's), or set QUEUE's to N: at most N of its jobs
    run at once across every dispatcher (0 pauses the queue; 'none' lifts the cap).

    A cap bounds jobs running at once; it is not a rate limit (jobs per time)."""
    from .. import admin

    dsn = database(dsn)
    if queue is not None and max_running is not None:
        admin.set_queue_limit(dsn, queue, None if max_running == "none" else int(max_running))
    caps = admin.queue_limits(dsn)
    if queue is not None:
        caps = [row for row in caps if row["queue"] == queue]
        if not caps:
            click.echo(f"{queue}: no cap")
    elif not caps:
        click.echo("no queue has a cap")
    for row in caps:
        click.echo(f"{row['queue']}: at most {row['max_running']} running ({row['running']} now)")


# The older name, kept working for scripts (public contract); `cap` is the documented one.
limit = NegativeNumbersAreArguments(
    name="limit",
    callback=cap.callback,
    params=cap.params,
    # cleandoc: cap.help is the docstring as written, its later lines indented.
    help="Same as `notifyq cap` (its older name).\n\n" + inspect.cleandoc(cap.help or ""),
    short_help="Same as `notifyq cap` (its older name).",
)


def _paused(queue: str, task: str | None) -> str:
    return queue if task is None else f"{queue}: task {task}"


@click.command(name="pause")
@click.argument("queue", required=False, callback=queue_name)
@click.option(
    "--task", default=None, metavar="TASK", callback=task_name, help="Only this task's jobs."
)
@dsn_option
def pause(queue: str | None, task: str | None, dsn: str | None) -> None:
    """Pause QUEUE (or only --task TASK in it): no dispatcher or SQL worker starts its
    jobs until `notifyq resume`; running jobs finish, and its cap is kept.  Without
    QUEUE, list what is paused."""
    from .. import admin

    if queue is None:
        if task is not None:
            raise click.UsageError("name the queue: notifyq pause QUEUE --task TASK")
        pauses = admin.queue_pauses(database(dsn))
        if not pauses:
            click.echo("nothing is paused")
        for p in pauses:
            which = p["queue"] if p["task"] == "*" else f"{p['queue']}: task {p['task']}"
            more = "+" if p["more"] else ""
            click.echo(
                f"{which}: paused since {p['paused_at']:%Y-%m-%d %H:%M:%S%z} "
                f"({p['ready']}{more} ready)"
            )
        return
    if admin.pause_queue(database(dsn), queue, task):
        click.echo(f"{_paused(queue, task)}: paused (running jobs finish; nothing new starts)")
    else:
        click.echo(f"{_paused(queue, task)}: already paused")


@click.command(name="resume")
@click.argument("queue", callback=queue_name)
@click.option(
    "--task",
    default=None,
    metavar="TASK",
    callback=task_name,
    help="Lift this task's own pause (a queue's pause and its tasks' are lifted apart).",
)
@dsn_option
def resume(queue: str, task: str | None, dsn: str | None) -> None:
    """Lift the pause of QUEUE (or of --task TASK in it); its dispatchers start its jobs
    at once."""
    from .. import admin

    dsn = database(dsn)
    if admin.resume_queue(dsn, queue, task):
        click.echo(f"{_paused(queue, task)}: resumed")
        return
    tasks = [p["task"] for p in admin.queue_pauses(dsn) if p["queue"] == queue]
    left = [t for t in tasks if t != "*"] if task is None else []
    hint = f" (its tasks paused on their own: {', '.join(left)}; use --task)" if left else ""
    click.echo(f"{_paused(queue, task)}: was not paused{hint}")


@click.command(name="events")
@click.argument("state", type=click.Choice(["on", "off"]), required=False)
@click.argument("queue", required=False, callback=queue_name)
@dsn_option
def events(state: str | None, queue: str | None, dsn: str | None) -> None:
    """Show the queues with per-job events, or switch QUEUE's on or off.

    With events on, every status change and progress report of the queue's jobs
    is announced on the notifyq_events channel (JSON, one object per change), for
    programs that follow single jobs.  Off by default: a queue without them pays
    nothing for them."""
    from .. import admin

    if state is not None and queue is None:
        raise click.UsageError(f"name the queue: notifyq events {state} QUEUE")
    dsn = database(dsn)
    if state is not None:
        assert queue is not None
        admin.set_events(dsn, queue, state == "on")
    enabled = admin.queue_events(dsn)
    if not enabled:
        click.echo("no queue has events on")
    for row in enabled:
        click.echo(f"{row['queue']}: events on since {row['enabled_at']:%Y-%m-%d %H:%M:%S%z}")
