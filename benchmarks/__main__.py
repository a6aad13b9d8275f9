"""notifyq benchmarks: notifyq beside a raw-SQL ceiling and its Python peers.

    python -m benchmarks [--dsn DSN] [--runs 3] [--quick] [--jobs N] [--systems a,b]
                         [--concurrency 10,50,200] [SCENARIO ...]

Starts a private PostgreSQL (embedded, default settings, fsync on) unless
--dsn is given, creates a fresh database for every run, runs every scenario
--runs times alternating systems (run 1 of each system, then run 2, ...), and
prints medians with min-max.  benchmarks/README.md describes each scenario
and how each system is configured.

Scenarios: drain enqueue contended contended-draining latency steady idle scale crowd
Systems:   notifyq raw minimal pgqueuer-asyncpg pgqueuer-psycopg procrastinate
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shlex
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from . import procs, scenarios, server
from .report import Cell, render
from .scenarios import QUICK, Sizes
from .systems import NOT_INSTALLED, SYSTEMS, System, installed

ALL = [
    "drain",
    "enqueue",
    "contended",
    "contended-draining",
    "latency",
    "steady",
    "idle",
    "scale",
    "crowd",
]

Scenario = Callable[[System, str, Path], scenarios.Result]


def plan(sizes: Sizes, chosen: list[str], statements: bool) -> dict[str, tuple[str, str, Scenario]]:
    """label -> (scenario kind, title, function)."""
    n = f"{sizes.drain_jobs:,}"
    out: dict[str, tuple[str, str, Scenario]] = {}
    if "drain" in chosen:
        for c in sizes.drain_concurrency:
            out[f"drain c={c}"] = (
                "drain",
                f"{n} no-op jobs pre-loaded, one worker at concurrency {c}; jobs/s, and per"
                f" job: WAL bytes, {'statements' if statements else 'transactions'}, CPU µs of"
                " the worker process and of its PostgreSQL backends",
                partial(
                    scenarios.drain,
                    sizes=sizes,
                    concurrency=c,
                    label=f"drain c={c}",
                    statements=statements,
                ),
            )
    if "enqueue" in chosen:
        out["enqueue"] = (
            "enqueue",
            f"one producer, autocommit INSERT per job (1) or {sizes.bulk_rows:,} rows per"
            " INSERT (bulk), notify triggers on/off in alternating slices",
            partial(scenarios.enqueue, sizes=sizes),
        )
    if "contended" in chosen:
        out["contended"] = (
            "contended",
            f"{sizes.contended_producers} producers, one autocommit INSERT per job each,"
            " notify triggers on/off in alternating slices",
            partial(scenarios.contended, sizes=sizes),
        )
    if "contended-draining" in chosen:
        out["contended-draining"] = (
            "contended-draining",
            f"contended, while a worker (concurrency {sizes.draining_concurrency}) drains a"
            f" backlog of {sizes.draining_backlog:,} jobs; off: the insert notify trigger only",
            partial(scenarios.contended_draining, sizes=sizes),
        )
    if "latency" in chosen:
        out["latency"] = (
            "latency",
            f"worker idle and listening; 1 job every {sizes.latency_interval * 1000:.0f} ms"
            f" for {sizes.latency_seconds:.0f} s; handler start minus INSERT commit",
            partial(scenarios.latency, sizes=sizes),
        )
        out["latency (poll)"] = (
            "latency-poll",
            "the same with notifyq --no-listen: the 5 s fallback poll path",
            partial(scenarios.latency, sizes=sizes, worker_args=("--no-listen",)),
        )
    if "steady" in chosen:
        out["steady"] = (
            "steady",
            f"{sizes.steady_rate:.0f} jobs/s offered for {sizes.steady_seconds:.0f} s, 5 ms"
            f" async handler, concurrency {sizes.steady_concurrency}",
            partial(scenarios.steady, sizes=sizes),
        )
    if "idle" in chosen:
        method = "pg_stat_statements calls" if statements else "pg_stat_database xact_commit"
        out["idle"] = (
            "idle",
            f"statements an idle worker sends in {sizes.idle_seconds:.0f} s ({method}),"
            " and WAL the server writes meanwhile",
            partial(scenarios.idle, sizes=sizes, statements=statements),
        )
    if "scale" in chosen:
        out["scale"] = (
            "scale",
            f"drain of {n} jobs at concurrency {sizes.scale_concurrency}, empty table vs"
            f" {sizes.scale_queued:,} queued (due in ten years) + {sizes.scale_finished:,}"
            " succeeded rows",
            partial(scenarios.scale, sizes=sizes),
        )
    if "crowd" in chosen:
        out["crowd"] = (
            "crowd",
            f"drain of {n} jobs at concurrency {sizes.scale_concurrency}, empty table vs"
            f" {sizes.crowd_rows:,} other queued jobs due now (half another queue's, half"
            " the same queue's at a lower priority)",
            partial(scenarios.crowd, sizes=sizes),
        )
    return out


def applies(system: System, kind: str) -> bool:
    if kind == "latency-poll":
        return system.name == "notifyq"
    return kind in system.scenarios


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dsn", help="server to use (default: a private embedded PostgreSQL)")
    parser.add_argument(
        "--runs", type=int, help="runs of every scenario (default 3; 1 with --quick)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help="comma-separated, from: " + ", ".join(SYSTEMS) + " (default: all)",
    )
    parser.add_argument(
        "--concurrency", help="comma-separated drain concurrency settings (default 10,50,200)"
    )
    parser.add_argument(
        "--jobs", type=int, help="jobs per drain (drain, scale, crowd; default 20,000)"
    )
    parser.add_argument("scenarios", nargs="*", help="from: " + " ".join(ALL) + " (default: all)")
    args = parser.parse_args()
    chosen = args.scenarios or ALL
    runs = args.runs or (1 if args.quick else 3)
    if bad := [s for s in chosen if s not in ALL]:
        parser.error(f"unknown scenarios: {', '.join(bad)}")
    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        parser.error(f"unknown systems: {', '.join(unknown)}")
    sizes = QUICK if args.quick else Sizes()
    if args.concurrency:
        conc = tuple(int(x) for x in args.concurrency.split(","))
        sizes = dataclasses.replace(sizes, drain_concurrency=conc)
    if args.jobs:
        sizes = dataclasses.replace(sizes, drain_jobs=args.jobs)

    pg = server.start(args.dsn)
    work = Path(tempfile.mkdtemp(prefix="notifyq-bench-work-"))
    started = datetime.now(UTC)
    try:
        table = run(pg, work, sizes, chosen, names, runs)
    finally:
        pg.close()
        shutil.rmtree(work, ignore_errors=True)
    command = shlex.join(["python", "-m", "benchmarks", *sys.argv[1:]])
    header = [
        command,
        f"{started:%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPUs ({platform.machine()},"
        f" {platform.system()} {platform.release()}); Python {platform.python_version()};"
        f" PostgreSQL {pg.version}"
        + (" (embedded, default settings, fsync on)" if args.dsn is None else ""),
        f"median (min-max) of {runs} runs per cell; systems alternate within each round",
    ]
    print(render(header, command, *table), flush=True)


def run(
    pg: server.Server,
    work: Path,
    sizes: Sizes,
    chosen: list[str],
    names: list[str],
    runs: int,
) -> tuple[dict[str, str], dict[tuple[str, str], Cell], list[str], list[str]]:
    steps = plan(sizes, chosen, pg.statements)
    cells: dict[tuple[str, str], Cell] = {}
    for label, (kind, _, _) in steps.items():
        for name in names:
            system = SYSTEMS[name]
            cell = cells[label, name] = Cell()
            if not installed(system):
                cell.status = NOT_INSTALLED
            elif not applies(system, kind):
                cell.status = "n/a"
    templates = server.Templates(pg.dsn)
    try:
        for i in range(runs):
            for label, (kind, _, fn) in steps.items():
                for name in names:
                    cell = cells[label, name]
                    if cell.status is not None:
                        continue
                    print(f"[run {i + 1}/{runs}] {label}: {name}", file=sys.stderr, flush=True)
                    system = SYSTEMS[name]
                    try:
                        with server.fresh_database(pg.dsn) as dsn:
                            system.install(dsn)
                            extra: dict[str, object] = {}
                            if kind == "crowd":
                                extra["fresh"] = partial(server.fresh_database, pg.dsn)
                            if kind == "scale":
                                extra["templates"] = templates
                            result = fn(system, dsn, work, **extra)
                        cell.runs.append(result)
                        print(f"    {result}", file=sys.stderr, flush=True)
                    except (procs.RunFailed, Exception) as exc:
                        if not isinstance(exc, procs.RunFailed):
                            traceback.print_exc(file=sys.stderr)
                        cell.failures.append(str(exc).splitlines()[0][:160])
                        print(f"    FAILED: {exc}", file=sys.stderr, flush=True)
    finally:
        templates.close()
    titles = {label: title for label, (_, title, _) in steps.items()}
    notes = [f"{k}: {v}" for k, v in scenarios.NOTES.items()]
    return titles, cells, names, notes


if __name__ == "__main__":
    main()
