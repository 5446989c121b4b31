"""The audit page's keyset paging on a real SQLite audit store: every event once, in order,
ties on the page boundary included, filters kept."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bastion.audit.events import REQUEST, AuditEvent
from bastion.audit.query import query_from_params
from bastion.audit.sqlite_store import SQLiteAuditStore
from bastion.webui.audit import page_of

T0 = datetime.now(UTC) - timedelta(hours=1)


def event(at: timedelta, user: str = "alice") -> AuditEvent:
    return AuditEvent(
        id=uuid.uuid4().hex,
        type=REQUEST,
        time=T0 + at,
        success=True,
        cluster_name="c",
        user=user,
        app="files",
        session_id="s",
        method="tools/call",
        tool="read",
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteAuditStore]:
    s = await SQLiteAuditStore.open(tmp_path / "data")
    try:
        # 130 events a second apart, then 120 at one instant (a page boundary falls in them),
        # and 40 of another user mixed in.
        events = [event(timedelta(seconds=i)) for i in range(130)]
        events += [event(timedelta(seconds=200)) for _ in range(120)]
        events += [event(timedelta(seconds=i, milliseconds=500), user="bob") for i in range(40)]
        await s.insert_many(events)
        await s.flush()
        yield s
    finally:
        await s.close()


async def all_pages(store: SQLiteAuditStore, filters: dict[str, str], size: int) -> list[list[str]]:
    pages: list[list[str]] = []
    before, skip = "", 0
    while True:
        events, after = await page_of(store, filters, before, skip, size=size)
        pages.append([e["id"] for e in events])
        if after is None:
            return pages
        assert {k: v for k, v in after.items() if k not in ("before", "skip")} == filters
        before, skip = after["before"], int(after["skip"])


async def test_every_event_once_in_order(store: SQLiteAuditStore) -> None:
    everything = [e["id"] for e in await store.search(query_from_params({"since": "2h", "limit": "0"}))]
    assert len(everything) == 290
    pages = await all_pages(store, {"since": "2h"}, size=50)
    assert [i for p in pages for i in p] == everything
    assert all(len(p) == 50 for p in pages[:-1])


async def test_filters_hold_across_pages(store: SQLiteAuditStore) -> None:
    pages = await all_pages(store, {"since": "2h", "user": "bob"}, size=15)
    assert [len(p) for p in pages] == [15, 15, 10]
