"""A backend for Django's Tasks framework (`django.tasks`, Django 6): `@task` functions
run on notifyq's dispatcher.  docs/django.md is the user's guide.

    TASKS = {"default": {"BACKEND": "notifyq.contrib.django.Backend", ...}}
    INSTALLED_APPS = [..., "notifyq.contrib.django"]   # the migration, the command, checks

    backend.py    the Backend: validation, enqueue in the Django connection's transaction,
                  get_result; its OPTIONS
    results.py    a notifyq job (and its history) as a Django TaskResult
    running.py    which Django tasks a dispatcher serves, and the handler each runs under
                  (signals, TaskContext, Django's connections closed around each job)
    schema.py     the schema through Django migrations, and the check that it is current
    apps.py       the Django app (label "notifyq"); management/commands/notifyq_serve.py

Django 6 needs Python 3.12; on an older Python, importing this package says so.
"""

from __future__ import annotations

from typing import Any

try:
    import django.tasks  # noqa: F401  (imported here only to fail early, with a reason)
except ImportError as exc:  # no Django, or one older than 6 (no django.tasks)
    raise ImportError(
        "notifyq.contrib.django needs Django 6 or later (django.tasks), which needs "
        "Python 3.12 or later: pip install 'notifyq[django]' under Python 3.12+"
    ) from exc

__all__ = ["Backend"]


def __getattr__(name: str) -> Any:
    # Lazy: Django imports this package while it fills its app registry, before the
    # settings the backend reads may be used.
    if name == "Backend":
        from .backend import Backend

        return Backend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
