"""The database: `migrate`, `schema sql`, `roles`, `dsn`, `health`, `history`."""

from __future__ import annotations

import sys

import click

from .. import codec, embedded, migrate
from .common import database, dsn_given, dsn_option, fail


@click.command(name="migrate")
@dsn_option
def migrate_command(dsn: str | None) -> None:
    """Install or upgrade the notifyq schema (idempotent; safe to run concurrently)."""
    dsn = dsn or embedded.start()
    before, after = migrate.migrate(dsn)
    if before == after:
        click.echo(f"schema already at version {after}")
    else:
        click.echo(f"schema migrated from version {before or 'none'} to {after}")


@click.group(name="schema")
def schema_group() -> None:
    """The notifyq schema as SQL, for teams that apply migrations with their own tool."""


def _known_version(version: int) -> int:
    if version > migrate.SCHEMA_VERSION:
        raise click.BadParameter(
            f"{version} is newer than the schema this notifyq knows "
            f"({migrate.SCHEMA_VERSION}): upgrade notifyq to get its migrations"
        )
    return version


@schema_group.command(name="sql")
@click.option(
    "--from",
    "after",
    type=click.IntRange(min=0),
    callback=lambda _ctx, _param, value: _known_version(value),
    default=0,
    show_default=True,
    metavar="VERSION",
    help="The schema version the database is at (SELECT max(version) FROM "
    "notifyq.schema_version); 0: no schema yet.",
)
def schema_sql(after: int) -> None:
    """Print the SQL that brings a database from VERSION to this notifyq's schema.

    It is what `notifyq migrate` runs, migration by migration, each followed by the
    INSERT recording its version: apply it in one transaction (Alembic, Django
    migrations, Flyway, sqitch, psql -1).  It starts with a guard that raises, before
    anything changes, when the database is not at VERSION.  Connects to nothing.
    """
    if after == migrate.SCHEMA_VERSION:
        click.echo(
            f"-- the schema is at version {after}, this notifyq's: nothing to apply "
            "(the guard below only checks that the database is there)"
        )
    else:
        click.echo(
            f"-- notifyq schema from version {after or 'none'} to {migrate.SCHEMA_VERSION}: "
            "apply in one transaction"
        )
    click.echo(migrate.script(after), nl=False)


@click.command(name="roles")
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
    from .. import roles  # local: this command's block stays self-contained

    if print_only:
        click.echo(roles.script(producer_role, worker_role), nl=False)
        return
    roles.install(database(dsn), producer_role, worker_role)
    click.echo(
        f"roles {producer_role} (enqueue) and {worker_role} (serve) granted their privileges"
    )


@click.command(name="dsn")
def dsn_command() -> None:
    """Print the DSN of the running private server: psql "$(notifyq dsn)"."""
    dsn = embedded.running_dsn()
    if dsn is None:
        fail(
            f"the private PostgreSQL is not running (data directory {embedded.data_dir()}); "
            "start it with `notifyq serve`"
        )
    click.echo(dsn)


@click.command(name="health")
@click.option(
    "--dsn",
    envvar="NOTIFYQ_DSN",
    metavar="DSN",
    callback=dsn_given,
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
    from .. import health  # local: this command's block stays self-contained

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


@click.command(name="history")
@click.argument("state", type=click.Choice(["on", "off"]), required=False)
@dsn_option
def history_command(state: str | None, dsn: str | None) -> None:
    """Show, or switch on or off, the status history (notifyq.job_history).

    On by default: one row per status change of every job, written in the same
    transaction.  Switching it off saves that write where throughput matters
    more than the audit trail; it needs the owner of the notifyq tables."""
    from .. import admin

    dsn = database(dsn)
    if state is not None:
        admin.set_history(dsn, state == "on")
    on = admin.history_enabled(dsn)
    click.echo(f"history is {'on' if on else 'off'}")
