"""The store is the seam: only notifyq/store/ runs SQL or names a query, and the rows it
returns have names, never positions (issue 15: `r[7]` breaks at the next migration)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

from notifyq import store

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
