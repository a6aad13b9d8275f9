"""Single jobs: `enqueue`, `jobs list`, `jobs show`, `retry`, `cancel`, `purge`."""

from __future__ import annotations

from typing import Any

import click

from .. import codec
from ..admin import FINISHED, STATUSES
from ..app import App
from ..job import JobState
from . import payload as payloads
from .common import (
    Group,
    app_shape,
    database,
    dsn_option,
    duration,
    fail,
    json_document,
    load_app,
    queue_name,
    tags_option,
    task_name,
    warn,
)

# Mirror the schema's CHECK constraints (jobs_priority_range, jobs_max_attempts_range), so
# a value out of range is a usage error before anything connects.
PRIORITY = click.IntRange(-1000, 1000)
MAX_ATTEMPTS = click.IntRange(1, 1000)


@click.command(name="enqueue")
@click.argument("task", callback=task_name)
@click.argument("payload", required=False, default="{}", callback=json_document)
@dsn_option
@click.option(
    "--queue",
    default=None,
    metavar="Q",
    callback=queue_name,
    help="Queue name (default: the task's queue in --app, else 'default').",
)
@click.option("--priority", type=PRIORITY, default=None, help="-1000..1000; higher runs first.")
@click.option(
    "--delay",
    type=click.FloatRange(0),
    default=None,
    help="Seconds from now (database clock) before the job may run.",
)
@click.option(
    "--max-attempts",
    type=MAX_ATTEMPTS,
    default=None,
    help="Attempts before the job is dead (default: the task's setting).",
)
@tags_option("Tag the job with T (repeatable), to find it by later (jobs list --tag, ...).")
@click.option(
    "--dedupe-key",
    default=None,
    metavar="K",
    help="While an unfinished job holds key K, enqueue nothing and print that job's id.",
)
@click.option(
    "--unique-for",
    type=click.FloatRange(0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="With --dedupe-key: the key is also held this long after the job was enqueued, "
    "even once it finished.",
)
@click.option(
    "--replace",
    is_flag=True,
    default=False,
    help="With --dedupe-key: a queued job holding the key (enqueued with --replace too) "
    "takes this payload and run time instead (debounce).",
)
@click.option(
    "--app",
    "app_target",
    default=None,
    metavar="MODULE:ATTR",
    callback=app_shape,
    help="Enqueue as this notifyq.App would: the task's queue and max attempts unless given, "
    "and PAYLOAD checked against the task's handler (a payload its annotation rules out, an "
    "array for a dict, is refused). Without it, a payload that is not a JSON object is "
    "enqueued with a warning.",
)
@click.pass_context
def enqueue(
    ctx: click.Context,
    task: str,
    payload: Any,
    dsn: str | None,
    queue: str | None,
    priority: int | None,
    delay: float | None,
    max_attempts: int | None,
    tags: tuple[str, ...],
    dedupe_key: str | None,
    unique_for: float | None,
    replace: bool,
    app_target: str | None,
) -> None:
    """Enqueue TASK with PAYLOAD (a JSON document, default {}); prints the job id."""
    if (unique_for is not None or replace) and dedupe_key is None:
        raise click.UsageError(
            "--unique-for and --replace need --dedupe-key: the key is what they act on"
        )
    if unique_for is not None and replace:
        raise click.UsageError("--unique-for and --replace cannot be combined")
    app = load_app(app_target) if app_target else None
    try:
        warning = payloads.check(task, payload, app)
    except ValueError as exc:
        param = next(p for p in ctx.command.params if p.name == "payload")
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    if warning:
        warn(warning)
    # With --app, the job gets the task's queue and max attempts, as app.enqueue would
    # give it: a task on queue 'reports' enqueued to 'default' waits for the wrong dispatcher.
    known = app.registry.get(task) if app else None
    if known is not None:
        queue = known.queue if queue is None else queue
        max_attempts = known.max_attempts if max_attempts is None else max_attempts
    client = App(database(dsn or (app.dsn if app else None)))
    try:
        job_id = client.enqueue_sync(
            task,
            payload,
            queue=queue,
            priority=priority,
            delay=delay,
            max_attempts=max_attempts,
            tags=tags or None,
            dedupe_key=dedupe_key,
            unique_for=unique_for,
            on_duplicate="replace" if replace else None,
        )
    finally:
        client.close()
    click.echo(job_id)


@click.group(name="jobs", cls=Group)
def jobs() -> None:
    """List and inspect jobs."""


@jobs.command(name="list")
@dsn_option
@click.option("--queue", default=None, metavar="Q", callback=queue_name, help="Only this queue.")
@click.option("--task", default=None, metavar="TASK", callback=task_name, help="Only this task.")
@click.option(
    "--status",
    type=click.Choice(STATUSES),
)
@click.option(
    "--limit",
    type=click.IntRange(1),
    default=20,
    show_default=True,
    metavar="N",
    help="Show at most N jobs, the newest first (a queue's concurrency cap is `notifyq cap`).",
)
@tags_option("Only jobs tagged T (repeatable: jobs with every one of them).")
def jobs_list(
    dsn: str | None,
    queue: str | None,
    task: str | None,
    status: str | None,
    limit: int,
    tags: tuple[str, ...],
) -> None:
    """The newest jobs, one line each (id, queue, task, status, attempts, first error line)."""
    from .. import admin

    found = admin.list_jobs(
        database(dsn), queue=queue, task=task, status=status, limit=limit, tags=tags
    )
    click.echo(f"{'id':>8}  {'queue':<12} {'task':<24} {'status':<9} {'tries':>5}  error")
    for j in found:
        tries = f"{j['attempts']}/{j['max_attempts'] or '-'}"
        click.echo(
            f"{j['id']:>8}  {j['queue']:<12} {j['task']:<24} {j['status']:<9} {tries:>5}  "
            f"{j['error'] or ''}".rstrip()
        )


@jobs.command(name="show")
@click.argument("job_id", metavar="ID", type=int)
@dsn_option
def jobs_show(job_id: int, dsn: str | None) -> None:
    """Every column of job ID, with the full last_error (traceback included), and its
    history: each attempt's outcome with its error."""
    from .. import admin

    dsn = database(dsn)
    job = admin.show_job(dsn, job_id)
    if job is None:
        fail(f"no job with id {job_id}")
    error = job.pop("last_error")
    documents = {
        name: job.pop(name) for name in ("payload", "checkpoint", "result", "trace_context")
    }
    job["tags"] = ", ".join(job["tags"] or ()) or None
    for name, value in job.items():
        click.echo(f"{name + ':':<{max(18, len(name) + 2)}}{'' if value is None else value}")
    for name, value in documents.items():
        click.echo(f"{name + ':':<18}{'' if value is None else codec.dumps(value)}")
    click.echo("last_error:" + ("\n" + error if error else ""))
    history = admin.job_history(dsn, job_id)
    click.echo("history:" + ("" if history else " (none recorded: see notifyq history)"))
    for h, why in zip(history, attempt_errors(history), strict=True):
        step = f"{h['from_status'] or 'inserted'} -> {h['to_status']}"
        by = f" by {h['dispatcher']}" if h["dispatcher"] else ""
        shown = f": {why}" if why else ""
        click.echo(
            f"  {h['at']:%Y-%m-%d %H:%M:%S.%f}  {step:<22} attempt {h['attempt']}{by}{shown}"
        )


def attempt_errors(history: list[dict[str, Any]]) -> list[str | None]:
    """The error of each history row.  The history records an error only when it changed
    last_error, so an attempt that failed like the one before has none recorded: a
    failure (running -> queued or dead, the attempt still counted) that recorded no
    error failed with the error last recorded.  An attempt handed back at shutdown is
    not counted (its attempt number goes down) and gets none."""
    shown: list[str | None] = []
    last: str | None = None
    claimed_attempt: int | None = None
    for h in history:
        error = h["error"]
        if h["to_status"] == JobState.RUNNING:
            claimed_attempt = h["attempt"]
        failed = (
            h["from_status"] == JobState.RUNNING
            and h["to_status"] in (JobState.QUEUED, JobState.DEAD)
            and h["attempt"] == claimed_attempt
        )
        if error is None and failed:
            error = last
        if h["error"] is not None:
            last = h["error"]
        shown.append(error)
    return shown


@click.command(name="retry")
@click.argument("job_id", metavar="[ID]", type=int, required=False)
@dsn_option
@click.option("--dead", "all_dead", is_flag=True, help="Re-queue every dead job instead of one.")
@click.option(
    "--queue", default=None, metavar="Q", callback=queue_name, help="With --dead: only this queue."
)
@click.option(
    "--task", default=None, metavar="TASK", callback=task_name, help="With --dead: only this task."
)
@tags_option("With --dead: only jobs tagged T (repeatable: with every one of them).")
def retry(
    job_id: int | None,
    dsn: str | None,
    all_dead: bool,
    queue: str | None,
    task: str | None,
    tags: tuple[str, ...],
) -> None:
    """Run job ID again now (dead or cancelled ones start from attempt 1), or --dead jobs."""
    from .. import admin

    if all_dead == (job_id is not None):
        raise click.UsageError("give either a job ID or --dead")
    if not all_dead and (queue or task or tags):
        raise click.UsageError("--queue, --task and --tag go with --dead")
    if all_dead:
        count = admin.retry_dead(database(dsn), queue, task, tags)
        click.echo(f"re-queued {count} dead jobs")
    else:
        assert job_id is not None
        was = admin.retry_job(database(dsn), job_id)
        click.echo(f"job {job_id}: {was} -> queued")


@click.command(name="cancel")
@click.argument("job_id", metavar="[ID]", type=int, required=False)
@dsn_option
@tags_option("Cancel every unfinished job tagged T instead of one (repeatable: with every one).")
@click.option(
    "--queue", default=None, metavar="Q", callback=queue_name, help="With --tag: only this queue."
)
@click.option(
    "--task", default=None, metavar="TASK", callback=task_name, help="With --tag: only this task."
)
def cancel(
    job_id: int | None,
    dsn: str | None,
    tags: tuple[str, ...],
    queue: str | None,
    task: str | None,
) -> None:
    """Cancel job ID: a queued job never runs; a running one's handler is interrupted.
    With --tag, every queued, waiting or running job that has the tags, alike."""
    from .. import admin

    if bool(tags) == (job_id is not None):
        raise click.UsageError("give either a job ID or --tag")
    if not tags and (queue or task):
        raise click.UsageError("--queue and --task go with --tag")
    if tags:
        count = admin.cancel_jobs(database(dsn), tags, queue, task)
        click.echo(f"cancelled {count} jobs tagged {', '.join(tags)}")
        return
    assert job_id is not None
    was = admin.cancel_job(database(dsn), job_id)
    note = " (the dispatcher running it interrupts its handler)" if was == JobState.RUNNING else ""
    click.echo(f"job {job_id}: {was} -> cancelled{note}")


def _checked_age(ctx: click.Context, param: click.Parameter, value: str) -> str:
    duration()(ctx, param, value)  # a usage error if it is no duration
    return value


@click.command(name="purge")
@dsn_option
@click.option(
    "--older-than",
    default="7d",
    show_default=True,
    metavar="AGE",
    callback=_checked_age,
    help="Finished longer ago than this: 90s, 30m, 12h, 7d, 2w.",
)
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(FINISHED),
    help="Statuses to delete (repeatable). Default: succeeded and cancelled.",
)
@tags_option("Only jobs tagged T (repeatable: with every one of them).")
def purge(
    dsn: str | None, older_than: str, statuses: tuple[str, ...], tags: tuple[str, ...]
) -> None:
    """Delete finished jobs in batches; queued and running jobs are never touched."""
    from .. import admin

    seconds = admin.parse_age(older_than)
    chosen = statuses or (JobState.SUCCEEDED.value, JobState.CANCELLED.value)
    count = admin.purge(database(dsn), seconds, chosen, tags)
    tagged = f" tagged {', '.join(tags)}" if tags else ""
    click.echo(f"purged {count} jobs ({', '.join(chosen)}){tagged} finished over {older_than} ago")
