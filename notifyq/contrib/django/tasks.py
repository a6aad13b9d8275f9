"""Which Django tasks this process knows, by backend alias and module path.

A notifyq dispatcher claims only the tasks it has a handler for, so `notifyq_serve`
must know every task before it starts: nothing is imported by a name read from a
row.  The Backend's `task_class` records each `@task` as it is defined;
`discover` defines them, importing the `tasks` module of every installed app and
the modules OPTIONS["MODULES"] names.  A job whose task is not among them is no
task of this backend: get_result does not find it and no dispatcher runs it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from importlib import import_module

from django.tasks import Task
from django.utils.module_loading import autodiscover_modules

_declared: dict[str, dict[str, Task]] = {}  # backend alias -> module path -> its task
_discovered: set[tuple[str, ...]] = set()
_lock = threading.Lock()


class NotifyqTask(Task):
    """Django's Task, remembered by the backend alias it was declared for."""

    __slots__ = ()

    def __post_init__(self) -> None:
        Task.__post_init__(self)  # the backend's validate_task
        with _lock:
            # The first one stays: `.using(...)` variants share its function and path.
            _declared.setdefault(self.backend, {}).setdefault(self.module_path, self)


def discover(modules: Iterable[str] = ()) -> None:
    """Import the installed apps' `tasks` modules and `modules` (once per process)."""
    key = tuple(modules)
    if key in _discovered:
        return
    autodiscover_modules("tasks")
    for name in key:
        import_module(name)
    _discovered.add(key)


def declared(alias: str) -> dict[str, Task]:
    """The tasks of backend `alias` defined so far, by module path."""
    with _lock:
        return dict(_declared.get(alias, {}))


def lookup(alias: str, path: str, modules: Iterable[str] = ()) -> Task | None:
    """The task of backend `alias` whose module path is `path`, discovering once if
    it is not defined yet; None if it is no task of that backend."""
    found = declared(alias).get(path)
    if found is None:
        discover(modules)
        found = declared(alias).get(path)
    return found
