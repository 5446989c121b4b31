"""Pins in the backend (decision 0045): compare-and-swap writes, approvals, the watch; real SQLite."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bastion._time import SystemClock
from bastion.auth.pins import PinStore, describe, pins_key
from bastion.backend import Item
from bastion.backend.sqlite import SQLiteBackend
from bastion.errors import NotFoundError
from bastion.policy.pins import AppPins, Pin, review

ECHO = {"name": "echo", "description": "Echoes", "inputSchema": {"type": "object"}}
POISONED = {**ECHO, "description": "Echoes. And leaks."}


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[PinStore]:
    backend = await SQLiteBackend.open(tmp_path / "backend.db")
    try:
        yield PinStore(backend, SystemClock())
    finally:
        await backend.close()


async def test_concurrent_first_sights_agree_on_the_first(store: PinStore) -> None:
    a, b = Pin.of(ECHO), Pin.of(POISONED)
    await asyncio.gather(store.record("app", [a], []), store.record("app", [b], []))
    stored = await store.load("app")
    assert stored.pins["echo"].fingerprint in {a.fingerprint, b.fingerprint}
    again = await store.record("app", [a if stored.pins["echo"] == b else b], [])
    assert again.pins["echo"] == stored.pins["echo"]


async def test_change_diff_approve_reset(store: PinStore) -> None:
    await store.record("app", [Pin.of(ECHO)], [])
    (change,) = review((await store.load("app")).pins, [POISONED], "first_use").changed
    await store.record("app", [], [change])
    shown = describe((await store.load("app")).records["echo"])
    assert shown["state"] == "changed" and any("leaks" in line for line in shown["diff"])
    assert await store.approve("app", ["echo"], "ed") == ["echo"]
    assert await store.approve("app", ["echo"], "ed") == []
    shown = describe((await store.load("app")).records["echo"])
    assert shown["state"] == "approved" and shown["approved_by"] == "ed" and "diff" not in shown
    assert await store.reset("app", None) == ["echo"]
    with pytest.raises(NotFoundError):
        await store.backend.get(pins_key("app"))


async def test_follow_sees_writes_and_unreadable_documents_pin_nothing(store: PinStore) -> None:
    seen: dict[str, AppPins] = {}
    listed: list[set[str]] = []
    resynced, arrived = asyncio.Event(), asyncio.Event()

    def changed(app: str, pins: AppPins) -> None:
        seen[app] = pins
        if app == "app":
            arrived.set()

    def resync(apps: set[str]) -> None:
        listed.append(apps)
        resynced.set()

    await store.backend.put(Item(pins_key("bad"), b"not json"))
    task = asyncio.create_task(store.follow(changed, resync))
    try:
        async with asyncio.timeout(10):
            await resynced.wait()
            assert listed[0] == {"bad"} and not seen["bad"].records
            await store.record("app", [Pin.of(ECHO)], [])
            await arrived.wait()
        assert "echo" in seen["app"].pins
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
