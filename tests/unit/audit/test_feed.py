"""Search filters, streaming search and the feed (decisions 0034, 0035), on both real stores.

Every test runs on a SQLite data directory and on a fresh PostgreSQL database.
The SQLite feed reads the index, so those tests index (``flush``) before reading.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from bastion.audit import sqlite_store as sqlite_module
from bastion.audit.events import REQUEST, SESSION_START
from bastion.audit.pg_store import TABLE, PostgresAuditStore
from bastion.audit.sqlite_store import AUDIT_DB_NAME, AuditFiles, SQLiteAuditStore
from bastion.audit.store import AuditQuery, Completion, event_row, iter_search
from bastion.errors import ValidationError
from tests.pg import fresh_database
from tests.unit.audit.test_store import make_event


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    if request.param == "sqlite":
        s: Any = await SQLiteAuditStore.open(tmp_path / "data")
        try:
            yield s
        finally:
            await s.close()
        return
    async with fresh_database() as dsn:
        p = await PostgresAuditStore.open(dsn)
        p.test_dsn = dsn  # type: ignore[attr-defined]
        try:
            yield p
        finally:
            await p.close()


async def indexed(store: Any) -> None:
    flush = getattr(store, "flush", None)
    if flush is not None:
        await flush()


async def ids(store: Any, **query: Any) -> list[str]:
    return [e["id"] for e in await store.search(AuditQuery(order="asc", limit=0, **query))]


# ------------------------------------------------------------------ filters


async def test_tool_and_outcome_filters(store: Any) -> None:
    echo_ok = make_event(tool="echo")
    echo_failed = make_event(tool="echo")
    add_denied = make_event(tool="add", success=False, error="access denied", duration_ms=0.0)
    start = make_event(type=SESSION_START, tool="")
    await store.insert_many([echo_ok, echo_failed, add_denied, start])
    await store.complete_many([Completion(echo_failed.id, False, "upstream error", 3.0)])
    for journaled in (True, False):  # SQLite: read from the journal, then from the index
        assert await ids(store, tool="echo") == [echo_ok.id, echo_failed.id]
        assert await ids(store, outcome="failure") == [echo_failed.id, add_denied.id]
        assert await ids(store, outcome="success") == [echo_ok.id, start.id]
        assert await ids(store, tool="echo", outcome="success", types=(REQUEST,)) == [echo_ok.id]
        if journaled:
            await indexed(store)


async def test_a_call_with_no_outcome_yet_counts_as_a_success(store: Any) -> None:
    waiting = make_event(tool="slow")
    await store.insert_many([waiting])
    assert await ids(store, outcome="success") == [waiting.id]
    (shown,) = await store.search(AuditQuery(outcome="success"))
    assert shown["code"].endswith("I") and "duration_ms" not in shown


async def test_limit_zero_is_everything_streamed_in_pages(store: Any) -> None:
    n = 2 * 2000 + 7
    events = [make_event(user=f"u{i % 3}") for i in range(n)]
    for k in range(0, n, 1000):
        await store.insert_many(events[k : k + 1000])
    await indexed(store)
    await store.insert_many([late := make_event(user="u0")])  # SQLite: still in the journal
    pages = [p async for p in iter_search(store, AuditQuery(limit=0, order="asc"))]
    assert len(pages) >= 3 and all(len(p) <= 2000 for p in pages)
    assert [e["id"] for p in pages for e in p] == [e.id for e in [*events, late]]
    query = AuditQuery(limit=5, user="u0", order="desc")
    newest = [e["id"] async for p in iter_search(store, query) for e in p]
    assert newest == [late.id, *[e.id for e in reversed(events) if e.user == "u0"][:4]]


# ------------------------------------------------------------------ the feed


async def feed_ids(store: Any, cursor: str, hold_us: int = 0, *, at_least: int = 0) -> tuple[list[str], str]:
    """A feed page's ids, read again until it holds ``at_least`` events (deadline 30 s).

    On PostgreSQL the feed stops below the oldest transaction running on the whole server:
    another client's open transaction (other tests) holds it back for a while.
    """
    deadline = time.monotonic() + 30
    while True:
        page = await store.feed(cursor, 1000, hold_us)
        if len(page.events) >= at_least or time.monotonic() > deadline:
            return [e["id"] for e in page.events], page.cursor
        await asyncio.sleep(0.05)  # polling a condition, bounded by the deadline


async def test_the_feed_is_in_commit_order_not_event_time(store: Any) -> None:
    now = datetime.now(UTC)
    first = make_event(time=now)
    late = make_event(time=now - timedelta(hours=1))  # a joined host's event, arriving late
    await store.insert_many([first])
    await store.insert_many([late])
    await indexed(store)
    got, cursor = await feed_ids(store, "", at_least=2)
    assert got == [first.id, late.id]
    assert await feed_ids(store, cursor) == ([], cursor)
    # The same position again reads nothing twice.
    third = make_event(time=now - timedelta(hours=2))
    await store.insert_many([third])
    await indexed(store)
    assert (await feed_ids(store, cursor, at_least=1))[0] == [third.id]


async def test_a_late_outcome_moves_its_event_to_the_end(store: Any) -> None:
    a, b = make_event(), make_event()
    await store.insert_many([a, b])
    await indexed(store)
    got, cursor = await feed_ids(store, "", at_least=2)
    assert got == [a.id, b.id]
    await store.complete_many([Completion(a.id, False, "upstream failed", 12.5)])
    await indexed(store)
    assert (await feed_ids(store, cursor, at_least=1))[0] == [a.id]
    page = await store.feed(cursor, 1000, 0)
    assert [(e["id"], e["success"], e["error"], e["duration_ms"]) for e in page.events] == [
        (a.id, False, "upstream failed", 12.5)
    ]


async def test_a_recent_call_waits_for_its_outcome(store: Any) -> None:
    now = datetime.now(UTC)
    done, waiting = make_event(time=now), make_event(time=now)
    after = make_event(time=now, type=SESSION_START, tool="")
    await store.insert_many([done])
    await store.complete_many([Completion(done.id, True, "", 1.0)])
    await store.insert_many([waiting, after])
    await indexed(store)
    hold = 60_000_000
    got, cursor = await feed_ids(store, "", hold, at_least=1)
    assert got == [done.id]  # stops before the call still waiting
    await store.complete_many([Completion(waiting.id, True, "", 2.0)])
    await indexed(store)
    got, cursor = await feed_ids(store, cursor, hold, at_least=2)
    assert got == [after.id, waiting.id]
    # Old enough, a waiting call is read as it is (and again when completed).
    stale = make_event(time=now - timedelta(minutes=5))
    await store.insert_many([stale])
    await indexed(store)
    assert (await feed_ids(store, cursor, hold, at_least=1))[0] == [stale.id]


async def test_a_sessions_calls_keep_their_order_when_an_outcome_and_the_next_call_share_a_batch(
    store: Any,
) -> None:
    """Call 1 is written (held: no outcome yet); call 1's outcome and call 2 are then written
    together (one index run, or one PostgreSQL transaction). Call 1 must come first."""
    now = datetime.now(UTC)
    one, two = make_event(time=now), make_event(time=now)
    await store.insert_many([one])
    await indexed(store)
    hold = 60_000_000
    got, cursor = await feed_ids(store, "", hold)
    assert got == []  # held for its outcome
    write_batch = getattr(store, "write_batch", None)
    if write_batch is not None:
        await write_batch([two], [Completion(one.id, True, "", 1.0), Completion(two.id, True, "", 2.0)])
    else:
        await store.complete_many([Completion(one.id, True, "", 1.0)])
        await store.insert_many([two])
        await store.complete_many([Completion(two.id, True, "", 2.0)])
    await indexed(store)
    got, _ = await feed_ids(store, cursor, hold, at_least=2)
    assert got == [one.id, two.id]


async def test_a_row_written_again_with_its_outcome_gets_the_outcome(store: Any) -> None:
    """A batch written again (a lost connection, a spool drained, a joined host re-sending)
    holds a row stored already and that row's outcome: the outcome must not be lost."""
    call = make_event()
    await store.insert_many([call])
    await indexed(store)
    write_batch = getattr(store, "write_batch", None)
    assert write_batch is not None
    await write_batch([call], [Completion(call.id, True, "", 4.5)])
    await indexed(store)
    (row,) = await store.search(AuditQuery(limit=0))
    assert row["id"] == call.id and row["duration_ms"] == 4.5


async def test_feed_start_gives_the_last_n(store: Any) -> None:
    events = [make_event() for _ in range(5)]
    await store.insert_many(events)
    await indexed(store)
    await feed_ids(store, "", at_least=5)  # all of them in the feed
    assert (await feed_ids(store, await store.feed_start(2)))[0] == [e.id for e in events[3:]]
    assert (await feed_ids(store, await store.feed_start(0)))[0] == []
    assert (await feed_ids(store, await store.feed_start(50)))[0] == [e.id for e in events]
    assert await store.feed_backlog(await store.feed_start(2)) == 2


async def test_a_bad_cursor_is_refused(store: Any) -> None:
    with pytest.raises(ValidationError, match="bad audit feed cursor"):
        await store.feed("drop table", 10, 0)


# ------------------------------------------------------------------ PostgreSQL


@pytest.mark.postgres
async def test_postgres_feed_never_passes_a_transaction_still_running() -> None:
    """A plain sequence would hand out the running transaction's row before a later
    committed one and the reader would skip it; the feed waits for it instead."""
    async with fresh_database() as dsn:
        store = await PostgresAuditStore.open(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            slow, quick = make_event(), make_event()
            cursor = await store.feed_start(0)
            tr = conn.transaction()
            await tr.start()
            row = event_row(slow)
            await conn.execute(
                f'INSERT INTO {TABLE} (id, time_us, type, "user", app, session_id, success, error,'
                " duration_ms, event) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                *row,
            )
            await store.insert_many([quick])  # committed while the first is not
            assert (await feed_ids(store, cursor))[0] == []
            await tr.commit()
            got, cursor = await feed_ids(store, cursor, at_least=2)
            assert got == [slow.id, quick.id]
        finally:
            await conn.close()
            await store.close()


# ------------------------------------------------------------------ SQLite migration


async def test_a_version_2_sqlite_log_keeps_working(tmp_path: Path) -> None:
    """Rows stored before version 3 have no tool column and no feed position: search by tool
    reads their document, and the feed gives them first, in the order they were stored."""
    data = tmp_path / "data"
    data.mkdir()
    old = [make_event(tool="echo"), make_event(tool="add")]
    conn = sqlite3.connect(data / AUDIT_DB_NAME)
    for statement in sqlite_module._SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.executemany(
        "INSERT INTO audit_events (id, time_us, type, user, app, session_id, success, error, duration_ms,"
        " event) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [event_row(e) for e in old],
    )
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    store = await SQLiteAuditStore.open(data)
    try:
        new = make_event(tool="echo")
        await store.insert_many([new])
        await store.flush()
        assert await ids(store, tool="echo") == [old[0].id, new.id]
        got, cursor = await feed_ids(store, "")
        assert got == [old[0].id, old[1].id, new.id]
        await store.complete_many([Completion(old[1].id, False, "late", 1.0)])
        await store.flush()
        assert (await feed_ids(store, cursor))[0] == [old[1].id]
    finally:
        await store.close()
    # Another process reads the same log, read-only.
    files = AuditFiles(data)
    assert [e["id"] for e in (await files.feed("", 10)).events] == [old[0].id, new.id, old[1].id]
    lines = [orjson.dumps(e) for e in await files.search(AuditQuery(tool="add"))]
    assert len(lines) == 1 and orjson.loads(lines[0])["id"] == old[1].id


@pytest.mark.postgres
async def test_postgres_export_lease_is_held_by_one_store_and_keeps_the_cursor() -> None:
    async with fresh_database() as dsn:
        a, b = await PostgresAuditStore.open(dsn), await PostgresAuditStore.open(dsn)
        try:
            async with a.export_lease("http") as held:
                assert held is not None
                assert await held.load() == ""
                await held.save("12:0:7")
                async with b.export_lease("http") as other:
                    assert other is None  # another proxy stands by
                async with b.export_lease("file") as other_sink:
                    assert other_sink is not None  # one lease per sink
            async with b.export_lease("http") as taken_over:
                assert taken_over is not None and await taken_over.load() == "12:0:7"
        finally:
            await a.close()
            await b.close()
