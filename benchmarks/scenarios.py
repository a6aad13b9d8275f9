"""The scenarios, identical for every system; each returns {metric: value}.

Each run gets a fresh database with only that system's schema.  Producers
enqueue with plain SQL (each system's own INSERT); workers run in their own
process (procs.py) and stamp each handler start, so latency is measured
from the producer's commit to the handler's first line.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from . import meters, procs, server
from .systems import System


@dataclass(frozen=True)
class Sizes:
    drain_jobs: int = 20_000
    drain_concurrency: tuple[int, ...] = (10, 50, 200)
    enqueue_slices: int = 10  # paired on/off slices
    enqueue_slice: float = 0.5  # seconds
    contended_producers: int = 32
    contended_slices: int = 5
    contended_slice: float = 1.0
    draining_backlog: int = 200_000  # jobs the worker drains while the producers insert
    draining_concurrency: int = 50
    bulk_rows: int = 10_000
    latency_seconds: float = 10.0
    latency_interval: float = 0.010
    steady_rate: float = 500.0
    steady_seconds: float = 20.0
    steady_concurrency: int = 50
    idle_seconds: float = 30.0
    scale_queued: int = 1_000_000  # filler: queued, due in ten years
    scale_finished: int = 2_000_000  # filler: succeeded a day ago
    scale_concurrency: int = 50
    crowd_rows: int = 1_000_000  # other queued jobs, due now: half another queue's, half ours
    cap: float = 60.0  # seconds a drain (or steady's backlog) may take before it is cut short


QUICK = Sizes(
    drain_jobs=2_000,
    drain_concurrency=(50,),
    enqueue_slices=3,
    enqueue_slice=0.2,
    bulk_rows=2_000,
    contended_slices=2,
    contended_slice=0.3,
    draining_backlog=20_000,
    latency_seconds=2.0,
    steady_seconds=3.0,
    idle_seconds=6.0,
    scale_queued=50_000,
    scale_finished=100_000,
    crowd_rows=50_000,
    cap=15.0,
)

Result = dict[str, float]
NOTES: dict[str, str] = {}  # scenario -> how it was measured (printed under the table)


def connect(dsn: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(dsn, autocommit=True)


def _done(system: System, conn: psycopg.Connection[tuple[object, ...]]) -> bool:
    row = conn.execute(system.pending).fetchone()
    return row is not None and not row[0]


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def _warm_up(system: System, w: procs.Worker, conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """One job through the worker, so what follows measures it idle, not starting."""
    row = conn.execute(system.insert_one).fetchone()
    assert row is not None
    job = int(row[0])  # type: ignore[call-overload]
    procs.wait(lambda: job in w.starts(), "the warm-up job", 120, w, interval=0.05)
    time.sleep(1.0)


def drain(
    system: System,
    dsn: str,
    work: Path,
    sizes: Sizes,
    concurrency: int,
    label: str = "drain",
    statements: bool | None = None,
) -> Result:
    """Jobs pre-loaded, then one worker: first handler start to the last job finished.

    A drain still running after `sizes.cap` seconds is cut short: the rate is then
    the jobs started by that time, and a note says so.  With `statements` not None,
    also what each job cost (meters.py): WAL bytes, statements (pg_stat_statements
    when `statements`, else transactions) and CPU of the worker and its backends.
    """
    jobs = sizes.drain_jobs
    costs: dict[str, float] = {}
    with connect(dsn) as conn:
        # The checkpoint first, so the next one falls after the drain: WAL per job is
        # then the records the system writes, not full-page images of a fresh checkpoint.
        _checkpoint(conn)
        conn.execute(system.insert_bulk, {"n": jobs})
        # The whole database: autovacuum would otherwise find the fresh schema's catalog
        # rows during the drain, and its WAL and transactions would count as the system's.
        conn.execute("VACUUM ANALYZE")
        meter = meters.RunMeter(conn, statements) if statements is not None else None

        def all_done() -> bool:
            return _done(system, conn)

        pending = all_done
        if meter is not None:
            meter.begin()
            pending = meter.counted(all_done)
        with procs.worker(system.name, dsn, work, "--concurrency", str(concurrency)) as w:
            procs.wait(lambda: w.count() > 0, "the first job to start", 120, w, interval=0.005)
            if meter is not None:
                meter.first_start()
            finished = procs.reached(pending, sizes.cap, w)
            end = time.time()
            if meter is not None:
                costs = meter.end(w)
            # A system that deletes a job as it claims it is done before the handler ran.
            if finished:
                procs.reached(lambda: w.count() >= jobs, 10, w)
            starts = w.starts()
        if meter is not None:
            costs |= meter.after_stop()
    first = min(starts.values())
    end = max(end, *starts.values())
    if not finished:
        _note(
            f"{label} {system.name}",
            f"cut at {sizes.cap:.0f} s, {len(starts):,} of {jobs:,} started",
        )
        done = len(starts)
    elif len(starts) < jobs:
        raise procs.RunFailed(f"only {len(starts)} of {jobs} jobs started")
    else:
        done = jobs
    out = {"jobs/s": done / (end - first)}
    if "wal" in costs:
        out["WAL B/job"] = costs["wal"] / done
    if "statements" in costs:
        out["statements/job"] = costs["statements"] / done
    if "xacts" in costs:
        out["xacts/job"] = costs["xacts"] / done
    if "cpu" in costs:
        out["worker CPU us/job"] = costs["cpu"] / done * 1e6
    if "server cpu" in costs:
        out["server CPU us/job"] = costs["server cpu"] / done * 1e6
    return out


def _note(key: str, text: str) -> None:
    NOTES[key] = f"{NOTES[key]}; {text}" if key in NOTES else text


def _table(system: System) -> sql.Composed:
    return sql.SQL(".").join(sql.Identifier(p) for p in system.table.split("."))


def _triggers(system: System, conn: psycopg.Connection[tuple[object, ...]], on: bool) -> None:
    _set_triggers(system, conn, system.notify_triggers, on)


def _set_triggers(
    system: System, conn: psycopg.Connection[tuple[object, ...]], names: tuple[str, ...], on: bool
) -> None:
    verb = sql.SQL("ENABLE" if on else "DISABLE")
    for name in names:
        trigger = sql.SQL("USER") if name == "USER" else sql.Identifier(name)
        conn.execute(sql.SQL("ALTER TABLE {} {} TRIGGER {}").format(_table(system), verb, trigger))


def enqueue(system: System, dsn: str, work: Path, sizes: Sizes) -> Result:
    """One producer; notify triggers on and off alternate in short slices (paired)."""
    rates: dict[str, list[float]] = {"on": [], "off": [], "bulk on": [], "bulk off": []}
    with connect(dsn) as conn:
        for _ in range(sizes.enqueue_slices):
            for state in ("on", "off"):
                _triggers(system, conn, state == "on")
                n, t0 = 0, time.monotonic()
                while time.monotonic() - t0 < sizes.enqueue_slice:
                    conn.execute(system.insert_one)
                    n += 1
                rates[state].append(n / (time.monotonic() - t0))
                t0 = time.monotonic()
                conn.execute(system.insert_bulk, {"n": sizes.bulk_rows})
                rates[f"bulk {state}"].append(sizes.bulk_rows / (time.monotonic() - t0))
        _triggers(system, conn, True)
    m = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "1 on/s": m["on"],
        "1 off/s": m["off"],
        "1 on/off %": 100 * m["on"] / m["off"],
        "bulk on/s": m["bulk on"],
        "bulk off/s": m["bulk off"],
        "bulk on/off %": 100 * m["bulk on"] / m["bulk off"],
    }


def contended(system: System, dsn: str, work: Path, sizes: Sizes) -> Result:
    """Many producers, each its own connection and thread, one autocommit INSERT at a time."""
    return _contended(system, dsn, sizes, system.notify_triggers)


def contended_draining(system: System, dsn: str, work: Path, sizes: Sizes) -> Result:
    """`contended` while a worker drains a backlog: the realistic case in which nobody
    needs waking.  Off: the insert's notify trigger only (the worker's own triggers keep
    firing in both halves)."""
    with connect(dsn) as conn:
        conn.execute(system.insert_bulk, {"n": sizes.draining_backlog})
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(_table(system)))
        args = ("--concurrency", str(sizes.draining_concurrency))
        with procs.worker(system.name, dsn, work, *args) as w:
            procs.wait(lambda: w.count() > 0, "the first job to start", 120, w)
            before = _wakeups(conn)
            result = _contended(system, dsn, sizes, system.insert_notify_triggers, w)
            after = _wakeups(conn)
            left = conn.execute(system.pending).fetchone()
            started = w.count()
    if not (left and left[0]):
        _note(f"contended-draining {system.name}", "the backlog ran out during the run")
    result["drained/s"] = started / result.pop("seconds")
    if before is not None and after is not None:
        result["skipped %"] = 100 * (after[1] - before[1]) / max(1, sum(after) - sum(before))
    return result


def _wakeups(conn: psycopg.Connection[tuple[object, ...]]) -> tuple[int, int] | None:
    """notifyq's counts of inserts that notified and that skipped it (None: none kept)."""
    row = conn.execute("SELECT to_regclass('notifyq.wakeups_sent') IS NOT NULL").fetchone()
    if not (row and row[0]):
        return None
    row = conn.execute(
        "SELECT (SELECT last_value FROM notifyq.wakeups_sent),"
        " (SELECT last_value FROM notifyq.wakeups_skipped)"
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])  # type: ignore[call-overload]


def _contended(
    system: System,
    dsn: str,
    sizes: Sizes,
    triggers: tuple[str, ...],
    w: procs.Worker | None = None,
) -> Result:
    from concurrent.futures import ThreadPoolExecutor

    def produce(conn: psycopg.Connection[tuple[object, ...]], until: float) -> int:
        n = 0
        while time.monotonic() < until:
            conn.execute(system.insert_one)
            n += 1
        return n

    k = sizes.contended_producers
    rates: dict[str, list[float]] = {"on": [], "off": []}
    conns = [connect(dsn) for _ in range(k)]
    began = time.monotonic()
    try:
        with connect(dsn) as admin, ThreadPoolExecutor(k) as pool:
            for _ in range(sizes.contended_slices):
                for state in ("on", "off"):
                    _set_triggers(system, admin, triggers, state == "on")
                    t0 = time.monotonic()
                    until = t0 + sizes.contended_slice
                    total = sum(pool.map(produce, conns, [until] * k))
                    rates[state].append(total / (time.monotonic() - t0))
                    if w is not None:
                        w.check()
            _set_triggers(system, admin, triggers, True)
    finally:
        for c in conns:
            c.close()
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    return (
        {
            f"{k} on/s": on,
            f"{k} off/s": off,
            "on/off %": 100 * on / off,
            "seconds": time.monotonic() - began,
        }
        if w is not None
        else {f"{k} on/s": on, f"{k} off/s": off, "on/off %": 100 * on / off}
    )


def _offer(
    system: System,
    dsn: str,
    rate: float,
    seconds: float,
    producers: int = 1,
) -> dict[int, float]:
    """`rate` jobs/s by plain SQL, spread over producers with a connection each.

    Returns job id -> unix time its INSERT committed (autocommit: when execute returns).
    """
    from concurrent.futures import ThreadPoolExecutor

    def produce(offset: float) -> dict[int, float]:
        committed: dict[int, float] = {}
        interval = producers / rate
        with connect(dsn) as conn:
            next_at = start + offset * interval / producers
            while next_at < end:
                time.sleep(max(0.0, next_at - time.monotonic()))
                row = conn.execute(system.insert_one).fetchone()
                assert row is not None
                committed[int(row[0])] = time.time()  # type: ignore[call-overload]
                next_at += interval
        return committed

    start = time.monotonic() + 0.1
    end = start + seconds
    out: dict[int, float] = {}
    with ThreadPoolExecutor(producers) as pool:
        for part in pool.map(produce, range(producers)):
            out.update(part)
    return out


def _waits(committed: dict[int, float], starts: dict[int, float]) -> list[float]:
    return [(starts[i] - committed[i]) * 1000 for i in committed]


def latency(
    system: System, dsn: str, work: Path, sizes: Sizes, worker_args: tuple[str, ...] = ()
) -> Result:
    """Worker idle and listening; one job every 10 ms; handler start minus commit."""
    with connect(dsn) as conn, procs.worker(system.name, dsn, work, *worker_args) as w:
        _warm_up(system, w, conn)
        committed = _offer(system, dsn, 1 / sizes.latency_interval, sizes.latency_seconds)
        procs.wait(lambda: w.count() > len(committed), "every job to start", 120, w)
        ms = _waits(committed, w.starts())
    return {
        "p50 ms": _pct(ms, 50),
        "p95 ms": _pct(ms, 95),
        "p99 ms": _pct(ms, 99),
        "max ms": max(ms),
    }


def steady(system: System, dsn: str, work: Path, sizes: Sizes) -> Result:
    """A fixed offered rate with a 5 ms async handler: does it keep up, and how fast.

    Four producers share the rate (one alone cannot commit 500 single-row
    transactions a second with fsync on a busy 2-core machine).  After the
    offer ends, the backlog gets up to `sizes.cap` seconds to finish.
    """
    args = ("--concurrency", str(sizes.steady_concurrency), "--handler", "sleep")
    with connect(dsn) as conn, procs.worker(system.name, dsn, work, *args) as w:
        _warm_up(system, w, conn)
        t0 = time.monotonic()
        committed = _offer(system, dsn, sizes.steady_rate, sizes.steady_seconds, producers=4)
        offered = len(committed) / (time.monotonic() - t0)
        finished = procs.reached(lambda: _done(system, conn), sizes.cap, w)
        if finished:  # a system that deletes a job as it claims it: the handler may follow
            procs.reached(lambda: len(committed.keys() - w.starts().keys()) == 0, 10, w)
        starts = w.starts()
        done = sum(1 for i in committed if i in starts) if not finished else len(committed)
        completed = done / (time.monotonic() - t0)
    if not finished:
        _note(
            f"steady {system.name}",
            f"{len(committed) - done:,} of {len(committed):,} jobs not started"
            f" {sizes.cap:.0f} s after the offer ended (percentiles: started jobs only)",
        )
    ms = [(starts[i] - committed[i]) * 1000 for i in committed if i in starts]
    return {
        "offered/s": offered,
        "completed/s": completed,
        "p50 ms": _pct(ms, 50),
        "p95 ms": _pct(ms, 95),
        "p99 ms": _pct(ms, 99),
    }


def idle(system: System, dsn: str, work: Path, sizes: Sizes, statements: bool) -> Result:
    """Statements an idle worker sends (pg_stat_statements, else committed transactions)
    and the WAL written meanwhile (the whole server's, see meters.py)."""
    # Both connect before tracking is switched on, so the harness's statements stay out.
    with connect(dsn) as conn, connect(dsn) as probe:
        if statements:
            meters.untrack(probe)
            meters.track_statements(conn)
        # Autovacuum would otherwise find the fresh schema's catalog rows in the window.
        conn.execute("VACUUM ANALYZE")
        with procs.worker(system.name, dsn, work) as w:
            _warm_up(system, w, conn)
            # So that autovacuum has no reason to write in the window: WAL is the server's.
            conn.execute("VACUUM ANALYZE")
            time.sleep(1.0)
            if statements:  # so the statement list below covers the idle window only
                probe.execute("SELECT pg_stat_statements_reset()")
            lsn = meters.wal_lsn(probe)
            wal_before = _statement_wal(probe) if statements else 0
            before = meters.statement_count(probe, statements)
            t0 = time.monotonic()
            time.sleep(sizes.idle_seconds)
            w.check()
            count = meters.statement_count(probe, statements) - before
            if not statements:  # the probe's own: the read of `before`, the forced flush
                count -= 2
            # The worker's own statements' WAL where pg_stat_statements tells it (autovacuum
            # and other databases write too); else the whole server's.
            wal = _statement_wal(probe) - wal_before if statements else meters.wal_since(probe, lsn)
            elapsed = time.monotonic() - t0
            if statements:
                NOTES[f"idle {system.name}"] = _top_statements(probe)
    return {
        "statements/s": count / elapsed,
        "per 5 s poll": count / elapsed * 5,
        "WAL B/min": wal / elapsed * 60,
    }


def _statement_wal(conn: psycopg.Connection[tuple[object, ...]]) -> int:
    """WAL bytes the tracked statements of this database wrote so far."""
    row = conn.execute(
        "SELECT coalesce(sum(wal_bytes), 0) FROM pg_stat_statements s"
        " JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = current_database()"
    ).fetchone()
    assert row is not None
    return int(row[0])  # type: ignore[call-overload]


def _top_statements(conn: psycopg.Connection[tuple[object, ...]]) -> str:
    rows = conn.execute(
        "SELECT calls, regexp_replace(left(query, 70), '\\s+', ' ', 'g') FROM pg_stat_statements s"
        " JOIN pg_database d ON d.oid = s.dbid"
        " WHERE d.datname = current_database() ORDER BY calls DESC LIMIT 12"
    ).fetchall()
    return "; ".join(f"{calls}x {query}" for calls, query in rows)


# Two statements, so that neither evaluates a CASE per row; both fire the table's
# triggers as any producer's INSERT would (one history row per job).
FILLER_QUEUED = """
INSERT INTO notifyq.jobs (task, run_at)
SELECT 'bench.filler', now() + interval '10 years' FROM generate_series(1, %(n)s)
"""
FILLER_FINISHED = """
INSERT INTO notifyq.jobs (task, status, run_at, attempts, max_attempts, started_at, finished_at)
SELECT 'bench.filler', 'succeeded', t, 1, 5, t, t
FROM generate_series(1, %(n)s), (SELECT now() - interval '1 day' AS t) AS day
"""


def scale(
    system: System,
    dsn: str,
    work: Path,
    sizes: Sizes,
    templates: server.Templates,
) -> Result:
    """Drain rate with a backlog of future-queued and succeeded rows, against an empty table.

    The backlog is written once per suite run into a template database (with the
    system's schema, its triggers on, then VACUUM ANALYZE); every run drains in a
    fresh file copy of it.
    """
    c = sizes.scale_concurrency
    empty = drain(system, dsn, work, sizes, c, "scale")["jobs/s"]
    timings: dict[str, float] = {}

    def fill(template: str) -> None:
        system.install(template)
        with connect(template) as conn:
            t0 = time.monotonic()
            conn.execute(FILLER_QUEUED, {"n": sizes.scale_queued})
            conn.execute(FILLER_FINISHED, {"n": sizes.scale_finished})
            t1 = time.monotonic()
            conn.execute("VACUUM ANALYZE notifyq.jobs, notifyq.job_history")
            timings["insert"], timings["vacuum"] = t1 - t0, time.monotonic() - t1

    key = f"scale {system.name} {sizes.scale_queued} {sizes.scale_finished}"
    t0 = time.monotonic()
    with templates.copy(key, fill) as loaded:
        copied = time.monotonic() - t0 - templates.fill_seconds[key] * bool(timings)
        if timings:
            NOTES["scale"] = (
                f"{sizes.scale_queued:,} queued + {sizes.scale_finished:,} succeeded filler"
                f" rows by INSERT ... SELECT generate_series in {timings['insert']:.0f} s,"
                f" VACUUM ANALYZE (with the history) in {timings['vacuum']:.0f} s, once"
            )
        _note("scale", f"a run's copy (CREATE DATABASE ... TEMPLATE) in {copied:.1f} s")
        full = drain(system, loaded, work, sizes, c, "scale")["jobs/s"]
    return {"empty jobs/s": empty, "loaded jobs/s": full, "loaded/empty %": 100 * full / empty}


CROWD_FILLER = """
INSERT INTO notifyq.jobs (queue, task, priority)
SELECT CASE WHEN g %% 2 = 0 THEN 'other' ELSE 'default' END, 'bench.job', -1
FROM generate_series(1, %(n)s) AS g
"""
# The drain's own jobs, at priority 0, not yet all finished (the crowd is left queued).
CROWD_PENDING = (
    "SELECT EXISTS (SELECT 1 FROM notifyq.jobs WHERE status = 'running' AND priority = 0)"
    " OR EXISTS (SELECT 1 FROM notifyq.jobs WHERE status = 'queued' AND queue = 'default'"
    " AND task = 'bench.job' AND priority = 0)"
)


def _checkpoint(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """Write out the filler's WAL now, so no checkpoint it caused runs during the drain
    (needs superuser or pg_checkpoint; without, the drain may pay for it)."""
    with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
        conn.execute("CHECKPOINT")


def crowd(
    system: System,
    dsn: str,
    work: Path,
    sizes: Sizes,
    fresh: Callable[[], object],
) -> Result:
    """Drain rate with n other queued jobs due now (half in a queue the worker does not
    serve, half in its own queue at a lower priority), against an empty table.

    The drain's jobs have priority 0 and the crowd -1: once they are all finished the
    worker starts on the crowd, which the rate does not count.
    """
    c = sizes.scale_concurrency
    empty = drain(system, dsn, work, sizes, c, "crowd")["jobs/s"]
    jobs = sizes.drain_jobs
    with fresh() as loaded:  # type: ignore[attr-defined]
        system.install(loaded)
        with connect(loaded) as conn:
            t0 = time.monotonic()
            conn.execute(CROWD_FILLER, {"n": sizes.crowd_rows})
            conn.execute(system.insert_bulk, {"n": jobs})
            row = conn.execute("SELECT min(id) FROM notifyq.jobs WHERE priority = 0").fetchone()
            assert row is not None
            first_id = int(row[0])  # type: ignore[call-overload]
            # The history rows too: autovacuum would otherwise get to them during the drain.
            conn.execute("VACUUM ANALYZE notifyq.jobs, notifyq.job_history")
            _checkpoint(conn)
            NOTES["crowd"] = (
                f"{sizes.crowd_rows:,} crowd rows by one INSERT ... SELECT generate_series,"
                " VACUUM ANALYZE (with the history) and CHECKPOINT in"
                f" {time.monotonic() - t0:.0f} s"
            )
            with procs.worker(system.name, loaded, work, "--concurrency", str(c)) as w:
                procs.wait(lambda: w.count() > 0, "the first job to start", 120, w)
                finished = procs.reached(
                    lambda: not conn.execute(CROWD_PENDING).fetchone()[0],  # type: ignore[index]
                    sizes.cap,
                    w,
                )
                end = time.time()
                starts = w.starts()
        ours = {job: at for job, at in starts.items() if job >= first_id}
        first = min(ours.values())
        if not finished:
            _note(
                f"crowd {system.name}",
                f"cut at {sizes.cap:.0f} s, {len(ours):,} of {jobs:,} started",
            )
            full = len(ours) / (end - first)
        else:
            full = jobs / (end - first)
    return {"empty jobs/s": empty, "loaded jobs/s": full, "loaded/empty %": 100 * full / empty}
