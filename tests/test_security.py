"""Security hardening (issue 3): least-privilege roles, functions no one else can
capture or call, names that cannot inject, payloads that cannot wedge a
dispatcher, and DSN passwords that never reach a message, a log or `ps`.

Roles are cluster-wide while GRANTs belong to one database: every role made
here has a unique name and is dropped at the end, even when the test fails.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from psycopg import sql
from psycopg.conninfo import make_conninfo

import notifyq
from notifyq import channels, cli, codec, enqueue, migrate, store
from notifyq.errors import (
    ConfigurationError,
    InvalidJob,
    OperationRefused,
    dsn_secrets,
    redact,
)
from tests.conftest import query, serve_process, statuses, wait_until
from tests.helpers import listen_on
from tests.test_cli import notifyq as notifyq_process

SECRET = "s3cret-XYZ"


def run_cli(*args: str, env: dict[str, str] | None = None) -> Any:
    """The notifyq command in this process (the same code path, without a
    Python start-up per call); stdout and stderr apart."""
    return CliRunner().invoke(cli.main, list(args), env=env, catch_exceptions=False)


# --- 1. roles


@dataclass(frozen=True)
class Roles:
    producer: str
    worker: str
    producer_login: str
    worker_login: str


def _drop_roles(dsn: str, names: list[str]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name in names:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
            if exists:
                # DROP OWNED revokes what was granted in this database; then the role can go.
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


@pytest.fixture
def roles(dsn: str) -> Iterator[Roles]:
    """Unique producer and worker group roles, granted in this test's database, and a
    LOGIN member of each; all dropped afterwards."""
    tag = uuid.uuid4().hex[:10]
    names = Roles(
        producer=f"nq_producer_{tag}",
        worker=f"nq_worker_{tag}",
        producer_login=f"nq_app_{tag}",
        worker_login=f"nq_dispatcher_{tag}",
    )
    all_names = [names.producer_login, names.worker_login, names.producer, names.worker]
    try:
        result = run_cli(
            "roles", "--dsn", dsn, "--producer-role", names.producer, "--worker-role", names.worker
        )
        assert result.exit_code == 0, result.output
        for login, group in (
            (names.producer_login, names.producer),
            (names.worker_login, names.worker),
        ):
            query(
                dsn,
                sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}")
                .format(sql.Identifier(login), sql.Identifier(group))
                .as_string(None),
            )
        yield names
    finally:
        _drop_roles(dsn, all_names)


def as_user(dsn: str, user: str) -> str:
    return make_conninfo(dsn, user=user)


PUBLIC_COLUMNS = [
    "queue",
    "task",
    "payload",
    "priority",
    "run_at",
    "max_attempts",
    "depends_on",
    "on_dependency_failure",
    "dedupe_key",
    "token",
    "trace_context",
    "unique_for",
    "on_duplicate",
]
PRIVATE_COLUMNS = [
    "id",
    "status",
    "attempts",
    "last_error",
    "created_at",
    "started_at",
    "finished_at",
    "claimed_by",
    "lease_expires_at",
    "result",
    "progress",
    "progress_message",
    "checkpoint",
]


def test_roles_print_renders_quoted_names_without_a_database() -> None:
    result = run_cli("roles", "--print", "--producer-role", 'odd"name$$; DROP TABLE x')
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert 'GRANT USAGE ON SCHEMA notifyq TO "odd""name$$; DROP TABLE x";' in text
    assert "SELECT pg_temp.notifyq_create_role('odd\"name$$; DROP TABLE x');" in text
    assert '"notifyq_worker"' in text  # the default worker role
    assert "{" not in text  # every placeholder filled in


def test_roles_print_output_runs_by_hand_as_plain_sql(dsn: str) -> None:
    tag = uuid.uuid4().hex[:10]
    producer, worker = f"nq_p_{tag}", f"nq_w_{tag}"
    try:
        printed = run_cli("roles", "--print", "--producer-role", producer, "--worker-role", worker)
        assert printed.exit_code == 0, printed.output
        with psycopg.connect(dsn) as conn:  # one transaction, like psql -1
            conn.execute(printed.stdout.encode())
        assert query(
            dsn,
            "SELECT has_column_privilege(%s, 'notifyq.jobs', 'task', 'INSERT'), "
            "has_column_privilege(%s, 'notifyq.jobs', 'status', 'INSERT'), "
            "has_table_privilege(%s, 'notifyq.jobs', 'UPDATE'), pg_has_role(%s, %s, 'MEMBER')",
            producer,
            producer,
            worker,
            worker,
            producer,
        ) == [(True, False, True, True)]
    finally:
        _drop_roles(dsn, [producer, worker])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--producer-role", "pg_evil"], "reserved"),
        (["--worker-role", "x" * 64], "1-63 bytes"),
        (["--producer-role", "same", "--worker-role", "same"], "different names"),
        (["--producer-role", ""], "invalid role name"),
    ],
)
def test_roles_refuses_unusable_names(args: list[str], message: str) -> None:
    result = run_cli("roles", "--print", *args)
    assert result.exit_code == 1
    assert result.stderr.startswith("notifyq: error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1


def test_roles_grant_least_privilege_and_run_twice(dsn: str, roles: Roles) -> None:
    again = run_cli(
        "roles", "--dsn", dsn, "--producer-role", roles.producer, "--worker-role", roles.worker
    )
    assert again.exit_code == 0, again.output  # idempotent

    def table(role: str, privilege: str, table: str = "notifyq.jobs") -> bool:
        return bool(
            query(dsn, "SELECT has_table_privilege(%s, %s, %s)", role, table, privilege)[0][0]
        )

    def column(role: str, name: str, privilege: str) -> bool:
        return bool(
            query(
                dsn,
                "SELECT has_column_privilege(%s, 'notifyq.jobs', %s, %s)",
                role,
                name,
                privilege,
            )[0][0]
        )

    p, w = roles.producer, roles.worker
    assert query(
        dsn, "SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname IN (%s, %s) ORDER BY 1", p, w
    ) == sorted([(p, False), (w, False)])
    # Producer: INSERT of the public columns and SELECT of id (with dedupe_key and status,
    # to find the job holding a key), nothing else.
    for name in PUBLIC_COLUMNS:
        assert column(p, name, "INSERT"), name
    for name in PRIVATE_COLUMNS:
        assert not column(p, name, "INSERT"), name
    for name in ("id", "dedupe_key", "status"):
        assert column(p, name, "SELECT"), name
    for name in ("payload", "result", "checkpoint", "last_error", "token"):
        assert not column(p, name, "SELECT"), name
    # ... but a job's token reads that job through notifyq.job_status, for both roles.
    for role in (p, w):
        assert query(
            dsn,
            "SELECT has_function_privilege(%s, 'notifyq.job_status(bigint, uuid)', 'EXECUTE')",
            role,
        )[0][0]
    for privilege in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "TRIGGER"):
        assert not table(p, privilege), privilege
    assert not table(p, "SELECT", "notifyq.dispatchers")
    # Worker: what serve needs, plus the producer's rights through membership.
    assert table(w, "SELECT") and table(w, "UPDATE")
    assert not table(w, "DELETE") and not table(w, "TRUNCATE")
    assert column(w, "task", "INSERT") and not column(w, "status", "INSERT")
    for privilege in ("SELECT", "INSERT", "UPDATE", "DELETE"):
        assert table(w, privilege, "notifyq.dispatchers"), privilege
        # Its appetite: the producer's inserts read it through the trigger only.
        assert table(w, privilege, "notifyq.queue_appetite"), privilege
        assert not table(p, privilege, "notifyq.queue_appetite"), privilege
    for view in ("notifyq.queue_stats", "notifyq.dispatcher_status", "notifyq.schema_version"):
        assert table(w, "SELECT", view), view
    # Neither has DDL or the admin functions; the owner keeps both.
    for role in (p, w):
        assert not query(dsn, "SELECT has_schema_privilege(%s, 'notifyq', 'CREATE')", role)[0][0]
        assert not query(
            dsn,
            "SELECT has_function_privilege("
            "%s, 'notifyq.purge(interval, text[], text[])', 'EXECUTE')",
            role,
        )[0][0]
    assert query(dsn, "SELECT has_schema_privilege(current_user, 'notifyq', 'CREATE')")[0][0]
    # Retention: the worker may run purge_batch (finished jobs only), the producer may not;
    # nobody but the owner writes the history.
    batch = "notifyq.purge_batch(interval, text[], integer)"
    assert query(dsn, "SELECT has_function_privilege(%s, %s, 'EXECUTE')", w, batch)[0][0]
    assert not query(dsn, "SELECT has_function_privilege(%s, %s, 'EXECUTE')", p, batch)[0][0]
    for role in (p, w):
        assert not table(role, "INSERT", "notifyq.job_history"), role
    # The monitoring functions: the worker (and a monitoring role like it), not the producer.
    for monitor in (
        "notifyq.queue_health(text[], text[])",
        "notifyq.failed_recent(interval, integer)",
        "notifyq.stuck(interval)",
    ):
        assert query(dsn, "SELECT has_function_privilege(%s, %s, 'EXECUTE')", w, monitor)[0][0]
        assert not query(dsn, "SELECT has_function_privilege(%s, %s, 'EXECUTE')", p, monitor)[0][0]
    # Completion webhooks: the producer sets a callback_url; nobody but the owner writes the
    # allow-list (it decides where dispatchers POST); the worker reads it and the outbox.
    assert column(p, "callback_url", "INSERT")
    for role in (p, w):
        for privilege in ("INSERT", "UPDATE", "DELETE"):
            assert not table(role, privilege, "notifyq.webhook_allowlist"), (role, privilege)
        assert not table(role, "INSERT", "notifyq.webhook_deliveries"), role
    assert not table(p, "SELECT", "notifyq.webhook_allowlist")
    assert table(w, "SELECT", "notifyq.webhook_allowlist")
    # ... and writes a delivery's state, never its url or body (checked at the insert).
    for name, allowed in (("status", True), ("next_at", True), ("url", False), ("body", False)):
        granted = query(
            dsn,
            "SELECT has_column_privilege(%s, 'notifyq.webhook_deliveries', %s, 'UPDATE')",
            w,
            name,
        )[0][0]
        assert granted == allowed, name


def test_producer_login_enqueues_but_cannot_steer_jobs(dsn: str, roles: Roles) -> None:
    producer_dsn = as_user(dsn, roles.producer_login)
    with psycopg.connect(producer_dsn, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO notifyq.jobs (task, payload, queue, priority) "
            "VALUES ('secure.leaf', '{}', 'default', 5) RETURNING id"
        ).fetchone()
        assert row is not None
        for statement in (
            "UPDATE notifyq.jobs SET status = 'succeeded'",
            "INSERT INTO notifyq.jobs (task, status, claimed_by, lease_expires_at) "
            "VALUES ('secure.leaf', 'running', 'me', now() + interval '1 day')",
            "INSERT INTO notifyq.jobs (task, attempts) VALUES ('secure.leaf', 999)",
            "SELECT payload FROM notifyq.jobs",
            "DELETE FROM notifyq.jobs",
            "SELECT notifyq.cancel_job(1)",
            "CREATE TABLE notifyq.mine (x int)",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement.encode())
    app = notifyq.App(dsn=producer_dsn)
    try:
        job_id = app.enqueue_sync("secure.leaf", {"n": 1}, queue="other", priority=3, delay=60)
    finally:
        app.close()
    assert query(dsn, "SELECT task, status, queue FROM notifyq.jobs WHERE id = %s", job_id) == [
        ("secure.leaf", "queued", "other")
    ]
    assert statuses(dsn) == {"queued": 2}


def test_worker_login_serves_and_enqueues_from_a_handler(
    dsn: str, roles: Roles, tmp_path: Path
) -> None:
    worker_dsn = as_user(dsn, roles.worker_login)
    query(dsn, "INSERT INTO notifyq.jobs (task, payload) VALUES ('secure.chain', '{\"n\": 7}')")
    log = tmp_path / "serve.log"
    with serve_process(worker_dsn, app="tests.apps.secure:app", log=log) as proc:
        wait_until(
            lambda: statuses(dsn) == {"succeeded": 2} or proc.poll() is not None,
            message="the chain job and the leaf it enqueued to succeed",
        )
        assert proc.poll() is None, log.read_text()
    assert query(dsn, "SELECT task, payload FROM notifyq.jobs ORDER BY id") == [
        ("secure.chain", {"n": 7}),
        ("secure.leaf", {"from": 7}),
    ]
    assert "permission denied" not in log.read_text()


def test_producer_dedupes_and_worker_runs_retention_under_their_logins(
    dsn: str, roles: Roles
) -> None:
    producer = notifyq.App(as_user(dsn, roles.producer_login))
    first = producer.enqueue_sync("secure.leaf", dedupe_key="once")
    again = producer.enqueue_sync("secure.leaf", dedupe_key="once")
    assert again == first and first.token is not None
    assert again.token is None  # the job holding the key is another enqueue's
    producer.close()
    query(
        dsn,
        "INSERT INTO notifyq.jobs (task, status, finished_at) VALUES "
        "('secure.leaf', 'succeeded', now() - interval '8 days')",
    )
    worker = as_user(dsn, roles.worker_login)
    assert query(worker, "SELECT notifyq.purge_batch(interval '7 days', '{succeeded}', 10)") == [
        (1,)
    ]
    assert statuses(dsn) == {"queued": 1}
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        query(worker, "DELETE FROM notifyq.jobs")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        query(
            worker,
            "INSERT INTO notifyq.job_history (job_id, to_status, attempt) VALUES (1, 'x', 0)",
        )


# --- 1b. following one job: its token


def test_producer_reads_its_own_job_by_token_and_no_other(
    dsn: str, roles: Roles, tmp_path: Path
) -> None:
    producer_dsn = as_user(dsn, roles.producer_login)
    token = uuid.uuid4()
    with psycopg.connect(producer_dsn, autocommit=True) as conn:
        [(job_id,)] = conn.execute(
            "INSERT INTO notifyq.jobs (task, payload, token) "
            "VALUES ('secure.double', '{\"n\": 21}', %s) RETURNING id",
            [token],
        ).fetchall()
        # The same in one statement with a token the database makes: the producer gets it
        # back from the CTE, never from the table.
        other = conn.execute(
            "WITH t AS (SELECT gen_random_uuid() AS token), "
            "j AS (INSERT INTO notifyq.jobs (task, token) SELECT 'secure.leaf', t.token FROM t "
            "RETURNING id) SELECT j.id, t.token FROM j, t"
        ).fetchone()
        assert other is not None

        def status(job: int, key: uuid.UUID) -> list[tuple[Any, ...]]:
            return conn.execute(
                "SELECT id, task, status, attempts, result FROM notifyq.job_status(%s, %s)",
                [job, key],
            ).fetchall()

        assert status(job_id, token) == [(job_id, "secure.double", "queued", 0, None)]
        assert status(other[0], other[1]) == [(other[0], "secure.leaf", "queued", 0, None)]
        assert status(job_id, other[1]) == []  # another job's token
        assert status(job_id, uuid.uuid4()) == []
        assert status(10**12, token) == []
        for statement in (
            "SELECT token FROM notifyq.jobs",
            "SELECT id FROM notifyq.jobs WHERE token IS NOT NULL",
            "INSERT INTO notifyq.jobs (task) VALUES ('secure.leaf') RETURNING token",
            "SELECT * FROM notifyq.jobs",
            "UPDATE notifyq.jobs SET token = gen_random_uuid()",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement.encode())

    app = notifyq.App(producer_dsn)
    try:
        job = app.enqueue_sync("secure.double", {"n": 4})
        assert isinstance(job, notifyq.JobId) and job.token is not None
        assert str(job) == repr(job) == str(int(job))  # the token stays out of logs
        batch = app.enqueue_many_sync("secure.leaf", [{}, {}])
        assert len({j.token for j in batch}) == 2
        assert [app.status_sync(j).status for j in batch] == ["queued", "queued"]  # type: ignore[union-attr]
        found = app.status_sync(job)
        assert found is not None and (found.id, found.status, found.finished) == (
            job,
            "queued",
            False,
        )
        assert app.status_sync(job_id, token=str(token)) is not None  # type: ignore[arg-type]
        assert app.status_sync(job_id, token=other[1]) is None
        with pytest.raises(ConfigurationError, match="permission denied"):
            app.status_sync(int(job))  # no token: the table, which a producer may not read
        log = tmp_path / "serve.log"
        worker_dsn = as_user(dsn, roles.worker_login)
        with serve_process(worker_dsn, app="tests.apps.secure:app", log=log) as proc:
            assert app.wait_sync(job, timeout=30) == 8
            assert app.wait_sync(job_id, timeout=30, token=token) == 42
            assert proc.poll() is None, log.read_text()
        done = app.status_sync(job)
        assert done is not None and done.finished
        assert (done.status, done.result, done.attempts) == ("succeeded", 8, 1)
        assert (done.progress, done.progress_message) == (50.0, "half way")
        assert done.started_at is not None and done.finished_at is not None
        with pytest.raises(OperationRefused, match="token is not this job's"):
            app.wait_sync(job_id, timeout=10, token=uuid.uuid4())
        with pytest.raises(ConfigurationError, match="permission denied"):
            app.wait_sync(int(job), timeout=10)
    finally:
        app.close()


def test_migration_lets_existing_producers_give_and_use_tokens(empty_dsn: str) -> None:
    """A producer role that `notifyq roles` made before version 11 may insert a token
    (which Python now always sends) and call job_status once the database is migrated."""
    with psycopg.connect(empty_dsn) as conn:
        for version, script in store.migration_scripts():
            if version <= 10:
                store.apply_script(conn, version, script)
    role = f"nq_old_producer_{uuid.uuid4().hex[:10]}"
    try:
        for statement in (
            "CREATE ROLE {} NOLOGIN",
            "GRANT USAGE ON SCHEMA notifyq TO {}",
            "GRANT INSERT (queue, task, payload) ON notifyq.jobs TO {}",
            "GRANT SELECT (id, dedupe_key, status) ON notifyq.jobs TO {}",
        ):
            query(empty_dsn, sql.SQL(statement).format(sql.Identifier(role)).as_string(None))
        assert migrate.migrate(empty_dsn) == (10, migrate.SCHEMA_VERSION)
        assert query(
            empty_dsn,
            "SELECT has_column_privilege(%s, 'notifyq.jobs', 'token', 'INSERT'), "
            "has_column_privilege(%s, 'notifyq.jobs', 'token', 'SELECT'), "
            "has_function_privilege(%s, 'notifyq.job_status(bigint, uuid)', 'EXECUTE')",
            role,
            role,
            role,
        ) == [(True, False, True)]
    finally:
        _drop_roles(empty_dsn, [role])


def test_migration_gives_existing_workers_the_circuit_breakers(empty_dsn: str) -> None:
    """A worker role `notifyq roles` made before version 18 may still claim once the
    database is migrated: every claim reads notifyq.circuit_breakers with its rights."""
    with psycopg.connect(empty_dsn) as conn:
        for version, script in store.migration_scripts():
            if version <= 17:
                store.apply_script(conn, version, script)
    role = f"nq_old_worker_{uuid.uuid4().hex[:10]}"
    claim = "notifyq.claim_jobs(text, text[], text[], integer, interval)"
    try:
        for statement in (
            "CREATE ROLE {} NOLOGIN",
            "GRANT USAGE ON SCHEMA notifyq TO {}",
            "GRANT SELECT, UPDATE ON notifyq.jobs TO {}",
            f"GRANT EXECUTE ON FUNCTION {claim} TO {{}}",
        ):
            query(empty_dsn, sql.SQL(statement).format(sql.Identifier(role)).as_string(None))
        assert migrate.migrate(empty_dsn) == (17, migrate.SCHEMA_VERSION)
        assert query(
            empty_dsn,
            "SELECT has_table_privilege(%s, 'notifyq.circuit_breakers', 'SELECT'),"
            " has_table_privilege(%s, 'notifyq.circuit_breakers', 'INSERT'),"
            " has_table_privilege(%s, 'notifyq.circuit_breakers', 'UPDATE')",
            role,
            role,
            role,
        ) == [(True, True, True)]
    finally:
        _drop_roles(empty_dsn, [role])


# --- 2. functions


def test_no_function_in_notifyq_is_executable_by_public(dsn: str) -> None:
    public = query(
        dsn,
        "SELECT p.oid::regprocedure::text FROM pg_proc p "
        "CROSS JOIN LATERAL aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a "
        "WHERE p.pronamespace = 'notifyq'::regnamespace AND a.grantee = 0 "
        "AND a.privilege_type = 'EXECUTE'",
    )
    assert public == []
    # ... and the triggers fire all the same.
    query(dsn, "INSERT INTO notifyq.jobs (task) VALUES ('secure.leaf')")


def test_security_definer_functions_pin_search_path(dsn: str) -> None:
    unpinned = query(
        dsn,
        "SELECT oid::regprocedure::text FROM pg_proc "
        "WHERE pronamespace = 'notifyq'::regnamespace AND prosecdef AND NOT EXISTS "
        "(SELECT FROM unnest(proconfig) AS c(setting) WHERE c.setting LIKE 'search_path=%')",
    )
    assert unpinned == []
    # The admin functions (run by operators, often the owner) pin it too.  Not the
    # monitoring functions: plain SQL, read-only, with the caller's rights, and inlined into
    # the caller's query, which a SET clause would prevent (schema.sql, "Monitoring").
    admin = query(
        dsn,
        "SELECT proname, proconfig FROM pg_proc WHERE pronamespace = 'notifyq'::regnamespace "
        "AND prorettype <> 'trigger'::regtype"
        " AND proname NOT IN ('queue_health', 'failed_recent', 'stuck') ORDER BY proname",
    )
    assert [name for name, _ in admin] == [
        "appetite_barrier",
        "backoff_delay",
        "cancel_job",
        "cancel_jobs",
        "claim",
        "claim_jobs",
        "claim_room",
        "complete",
        "dependency_results",
        "dependency_status",
        "expire_unique_windows",
        "fail",
        "finish_jobs",
        "hand_back",
        "hand_back_jobs",
        "heartbeat",
        "hold_session",
        "job_status",
        "liveness_held",
        "lock_job",
        "pause_queue",
        "progress",
        "purge",
        "purge_batch",
        "purge_batch",
        "rate_admit",
        "rescue",
        "rescue_due",
        "rescue_jobs",
        "reset_circuit_breaker",
        "resume_queue",
        "retry_dead",
        "retry_job",
        "set_appetite",
        "set_circuit_breaker",
        "set_events",
        "set_history",
        "stop_worker",
        "worker_seen",
    ]
    for name, config in admin:
        # The claims also turn JIT off (see notifyq.claim_jobs).
        extra = ["jit=off"] if name in ("claim", "claim_jobs") else []
        # The appetite barrier waits 20 ms at most (see notifyq.appetite_barrier).
        extra = ["lock_timeout=20ms"] if name == "appetite_barrier" else extra
        assert config == [*extra, "search_path=pg_catalog, pg_temp"], name


SHADOWS = [
    # Tables named like what the trigger functions and queries read, and like a type.
    "CREATE TEMP TABLE jobs (id bigint, queue text, task text, status text)",
    "CREATE TEMP TABLE inserted (queue text, status text)",
    "CREATE TEMP TABLE new_rows (id bigint, queue text, status text, run_at timestamptz)",
    "CREATE TEMP TABLE old_rows (id bigint, queue text, status text, run_at timestamptz)",
    'CREATE TEMP TABLE "text" (x int)',
    # pg_temp is never searched for functions: these must never be called.
    "CREATE FUNCTION pg_temp.pg_notify(a text, b text) RETURNS void LANGUAGE plpgsql "
    "AS $$ BEGIN RAISE EXCEPTION 'captured'; END $$",
    "CREATE FUNCTION pg_temp.json_build_object(a text, b text, c text, d text) RETURNS json "
    "LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'captured'; END $$",
]


def _insert_update_and_listen(conn: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    listen_on(conn, channels.JOBS, channels.STATUS)
    conn.execute("INSERT INTO notifyq.jobs (task, queue) VALUES ('secure.leaf', 'shadowed')")
    conn.execute(
        "UPDATE notifyq.jobs SET status = 'cancelled', finished_at = pg_catalog.now() "
        "WHERE queue = 'shadowed'"
    )
    return [(n.channel, n.payload) for n in conn.notifies(timeout=5, stop_after=2)]


def test_temp_objects_cannot_shadow_what_triggers_use(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in SHADOWS:
            conn.execute(statement.encode())
        got = _insert_update_and_listen(conn)
        job_id = notifyq.App().enqueue_sync("secure.leaf", queue="shadowed2", conn=conn)
        assert conn.execute("SELECT count(*) FROM pg_temp.jobs").fetchone() == (0,)
    assert got == [
        (channels.JOBS, "shadowed"),
        (channels.STATUS, '{"queue" : "shadowed", "status" : "cancelled"}'),
    ]
    assert query(dsn, "SELECT queue, status FROM notifyq.jobs ORDER BY id") == [
        ("shadowed", "cancelled"),
        ("shadowed2", "queued"),
    ]
    assert job_id > 0


def test_functions_on_the_search_path_cannot_capture_trigger_or_admin_calls(dsn: str) -> None:
    """A better-matching function in a schema on the writer's search_path (public is
    writable by everyone before PostgreSQL 15) would run with the writer's rights
    (the dispatcher's, the owner's) if notifyq's functions named built-ins unqualified."""
    query(dsn, "CREATE SCHEMA evil")
    for signature, returns in (
        ("pg_notify(a text, b text)", "void"),
        ("json_build_object(a text, b text, c text, d text)", "json"),
        ("cardinality(a text[])", "integer"),
        ("now()", "timestamptz"),
    ):
        query(
            dsn,
            f"CREATE FUNCTION evil.{signature} RETURNS {returns} LANGUAGE plpgsql "
            "AS $$ BEGIN RAISE EXCEPTION 'captured as %', current_user; END $$",
        )
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET search_path = evil, public, pg_catalog")
        got = _insert_update_and_listen(conn)
        assert conn.execute("SELECT notifyq.purge(interval '0')").fetchone() == (1,)
    assert got == [
        (channels.JOBS, "shadowed"),
        (channels.STATUS, '{"queue" : "shadowed", "status" : "cancelled"}'),
    ]


def test_nothing_on_the_search_path_captures_the_events_trigger(dsn: str) -> None:
    query(dsn, "CREATE SCHEMA evil")
    query(
        dsn,
        "CREATE FUNCTION evil.pg_notify(a text, b text) RETURNS void LANGUAGE plpgsql "
        "AS $$ BEGIN RAISE EXCEPTION 'captured as %', current_user; END $$",
    )
    query(dsn, "SELECT notifyq.set_events('shadowed', true)")
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in SHADOWS:
            conn.execute(statement.encode())
        conn.execute("CREATE TEMP TABLE queue_events (queue text)")
        conn.execute("SET search_path = evil, public, pg_catalog")
        listen_on(conn, channels.EVENTS)
        conn.execute("INSERT INTO notifyq.jobs (task, queue) VALUES ('secure.leaf', 'shadowed')")
        conn.execute(
            "UPDATE notifyq.jobs SET status = 'cancelled', finished_at = pg_catalog.now() "
            "WHERE queue = 'shadowed'"
        )
        got = [n.payload for n in conn.notifies(timeout=5, stop_after=2)]
    assert [[(e["status"], e["previous"]) for e in codec.loads(p)] for p in got] == [
        [("queued", None)],
        [("cancelled", "queued")],
    ]


def test_temp_table_named_jsonb_cannot_break_python_enqueue(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE jsonb (x int)")
        notifyq.App().enqueue_sync("secure.leaf", {"a": 1}, conn=conn)


# --- 3. names


def schema_snapshot(dsn: str) -> list[tuple[Any, ...]]:
    """Every relation, function, schema, trigger and constraint of the database."""
    return query(
        dsn,
        "SELECT 'class', n.nspname, c.relname, c.relkind::text FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "UNION ALL SELECT 'proc', n.nspname, p.oid::regprocedure::text, md5(p.prosrc) "
        "FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "UNION ALL SELECT 'schema', nspname, '', '' FROM pg_namespace "
        "UNION ALL SELECT 'trigger', tgrelid::regclass::text, tgname, tgenabled::text "
        "FROM pg_trigger "
        "UNION ALL SELECT 'constraint', conrelid::regclass::text, conname, "
        "pg_get_constraintdef(oid) FROM pg_constraint "
        "ORDER BY 1, 2, 3, 4",
    )


INJECTIONS = [
    "",
    " ",
    "a b",
    "x'y",
    'x"y',
    "x;y",
    "'; DROP TABLE notifyq.jobs; --",
    '"; DROP TABLE notifyq.jobs; --',
    "x); DROP SCHEMA notifyq CASCADE; --",
    "a\\b",
    "a\nb",
    "ok\n",
    "a\x00b",
    "-leading",
    "--dsn",
    "é",
    "naïve",
    "\u0130",  # İ: lower-cases to two code points
    "\u212a",  # Kelvin sign, folds to k
    "\U0001f600",
    "\u200bzero",
    "$$",
    "%(task)s",
    "{task}",
]
# Each list adds names the other one allows: a queue is lower case and 63
# characters at most, a task name 200 and may hold '.', ':' and capitals.
BAD_QUEUES = [*INJECTIONS, "Upper", "a.b", "a:b", "x" * 64, "é" * 32]
BAD_TASKS = [*INJECTIONS, "9lives", "x" * 201, "_" + "x" * 200, "a/b", "a@b", "-a"]


def handler(payload: Any) -> None:
    pass


def test_bad_names_are_refused_by_the_python_api(dsn: str) -> None:
    before = schema_snapshot(dsn)
    app = notifyq.App(dsn=dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name in BAD_TASKS:
            with pytest.raises(ConfigurationError, match="invalid task name"):
                app.task(name=name)(handler)
            with pytest.raises(ConfigurationError, match="invalid task name"):
                app.enqueue_sync(name, {}, conn=conn)
        for name in BAD_QUEUES:
            with pytest.raises(ConfigurationError, match="invalid queue name"):
                app.task(name="secure.ok", queue=name)(handler)
            with pytest.raises(ConfigurationError, match="invalid queue name"):
                app.enqueue_sync("secure.ok", {}, queue=name, conn=conn)
            with pytest.raises(ConfigurationError, match="invalid queue name"):
                notifyq.Settings(queues=(name,))
        for wrong_type in (None, 7, b"bytes", ["list"], {"a": 1}):
            with pytest.raises(InvalidJob, match="not a task name or a handler registered"):
                app.enqueue_sync(wrong_type, {}, conn=conn)  # type: ignore[arg-type]
            if wrong_type is None:
                continue  # queue=None means the task's queue
            with pytest.raises(ConfigurationError, match="invalid queue name"):
                app.enqueue_sync("secure.ok", {}, queue=wrong_type, conn=conn)  # type: ignore[arg-type]
    assert len(app.registry) == 0
    assert query(dsn, "SELECT count(*) FROM notifyq.jobs") == [(0,)]
    assert schema_snapshot(dsn) == before


def test_empty_task_name_is_refused_by_the_decorator() -> None:
    with pytest.raises(ConfigurationError):
        notifyq.App().task(name="")(handler)


def test_bad_names_are_refused_by_plain_sql_naming_the_constraint(dsn: str) -> None:
    before = schema_snapshot(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for column, names, constraint in (
            ("task", BAD_TASKS, "jobs_task_format"),
            ("queue", BAD_QUEUES, "jobs_queue_format"),
        ):
            for name in names:
                values = {"task": "secure.ok", "queue": "default", column: name}
                if "\x00" in name:
                    # PostgreSQL text cannot hold NUL: refused before it is sent.
                    with pytest.raises(psycopg.DataError, match="NUL"):
                        conn.execute(
                            "INSERT INTO notifyq.jobs (task, queue) VALUES (%(task)s, %(queue)s)",
                            values,
                        )
                    continue
                with pytest.raises(psycopg.errors.CheckViolation) as caught:
                    conn.execute(
                        "INSERT INTO notifyq.jobs (task, queue) VALUES (%(task)s, %(queue)s)",
                        values,
                    )
                assert caught.value.diag.constraint_name == constraint, name
    assert query(dsn, "SELECT count(*) FROM notifyq.jobs") == [(0,)]
    assert schema_snapshot(dsn) == before


def test_bad_names_are_usage_errors(dsn: str) -> None:
    before = schema_snapshot(dsn)
    env = {"NOTIFYQ_DSN": dsn}
    cases: list[list[str]] = []
    for name in BAD_TASKS:
        if "\x00" not in name:  # a command line cannot carry NUL
            cases.append(["enqueue", "--", name])
    for name in BAD_QUEUES:
        if "\x00" not in name and "," not in name:
            cases.append(["enqueue", "--queue", name, "secure.ok"])
            if name == name.strip():  # --queues strips blanks around each name
                cases.append(["serve", "--app", "tests.apps.secure:app", "--queues", name])
    cases.append(["serve", "--app", "tests.apps.secure:app", "--queues", " , "])
    for args in cases:
        result = run_cli(*args, env=env)
        # Refused by click before anything connects: usage, then a one-line error.
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.startswith("Usage: "), (args, result.stderr)
        assert result.stderr.splitlines()[-1].startswith("Error: Invalid value for "), (
            args,
            result.stderr,
        )
        assert "Traceback" not in result.output
    assert query(dsn, "SELECT count(*) FROM notifyq.jobs") == [(0,)]
    assert schema_snapshot(dsn) == before


# --- 4. payloads


def nested(depth: int) -> Any:
    value: Any = {}
    for i in range(depth - 1):
        value = [value] if i % 2 else {"k": value}
    return value


def test_python_enqueue_refuses_payloads_nested_too_deep(dsn: str) -> None:
    limit = enqueue.MAX_PAYLOAD_DEPTH
    app = notifyq.App(dsn=dsn)
    try:
        app.enqueue_sync("secure.echo", nested(limit))
        # Brackets inside strings do not count as nesting.
        app.enqueue_sync("secure.echo", {"text": "[{" * 1000})
        with pytest.raises(InvalidJob, match=f"more than {limit} levels deep"):
            app.enqueue_sync("secure.echo", nested(limit + 1))
        with pytest.raises(InvalidJob):
            app.enqueue_sync("secure.echo", nested(100_000))
        with pytest.raises(InvalidJob, match="cannot be decoded"):
            app.enqueue_sync("secure.echo", codec.Undecodable("depth limit exceeded"))
    finally:
        app.close()
    assert query(dsn, "SELECT count(*) FROM notifyq.jobs") == [(2,)]


def test_postgres_jsonb_depth_is_limited_by_its_stack(dsn: str) -> None:
    """What plain SQL can store: jsonb nests 10,000 levels with the default
    max_stack_depth (2 MB); 100,000 fails the statement with SQLSTATE 54001."""

    def deep(depth: int) -> str:
        return "[" * depth + "]" * depth

    query(
        dsn,
        "INSERT INTO notifyq.jobs (task, payload) VALUES ('secure.echo', %s::jsonb)",
        deep(10_000),
    )
    with pytest.raises(psycopg.errors.StatementTooComplex, match="stack depth limit exceeded"):
        query(
            dsn,
            "INSERT INTO notifyq.jobs (task, payload) VALUES ('secure.echo', %s::jsonb)",
            deep(100_000),
        )


def test_undecodable_payloads_from_sql_go_dead_after_one_attempt(dsn: str, tmp_path: Path) -> None:
    """Rows PostgreSQL holds but Python cannot decode (nested over 1024 levels, a
    number beyond a double) used to fail the whole claim after it had marked the
    batch running, crashing the dispatcher.  Now each goes dead on its own."""
    deep = "[" * 2000 + "]" * 2000
    ids = query(
        dsn,
        "INSERT INTO notifyq.jobs (task, payload) VALUES "
        "('secure.echo', '{\"ok\": 1}'), ('secure.echo', %s::jsonb), "
        "('secure.echo', '{\"n\": 1e400}'), ('secure.leaf', %s::jsonb), "
        "('secure.echo', '{\"ok\": 2}') RETURNING id",
        deep,
        deep,
    )
    log = tmp_path / "serve.log"
    with serve_process(dsn, "--concurrency", "5", app="tests.apps.secure:app", log=log) as proc:
        wait_until(
            lambda: statuses(dsn) == {"succeeded": 2, "dead": 3} or proc.poll() is not None,
            message="every job to settle",
        )
        assert proc.poll() is None, log.read_text()[-3000:]
    rows = query(dsn, "SELECT id, status, attempts, last_error FROM notifyq.jobs ORDER BY id")
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (ids[0][0], "succeeded", 1),
        (ids[1][0], "dead", 1),
        (ids[2][0], "dead", 1),
        (ids[3][0], "dead", 1),
        (ids[4][0], "succeeded", 1),
    ]
    for _, _, _, error in (rows[1], rows[2], rows[3]):
        assert "PayloadError" in error and "cannot be decoded in Python" in error
    assert "depth limit exceeded" in rows[1][3]
    assert "infinity" in rows[2][3]
    # Operators can still look at such a job.
    shown = run_cli("jobs", "show", str(ids[1][0]), "--dsn", dsn)
    assert shown.exit_code == 0, shown.output
    assert 'payload:          "<the payload stored in PostgreSQL cannot be decoded' in shown.stdout


# --- 5. secrets


def test_redact_removes_passwords_in_every_spelling() -> None:
    for dsn in (
        f"postgresql://u:{SECRET}@h:5432/d",
        f"postgresql://u@h/d?password={SECRET}",
        f"host=h password={SECRET} dbname=d",
        f"host=h password='{SECRET}' dbname=d",
        f"postgresql://u:{SECRET}@[::1:5432/d",  # malformed: still found
    ):
        assert SECRET in dsn_secrets(dsn)
        assert SECRET not in redact(f"error: {dsn}", dsn_secrets(dsn))
        assert SECRET not in redact(f"error: {dsn}")  # the patterns alone
    assert dsn_secrets("postgresql://u@h/d") == set()


def test_password_never_in_serve_output_or_process_arguments(dsn: str, tmp_path: Path) -> None:
    secret_dsn = make_conninfo(dsn, password=SECRET)
    assert SECRET in secret_dsn
    query(dsn, "INSERT INTO notifyq.jobs (task, payload) VALUES ('secure.chain', '{\"n\": 1}')")
    log = tmp_path / "serve.log"
    with serve_process(secret_dsn, app="tests.apps.secure:app", log=log) as proc:
        wait_until(lambda: statuses(dsn) == {"succeeded": 2}, message="jobs to succeed")
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    assert SECRET.encode() not in cmdline
    text = log.read_text()
    assert "claimed job=" in text  # debug logging was on
    assert SECRET not in text


@pytest.mark.parametrize(
    "bad_dsn",
    [
        f"postgresql://postgres:{SECRET}@127.0.0.1:1/db",  # unreachable
        f"postgresql://postgres:{SECRET}@[::1:5432/db",  # malformed: libpq echoes it
        f"postgresql://postgres:{SECRET}%2G@127.0.0.1:5432/db",  # bad percent-encoding
        f"host=127.0.0.1 port=1 password={SECRET} nonsense",
        f"host=127.0.0.1 port=notaport password={SECRET}",
    ],
)
def test_connection_errors_never_show_the_password(bad_dsn: str) -> None:
    by_env = notifyq_process("enqueue", "secure.leaf", env={"NOTIFYQ_DSN": bad_dsn})
    assert by_env.returncode == 1
    assert by_env.stderr.startswith("notifyq: error: ") and by_env.stderr.count("\n") == 1
    assert SECRET not in by_env.stderr + by_env.stdout
    assert "warning" not in by_env.stderr
    by_option = run_cli("enqueue", "--dsn", bad_dsn, "secure.leaf")
    assert by_option.exit_code == 1
    assert SECRET not in by_option.output
    lines = by_option.stderr.splitlines()
    assert len(lines) == 2 and lines[1].startswith("notifyq: error: ")
    assert lines[0].startswith("notifyq: warning: the password in --dsn is visible")
    assert "NOTIFYQ_DSN" in lines[0] and "PGPASSWORD" in lines[0] and ".pgpass" in lines[0]


def test_dsn_without_password_on_the_command_line_gets_no_warning(dsn: str) -> None:
    result = run_cli("enqueue", "--dsn", dsn, "secure.leaf")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""


# --- HTTP endpoints (notifyq.endpoints): a role that could write the table could point
# every dispatcher at any address its network reaches (server-side request forgery).


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO notifyq.endpoints (task, url) VALUES ('ssrf', 'http://169.254.169.254/')",
        "UPDATE notifyq.endpoints SET url = 'http://169.254.169.254/'",
        "DELETE FROM notifyq.endpoints",
        "TRUNCATE notifyq.endpoints",
    ],
)
def test_neither_producer_nor_worker_may_write_the_endpoints(
    dsn: str, roles: Roles, statement: str
) -> None:
    query(dsn, "INSERT INTO notifyq.endpoints (task, url) VALUES ('hook', 'https://example.com/')")
    for login in (roles.producer_login, roles.worker_login):
        with (
            psycopg.connect(as_user(dsn, login), autocommit=True) as conn,
            pytest.raises(psycopg.errors.InsufficientPrivilege),
        ):
            conn.execute(statement)
    assert query(dsn, "SELECT task, url FROM notifyq.endpoints") == [
        ("hook", "https://example.com/")
    ]
    # The worker reads the table (it serves the rows); the producer does not.
    with psycopg.connect(as_user(dsn, roles.worker_login), autocommit=True) as conn:
        assert conn.execute("SELECT task FROM notifyq.endpoints").fetchall() == [("hook",)]
    with (
        psycopg.connect(as_user(dsn, roles.producer_login), autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute("SELECT task FROM notifyq.endpoints")
