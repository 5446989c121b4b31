"""stop_tasks: cancelled and finished, their errors logged, the caller's own cancellation kept."""

from __future__ import annotations

import asyncio
import logging

import pytest

from bastion._tasks import stop_tasks


async def test_tasks_are_cancelled_and_over_when_it_returns() -> None:
    cleaned: list[str] = []

    async def worker(name: str) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # cleanup that itself awaits
            cleaned.append(name)

    a, b = asyncio.create_task(worker("a")), asyncio.create_task(worker("b"))
    await asyncio.sleep(0)
    await stop_tasks(a, None, b)
    assert a.cancelled() and b.cancelled()
    assert sorted(cleaned) == ["a", "b"]


async def test_an_error_of_a_task_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    async def broken() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            raise RuntimeError("cleanup failed")

    t = asyncio.create_task(broken(), name="broken-task")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="bastion.tasks"):
        await stop_tasks(t)
    assert [r.task for r in caplog.records] == ["broken-task"]  # type: ignore[attr-defined]


async def test_the_callers_own_cancellation_is_not_swallowed() -> None:
    stuck_started = asyncio.Event()

    async def stubborn() -> None:
        stuck_started.set()
        while True:  # ignores cancellation for a while: the caller waits for it
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                await asyncio.sleep(0.05)
                return

    async def shutdown(t: asyncio.Task[None]) -> str:
        await stop_tasks(t)
        return "finished"

    t = asyncio.create_task(stubborn())
    await stuck_started.wait()
    caller = asyncio.create_task(shutdown(t))
    await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await stop_tasks(t)
