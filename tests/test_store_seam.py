"""The store is the seam: only notifyq/store/ runs SQL or names a query, and the rows it
returns have names, never positions (issue 15: `r[7]` breaks at the next migration)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import types
import typing
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from notifyq import store
from notifyq.job import JobState, JobStatus
from notifyq.store import rows

PACKAGE = Path(store.__file__).parent.parent
STORE = Path(store.__file__).parent

# What runs a query by name, or SQL at all: the store's own machinery.
BY_NAME = {"QUERIES", "_run", "fetch_all", "fetch_one", "fetch_value", "records", "fetch"}
NAMES = BY_NAME - {"_run"}  # as a bare name, `_run` is many modules' own function
EXECUTES = {"execute", "executemany", "cursor", "copy", "stream"}


def outside_the_store() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if STORE not in p.parents]


def uses(path: Path) -> list[str]:
    """Where `path` reaches the store's by-name machinery or executes SQL itself."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr in BY_NAME:
            if node.attr == "_run" and ast.unparse(node.value) == "self":
                continue  # a module's own _run (the Store's is reached through a store)
            found.append(f"{path.name}:{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Name) and node.id in NAMES:
            found.append(f"{path.name}:{node.lineno}: {node.id}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").endswith("connection"):
            found.append(f"{path.name}:{node.lineno}: imports store.connection")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in EXECUTES
        ):
            found.append(f"{path.name}:{node.lineno}: .{node.func.attr}()")
    return sorted(found)


def test_the_check_sees_a_query_run_by_name(tmp_path: Path) -> None:
    """The scan below would catch the calls issue 15 removed."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "rows = await st.fetch('watch_queues', {})\n"
        "store.records(conn, 'unserved_jobs', {})\n"
        "conn.execute(QUERIES['claim'])\n"
        "st._run('claim', {}, row)\n"
    )
    assert uses(sample) == [
        "sample.py:1: .fetch",
        "sample.py:2: .records",
        "sample.py:3: .execute()",
        "sample.py:3: QUERIES",
        "sample.py:4: ._run",
    ]


def test_no_module_outside_the_store_runs_sql_or_names_a_query() -> None:
    modules = outside_the_store()
    assert len(modules) > 20  # the walk found the package
    assert [use for path in modules for use in uses(path)] == []


def test_every_query_has_a_typed_function_in_the_store() -> None:
    """Each named query is run by some store module (none is left for callers to name)."""
    source = "\n".join(p.read_text() for p in STORE.glob("*.py"))
    mentioned = {
        node.value
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }
    assert sorted(set(store.QUERIES) - mentioned) == []


ROW_TYPES = [
    cls
    for _, cls in inspect.getmembers(store.rows, inspect.isclass)
    if cls.__module__ == store.rows.__name__
]


@pytest.mark.parametrize("row", ROW_TYPES, ids=lambda cls: cls.__name__)
def test_a_row_has_names_and_no_positions(row: type) -> None:
    """Frozen, slotted dataclasses: neither indexable nor unpackable, so no caller can
    come to depend on a column's position."""
    assert dataclasses.is_dataclass(row)
    params = row.__dataclass_params__  # type: ignore[attr-defined]
    assert params.frozen
    assert "__slots__" in vars(row)
    assert not issubclass(row, tuple)
    assert not hasattr(row, "__getitem__")
    assert not hasattr(row, "__iter__")


# Which row type each query's rows are built into.  class_row (and kwargs_row) build a row
# by column name when it is fetched, so a column and a field that do not match fail only
# at run time, on the first row: this table and the test below catch it without one.
ROW_OF_QUERY: dict[str, type] = {
    "enqueue": rows.Inserted,
    "enqueue_many": rows.Inserted,
    "enqueue_deduped": rows.Deduped,
    "wait_outcomes": rows.JobOutcome,
    "wait_outcomes_by_token": rows.JobOutcome,
    "job_status": JobStatus,
    "job_status_by_id": JobStatus,
    "claim": rows.ClaimRow,
    "complete": rows.WrittenRow,
    "endpoints": rows.EndpointRow,
    "hand_back": rows.WrittenRow,
    "renew_leases": rows.HeldAttempt,
    "still_claimed": rows.HeldAttempt,
    "rescue": rows.RescueRow,
    "purge_batch": rows.Purged,
    "dependency_results": rows.DependencyResult,
    "upkeep": rows.Upkeep,
    "periodic_schedules": rows.ScheduleRow,
    "periodic_fire": rows.Fired,
    "jobs_list": rows.JobSummary,
    "job_show": rows.JobRecord,
    "testing_jobs": rows.JobRecord,
    "job_history": rows.HistoryEntry,
    "task_record": rows.TaskRecord,
    "task_attempts": rows.AttemptEntry,
    "queue_limits": rows.QueueLimit,
    "circuit_breakers": rows.BreakerState,
    "queue_pauses": rows.QueuePause,
    "queue_events": rows.QueueEvents,
    "health_server": rows.ServerInfo,
    "health_oldest_transaction": rows.OldestTransaction,
    "health_expired_leases": rows.ExpiredLeases,
    "health_jobs_table": rows.TupleCounts,
    "health_lost_dispatchers": rows.LostDispatchers,
    "unserved_jobs": rows.UnservedJobs,
    "metrics_depth": rows.QueueDepth,
    "metrics_waits": rows.StartWait,
    "wakeups": rows.Wakeups,
    "watch_queues": rows.QueueStats,
    "watch_failures": rows.FailedJob,
    "watch_running": rows.RunningJob,
    "watch_dispatchers": rows.DispatcherState,
    "web_jobs": rows.JobSummary,
    "web_periodic": rows.PeriodicEntry,
    "monitor_failed_recent": rows.FailedAttempt,
    "monitor_stuck": rows.StuckJob,
    "webhook_claim": rows.WebhookClaimed,
    "webhook_next_due": rows.NextDue,
    "webhook_settle": rows.Settled,
}

# The PostgreSQL types (by OID) psycopg loads as each Python type a field declares.
LOADS_AS: dict[Any, set[int]] = {
    int: {20, 21, 23},  # int8, int2, int4
    float: {700, 701},  # float4, float8
    str: {19, 25},  # name, text
    JobState: {25},
    bool: {16},
    datetime: {1184},  # timestamptz
    list[str]: {1009},  # text[]
    list[int]: {1016},  # int8[]
}


def test_the_table_names_every_row_type_the_store_builds() -> None:
    """Each class_row(X) in the store is in ROW_OF_QUERY, and where one call names both
    the query and its row type, the table says the same."""
    built: set[str] = set()
    paired: set[tuple[str, str]] = set()
    for path in STORE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            args = [*node.args, *(k.value for k in node.keywords)]
            classes = [
                a.args[0].id
                for a in args
                if isinstance(a, ast.Call)
                and ast.unparse(a.func) == "class_row"
                and isinstance(a.args[0], ast.Name)
            ]
            built.update(classes)
            names = [
                a.value for a in args if isinstance(a, ast.Constant) and a.value in store.QUERIES
            ]
            paired.update((name, cls) for name in names for cls in classes)
    # JobStatus is built by hand (store/producing.py); the claim's and the completion's
    # rows by position (_claim_rows, _written_rows in store/dispatching.py), which the
    # column-order check below makes safe.
    by_position = {"JobStatus", "ClaimRow", "WrittenRow"}
    assert built == {cls.__name__ for cls in ROW_OF_QUERY.values()} - by_position
    assert {(name, ROW_OF_QUERY[name].__name__) for name, _ in paired} == paired


def _positional(text: str) -> bytes:
    """A named query with psycopg's %(name)s placeholders as the server's $1, $2..."""
    numbers: dict[str, int] = {}

    def number(match: re.Match[str]) -> str:
        if match.group(0) == "%%":
            return "%"
        return f"${numbers.setdefault(match.group(1), len(numbers) + 1)}"

    return re.sub(r"%\((\w+)\)s|%%", number, text).encode()


def _accepted(hint: Any) -> set[int] | None:
    """The OIDs a field's type loads from (None: any); X | None loads as X does."""
    if hint is Any:
        return None
    if isinstance(hint, types.UnionType):
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return LOADS_AS[hint]


@pytest.mark.parametrize("name", sorted(ROW_OF_QUERY))
def test_a_query_returns_the_columns_of_its_row_type(dsn: str, name: str) -> None:
    """The server describes the prepared query (nothing runs): its columns are its row
    type's fields, by name and in order, each of a type the field's annotation loads."""
    row = ROW_OF_QUERY[name]
    with psycopg.connect(dsn) as conn:
        prepared = conn.pgconn.prepare(b"", _positional(store.QUERIES[name]))
        assert prepared.error_message == b""
        described = conn.pgconn.describe_prepared(b"")
    columns = [
        (bytes(described.fname(i) or b"").decode(), described.ftype(i))
        for i in range(described.nfields)
    ]
    assert [column for column, _ in columns] == [f.name for f in dataclasses.fields(row)]
    hints = typing.get_type_hints(row)
    for column, oid in columns:
        accepted = _accepted(hints[column])
        assert accepted is None or oid in accepted, (column, oid, hints[column])
