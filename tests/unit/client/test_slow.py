"""``notice_if_slow``: one notice once the delay passes, none if the block ends first."""

from __future__ import annotations

import asyncio

from bastion.client.slow import notice_if_slow, waiting_message


async def test_the_notice_comes_once_the_delay_passes() -> None:
    told = asyncio.Event()
    with notice_if_slow(told.set, delay=0.01):
        async with asyncio.timeout(10):
            await told.wait()


async def test_no_notice_when_the_block_ends_first() -> None:
    calls: list[int] = []
    with notice_if_slow(lambda: calls.append(1), delay=0):
        pass  # ends before the loop runs the scheduled notice
    for _ in range(3):
        await asyncio.sleep(0)  # let the loop run what is due
    assert calls == []


def test_the_message() -> None:
    assert waiting_message("files") == "waiting for files to start…"
