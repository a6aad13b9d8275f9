"""`App`: the tasks of one application and how to reach their database.

It registers handlers (`@app.task`), enqueues jobs, and builds a `Worker`
(worker.py) to serve them.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import uuid
import weakref
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar, Unpack, cast, overload

import anyio
import psycopg

from . import admin, embedded, enqueue, migrate, periodic, results, store, tracing, typed_payloads
from .breaker import CircuitBreaker
from .contrib.sqlalchemy import AsyncConn, SyncConn, async_connection, sync_connection
from .enqueue import EnqueueOptions, ManyOptions
from .errors import ConfigurationError
from .job import JobId, JobStatus
from .registry import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_QUEUE,
    Registry,
    Task,
    check_batch_handler,
    check_batching,
    check_callback_url,
    check_queue_name,
    check_tags,
    check_task_name,
    describe_handler,
)
from .retry import Backoff
from .settings import Settings
from .worker import Worker

log = logging.getLogger("notifyq")

F = TypeVar("F", bound=Callable[..., Any])
R = TypeVar("R")


def resolve_dsn(explicit: str | None = None) -> str:
    """--dsn / App(dsn=...), then NOTIFYQ_DSN, then a private server that is running."""
    dsn = explicit or os.environ.get("NOTIFYQ_DSN") or embedded.running_dsn()
    if not dsn:
        raise ConfigurationError(
            "no database configured: pass App(dsn=...) or --dsn, set NOTIFYQ_DSN, "
            "or start the private server with `notifyq serve`"
        )
    return dsn


def _token(job_id: int, token: uuid.UUID | None) -> uuid.UUID | None:
    """The token to read a job with: the one given, else its JobId's."""
    if token is not None:
        if not isinstance(token, uuid.UUID):
            token = uuid.UUID(str(token))  # a token kept as text; ValueError if it is none
        return token
    return job_id.token if isinstance(job_id, JobId) else None


def _breaker(given: CircuitBreaker | None) -> CircuitBreaker | None:
    if given is not None and not isinstance(given, CircuitBreaker):
        raise ConfigurationError(
            f"circuit_breaker must be a notifyq.CircuitBreaker(failures=..., window=..., "
            f"cooldown=...), not {given!r}"
        )
    return given


class App:
    """Tasks and how to reach their database.

    app = notifyq.App()                     # DSN from --dsn / NOTIFYQ_DSN

    @app.task(name="hello.greet")
    async def greet(payload, ctx): ...

    await app.enqueue("hello.greet", {"name": "Ada"})
    """

    def __init__(self, dsn: str | None = None) -> None:
        self.dsn = dsn
        self.registry = Registry()
        self.schedules: list[periodic.Periodic] = []
        self._sync_conn: psycopg.Connection[Any] | None = None
        self._sync_lock = threading.Lock()
        # One cached connection per event loop (a connection cannot cross loops);
        # weak keys, so a closed loop's entry goes with it.
        self._async_conns: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, psycopg.AsyncConnection[Any]
        ] = weakref.WeakKeyDictionary()
        self._async_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        self._waiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, results.Waiters] = (
            weakref.WeakKeyDictionary()
        )

    # --- tasks

    @overload
    def task(self, handler: F, /) -> F: ...

    @overload
    def task(
        self,
        handler: None = None,
        /,
        *,
        name: str | None = ...,
        queue: str = ...,
        max_attempts: int = ...,
        backoff: Backoff | None = ...,
        timeout: float | None = ...,
        decode: Callable[[Any], Any] | None = ...,
        circuit_breaker: CircuitBreaker | None = ...,
        batch_size: int | None = ...,
        batch_wait: float | None = ...,
        tags: Iterable[str] | None = ...,
        callback_url: str | None = ...,
    ) -> Callable[[F], F]: ...

    def task(
        self,
        handler: F | None = None,
        /,
        *,
        name: str | None = None,
        queue: str = DEFAULT_QUEUE,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff: Backoff | None = None,
        timeout: float | None = None,
        decode: Callable[[Any], Any] | None = None,
        circuit_breaker: CircuitBreaker | None = None,
        batch_size: int | None = None,
        batch_wait: float | None = None,
        tags: Iterable[str] | None = None,
        callback_url: str | None = None,
    ) -> F | Callable[[F], F]:
        """Register a handler; the function itself is returned unchanged.

        The handler is called as `handler(payload)` or, if it takes a second
        positional parameter, `handler(payload, ctx)` with a `JobContext`.
        `async def` handlers run on the event loop; plain `def` handlers in
        worker threads.  `decode`, if given, turns the JSON payload into what
        the handler takes; if it raises, the job is dead with a PayloadError.
        Without it, a handler whose payload parameter is annotated with a
        dataclass or a pydantic model receives an instance, validated
        (typed_payloads.py), and enqueue accepts an instance or checks an object.
        `circuit_breaker` (a `CircuitBreaker`) stops starting the task's jobs while its
        failures say the service it calls is down (docs/lifecycle.md).

        With `batch_size`, the handler is a batch handler: it is called with a list of
        up to that many `BatchItem`s, one per claimed job, and settles each
        (docs/lifecycle.md, "Batch handlers"); `batch_wait` (seconds) lets the next
        claim wait that long for a fuller batch after one that was not full.
        `tags` go on every job this app's enqueue methods enqueue for the task (not a
        periodic schedule's), before the enqueue's own (`enqueue(..., tags=...)`); a SQL
        INSERT sets its own.
        `callback_url` is POSTed to when a job of the task ends, unless the enqueue
        names its own (docs/http.md, "Completion webhooks").
        """
        task_tags = check_tags(tags)
        task_callback_url = check_callback_url(callback_url)

        def register(fn: F) -> F:
            if not 1 <= max_attempts <= 1000:
                raise ConfigurationError("max_attempts must be from 1 to 1000")
            if timeout is not None and timeout <= 0:
                raise ConfigurationError("timeout must be positive")
            batch = check_batching(batch_size, batch_wait)
            is_async, wants_context = describe_handler(fn)
            if batch is not None:
                check_batch_handler(fn)
                wants_context = False  # each item carries its job's context
            model = typed_payloads.model_of(fn, batch=batch is not None) if decode is None else None
            task_name = check_task_name(
                f"{fn.__module__}.{fn.__qualname__}" if name is None else name
            )
            self.registry.add(
                Task(
                    name=task_name,
                    handler=fn,
                    queue=check_queue_name(queue),
                    max_attempts=max_attempts,
                    backoff=backoff or Backoff(),
                    timeout=timeout,
                    decode=decode if model is None else typed_payloads.decoder(model),
                    model=model,
                    is_async=is_async,
                    wants_context=wants_context,
                    circuit_breaker=_breaker(circuit_breaker),
                    batch=batch,
                    tags=task_tags,
                    callback_url=task_callback_url,
                )
            )
            return fn

        return register(handler) if handler is not None else register

    def http_task(
        self,
        name: str,
        /,
        *,
        url: str,
        queue: str = DEFAULT_QUEUE,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff: Backoff | None = None,
        timeout: float = 30.0,
        max_concurrency: int | None = None,
        headers: dict[str, str] | None = None,
        secret: str | None = None,
        circuit_breaker: CircuitBreaker | None = None,
    ) -> None:
        """Register a task whose handler is a web endpoint: `notifyq serve` POSTs each job
        to `url` (docs/http.md: the body, the headers, what each response means).

        `timeout` bounds each request (seconds); `max_concurrency` caps the requests one
        dispatcher sends at once; `headers` are extra, non-secret headers; `secret` is the
        NAME of the signing secret, read by the dispatcher from NOTIFYQ_SECRET_<NAME>
        (or `serve --secrets-file`).  Retries, backoff, dead letters and the
        `circuit_breaker` (one per endpoint) are the task's, as for `@app.task`.  Needs
        httpx: pip install 'notifyq[http]'.
        """
        from .http.endpoints import endpoint
        from .http.serving import HTTPX_MISSING, httpx_installed

        if not httpx_installed():
            raise ConfigurationError(HTTPX_MISSING)
        from .http.delivery import Delivery

        declared = endpoint(
            check_task_name(name),
            url,
            timeout=timeout,
            max_concurrency=max_concurrency,
            headers=headers,
            secret=secret,
        )
        if not 1 <= max_attempts <= 1000:
            raise ConfigurationError("max_attempts must be from 1 to 1000")
        self.registry.add(
            Task(
                name=declared.task,
                handler=Delivery(declared),
                queue=check_queue_name(queue),
                max_attempts=max_attempts,
                backoff=backoff or Backoff(),
                is_async=True,
                wants_context=True,
                circuit_breaker=_breaker(circuit_breaker),
            )
        )

    def periodic(
        self,
        schedule: str,
        /,
        *,
        timezone: str = "UTC",
        missed: str = "skip",
        name: str | None = None,
        queue: str = DEFAULT_QUEUE,
        payload: dict[str, Any] | None = None,
        priority: int = 0,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff: Backoff | None = None,
        timeout: float | None = None,
        decode: Callable[[Any], Any] | None = None,
    ) -> Callable[[F], F]:
        """Register a handler as a task (see `task`) and enqueue it on a cron schedule.

        `schedule` has five fields (minute hour day-of-month month day-of-week) or
        six (seconds first), read as local times in `timezone` (an IANA name).
        Every instant is enqueued once, however many dispatchers serve the app,
        with `payload` plus "instant" (ISO 8601, UTC) as the job's payload.
        `missed`: what an instant reached over a minute late (every dispatcher
        was down) comes to: "skip" (nothing) or "once" (the latest one runs).
        The schedule is named after the task: a row of notifyq.periodic.
        """
        zone, payload_json = periodic.check(
            schedule, timezone=timezone, missed=missed, payload=payload, priority=priority
        )

        def register(fn: F) -> F:
            self.task(
                name=name,
                queue=queue,
                max_attempts=max_attempts,
                backoff=backoff,
                timeout=timeout,
                decode=decode,
            )(fn)
            task = self.registry.for_handler(fn)
            assert task is not None
            self.schedules.append(
                periodic.Periodic(
                    name=task.name,
                    task=task.name,
                    schedule=schedule,
                    timezone=zone.key,
                    missed=missed,
                    queue=task.queue,
                    payload_json=payload_json,
                    priority=priority,
                )
            )
            return fn

        return register

    # --- enqueue

    async def enqueue(
        self,
        task: str | Callable[..., Any],
        payload: Any = None,
        *,
        conn: AsyncConn | None = None,
        **options: Unpack[EnqueueOptions],
    ) -> JobId:
        """Insert a job and return its id: a `JobId`, an int that also carries the
        job's token (`.token`), with which `wait` and `status` read this job even
        as a role that may not read the table.

        With `conn`, the INSERT joins that connection's open transaction: the
        job exists only if it commits.  Without, it commits on its own.

        Options (keywords, see `enqueue.EnqueueOptions`): queue, priority, delay,
        run_at, max_attempts, dedupe_key, unique_for, on_duplicate, rate_key,
        depends_on, on_dependency_failure, tags, callback_url.

        With `callback_url`, notifyq POSTs the job's outcome there when it ends
        (succeeded, dead, cancelled), signed; the URL must start with a prefix of
        notifyq.webhook_allowlist, or the database refuses the job (InvalidJob).

        With `tags` (up to 20 strings), the job can be found by them (`notifyq jobs
        list --tag`, `retry --dead --tag`, `cancel --tag`, `purge --tag`, `watch --tag`);
        the task's own tags (`@app.task(tags=...)`) come first.

        With `rate_key`, the job shares the rate limit of that key (notifyq.rate_limits).

        With `dedupe_key`, while a job with the same key is unfinished (queued,
        running or waiting for a retry) nothing is inserted and that job's id is
        returned instead (without a token: it is another enqueue's).  With
        `unique_for` (a timedelta or seconds) as well, the key is held that long
        after the enqueue of the job that took it, even once that job finished.
        With `on_duplicate="replace"` instead, a queued job holding the key, itself
        enqueued with "replace", gets this payload and run_at (debounce; its id comes
        back), and a running one gives up the key to a new job (docs/lifecycle.md).

        With `depends_on` (ids of existing jobs), the job waits until all of
        them succeeded; if one ends dead or cancelled, it is cancelled too, or
        with `on_dependency_failure="run"` runs once all of them finished.
        """
        job = enqueue.build(self.registry, task, payload, options)
        with tracing.sending(job.queue, job.task) as send:
            job_id = await store.enqueue(await self._given_or_own(conn), send.traced(job))
            send.sent([job_id])
        return job_id

    def enqueue_sync(
        self,
        task: str | Callable[..., Any],
        payload: Any = None,
        *,
        conn: SyncConn | None = None,
        **options: Unpack[EnqueueOptions],
    ) -> JobId:
        """`enqueue` for synchronous code (thread-safe); `conn` is a psycopg.Connection or
        a SQLAlchemy Session or Connection."""
        built = enqueue.build(self.registry, task, payload, options, caller="enqueue_sync")
        with tracing.sending(built.queue, built.task) as send:
            job = send.traced(built)
            if conn is not None:
                job_id = store.enqueue_sync(sync_connection(conn), job)
            else:
                job_id = self._on_own_sync_connection(lambda own: store.enqueue_sync(own, job))
            send.sent([job_id])
        return job_id

    async def enqueue_many(
        self,
        task: str | Callable[..., Any],
        payloads: Iterable[Any],
        *,
        conn: AsyncConn | None = None,
        **options: Unpack[ManyOptions],
    ) -> list[JobId]:
        """Insert one job of `task` per payload, all in one transaction; their ids (each
        with its token, see `enqueue`), in order.  The options are `enqueue`'s but
        dedupe_key, unique_for and on_duplicate (see `enqueue.ManyOptions`).

        Each queue gets one notification however many jobs.  Every payload is
        checked before anything is sent, so a bad one refuses the whole batch.
        With `conn`, the jobs join that connection's open transaction.
        """
        job, encoded = self._many(task, payloads, options, "enqueue_many")
        if not encoded:
            return []
        with tracing.sending(job.queue, job.task, len(encoded)) as send:
            own = await self._given_or_own(conn)
            ids = await store.enqueue_many(own, send.traced(job), encoded)
            send.sent(ids)
        return ids

    def enqueue_many_sync(
        self,
        task: str | Callable[..., Any],
        payloads: Iterable[Any],
        *,
        conn: SyncConn | None = None,
        **options: Unpack[ManyOptions],
    ) -> list[JobId]:
        """`enqueue_many` for synchronous code (thread-safe); `conn` is a psycopg.Connection
        or a SQLAlchemy Session or Connection."""
        built, encoded = self._many(task, payloads, options, "enqueue_many_sync")
        if not encoded:
            return []
        with tracing.sending(built.queue, built.task, len(encoded)) as send:
            job = send.traced(built)
            if conn is not None:
                ids = store.enqueue_many_sync(sync_connection(conn), job, encoded)
            else:
                ids = self._on_own_sync_connection(
                    lambda own: store.enqueue_many_sync(own, job, encoded)
                )
            send.sent(ids)
        return ids

    def _on_own_sync_connection(self, call: Callable[[psycopg.Connection[Any]], R]) -> R:
        """Run `call` on the app's one sync connection, one thread at a time."""
        with self._sync_lock:
            if self._sync_conn is None or self._sync_conn.closed:
                self._sync_conn = store.connect_sync(resolve_dsn(self.dsn))
            return call(self._sync_conn)

    def _many(
        self,
        task: str | Callable[..., Any],
        payloads: Iterable[Any],
        options: ManyOptions,
        caller: str,
    ) -> tuple[store.NewJob, list[str]]:
        # ManyOptions is EnqueueOptions without the key options, which `accepts` refuses.
        every = cast(EnqueueOptions, options)
        job = enqueue.build(
            self.registry,
            task,
            None,
            every,
            accepts=enqueue.MANY_OPTIONS,
            caller=caller,
            with_payload=False,
        )
        return job, enqueue.encode_all(payloads, self.registry.get(job.task))

    async def _given_or_own(self, conn: AsyncConn | None) -> psycopg.AsyncConnection[Any]:
        if conn is None:
            return await self._async_connection()
        return await async_connection(conn)

    async def _async_connection(self) -> psycopg.AsyncConnection[Any]:
        loop = asyncio.get_running_loop()
        conn = self._async_conns.get(loop)
        if conn is None or conn.closed or conn.broken:
            # Two tasks asking at once would both connect, and one connection would leak.
            lock = self._async_locks.setdefault(loop, asyncio.Lock())
            async with lock:
                conn = self._async_conns.get(loop)
                if conn is None or conn.closed or conn.broken:
                    conn = await store.connect(
                        resolve_dsn(self.dsn), application_name="notifyq:enqueue"
                    )
                    self._async_conns[loop] = conn
        return conn

    # --- results

    async def wait(
        self,
        job_id: int,
        # The documented API: a job outliving it is not an error of the caller's scope.
        timeout: float | None = None,  # noqa: ASYNC109
        *,
        token: uuid.UUID | None = None,
    ) -> Any:
        """Wait until job `job_id` finishes; return what its handler returned (None if
        nothing), or raise JobFailed if it ended dead or cancelled.

        Driven by the status notifications (one LISTEN connection per event loop
        serves every wait on it), not by polling.  TimeoutError after `timeout`
        seconds; the job itself is not touched.  OperationRefused for an unknown id.

        The job is read with its token (`token`, else the one a JobId from
        `enqueue` carries) through notifyq.job_status, which the producer role may
        call; without a token, from the table (the worker role's right).
        """
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"timeout must be None or at least 0 seconds, got {timeout}")
        loop = asyncio.get_running_loop()
        waiters = self._waiters.get(loop)
        if waiters is None:

            async def read(jobs: dict[int, uuid.UUID | None]) -> list[results.Row]:
                return await store.wait_outcomes(await self._async_connection(), jobs)

            waiters = self._waiters[loop] = results.Waiters(resolve_dsn(self.dsn), read)
        return await waiters.wait(int(job_id), timeout, _token(job_id, token))

    def wait_sync(
        self, job_id: int, timeout: float | None = None, *, token: uuid.UUID | None = None
    ) -> Any:
        """`wait` for synchronous code: runs it on an event loop of its own (with
        connections of its own, closed when it returns)."""

        async def once() -> Any:
            try:
                return await self.wait(job_id, timeout, token=token)
            finally:
                await self.aclose(sync_too=False)

        return asyncio.run(once())

    async def status(self, job_id: int, *, token: uuid.UUID | None = None) -> JobStatus | None:
        """Where job `job_id` stands now: status, progress, result, error, times.  None if
        there is no such job (or the token is not its).

        With a token (`token`, else the one a JobId from `enqueue` carries) it reads
        through notifyq.job_status, which the producer role may call; without, from
        the table (the worker role's right).
        """
        conn = await self._async_connection()
        return await store.job_status(conn, int(job_id), _token(job_id, token))

    def status_sync(self, job_id: int, *, token: uuid.UUID | None = None) -> JobStatus | None:
        """`status` for synchronous code (thread-safe)."""
        key = _token(job_id, token)
        return self._on_own_sync_connection(
            lambda own: store.job_status_sync(own, int(job_id), key)
        )

    async def aclose(self, *, sync_too: bool = True) -> None:
        """Close the connections enqueue and wait opened (this event loop's, and the
        sync one)."""
        waiters = self._waiters.pop(asyncio.get_running_loop(), None)
        if waiters is not None:
            await waiters.close()
        conn = self._async_conns.pop(asyncio.get_running_loop(), None)
        if conn is not None:
            await conn.close()
        if sync_too:
            self.close()

    def close(self) -> None:
        """Close the sync connection, and the enqueue connections of event loops that are
        not running now (a test's that ended, say): aclose() can no longer reach those,
        and psycopg would warn when they are collected still open."""
        with self._sync_lock:
            if self._sync_conn is not None:
                self._sync_conn.close()
                self._sync_conn = None
        for loop, conn in list(self._async_conns.items()):
            if not loop.is_running():
                self._async_conns.pop(loop, None)
                conn.pgconn.finish()  # nothing in flight: its loop is not running

    # --- operations

    async def cancel(self, job_id: int) -> str:
        """Cancel a job (`notifyq.cancel_job`): a queued one never runs; a running one's
        handler is interrupted by the dispatcher running it.  Returns the status it had;
        raises OperationRefused for an unknown or finished job."""
        return await anyio.to_thread.run_sync(self.cancel_sync, job_id)

    def cancel_sync(self, job_id: int) -> str:
        """`cancel` for synchronous code."""
        return admin.cancel_job(resolve_dsn(self.dsn), job_id)

    async def reset_circuit_breaker(self, task: str) -> str:
        """Close `task`'s circuit breaker now (`notifyq.reset_circuit_breaker`): its held
        jobs start at once and the failures counted so far are forgotten.  Returns the
        state it had; raises OperationRefused for a task without a breaker."""
        return await anyio.to_thread.run_sync(self.reset_circuit_breaker_sync, task)

    def reset_circuit_breaker_sync(self, task: str) -> str:
        """`reset_circuit_breaker` for synchronous code."""
        return admin.reset_circuit_breaker(resolve_dsn(self.dsn), task)

    async def pause(self, queue: str, task: str | None = None) -> bool:
        """Pause `queue`, or only `task`'s jobs in it (`notifyq.pause_queue`): no
        dispatcher or SQL worker starts them until `resume`; running ones finish, and the
        queue's cap is kept.  False if it was paused already."""
        return await anyio.to_thread.run_sync(self.pause_sync, queue, task)

    def pause_sync(self, queue: str, task: str | None = None) -> bool:
        """`pause` for synchronous code."""
        return admin.pause_queue(resolve_dsn(self.dsn), queue, task)

    async def resume(self, queue: str, task: str | None = None) -> bool:
        """Lift the pause of `queue` (or of `task` in it: each pause is lifted by naming
        it as it was made); its dispatchers are woken at once.  False if it was not
        paused."""
        return await anyio.to_thread.run_sync(self.resume_sync, queue, task)

    def resume_sync(self, queue: str, task: str | None = None) -> bool:
        """`resume` for synchronous code."""
        return admin.resume_queue(resolve_dsn(self.dsn), queue, task)

    # --- schema and serving

    def migrate(self) -> int:
        """Install or upgrade the notifyq schema; returns the version now in place."""
        return migrate.migrate(resolve_dsn(self.dsn))[1]

    def worker(self, settings: Settings | None = None, *, dsn: str | None = None) -> Worker:
        """The dispatcher that serves this app's tasks and schedules (`serve` runs one)."""
        return Worker(
            self.registry, self.schedules, settings or Settings(), resolve_dsn(dsn or self.dsn)
        )

    def serve(
        self,
        settings: Settings | None = None,
        *,
        dsn: str | None = None,
        beside: Sequence[Callable[[], Coroutine[Any, Any, None]]] = (),
    ) -> int:
        """Run a dispatcher in this thread until SIGTERM/SIGINT, or until a one-shot
        run's end (`Settings.until_empty`, `max_jobs`, `max_runtime`).

        Returns the process exit status `notifyq serve` uses: 0, or 3 when
        `until_empty` was asked but `max_jobs` or `max_runtime` ended the run first.
        A plain `def` handler still running when the shutdown grace ran out
        cannot be interrupted (threads cannot be cancelled): its job has been
        handed back, and the process exits without waiting for the thread.

        `beside`: more work for the same event loop (`notifyq serve --web-port` runs the
        dashboard there), started with the dispatcher and cancelled once it has stopped.
        """
        worker = self.worker(settings, dsn=dsn)

        async def run() -> None:
            async with anyio.create_task_group() as tg:
                for task in beside:
                    tg.start_soon(task)
                await worker.run(handle_signals=True)
                tg.cancel_scope.cancel()

        anyio.run(run)
        if worker.pool.abandoned:
            log.warning("exiting with %d abandoned handler threads", worker.pool.abandoned)
            atexit._run_exitfuncs()
            logging.shutdown()
            os._exit(worker.exit_code)
        return worker.exit_code
