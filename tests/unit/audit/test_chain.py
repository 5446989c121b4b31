"""The hash chain of seals (ADR 32): the pure chain and verifier, and SQLiteAuditStore's seals."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bastion.audit import chain
from bastion.audit import pg_store as pg_module
from bastion.audit import sqlite_store as sqlite_module
from bastion.audit.chain import Chain, Seal, Verifier, checker_of, signer_of
from bastion.audit.emitter import AuditLog
from bastion.audit.pg_store import PostgresAuditStore
from bastion.audit.sqlite_store import SQLiteAuditStore, verify_files
from bastion.audit.store import Completion
from bastion.errors import BackendError
from tests.pg import fresh_database
from tests.unit.audit.test_store import make_event


def keypair() -> tuple[chain.Signer, chain.Checker]:
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return signer_of(private), checker_of(public)


SIGN, CHECK = keypair()


# ------------------------------------------------------------------ pure


def test_each_seal_links_to_the_previous_one() -> None:
    c = Chain(7, signer=SIGN)
    text = '{"id":"a","event":"mcp.session.request","success":true}'
    first = c.next([chain.insert_item("a", text)], 10)
    c.advance(first)
    second = c.next([chain.completion_item("a", False, "boom", 1.5)], 20, sign=True)
    c.advance(second)
    assert (first.seq, first.prev, second.seq, second.prev) == (1, chain.GENESIS, 2, first.hash())
    assert first.sig is None and second.sig is not None
    assert CHECK(chain.SIGNED_PREFIX + second.hash(), second.sig)
    assert not CHECK(chain.SIGNED_PREFIX + first.hash(), second.sig)
    v = Verifier(CHECK)
    v.add_seals([first, second])
    v.check_row(chain.Row("a", 10, "mcp.session.request", "", "", "", False, "boom", 1.5, text), 1)
    assert v.finish() == [] and v.signed == 1


def links(v: Verifier) -> list[chain.Break]:
    """The breaks of the chain itself (no rows were given)."""
    return [b for b in v.finish() if "no longer stored" not in b.reason]


def test_a_changed_seal_breaks_the_next_link_and_a_gap_is_named() -> None:
    c = Chain(1)
    seals = []
    for n in range(4):
        s = c.next([chain.insert_item(f"e{n}", "{}")], n)
        c.advance(s)
        seals.append(s)
    v = Verifier(None)
    v.add_seals([seals[0], seals[1]._replace(items=b'[["i","e1","00"]]'), seals[2], seals[3]])
    assert [b.event_id for b in links(v)] == ["e2"]  # seal 3 no longer follows seal 2
    v = Verifier(None)
    v.add_seals([seals[0], seals[2], seals[3]])
    assert [(b.event_id, b.reason) for b in links(v)] == [("e2", "seals 2..2 of writer 1 are missing")]


def test_unreadable_items_are_a_break_not_a_crash() -> None:
    c = Chain(1)
    seals = []
    for items in ([["i", "e0", "00"]], [["i", "e1", "00"]]):
        seals.append(c.next(items, 1))
        c.advance(seals[-1])
    for garbage in (b"{", b'[["i"]]', b'[["x", "e1", 1, 2, 3]]', b'"text"', b"[1]"):
        v = Verifier(None)
        v.add_seals([seals[0], seals[1]._replace(items=garbage)])
        assert "seal 2 of writer 1: items unreadable" in [b.reason for b in links(v)]


def test_a_signature_by_another_key_is_a_break() -> None:
    other, _ = keypair()
    c = Chain(1, signer=other)
    s = c.next([], 5, kind=chain.CLOSE, sign=True)
    v = Verifier(CHECK)
    v.add_seals([s])
    assert [b.reason for b in v.finish()] == ["seal 1 of writer 1: bad signature"]


# ------------------------------------------------------------------ SQLite


async def sealed_store(data: Path, n: int = 30) -> list[str]:
    """A closed audit log of ``n`` completed calls; their ids, in order."""
    s = await SQLiteAuditStore.open(data, signer=SIGN)
    ids = []
    for _ in range(n):
        e = make_event()
        await s.insert_many([e])
        await s.complete_many([Completion(e.id, True, "", 3.0)])
        ids.append(e.id)
    await s.close()
    return ids


async def verify(data: Path, **kw: Any) -> list[tuple[str, str]]:
    report = await verify_files(data, CHECK, **kw)
    return [(b.event_id, b.reason) for b in report.breaks]


def sql(data: Path, statement: str, params: tuple[Any, ...] = ()) -> list[Any]:
    conn = sqlite3.connect(data / sqlite_module.AUDIT_DB_NAME)
    try:
        with conn:
            return conn.execute(statement, params).fetchall()
    finally:
        conn.close()


async def test_an_untouched_log_verifies(tmp_path: Path) -> None:
    await sealed_store(tmp_path)
    report = await verify_files(tmp_path, CHECK)
    assert report.breaks == []
    assert report.events == 30 and report.signed >= 2  # opening and closing seals at least


async def test_reopening_continues_the_chain(tmp_path: Path) -> None:
    await sealed_store(tmp_path, 5)
    await sealed_store(tmp_path, 5)
    assert await verify(tmp_path) == []
    kinds = [k for (k,) in sql(tmp_path, "SELECT kind FROM audit_seals ORDER BY seq")]
    assert kinds[0] == "open" and kinds.count("open") == 2 and kinds[-1] == "close"


async def test_one_byte_edited_in_an_event_names_it(tmp_path: Path) -> None:
    ids = await sealed_store(tmp_path)
    sql(
        tmp_path,
        "UPDATE audit_events SET event = replace(event, 'read_file', 'read_fild') WHERE id = ?",
        (ids[7],),
    )
    assert await verify(tmp_path) == [(ids[7], "its stored document differs from the one sealed")]


async def test_an_edited_outcome_or_column_names_the_event(tmp_path: Path) -> None:
    ids = await sealed_store(tmp_path)
    sql(tmp_path, "UPDATE audit_events SET success = 0 WHERE id = ?", (ids[3],))
    sql(tmp_path, "UPDATE audit_events SET user = 'mallory' WHERE id = ?", (ids[5],))
    assert await verify(tmp_path) == [
        (ids[3], "its outcome differs from the one sealed"),
        (ids[5], "its indexed columns differ from its sealed document"),
    ]


async def test_an_edited_tool_column_names_the_event(tmp_path: Path) -> None:
    """Blanking a call's tool column would hide it from `audit search --tool`."""
    ids = await sealed_store(tmp_path)
    (tool,) = sql(tmp_path, "SELECT tool FROM audit_events WHERE id = ?", (ids[9],))[0]
    assert tool, "the event has a tool to hide"
    sql(tmp_path, "UPDATE audit_events SET tool = '' WHERE id = ?", (ids[9],))
    assert await verify(tmp_path) == [(ids[9], "its indexed columns differ from its sealed document")]


async def test_a_deleted_row_is_named(tmp_path: Path) -> None:
    ids = await sealed_store(tmp_path)
    sql(tmp_path, "DELETE FROM audit_events WHERE id = ?", (ids[11],))
    assert await verify(tmp_path) == [(ids[11], "sealed but no longer stored (deleted?)")]


async def test_the_last_ten_cut_off_name_the_first_of_them(tmp_path: Path) -> None:
    ids = await sealed_store(tmp_path)
    sql(tmp_path, "DELETE FROM audit_events WHERE seq > (SELECT max(seq) - 10 FROM audit_events)")
    breaks = await verify(tmp_path)
    assert [b[0] for b in breaks] == ids[-10:]


async def test_the_last_ten_cut_off_with_their_seals_is_found(tmp_path: Path) -> None:
    ids = await sealed_store(tmp_path)
    # Everything from the seal holding the tenth last event on: seals and the events they hold.
    start = next(
        seq
        for seq, items in sql(tmp_path, "SELECT seq, items FROM audit_seals ORDER BY seq")
        if any(item[1] == ids[-10] for item in orjson.loads(items))
    )
    gone = [
        item[1]
        for (items,) in sql(tmp_path, "SELECT items FROM audit_seals WHERE seq >= ?", (start,))
        for item in orjson.loads(items)
    ]
    sql(tmp_path, "DELETE FROM audit_seals WHERE seq >= ?", (start,))
    sql(tmp_path, f"DELETE FROM audit_events WHERE id IN ({','.join('?' * len(gone))})", tuple(gone))
    breaks = await verify(tmp_path)
    assert len(breaks) == 1 and "closing seal" in breaks[0][1]


async def test_a_row_inserted_behind_the_writers_back_is_named(tmp_path: Path) -> None:
    await sealed_store(tmp_path, 3)
    e = make_event()
    row = sqlite_module.event_row(e)
    sql(
        tmp_path,
        "INSERT INTO audit_events"
        " (id, time_us, type, user, app, session_id, success, error, duration_ms, event)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        row,
    )
    assert await verify(tmp_path) == [
        (e.id, "stored but not in any seal (inserted behind the writer's back?)")
    ]


async def test_a_log_left_by_a_crash_verifies_once_reopened(tmp_path: Path) -> None:
    s = await SQLiteAuditStore.open(tmp_path, signer=SIGN)
    events = [make_event() for _ in range(20)]
    await s.insert_many(events[:10])
    await s.flush()
    await s.insert_many(events[10:])
    await s.complete_many([Completion(events[0].id, False, "HTTP 500", 4.0)])
    # A crash: the journal left as it is, nothing closed.
    s._closed = True
    for t in (s._timer, s._sign_timer):
        if t is not None:
            t.cancel()
    s._conn.close()
    os.close(s._jfd)
    os.close(s._lock_fd)
    crashed = await verify_files(tmp_path, CHECK)
    assert crashed.journaled == 11 and "closing seal" in crashed.breaks[0].reason
    s2 = await SQLiteAuditStore.open(tmp_path, signer=SIGN)
    await s2.close()
    report = await verify_files(tmp_path, CHECK)
    assert report.breaks == [] and report.events == 20 and report.journaled == 0


async def test_verify_since_checks_what_came_after(tmp_path: Path) -> None:
    ids = await sealed_store(tmp_path, 10)
    when = datetime.now(UTC) - timedelta(minutes=1)
    assert await verify(tmp_path, since=when) == []
    sql(tmp_path, "DELETE FROM audit_events WHERE id = ?", (ids[4],))
    assert await verify(tmp_path, since=when) == [(ids[4], "sealed but no longer stored (deleted?)")]


async def test_retention_prunes_old_events_and_the_rest_verifies(tmp_path: Path) -> None:
    now = [int(datetime(2026, 1, 1, tzinfo=UTC).timestamp() * 1e6)]
    s = await SQLiteAuditStore.open(tmp_path, signer=SIGN, clock=lambda: now[0])
    old = [make_event() for _ in range(sqlite_module.PRUNE_SEALS + 5)]
    for e in old:  # one seal each: more than one prune step
        await s.insert_many([e])
        await s.flush()
    now[0] += 100 * 86400 * 10**6
    new = [make_event() for _ in range(5)]
    await s.insert_many(new)
    await s.complete_many([Completion(old[0].id, False, "late", 1.0)])  # sealed after the limit
    await s.flush()
    await s.prune(datetime.fromtimestamp(now[0] / 1e6, UTC) - timedelta(days=90))
    left = {i for (i,) in sql(tmp_path, "SELECT id FROM audit_events")}
    assert left == {e.id for e in new}
    await s.close()
    assert await verify(tmp_path) == []
    # Pruning again (nothing old left but the prune seal) keeps it verifiable.
    s = await SQLiteAuditStore.open(tmp_path, signer=SIGN, clock=lambda: now[0] + 200 * 86400 * 10**6)
    await s.prune(datetime.fromtimestamp(now[0] / 1e6, UTC) + timedelta(days=110))
    await s.close()
    assert await verify(tmp_path) == []
    # Removing what the prune seal says the chain starts from is still found.
    first = sql(tmp_path, "SELECT min(seq) FROM audit_seals")[0][0]
    sql(tmp_path, "DELETE FROM audit_seals WHERE seq = ?", (first,))
    assert await verify(tmp_path) != []


async def test_events_of_a_version_1_log_are_counted_not_sealed(tmp_path: Path) -> None:
    await sealed_store(tmp_path, 3)
    sql(tmp_path, "DELETE FROM audit_seals")
    sql(tmp_path, "UPDATE audit_meta SET value = '3' WHERE key = 'legacy_seq'")
    report = await verify_files(tmp_path, CHECK)
    assert report.legacy == 3 and report.breaks == []


def test_seal_is_a_stored_row() -> None:
    s = Seal(1, 1, 0, chain.SEAL, chain.GENESIS, b"[]", "", None)
    assert len(s) == len(sqlite_module._SEAL_COLUMNS.split(","))


# ------------------------------------------------------------------ PostgreSQL


@pytest.fixture
async def dsn() -> AsyncIterator[str]:
    async with fresh_database() as database:
        yield database


async def pg_sealed(dsn: str, n: int = 30, **kw: Any) -> list[str]:
    s = await PostgresAuditStore.open(dsn, signer=SIGN, **kw)
    ids = []
    for _ in range(n):
        e = make_event()
        await s.write_batch([e], ())
        await s.write_batch([], [Completion(e.id, True, "", 3.0)])
        ids.append(e.id)
    await s.close()
    return ids


async def pg_verify(dsn: str, **kw: Any) -> list[tuple[str, str]]:
    s = await PostgresAuditStore.open(dsn, seal=False)
    try:
        report = await s.verify(CHECK, **kw)
    finally:
        await s.close()
    return [(b.event_id, b.reason) for b in report.breaks]


async def pg(dsn: str, statement: str, *args: Any) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(statement, *args)
    finally:
        await conn.close()


@pytest.mark.postgres
async def test_pg_untouched_log_of_several_writers_verifies(dsn: str) -> None:
    a = await PostgresAuditStore.open(dsn, signer=SIGN)
    b = await PostgresAuditStore.open(dsn, signer=SIGN)
    for _ in range(10):  # two proxies on one database, interleaved: one chain each
        ea, eb = make_event(), make_event()
        await asyncio.gather(a.insert_many([ea]), b.insert_many([eb]))
        await b.complete_many([Completion(ea.id, False, "late, through another proxy", 2.0)])
    await a.close()
    await b.close()
    assert await pg_verify(dsn) == []
    writers = await pg(dsn, f"SELECT DISTINCT writer FROM {pg_module.SEALS}")
    assert len(writers) == 2


@pytest.mark.postgres
async def test_pg_edit_delete_and_cut_are_named(dsn: str) -> None:
    ids = await pg_sealed(dsn)
    table = pg_module.TABLE
    await pg(
        dsn, f"UPDATE {table} SET event = replace(event, 'read_file', 'read_fild') WHERE id = $1", ids[2]
    )
    await pg(dsn, f"DELETE FROM {table} WHERE id = $1", ids[9])
    await pg(dsn, f"UPDATE {table} SET error = 'fine' WHERE id = $1", ids[12])
    assert await pg_verify(dsn) == [
        (ids[2], "its stored document differs from the one sealed"),
        (ids[9], "sealed but no longer stored (deleted?)"),
        (ids[12], "its outcome differs from the one sealed"),
    ]


@pytest.mark.postgres
async def test_pg_last_ten_cut_off_name_the_first_of_them(dsn: str) -> None:
    ids = await pg_sealed(dsn)
    await pg(dsn, f"DELETE FROM {pg_module.TABLE} WHERE seq > (SELECT max(seq) - 10 FROM {pg_module.TABLE})")
    assert [b[0] for b in await pg_verify(dsn)] == ids[-10:]


@pytest.mark.postgres
async def test_pg_a_write_whose_commit_is_unknown_keeps_the_chain(dsn: str) -> None:
    s = await PostgresAuditStore.open(dsn, signer=SIGN)
    try:
        e = make_event()
        await s.insert_many([e])
        s._head_unknown = True  # as after a lost connection: the head is read back
        await s.insert_many([make_event()])
        await s.insert_many([e])  # a retried insert: stored once, sealed twice
    finally:
        await s.close()
    assert await pg_verify(dsn) == []


@pytest.mark.postgres
async def test_pg_retention_prunes_and_the_rest_verifies(dsn: str) -> None:
    now = [int(datetime(2026, 1, 1, tzinfo=UTC).timestamp() * 1e6)]
    old = await pg_sealed(dsn, 5, clock=lambda: now[0])
    s = await PostgresAuditStore.open(dsn, signer=SIGN, clock=lambda: now[0])
    for _ in range(pg_module.PRUNE_SEALS):  # more than one prune step
        await s.insert_many([make_event()])
    now[0] += 100 * 86400 * 10**6
    new = [make_event() for _ in range(3)]
    await s.insert_many(new)
    await s.complete_many([Completion(old[0], False, "late", 1.0)])
    await s.prune(datetime.fromtimestamp(now[0] / 1e6, UTC) - timedelta(days=90))
    await s.close()
    left = {r[0] for r in await pg(dsn, f"SELECT id FROM {pg_module.TABLE}")}
    assert left == {e.id for e in new}
    assert await pg_verify(dsn) == []
    # Prune seals have a chain of their own per run; a later run prunes the earlier one's too.
    now[0] += 100 * 86400 * 10**6
    s = await PostgresAuditStore.open(dsn, signer=SIGN, clock=lambda: now[0])
    await s.insert_many([make_event()])
    await s.prune(datetime.fromtimestamp(now[0] / 1e6, UTC) - timedelta(days=90))
    await s.close()
    assert len(await pg(dsn, f"SELECT id FROM {pg_module.TABLE}")) == 1
    assert await pg_verify(dsn) == []


async def test_a_prune_step_is_bounded_by_events(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_module, "PRUNE_EVENTS", 10)
    now = [int(datetime(2026, 1, 1, tzinfo=UTC).timestamp() * 1e6)]
    s = await SQLiteAuditStore.open(tmp_path, signer=SIGN, clock=lambda: now[0])
    for _ in range(3):
        await s.insert_many([make_event() for _ in range(25)])  # one big seal each
        await s.flush()
    now[0] += 10**9
    await s.prune(datetime.fromtimestamp(now[0] / 1e6, UTC))
    await s.close()
    assert sql(tmp_path, "SELECT count(*) FROM audit_events") == [(0,)]
    # One step (one transaction, one prune seal) per big seal.
    assert sql(tmp_path, "SELECT count(*) FROM audit_seals WHERE kind = 'prune'") == [(3,)]
    assert await verify(tmp_path) == []


async def test_a_failing_prune_does_not_keep_events_from_being_indexed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> bool:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(sqlite_module, "_prune", broken)
    s = await SQLiteAuditStore.open(tmp_path, signer=SIGN)
    try:
        await s.insert_many([make_event()])
        with pytest.raises(BackendError, match="cannot prune: disk I/O error"):
            await s.prune(datetime.now(UTC))
        await s.insert_many([make_event()])
        await s.flush()
        assert sql(tmp_path, "SELECT count(*) FROM audit_events") == [(2,)]
    finally:
        await s.close()
    assert await verify(tmp_path) == []


async def test_the_audit_log_verifies_its_store_while_it_writes(tmp_path: Path) -> None:
    s = await SQLiteAuditStore.open(tmp_path, signer=SIGN)
    log = AuditLog(s)
    try:
        events = [make_event() for _ in range(5)]
        for e in events:
            await log.record(e)
            log.complete(e.id, True, "", 1.0)
        await log.close()
        await s.flush()
        report = await log.verify(CHECK)
        assert report.breaks == [] and report.events == 5
        sql(tmp_path, "DELETE FROM audit_events WHERE id = ?", (events[2].id,))
        assert [b.event_id for b in (await log.verify(CHECK)).breaks] == [events[2].id]
    finally:
        await s.close()


async def until(what: str, check: Any, deadline: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while not await check():
        assert loop.time() < end, f"{what}: not within {deadline}s"
        await asyncio.sleep(0.02)


async def test_the_end_of_the_chain_is_signed_soon_after_writes_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "SIGN_EVERY", 0.05)
    s = await SQLiteAuditStore.open(tmp_path, signer=SIGN)
    try:
        await s.insert_many([make_event()])

        async def last_is_signed() -> bool:
            rows = sql(tmp_path, "SELECT sig IS NOT NULL, items FROM audit_seals ORDER BY seq DESC LIMIT 1")
            return bool(rows) and rows[0] == (1, b"[]")

        await until("a signed seal after the last write", last_is_signed)
    finally:
        await s.close()


@pytest.mark.postgres
async def test_pg_the_end_of_the_chain_is_signed_soon_after_writes_stop(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pg_module, "SIGN_EVERY", 0.05)
    s = await PostgresAuditStore.open(dsn, signer=SIGN)
    try:
        await s.insert_many([make_event()])

        async def last_is_signed() -> bool:
            rows = await pg(
                dsn,
                f"SELECT sig IS NOT NULL AS signed, kind FROM {pg_module.SEALS} ORDER BY seq DESC LIMIT 1",
            )
            return bool(rows) and rows[0]["signed"] and rows[0]["kind"] == "seal"

        await until("a signed seal after the last write", last_is_signed)
    finally:
        await s.close()
    assert await pg_verify(dsn) == []
