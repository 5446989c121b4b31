"""The storage contract every backend must pass, unchanged (see ``bastion.backend``).

Tests use only the ``Backend`` protocol plus ``expire()``/``compact()``, so a
new implementation is checked by adding it to the fixtures in ``conftest``.
Nothing here may wait for a condition by sleeping: watch results are awaited
with a deadline, so a slow machine makes a test slower, never flaky.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import pytest

from bastion.backend import Event, EventType, Item
from bastion.errors import (
    AlreadyExistsError,
    ConflictError,
    NotFoundError,
    WatchExpiredError,
)

from .conftest import BackendFactory, ContractBackend, FakeClock

#: Seconds a watcher may take to deliver one event before the test fails.
DEADLINE = 5
#: How often each race is run; one lucky interleaving proves little.
RACE_ROUNDS = 20


@asynccontextmanager
async def watching(backend: ContractBackend, from_revision: int) -> AsyncIterator[Any]:
    """``backend.watch`` that is always closed, even when the test fails."""
    events = backend.watch(from_revision)
    try:
        yield events
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


async def next_events(events: AsyncIterator[Event], count: int) -> list[Event]:
    return [await asyncio.wait_for(anext(events), timeout=DEADLINE) for _ in range(count)]


def summary(events: list[Event]) -> list[tuple[EventType, str, bytes]]:
    return [(e.type, e.item.key, e.item.value) for e in events]


# ------------------------------------------------------------------ basic CRUD


async def test_empty_backend_is_at_revision_zero(backend: ContractBackend) -> None:
    assert await backend.current_revision() == 0
    assert await backend.list("") == []
    with pytest.raises(NotFoundError):
        await backend.get("/nothing")


async def test_create_get_round_trip(backend: ContractBackend, clock: FakeClock) -> None:
    expires = clock.now() + timedelta(hours=1)
    created = await backend.create(Item("/roles/editor", b'{"a": 1}', expires=expires))
    assert created.revision > 0
    assert created.key == "/roles/editor"
    assert created.value == b'{"a": 1}'
    assert created.expires == expires
    assert await backend.get("/roles/editor") == created
    assert await backend.current_revision() == created.revision


async def test_create_existing_fails_and_keeps_value(backend: ContractBackend) -> None:
    first = await backend.create(Item("/k", b"one"))
    with pytest.raises(AlreadyExistsError):
        await backend.create(Item("/k", b"two"))
    assert await backend.get("/k") == first


async def test_update_with_current_revision(backend: ContractBackend) -> None:
    first = await backend.create(Item("/k", b"one"))
    second = await backend.update(Item("/k", b"two"), first.revision)
    assert second.revision > first.revision
    assert second.value == b"two"
    assert await backend.get("/k") == second


async def test_update_with_stale_revision_conflicts(backend: ContractBackend) -> None:
    first = await backend.create(Item("/k", b"one"))
    second = await backend.update(Item("/k", b"two"), first.revision)
    with pytest.raises(ConflictError):
        await backend.update(Item("/k", b"three"), first.revision)
    assert await backend.get("/k") == second


async def test_update_and_delete_of_missing_key(backend: ContractBackend) -> None:
    with pytest.raises(NotFoundError):
        await backend.update(Item("/missing", b"x"), 1)
    with pytest.raises(NotFoundError):
        await backend.delete("/missing")
    with pytest.raises(NotFoundError):
        await backend.delete("/missing", expected_revision=1)


async def test_delete(backend: ContractBackend) -> None:
    first = await backend.create(Item("/k", b"one"))
    second = await backend.update(Item("/k", b"two"), first.revision)
    with pytest.raises(ConflictError):
        await backend.delete("/k", expected_revision=first.revision)
    assert await backend.get("/k") == second
    await backend.delete("/k", expected_revision=second.revision)
    with pytest.raises(NotFoundError):
        await backend.get("/k")
    await backend.create(Item("/other", b"x"))
    await backend.delete("/other")
    assert await backend.list("") == []


async def test_put_creates_and_overwrites(backend: ContractBackend) -> None:
    first = await backend.put(Item("/k", b"one"))
    second = await backend.put(Item("/k", b"two"))
    assert second.revision > first.revision
    assert await backend.get("/k") == second


async def test_list_prefix_is_exact_and_sorted(backend: ContractBackend) -> None:
    # ``_`` and ``%`` are LIKE wildcards; "/a_b0" sits just past "/a_b/"
    # in byte order; the non-ASCII key checks ordering beyond ASCII.
    keys = [
        "/b/1",
        "/a_b/z",
        "/aXb/1",
        "/a%c/1",
        "/a_b/2",
        "/a_b0",
        "/a_b/\u00e9",
        "/a%b/1",
        "/a_bc/1",
        "/a_b",
        "/a_b/1",
        "/ab/1",
    ]
    for key in keys:
        await backend.create(Item(key, key.encode()))

    async def listed(prefix: str) -> list[str]:
        items = await backend.list(prefix)
        assert all(item.value == item.key.encode() for item in items)
        return [item.key for item in items]

    assert await listed("/a_b/") == ["/a_b/1", "/a_b/2", "/a_b/z", "/a_b/\u00e9"]
    assert await listed("/a%") == ["/a%b/1", "/a%c/1"]
    assert await listed("/a%b/") == ["/a%b/1"]
    assert await listed("/a_") == [
        "/a_b",
        "/a_b/1",
        "/a_b/2",
        "/a_b/z",
        "/a_b/\u00e9",
        "/a_b0",
        "/a_bc/1",
    ]
    assert await listed("") == sorted(keys)
    assert await listed("/nothing/") == []


# ------------------------------------------------------------------ revisions


async def test_revisions_strictly_increase(backend: ContractBackend) -> None:
    seen = [(await backend.create(Item("/a", b"1"))).revision]
    seen.append((await backend.update(Item("/a", b"2"), seen[-1])).revision)
    seen.append((await backend.put(Item("/b", b"1"))).revision)
    await backend.delete("/b")
    seen.append(await backend.current_revision())
    seen.append((await backend.create(Item("/b", b"2"))).revision)
    assert seen[0] > 0
    assert seen == sorted(set(seen)), seen
    assert await backend.current_revision() == seen[-1]


async def test_revisions_are_shared_between_instances(
    backend_pair: tuple[ContractBackend, ContractBackend],
) -> None:
    a, b = backend_pair
    seen: list[int] = []
    for i in range(6):
        writer = a if i % 2 == 0 else b
        seen.append((await writer.put(Item(f"/k{i}", b"x"))).revision)
    assert seen == sorted(set(seen)), seen
    assert await a.current_revision() == await b.current_revision() == seen[-1]
    assert [item.key for item in await b.list("/")] == [f"/k{i}" for i in range(6)]


async def test_concurrent_puts_get_distinct_revisions(
    backend_pair: tuple[ContractBackend, ContractBackend],
) -> None:
    a, b = backend_pair
    written = await asyncio.gather(*((a if i % 2 else b).put(Item(f"/p/{i}", b"x")) for i in range(20)))
    revisions = [item.revision for item in written]
    assert len(set(revisions)) == len(revisions)
    assert await a.current_revision() == max(revisions)


# ------------------------------------------------------------------ expiry


async def test_expired_items_are_absent(backend: ContractBackend, clock: FakeClock) -> None:
    live = await backend.create(Item("/t/live", b"l"))
    soon = await backend.create(Item("/t/soon", b"s", expires=clock.now() + timedelta(seconds=10)))
    assert await backend.get("/t/soon") == soon

    clock.advance(10)  # expires <= now: expired
    with pytest.raises(NotFoundError):
        await backend.get("/t/soon")
    assert await backend.list("/t/") == [live]
    with pytest.raises(NotFoundError):
        await backend.update(Item("/t/soon", b"again"), soon.revision)
    with pytest.raises(NotFoundError):
        await backend.delete("/t/soon")

    recreated = await backend.create(Item("/t/soon", b"new"))
    assert recreated.revision > soon.revision
    assert await backend.get("/t/soon") == recreated


async def test_expire_emits_delete_events(backend: ContractBackend, clock: FakeClock) -> None:
    later = clock.now() + timedelta(minutes=5)
    await backend.put(Item("/e/1", b"1", expires=later))
    await backend.put(Item("/e/2", b"2", expires=later))
    kept = await backend.put(Item("/e/3", b"3", expires=later + timedelta(minutes=5)))
    assert await backend.expire() == 0

    start = await backend.current_revision()
    clock.advance(5 * 60 + 1)
    async with watching(backend, start) as events:
        assert await backend.expire() == 2
        deleted = await next_events(events, 2)
    assert {e.item.key for e in deleted} == {"/e/1", "/e/2"}
    assert all(e.type is EventType.DELETE and e.item.value == b"" for e in deleted)
    assert start < deleted[0].revision < deleted[1].revision
    assert await backend.current_revision() == deleted[1].revision
    assert await backend.list("/e/") == [kept]
    assert await backend.expire() == 0


# ------------------------------------------------------------------ watch


async def test_watch_yields_changes_in_order(backend: ContractBackend) -> None:
    start = await backend.current_revision()
    async with watching(backend, start) as events:
        first = await backend.create(Item("/w/a", b"1"))
        second = await backend.update(Item("/w/a", b"2"), first.revision)
        await backend.put(Item("/w/b", b"3"))
        await backend.delete("/w/a")
        got = await next_events(events, 4)
    assert summary(got) == [
        (EventType.PUT, "/w/a", b"1"),
        (EventType.PUT, "/w/a", b"2"),
        (EventType.PUT, "/w/b", b"3"),
        (EventType.DELETE, "/w/a", b""),
    ]
    revisions = [e.revision for e in got]
    assert revisions[:2] == [first.revision, second.revision]
    assert revisions == sorted(set(revisions))
    assert revisions[-1] == await backend.current_revision()


async def test_watch_replays_history(backend: ContractBackend, clock: FakeClock) -> None:
    expires = clock.now() + timedelta(hours=1)
    a = await backend.put(Item("/h/a", b"1", expires=expires))
    await backend.put(Item("/h/b", b"2"))
    await backend.delete("/h/a")
    async with watching(backend, 0) as events:
        got = await next_events(events, 3)
    assert summary(got) == [
        (EventType.PUT, "/h/a", b"1"),
        (EventType.PUT, "/h/b", b"2"),
        (EventType.DELETE, "/h/a", b""),
    ]
    assert got[0].item == a  # a watched PUT carries the whole item, expiry included
    # From the middle of the history: only what came after.
    async with watching(backend, a.revision) as events:
        assert summary(await next_events(events, 2)) == summary(got[1:])


async def test_watch_wakes_on_local_write_without_polling(
    backend_factory: BackendFactory,
) -> None:
    # With a poll interval far beyond the deadline, only the instance's own
    # notification can deliver the event in time.
    backend = await backend_factory(poll_interval=60)
    async with watching(backend, await backend.current_revision()) as events:
        for i in range(3):
            pending = asyncio.ensure_future(anext(events))
            written = await backend.put(Item(f"/l/{i}", b"x"))
            event = await asyncio.wait_for(pending, timeout=DEADLINE)
            assert event.item == written


async def test_watch_sees_writes_of_other_instance(
    backend_pair: tuple[ContractBackend, ContractBackend],
) -> None:
    a, b = backend_pair
    async with watching(a, await a.current_revision()) as events:
        for i in range(3):
            # The watcher is already waiting when the other instance writes.
            pending = asyncio.ensure_future(anext(events))
            written = await b.put(Item(f"/x/{i}", str(i).encode()))
            event = await asyncio.wait_for(pending, timeout=DEADLINE)
            assert event.type is EventType.PUT
            assert event.item == written
        pending = asyncio.ensure_future(anext(events))
        await b.delete("/x/0")
        event = await asyncio.wait_for(pending, timeout=DEADLINE)
        assert (event.type, event.item.key) == (EventType.DELETE, "/x/0")


async def test_close_ends_watchers(backend_factory: BackendFactory) -> None:
    backend = await backend_factory()
    await backend.put(Item("/c", b"x"))
    async with watching(backend, 0) as events:
        assert len(await next_events(events, 1)) == 1
        pending = asyncio.ensure_future(anext(events))
        await backend.close()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(pending, timeout=DEADLINE)


async def test_watch_from_compacted_revision_expires(backend_factory: BackendFactory) -> None:
    backend = await backend_factory(event_retention=3)
    revisions = [(await backend.put(Item(f"/c/{i}", b"x"))).revision for i in range(10)]
    assert await backend.compact() == 7
    assert await backend.compact() == 0
    assert await backend.current_revision() == revisions[-1]
    assert len(await backend.list("/c/")) == 10  # compaction drops history, not state

    # The three newest events are still there.
    async with watching(backend, revisions[-4]) as events:
        assert [e.revision for e in await next_events(events, 3)] == revisions[-3:]

    other = await backend_factory()
    for watcher, start in [(backend, 0), (backend, revisions[-5]), (other, revisions[0])]:
        async with watching(watcher, start) as events:
            with pytest.raises(WatchExpiredError):
                await asyncio.wait_for(anext(events), timeout=DEADLINE)


# ------------------------------------------------------------------ races


def one_winner(results: list[Any], loser: type[Exception]) -> Item:
    """The single successful result; every other one must be ``loser``."""
    winners = [r for r in results if isinstance(r, Item)]
    losers = [r for r in results if isinstance(r, loser)]
    assert len(winners) == 1, results
    assert len(losers) == len(results) - 1, results
    return winners[0]


async def race_updates(first: ContractBackend, second: ContractBackend) -> None:
    for round_ in range(RACE_ROUNDS):
        key = f"/race/{round_}"
        base = await first.create(Item(key, b"base"))
        results = await asyncio.gather(
            first.update(Item(key, b"first"), base.revision),
            second.update(Item(key, b"second"), base.revision),
            return_exceptions=True,
        )
        winner = one_winner(results, ConflictError)
        assert winner.revision > base.revision
        assert await first.get(key) == winner
        assert await second.get(key) == winner


async def test_race_update_between_instances(
    backend_pair: tuple[ContractBackend, ContractBackend],
) -> None:
    await race_updates(*backend_pair)


async def test_race_update_within_one_instance(backend: ContractBackend) -> None:
    await race_updates(backend, backend)


async def test_race_create_same_key(
    backend_pair: tuple[ContractBackend, ContractBackend],
) -> None:
    a, b = backend_pair
    for round_ in range(RACE_ROUNDS // 2):
        key = f"/create-race/{round_}"
        results = await asyncio.gather(
            *((a if i % 2 else b).create(Item(key, f"writer-{i}".encode())) for i in range(8)),
            return_exceptions=True,
        )
        winner = one_winner(results, AlreadyExistsError)
        assert await a.get(key) == winner
        assert await b.get(key) == winner
