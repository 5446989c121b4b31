"""Login throttling by source (decision 0020) over a real SQLite file, with a fake clock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from bastion.auth.throttle import Limits, LoginThrottle
from bastion.backend.sqlite import SQLiteBackend
from tests.unit.auth.test_server import Clock


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def throttle(tmp_path: Path, clock: Clock) -> AsyncIterator[LoginThrottle]:
    backend = await SQLiteBackend.open(tmp_path / "backend.db", clock=clock)
    try:
        yield LoginThrottle(backend, Limits(pair_attempts=3, source_attempts=5, user_attempts=8), clock)
    finally:
        await backend.close()


async def _fail(t: LoginThrottle, name: str, source: str) -> str:
    verdict = await t.admit(name, source)
    if not verdict.reason:
        await t.failed(name, source)
    return verdict.reason


async def test_pair_lock_expires(throttle: LoginThrottle, clock: Clock) -> None:
    assert [await _fail(throttle, "u", "s1") for _ in range(4)] == ["", "", "", "locked"]
    clock.t += timedelta(minutes=21)
    assert (await throttle.admit("u", "s1")).reason == ""


async def test_spraying_from_one_source_blocks_the_source(throttle: LoginThrottle) -> None:
    for i in range(5):
        assert await _fail(throttle, f"user{i}", "s1") == ""
    assert (await throttle.admit("someone-else", "s1")).reason == "source_locked"
    assert (await throttle.admit("someone-else", "s2")).reason == ""


async def test_distributed_guessing_leaves_known_sources_working(throttle: LoginThrottle) -> None:
    await throttle.admit("u", "home")
    await throttle.succeeded("u", "home")
    for i in range(8):  # one failure from each of many addresses
        assert await _fail(throttle, "u", f"bot{i}") == ""
    assert (await throttle.admit("u", "bot-new")).reason == "throttled"
    assert (await throttle.admit("u", "home")).reason == ""  # the user's own address


async def test_clear_forgets_a_users_counters(throttle: LoginThrottle) -> None:
    for _ in range(3):
        await _fail(throttle, "u", "s1")
    await throttle.clear("u")
    assert (await throttle.admit("u", "s1")).reason == ""


async def test_refused_joins_block_the_source(throttle: LoginThrottle) -> None:
    for _ in range(5):
        assert not await throttle.join_blocked("s1")
        await throttle.join_failed("s1")
    assert await throttle.join_blocked("s1")
    assert not await throttle.join_blocked("s2")


async def test_locks_are_listed_with_their_end_and_lifted_by_unlock(
    throttle: LoginThrottle, clock: Clock
) -> None:
    await throttle.admit("u", "home")
    await throttle.succeeded("u", "home")
    assert not (await throttle.locks("u")).locked
    for source in ("s1", "s2"):
        for _ in range(3):
            await _fail(throttle, "u", source)
    refusal = await throttle.admit("u", "s1")
    assert refusal.reason == "locked" and "try again in 20 minutes" in refusal.message
    locks = await throttle.locks("u")
    assert locks.addresses == 2 and locks.until == clock.t + timedelta(minutes=20)
    assert locks.throttled_until is None and locks.to_dict()["locked"] is True
    clock.t += timedelta(minutes=5)
    assert "try again in 15 minutes" in (await throttle.admit("u", "s2")).message
    was = await throttle.unlock("u")
    assert was.addresses == 2
    assert not (await throttle.locks("u")).locked
    assert (await throttle.admit("u", "s1")).reason == ""
    # The address the user logged in from is still known (rule 3 keeps working for them).
    assert await throttle._known("u", "home")


async def test_a_user_under_distributed_guessing_is_shown_throttled(throttle: LoginThrottle) -> None:
    for i in range(8):
        await _fail(throttle, "u", f"bot{i}")
    locks = await throttle.locks("u")
    assert locks.addresses == 0 and locks.throttled_until is not None and locks.locked
    assert "ask an administrator" in (await throttle.admit("u", "bot-new")).message
