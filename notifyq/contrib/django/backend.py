"""The Backend: `TASKS = {"default": {"BACKEND": "notifyq.contrib.django.Backend"}}`.

A Django task is a notifyq task named by its module path (`myapp.tasks.send_mail`);
a call is a job whose payload is {"args": [...], "kwargs": {...}} (the JSON Django
normalises them to).  `queue_name` is the job's queue; `priority` is its priority
unchanged: both sides run higher numbers first, and Django's -100..100 lies within
notifyq's -1000..1000; `run_after` is its run_at.  The result id is the job id.

Enqueue inserts through the psycopg 3 connection behind `connections[DATABASE]`,
so inside `transaction.atomic()` the job exists only if the block commits, and the
dispatchers hear of it at that commit (PostgreSQL holds the notification until then).
`task_enqueued` is sent at that commit too (at once outside a transaction), never
for a job rolled back.

OPTIONS (each optional):

    DATABASE      the alias of DATABASES holding the notifyq schema ("default")
    MAX_ATTEMPTS  attempts per job, 1-1000 (1).  Django has no retries: a task that
                  raises is FAILED at once.  Above 1, a failed attempt is retried
                  with notifyq's backoff; meanwhile the result is READY again, with
                  the error in `errors`, and `task_finished` is sent per attempt.
    BACKOFF       {"base": 1, "factor": 2, "max_delay": 3600}: seconds, as Backoff
    TIMEOUT       seconds an attempt may run (None: no limit)
    DSN           the dispatcher's connection string (default: built from DATABASE's
                  settings); e.g. to reach PostgreSQL directly past a pooler
    MODULES       modules defining tasks besides the installed apps' `tasks` modules
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg
from django.core.checks import CheckMessage
from django.core.checks import Error as CheckError
from django.core.exceptions import ImproperlyConfigured
from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.db.transaction import TransactionManagementError
from django.tasks import Task, TaskResult, TaskResultStatus
from django.tasks.backends.base import BaseTaskBackend
from django.tasks.exceptions import InvalidTask, InvalidTaskBackend, TaskResultDoesNotExist
from django.tasks.signals import task_enqueued
from django.utils import timezone
from django.utils.json import normalize_json
from psycopg.conninfo import make_conninfo

from ... import store
from ...app import App
from ...errors import ConfigurationError
from ...registry import check_queue_name, check_task_name
from ...retry import Backoff
from . import results, tasks

OPTIONS = ("DATABASE", "MAX_ATTEMPTS", "BACKOFF", "TIMEOUT", "DSN", "MODULES")
MAX_JOB_ID = 9_223_372_036_854_775_807  # bigint's largest
# Connection parameters of Django's that are not libpq's (get_connection_params).
_NOT_LIBPQ = frozenset({"cursor_factory", "context", "prepare_threshold"})


class Backend(BaseTaskBackend):
    task_class = tasks.NotifyqTask
    supports_defer = True
    supports_async_task = True
    supports_get_result = True
    supports_priority = True

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        options = dict(self.options)
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise InvalidTaskBackend(
                f"TASKS[{alias!r}]['OPTIONS'] has unknown keys {unknown}; "
                f"the notifyq backend reads {list(OPTIONS)}"
            )
        self.database: str = options.get("DATABASE", DEFAULT_DB_ALIAS)
        self.max_attempts: int = options.get("MAX_ATTEMPTS", 1)
        if not (isinstance(self.max_attempts, int) and 1 <= self.max_attempts <= 1000):
            raise InvalidTaskBackend(
                f"TASKS[{alias!r}]['OPTIONS']['MAX_ATTEMPTS'] must be an integer from 1 "
                f"to 1000, not {self.max_attempts!r}"
            )
        try:
            self.backoff = Backoff(**options.get("BACKOFF", {}))
        except (TypeError, ConfigurationError) as exc:
            raise InvalidTaskBackend(
                f"TASKS[{alias!r}]['OPTIONS']['BACKOFF'] takes base, factor and max_delay "
                f"(seconds): {exc}"
            ) from None
        self.timeout: float | None = options.get("TIMEOUT")
        if self.timeout is not None and not (
            isinstance(self.timeout, int | float) and self.timeout > 0
        ):
            raise InvalidTaskBackend(
                f"TASKS[{alias!r}]['OPTIONS']['TIMEOUT'] must be positive seconds or None"
            )
        self.dsn: str | None = options.get("DSN")
        self.modules: tuple[str, ...] = tuple(options.get("MODULES", ()))
        # Enqueues on the caller's connection only (conn=): this App never connects.
        self._app = App()

    # --- validation

    def validate_task(self, task: Task) -> None:
        super().validate_task(task)
        try:
            check_task_name(task.module_path)
            check_queue_name(task.queue_name)
        except ConfigurationError as exc:
            raise InvalidTask(str(exc)) from None

    # --- enqueue

    def enqueue(self, task: Task, args: Sequence[Any], kwargs: dict[str, Any]) -> TaskResult:
        self.validate_task(task)
        # TypeError for what JSON cannot hold, before anything is sent (as Django's own).
        payload = {"args": normalize_json(args), "kwargs": normalize_json(kwargs)}
        conn = self.psycopg_connection()
        wrapper = connections[self.database]
        if not wrapper.get_autocommit() and not wrapper.in_atomic_block:
            # on_commit (below) would refuse after the insert: refuse before it instead.
            raise TransactionManagementError(
                f"the notifyq task backend {self.alias!r} sends task_enqueued when the job "
                "commits, which Django cannot tell under manual transaction management "
                "(set_autocommit(False)): enqueue inside transaction.atomic() instead"
            )
        job_id = self._app.enqueue_sync(
            task.module_path,
            payload,
            conn=conn,
            queue=task.queue_name,
            priority=task.priority,
            run_at=self._run_at(task.run_after),
            max_attempts=self.max_attempts,
        )
        result = TaskResult(
            task=task,
            id=str(int(job_id)),
            status=TaskResultStatus.READY,
            enqueued_at=timezone.now(),
            started_at=None,
            last_attempted_at=None,
            finished_at=None,
            args=payload["args"],
            kwargs=payload["kwargs"],
            backend=self.alias,
            errors=[],
            worker_ids=[],
        )
        # At the commit that makes the job real: a rolled-back job was never enqueued.
        send = functools.partial(task_enqueued.send, type(self), task_result=result)
        transaction.on_commit(send, using=self.database)
        return result

    @staticmethod
    def _run_at(run_after: datetime | None) -> datetime | None:
        if run_after is None or timezone.is_aware(run_after):
            return run_after
        # USE_TZ = False: naive datetimes are in the default time zone, as Django's are.
        aware: datetime = timezone.make_aware(run_after, timezone.get_default_timezone())
        return aware

    # --- results

    def get_result(self, result_id: str) -> TaskResult:
        try:
            job_id = int(result_id)
        except (TypeError, ValueError):
            raise TaskResultDoesNotExist(result_id) from None
        if not 1 <= job_id <= MAX_JOB_ID:
            raise TaskResultDoesNotExist(result_id)
        conn = self.psycopg_connection()
        record = store.task_results.task_record(conn, job_id)
        if record is None:
            raise TaskResultDoesNotExist(result_id)
        task = tasks.lookup(self.alias, record.task, self.modules)
        if task is None:
            raise TaskResultDoesNotExist(
                f"{result_id}: job {job_id} is not a task of the {self.alias!r} backend "
                f"(its task is {record.task!r})"
            )
        history = store.task_results.task_attempts(conn, job_id)
        return results.task_result(task, record, history, self.alias)

    # --- connections

    def psycopg_connection(self) -> psycopg.Connection[Any]:
        """The psycopg 3 connection behind `connections[DATABASE]`, in whatever
        transaction Django has open on it."""
        wrapper = connections[self.database]
        if wrapper.vendor != "postgresql":
            raise ImproperlyConfigured(
                f"the notifyq task backend {self.alias!r} needs a PostgreSQL database; "
                f"DATABASES[{self.database!r}] is {wrapper.vendor}"
            )
        wrapper.validate_no_broken_transaction()
        # As Django's own cursor(): with CONN_HEALTH_CHECKS, a persistent connection that
        # died since the last request is replaced, not used.
        wrapper.close_if_health_check_failed()
        wrapper.ensure_connection()
        conn = wrapper.connection
        if not isinstance(conn, psycopg.Connection):
            raise ImproperlyConfigured(
                f"DATABASES[{self.database!r}] connects with {type(conn).__module__}; the "
                "notifyq task backend needs psycopg 3: pip install 'psycopg[binary]' "
                "(Django prefers it to psycopg2 when both are installed)"
            )
        return conn

    def dispatcher_dsn(self) -> str:
        """The dispatcher's connection string: OPTIONS["DSN"], else DATABASE's settings."""
        if self.dsn:
            return self.dsn
        params = connections[self.database].get_connection_params()
        libpq: dict[str, Any] = {
            key: value
            for key, value in params.items()
            if key not in _NOT_LIBPQ and isinstance(value, str | int) and value != ""
        }
        return make_conninfo("", **libpq)

    # --- system checks (manage.py check)

    def check(self, **kwargs: Any) -> list[CheckMessage]:
        messages: list[CheckMessage] = list(super().check(**kwargs))
        if self.database not in connections:
            messages.append(
                CheckError(
                    f"the notifyq task backend {self.alias!r} names the database "
                    f"{self.database!r}, which DATABASES does not define",
                    hint="set TASKS[...]['OPTIONS']['DATABASE'] to an alias of DATABASES",
                    id="notifyq.E001",
                )
            )
        elif connections[self.database].vendor != "postgresql":
            messages.append(
                CheckError(
                    f"the notifyq task backend {self.alias!r} needs PostgreSQL; "
                    f"DATABASES[{self.database!r}] is {connections[self.database].vendor}",
                    id="notifyq.E002",
                )
            )
        for queue in sorted(self.queues):
            try:
                check_queue_name(queue)
            except ConfigurationError as exc:
                messages.append(
                    CheckError(f"TASKS[{self.alias!r}]['QUEUES']: {exc}", id="notifyq.E003")
                )
        return messages
