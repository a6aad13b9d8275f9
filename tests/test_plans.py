"""Regression guards for the hot path that are not timed tests.

The dispatcher's statements must keep using the indexes they were written for
(a plan that turns into a sequential scan is invisible on a small table and a
disaster on a big one), and draining a backlog must cost a small, bounded
number of round trips per job: batched claims and batched completions.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

import notifyq
from notifyq import Settings, store
from notifyq.store import QUERIES
from tests.conftest import Server, query, statuses, with_dbname

# One worker under `pytest -n 2` (pyproject: --dist loadgroup): the module-scoped tables
# of a million rows and more are filled once per server, not once per worker.
pytestmark = pytest.mark.xdist_group("plans")

BACKLOG = 20_000


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


def scans(nodes: list[dict[str, Any]]) -> set[tuple[str, str | None]]:
    return {(n["Node Type"], n.get("Index Name")) for n in nodes if "Scan" in n["Node Type"]}


@pytest.fixture
def big_dsn(dsn: str) -> str:
    """A realistic table: a backlog, a history of finished jobs, scheduled and running ones."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO notifyq.jobs (task) SELECT 't' FROM generate_series(1, %s)", (BACKLOG,)
        )
        conn.execute(
            "INSERT INTO notifyq.jobs (task, status, attempts, finished_at)"
            " SELECT 't', 'succeeded', 1, now() FROM generate_series(1, %s)",
            (BACKLOG,),
        )
        conn.execute(
            "INSERT INTO notifyq.jobs (task, run_at)"
            " SELECT 't', now() + interval '1 hour' FROM generate_series(1, 1000)"
        )
        conn.execute(
            "INSERT INTO notifyq.jobs (task, status, attempts, started_at, claimed_by,"
            " lease_expires_at) SELECT 't', 'running', 1, now(), 'x', now() + interval '1 minute'"
            " FROM generate_series(1, 100)"
        )
        conn.execute("VACUUM ANALYZE notifyq.jobs")
    return dsn


CLAIM = {
    "queues": ["default", "other"],
    "limit": 50,
    "claimant": "c",
    "lease": 30.0,
    "task_names": ["t", "t2"],
}
# A batch task's claim (`@app.task(batch_size=100)`, and a SQL worker's notifyq.claim with
# one task): the same statement, for one task and a batch's worth.
BATCH_CLAIM = {**CLAIM, "limit": 100, "task_names": ["t"]}
# The indexes the claim may read notifyq.jobs through: its own, the schedule's, and the
# primary key for its writes.
CLAIM_INDEXES = {"jobs_claim_idx", "jobs_scheduled_idx", "jobs_pkey"}


def prepared_plan(
    dsn: str, name: str, params: dict[str, Any], *, generic: bool, analyze: bool = False
) -> list[dict[str, Any]]:
    """The plan a prepared named query really runs: with `generic`, the plan the
    dispatcher's connections cache after the first executions (the claim connection
    forces it: plan_cache_mode = force_generic_plan), made without the parameters'
    values; else a custom plan for these values.  `analyze`: executed, with the rows
    each node saw.  In a rolled-back transaction: the UPDATEs change nothing."""
    names: list[str] = []

    def placeholder(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    body = re.sub(r"%\((\w+)\)s", placeholder, QUERIES[name])
    mode = "force_generic_plan" if generic else "force_custom_plan"
    options = sql.SQL("ANALYZE, FORMAT JSON" if analyze else "FORMAT JSON")
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction(force_rollback=True):
        conn.execute(f"SET LOCAL plan_cache_mode = {mode}".encode())
        conn.execute(f"PREPARE planned AS {body}".encode())
        args = sql.SQL(", ").join(sql.Literal(params[n]) for n in names)
        row = conn.execute(
            sql.SQL("EXPLAIN ({}) EXECUTE planned ({})").format(options, args)
        ).fetchone()
    assert row is not None
    return list(plan_nodes(row[0][0]["Plan"]))


def rows_read(nodes: list[dict[str, Any]]) -> int:
    """Rows the scans of notifyq.jobs produced or filtered out, over all their loops."""
    return sum(
        (n["Actual Rows"] + n.get("Rows Removed by Filter", 0)) * n["Actual Loops"]
        for n in nodes
        if n.get("Relation Name") == "jobs" and "Scan" in n["Node Type"]
    )


@contextmanager
def filled(server: Server, rows: str, count: int) -> Iterator[str]:
    """A database of its own holding `count` extra jobs made by one INSERT ... SELECT
    (`rows` selects the columns from generate_series g), analyzed."""
    name = server.create_database()
    dsn = with_dbname(server.admin_dsn, name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
            # The CHECKs' regular expressions cost 5 µs a row, the history and notify
            # triggers as much again: off while filling (no plan depends on them), on again
            # after (NOT VALID: the rows were made to satisfy them, no need to scan them).
            checks = conn.execute(
                "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
                " WHERE conrelid = 'notifyq.jobs'::regclass AND contype = 'c'"
            ).fetchall()
            for check, _ in checks:
                conn.execute(
                    sql.SQL("ALTER TABLE notifyq.jobs DROP CONSTRAINT {}").format(
                        sql.Identifier(check)
                    )
                )
            conn.execute("ALTER TABLE notifyq.jobs DISABLE TRIGGER USER")
            conn.execute(
                sql.SQL(
                    "INSERT INTO notifyq.jobs"
                    " (queue, task, priority, run_at, status, attempts, started_at, finished_at)"
                    " SELECT {} FROM generate_series(1, {}) AS g"
                ).format(sql.SQL(rows), sql.Literal(count))  # type: ignore[arg-type]
            )
            conn.execute("ALTER TABLE notifyq.jobs ENABLE TRIGGER USER")
            for check, definition in checks:
                conn.execute(
                    sql.SQL("ALTER TABLE notifyq.jobs ADD CONSTRAINT {} {} NOT VALID").format(
                        sql.Identifier(check),
                        sql.SQL(definition),  # type: ignore[arg-type]
                    )
                )
            # What the claim takes: ready jobs of both served tasks, some scheduled.
            conn.execute(
                "INSERT INTO notifyq.jobs (queue, task, run_at)"
                " SELECT CASE WHEN g % 3 = 0 THEN 'other' ELSE 'default' END,"
                "        CASE WHEN g % 2 = 0 THEN 't' ELSE 't2' END,"
                "        now() + CASE WHEN g % 5 = 0 THEN interval '1 hour' ELSE interval '0' END"
                " FROM generate_series(1, 500) AS g"
            )
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("ANALYZE notifyq.jobs")
        yield dsn
    finally:
        server.drop_database(name)


# 1,000,000 queued jobs the claim must not read: a quarter in a queue it does not serve,
# a quarter of a task it has no handler for (at a higher priority than its own), a
# quarter of its own task at a lower priority, a quarter scheduled an hour from now.
QUEUED = """
    CASE g % 4 WHEN 0 THEN 'elsewhere' ELSE 'default' END,
    CASE g % 4 WHEN 1 THEN 'unserved' ELSE 't' END,
    CASE g % 4 WHEN 1 THEN 10 WHEN 0 THEN 0 ELSE -1 END,
    CASE g % 4 WHEN 3 THEN now() + interval '1 hour' ELSE now() - interval '1 hour' END,
    'queued', 0, NULL::timestamptz, NULL::timestamptz
"""
# 2,000,000 finished jobs of the served queues and tasks: succeeded, dead, cancelled.
FINISHED = """
    CASE g % 3 WHEN 0 THEN 'other' ELSE 'default' END,
    CASE g % 2 WHEN 0 THEN 't' ELSE 't2' END,
    0,
    now() - interval '1 day',
    CASE WHEN g % 10 = 0 THEN 'dead' WHEN g % 10 = 1 THEN 'cancelled' ELSE 'succeeded' END,
    1, now() - interval '1 day', now() - make_interval(secs => g)
"""


@pytest.fixture(scope="module")
def queued_dsn(server: Server) -> Iterator[str]:
    with filled(server, QUEUED, 1_000_000) as dsn:
        yield dsn


@pytest.fixture(scope="module")
def finished_dsn(server: Server) -> Iterator[str]:
    with filled(server, FINISHED, 2_000_000) as dsn:
        yield dsn


@pytest.mark.parametrize("params", [CLAIM, BATCH_CLAIM], ids=["claim", "batch-claim"])
@pytest.mark.parametrize("table", ["queued_dsn", "finished_dsn"], ids=["1M-queued", "2M-finished"])
@pytest.mark.parametrize("generic", [False, True], ids=["custom", "generic"])
def test_claim_cost_follows_the_jobs_it_claims_not_the_table(
    request: pytest.FixtureRequest, server: Server, table: str, generic: bool, params: Any
) -> None:
    """generic: what the dispatcher runs (its claim connection forces generic plans).
    Every read of notifyq.jobs is an index probe and the rows read stay near the rows
    claimed: a plan that hashes, sorts or filters the backlog or the finished rows reads
    hundreds of thousands here."""
    dsn = request.getfixturevalue(table)
    # The claim is notifyq.claim_jobs: the plans of the statements it runs.
    plans = nested_plans(dsn, "claim", params, generic=generic, analyze=True)
    nodes = [node for plan in plans for node in plan]
    found = scans(nodes)
    jobs_scans = {
        (n["Node Type"], n.get("Index Name"))
        for n in nodes
        if n.get("Relation Name") == "jobs" and "Scan" in n["Node Type"]
    }
    assert {kind for kind, _ in jobs_scans} <= {"Index Scan", "Index Only Scan"}, jobs_scans
    assert {index for _, index in jobs_scans} <= CLAIM_INDEXES, jobs_scans
    assert ("Index Scan", "jobs_pkey") in found  # the claim's UPDATE, by id
    assert any(index == "jobs_scheduled_idx" for _, index in found)  # the timer's next run_at
    claimed = next(n for n in nodes if n.get("Operation") == "Update" and n["Actual Rows"])
    assert claimed["Actual Rows"] == params["limit"]
    # Each (queue, task) pair's best rows are read once to rank them (up to a claim's
    # worth each), the claimed ones twice more (locked, updated), and one probe per pair
    # finds the timer's next run_at.
    pairs = len(params["queues"]) * len(params["task_names"])
    assert rows_read(nodes) <= (pairs + 2) * params["limit"] + pairs, rows_read(nodes)


@pytest.mark.parametrize("state", ["open", "cooled"], ids=["open", "probing"])
@pytest.mark.parametrize("generic", [False, True], ids=["custom", "generic"])
def test_a_claim_past_a_circuit_breaker_reads_no_backlog(
    queued_dsn: str, state: str, generic: bool
) -> None:
    """The breaker of task 't' open (its 500,000 ready jobs held back): the claim takes
    t2's jobs and reads none of t's; its cool-down over (`cooled`): it also starts one
    probe of t, found along jobs_claim_idx.  Still index probes only, the rows read near
    the rows claimed."""
    query(
        queued_dsn,
        "INSERT INTO notifyq.circuit_breakers (task, state, opened_at, cooldown)"
        " VALUES ('t', 'open', now() - CASE WHEN %s THEN interval '1 hour' ELSE '0' END,"
        " '1 minute')",
        state == "cooled",
    )
    try:
        plans = nested_plans(queued_dsn, "claim", CLAIM, generic=generic, analyze=True)
    finally:
        query(queued_dsn, "DELETE FROM notifyq.circuit_breakers")
    nodes = [node for plan in plans for node in plan]
    jobs_scans = {
        (n["Node Type"], n.get("Index Name"))
        for n in nodes
        if n.get("Relation Name") == "jobs" and "Scan" in n["Node Type"]
    }
    assert {kind for kind, _ in jobs_scans} <= {"Index Scan", "Index Only Scan"}, jobs_scans
    assert {index for _, index in jobs_scans} <= CLAIM_INDEXES, jobs_scans
    updates = [n for n in nodes if n.get("Operation") == "Update" and n["Actual Rows"]]
    claimed = next(n for n in updates if n.get("Relation Name") == "jobs")
    assert claimed["Actual Rows"] == CLAIM["limit"]
    probes = [n for n in updates if n.get("Relation Name") == "circuit_breakers"]
    # Probing: the breaker turned half-open (the write that then records its probe's id
    # returns no rows to count here).
    assert len(probes) == (1 if state == "cooled" else 0), probes
    pairs = len(CLAIM["queues"]) * len(CLAIM["task_names"])
    assert rows_read(nodes) <= (pairs + 2) * CLAIM["limit"] + 2 * pairs, rows_read(nodes)


@pytest.mark.parametrize("state", ["closed", "open"])
@pytest.mark.parametrize("generic", [False, True], ids=["custom", "generic"])
def test_failures_reach_their_breaker_by_key(big_dsn: str, state: str, generic: bool) -> None:
    """The completion with failures of a task that has a breaker: counted (closed), or
    given back (open).  Jobs by primary key as ever; the breaker by its task."""
    query(
        big_dsn,
        "UPDATE notifyq.jobs SET status = 'running', attempts = 1, started_at = now(),"
        " claimed_by = 'c', lease_expires_at = now() + interval '1 minute'"
        " WHERE id <= 50",
    )
    query(
        big_dsn,
        "INSERT INTO notifyq.circuit_breakers (task, failures, state, opened_at)"
        " VALUES ('t', 1000, %s, CASE WHEN %s = 'open' THEN now() END)",
        state,
        state,
    )
    params = {
        "ids": list(range(1, 51)),
        "attempts": [1] * 50,
        "outcomes": ["failed"] * 50,
        "errors": ["e"] * 50,
        "results": [None] * 50,
        "progresses": [None] * 50,
        "progress_messages": [None] * 50,
        "retry_in": [None] * 50,
        "claimant": "c",
    }
    plans = nested_plans(big_dsn, "complete", params, generic=generic, analyze=True)
    nodes = [node for plan in plans for node in plan if node.get("Relation Name")]
    found = scans(nodes)
    assert ("Index Scan", "jobs_pkey") in found, found
    # queue_events and circuit_breakers hold a row per queue or task: a scan is their
    # cheapest read.  Never one of notifyq.jobs.
    jobs_seq = [n for n in nodes if n["Node Type"] == "Seq Scan" and n["Relation Name"] == "jobs"]
    assert not jobs_seq, found
    assert not any(idx == "jobs_lease_idx" for _, idx in found), found


# Writes by id go through the primary key, one probe per id.  Never the partial index
# of running jobs: when the statistics believe it small, the planner scans all of it once
# per id (a drain at concurrency 200 spent seconds per completion that way).
BY_ID = {"jobs_pkey"}


@pytest.mark.parametrize(
    ("name", "params", "indexes"),
    [
        (
            "complete",
            {
                "ids": list(range(1, 51)),
                "attempts": [1] * 50,
                "outcomes": ["succeeded", "failed"] * 25,
                "errors": [None, "e"] * 25,
                "results": ['{"r": 1}', None] * 25,
                "progresses": [None] * 50,
                "progress_messages": [None] * 50,
                "retry_in": [None, 5.0] * 25,
                "claimant": "c",
            },
            BY_ID,
        ),
        (
            "complete_succeeded",
            {
                "ids": list(range(1, 51)),
                "attempts": [1] * 50,
                "outcomes": None,
                "errors": None,
                "results": None,
                "progresses": None,
                "progress_messages": None,
                "retry_in": None,
                "claimant": "c",
            },
            BY_ID,
        ),
        ("renew_leases", {"ids": list(range(1, 51)), "claimant": "c", "lease": 30.0}, BY_ID),
        (
            "hand_back",
            {"ids": list(range(1, 51)), "attempts": [1] * 50, "claimant": "c"},
            BY_ID,
        ),
    ],
    ids=["complete", "complete_succeeded", "renew_leases", "hand_back"],
)
@pytest.mark.parametrize("generic", [False, True], ids=["custom", "generic"])
def test_writes_use_their_index(
    big_dsn: str, name: str, params: dict[str, Any], indexes: set[str], generic: bool
) -> None:
    # Statistics gone stale the way a drain makes them: ANALYZE saw 100 running jobs,
    # now thousands run (claimed, finished, their outcomes not yet written).
    query(
        big_dsn,
        "UPDATE notifyq.jobs SET status = 'running', attempts = 1, started_at = now(),"
        " claimed_by = 'c', lease_expires_at = now() + interval '1 minute'"
        " WHERE status = 'queued' AND run_at <= now() AND id % 4 = 0",
    )
    query_name = "complete" if name == "complete_succeeded" else name
    if query_name in ("complete", "hand_back"):  # notifyq.finish_jobs, hand_back_jobs
        plans = nested_plans(big_dsn, query_name, params, generic=generic)
        nodes = [node for plan in plans for node in plan if node.get("Relation Name")]
    else:
        nodes = prepared_plan(big_dsn, query_name, params, generic=generic)
    found = scans(nodes)
    assert any(idx in indexes for _, idx in found), found
    if "jobs_lease_idx" not in indexes:
        assert not any(idx == "jobs_lease_idx" for _, idx in found), found
    # No sequential scan.  The events trigger's probe of notifyq.queue_events
    # (a row per queue with events on; empty by default) is one, by design: the cheapest
    # read of a table that small.
    seq_scans = [
        n
        for n in nodes
        if n["Node Type"] == "Seq Scan" and n.get("Relation Name") != "queue_events"
    ]
    assert not seq_scans, found


@pytest.mark.parametrize("generic", [False, True], ids=["custom", "generic"])
def test_until_empty_asks_the_claim_index_whether_work_is_left(big_dsn: str, generic: bool) -> None:
    """work_left (serve --until-empty): with a backlog it answers from jobs_claim_idx at the
    first ready row; it never reads the table or the finished rows."""
    params = {"queues": ["default"], "tasks": ["t"]}
    found = scans(without_pauses(prepared_plan(big_dsn, "work_left", params, generic=generic)))
    assert any(idx == "jobs_claim_idx" for _, idx in found), found
    assert not any(kind == "Seq Scan" for kind, _ in found), found


def without_pauses(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The nodes but those reading notifyq.queue_pauses: a row per pause (none, mostly),
    which a sequential scan reads most cheaply, once per statement or per (queue, task)."""
    return [n for n in nodes if n.get("Relation Name") != "queue_pauses"]


@contextmanager
def paused(dsn: str, *pauses: tuple[str, str]) -> Iterator[None]:
    """(queue, task) pairs paused ('*': the whole queue) while inside, on a shared table."""
    for queue, task in pauses:
        query(dsn, "INSERT INTO notifyq.queue_pauses (queue, task) VALUES (%s, %s)", queue, task)
    try:
        yield
    finally:
        query(dsn, "DELETE FROM notifyq.queue_pauses")


def claimed_pairs(dsn: str) -> Counter[tuple[str, str]]:
    """The (queue, task) of what CLAIM claims, in a rolled-back transaction."""
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction(force_rollback=True):
        rows = conn.execute(QUERIES["claim"], CLAIM).fetchall()
    return Counter((r[1], r[2]) for r in rows if r[0] is not None)


@pytest.mark.parametrize("pause", [("default", "*"), ("default", "t")], ids=["queue", "task"])
@pytest.mark.parametrize("generic", [False, True], ids=["custom", "generic"])
def test_a_paused_backlog_costs_the_claim_nothing(
    queued_dsn: str, pause: tuple[str, str], generic: bool
) -> None:
    """1,000,000 queued jobs, then their queue (or one task of it) paused: the claim takes
    the other work and reads no more of the paused pairs' jobs than a pair's probe,
    along its indexes only; the upkeep and work_left say nothing is ready in a paused
    pair, reading a row or two."""
    with paused(queued_dsn, pause):
        got = claimed_pairs(queued_dsn)
        assert got and all(
            queue != pause[0] or (pause[1] != "*" and task != pause[1]) for queue, task in got
        ), got
        plans = nested_plans(queued_dsn, "claim", CLAIM, generic=generic, analyze=True)
        nodes = [node for plan in plans for node in plan]
        jobs_scans = {
            (n["Node Type"], n.get("Index Name"))
            for n in nodes
            if n.get("Relation Name") == "jobs" and "Scan" in n["Node Type"]
        }
        assert {index for _, index in jobs_scans} <= CLAIM_INDEXES, jobs_scans
        pairs = len(CLAIM["queues"]) * len(CLAIM["task_names"])
        assert rows_read(nodes) <= (pairs + 2) * CLAIM["limit"] + pairs, rows_read(nodes)
        one_pair = {"queues": [pause[0]], "tasks": ["t"], "claimant": "me"}
        for name in ("upkeep", "work_left"):
            nodes = prepared_plan(queued_dsn, name, one_pair, generic=generic, analyze=True)
            # At most the probe of the pair's first row, which the planner may make before
            # it looks at the pause: never the backlog behind it.
            assert rows_read(nodes) <= 2, (name, scans(nodes))
        with psycopg.connect(queued_dsn, autocommit=True) as conn:
            ready = conn.execute(QUERIES["upkeep"], one_pair).fetchone()
        assert ready is not None and ready[0] is False


def nested_plans(
    dsn: str, name: str, params: dict[str, Any], *, generic: bool = False, analyze: bool = False
) -> list[list[dict[str, Any]]]:
    """The plans of every statement a named query runs inside functions (auto_explain,
    reported as notices), in a rolled-back transaction.  `generic`: the functions'
    statements are planned without their parameters' values, as on the dispatcher's
    claim connection (plan_cache_mode = force_generic_plan); `analyze`: with the rows
    each node saw."""
    plans: list[list[dict[str, Any]]] = []

    def collect(diag: psycopg.errors.Diagnostic) -> None:
        text = diag.message_primary or ""
        if text.startswith("duration:") and "{" in text:
            plan = json.loads(text[text.index("{") :])
            plans.append(list(plan_nodes(plan["Plan"])))

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.add_notice_handler(collect)
        conn.execute("LOAD 'auto_explain'")
        for setting in (
            "auto_explain.log_min_duration = 0",
            "auto_explain.log_nested_statements = on",
            "auto_explain.log_format = json",
            "auto_explain.log_level = notice",
            "client_min_messages = notice",
            f"auto_explain.log_analyze = {'on' if analyze else 'off'}",
            "auto_explain.log_timing = off",
            f"plan_cache_mode = {'force_generic_plan' if generic else 'force_custom_plan'}",
        ):
            conn.execute(f"SET {setting}".encode())
        with conn.transaction(force_rollback=True):
            conn.execute(QUERIES[name], params)
    return plans


def test_rescue_probes_running_jobs_only(big_dsn: str) -> None:
    """notifyq.rescue_jobs: the claimants of running jobs, a dead one's jobs and expired
    leases, each along jobs_lease_idx (running rows only), never the whole table."""
    query(
        big_dsn,
        "INSERT INTO notifyq.dispatchers (claimant, host, pid, queues, concurrency, heartbeat,"
        " liveness_lock, alive_at) VALUES ('x', 'h', 1, '{default}', 1, 10, true, NULL)",
    )
    query(
        big_dsn,
        "UPDATE notifyq.jobs SET lease_expires_at = now() - interval '1 minute'"
        " WHERE status = 'running' AND id % 2 = 0",
    )
    # No grace: the session of 'x' (claimant of the running jobs) counts as lost at once.
    params = {
        "claimant": "me",
        "session_grace": 0.0,
        "restart_grace": 0.0,
        "trust_sessions": True,
        "limit": 1000,
    }
    plans = nested_plans(big_dsn, "rescue", params)
    on_jobs = [
        scans(nodes) for nodes in plans if any(n.get("Relation Name") == "jobs" for n in nodes)
    ]
    # The claimants, the dead claimant's jobs, the expired leases, the peers watched.
    assert len(on_jobs) >= 3, plans
    for found in on_jobs:
        assert any(idx in ("jobs_lease_idx", "jobs_pkey") for _, idx in found), found
    # No statement reads notifyq.jobs whole (the registry is small: it may be).
    jobs_seq = [
        n
        for nodes in plans
        for n in nodes
        if n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "jobs"
    ]
    assert jobs_seq == [], plans


@pytest.mark.anyio
async def test_draining_a_backlog_costs_few_round_trips_per_job(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every dispatcher statement goes through Store._run: count them by role."""
    jobs = 2000
    calls: Counter[str] = Counter()
    real_run = store.Store._run

    async def counting(self: store.Store, name: str, *args: Any, **kwargs: Any) -> list[Any]:
        calls[name] += 1
        return await real_run(self, name, *args, **kwargs)

    monkeypatch.setattr(store.Store, "_run", counting)
    app = notifyq.App()

    @app.task(name="noop")
    async def noop(payload: Any) -> None:
        pass

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO notifyq.jobs (task) SELECT 'noop' FROM generate_series(1, %s)", (jobs,)
        )
    worker = app.worker(Settings(concurrency=50, poll_interval=3600), dsn=dsn)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        with anyio.fail_after(60):
            # Polling the table: no event says "the database shows every job done".
            while await anyio.to_thread.run_sync(statuses, dsn) != {"succeeded": jobs}:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        worker.stop()
    # A claim fetches up to the free slots (refilled at half), and one completion statement
    # writes whatever finished meanwhile: far fewer statements than jobs.
    assert calls["claim"] <= jobs / 10, calls
    completes = calls["complete"] + calls["complete_succeeded"]
    assert completes <= jobs / 10, calls
    per_job = (calls["claim"] + completes) / jobs
    print(f"round trips per job: {per_job:.3f} ({dict(calls)})")


@pytest.mark.anyio
@pytest.mark.parametrize(("prepare", "expected"), [(True, "force_generic_plan"), (False, "auto")])
async def test_the_claim_connection_plans_once_unless_it_prepares_nothing(
    dsn: str, prepare: bool, expected: str
) -> None:
    # Without prepared statements (--no-listen, poolers) a generic plan would never be reused.
    claim_store = store.Store(dsn, "claim", prepare=prepare, generic_plans=True)
    try:
        conn = await claim_store._connection()
        cur = await conn.execute("SHOW plan_cache_mode")
        assert await cur.fetchone() == (expected,)
        # Either way, no JIT: the claim's estimated cost grows with the backlog (not its work),
        # and past jit_above_cost every execution would be compiled (~600 ms on PostgreSQL 15).
        cur = await conn.execute("SHOW jit")
        assert await cur.fetchone() == ("off",)
    finally:
        await claim_store.close()


def test_watch_dispatchers_counts_running_jobs_along_their_index(finished_dsn: str) -> None:
    """notifyq watch's dispatcher table counts each dispatcher's running jobs in the jobs
    table on every refresh: along jobs_lease_idx (running rows only), so 10,000 running
    jobs cost 10,000 index entries however many finished rows the table holds (2,000,000
    here).  In a rolled-back transaction: the module's table stays as it was."""
    running, claimants = 10_000, 40
    with psycopg.connect(finished_dsn) as conn, conn.transaction(force_rollback=True):
        conn.execute(
            "INSERT INTO notifyq.dispatchers (claimant, host, pid, queues, concurrency,"
            " heartbeat) SELECT 'd' || g, 'h', g, '{default}', 500, 10"
            " FROM generate_series(1, %s) AS g",
            (claimants,),
        )
        conn.execute(
            "INSERT INTO notifyq.jobs (task, status, attempts, started_at, claimed_by,"
            " lease_expires_at) SELECT 't', 'running', 1, now(), 'd' || (g %% %s + 1),"
            " now() + interval '1 minute' FROM generate_series(1, %s) AS g",
            (claimants, running),
        )
        conn.execute("ANALYZE notifyq.jobs")  # transactional: rolled back with the rows
        row = conn.execute(
            b"EXPLAIN (ANALYZE, FORMAT JSON) " + QUERIES["watch_dispatchers"].encode()
        ).fetchone()
        assert row is not None
        listed = conn.cursor(row_factory=dict_row).execute(QUERIES["watch_dispatchers"])
        counted = sum(d["running"] for d in listed.fetchall())
    nodes = list(plan_nodes(row[0][0]["Plan"]))
    on_jobs = {
        (n["Node Type"], n.get("Index Name")) for n in nodes if n.get("Relation Name") == "jobs"
    }
    assert on_jobs, nodes
    assert all(kind != "Seq Scan" for kind, _ in on_jobs), on_jobs
    assert any(n.get("Index Name") == "jobs_lease_idx" for n in nodes), on_jobs
    assert rows_read(nodes) <= running, rows_read(nodes)
    assert counted == running


@pytest.mark.parametrize("generic", [False, True], ids=["custom", "generic"])
def test_the_listeners_upkeep_reads_indexes_only(big_dsn: str, generic: bool) -> None:
    """upkeep, an idle dispatcher's one statement per poll: "ready?" along jobs_claim_idx at
    the first ready row; notifyq.rescue_due along jobs_lease_idx (running rows only)."""
    query(
        big_dsn,
        "INSERT INTO notifyq.dispatchers (claimant, host, pid, queues, concurrency, heartbeat,"
        " liveness_lock, alive_at) VALUES ('x', 'h', 1, '{default}', 1, 10, true, now())",
    )
    params = {"claimant": "me", "queues": ["default", "other"], "tasks": ["t", "t2"]}
    found = scans(without_pauses(prepared_plan(big_dsn, "upkeep", params, generic=generic)))
    assert ("Index Only Scan", "jobs_claim_idx") in found or (
        "Index Scan",
        "jobs_claim_idx",
    ) in found, found
    assert not any(kind == "Seq Scan" for kind, _ in found), found
    # The statement itself (logged too), then notifyq.rescue_due's, then notifyq.liveness_held's.
    inside = [
        scans(nodes)
        for nodes in nested_plans(big_dsn, "upkeep", params, generic=generic)
        if any(n.get("Relation Name") == "jobs" for n in nodes)
    ]
    assert any(idx == "jobs_lease_idx" for found in inside for _, idx in found), inside
    for nested in inside:
        assert not any(kind == "Seq Scan" for kind, _ in nested), nested


def test_retention_asks_when_next_due_along_the_finished_index(big_dsn: str) -> None:
    """purge_batch's next_in: the first finished row younger than the cutoff, one probe of
    jobs_finished_idx, never a scan of the finished rows."""
    params = {"seconds": 3600.0, "statuses": ["succeeded"], "limit": 1000}
    found = scans(prepared_plan(big_dsn, "purge_batch", params, generic=False))
    assert any(idx == "jobs_finished_idx" for _, idx in found), found
    assert not any(kind == "Seq Scan" for kind, _ in found), found


def test_an_insert_reads_the_appetite_of_its_queue_by_key(queued_dsn: str) -> None:
    """The insert trigger's appetite probes, and a dispatcher's appetite write, read
    notifyq.queue_appetite by its primary key however many queues and dispatchers it
    lists, and never scan notifyq.jobs (1,000,000 queued jobs here)."""
    counts = (
        "SELECT relname, seq_scan, idx_scan FROM pg_stat_xact_user_tables"
        " WHERE schemaname = 'notifyq' AND relname IN ('jobs', 'queue_appetite')"
    )
    with psycopg.connect(queued_dsn) as conn:
        conn.execute(
            "INSERT INTO notifyq.queue_appetite (queue, claimant, state, expires_at)"
            " SELECT 'q' || g % 2000, 'd' || g, 'draining', now() + interval '1 hour'"
            " FROM generate_series(1, 20000) AS g"
        )
        conn.execute("ANALYZE notifyq.queue_appetite")
        before = {r[0]: r[1:] for r in conn.execute(counts)}
        conn.execute("INSERT INTO notifyq.jobs (task, queue) VALUES ('t', 'q7')")
        conn.execute("SELECT notifyq.set_appetite('d7', ARRAY['q7', 'q8'], 'hungry')")
        after = {r[0]: r[1:] for r in conn.execute(counts)}
        conn.rollback()
    seq = {t: after[t][0] - before[t][0] for t in after}
    idx = {t: after[t][1] - before[t][1] for t in after}
    assert seq == {"jobs": 0, "queue_appetite": 0}
    assert idx["queue_appetite"] >= 2  # the trigger's probe and the write's cleanup


@pytest.mark.parametrize(
    ("given", "most"),
    [({}, 100), ({"status": "dead"}, 2_000), ({"id": 1_234_567}, 1), ({"since": "now"}, 100)],
    ids=["newest", "a-status", "by-id", "a-time-range"],
)
def test_the_dashboards_search_walks_the_primary_key_and_stops_at_its_limit(
    finished_dsn: str, given: dict[str, Any], most: int
) -> None:
    """notifyq web's job search (custom plans: its Store prepares nothing) on 2M finished
    jobs: the newest first along jobs_pkey, stopping at the limit; an id is one probe.  A
    filter few recent rows match reads further back (documented in docs/web.md)."""
    params: dict[str, Any] = dict.fromkeys(
        ("id", "queue", "task", "status", "since", "until", "key", "value")
    )
    params["limit"] = 100
    params.update(given)
    if params["since"] == "now":
        (row,) = query(finished_dsn, "SELECT max(created_at) - interval '1 hour' FROM notifyq.jobs")
        params["since"] = row[0]
    nodes = prepared_plan(finished_dsn, "web_jobs", params, generic=False, analyze=True)
    assert not [n for n in nodes if n["Node Type"] == "Seq Scan"], scans(nodes)
    assert {idx for _, idx in scans(nodes)} == {"jobs_pkey"}, scans(nodes)
    assert rows_read(nodes) <= most


# The indexes the monitoring functions may read notifyq.jobs through: the partial ones.
MONITOR_INDEXES = {
    "jobs_claim_idx",
    "jobs_scheduled_idx",
    "jobs_lease_idx",
    "jobs_dead_idx",
    "jobs_finished_idx",
    "jobs_failed_idx",
}


def jobs_scans(nodes: list[dict[str, Any]]) -> set[tuple[str, str | None]]:
    return {
        (n["Node Type"], n.get("Index Name"))
        for n in nodes
        if n.get("Relation Name") == "jobs" and "Scan" in n["Node Type"]
    }


@pytest.mark.parametrize("table", ["queued_dsn", "finished_dsn"], ids=["1M-queued", "2M-finished"])
@pytest.mark.parametrize("generic", [False, True], ids=["custom", "generic"])
def test_queue_health_reads_the_partial_indexes_only(
    request: pytest.FixtureRequest, server: Server, table: str, generic: bool
) -> None:
    """notifyq.queue_health (watch_queues, which inlines it) reads what it counts (queued,
    running and dead jobs, and the last minute's finished ones), never the rest of the
    finished rows: on 2,000,000 finished jobs, along the partial indexes only.  (On the
    1,000,000-queued table, where nearly every row is one it counts, the planner may
    rightly read the table itself.)"""
    dsn = request.getfixturevalue(table)
    params = {"queues": None, "tags": None}
    nodes = prepared_plan(dsn, "watch_queues", params, generic=generic, analyze=True)
    counted = query(
        dsn, "SELECT count(*) FROM notifyq.jobs WHERE status IN ('queued', 'running', 'dead')"
    )[0][0]
    # Each counted row once per CTE reading its index (queued: the counts, the waits).
    assert rows_read(nodes) <= 2 * counted + 10_000, (rows_read(nodes), counted)
    if table == "finished_dsn":
        found = jobs_scans(nodes)
        assert found and all(kind != "Seq Scan" for kind, _ in found), found
        indexes = {n["Index Name"] for n in nodes if n.get("Index Name")}
        assert indexes <= MONITOR_INDEXES | {"queue_pauses_pkey"}, indexes


def monitor_plan(dsn: str, setup: str, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """EXPLAIN ANALYZE of query `name` after `setup` and ANALYZE, rolled back after."""
    body = QUERIES[name].encode()
    with psycopg.connect(dsn) as conn, conn.transaction(force_rollback=True):
        conn.execute(setup.encode())
        conn.execute("ANALYZE notifyq.jobs")  # transactional: rolled back with the rows
        row = conn.execute(b"EXPLAIN (ANALYZE, FORMAT JSON) " + body, params).fetchone()
    assert row is not None
    return list(plan_nodes(row[0][0]["Plan"]))


def test_failed_recent_reads_about_the_rows_it_returns(finished_dsn: str) -> None:
    """notifyq.failed_recent: backwards along jobs_failed_idx, stopping at its limit, with
    50,000 failed jobs over a month and 2,000,000 finished ones in the table."""
    nodes = monitor_plan(
        finished_dsn,
        "INSERT INTO notifyq.jobs (task, status, attempts, last_error, run_at, started_at,"
        " finished_at) SELECT 't', 'dead', 3, 'boom', now() - g * interval '1 minute',"
        " now() - g * interval '1 minute', now() - g * interval '1 minute'"
        " FROM generate_series(1, 50000) AS g",
        "monitor_failed_recent",
        {"within": 86400.0 * 30, "limit": 100},
    )
    found = jobs_scans(nodes)
    assert found == {("Index Scan", "jobs_failed_idx")}, found
    assert rows_read(nodes) <= 200, rows_read(nodes)


def test_stuck_reads_running_jobs_only(finished_dsn: str) -> None:
    """notifyq.stuck: along jobs_lease_idx, so 10,000 running jobs cost 10,000 index
    entries however many finished rows the table holds (2,000,000 here)."""
    running = 10_000
    nodes = monitor_plan(
        finished_dsn,
        "INSERT INTO notifyq.jobs (task, status, attempts, started_at, claimed_by,"
        " lease_expires_at) SELECT 't', 'running', 1, now() - g * interval '1 second', 'x',"
        " now() + CASE WHEN g % 100 = 0 THEN interval '-1 minute' ELSE interval '1 minute' END"
        f" FROM generate_series(1, {running}) AS g",
        "monitor_stuck",
        {"seconds": 3600.0},
    )
    found = jobs_scans(nodes)
    assert found and all(index == "jobs_lease_idx" for _, index in found), found
    assert rows_read(nodes) <= running, rows_read(nodes)


@pytest.mark.parametrize("name", ["webhook_claim", "webhook_next_due"])
def test_the_webhook_sender_reads_pending_deliveries_only(dsn: str, name: str) -> None:
    """The sender's claim and its "next due?" probe go along webhook_deliveries_due_idx
    (pending rows only): 100,000 delivered rows cost them nothing."""
    params = {"limit": 20, "lease": 30.0}
    with psycopg.connect(dsn) as conn, conn.transaction(force_rollback=True):
        conn.execute(
            "INSERT INTO notifyq.webhook_deliveries (job_id, url, body, status, attempts,"
            " delivered_at) SELECT g, 'http://h/x', '{}', 'delivered', 1, now()"
            " FROM generate_series(1, 100000) AS g"
        )
        conn.execute(
            "INSERT INTO notifyq.webhook_deliveries (job_id, url, body)"
            " SELECT g, 'http://h/x', '{}' FROM generate_series(1, 5) AS g"
        )
        conn.execute("ANALYZE notifyq.webhook_deliveries")
        row = conn.execute(
            b"EXPLAIN (ANALYZE, FORMAT JSON) " + QUERIES[name].encode(), params
        ).fetchone()
    assert row is not None
    nodes = list(plan_nodes(row[0][0]["Plan"]))
    on_outbox = [n for n in nodes if n.get("Relation Name") == "webhook_deliveries"]
    assert on_outbox, nodes
    assert all(n["Node Type"] != "Seq Scan" for n in on_outbox), on_outbox
    assert any(n.get("Index Name") == "webhook_deliveries_due_idx" for n in on_outbox), on_outbox
    read = sum(
        (n["Actual Rows"] + n.get("Rows Removed by Filter", 0)) * n["Actual Loops"]
        for n in on_outbox
        if "Scan" in n["Node Type"]
    )
    assert read <= 20, read


# The parameters enqueue sends (store.producing.NewJob), whatever columns it gains.
KEYED = store.producing.NewJob(
    task="t",
    payload_json="{}",
    queue="default",
    priority=0,
    delay=0.0,
    run_at=None,
    max_attempts=None,
    dedupe_key="k",
).params()


@pytest.mark.parametrize(
    "options",
    [{"unique_for": 3600.0, "on_duplicate": None}, {"unique_for": None, "on_duplicate": "replace"}],
    ids=["unique_for", "replace"],
)
@pytest.mark.parametrize("generic", [False, True], ids=["custom", "generic"])
def test_keyed_inserts_probe_the_key_only(
    big_dsn: str, options: dict[str, Any], generic: bool
) -> None:
    """The insert trigger of unique_for and replace (notifyq.dedupe_on_insert) finds the
    key's holder along jobs_dedupe_idx and its window by primary key, with a job holding
    the key and a window that ended: never a scan of the 40,000 jobs."""
    query(
        big_dsn,
        "INSERT INTO notifyq.jobs (task, dedupe_key, unique_for, on_duplicate)"
        " VALUES ('t', 'k', %s, %s)",
        None if options["unique_for"] is None else f"{options['unique_for']} seconds",
        options["on_duplicate"],
    )
    query(
        big_dsn,
        "UPDATE notifyq.jobs SET status = 'succeeded', finished_at = now() WHERE dedupe_key = 'k'",
    )
    query(big_dsn, "UPDATE notifyq.unique_windows SET expires_at = now() - interval '1 second'")
    query(big_dsn, "INSERT INTO notifyq.jobs (task, dedupe_key) VALUES ('t', 'other')")
    query(big_dsn, "ANALYZE notifyq.jobs")
    plans = nested_plans(big_dsn, "enqueue_deduped", {**KEYED, **options}, generic=generic)
    nodes = [node for plan in plans for node in plan]
    tables = {n.get("Relation Name") for n in nodes if "Scan" in n["Node Type"]}
    found = scans(nodes)
    assert ("Index Scan", "jobs_dedupe_idx") in found or (
        "Index Only Scan",
        "jobs_dedupe_idx",
    ) in found, found
    if options["unique_for"]:
        assert "unique_windows" in tables
        assert not any(
            n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "unique_windows"
            for n in nodes
        ), found
    seq_jobs = [
        n for n in nodes if n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "jobs"
    ]
    assert not seq_jobs, found


def test_dependency_results_read_by_primary_key(big_dsn: str) -> None:
    """notifyq.dependency_results: the job and each of its dependencies by id."""
    (dependent,) = query(
        big_dsn,
        "INSERT INTO notifyq.jobs (task, depends_on) VALUES ('t', ARRAY[1, 20001, 40001])"
        " RETURNING id",
    )[0]
    plans = nested_plans(big_dsn, "dependency_results", {"id": dependent})
    nodes = [node for plan in plans for node in plan]
    jobs_scans = {
        (n["Node Type"], n.get("Index Name")) for n in nodes if n.get("Relation Name") == "jobs"
    }
    assert jobs_scans and {index for _, index in jobs_scans} == {"jobs_pkey"}, jobs_scans


def test_window_cleanup_reads_the_ended_windows_only(dsn: str) -> None:
    """notifyq.expire_unique_windows: along unique_windows_expires_idx, from the oldest."""
    query(
        dsn,
        "INSERT INTO notifyq.unique_windows (dedupe_key, job_id, expires_at)"
        " SELECT 'k' || g, g, now() + CASE WHEN g % 100 = 0 THEN interval '-1 hour'"
        " ELSE interval '1 hour' END FROM generate_series(1, 50000) AS g",
    )
    query(dsn, "ANALYZE notifyq.unique_windows")
    plans = nested_plans(dsn, "expire_unique_windows", {"limit": 100}, analyze=True)
    nodes = [node for plan in plans for node in plan]
    found = scans(nodes)
    assert ("Index Scan", "unique_windows_expires_idx") in found, found
    assert not any(kind == "Seq Scan" for kind, _ in found), found
