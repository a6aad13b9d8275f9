"""OpenTelemetry (tracing.py): a PRODUCER span per enqueue, a CONSUMER span per attempt
linked to the enqueue's context, which travels in notifyq.jobs.trace_context, also when
another language wrote it; recorded by the SDK's in-memory exporter."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import psycopg
import pytest
from opentelemetry import baggage, context, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.util._once import Once
from psycopg import sql

import notifyq
from notifyq import migrate, store, tracing
from notifyq.job import Job
from tests.conftest import query
from tests.helpers import eventually, serving
from tests.test_security import _drop_roles

pytestmark = pytest.mark.anyio

# A W3C traceparent as another language's propagator writes it (the spec's example).
TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
SPAN_ID = 0xB7AD6B7169203331
FOREIGN = {
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "tracestate": "congo=t61rcWkgMzE",
}


def _reset_global_provider() -> None:
    # OpenTelemetry lets a process set its global provider once; its own tests reset
    # these two (opentelemetry-test-utils' reset_trace_globals), as this does, so no
    # other test runs with a provider set.
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The SDK configured as an application would: every finished span lands here."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _reset_global_provider()
    trace.set_tracer_provider(provider)
    try:
        yield exporter
    finally:
        provider.shutdown()
        _reset_global_provider()


def finished(exporter: InMemorySpanExporter, name: str, count: int = 1) -> list[ReadableSpan]:
    found = [s for s in exporter.get_finished_spans() if s.name == name]
    return found if len(found) >= count else []


def traceparent(span: ReadableSpan) -> str:
    """The W3C traceparent of `span`, as the default propagator writes it."""
    ctx = span.get_span_context()
    assert ctx is not None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


async def test_enqueue_and_attempt_spans_follow_the_messaging_conventions(
    dsn: str, spans: InMemorySpanExporter
) -> None:
    app = notifyq.App(dsn=dsn)
    tracer = trace.get_tracer("tests")

    @app.task(name="mail.send", queue="mail")
    async def send(payload: Any) -> None:
        with tracer.start_as_current_span("smtp"):
            pass

    @app.task(name="mail.render", queue="mail")
    def render(payload: Any) -> None:  # runs in a worker thread
        with tracer.start_as_current_span("template"):
            pass

    with tracer.start_as_current_span("POST /signup") as request:
        job_id = await app.enqueue(send, {"to": "ada"})
        sync_id = await anyio.to_thread.run_sync(lambda: app.enqueue_sync(render, {}))
        many = await app.enqueue_many(send, [{"to": "bo"}, {"to": "cy"}])
    async with serving(app, dsn, poll_interval=3600):
        processed = await eventually(lambda: finished(spans, "process mail", 4))
    await app.aclose()

    sent = finished(spans, "send mail")
    assert len(sent) == 3
    single, single_sync, batch = sent
    for span in sent:
        assert span.kind is SpanKind.PRODUCER
        assert span.parent is not None
        assert span.parent.span_id == request.get_span_context().span_id
        assert span.status.status_code is StatusCode.UNSET
    assert attributes(single) == {
        "messaging.system": "notifyq",
        "messaging.operation.name": "send",
        "messaging.operation.type": "send",
        "messaging.destination.name": "mail",
        "messaging.message.id": str(job_id),
        "notifyq.task": "mail.send",
    }
    assert attributes(single_sync)["messaging.message.id"] == str(sync_id)
    assert attributes(batch)["messaging.batch.message_count"] == 2
    assert "messaging.message.id" not in attributes(batch)

    # Each job stores its send span's context; the batch's jobs share the batch's.
    stored = dict(query(dsn, "SELECT id, trace_context FROM notifyq.jobs"))
    creators = {job_id: single, sync_id: single_sync, many[0]: batch, many[1]: batch}
    for jid, creator in creators.items():
        assert stored[jid] == {"traceparent": traceparent(creator)}

    by_id = {attributes(s)["messaging.message.id"]: s for s in processed}
    assert set(by_id) == {str(j) for j in creators}
    for jid, creator in creators.items():
        span = by_id[str(jid)]
        assert span.kind is SpanKind.CONSUMER
        # A link to the creation context, not a child of it: a trace of its own.
        assert [link.context.span_id for link in span.links] == [creator.get_span_context().span_id]
        assert span.links[0].context.trace_id == creator.get_span_context().trace_id
        assert span.parent is None
        assert span.context.trace_id != creator.get_span_context().trace_id
        assert span.status.status_code is StatusCode.UNSET
        task = "mail.render" if jid == sync_id else "mail.send"
        assert attributes(span) == {
            "messaging.system": "notifyq",
            "messaging.operation.name": "process",
            "messaging.operation.type": "process",
            "messaging.destination.name": "mail",
            "messaging.message.id": str(jid),
            "notifyq.task": task,
            "notifyq.attempt": 1,
            "notifyq.max_attempts": 5,
        }
    # Spans the handlers make are children of their attempt's, async and threaded alike.
    inner = {s.name: s for s in spans.get_finished_spans() if s.name in ("smtp", "template")}
    assert inner["template"].parent is not None
    assert inner["template"].parent.span_id == by_id[str(sync_id)].context.span_id
    smtp = [s for s in spans.get_finished_spans() if s.name == "smtp"]
    assert {s.parent.span_id for s in smtp if s.parent} == {
        by_id[str(j)].context.span_id for j in (job_id, *many)
    }


async def test_a_job_inserted_by_sql_with_a_traceparent_links_to_that_trace(
    dsn: str, spans: InMemorySpanExporter
) -> None:
    app = notifyq.App(dsn=dsn)
    done = anyio.Event()

    @app.task(name="report.build")
    async def build(payload: Any) -> None:
        done.set()

    # What a Node or Go producer writes: its propagator's fields, injected into a map.
    [(job_id,)] = query(
        dsn,
        "INSERT INTO notifyq.jobs (task, trace_context) VALUES ('report.build', %s::jsonb)"
        " RETURNING id",
        psycopg.types.json.Jsonb(FOREIGN),
    )
    async with serving(app, dsn, poll_interval=3600):
        [span] = await eventually(lambda: finished(spans, "process default"))
    assert done.is_set()
    assert attributes(span)["messaging.message.id"] == str(job_id)
    [link] = span.links
    assert (link.context.trace_id, link.context.span_id) == (TRACE_ID, SPAN_ID)
    assert link.context.trace_state.get("congo") == "t61rcWkgMzE"
    assert link.context.is_remote
    assert query(dsn, "SELECT status FROM notifyq.jobs WHERE id = %s", job_id) == [("succeeded",)]


def test_sql_workers_claim_the_trace_context_with_each_job(dsn: str) -> None:
    """notifyq.claim (Node, Go, any SQL worker) returns it, so they can continue the trace."""
    query(
        dsn,
        "INSERT INTO notifyq.jobs (task, trace_context) VALUES ('a.traced', %s::jsonb),"
        " ('a.plain', NULL)",
        psycopg.types.json.Jsonb(FOREIGN),
    )
    claimed = query(
        dsn, "SELECT task, trace_context FROM notifyq.claim('w', max_jobs => 10) ORDER BY task"
    )
    assert claimed == [("a.plain", None), ("a.traced", FOREIGN)]


async def test_a_failed_attempt_span_has_status_error_and_the_exception(
    dsn: str, spans: InMemorySpanExporter
) -> None:
    app = notifyq.App(dsn=dsn)

    @app.task(name="pay.charge", max_attempts=2, backoff=notifyq.Backoff(base=0, max_delay=0))
    async def charge(payload: Any) -> None:
        raise ValueError("card declined")

    job_id = await app.enqueue(charge, {})
    async with serving(app, dsn, poll_interval=0.05):
        failed = await eventually(lambda: finished(spans, "process default", 2))
    await app.aclose()
    [send] = finished(spans, "send default")
    assert sorted(attributes(s)["notifyq.attempt"] for s in failed) == [1, 2]
    for span in failed:
        assert span.status.status_code is StatusCode.ERROR
        assert span.status.description == "ValueError: card declined"
        assert attributes(span)["error.type"] == "builtins.ValueError"
        [event] = [e for e in span.events if e.name == "exception"]
        assert event.attributes is not None
        assert event.attributes["exception.type"] == "ValueError"
        assert event.attributes["exception.message"] == "card declined"
        # Every attempt links to the one enqueue.
        assert [link.context.span_id for link in span.links] == [send.context.span_id]
    assert query(dsn, "SELECT status FROM notifyq.jobs WHERE id = %s", job_id) == [("dead",)]


@pytest.mark.parametrize(
    "stored",
    [
        {"traceparent": "garbage"},
        {"traceparent": "00-00000000000000000000000000000000-0000000000000000-01"},
        {"traceparent": "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01x"},
        {"uber-trace-id": "not ours"},
        {},
    ],
)
async def test_a_bad_trace_context_is_ignored_and_the_job_runs(
    dsn: str, spans: InMemorySpanExporter, stored: dict[str, str]
) -> None:
    app = notifyq.App(dsn=dsn)

    @app.task(name="x.run")
    async def run(payload: Any) -> str:
        return "ran"

    [(job_id,)] = query(
        dsn,
        "INSERT INTO notifyq.jobs (task, trace_context) VALUES ('x.run', %s::jsonb) RETURNING id",
        psycopg.types.json.Jsonb(stored),
    )
    async with serving(app, dsn, poll_interval=3600):
        [span] = await eventually(lambda: finished(spans, "process default"))
    assert span.links == ()
    assert span.status.status_code is StatusCode.UNSET
    assert query(dsn, "SELECT status, result FROM notifyq.jobs WHERE id = %s", job_id) == [
        ("succeeded", "ran")
    ]


@pytest.mark.parametrize(
    "stored", [None, [1, 2], "00-0af7", {"traceparent": 7}, {"traceparent": ["x"]}, {1: "x"}]
)
async def test_what_the_schema_would_refuse_is_ignored_too(
    spans: InMemorySpanExporter, stored: Any
) -> None:
    """A job's trace_context is read defensively: whatever it holds, no link, no error."""
    tracer = tracing.tracer()
    assert tracer is not None
    job = Job(1, "q", "t", {}, 1, 5, trace_context=stored)

    async def attempt() -> str:
        return "ok"

    assert await tracing.processing(tracer, job, attempt()) == "ok"
    [span] = spans.get_finished_spans()
    assert span.links == ()


@pytest.mark.parametrize(
    "value",
    [
        '["00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"]',
        '"traceparent"',
        '{"traceparent": 1}',
        '{"tracestate": {"congo": "t61rcWkgMzE"}}',
        '{"baggage": "%s"}' % ("b" * 4100),
    ],
)
def test_the_schema_refuses_a_non_object_or_oversized_trace_context(dsn: str, value: str) -> None:
    with pytest.raises(psycopg.errors.CheckViolation) as caught:
        query(dsn, "INSERT INTO notifyq.jobs (task, trace_context) VALUES ('t', %s)", value)
    assert caught.value.diag.constraint_name == "jobs_trace_context_valid"
    # The largest carrier a propagator writes fits: W3C's tracestate limit and some baggage.
    query(
        dsn,
        "INSERT INTO notifyq.jobs (task, trace_context) VALUES ('t', %s::jsonb)",
        psycopg.types.json.Jsonb(
            {**FOREIGN, "tracestate": "k=" + "v" * 510, "baggage": "b" * 3000}
        ),
    )


async def test_the_schema_refusal_reaches_the_caller_as_invalid_job(dsn: str) -> None:
    app = notifyq.App(dsn=dsn)
    with pytest.raises(notifyq.InvalidJob, match="trace_context must be a JSON object"):
        await store.enqueue(
            await app._async_connection(),
            store.NewJob("t", "{}", "default", 0, 0.0, None, None, trace_context='"no"'),
        )
    await app.aclose()


async def test_a_baggage_too_large_to_store_keeps_the_traceparent(
    dsn: str, spans: InMemorySpanExporter
) -> None:
    app = notifyq.App(dsn=dsn)
    token = context.attach(baggage.set_baggage("big", "x" * 5000))
    try:
        job_id = await app.enqueue("big.one", {})
    finally:
        context.detach(token)
    await app.aclose()
    [(stored,)] = query(dsn, "SELECT trace_context FROM notifyq.jobs WHERE id = %s", job_id)
    [send] = finished(spans, "send default")
    assert stored == {"traceparent": traceparent(send)}


async def test_a_deduplicated_enqueue_leaves_the_first_trace_context(
    dsn: str, spans: InMemorySpanExporter
) -> None:
    app = notifyq.App(dsn=dsn)
    first = await app.enqueue("d.once", {}, dedupe_key="k")
    again = await app.enqueue("d.once", {}, dedupe_key="k")
    await app.aclose()
    assert first == again
    one, two = finished(spans, "send default", 2)
    assert "notifyq.deduplicated" not in attributes(one)
    assert attributes(two)["notifyq.deduplicated"] is True
    assert query(dsn, "SELECT trace_context->>'traceparent' FROM notifyq.jobs") == [
        (traceparent(one),)
    ]


async def test_a_failed_enqueue_span_records_the_error(
    dsn: str, spans: InMemorySpanExporter
) -> None:
    app = notifyq.App(dsn=dsn)
    with pytest.raises(notifyq.InvalidJob):
        await app.enqueue("e.deps", {}, depends_on=[10**12])  # no such job
    await app.aclose()
    [send] = finished(spans, "send default")
    assert send.status.status_code is StatusCode.ERROR
    assert attributes(send)["error.type"] == "notifyq.errors.InvalidJob"


async def test_without_a_provider_nothing_is_traced_or_stored(dsn: str) -> None:
    _reset_global_provider()
    assert tracing.tracer() is None
    app = notifyq.App(dsn=dsn)
    done = anyio.Event()

    @app.task(name="quiet.run")
    async def run(payload: Any) -> None:
        done.set()

    with trace.get_tracer("tests").start_as_current_span("request"):
        await app.enqueue(run, {})
    async with serving(app, dsn, poll_interval=3600):
        with anyio.fail_after(10):
            await done.wait()
    await app.aclose()
    assert query(dsn, "SELECT trace_context FROM notifyq.jobs") == [(None,)]


async def test_without_opentelemetry_installed_enqueue_and_attempts_work(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if opentelemetry-api were not installed: importing it fails.
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    monkeypatch.setattr(tracing, "_api", None)
    monkeypatch.setattr(tracing, "_absent", False)
    assert tracing.tracer() is None
    assert tracing._absent
    app = notifyq.App(dsn=dsn)
    done = anyio.Event()

    @app.task(name="bare.run")
    async def run(payload: Any) -> None:
        done.set()

    await app.enqueue(run, {})
    async with serving(app, dsn, poll_interval=3600):
        with anyio.fail_after(10):
            await done.wait()
    await app.aclose()
    assert query(dsn, "SELECT trace_context FROM notifyq.jobs") == [(None,)]


def test_migration_keeps_the_roles_grants_on_the_claim(empty_dsn: str) -> None:
    """Roles that `notifyq roles` set up before the trace_context migration: the producer
    may then set the column, and the worker still runs notifyq.claim_jobs, which the
    migration creates again (a function's grants go with it when it is dropped)."""
    [version] = [
        v
        for v, script in store.migration_scripts()
        if "ADD COLUMN IF NOT EXISTS trace_context" in script
    ]
    with psycopg.connect(empty_dsn) as conn:
        for v, script in store.migration_scripts():
            if v < version:
                store.apply_script(conn, v, script)
    tag = uuid.uuid4().hex[:10]
    producer, worker = f"nq_p_{tag}", f"nq_w_{tag}"
    claim_jobs = "notifyq.claim_jobs(text, text[], text[], integer, interval)"
    try:
        # What that release's roles script granted, in the parts that matter here.
        for statement in (
            "CREATE ROLE {p} NOLOGIN",
            "CREATE ROLE {w} NOLOGIN",
            "GRANT USAGE ON SCHEMA notifyq TO {p}, {w}",
            "GRANT INSERT (queue, task, payload, token) ON notifyq.jobs TO {p}",
            "GRANT EXECUTE ON FUNCTION " + claim_jobs + " TO {w}",
        ):
            query(
                empty_dsn,
                sql.SQL(statement)
                .format(p=sql.Identifier(producer), w=sql.Identifier(worker))
                .as_string(None),
            )
        assert migrate.migrate(empty_dsn)[1] >= version
        assert query(
            empty_dsn,
            "SELECT has_column_privilege(%s, 'notifyq.jobs', 'trace_context', 'INSERT'),"
            " has_column_privilege(%s, 'notifyq.jobs', 'trace_context', 'SELECT'),"
            " has_function_privilege(%s, %s, 'EXECUTE'),"
            " has_function_privilege('public', %s, 'EXECUTE')",
            producer,
            producer,
            worker,
            claim_jobs,
            claim_jobs,
        ) == [(True, False, True, False)]
    finally:
        _drop_roles(empty_dsn, [producer, worker])
