"""The SQL contract: columns and defaults, constraints, notifications, the stats view,
migrations."""

from __future__ import annotations

import threading
import time
from importlib import resources
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from notifyq import NotifyqError, SchemaMissing, channels, cli, migrate, store
from tests.conftest import REPO, query
from tests.helpers import listen_on


def insert(dsn: str, columns: str, values: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"INSERT INTO notifyq.jobs ({columns}) VALUES ({values})".encode())


def test_plain_sql_insert_gets_documented_defaults(dsn: str) -> None:
    insert(dsn, "task", "'hello.greet'")
    row = query(
        dsn,
        "SELECT queue, payload, priority, status, attempts, max_attempts, last_error,"
        " run_at <= now(), created_at IS NOT NULL, started_at, finished_at FROM notifyq.jobs",
    )[0]
    assert row == ("default", {}, 0, "queued", 0, None, None, True, True, None, None)


BAD_ROWS = [
    ("task, payload", "'', '{}'", "jobs_task_format"),
    ("task", "'has space'", "jobs_task_format"),
    ("task", "'9starts.with.digit'", "jobs_task_format"),
    ("task", "repeat('x', 201)", "jobs_task_format"),
    ("task, queue", "'t', ''", "jobs_queue_format"),
    ("task, queue", "'t', 'Upper'", "jobs_queue_format"),
    ("task, queue", "'t', 'semi;colon'", "jobs_queue_format"),
    ("task, queue", "'t', 'quo''te'", "jobs_queue_format"),
    ("task, queue", "'t', repeat('q', 64)", "jobs_queue_format"),
    ("task, queue", "'t', 'é'", "jobs_queue_format"),
    ("task, priority", "'t', 1001", "jobs_priority_range"),
    ("task, priority", "'t', -1001", "jobs_priority_range"),
    ("task, max_attempts", "'t', -1", "jobs_max_attempts_range"),
    ("task, max_attempts", "'t', 0", "jobs_max_attempts_range"),
    ("task, attempts", "'t', -1", "jobs_attempts_nonnegative"),
    ("task, status", "'t', 'finished'", "jobs_status_valid"),
    ("task, status", "'t', 'running'", "jobs_running_has_lease"),
    ("task, dedupe_key", "'t', ''", "jobs_dedupe_key_length"),
    ("task, dedupe_key", "'t', repeat('k', 256)", "jobs_dedupe_key_length"),
    ("task, progress", "'t', 100.5", "jobs_progress_range"),
    ("task, progress", "'t', -1", "jobs_progress_range"),
    ("task, progress_message", "'t', repeat('m', 201)", "jobs_progress_message_length"),
    (
        "task, payload",
        "'t', jsonb_build_object('blob', (SELECT string_agg(md5(i::text), '')"
        " FROM generate_series(1, 40000) i))",
        "jobs_payload_size",
    ),
    ("task, trace_context", "'t', '[\"00-ab-cd-01\"]'", "jobs_trace_context_valid"),
    ("task, trace_context", "'t', '\"traceparent\"'", "jobs_trace_context_valid"),
    ("task, trace_context", "'t', '{\"traceparent\": 1}'", "jobs_trace_context_valid"),
    ("task, trace_context", '\'t\', \'{"tracestate": {"a": "b"}}\'', "jobs_trace_context_valid"),
    (
        "task, trace_context",
        "'t', jsonb_build_object('baggage', repeat('b', 4100))",
        "jobs_trace_context_valid",
    ),
    ("task, tags", "'t', ARRAY['a', NULL]", "jobs_tags_valid"),
    ("task, tags", "'t', ARRAY['a', '']", "jobs_tags_valid"),
    ("task, tags", "'t', ARRAY[['a', 'b'], ['c', 'd']]", "jobs_tags_valid"),
    (
        "task, tags",
        "'t', (SELECT array_agg(g::text) FROM generate_series(1, 21) g)",
        "jobs_tags_valid",
    ),
    ("task, tags", "'t', ARRAY[repeat('x', 600), repeat('y', 401)]", "jobs_tags_valid"),
]


@pytest.mark.parametrize(("columns", "values", "constraint"), BAD_ROWS)
def test_bad_rows_are_rejected_at_insert_naming_the_rule(
    dsn: str, columns: str, values: str, constraint: str
) -> None:
    with pytest.raises(psycopg.errors.CheckViolation) as caught:
        insert(dsn, columns, values)
    assert caught.value.diag.constraint_name == constraint
    assert query(dsn, "SELECT count(*) FROM notifyq.jobs") == [(0,)]


def test_each_constraint_documents_its_rule(dsn: str) -> None:
    comments = dict(
        query(
            dsn,
            "SELECT conname, obj_description(oid, 'pg_constraint') FROM pg_constraint"
            " WHERE conrelid = 'notifyq.jobs'::regclass AND contype = 'c'",
        )
    )
    assert len(comments) == 19
    for name, comment in comments.items():
        assert comment, name


def test_null_task_and_bad_json_are_rejected(dsn: str) -> None:
    with pytest.raises(psycopg.errors.NotNullViolation):
        insert(dsn, "payload", "'{}'")
    with pytest.raises(psycopg.errors.InvalidTextRepresentation):
        insert(dsn, "task, payload", "'t', '{not json'")


def test_largest_allowed_payload_and_edge_values_are_accepted(dsn: str) -> None:
    insert(dsn, "task, queue, priority, max_attempts", "'a_b.c:d-e', 'queue_1-x', 1000, 1000")
    insert(dsn, "task, priority, max_attempts", "'_t', -1000, 1")
    insert(dsn, "task, queue", f"'t', '{'q' * 63}'")
    assert query(dsn, "SELECT count(*) FROM notifyq.jobs") == [(3,)]


# The name rules as the checks of schema versions 1 to 12 wrote them (bounded repetitions).
FORMER_RULES = {
    "queue": "^[a-z0-9_][a-z0-9_-]{0,62}$",
    "task": "^[A-Za-z_][A-Za-z0-9_.:-]{0,199}$",
}
NAMES = [
    *["a", "_", "0", "-a", "a-", "a_b-c", "Upper", "a.b", "a:b", ".a", "9a", "a;b", "a'b"],
    *["é", "aé", "", "a b", " a", "a\n", "\na", "a\x01"],
    *["q" * 62, "q" * 63, "q" * 64, "a" + "-" * 62, "a" + "-" * 63],
    *["t" * 199, "t" * 200, "t" * 201, "_" + "x.y:z-" * 33, "_" + "x.y:z-" * 34],
]


@pytest.mark.parametrize("column", sorted(FORMER_RULES))
def test_name_checks_accept_exactly_what_the_former_patterns_did(dsn: str, column: str) -> None:
    """The checks test the length apart from the pattern (a bounded repetition is slow in
    PostgreSQL's regular expressions): the same names pass and fail as before."""
    other = {"queue": "task, queue", "task": "queue, task"}[column]
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name in NAMES:
            former = conn.execute("SELECT %s::text ~ %s", (name, FORMER_RULES[column]))
            try:
                conn.execute(
                    f"INSERT INTO notifyq.jobs ({other}) VALUES ('ok', %s)".encode(), (name,)
                )
                accepted = True
            except psycopg.errors.CheckViolation as exc:
                assert exc.diag.constraint_name == f"jobs_{column}_format"
                accepted = False
            assert accepted == (former.fetchone() == (True,)), repr(name)


@pytest.mark.parametrize(
    ("column", "value", "constraint"),
    [("queue", "Bad", "jobs_queue_format"), ("task", "has space", "jobs_task_format")],
)
def test_an_update_that_sets_a_bad_name_is_refused_naming_the_rule(
    dsn: str, column: str, value: str, constraint: str
) -> None:
    insert(dsn, "task, queue", "'t', 'q'")
    with pytest.raises(psycopg.errors.CheckViolation) as caught:
        query(dsn, f"UPDATE notifyq.jobs SET {column} = %s", value)
    assert caught.value.diag.constraint_name == constraint
    assert query(dsn, "SELECT queue, task FROM notifyq.jobs") == [("q", "t")]


def listen(dsn: str, channel: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(dsn, autocommit=True)
    listen_on(conn, channel)
    return conn


def drain(conn: psycopg.Connection[Any], expect: int = 0) -> list[str]:
    """Notifications received: wait (up to 10 s) for `expect` of them, then 0.2 s more
    for any extra ones, which the caller's equality check then catches."""
    got: list[str] = []
    deadline = time.monotonic() + 10
    while len(got) < expect and time.monotonic() < deadline:
        got += [n.payload for n in conn.notifies(timeout=0.2)]
    got += [n.payload for n in conn.notifies(timeout=0.2)]
    return got


def test_channel_names_are_the_documented_contract() -> None:
    """The one place tests spell the channels: other languages LISTEN on these names."""
    assert (channels.JOBS, channels.STATUS, channels.PROGRESS, channels.EVENTS) == (
        "notifyq_jobs",
        "notifyq_status",
        "notifyq_progress",
        "notifyq_events",
    )
    assert channels.INTERNAL == "notifyq_internal"


def test_insert_trigger_notifies_once_per_statement_per_queue(dsn: str) -> None:
    with listen(dsn, channels.JOBS) as listener:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO notifyq.jobs (task, queue)"
                " SELECT 't', CASE WHEN i % 2 = 0 THEN 'a' ELSE 'b' END"
                " FROM generate_series(1, 100000) i"
            )
        assert sorted(drain(listener, expect=2)) == ["a", "b"]


def test_status_change_notifies_and_requeue_wakes_dispatchers(dsn: str) -> None:
    insert(dsn, "task, queue, status, finished_at", "'t', 'q', 'dead', now()")
    with listen(dsn, channels.STATUS) as status, listen(dsn, channels.JOBS) as jobs:
        query(dsn, "UPDATE notifyq.jobs SET status = 'queued', finished_at = NULL")
        assert drain(status, expect=1) == ['{"queue" : "q", "status" : "queued"}']
        assert drain(jobs, expect=1) == ["q"]
        # An update that changes no status notifies nobody.
        query(dsn, "UPDATE notifyq.jobs SET priority = 5")
        assert drain(status) == []
        assert drain(jobs) == []


def test_no_notification_for_a_rolled_back_insert(dsn: str) -> None:
    with listen(dsn, channels.JOBS) as listener:
        with psycopg.connect(dsn) as conn:
            conn.execute("INSERT INTO notifyq.jobs (task) VALUES ('t')")
            conn.rollback()
        assert drain(listener) == []


def test_queue_stats_counts_by_status_and_oldest_ready_age(dsn: str) -> None:
    query(
        dsn,
        "INSERT INTO notifyq.jobs (task, queue, run_at, status, finished_at) VALUES"
        " ('t', 'a', now() - interval '1 hour', 'queued', NULL),"
        " ('t', 'a', now() + interval '1 hour', 'queued', NULL),"
        " ('t', 'a', now(), 'succeeded', now()),"
        " ('t', 'a', now(), 'dead', now()),"
        " ('t', 'b', now(), 'cancelled', now())",
    )
    rows = query(
        dsn,
        "SELECT queue, queued, ready, scheduled, running, succeeded, dead, cancelled,"
        " oldest_ready_age >= interval '59 minutes' FROM notifyq.queue_stats ORDER BY queue",
    )
    assert rows == [("a", 2, 1, 1, 0, 1, 1, 0, True), ("b", 0, 0, 0, 0, 0, 0, 1, None)]
    # Jobs waiting for their dependencies: the last column, appended in version 3.
    query(dsn, "INSERT INTO notifyq.jobs (task, queue, depends_on) VALUES ('t', 'b', ARRAY[1])")
    assert query(dsn, "SELECT queue, waiting FROM notifyq.queue_stats ORDER BY queue") == [
        ("a", 0),
        ("b", 1),
    ]


def test_schema_file_is_the_packaged_schema() -> None:
    """The wheel ships the readable schema too (a symlink in the repository)."""
    packaged = resources.files("notifyq").joinpath("sql/schema.sql").read_text()
    assert packaged == (REPO / "schema.sql").read_text()


def test_migrations_are_numbered_from_1_without_gaps() -> None:
    """The newest file's number is the version this code needs: a gap or a duplicate
    number (two branches adding the same one) would skip or shadow a migration."""
    folder = resources.files("notifyq").joinpath("sql/migrations")
    names = sorted(entry.name for entry in folder.iterdir() if entry.name.endswith(".sql"))
    versions = [version for version, _ in store.migration_scripts()]
    assert len(versions) == len(names)
    assert versions == list(range(1, len(names) + 1))
    assert names[0] == "0001_initial.sql"
    assert migrate.SCHEMA_VERSION == migrate.latest_version() == versions[-1]


def test_schema_file_applies_twice_as_psql_would(empty_dsn: str) -> None:
    script = (REPO / "schema.sql").read_text().encode()
    for _ in range(2):
        with psycopg.connect(empty_dsn) as conn:
            conn.execute(script)
    versions = query(empty_dsn, "SELECT version FROM notifyq.schema_version ORDER BY 1")
    assert versions == [(v,) for v, _ in store.migration_scripts()]
    # A database built by hand from schema.sql has nothing left to migrate.
    assert migrate.migrate(empty_dsn) == (migrate.SCHEMA_VERSION, migrate.SCHEMA_VERSION)


def test_migrate_is_idempotent_and_records_the_version(empty_dsn: str) -> None:
    with pytest.raises(SchemaMissing, match="notifyq migrate"):
        migrate.check(empty_dsn)
    now = migrate.SCHEMA_VERSION
    assert migrate.migrate(empty_dsn) == (None, now)
    assert migrate.migrate(empty_dsn) == (now, now)
    assert migrate.check(empty_dsn) == now


def test_concurrent_migrations_serialise(empty_dsn: str) -> None:
    results: list[tuple[int | None, int]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(migrate.migrate(empty_dsn))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    now = migrate.SCHEMA_VERSION
    assert sorted(results, key=str) == [(now, now)] * 3 + [(None, now)]


def test_moving_a_queued_job_earlier_or_to_another_queue_wakes_dispatchers(dsn: str) -> None:
    insert(dsn, "task, queue, run_at", "'t', 'a', now() + interval '1 hour'")
    with listen(dsn, channels.JOBS) as jobs:
        query(dsn, "UPDATE notifyq.jobs SET run_at = now()")
        assert drain(jobs, expect=1) == ["a"]
        query(dsn, "UPDATE notifyq.jobs SET queue = 'b'")
        assert drain(jobs, expect=1) == ["b"]
        query(dsn, "UPDATE notifyq.jobs SET run_at = run_at + interval '1 hour'")
        assert drain(jobs) == []  # later is nothing to wake for


def catalog(dsn: str) -> list[tuple[Any, ...]]:
    """What a schema is made of: columns in order, constraints, indexes, triggers,
    functions with their settings and rights, views, comments and recorded versions."""
    return query(
        dsn,
        "SELECT 'column', c.relname, a.attnum::text || ' ' || a.attname, format_type(a.atttypid,"
        " a.atttypmod) || ' ' || a.attnotnull::text || ' ' || coalesce(pg_get_expr(d.adbin,"
        " d.adrelid), '') FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
        " LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum"
        " WHERE c.relnamespace = 'notifyq'::regnamespace AND a.attnum > 0"
        " AND NOT a.attisdropped"
        " UNION ALL SELECT 'constraint', conname, pg_get_constraintdef(oid),"
        " coalesce(obj_description(oid, 'pg_constraint'), '') FROM pg_constraint"
        " WHERE connamespace = 'notifyq'::regnamespace"
        " UNION ALL SELECT 'index', indexname, indexdef, '' FROM pg_indexes"
        " WHERE schemaname = 'notifyq'"
        " UNION ALL SELECT 'trigger', tgname, pg_get_triggerdef(oid), '' FROM pg_trigger"
        " WHERE tgrelid = 'notifyq.jobs'::regclass"
        " UNION ALL SELECT 'function', oid::regprocedure::text, prosrc, concat_ws(' ',"
        " provolatile, prosecdef, proconfig::text, proacl::text,"
        " obj_description(oid, 'pg_proc')) FROM pg_proc"
        " WHERE pronamespace = 'notifyq'::regnamespace"
        " UNION ALL SELECT 'view', viewname, definition, '' FROM pg_views"
        " WHERE schemaname = 'notifyq'"
        " UNION ALL SELECT 'version', version::text, '', '' FROM notifyq.schema_version"
        " ORDER BY 1, 2, 3",
    )


def test_migrations_from_empty_build_exactly_schema_sql(dsn: str, empty_dsn: str) -> None:
    """`dsn` was built by `notifyq migrate` from an empty database (0001 and every later
    migration in order); schema.sql, applied by hand, must build exactly the same."""
    with psycopg.connect(empty_dsn) as conn:
        conn.execute((REPO / "schema.sql").read_bytes())
    assert catalog(empty_dsn) == catalog(dsn)


def test_a_database_built_by_an_older_release_upgrades(dsn: str, empty_dsn: str) -> None:
    """Older releases built a new database from the version-1 schema (as a script of its
    own, recording version 1) and applied the numbered migrations from 0002 on: such a
    database must migrate from version 1 to exactly what a new one gets."""
    initial = dict(store.migration_scripts())[1]
    with psycopg.connect(empty_dsn) as conn:
        conn.execute(initial)
        conn.execute("INSERT INTO notifyq.schema_version (version) VALUES (1)")
    with pytest.raises(SchemaMissing, match="at version 1 "):
        migrate.check(empty_dsn)
    assert migrate.migrate(empty_dsn) == (1, migrate.SCHEMA_VERSION)
    assert catalog(empty_dsn) == catalog(dsn)


def test_a_database_part_way_upgrades_from_where_it_stands(dsn: str, empty_dsn: str) -> None:
    """A database at an intermediate version gets only the migrations above it."""
    with psycopg.connect(empty_dsn) as conn:
        for version, script in store.migration_scripts():
            if version <= 6:
                store.apply_script(conn, version, script)
    assert migrate.migrate(empty_dsn) == (6, migrate.SCHEMA_VERSION)
    assert catalog(empty_dsn) == catalog(dsn)


def schema_sql(*args: str) -> str:
    result = CliRunner().invoke(cli.main, ["schema", "sql", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_schema_sql_builds_what_migrate_builds_in_one_transaction(dsn: str, empty_dsn: str) -> None:
    """`notifyq schema sql`, applied by another tool as one transaction, builds exactly
    what `notifyq migrate` builds, versions recorded, so migrate finds nothing to do."""
    with psycopg.connect(empty_dsn) as conn:
        conn.execute(schema_sql().encode())
    assert catalog(empty_dsn) == catalog(dsn)
    now = migrate.SCHEMA_VERSION
    assert migrate.migrate(empty_dsn) == (now, now)
    assert "nothing to apply" in schema_sql("--from", str(now))


def test_schema_sql_from_a_version_gives_only_the_migrations_above_it(
    dsn: str, empty_dsn: str
) -> None:
    with psycopg.connect(empty_dsn) as conn:
        for version, script in store.migration_scripts():
            if version <= 6:
                store.apply_script(conn, version, script)
    text = schema_sql("--from", "6")
    assert "-- notifyq migration 6\n" not in text
    assert "-- notifyq migration 7\n" in text
    with psycopg.connect(empty_dsn) as conn:
        conn.execute(text.encode())
    assert catalog(empty_dsn) == catalog(dsn)


def test_schema_sql_fails_before_any_change_on_a_database_at_another_version(
    dsn: str, empty_dsn: str
) -> None:
    """The script starts with a guard: applied to a database that is not at --from (the
    tool's own bookkeeping gone wrong, the wrong DSN), it raises and changes nothing."""
    with psycopg.connect(empty_dsn) as conn:
        for version, script in store.migration_scripts():
            if version <= 9:
                store.apply_script(conn, version, script)
    before = catalog(empty_dsn)
    now = migrate.SCHEMA_VERSION

    def refused(target: str, *args: str) -> str:
        script = schema_sql(*args).encode()
        with (
            pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as caught,
            psycopg.connect(target) as conn,
        ):
            conn.execute(script)
        return str(caught.value)

    message = refused(empty_dsn, "--from", "6")
    assert message.startswith(
        "notifyq: this script is for a database at notifyq schema version 6, but this one is "
        "at version 9: stopping before any change"
    )
    assert "HINT:  generate the script for it with: notifyq schema sql --from 9" in message
    message = refused(empty_dsn)  # no --from: for a database without the schema
    assert message.startswith(
        "notifyq: this script is for a database without the notifyq schema, but this one is "
        "at version 9"
    )
    assert catalog(empty_dsn) == before
    assert "HINT:  nothing to apply" in refused(dsn, "--from", "9")
    assert "HINT:  nothing to apply" in refused(dsn)
    with psycopg.connect(dsn) as conn:  # --from the current version: a guard and no more
        conn.execute(schema_sql("--from", str(now)).encode())
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA notifyq CASCADE")
    message = refused(dsn, "--from", "9")
    assert "this one has no notifyq schema" in message
    assert "HINT:  generate the script for it with: notifyq schema sql\n" in message


def test_schema_sql_refuses_a_version_this_notifyq_does_not_know() -> None:
    newer = str(migrate.SCHEMA_VERSION + 1)
    result = CliRunner().invoke(cli.main, ["schema", "sql", "--from", newer])
    assert result.exit_code == 2
    assert "newer than the schema this notifyq knows" in result.output
    result = CliRunner().invoke(cli.main, ["schema", "sql", "--from", "-1"])
    assert result.exit_code == 2


def test_a_migration_that_fails_at_commit_is_a_notifyq_error(empty_dsn: str) -> None:
    """The COMMIT is where deferred checks run (and where a lost connection shows): its
    failure is translated like any statement's, and nothing of the migration stays."""
    with psycopg.connect(empty_dsn) as conn:
        for version, script in store.migration_scripts()[:-1]:
            store.apply_script(conn, version, script)
        conn.execute(
            "CREATE FUNCTION notifyq.refuse() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN RAISE EXCEPTION 'refused at commit'; END $$;"
            " CREATE CONSTRAINT TRIGGER refuse AFTER INSERT ON notifyq.schema_version"
            " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION notifyq.refuse()"
        )
    before = migrate.SCHEMA_VERSION - 1
    with pytest.raises(NotifyqError, match="refused at commit"):
        migrate.migrate(empty_dsn)
    assert query(empty_dsn, "SELECT max(version) FROM notifyq.schema_version") == [(before,)]
