"""What `manage.py notifyq_serve` runs: a notifyq App with one handler per Django task
of a backend, each named by the task's module path.

Around each job, as Django's request cycle does around a request, the handler
closes the database connections that are unusable or past CONN_MAX_AGE
(`close_old_connections`): a plain `def` task runs in a worker thread with Django
connections of its own, which would otherwise stay open after the thread ends.  An
`async def` task runs on the dispatcher's event loop; Django runs its ORM calls
(through sync_to_async) in one thread, where the handler closes them too.

Per attempt: the job is read back as a TaskResult (RUNNING), `task_started` is sent,
the function is called (with a TaskContext first for `takes_context` tasks), and
`task_finished` is sent with the attempt's outcome, from inside the exception
handler when it raised (as Django's own backend does).  Receivers' errors are
logged, never the job's outcome.  An attempt past OPTIONS["TIMEOUT"] is failed by
notifyq: an async task is cancelled, a sync one's thread runs on unsupervised (Python
cannot stop it); either way `task_finished` reports it FAILED with a TimeoutError.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from inspect import iscoroutinefunction
from traceback import format_exception
from typing import Any

import anyio
from asgiref.sync import sync_to_async
from django.db import close_old_connections
from django.dispatch import Signal
from django.tasks import Task, TaskContext, TaskResult, TaskResultStatus
from django.tasks.base import TaskError
from django.tasks.signals import task_finished, task_started
from django.utils import timezone
from django.utils.json import normalize_json

from ...app import App
from ...errors import PayloadError
from ...job import JobContext
from . import results, tasks
from .backend import Backend

log = logging.getLogger("notifyq.django")


def build_app(backend: Backend) -> App:
    """An App serving every task of `backend` (discovered first), on its database."""
    tasks.discover(backend.modules)
    app = App(dsn=backend.dispatcher_dsn())
    for path, task in sorted(tasks.declared(backend.alias).items()):
        app.task(
            name=path,
            queue=task.queue_name,
            max_attempts=backend.max_attempts,
            backoff=backend.backoff,
            timeout=backend.timeout,
        )(handler(backend, task))
    return app


def handler(backend: Backend, task: Task) -> Callable[[Any, JobContext], Any]:
    """The notifyq handler that runs `task` for a job of it."""
    if iscoroutinefunction(task.func):
        return _async_handler(backend, task)
    return _sync_handler(backend, task)


def _sync_handler(backend: Backend, task: Task) -> Callable[[Any, JobContext], Any]:
    timeout = backend.timeout

    def run(payload: Any, ctx: JobContext) -> Any:
        started = time.monotonic()  # the event loop's clock, after notifyq's deadline began
        args, kwargs = _arguments(payload, ctx)
        close_old_connections()
        try:
            result = backend.get_result(str(ctx.id))
            _send(task_started, backend, result)
            try:
                value = normalize_json(task.func(*_context(task, result), *args, **kwargs))
                if timeout is not None and time.monotonic() - started >= timeout:
                    # Past TIMEOUT: notifyq failed the attempt and left this thread to run
                    # on, unsupervised; what the function returned is no outcome.
                    raise TimeoutError(f"task {ctx.task!r} ran past its {timeout}s timeout")
            except BaseException as exc:  # as a dispatcher does: any raise fails the attempt
                _failed(result, exc)
                _send(task_finished, backend, result)
                raise
            _succeeded(result, value)
            _send(task_finished, backend, result)
            return value
        finally:
            close_old_connections()

    return run


def _async_handler(backend: Backend, task: Task) -> Callable[[Any, JobContext], Any]:
    timeout = backend.timeout

    async def run(payload: Any, ctx: JobContext) -> Any:
        args, kwargs = _arguments(payload, ctx)
        deadline = anyio.current_effective_deadline()  # inf without a TIMEOUT
        await sync_to_async(close_old_connections)()
        try:
            result = await backend.aget_result(str(ctx.id))
            await _asend(task_started, backend, result)
            try:
                value = normalize_json(await task.func(*_context(task, result), *args, **kwargs))
            except Exception as exc:
                _failed(result, exc)
                await _asend(task_finished, backend, result)
                raise
            except anyio.get_cancelled_exc_class():
                # A shutdown's cancellation hands the attempt back: it did not finish.
                # TIMEOUT's (notifyq's deadline, the earliest around this handler) fails
                # it, so it is reported like any failure.
                if (
                    timeout is not None
                    and not ctx.stopping.is_set()
                    and (anyio.current_time() >= deadline)
                ):
                    _failed(
                        result, TimeoutError(f"task {ctx.task!r} ran past its {timeout}s timeout")
                    )
                    with anyio.CancelScope(shield=True):
                        await _asend(task_finished, backend, result)
                raise
            _succeeded(result, value)
            await _asend(task_finished, backend, result)
            return value
        finally:
            # Shielded: a cancelled attempt (timeout, shutdown) closes its connections too.
            with anyio.CancelScope(shield=True):
                await sync_to_async(close_old_connections)()

    return run


def _arguments(payload: Any, ctx: JobContext) -> tuple[list[Any], dict[str, Any]]:
    found = results.arguments(payload)
    if found is None:  # inserted by something else than the backend: it never runs
        raise PayloadError(
            f"job {ctx.id} of Django task {ctx.task!r} has no {{'args': [...], "
            "'kwargs': {...}} payload"
        )
    return found


def _context(task: Task, result: TaskResult) -> tuple[Any, ...]:
    return (TaskContext(task_result=result),) if task.takes_context else ()


def _failed(result: TaskResult, exc: BaseException) -> None:
    kind = type(exc)
    object.__setattr__(result, "status", TaskResultStatus.FAILED)
    object.__setattr__(result, "finished_at", timezone.now())
    result.errors.append(
        TaskError(
            exception_class_path=f"{kind.__module__}.{kind.__qualname__}",
            traceback="".join(format_exception(exc)),
        )
    )


def _succeeded(result: TaskResult, value: Any) -> None:
    object.__setattr__(result, "status", TaskResultStatus.SUCCESSFUL)
    object.__setattr__(result, "finished_at", timezone.now())
    object.__setattr__(result, "_return_value", value)


def _send(signal: Signal, backend: Backend, result: TaskResult) -> None:
    for receiver, error in signal.send_robust(type(backend), task_result=result):
        if isinstance(error, Exception):
            log.error("receiver %r of a task signal raised", receiver, exc_info=error)


async def _asend(signal: Signal, backend: Backend, result: TaskResult) -> None:
    for receiver, error in await signal.asend_robust(type(backend), task_result=result):
        if isinstance(error, Exception):
            log.error("receiver %r of a task signal raised", receiver, exc_info=error)
