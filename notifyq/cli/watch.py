"""`notifyq watch`: the live terminal view (the notifyq.watch package draws it)."""

from __future__ import annotations

import click

from .. import codec
from .common import database, dsn_option, tags_option
from .queues import queues_option


@click.command(name="watch")
@dsn_option
@queues_option
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
@tags_option("Only jobs tagged T (repeatable: with every one of them); dispatchers are all shown.")
def watch_command(
    dsn: str | None,
    queues: tuple[str, ...],
    once: bool,
    as_json: bool,
    interval: float,
    max_age: float,
    tags: tuple[str, ...],
) -> None:
    """Live view of queues, dispatchers and failures (Ctrl-C to quit)."""
    import anyio
    from rich.console import Console

    from .. import watch

    dsn = database(dsn)
    console = Console()
    if once:
        snap = anyio.run(lambda: watch.once(dsn, queues or None, max_age, tags or None))
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
                tags=tags or None,
            )
        )
    except KeyboardInterrupt:
        pass
    finally:
        if live is not None:
            live.stop()
