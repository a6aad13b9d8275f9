"""The modules of `notifyq` import each other without a cycle.

Each module takes its input from the one before it and does not import the ones
after it (docs/STYLE: one stage of the data path per file).  A cycle hidden
behind `TYPE_CHECKING` or a function-level import is still a cycle of design, so
every import statement counts, wherever it stands.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "notifyq"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The `notifyq.*` modules that the statements of `tree` import, anywhere in it."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join([*base, node.module] if node.module else base)
            else:
                origin = node.module or ""
            for alias in node.names:
                # `from . import store` imports the module notifyq.store; `from .app
                # import App` (or `from . import App`) the module that defines the name.
                submodule = f"{origin}.{alias.name}"
                found.add(submodule if submodule in modules else origin)
    # Importing notifyq.store.rows runs notifyq/store/__init__.py first: an edge to it too.
    # Not to the root package (its __init__ is the public surface, importing every stage),
    # nor to the importer's own packages (Python is running them already).
    for module in list(found):
        parts = module.split(".")
        for end in range(2, len(parts)):
            parent = ".".join(parts[:end])
            if not (name == parent or name.startswith(parent + ".")):
                found.add(parent)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {
        name: imported(ast.parse(path.read_text()), name, path.name == "__init__.py", modules)
        for name, path in files.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = GREY
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == GREY:
                return [*stack[stack.index(nxt) :], nxt]
            if colour[nxt] == WHITE and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        colour[node] = BLACK
        return None

    for node in sorted(graph):
        if colour[node] == WHITE and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_graph_is_read_from_every_kind_of_import() -> None:
    """The checker sees imports under TYPE_CHECKING and inside functions (the ones that
    hid the app -> worker -> metrics -> worker circle), and the packages a submodule's
    import runs first."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import store\n"
        "if TYPE_CHECKING:\n"
        "    from .app import App\n"
        "def f():\n"
        "    from .metrics import Metrics\n"
        "    import notifyq.codec\n"
    )
    modules = {"notifyq", "notifyq.store", "notifyq.app", "notifyq.metrics", "notifyq.codec"}
    assert imported(ast.parse(source), "notifyq.worker", False, modules) == {
        "notifyq.store",
        "notifyq.app",
        "notifyq.metrics",
        "notifyq.codec",
    }
    # A submodule's package runs before it; one's own package is no edge.
    nested = {"notifyq", "notifyq.store", "notifyq.store.rows", "notifyq.store.dispatching"}
    source = "from .store.rows import Row\n"
    assert imported(ast.parse(source), "notifyq.worker", False, nested) == {
        "notifyq.store",
        "notifyq.store.rows",
    }
    source = "from .rows import Row\n"
    assert imported(ast.parse(source), "notifyq.store.dispatching", False, nested) == {
        "notifyq.store.rows"
    }
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_notifyq_modules_import_each_other_without_a_cycle() -> None:
    graph = import_graph()
    assert "notifyq.worker" in graph and "notifyq.store" in graph["notifyq.worker"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module that importing `start` imports, directly or not."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_watch_view_renders_and_never_queries() -> None:
    """notifyq.watch: a model that queries, a view that renders.  Only the model and the
    loop that drives it reach the store; what draws a Snapshot imports plain data."""
    graph = import_graph()
    assert reachable({"a": {"b"}, "b": {"c"}, "c": set()}, "a") == {"b", "c"}
    assert "notifyq.store" in reachable(graph, "notifyq.watch.model")
    drawing = ["snapshot", "layout", "tables", "view", "live"]
    reaches_store = [
        m for m in drawing if "notifyq.store" in reachable(graph, f"notifyq.watch.{m}")
    ]
    assert reaches_store == []
