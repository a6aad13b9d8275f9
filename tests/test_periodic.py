"""Periodic jobs: definitions, exactly one job per instant however many dispatchers,
missed instants after downtime, time zones, schedules written by plain SQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import psycopg
import pytest

import notifyq
from notifyq import ConfigurationError, periodic, store
from notifyq.periodic import Scheduler, latest_at, next_after, parse_zone
from tests.conftest import query, serve_process, wait_until

pytestmark = pytest.mark.anyio


def define_by_sql(dsn: str, name: str, schedule: str, **columns: Any) -> None:
    """A schedule row as any program would write it; defined two days ago unless told."""
    columns = {"task": name, "defined_at": datetime.now(UTC) - timedelta(days=2), **columns}
    names = ", ".join(["name", "schedule", *columns])
    marks = ", ".join(["%s"] * (len(columns) + 2))
    query(
        dsn,
        f"INSERT INTO notifyq.periodic ({names}) VALUES ({marks})",
        name,
        schedule,
        *columns.values(),
    )


def jobs(dsn: str) -> list[tuple[str, dict[str, Any], datetime]]:
    return [
        (task, payload, run_at)
        for task, payload, run_at in query(
            dsn, "SELECT task, payload, run_at FROM notifyq.jobs ORDER BY id"
        )
    ]


def database_now(dsn: str) -> datetime:
    value: datetime = query(dsn, "SELECT now()")[0][0]
    return value


def daily_minutes_ago(dsn: str, minutes: int, zone: str = "UTC") -> tuple[str, datetime]:
    """A daily schedule whose latest instant was `minutes` ago (database clock), local to
    `zone`, and that instant in UTC."""
    local = (database_now(dsn) - timedelta(minutes=minutes)).astimezone(parse_zone(zone))
    instant = local.replace(second=0, microsecond=0).astimezone(UTC)
    return f"{local.minute} {local.hour} * * *", instant


# --- definitions, checked without a database


@pytest.mark.parametrize(
    ("schedule", "options", "complaint"),
    [
        ("every minute", {}, "invalid schedule"),
        ("* * * *", {}, "invalid schedule"),
        ("61 * * * *", {}, "invalid schedule"),
        ("0 0 31 2 *", {}, "invalid schedule"),
        ("* * * * *", {"timezone": "Mars/Olympus_Mons"}, "unknown time zone"),
        ("* * * * *", {"missed": "all"}, "missed must be"),
        ("* * * * *", {"payload": [1, 2]}, "must be a dict"),
        ("* * * * *", {"payload": {"instant": 1}}, "reserved"),
        ("* * * * *", {"payload": {"x": {1, 2}}}, "not JSON-serialisable"),
        ("* * * * *", {"priority": 5000}, "priority"),
    ],
)
def test_bad_definitions_are_refused_at_decoration(
    schedule: str, options: dict[str, Any], complaint: str
) -> None:
    app = notifyq.App()
    with pytest.raises(ConfigurationError, match=complaint):

        @app.periodic(schedule, **options)
        def handler(payload: Any) -> None: ...

    assert len(app.registry) == 0 and app.schedules == []


def test_periodic_registers_a_task_and_its_schedule() -> None:
    app = notifyq.App()

    @app.periodic("*/5 * * * *", name="report.build", queue="reports", timezone="Europe/Paris")
    def build(payload: Any) -> None: ...

    task = app.registry.get("report.build")
    assert task is not None and task.handler is build and task.queue == "reports"
    (schedule,) = app.schedules
    assert (schedule.name, schedule.task, schedule.schedule, schedule.timezone) == (
        "report.build",
        "report.build",
        "*/5 * * * *",
        "Europe/Paris",
    )
    assert schedule.row()["queue"] == "reports" and schedule.row()["missed"] == "skip"


def test_a_zone_shifts_instants_with_its_daylight_saving_time() -> None:
    paris = parse_zone("Europe/Paris")
    noon = datetime(2026, 1, 10, 12, tzinfo=UTC)
    assert next_after("0 9 * * *", paris, noon) == datetime(2026, 1, 11, 8, tzinfo=UTC)
    assert latest_at("0 9 * * *", paris, noon) == datetime(2026, 1, 10, 8, tzinfo=UTC)
    summer = datetime(2026, 7, 10, 12, tzinfo=UTC)
    assert latest_at("0 9 * * *", paris, summer) == datetime(2026, 7, 10, 7, tzinfo=UTC)
    # 02:30 does not exist on 29 March 2026 in Paris: it runs at 03:00 local, once.
    spring = datetime(2026, 3, 28, 12, tzinfo=UTC)
    assert next_after("30 2 * * *", paris, spring) == datetime(2026, 3, 29, 1, tzinfo=UTC)
    # 02:30 happens twice on 25 October 2026: it runs once, at the first.
    autumn = datetime(2026, 10, 24, 12, tzinfo=UTC)
    first = next_after("30 2 * * *", paris, autumn)
    assert first == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)
    assert next_after("30 2 * * *", paris, first) == datetime(2026, 10, 26, 1, 30, tzinfo=UTC)


def test_latest_instant_includes_now_and_seconds_are_supported() -> None:
    utc = parse_zone("UTC")
    at = datetime(2026, 7, 10, 7, 0, 0, tzinfo=UTC)
    assert latest_at("0 7 * * *", utc, at) == at
    assert latest_at("0 7 * * *", utc, at - timedelta(microseconds=1)) == at - timedelta(days=1)
    assert next_after("0 7 * * *", utc, at) == at + timedelta(days=1)
    assert next_after("*/10 * * * * *", utc, at) == at + timedelta(seconds=10)


# --- against PostgreSQL


async def test_definition_keeps_progress_and_pause_and_moves_on_a_new_schedule(
    dsn: str,
) -> None:
    app = notifyq.App()

    @app.periodic("0 9 * * *", name="daily")
    def daily(payload: Any) -> None: ...

    claim = store.Store(dsn, "test")
    try:
        await Scheduler(claim, app.schedules).define()
        row = "SELECT schedule, paused, defined_at, last_instant FROM notifyq.periodic"
        ((schedule, paused, defined_at, last),) = query(dsn, row)
        assert (schedule, paused, last) == ("0 9 * * *", False, None)
        query(dsn, "UPDATE notifyq.periodic SET paused = true, last_instant = now()")
        ((_, _, _, last),) = query(dsn, row)
        # A dispatcher restarting with the same definition changes nothing.
        await Scheduler(claim, app.schedules).define()
        assert query(dsn, row) == [("0 9 * * *", True, defined_at, last)]
        # A new expression: the pause and progress stay, defined_at moves.
        changed = periodic.Periodic(**{**_fields(app.schedules[0]), "schedule": "0 10 * * *"})
        await Scheduler(claim, [changed]).define()
        ((schedule, paused, moved, kept),) = query(dsn, row)
        assert (schedule, paused, kept) == ("0 10 * * *", True, last) and moved > defined_at
    finally:
        await claim.close()


def _fields(definition: periodic.Periodic) -> dict[str, Any]:
    return {name: getattr(definition, name) for name in definition.__slots__}


async def test_racing_dispatchers_enqueue_an_instant_once(dsn: str) -> None:
    define_by_sql(dsn, "race", "* * * * * *")
    instant = database_now(dsn).replace(microsecond=0)
    stores = [store.Store(dsn, f"race-{i}") for i in range(8)]
    results: list[Any] = []

    async def fire(st: store.Store) -> None:
        results.append(await st.fire_periodic("race", "* * * * * *", "UTC", instant, 60.0))

    try:
        for st in stores:  # connect first, so the statements really race
            await st.periodic_schedules()
        async with anyio.create_task_group() as tg:
            for st in stores:
                tg.start_soon(fire, st)
    finally:
        for st in stores:
            await st.close()
    winners = [r for r in results if r is not None]
    assert len(winners) == 1 and winners[0].enqueue is True
    assert [(task, payload) for task, payload, _ in jobs(dsn)] == [
        ("race", {"instant": instant.isoformat()})
    ]
    # Firing it again, or an earlier instant, does nothing either.
    again = store.Store(dsn, "again")
    try:
        assert await again.fire_periodic("race", "* * * * * *", "UTC", instant, 60.0) is None
        earlier = instant - timedelta(seconds=1)
        assert await again.fire_periodic("race", "* * * * * *", "UTC", earlier, 60.0) is None
    finally:
        await again.close()
    assert len(jobs(dsn)) == 1


def test_three_dispatchers_enqueue_each_second_once(dsn: str) -> None:
    query(dsn, "CREATE TABLE ran (job_id bigint, instant text, pid integer)")
    app = "tests.apps.periodic:app"
    with (
        serve_process(dsn, app=app) as a,
        serve_process(dsn, app=app) as b,
        serve_process(dsn, app=app) as c,
    ):
        wait_until(
            lambda: query(dsn, "SELECT count(DISTINCT instant) >= 6 FROM ran")[0][0],
            timeout=60,
            message="six instants run",
        )
        for proc in (a, b, c):
            proc.terminate()
        for proc in (a, b, c):
            assert proc.wait(timeout=60) == 0
    per_instant = query(
        dsn,
        "SELECT payload->>'instant', count(*) FROM notifyq.jobs"
        " WHERE task = 'tick.every_second' GROUP BY 1 ORDER BY 1",
    )
    assert len(per_instant) >= 6
    assert {count for _, count in per_instant} == {1}, per_instant
    instants = [datetime.fromisoformat(text) for text, _ in per_instant]
    assert all(i.microsecond == 0 and i.tzinfo is not None for i in instants)
    ran = query(dsn, "SELECT instant, count(*) FROM ran GROUP BY 1 HAVING count(*) > 1")
    assert ran == []


@pytest.mark.parametrize("missed", ["skip", "once"])
async def test_after_downtime_skip_enqueues_nothing_and_once_enqueues_the_latest(
    dsn: str, missed: str
) -> None:
    schedule, instant = daily_minutes_ago(dsn, 10)
    define_by_sql(dsn, "nightly", schedule, missed=missed)
    # Missed by the minute too: 180 instants since its last, which a flood would enqueue.
    define_by_sql(
        dsn,
        "minutely",
        "* * * * *",
        missed=missed,
        last_instant=database_now(dsn) - timedelta(hours=3),
    )
    claim = store.Store(dsn, "test")
    try:
        scheduler = Scheduler(claim, [])
        await scheduler.tick()
        await scheduler.tick()  # the same instants again: nothing more
    finally:
        await claim.close()
    enqueued = {task: payload["instant"] for task, payload, _ in jobs(dsn)}
    if missed == "skip":
        # The minutely schedule's latest instant was under a minute ago: on time, not missed.
        assert set(enqueued) == {"minutely"}
    else:
        assert enqueued["nightly"] == instant.isoformat()
        assert set(enqueued) == {"nightly", "minutely"}
    assert len(jobs(dsn)) == len(enqueued)  # one job per schedule at most
    # The missed instant is dealt with either way: recorded, never due again.
    assert query(dsn, "SELECT last_instant FROM notifyq.periodic WHERE name = 'nightly'") == [
        (instant,)
    ]


async def test_schedule_in_a_zone_fires_at_its_local_time(dsn: str) -> None:
    schedule, instant = daily_minutes_ago(dsn, 10, zone="Asia/Kolkata")  # UTC+05:30
    hour = int(schedule.split()[1])
    define_by_sql(dsn, "kolkata", schedule, timezone="Asia/Kolkata", missed="once")
    claim = store.Store(dsn, "test")
    try:
        await Scheduler(claim, []).tick()
    finally:
        await claim.close()
    ((task, payload, run_at),) = jobs(dsn)
    assert task == "kolkata" and payload == {"instant": instant.isoformat()}
    assert run_at == instant
    local = instant.astimezone(parse_zone("Asia/Kolkata"))
    assert local.hour == hour and instant.minute == (local.minute + 30) % 60


async def test_a_schedule_written_by_sql_runs_and_pauses(dsn: str) -> None:
    define_by_sql(
        dsn,
        "sql.defined",
        "* * * * * *",
        task="report.build",
        queue="reports",
        payload='{"format": "pdf"}',
        priority=7,
    )
    claim = store.Store(dsn, "test")
    try:
        scheduler = Scheduler(claim, [])
        wait = await scheduler.tick()
        assert 0 < wait <= 1.01  # until the next second, not a poll interval
        ((task, queue, payload, priority),) = query(
            dsn, "SELECT task, queue, payload, priority FROM notifyq.jobs"
        )
        assert (task, queue, priority) == ("report.build", "reports", 7)
        assert payload["format"] == "pdf" and "instant" in payload
        query(dsn, "UPDATE notifyq.periodic SET paused = true")
        query(dsn, "UPDATE notifyq.periodic SET last_instant = last_instant - interval '1 hour'")
        await scheduler.tick()
        assert len(jobs(dsn)) == 1
    finally:
        await claim.close()


def test_the_database_refuses_a_bad_schedule_row(dsn: str) -> None:
    for schedule, columns, constraint in [
        ("* * *", {}, "periodic_schedule_format"),
        ("* * * * *", {"missed": "always"}, "periodic_missed_valid"),
        ("* * * * *", {"payload": '{"instant": "x"}'}, "periodic_payload_object"),
        ("* * * * *", {"payload": "[1]"}, "periodic_payload_object"),
        ("* * * * *", {"queue": "Bad Queue"}, "periodic_queue_format"),
    ]:
        with pytest.raises(psycopg.errors.CheckViolation) as caught:
            define_by_sql(dsn, "bad", schedule, **columns)
        assert caught.value.diag.constraint_name == constraint
    # PostgreSQL names the zone it does not know while checking periodic_timezone_known.
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="Mars/Olympus_Mons"):
        define_by_sql(dsn, "bad", "* * * * *", timezone="Mars/Olympus_Mons")
    assert query(dsn, "SELECT count(*) FROM notifyq.periodic") == [(0,)]


async def test_scheduler_survives_its_connection_being_cut(dsn: str) -> None:
    define_by_sql(dsn, "beat", "* * * * * *")
    claim = store.Store(dsn, "periodic-test")
    scheduler = Scheduler(claim, [])

    def count() -> int:
        value: int = query(dsn, "SELECT count(*) FROM notifyq.jobs")[0][0]
        return value

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(scheduler.run)
            with anyio.fail_after(20):
                while count() < 2:  # noqa: ASYNC110 - a table, not an event
                    await anyio.sleep(0.05)
                query(
                    dsn,
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name = 'notifyq:periodic-test'"
                    " AND datname = current_database()",
                )
                before = count()
                while count() < before + 2:  # noqa: ASYNC110 - a table, not an event
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
    finally:
        await claim.close()
    per_instant = query(dsn, "SELECT payload->>'instant', count(*) FROM notifyq.jobs GROUP BY 1")
    assert {n for _, n in per_instant} == {1}
