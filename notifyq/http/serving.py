"""What one dispatcher serves over HTTP: the app's declared endpoints and the table's.

Before the first claim, `start` binds the endpoints the app declared
(`App.http_task`) to this dispatcher's session (a secret they name must be set, or
the dispatcher does not start) and reads notifyq.endpoints; `reload` reads it again
when a change is announced on notifyq_internal, after a reconnect, and every
RELOAD_EVERY seconds (a notification may be lost).  A row for a task the app
declares in Python is ignored (the declaration wins, and a warning says so); a row
that cannot be served (a secret not set, a reserved header, httpx missing) is
logged as an error and its jobs wait, while every other task is served.

The served registry is the dispatcher's own copy of the app's: rows come there, never
in the app's.  A row that goes is no longer claimed, but its handler stays, for a job
a claim sent before the reload took (it would be dead as an unknown task otherwise).
Each change hands the new list of task names to `on_tasks` (the claim's list and the
dispatcher's registration).

Per-endpoint caps (`max_concurrency`) are per dispatcher: `rooms()` tells how many more
attempts each capped endpoint may take, which bounds the claim (a full one is left out);
a queue cap (`notifyq cap`) is the one that holds across dispatchers.
"""

from __future__ import annotations

import importlib.util
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

import anyio

from ..errors import ConfigurationError, NotifyqError
from ..registry import Registry, Task
from ..store import Store
from .endpoints import Endpoint, Secrets, endpoint

if TYPE_CHECKING:  # delivery.py imports httpx: loaded only when an HTTP task is served
    from .delivery import Session

log = logging.getLogger("notifyq.http")

RELOAD_EVERY = 30.0  # seconds between two reads of notifyq.endpoints without a change heard
HTTPX_MISSING = (
    "HTTP tasks need httpx, which is not installed: pip install 'notifyq[http]' "
    "(in the environment notifyq runs from)"
)


def httpx_installed() -> bool:
    return importlib.util.find_spec("httpx") is not None


def declared(registry: Registry) -> dict[str, Endpoint]:
    """The endpoints of the HTTP tasks the app declared (App.http_task)."""
    found: dict[str, Endpoint] = {}
    for task in registry:
        endpoint_of = getattr(task.handler, "endpoint", None)
        if isinstance(endpoint_of, Endpoint):
            found[task.name] = endpoint_of
    return found


def check_secrets(registry: Registry, secrets: Secrets) -> None:
    """Every secret the app's HTTP tasks name is set: ConfigurationError naming the
    variable otherwise, before the dispatcher builds anything."""
    for ep in declared(registry).values():
        if ep.secret is not None:
            secrets.keys(ep.secret)


class HttpServing:
    def __init__(
        self,
        registry: Registry,
        store: Store,
        claimant: str,
        secrets: Secrets,
        concurrency: int,
        on_tasks: Callable[[list[str]], None],
        on_room: Callable[[], None],
        observe: Callable[[str, str, float], None] | None = None,
    ) -> None:
        self.registry = registry  # the dispatcher's copy: rows are added and removed here
        self._store = store
        self._claimant = claimant
        self._secrets = secrets
        self._concurrency = concurrency
        self._on_tasks = on_tasks
        self._on_room = on_room
        self._observe = observe
        self._declared = declared(registry)
        self._from_table: dict[str, Endpoint] = {}
        # Rows gone from the table: no longer claimed, but their handlers stay, so a job
        # claimed just before the reload is still delivered (not dead as an unknown task).
        self._retired: set[str] = set()
        self._rows_refused: dict[str, str] = {}  # task -> why, logged once per reason
        self._caps: dict[str, int] = {}  # task -> its endpoint's max_concurrency
        # Attempts claimed and not finished, per HTTP task (capped or not: a cap a reload
        # adds counts the requests already in flight).
        self._http: set[str] = set()
        self._held: Counter[str] = Counter()
        self._changed = anyio.Event()
        self._listening = False  # changes are announced to us (the listener vouches)
        self._table_readable = True
        self._session: Session | None = None

    @property
    def tasks(self) -> list[str]:
        return sorted(t.name for t in self.registry if t.name not in self._retired)

    async def start(self) -> None:
        """Bind the declared endpoints and read the table, before the first claim."""
        if self._declared:
            session = self._open()
            for ep in self._declared.values():
                self._put(ep, session)  # a secret not set: ConfigurationError, serve fails
        await self.reload()

    async def aclose(self) -> None:
        if self._session is not None:
            with anyio.CancelScope(shield=True):
                await self._session.aclose()

    def changed(self) -> None:
        """notifyq.endpoints changed, or the listener reconnected: read it again."""
        self._changed.set()

    def heard(self, listening: bool) -> None:
        """Whether changes of notifyq.endpoints are announced to us (the listener is up)."""
        self._listening = listening

    async def watch(self) -> None:
        """Reload on every change heard, and every RELOAD_EVERY seconds while changes may
        go unheard (not listening: the table's trigger notifies)."""
        while True:
            with anyio.move_on_after(RELOAD_EVERY):
                await self._changed.wait()
            if not self._changed.is_set() and self._listening:
                continue
            self._changed = anyio.Event()
            await self.reload()

    async def reload(self) -> None:
        try:
            rows = await self._store.endpoints()
        except NotifyqError as exc:
            # A role without SELECT on the table (roles granted before version 12 and not
            # granted again) still serves its Python tasks.
            if self._table_readable:
                log.warning("could not read notifyq.endpoints (%s); serving the app's tasks", exc)
            self._table_readable = False
            return
        self._table_readable = True
        wanted: dict[str, Endpoint] = {}
        for row in rows:
            if row.task in self._declared or (
                self.registry.get(row.task) is not None
                and row.task not in self._from_table
                and row.task not in self._retired
            ):
                # The app's declaration (App.http_task or @app.task) wins over the row.
                self._refuse(row.task, "the app declares this task: the app's wins")
                continue
            try:
                ep = endpoint(
                    row.task,
                    row.url,
                    timeout=row.timeout,
                    max_concurrency=row.max_concurrency,
                    headers=row.headers if isinstance(row.headers, Mapping) else None,
                    secret=row.secret,
                )
                if not httpx_installed():
                    raise ConfigurationError(HTTPX_MISSING)
                if ep.secret is not None:
                    self._secrets.keys(ep.secret)  # names the variable to set
            except ConfigurationError as exc:
                self._refuse(row.task, str(exc), error=True)
                continue
            self._rows_refused.pop(row.task, None)
            wanted[row.task] = ep
        if wanted == self._from_table:
            return
        session = self._open() if wanted else None
        for task in set(self._from_table) - set(wanted):
            self._retired.add(task)
            log.info("HTTP task %s: no longer in notifyq.endpoints, not served", task)
        for ep in wanted.values():
            if self._from_table.get(ep.task) != ep:
                assert session is not None
                self._put(ep, session)
                self._retired.discard(ep.task)
                log.info("HTTP task %s: serving from notifyq.endpoints (%s)", ep.task, _url(ep))
        self._from_table = wanted
        self._on_tasks(self.tasks)

    def _refuse(self, task: str, why: str, *, error: bool = False) -> None:
        if self._rows_refused.get(task) == why:
            return
        self._rows_refused[task] = why
        if error:
            log.error("HTTP task %s in notifyq.endpoints is not served: %s", task, why)
        else:
            log.warning("HTTP task %s: the row in notifyq.endpoints is ignored: %s", task, why)

    def _open(self) -> Session:
        if self._session is None:
            from .delivery import Session

            self._session = Session(self._claimant, self._secrets, self._concurrency, self._observe)
        return self._session

    def _put(self, ep: Endpoint, session: Session) -> None:
        old = self.registry.get(ep.task)
        handler = session.bind(ep)
        if old is None:  # a row's task: the job's max_attempts, the backoff in notifyq.tasks
            self.registry.put(Task(ep.task, handler, is_async=True, wants_context=True))
        else:  # declared in the app: its settings, bound to this dispatcher's session
            self.registry.put(replace(old, handler=handler))
        self._http.add(ep.task)
        if ep.max_concurrency is None:
            self._caps.pop(ep.task, None)
        else:
            self._caps[ep.task] = ep.max_concurrency

    # --- per-endpoint caps: the dispatcher's claim leaves full endpoints' tasks out

    def claimed(self, task: str) -> None:
        if task in self._http:
            self._held[task] += 1

    def released(self, task: str) -> None:
        if task not in self._held:
            return
        cap = self._caps.get(task)
        self._held[task] -= 1
        if self._held[task] <= 0:
            del self._held[task]
        if cap is not None and self._held[task] == cap - 1:
            self._on_room()  # it was full: its jobs may be claimed again

    def rooms(self) -> dict[str, int]:
        """Capped tasks -> attempts their endpoint may still take (0: full); the claim
        takes no more than that of each."""
        if not self._caps:
            return {}
        return {t: max(cap - self._held[t], 0) for t, cap in self._caps.items()}


def _url(ep: Endpoint) -> str:
    from .delivery import shown

    return shown(ep.url)
