"""notifyq's pytest plugin (the `pytest11` entry point: pytest loads it wherever notifyq
is installed).  Fixtures only, each named `notifyq_*`, none autouse: no server starts
and no database is touched until a test asks for one.  Loading the plugin imports the
notifyq package (this module lives in it), not notifyq.testing.

    notifyq_server_dsn  session: the server, NOTIFYQ_TESTING_DSN's (a role that may
                        CREATE DATABASE), else a private PostgreSQL (notifyq[embedded])
    notifyq_database    session: a database of its own on that server, migrated once
    notifyq_dsn         that database, emptied for this test; NOTIFYQ_DSN names it, so
                        an `App()` without a dsn uses it
    notifyq_app         yours to override: return your App
    notifyq_queue       the real queue: notifyq.testing.TestQueue(notifyq_app, notifyq_dsn)
    notifyq_eager       notifyq_app's enqueues run their handlers inline; no database
    notifyq_clock       notifyq.testing.Clock(notifyq_dsn): advance(seconds)

Override any of them in a conftest.py (notifyq_server_dsn to reuse a server the
suite starts already, say).  docs/testing.md has the whole story.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from notifyq import App
    from notifyq.testing import Clock, EagerQueue, TestDatabase, TestQueue

ENV_DSN = "NOTIFYQ_TESTING_DSN"


@pytest.fixture(scope="session")
def notifyq_server_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL server for the session: NOTIFYQ_TESTING_DSN's, else a private one."""
    given = os.environ.get(ENV_DSN)
    if given:
        yield given
        return
    from notifyq.testing import private_server

    with private_server(tmp_path_factory.mktemp("notifyq-postgres")) as dsn:
        yield dsn


@pytest.fixture(scope="session")
def notifyq_database(notifyq_server_dsn: str) -> Iterator[TestDatabase]:
    """A database of this session's own, migrated once; dropped at the end."""
    from notifyq.testing import TestDatabase

    database = TestDatabase(notifyq_server_dsn)
    yield database
    database.close()


@pytest.fixture
def notifyq_dsn(notifyq_database: TestDatabase, monkeypatch: pytest.MonkeyPatch) -> str:
    """The session's database, emptied for this test; NOTIFYQ_DSN names it meanwhile."""
    notifyq_database.reset()
    monkeypatch.setenv("NOTIFYQ_DSN", notifyq_database.dsn)
    return notifyq_database.dsn


@pytest.fixture
def notifyq_app() -> App:
    """The App under test: override this fixture to return yours."""
    raise pytest.UsageError(
        "notifyq_queue and notifyq_eager need your App: define a fixture named "
        "notifyq_app that returns it (in conftest.py, say)"
    )


@pytest.fixture
def notifyq_queue(notifyq_app: App, notifyq_dsn: str) -> Iterator[TestQueue]:
    """notifyq_app's jobs on this test's database: drain(), assert_enqueued(), jobs()."""
    from notifyq.testing import TestQueue

    if notifyq_app.dsn is not None and notifyq_app.dsn != notifyq_dsn:
        raise pytest.UsageError(
            "notifyq_app was built with App(dsn=...), which is not the test database: "
            "build it with App() (NOTIFYQ_DSN names the test database during each test)"
        )
    yield TestQueue(notifyq_app, notifyq_dsn)
    notifyq_app.close()  # its sync connection: the next test may need another database


@pytest.fixture
def notifyq_eager(notifyq_app: App) -> Iterator[EagerQueue]:
    """notifyq_app's enqueues run their handlers at once, exceptions raised in the test."""
    from notifyq.testing import eager

    with eager(notifyq_app) as jobs:
        yield jobs


@pytest.fixture
def notifyq_clock(notifyq_dsn: str) -> Clock:
    """The test database's time: advance(seconds) brings delayed jobs and backoffs due."""
    from notifyq.testing import Clock

    return Clock(notifyq_dsn)
