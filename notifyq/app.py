"""The composition root: `App` registers tasks and enqueues; `Worker` runs the pieces.

    listener ──wake──> dispatcher ──claim──> worker pool ──Finished──> completer
                           ^                                               │
                           └────────── slot freed / outcome written ───────┘
    lease keeper: renews what we hold, rescues what others lost

Only this module knows every piece; each piece knows only its neighbours'
callbacks.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import signal
import socket
import threading
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar, overload

import anyio
import psycopg

from . import embedded, enqueue, listener, migrate, store
from .completion import Completer
from .dispatcher import Dispatcher
from .errors import ConfigurationError
from .leases import LeaseKeeper
from .registry import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_QUEUE,
    Registry,
    Task,
    check_queue_name,
    check_task_name,
    describe_handler,
)
from .retry import Backoff
from .worker_pool import Finished, WorkerPool

log = logging.getLogger("notifyq")

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class Settings:
    """How a dispatcher runs; `notifyq serve --help` documents each one."""

    concurrency: int = 10
    queues: tuple[str, ...] | None = None  # None: 'default' and the queues of the app's tasks
    batch_size: int | None = None  # None: up to `concurrency` per claim
    poll_interval: float = 5.0
    lease: float = 30.0
    shutdown_timeout: float = 30.0
    listen: bool = True

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigurationError("concurrency must be at least 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigurationError("batch size must be at least 1")
        if self.poll_interval <= 0:
            raise ConfigurationError("poll interval must be positive")
        if self.lease < 1:
            raise ConfigurationError("lease must be at least 1 second")
        if self.shutdown_timeout < 0:
            raise ConfigurationError("shutdown timeout cannot be negative")
        for queue in self.queues or ():
            check_queue_name(queue)


def resolve_dsn(explicit: str | None = None) -> str:
    """--dsn / App(dsn=...), then NOTIFYQ_DSN, then a private server that is running."""
    dsn = explicit or os.environ.get("NOTIFYQ_DSN") or embedded.running_dsn()
    if not dsn:
        raise ConfigurationError(
            "no database configured: pass App(dsn=...) or --dsn, set NOTIFYQ_DSN, "
            "or start the private server with `notifyq serve`"
        )
    return dsn


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
        self._sync_conn: psycopg.Connection[Any] | None = None
        self._sync_lock = threading.Lock()
        # One cached connection per event loop (a connection cannot cross loops);
        # weak keys, so a closed loop's entry goes with it.
        self._async_conns: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, psycopg.AsyncConnection[Any]
        ] = weakref.WeakKeyDictionary()

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
    ) -> F | Callable[[F], F]:
        """Register a handler; the function itself is returned unchanged.

        The handler is called as `handler(payload)` or, if it takes a second
        positional parameter, `handler(payload, ctx)` with a `JobContext`.
        `async def` handlers run on the event loop; plain `def` handlers in
        worker threads.  `decode`, if given, turns the JSON payload into what
        the handler takes (a dataclass, say); if it raises, the job is dead
        with a PayloadError.
        """

        def register(fn: F) -> F:
            if not 1 <= max_attempts <= 1000:
                raise ConfigurationError("max_attempts must be from 1 to 1000")
            if timeout is not None and timeout <= 0:
                raise ConfigurationError("timeout must be positive")
            is_async, wants_context = describe_handler(fn)
            task_name = check_task_name(name or f"{fn.__module__}.{fn.__qualname__}")
            self.registry.add(
                Task(
                    name=task_name,
                    handler=fn,
                    queue=check_queue_name(queue),
                    max_attempts=max_attempts,
                    backoff=backoff or Backoff(),
                    timeout=timeout,
                    decode=decode,
                    is_async=is_async,
                    wants_context=wants_context,
                )
            )
            return fn

        return register(handler) if handler is not None else register

    # --- enqueue

    async def enqueue(
        self,
        task: str | Callable[..., Any],
        payload: Any = None,
        *,
        queue: str | None = None,
        priority: int | None = None,
        delay: float | None = None,
        run_at: datetime | None = None,
        max_attempts: int | None = None,
        conn: psycopg.AsyncConnection[Any] | None = None,
    ) -> int:
        """Insert a job and return its id.

        With `conn`, the INSERT joins that connection's open transaction: the
        job exists only if it commits.  Without, it commits on its own.
        """
        job = enqueue.build(
            self.registry,
            task,
            payload,
            queue=queue,
            priority=priority,
            delay=delay,
            run_at=run_at,
            max_attempts=max_attempts,
        )
        if conn is not None:
            return await store.enqueue(conn, job)
        return await store.enqueue(await self._async_connection(), job)

    def enqueue_sync(
        self,
        task: str | Callable[..., Any],
        payload: Any = None,
        *,
        queue: str | None = None,
        priority: int | None = None,
        delay: float | None = None,
        run_at: datetime | None = None,
        max_attempts: int | None = None,
        conn: psycopg.Connection[Any] | None = None,
    ) -> int:
        """`enqueue` for synchronous code (thread-safe); `conn` is a psycopg.Connection."""
        job = enqueue.build(
            self.registry,
            task,
            payload,
            queue=queue,
            priority=priority,
            delay=delay,
            run_at=run_at,
            max_attempts=max_attempts,
        )
        if conn is not None:
            return store.enqueue_sync(conn, job)
        with self._sync_lock:
            if self._sync_conn is None or self._sync_conn.closed:
                self._sync_conn = store.connect_sync(resolve_dsn(self.dsn))
            return store.enqueue_sync(self._sync_conn, job)

    async def _async_connection(self) -> psycopg.AsyncConnection[Any]:
        loop = asyncio.get_running_loop()
        conn = self._async_conns.get(loop)
        if conn is None or conn.closed or conn.broken:
            conn = await store.connect(resolve_dsn(self.dsn), application_name="notifyq:enqueue")
            self._async_conns[loop] = conn
        return conn

    async def aclose(self) -> None:
        """Close the connections enqueue opened."""
        conn = self._async_conns.pop(asyncio.get_running_loop(), None)
        if conn is not None:
            await conn.close()
        self.close()

    def close(self) -> None:
        with self._sync_lock:
            if self._sync_conn is not None:
                self._sync_conn.close()
                self._sync_conn = None

    # --- schema and serving

    def migrate(self) -> int:
        """Install or upgrade the notifyq schema; returns the version now in place."""
        return migrate.migrate(resolve_dsn(self.dsn))[1]

    def worker(self, settings: Settings | None = None, *, dsn: str | None = None) -> Worker:
        return Worker(self, settings or Settings(), resolve_dsn(dsn or self.dsn))

    def serve(self, settings: Settings | None = None, *, dsn: str | None = None) -> None:
        """Run a dispatcher in this thread until SIGTERM/SIGINT.

        A plain `def` handler still running when the shutdown grace ran out
        cannot be interrupted (threads cannot be cancelled): its job has been
        handed back, and the process exits without waiting for the thread.
        """
        worker = self.worker(settings, dsn=dsn)
        anyio.run(lambda: worker.run(handle_signals=True))
        if worker.pool.abandoned:
            log.warning("exiting with %d abandoned handler threads", worker.pool.abandoned)
            atexit._run_exitfuncs()
            logging.shutdown()
            os._exit(0)


class Worker:
    """One dispatcher process's machinery; `run()` until `stop()` or a signal."""

    def __init__(self, app: App, settings: Settings, dsn: str) -> None:
        if not len(app.registry):
            log.warning("the app registers no tasks: every job claimed will be dead")
        self.app = app
        self.settings = settings
        self.dsn = dsn
        self.claimant = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.queues = list(settings.queues or app.registry.queues())
        # (job id, attempt) claimed and whose outcome is not yet written: leases to keep.
        self.held: set[tuple[int, int]] = set()
        self.ready = anyio.Event()
        self._signalled = False
        self.listening = anyio.Event()
        self._stores = [store.Store(dsn, role) for role in ("claim", "complete", "leases")]
        claim_store, complete_store, lease_store = self._stores
        self.pool = WorkerPool(app.registry, settings.concurrency, self._finished)
        self.dispatcher = Dispatcher(
            claim_store,
            self.claimant,
            queues=self.queues,
            concurrency=settings.concurrency,
            batch_size=min(settings.batch_size or settings.concurrency, 1000),
            poll_interval=settings.poll_interval,
            lease=settings.lease,
            task_max_attempts={t.name: t.max_attempts for t in app.registry},
            default_max_attempts=DEFAULT_MAX_ATTEMPTS,
            submit=self._submit,
            held_ids=lambda: {job_id for job_id, _ in self.held},
        )
        self.completer = Completer(complete_store, self.claimant, self._written)
        self.leases = LeaseKeeper(
            lease_store,
            self.claimant,
            lease=settings.lease,
            heartbeat=settings.lease / 3,
            rescue_interval=min(settings.poll_interval, settings.lease / 2),
            held=lambda: self.held,
            on_rescued=self.dispatcher.wake,
        )

    def stop(self) -> None:
        """Begin a graceful shutdown: claim nothing more, let running jobs finish."""
        self.dispatcher.stop()

    def _submit(self, job: Any) -> None:
        self.held.add((job.id, job.attempt))
        self.pool.submit(job)

    def _finished(self, finished: Finished) -> None:
        self.dispatcher.slot_freed()
        self.completer.submit(finished)

    def _written(self, pairs: set[tuple[int, int]]) -> None:
        self.held -= pairs

    async def run(self, *, handle_signals: bool = False) -> None:
        s = self.settings
        log.info(
            "serving queues=%s concurrency=%d claimant=%s poll=%ss lease=%ss listen=%s",
            ",".join(self.queues),
            s.concurrency,
            self.claimant,
            s.poll_interval,
            s.lease,
            s.listen,
        )
        try:
            async with anyio.create_task_group() as background:
                if handle_signals:
                    background.start_soon(self._signals)
                if s.listen:
                    background.start_soon(self._listen)
                background.start_soon(self.leases.run)
                background.start_soon(self._summaries)
                async with anyio.create_task_group() as work:
                    await work.start(self.pool.run)
                    work.start_soon(self.completer.run)
                    self.ready.set()
                    await self.dispatcher.run()
                    await self._drain(work)
                background.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                for st in self._stores:
                    await st.close()
        log.info("stopped; since start: %s", self._totals_text(self._totals()))

    def _totals(self) -> dict[str, int]:
        decided = self.completer.decided
        return {
            "claimed": self.dispatcher.claimed,
            "succeeded": decided["succeeded"],
            "retried": decided["queued"],
            "dead": decided["dead"],
            "fenced": self.completer.fenced,
            "rescued": self.leases.rescued,
            "polls_with_work": self.dispatcher.polls_with_work,
        }

    @staticmethod
    def _totals_text(totals: dict[str, int]) -> str:
        return " ".join(f"{k}={v}" for k, v in totals.items())

    async def _summaries(self, every: float = 60.0) -> None:
        """One info line a minute while there is activity: what happened since the last."""
        last = self._totals()
        while True:
            await anyio.sleep(every)
            now = self._totals()
            delta = {k: now[k] - last[k] for k in now}
            if any(delta.values()):
                log.info(
                    "last %ds: %s running=%d", every, self._totals_text(delta), self.pool.running
                )
            last = now

    async def _drain(self, work: anyio.abc.TaskGroup) -> None:
        running = self.pool.running
        log.info(
            "stopping: claiming no more; waiting up to %ss for %d running jobs",
            self.settings.shutdown_timeout,
            running,
        )
        self.pool.signal_stopping()
        with anyio.move_on_after(self.settings.shutdown_timeout):
            await self.pool.wait_idle()
        self.pool.interrupt_all()  # what is still running is handed back
        self.pool.close()
        await self.pool.wait_idle()
        # Leases keep running meanwhile, so nothing we hold is rescued under us.
        self.completer.close(give_up_after=max(self.settings.shutdown_timeout, 5.0))

    async def _listen(self) -> None:
        await listener.listen(
            self.dsn, self.queues, self.dispatcher.wake, on_connected=self.listening.set
        )

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if not self._signalled:
                    self._signalled = True
                    log.info(
                        "received %s: shutting down gracefully (again to exit at once)",
                        signal.Signals(signum).name,
                    )
                    self.stop()
                else:
                    log.warning("second signal: exiting now; leases return running jobs later")
                    os._exit(128 + signum)
