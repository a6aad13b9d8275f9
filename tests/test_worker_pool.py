"""The worker pool's contract, with no database: it runs handlers, reports each attempt
once as a `Finished`, and keeps the ledger's `running` count (slot taken from submit to
report) so that whoever its report wakes sees the slot free."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from notifyq.errors import ResultError
from notifyq.job import Job, JobContext
from notifyq.ledger import Ledger
from notifyq.registry import Registry, Task, describe_handler
from notifyq.worker_pool import Finished, UnknownTask, WorkerPool, _Handoff

pytestmark = pytest.mark.anyio


def registry(**handlers: Callable[..., Any]) -> Registry:
    reg = Registry()
    for name, handler in handlers.items():
        is_async, wants_context = describe_handler(handler)
        reg.add(Task(name, handler, is_async=is_async, wants_context=wants_context))
    return reg


def job(job_id: int, task: str, attempt: int = 1, payload: Any = None) -> Job:
    return Job(job_id, "default", task, payload, attempt, 3)


class Pool:
    """A pool under test: its reports, and the ledger as each report found it."""

    def __init__(self, reg: Registry, concurrency: int = 2) -> None:
        self.ledger = Ledger()
        self.reports: list[Finished] = []
        self.seen: list[tuple[int, int]] = []  # (running, pending) when each report came
        self.reported = anyio.Event()
        self.pool = WorkerPool(reg, concurrency, self.ledger, self._report)

    def _report(self, finished: Finished) -> None:
        self.reports.append(finished)
        self.seen.append((self.ledger.running, self.ledger.pending))
        self.reported.set()

    async def wait_reports(self, n: int) -> None:
        with anyio.fail_after(10):
            while len(self.reports) < n:
                await self.reported.wait()
                self.reported = anyio.Event()


async def test_each_attempt_is_reported_once_and_frees_its_slot_first() -> None:
    async def ok(payload: Any) -> Any:
        return {"doubled": payload * 2}

    def fails(payload: Any) -> None:
        raise ValueError("bad payload")

    p = Pool(registry(ok=ok, fails=fails))
    async with anyio.create_task_group() as tg:
        await tg.start(p.pool.run)
        p.pool.submit(job(1, "ok", payload=21))
        p.pool.submit(job(2, "fails"))
        p.pool.submit(job(3, "nobody"))
        assert p.ledger.running == 3  # entered at submit, before any slot took them
        await p.wait_reports(3)
        await p.pool.wait_idle()
        p.pool.close()
    by_id = {f.job.id: f for f in p.reports}
    assert sorted(by_id) == [1, 2, 3]
    assert by_id[1].error is None and by_id[1].result == '{"doubled":42}'
    assert isinstance(by_id[2].error, ValueError) and "bad payload" in (by_id[2].trace or "")
    assert isinstance(by_id[3].error, UnknownTask)
    assert all(f.runtime is not None and f.runtime >= 0 for f in p.reports)
    # Each report found its own attempt already moved from running to pending.
    assert [pending for _, pending in p.seen] == [1, 2, 3]
    assert p.seen[-1] == (0, 3)
    assert (p.ledger.running, p.ledger.pending, p.pool.running) == (0, 3, 0)


async def test_a_result_that_is_not_json_fails_the_attempt() -> None:
    async def returns_a_set(payload: Any) -> Any:
        return {1, 2}

    p = Pool(registry(bad=returns_a_set))
    async with anyio.create_task_group() as tg:
        await tg.start(p.pool.run)
        p.pool.submit(job(1, "bad"))
        await p.wait_reports(1)
        p.pool.close()
    assert isinstance(p.reports[0].error, ResultError)


async def test_cancel_interrupts_only_the_attempts_of_the_jobs_named() -> None:
    started = {1: anyio.Event(), 2: anyio.Event()}
    release = anyio.Event()

    async def waits(payload: int, ctx: JobContext) -> None:
        started[payload].set()
        await release.wait()

    p = Pool(registry(waits=waits))
    async with anyio.create_task_group() as tg:
        await tg.start(p.pool.run)
        p.pool.submit(job(1, "waits", payload=1))
        p.pool.submit(job(2, "waits", payload=2))
        with anyio.fail_after(10):
            await started[1].wait()
            await started[2].wait()
        assert p.pool.running == 2
        assert p.pool.cancel({1, 99}) == {1}
        await p.wait_reports(1)
        release.set()
        await p.wait_reports(2)
        p.pool.close()
    cancelled = {f.job.id: f.cancelled for f in p.reports}
    assert cancelled == {1: True, 2: False}
    assert p.reports[0].job.id == 1 and p.reports[0].interrupted


async def test_a_sync_handler_is_told_of_its_cancellation_and_ends_when_it_returns() -> None:
    running = threading.Event()

    def polls(payload: Any, ctx: JobContext) -> str:
        running.set()
        assert ctx.cancelled.wait(10)
        return "stopped"

    p = Pool(registry(polls=polls))
    async with anyio.create_task_group() as tg:
        await tg.start(p.pool.run)
        p.pool.submit(job(5, "polls"))
        with anyio.fail_after(10):
            while not running.is_set():  # noqa: ASYNC110 - a thread's event, polled
                await anyio.sleep(0.01)
        assert p.pool.cancel({5}) == {5}
        await p.wait_reports(1)
        p.pool.close()
    assert p.reports[0].cancelled
    assert p.reports[0].error is None  # it returned; the row says cancelled regardless


async def test_interrupt_all_hands_back_running_and_waiting_attempts() -> None:
    started = anyio.Event()

    async def forever(payload: Any) -> None:
        started.set()
        await anyio.sleep_forever()

    p = Pool(registry(forever=forever), concurrency=1)
    async with anyio.create_task_group() as tg:
        await tg.start(p.pool.run)
        p.pool.submit(job(1, "forever"))
        p.pool.submit(job(2, "forever"))  # waits for the one slot
        with anyio.fail_after(10):
            await started.wait()
        p.pool.signal_stopping()
        p.pool.interrupt_all()
        p.pool.close()
        await p.wait_reports(2)
        with anyio.fail_after(10):
            await p.pool.wait_idle()
    assert sorted(f.job.id for f in p.reports if f.interrupted) == [1, 2]
    assert all(f.runtime is None for f in p.reports)  # neither ran to an end
    assert (p.ledger.running, p.ledger.pending) == (0, 2)


async def test_a_job_handed_to_a_slot_as_shutdown_cancels_it_is_handed_back() -> None:
    """`submit` gives the job to an idle slot and `interrupt_all` comes in the same tick,
    before that slot wakes: the job must be reported as handed back, not lost."""

    async def ok(payload: Any) -> None:
        return None

    p = Pool(registry(ok=ok), concurrency=2)
    async with anyio.create_task_group() as tg:
        await tg.start(p.pool.run)
        await anyio.wait_all_tasks_blocked()  # both slots wait for a job
        p.pool.submit(job(1, "ok"))
        p.pool.interrupt_all()  # in the same tick: the chosen slot has not run yet
        p.pool.close()
        await p.wait_reports(1)
        with anyio.fail_after(10):
            await p.pool.wait_idle()
    assert [(f.job.id, f.interrupted) for f in p.reports] == [(1, True)]
    assert (p.ledger.running, p.ledger.pending) == (0, 1)


async def test_two_attempts_of_one_job_are_held_apart() -> None:
    """A job rescued from under a stalled attempt can come back to the same pool: the
    old attempt's end must not free the new one's slot."""
    gates = {1: anyio.Event(), 2: anyio.Event()}

    async def gated(payload: int) -> None:
        await gates[payload].wait()

    p = Pool(registry(gated=gated))
    async with anyio.create_task_group() as tg:
        await tg.start(p.pool.run)
        p.pool.submit(job(7, "gated", attempt=1, payload=1))
        p.pool.submit(job(7, "gated", attempt=2, payload=2))
        gates[1].set()
        await p.wait_reports(1)
        assert p.ledger.attempts() == {(7, 1), (7, 2)}
        assert p.ledger.running == 1
        gates[2].set()
        await p.wait_reports(2)
        p.pool.close()
    assert [f.job.attempt for f in p.reports] == [1, 2]


async def test_wait_idle_returns_once_every_submitted_attempt_is_reported() -> None:
    release = threading.Event()

    def blocks(payload: Any) -> None:
        release.wait(10)

    p = Pool(registry(blocks=blocks))
    async with anyio.create_task_group() as tg:
        await tg.start(p.pool.run)
        p.pool.submit(job(1, "blocks"))
        idle = False

        async def wait() -> None:
            nonlocal idle
            await p.pool.wait_idle()
            idle = True

        tg.start_soon(wait)
        await anyio.wait_all_tasks_blocked()
        assert not idle
        release.set()
        await p.wait_reports(1)
        with anyio.fail_after(10):
            while not idle:  # noqa: ASYNC110 - set by the task above
                await anyio.sleep(0.01)
        p.pool.close()
    assert idle


async def test_an_attempt_claimed_again_while_it_runs_waits_for_its_turn() -> None:
    """A cancelled job whose sync handler runs on, retried (attempts start over) and
    claimed again by this pool, comes back as the same (job id, attempt): the new one takes
    no slot and no ledger entry of its own until the old one is reported, and the old
    one's cancellation stays its own."""
    gates = {"old": threading.Event(), "new": threading.Event()}
    started: list[str] = []

    def deaf(payload: str) -> str:  # never looks at ctx.cancelled
        started.append(payload)
        assert gates[payload].wait(10)
        return payload

    p = Pool(registry(deaf=deaf))
    async with anyio.create_task_group() as tg:
        await tg.start(p.pool.run)
        p.pool.submit(job(5, "deaf", payload="old"))
        with anyio.fail_after(10):
            while not started:  # noqa: ASYNC110 - a thread's list, polled
                await anyio.sleep(0.01)
        assert p.pool.cancel({5}) == {5}
        p.pool.submit(job(5, "deaf", payload="new"))
        assert p.ledger.running == 1  # the old one's slot; the new one waits in none
        gates["new"].set()  # were the new one running, it would end first
        gates["old"].set()
        await p.wait_reports(2)
        await p.pool.wait_idle()
        p.pool.close()
    assert started == ["old", "new"]
    assert [(f.job.payload, f.cancelled, f.error) for f in p.reports] == [
        ("old", True, None),
        ("new", False, None),
    ]
    # The new one entered the ledger as the old one left its slot: never counted free.
    assert p.seen == [(1, 1), (0, 1)]


async def test_an_attempt_waiting_for_its_turn_at_shutdown_is_handed_back() -> None:
    started = threading.Event()
    release = threading.Event()

    def deaf(payload: str) -> None:
        started.set()
        release.wait(10)

    p = Pool(registry(deaf=deaf))
    async with anyio.create_task_group() as tg:
        await tg.start(p.pool.run)
        p.pool.submit(job(5, "deaf", payload="old"))
        with anyio.fail_after(10):
            while not started.is_set():  # noqa: ASYNC110 - a thread's event, polled
                await anyio.sleep(0.01)
        p.pool.cancel({5})
        p.pool.submit(job(5, "deaf", payload="new"))
        p.pool.interrupt_all()
        p.pool.close()
        await p.wait_reports(2)
        with anyio.fail_after(10):
            await p.pool.wait_idle()
        release.set()
    assert [(f.job.payload, f.cancelled, f.interrupted) for f in p.reports] == [
        ("old", True, True),
        ("new", False, True),
    ]
    assert (p.ledger.running, p.ledger.pending) == (0, 1)


async def test_a_slot_cancelled_after_a_job_was_given_to_it_puts_the_job_back() -> None:
    """anyio does not cancel a task whose wait already completed, but a plain asyncio
    cancellation can land there: the job must go back to the front of the hand-off."""
    handoff = _Handoff()
    waiter = asyncio.get_running_loop().create_task(handoff.get())
    await anyio.wait_all_tasks_blocked()  # it waits for a job
    handoff.put(job(1, "ok"))
    handoff.put(job(2, "ok"))
    waiter.cancel()  # before it woke with job 1
    with pytest.raises(asyncio.CancelledError):
        await waiter
    handoff.close()
    assert [(await handoff.get()), (await handoff.get()), (await handoff.get())] == [
        job(1, "ok"),
        job(2, "ok"),
        None,
    ]
