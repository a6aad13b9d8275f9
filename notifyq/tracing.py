"""OpenTelemetry spans for enqueues and attempts; the trace context a job carries.

The only module that imports OpenTelemetry, and only its API (`notifyq[otel]`),
on first use: without it installed nothing here does anything.  Spans go to the
global TracerProvider, so nothing is recorded or propagated until the
application configures one (the SDK, an exporter); until then an attempt costs
one lookup of the provider.

Following OpenTelemetry's semantic conventions for messaging (docs/tracing.md):

    App.enqueue*   "send {queue}"     PRODUCER  its context is the jobs' creation
                                                context, stored in trace_context
    an attempt     "process {queue}"  CONSUMER  links to the job's trace_context

The process span links to the creation context and is not its child (the
conventions' default): an attempt may run hours later, once per retry, or
from a job whose trace_context another language wrote, and a link keeps the
enqueuing request's trace short while a tracing UI still goes from one to the
other.  Its parent is the context the worker runs in (none under `notifyq
serve`), and spans the handler makes are its children.  messaging.system has
no registered value for a PostgreSQL queue: it is "notifyq".

trace_context comes from whoever inserted the job, in any language: it is read
defensively (a JSON object of strings, else ignored), and tracing never fails
an enqueue or an attempt.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Awaitable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from . import codec
from .job import Job, JobId

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

    from .store import NewJob

log = logging.getLogger("notifyq.tracing")

T = TypeVar("T")

SYSTEM = "notifyq"  # messaging.system: no registered value fits a PostgreSQL job queue
MAX_TRACE_CONTEXT = 3072
"""Bytes of JSON text at most that an enqueue stores: under the 4096 bytes of jsonb the
schema's jobs_trace_context_valid allows, whatever the number of fields.  A larger
carrier (a large baggage) keeps traceparent and tracestate only."""
_W3C = ("traceparent", "tracestate")


class _Api:
    """The OpenTelemetry API's modules, imported once."""

    def __init__(self) -> None:
        from opentelemetry import propagate, trace

        self.trace = trace
        self.propagate = propagate
        # Nobody configured a provider: spans would be no-ops, so none are made.
        self.unset = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
        self.provider: object = None
        self.tracer: Tracer | None = None
        # While no provider is set, get_tracer_provider() looks the environment up for
        # OTEL_PYTHON_TRACER_PROVIDER on every call: about 1 µs, most of what an
        # untraced attempt would pay here.  The module global that set_tracer_provider
        # writes answers the same question for a few nanoseconds; without it (a future
        # API), or with that variable set, the public function is asked.
        self.env_provider = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ
        self.has_global = hasattr(trace, "_TRACER_PROVIDER")


_api: _Api | None = None
_absent = False  # opentelemetry-api is not installed


def tracer() -> Tracer | None:
    """The global provider's tracer for notifyq, or None: no OpenTelemetry, or no
    provider configured (the cheap answer every attempt asks for)."""
    global _api, _absent
    api = _api
    if api is None:
        if _absent:
            return None
        try:
            api = _api = _Api()
        except ImportError:
            _absent = True
            return None
    if api.has_global and not api.env_provider and api.trace._TRACER_PROVIDER is None:
        return None
    provider = api.trace.get_tracer_provider()
    if isinstance(provider, api.unset):
        return None
    if provider is not api.provider:  # set (or replaced) since the last call
        api.tracer = provider.get_tracer("notifyq", _version())
        api.provider = provider
    return api.tracer


def _version() -> str | None:
    """notifyq's version, for the instrumentation scope (the package is not imported
    from here: it imports this module)."""
    try:
        return importlib.metadata.version("notifyq")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return None


class Sending:
    """What an enqueue gets from `sending`: the trace context to store with its jobs
    (JSON text, None when not traced), and `sent` to call with the ids inserted."""

    __slots__ = ("_span", "trace_context")

    def __init__(self, span: Span | None, trace_context: str | None) -> None:
        self._span = span
        self.trace_context = trace_context

    def traced(self, job: NewJob) -> NewJob:
        """`job` carrying this enqueue's trace context."""
        if self.trace_context is None:
            return job
        return replace(job, trace_context=self.trace_context)

    def sent(self, ids: Sequence[JobId]) -> None:
        if self._span is None:
            return
        if len(ids) == 1:
            self._span.set_attribute("messaging.message.id", str(ids[0]))
            if ids[0].token is None:
                # A dedupe_key found an unfinished job: nothing was inserted, and that
                # job keeps the trace context of the enqueue that made it.
                self._span.set_attribute("notifyq.deduplicated", True)


_UNTRACED = Sending(None, None)


@contextmanager
def sending(queue: str, task: str, count: int = 1) -> Iterator[Sending]:
    """The "send {queue}" span around an enqueue of `count` jobs of `task` (its own
    context, injected into their trace_context, is their creation context)."""
    tracer_ = tracer()
    if tracer_ is None:
        yield _UNTRACED
        return
    assert _api is not None
    attributes: dict[str, Any] = {
        "messaging.system": SYSTEM,
        "messaging.operation.name": "send",
        "messaging.operation.type": "send",
        "messaging.destination.name": queue,
        "notifyq.task": task,
    }
    if count != 1:
        attributes["messaging.batch.message_count"] = count
    with tracer_.start_as_current_span(
        f"send {queue}",
        kind=_api.trace.SpanKind.PRODUCER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield Sending(span, _carrier(_api))
        except BaseException as exc:
            _failed(span, exc)
            raise


def _carrier(api: _Api) -> str | None:
    """The current context (the send span's) as the configured propagator writes it,
    as JSON text of at most MAX_TRACE_CONTEXT bytes; None if nothing fits."""
    carrier: dict[str, str] = {}
    try:
        api.propagate.inject(carrier)
    except Exception:  # a third-party propagator's bug must not fail the enqueue
        log.debug("the propagator failed to inject the trace context", exc_info=True)
        return None
    fields = {k: v for k, v in carrier.items() if isinstance(k, str) and isinstance(v, str)}
    for candidate in (fields, {k: v for k, v in fields.items() if k in _W3C}):
        if candidate:
            text = codec.dumps(candidate)
            if len(text.encode()) <= MAX_TRACE_CONTEXT:
                return text
    return None


async def processing(tracer_: Tracer, job: Job, attempt: Awaitable[T]) -> T:
    """Await `attempt` (the handler's run of `job`) inside its "process {queue}" span,
    linked to the job's trace_context; an exception is recorded on it, status ERROR."""
    assert _api is not None
    link = _creation_link(_api, job.trace_context)
    with tracer_.start_as_current_span(
        f"process {job.queue}",
        kind=_api.trace.SpanKind.CONSUMER,
        attributes={
            "messaging.system": SYSTEM,
            "messaging.operation.name": "process",
            "messaging.operation.type": "process",
            "messaging.destination.name": job.queue,
            "messaging.message.id": str(job.id),
            "notifyq.task": job.task,
            "notifyq.attempt": job.attempt,
            "notifyq.max_attempts": job.max_attempts,
        },
        links=link,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            return await attempt
        except anyio.get_cancelled_exc_class():
            # Shutdown interrupted it, or an operator cancelled the job: nothing failed.
            span.set_attribute("notifyq.interrupted", True)
            raise
        except BaseException as exc:
            _failed(span, exc)
            raise


def _failed(span: Span, exc: BaseException) -> None:
    assert _api is not None
    span.record_exception(exc)
    span.set_status(_api.trace.Status(_api.trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
    span.set_attribute("error.type", f"{type(exc).__module__}.{type(exc).__qualname__}")


def _creation_link(api: _Api, trace_context: Any) -> list[Any]:
    """A link to the context a producer stored with the job, if it holds a valid one;
    anything else (not an object, fields that are not strings, a malformed
    traceparent) gives no link."""
    if not isinstance(trace_context, dict) or not trace_context:
        return []
    carrier = {k: v for k, v in trace_context.items() if isinstance(k, str) and isinstance(v, str)}
    try:
        context = api.propagate.extract(carrier)
    except Exception:
        log.debug("job trace_context not understood: %r", trace_context, exc_info=True)
        return []
    span_context = api.trace.get_current_span(context).get_span_context()
    if not span_context.is_valid:
        return []
    return [api.trace.Link(span_context)]
