"""Tags on jobs (notifyq.jobs.tags): set at enqueue from SQL and Python, checked by the
schema, found by `jobs list`, `retry --dead`, `cancel`, `purge` and `watch` with --tag."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import psycopg
import pytest

import notifyq
from notifyq import ConfigurationError, InvalidJob, watch
from tests.conftest import REPO, query, statuses


def tags_of(dsn: str) -> list[tuple[Any, ...]]:
    return query(dsn, "SELECT id, tags FROM notifyq.jobs ORDER BY id")


def test_tags_from_sql_and_python_with_the_tasks_own_first(dsn: str) -> None:
    app = notifyq.App(dsn)

    @app.task(name="mail.send", tags=["mail"])
    def send(payload: Any) -> None:
        pass

    query(dsn, "INSERT INTO notifyq.jobs (task, tags) VALUES ('mail.send', ARRAY['sql'])")
    app.enqueue_sync("mail.send", {}, tags=["customer:42", "mail"])  # 'mail' only once
    app.enqueue_sync("mail.send", {})
    app.enqueue_sync("other", {}, tags=("x",))
    app.enqueue_many_sync("mail.send", [{}, {}], tags=["bulk"])
    assert tags_of(dsn) == [
        (1, ["sql"]),  # a SQL insert sets its own: the task's are Python's default
        (2, ["mail", "customer:42"]),
        (3, ["mail"]),
        (4, ["x"]),
        (5, ["mail", "bulk"]),
        (6, ["mail", "bulk"]),
    ]
    app.close()


@pytest.mark.anyio
async def test_async_enqueue_takes_tags(dsn: str) -> None:
    app = notifyq.App(dsn)
    await app.enqueue("t", {}, tags=["a"])
    await app.enqueue_many("t", [{}], tags=["b"])
    await app.enqueue("t", {}, tags=["c"], dedupe_key="k")
    assert tags_of(dsn) == [(1, ["a"]), (2, ["b"]), (3, ["c"])]
    await app.aclose()


@pytest.mark.parametrize(
    ("tags", "said"),
    [
        ([""], "each tag must be a non-empty string, not ''"),
        ([None], "each tag must be a non-empty string, not None"),
        ("urgent", "tags must be a list of strings, not 'urgent'"),
        ([str(i) for i in range(21)], "a job has at most 20 tags, not 21"),
        (["x" * 600, "y" * 401], "at most 1000 characters in all, not 1001"),
    ],
)
def test_bad_tags_are_refused_before_anything_is_sent(dsn: str, tags: Any, said: str) -> None:
    app = notifyq.App("postgresql://nobody@127.0.0.1:1/none")  # never reached
    with pytest.raises(InvalidJob, match=said):
        app.enqueue_sync("t", {}, tags=tags)
    with pytest.raises(ConfigurationError, match=said):
        app.task(name="t", tags=tags)


def test_the_task_tags_and_the_enqueues_together_stay_within_the_bound() -> None:
    app = notifyq.App("postgresql://nobody@127.0.0.1:1/none")
    app.task(name="t", tags=[f"t{i}" for i in range(15)])(lambda payload: None)
    with pytest.raises(InvalidJob, match="the task's tags and the enqueue's together"):
        app.enqueue_sync("t", {}, tags=[f"e{i}" for i in range(6)])


def test_the_schema_refuses_bad_tags_naming_the_rule(dsn: str) -> None:
    with pytest.raises(psycopg.errors.CheckViolation, match="jobs_tags_valid"):
        query(dsn, "INSERT INTO notifyq.jobs (task, tags) VALUES ('t', ARRAY[NULL]::text[])")
    query(dsn, "INSERT INTO notifyq.jobs (task, tags) VALUES ('t', '{}')")  # none: allowed


def cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "notifyq", *args, "--dsn", dsn],
        cwd=REPO,
        capture_output=True,
        text=True,
    )


def ids(listing: str) -> list[int]:
    return [int(line.split()[0]) for line in listing.splitlines()[1:]]


def test_the_commands_find_jobs_by_every_tag_given(dsn: str) -> None:
    assert cli(dsn, "enqueue", "t", "--tag", "a", "--tag", "b").stdout == "1\n"
    query(
        dsn,
        "INSERT INTO notifyq.jobs (task, tags, status, attempts, finished_at) VALUES"
        " ('t', ARRAY['a'], 'dead', 1, now()),"  # 2
        " ('t', ARRAY['a', 'b'], 'dead', 1, now()),"  # 3
        " ('t', NULL, 'dead', 1, now()),"  # 4
        " ('t', ARRAY['b'], 'queued', 0, NULL),"  # 5
        " ('t', ARRAY['a', 'b'], 'succeeded', 1, now() - interval '1 day'),"  # 6
        " ('t', ARRAY['a'], 'succeeded', 1, now() - interval '1 day')",  # 7
    )
    assert query(dsn, "SELECT tags FROM notifyq.jobs WHERE id = 1") == [(["a", "b"],)]
    assert ids(cli(dsn, "jobs", "list", "--tag", "a").stdout) == [7, 6, 3, 2, 1]
    assert ids(cli(dsn, "jobs", "list", "--tag", "a", "--tag", "b").stdout) == [6, 3, 1]
    assert "tags:             a, b" in cli(dsn, "jobs", "show", "1").stdout

    assert cli(dsn, "retry", "--dead", "--tag", "b").stdout == "re-queued 1 dead jobs\n"
    assert query(dsn, "SELECT id FROM notifyq.jobs WHERE status = 'dead' ORDER BY id") == [
        (2,),
        (4,),
    ]
    assert cli(dsn, "cancel", "--tag", "b").stdout == "cancelled 3 jobs tagged b\n"  # 1, 3, 5
    assert query(dsn, "SELECT id FROM notifyq.jobs WHERE status = 'cancelled' ORDER BY id") == [
        (1,),
        (3,),
        (5,),
    ]
    done = cli(dsn, "purge", "--older-than", "1h", "--status", "succeeded", "--tag", "b")
    assert done.stdout == "purged 1 jobs (succeeded) tagged b finished over 1h ago\n"
    assert query(dsn, "SELECT id FROM notifyq.jobs WHERE status = 'succeeded'") == [(7,)]


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("jobs", "list", "--tag", ""), "each tag must be a non-empty string"),
        (("cancel",), "give either a job ID or --tag"),
        (("cancel", "1", "--tag", "a"), "give either a job ID or --tag"),
        (("cancel", "1", "--queue", "q"), "--queue and --task go with --tag"),
        (("retry", "1", "--tag", "a"), "--queue, --task and --tag go with --dead"),
        (("watch", "--once", "--tag", ""), "each tag must be a non-empty string"),
    ],
)
def test_tag_options_refuse_bad_input_before_connecting(args: tuple[str, ...], said: str) -> None:
    done = cli("postgresql://nobody@127.0.0.1:1/none", *args)
    assert done.returncode == 2, done.stderr
    assert said in done.stderr


def test_cancel_jobs_in_sql_needs_a_tag(dsn: str) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="needs at least one tag"):
        query(dsn, "SELECT notifyq.cancel_jobs('{}')")


@pytest.mark.anyio
async def test_watch_with_tags_counts_only_the_tagged_jobs(dsn: str) -> None:
    query(
        dsn,
        "INSERT INTO notifyq.jobs (task, queue, tags) VALUES ('t', 'q', ARRAY['a']),"
        " ('t', 'q', ARRAY['a', 'b']), ('t', 'q', NULL), ('t', 'r', ARRAY['b'])",
    )
    every = {q.queue: q.ready for q in (await watch.once(dsn)).queues}
    tagged = {q.queue: q.ready for q in (await watch.once(dsn, tags=["a"])).queues}
    both = {q.queue: q.ready for q in (await watch.once(dsn, tags=["a", "b"])).queues}
    assert every == {"q": 3, "r": 1}
    assert tagged == {"q": 2}
    assert both == {"q": 1}
    done = cli(dsn, "watch", "--once", "--json", "--tag", "b")
    assert {q["queue"]: q["ready"] for q in json.loads(done.stdout)["queues"]} == {"q": 1, "r": 1}


@pytest.mark.parametrize(
    "call",
    [
        "SELECT notifyq.retry_dead(tags => '{}')",
        "SELECT notifyq.purge(interval '0', '{succeeded,dead}', '{}')",
        "SELECT notifyq.purge_batch(interval '0', '{succeeded,dead}', 100, '{}')",
    ],
    ids=["retry_dead", "purge", "purge_batch"],
)
def test_an_empty_tag_array_in_sql_is_refused_not_read_as_any_tagged_job(
    dsn: str, call: str
) -> None:
    """`tags @> '{}'` holds for every tagged job and no untagged one: neither "no filter"
    (NULL) nor a filter, so a client whose tag list came out empty would act on a subset
    it never named.  Refused, as cancel_jobs refuses it."""
    query(
        dsn,
        "INSERT INTO notifyq.jobs (task, tags, status, attempts, finished_at) VALUES"
        " ('t', ARRAY['a'], 'dead', 1, now() - interval '1 day'),"
        " ('t', NULL, 'dead', 1, now() - interval '1 day')",
    )
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="NULL for any job"):
        query(dsn, call)
    assert statuses(dsn) == {"dead": 2}
