"""SQLiteAuditStore on a real file: rows, completions in place, search, secrets, failures."""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest

from bastion.audit import sqlite_store as sqlite_module
from bastion.audit import store as store_module
from bastion.audit.events import (
    INVALID_REQUEST,
    NOTIFICATION,
    REQUEST,
    SESSION_END,
    SESSION_START,
    AuditEvent,
)
from bastion.audit.redact import REDACTED, Redactor, redact_headers
from bastion.audit.sqlite_store import AUDIT_DB_NAME, SQLiteAuditStore
from bastion.audit.store import AuditQuery, Completion
from bastion.errors import BackendError, ValidationError

T0 = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
_seconds = itertools.count()


def make_event(**overrides: Any) -> AuditEvent:
    """A request event; ``at`` (seconds after ``T0``) sets its time."""
    at = overrides.pop("at", None)
    fields: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "type": REQUEST,
        "time": T0 + timedelta(seconds=at if at is not None else next(_seconds)),
        "success": True,
        "cluster_name": "test-cluster",
        "user": "alice",
        "app": "files",
        "session_id": "sess-1",
        "roles": ("access",),
        "method": "tools/call",
        "request_id": 1,
        "tool": "read_file",
        "params": {"name": "read_file", "arguments": {"path": "/etc/hosts"}},
        "transport": "http",
    }
    fields.update(overrides)
    return AuditEvent(**fields)


def as_stored(event: AuditEvent) -> dict[str, Any]:
    """What search returns for ``event``: its to_dict, through JSON."""
    doc: dict[str, Any] = orjson.loads(orjson.dumps(event.to_dict()))
    return doc


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteAuditStore]:
    s = await SQLiteAuditStore.open(tmp_path / "data")
    try:
        yield s
    finally:
        await s.close()


def raw_rows(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Rows read by an independent connection (not the store's)."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


async def indexed(store: SQLiteAuditStore, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Rows of audit.db once everything journaled is indexed, read by another connection."""
    await store.flush()
    return raw_rows(store.path, sql, params)


async def everything(store: SQLiteAuditStore) -> list[dict[str, Any]]:
    return await store.search(AuditQuery(limit=store_module.MAX_LIMIT))


# ------------------------------------------------------------------ file


async def test_file_is_private_and_in_the_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "new" / "data"
    s = await SQLiteAuditStore.open(data)
    try:
        assert s.path == data / AUDIT_DB_NAME
        await s.insert_many([make_event()])
        assert stat.S_IMODE(s.path.stat().st_mode) == 0o600
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        for suffix in ("-wal", "-shm"):
            side = s.path.with_name(s.path.name + suffix)
            if side.exists():
                assert stat.S_IMODE(side.stat().st_mode) & 0o077 == 0
        assert raw_rows(s.path, "PRAGMA journal_mode") == [("wal",)]
    finally:
        await s.close()


async def test_reopen_keeps_rows(tmp_path: Path) -> None:
    e = make_event()
    s = await SQLiteAuditStore.open(tmp_path)
    await s.insert_many([e])
    await s.close()
    s = await SQLiteAuditStore.open(tmp_path)
    try:
        assert await everything(s) == [as_stored(e)]
    finally:
        await s.close()


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    s = await SQLiteAuditStore.open(tmp_path)
    await s.close()
    conn = sqlite3.connect(tmp_path / AUDIT_DB_NAME)
    conn.execute(f"PRAGMA user_version = {sqlite_module.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(BackendError, match="newer"):
        await SQLiteAuditStore.open(tmp_path)


async def test_unusable_path_is_a_backend_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(BackendError, match="cannot create"):
        await SQLiteAuditStore.open(blocker / "data")


async def test_closed_store_refuses_and_close_is_idempotent(store: SQLiteAuditStore) -> None:
    await store.close()
    await store.close()
    with pytest.raises(BackendError, match="closed"):
        await store.insert_many([make_event()])
    with pytest.raises(BackendError, match="closed"):
        await store.complete_many([Completion("x", True)])
    with pytest.raises(BackendError, match="closed"):
        await store.search(AuditQuery())


# ------------------------------------------------------------------ rows


async def test_insert_stores_indexed_columns_and_full_json(store: SQLiteAuditStore) -> None:
    e = make_event(user="bob", app="git", session_id="s-9", headers={"Accept": "*/*"})
    await store.insert_many([e])
    rows = await indexed(
        store,
        "SELECT id, type, user, app, session_id, success, error, duration_ms, event FROM audit_events",
    )
    assert len(rows) == 1
    id_, type_, user, app, session_id, success, error, duration, event = rows[0]
    assert (id_, type_, user, app, session_id, success, error, duration) == (
        e.id,
        REQUEST,
        "bob",
        "git",
        "s-9",
        1,
        "",
        None,
    )
    assert orjson.loads(event) == as_stored(e)
    indexes = {r[0] for r in await indexed(store, "SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {
        "audit_events_time",
        "audit_events_type",
        "audit_events_user",
        "audit_events_app",
        "audit_events_session",
    } <= indexes


async def test_empty_batches_are_no_ops(store: SQLiteAuditStore) -> None:
    await store.insert_many([])
    await store.complete_many([])
    assert await everything(store) == []


async def test_insert_of_a_stored_id_keeps_the_stored_row(store: SQLiteAuditStore) -> None:
    first = make_event(tool="one")
    again = make_event(id=first.id, tool="two")
    await store.insert_many([first])
    await store.insert_many([again, make_event(tool="three")])
    got = await everything(store)
    assert [g["tool"] for g in got] == ["one", "three"]
    # The completion applies to what is stored, not to the ignored duplicate.
    await store.complete_many([Completion(first.id, False, "boom", 2.0)])
    got = await everything(store)
    assert got[0]["tool"] == "one"
    assert (got[0]["success"], got[0]["error"], got[0]["duration_ms"]) == (False, "boom", 2.0)


def _events_of_every_shape() -> list[AuditEvent]:
    paris = timezone(timedelta(hours=1))
    return [
        make_event(),
        make_event(type=SESSION_START, method="", tool="", params=None, request_id=None, roles=()),
        make_event(success=False, error="access denied", request_id=0),
        make_event(request_id="req-7", duration_ms=0.0, headers={"A": "b"}, extra={"k": [1, {"x": None}]}),
        make_event(params=(), roles=("a", "b")),
        make_event(params=[], extra={}),
        make_event(
            params="", client_info="claude-ai/0.1.0", server_info="fs/1.0", protocol_version="2025-06-18"
        ),
        make_event(time=datetime(2026, 11, 22, 13, 0, 0, 5, tzinfo=paris)),
        make_event(time=datetime(2026, 11, 22, 12, 30)),  # naive: taken as UTC
        make_event(type=INVALID_REQUEST, success=False, extra={"path": "/x", "http_method": "PUT"}),
        make_event(type=NOTIFICATION, upstream_session_id="up-1", app_uri="http://u", remote_addr="1.2.3.4"),
    ]


async def test_stored_json_is_to_dict_for_every_shape(store: SQLiteAuditStore) -> None:
    events = _events_of_every_shape()
    await store.insert_many(events)
    stored = {
        row[0]: orjson.loads(row[1]) for row in await indexed(store, "SELECT id, event FROM audit_events")
    }
    for e in events:
        assert stored[e.id] == as_stored(e), e


def test_fast_serialisation_matches_to_dict_exactly() -> None:
    # Same keys, same order, same values, same JSON text.
    for e in _events_of_every_shape():
        assert orjson.dumps(store_module._doc(e)) == orjson.dumps(e.to_dict()), e


async def test_odd_values_do_not_fail_the_write(store: SQLiteAuditStore) -> None:
    broken = "bad \ud800 text"  # a lone surrogate: not encodable as UTF-8
    e = make_event(user=broken, params={"arg": broken}, extra={"body": b"\xff\xfe raw", "tags": {"b", "a"}})
    await store.insert_many([e])
    [got] = await everything(store)
    assert got["id"] == e.id
    assert got["user"] == "bad ? text"
    assert got["params"] == {"arg": "bad ? text"}
    assert got["extra"]["body"] == "\ufffd\ufffd raw"
    assert got["extra"]["tags"] == ["a", "b"]
    await store.complete_many([Completion(e.id, False, "upstream said \udc80", 1.0)])
    [got] = await everything(store)
    assert got["error"] == "upstream said ?"


# ------------------------------------------------------------------ completions


async def test_completion_updates_the_row_in_place(store: SQLiteAuditStore) -> None:
    ok, bad = make_event(), make_event()
    await store.insert_many([ok, bad])
    await store.complete_many([Completion(ok.id, True, "", 12.5), Completion(bad.id, False, "HTTP 502", 3.0)])
    assert await indexed(store, "SELECT count(*) FROM audit_events") == [(2,)]
    cols = await indexed(store, "SELECT id, success, error, duration_ms FROM audit_events ORDER BY seq")
    assert cols == [(ok.id, 1, "", 12.5), (bad.id, 0, "HTTP 502", 3.0)]
    got_ok, got_bad = await everything(store)
    assert got_ok == as_stored(ok) | {"duration_ms": 12.5}
    assert got_bad == as_stored(bad) | {
        "success": False,
        "code": "BMCP003E",
        "error": "HTTP 502",
        "duration_ms": 3.0,
    }


async def test_completion_omits_empty_fields_like_to_dict(store: SQLiteAuditStore) -> None:
    e = make_event(success=False, error="pending", duration_ms=1.0)
    await store.insert_many([e])
    await store.complete_many([Completion(e.id, True, "", None)])
    [got] = await everything(store)
    assert "error" not in got
    assert "duration_ms" not in got
    assert (got["success"], got["code"]) == (True, "BMCP003I")


async def test_later_completion_of_the_same_event_wins(store: SQLiteAuditStore) -> None:
    e = make_event()
    await store.insert_many([e])
    await store.complete_many([Completion(e.id, True, "", 1.0), Completion(e.id, False, "late", 2.0)])
    await store.complete_many([Completion(e.id, False, "later", 3.0)])
    [got] = await everything(store)
    assert (got["success"], got["error"], got["duration_ms"]) == (False, "later", 3.0)
    assert await indexed(store, "SELECT error FROM audit_events") == [("later",)]


async def test_completion_without_an_error_text_is_stored(store: SQLiteAuditStore) -> None:
    e = make_event()
    await store.insert_many([e])
    await store.complete_many([Completion(e.id, True, None, 1.0)])  # type: ignore[arg-type]
    [got] = await everything(store)
    assert "error" not in got
    assert got["duration_ms"] == 1.0


async def test_completion_of_an_unknown_event_is_ignored(store: SQLiteAuditStore) -> None:
    await store.complete_many([Completion("no-such-event", True, "", 1.0)])
    assert await everything(store) == []


async def test_completion_after_reopen_gives_the_same_result(tmp_path: Path) -> None:
    # The JSON of events inserted by another store instance is not in
    # memory: the completion is done in SQL, with the same outcome.
    warm, cold = make_event(), make_event()
    s = await SQLiteAuditStore.open(tmp_path)
    await s.insert_many([cold])
    await s.close()
    s = await SQLiteAuditStore.open(tmp_path)
    try:
        await s.insert_many([warm])
        for done in (
            [Completion(warm.id, False, "HTTP 500", 4.0)],
            [Completion(cold.id, False, "HTTP 500", 4.0)],
        ):
            await s.complete_many(done)
        got = {g["id"]: g for g in await everything(s)}
        strip = {"id", "time"}
        assert {k: v for k, v in got[warm.id].items() if k not in strip} == {
            k: v for k, v in got[cold.id].items() if k not in strip
        }
        assert got[cold.id]["code"] == "BMCP003E"
        await s.complete_many([Completion(cold.id, True, "", None)])
        got = {g["id"]: g for g in await everything(s)}
        assert "error" not in got[cold.id]
        assert "duration_ms" not in got[cold.id]
        assert got[cold.id]["code"] == "BMCP003I"
    finally:
        await s.close()


async def test_many_completions_in_one_batch(store: SQLiteAuditStore) -> None:
    events = [make_event() for _ in range(10)]
    await store.insert_many(events)
    await store.complete_many([Completion(e.id, i % 2 == 0, f"e{i}", float(i)) for i, e in enumerate(events)])
    got = await everything(store)
    assert [(g["success"], g["error"], g["duration_ms"]) for g in got] == [
        (i % 2 == 0, f"e{i}", float(i)) for i in range(10)
    ]


async def test_the_stored_json_is_the_event_as_recorded_and_the_columns_hold_the_outcome(
    store: SQLiteAuditStore,
) -> None:
    e = make_event()
    await store.insert_many([e])
    await store.complete_many([Completion(e.id, False, "HTTP 502", 3.0)])
    [(success, error, duration, text)] = await indexed(
        store, "SELECT success, error, duration_ms, event FROM audit_events"
    )
    assert (success, error, duration) == (0, "HTTP 502", 3.0)
    assert orjson.loads(text) == as_stored(e)  # not rewritten: search merges the columns in
    [got] = await everything(store)
    assert got == as_stored(replace(e, success=False, error="HTTP 502", duration_ms=3.0))


@pytest.mark.parametrize(
    "outcome", [(True, "", 12.5), (False, "HTTP 500", 0.0), (True, "", None), (False, "late", None)]
)
async def test_completed_documents_are_to_dict_of_the_completed_event(
    store: SQLiteAuditStore, outcome: tuple[bool, str, float | None]
) -> None:
    success, error, duration = outcome
    events = _events_of_every_shape()
    await store.insert_many(events)
    stored = dict(await indexed(store, "SELECT id, event FROM audit_events"))
    await store.complete_many([Completion(e.id, success, error, duration) for e in events])
    got = {g["id"]: g for g in await everything(store)}
    for e in events:
        assert got[e.id] == as_stored(replace(e, success=success, error=error, duration_ms=duration)), e
        # Key for key, in the same order as the JSON earlier versions rewrote on completion.
        before = orjson.loads(store_module._completed_json(stored[e.id], success, error, duration))
        assert list(got[e.id].items()) == list(before.items()), e


async def test_rows_completed_by_an_earlier_version_read_the_same(store: SQLiteAuditStore) -> None:
    # Versions before 2026-11-23 rewrote the JSON on completion, as well as the columns.
    e = make_event()
    await store.insert_many([e])
    [(text,)] = await indexed(store, "SELECT event FROM audit_events")
    conn = sqlite3.connect(store.path)
    with conn:
        conn.execute(
            "UPDATE audit_events SET success = 0, error = 'boom', duration_ms = 7.0, event = ?",
            (store_module._completed_json(text, False, "boom", 7.0),),
        )
    conn.close()
    [got] = await everything(store)
    assert list(got.items()) == list(
        orjson.loads(store_module._completed_json(text, False, "boom", 7.0)).items()
    )
    assert got == as_stored(replace(e, success=False, error="boom", duration_ms=7.0))


async def test_write_batch_inserts_then_completes_in_one_transaction(store: SQLiteAuditStore) -> None:
    old, new = make_event(), make_event()
    await store.insert_many([old])
    await store.write_batch([new], [Completion(old.id, True, "", 1.0), Completion(new.id, False, "x", 2.0)])
    got = {g["id"]: g for g in await everything(store)}
    assert (got[old.id]["success"], got[old.id]["duration_ms"]) == (True, 1.0)
    assert (got[new.id]["success"], got[new.id]["error"], got[new.id]["duration_ms"]) == (False, "x", 2.0)
    await store.write_batch([], [])  # a no-op

    # All or nothing: an append that fails half-way is cut back off the journal.
    journal = journal_segment(store)
    size = journal.stat().st_size
    real_write = os.write

    def half_then_fail(fd: int, data: Any) -> int:
        real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    lost = make_event()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "write", half_then_fail)
        with pytest.raises(BackendError, match="cannot write: No space left on device"):
            await store.write_batch([lost], [Completion(old.id, False, "y", 3.0)])
    assert journal.stat().st_size == size
    got = {g["id"]: g for g in await everything(store)}
    assert lost.id not in got
    assert got[old.id]["duration_ms"] == 1.0
    await store.flush()  # and the index is unharmed
    assert len(await everything(store)) == 2


def journal_segment(store: SQLiteAuditStore) -> Path:
    """The journal segment taking appends now."""
    return store.path.parent / f"{sqlite_module.JOURNAL_NAME}.{store._segment}"


def journal_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(sqlite_module.JOURNAL_NAME))


async def test_a_write_is_journaled_and_indexed_in_the_background(store: SQLiteAuditStore) -> None:
    e = make_event()
    await store.insert_many([e])
    # Committed: in the journal, with one line, before anything is indexed.
    assert journal_segment(store).read_bytes() == orjson.dumps(as_stored(e)) + b"\n"
    assert stat.S_IMODE(journal_segment(store).stat().st_mode) == 0o600
    assert raw_rows(store.path, "SELECT count(*) FROM audit_events") == [(0,)]
    # Indexed by itself, INDEX_DELAY later; its journal segment is then removed.
    deadline = time.monotonic() + 10
    while raw_rows(store.path, "SELECT id FROM audit_events") != [(e.id,)]:
        assert time.monotonic() < deadline, "not indexed within 10 s"
        await asyncio.sleep(0.01)
    if store._indexer is not None:
        await asyncio.wait_for(store._indexer, timeout=10)
    assert all(p.stat().st_size == 0 for p in store.path.parent.glob(f"{sqlite_module.JOURNAL_NAME}.*"))


async def test_many_writes_start_indexing_at_once(
    store: SQLiteAuditStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "INDEX_DELAY", 3600.0)
    monkeypatch.setattr(sqlite_module, "INDEX_ITEMS", 10)
    await store.insert_many([make_event() for _ in range(10)])
    assert store._indexer is not None
    await asyncio.wait_for(store._indexer, timeout=10)
    assert raw_rows(store.path, "SELECT count(*) FROM audit_events") == [(10,)]


async def test_an_outcome_journaled_before_indexing_is_merged_into_the_row(store: SQLiteAuditStore) -> None:
    e = make_event()
    await store.insert_many([e])
    await store.complete_many([Completion(e.id, False, "HTTP 502", 3.0)])
    updates: list[int] = []
    store._conn.set_trace_callback(lambda sql: updates.append(1) if sql.startswith("UPDATE") else None)
    assert await indexed(store, "SELECT success, error, duration_ms FROM audit_events") == [
        (0, "HTTP 502", 3.0)
    ]
    assert updates == []  # inserted once, with its outcome
    # An outcome for an event indexed already is an UPDATE.
    await store.complete_many([Completion(e.id, True, "", 4.0)])
    assert await indexed(store, "SELECT success, error, duration_ms FROM audit_events") == [(1, "", 4.0)]
    assert updates == [1]


async def test_a_retried_insert_of_an_indexed_event_keeps_the_row_and_takes_the_outcome(
    store: SQLiteAuditStore,
) -> None:
    first = make_event(tool="one")
    await store.insert_many([first])
    await store.flush()
    await store.write_batch([make_event(id=first.id, tool="two")], [Completion(first.id, False, "boom", 2.0)])
    await store.insert_many([make_event(id=first.id, tool="three")])  # no outcome: changes nothing
    [got] = await everything(store)
    assert (got["tool"], got["success"], got["error"], got["duration_ms"]) == ("one", False, "boom", 2.0)
    [got] = [orjson.loads(t) for (t,) in await indexed(store, "SELECT event FROM audit_events")]
    assert got["tool"] == "one"
    assert await indexed(store, "SELECT success, error FROM audit_events") == [(0, "boom")]


async def test_search_sees_journaled_and_indexed_events_in_time_order(store: SQLiteAuditStore) -> None:
    old = [make_event(at=i * 10, user="alice" if i % 2 else "bob") for i in range(6)]
    await store.insert_many(old[::2])
    await store.flush()
    await store.insert_many(old[1::2])  # journaled only
    await store.complete_many([Completion(old[0].id, False, "late", 5.0)])  # for an indexed one
    assert raw_rows(store.path, "SELECT count(*) FROM audit_events") == [(3,)]
    got = await everything(store)
    assert [g["id"] for g in got] == [e.id for e in old]
    assert (got[0]["success"], got[0]["error"]) == (False, "late")
    assert [g["id"] for g in await store.search(AuditQuery(user="alice"))] == [e.id for e in old[1::2]]
    assert [g["id"] for g in await store.search(AuditQuery(limit=4))] == [e.id for e in old[:4]]
    since = T0 + timedelta(seconds=15)
    until = T0 + timedelta(seconds=45)
    assert [g["id"] for g in await store.search(AuditQuery(since=since, until=until))] == [
        e.id for e in old[2:5]
    ]
    # Another process sees the same, without opening the log for writing.
    assert await sqlite_module.search_files(store.path.parent, AuditQuery(limit=100)) == got
    # Newest first: the journaled (newer here) and the indexed merged, the newest taken.
    newest = await store.search(AuditQuery(order="desc", limit=4))
    assert [g["id"] for g in newest] == [e.id for e in reversed(old[2:])]
    assert [g["id"] for g in await store.search(AuditQuery(order="desc", user="bob", limit=2))] == [
        old[4].id,
        old[2].id,
    ]
    assert await sqlite_module.search_files(store.path.parent, AuditQuery(order="desc", limit=4)) == newest


async def test_indexing_runs_in_a_worker_thread(
    store: SQLiteAuditStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[int] = []
    real = sqlite_module._index_rows

    def spy(*args: Any) -> str:
        threads.append(threading.get_ident())
        return real(*args)

    monkeypatch.setattr(sqlite_module, "_index_rows", spy)
    await store.insert_many([make_event()])
    await store.flush()
    assert threads and threading.get_ident() not in threads


async def test_a_journal_left_by_a_crash_is_indexed_at_open(tmp_path: Path) -> None:
    s = await SQLiteAuditStore.open(tmp_path)
    done, open_ = make_event(), make_event()
    await s.insert_many([done, open_])
    await s.complete_many([Completion(done.id, False, "HTTP 500", 4.0)])
    # A crash: nothing indexed, the files simply left as they are.
    s._closed = True
    if s._timer is not None:
        s._timer.cancel()
    s._conn.close()
    os.close(s._jfd)
    os.close(s._lock_fd)
    segment = tmp_path / f"{sqlite_module.JOURNAL_NAME}.{s._segment}"
    with segment.open("ab") as f:
        f.write(b'{"event":"mcp.session.request","id":"torn-by-a-cr')  # an OS crash mid-write
    s = await SQLiteAuditStore.open(tmp_path)
    try:
        assert journal_files(tmp_path) == [f"{sqlite_module.JOURNAL_NAME}.{s._segment}"]
        assert s._segment > int(segment.name.rsplit(".", 1)[1])
        rows = raw_rows(s.path, "SELECT id, success, error, duration_ms FROM audit_events ORDER BY seq")
        assert rows == [(done.id, 0, "HTTP 500", 4.0), (open_.id, 1, "", None)]
    finally:
        await s.close()


async def test_close_indexes_everything_and_removes_the_journal(tmp_path: Path) -> None:
    s = await SQLiteAuditStore.open(tmp_path)
    events = [make_event() for _ in range(5)]
    await s.insert_many(events)
    await s.close()
    assert journal_files(tmp_path) == []
    assert raw_rows(s.path, "SELECT count(*) FROM audit_events") == [(5,)]


async def test_only_one_process_writes_an_audit_log(tmp_path: Path) -> None:
    s = await SQLiteAuditStore.open(tmp_path)
    try:
        with pytest.raises(BackendError, match=r"in use by another process .*audit\.lock"):
            await SQLiteAuditStore.open(tmp_path)
        await s.insert_many([make_event()])
    finally:
        await s.close()
    s = await SQLiteAuditStore.open(tmp_path)  # free again once closed
    await s.close()


async def test_nothing_is_kept_in_memory_once_indexed(store: SQLiteAuditStore) -> None:
    await store.insert_many([make_event(type=SESSION_START) for _ in range(500)])
    await store.insert_many([make_event() for _ in range(500)])
    await store.flush()
    sizes = {k: len(v) for k, v in vars(store).items() if isinstance(v, dict | list | set)}
    assert all(n < 100 for n in sizes.values()), sizes


# ------------------------------------------------------------------ search


@pytest.fixture
async def populated(store: SQLiteAuditStore) -> list[AuditEvent]:
    events = [
        make_event(at=10, user="alice", app="files", session_id="s1"),
        make_event(at=20, user="bob", app="files", session_id="s2", type=SESSION_START),
        make_event(at=30, user="alice", app="git", session_id="s3"),
        make_event(at=40, user="alice", app="files", session_id="s1", type=NOTIFICATION),
        make_event(at=50, user="bob", app="git", session_id="s4", type=SESSION_END),
    ]
    # Inserted out of time order: results are ordered by event time.
    await store.insert_many(events[3:])
    await store.insert_many(events[:3])
    return events


async def search_times(store: SQLiteAuditStore, **filters: Any) -> list[int]:
    got = await store.search(AuditQuery(**filters))
    return [round((datetime.fromisoformat(g["time"]) - T0).total_seconds()) for g in got]


async def test_search_everything_oldest_first(store: SQLiteAuditStore, populated: list[AuditEvent]) -> None:
    assert await search_times(store) == [10, 20, 30, 40, 50]
    assert await store.search(AuditQuery()) == [as_stored(e) for e in populated]


async def test_search_time_range_is_since_inclusive_until_exclusive(
    store: SQLiteAuditStore, populated: list[AuditEvent]
) -> None:
    def at(seconds: int) -> datetime:
        return T0 + timedelta(seconds=seconds)

    assert await search_times(store, since=at(20)) == [20, 30, 40, 50]
    assert await search_times(store, until=at(40)) == [10, 20, 30]
    assert await search_times(store, since=at(20), until=at(40)) == [20, 30]
    assert await search_times(store, since=at(21), until=at(29)) == []
    # Naive datetimes are UTC; other zones are converted.
    assert await search_times(store, since=at(30).replace(tzinfo=None)) == [30, 40, 50]
    plus2 = timezone(timedelta(hours=2))
    assert await search_times(store, since=at(30).astimezone(plus2), until=at(31).astimezone(plus2)) == [30]


async def test_search_filters(store: SQLiteAuditStore, populated: list[AuditEvent]) -> None:
    assert await search_times(store, user="alice") == [10, 30, 40]
    assert await search_times(store, app="git") == [30, 50]
    assert await search_times(store, session_id="s1") == [10, 40]
    assert await search_times(store, types=(SESSION_START, SESSION_END)) == [20, 50]
    assert await search_times(store, types=(REQUEST,), user="alice", app="files") == [10]
    assert await search_times(store, user="nobody") == []
    assert await search_times(store, user=None, app="", session_id=None) == [10, 20, 30, 40, 50]
    assert await search_times(store, user="alice", since=T0 + timedelta(seconds=15), limit=1) == [30]


async def test_search_limit(store: SQLiteAuditStore, populated: list[AuditEvent]) -> None:
    assert await search_times(store, limit=2) == [10, 20]
    assert await search_times(store, limit=1, since=T0 + timedelta(seconds=35)) == [40]


async def test_search_newest_first_takes_the_newest(
    store: SQLiteAuditStore, populated: list[AuditEvent]
) -> None:
    assert await search_times(store, order="desc") == [50, 40, 30, 20, 10]
    assert await search_times(store, order="desc", limit=2) == [50, 40]
    assert await search_times(store, order="desc", limit=2, user="alice") == [40, 30]
    assert await search_times(store, order="desc", limit=1, until=T0 + timedelta(seconds=35)) == [30]
    assert await store.search(AuditQuery(order="desc")) == [as_stored(e) for e in reversed(populated)]


async def test_search_newest_first_same_time_is_reverse_insertion_order(store: SQLiteAuditStore) -> None:
    events = [make_event(at=5, tool=f"t{i}") for i in range(4)]
    await store.insert_many(events[2:])
    await store.insert_many(events[:2])
    got = await store.search(AuditQuery(order="desc", limit=3))
    assert [g["tool"] for g in got] == ["t1", "t0", "t3"]


async def test_search_sees_completions(store: SQLiteAuditStore, populated: list[AuditEvent]) -> None:
    await store.complete_many([Completion(populated[0].id, False, "denied", 0.5)])
    [got] = await store.search(AuditQuery(until=T0 + timedelta(seconds=11)))
    assert (got["success"], got["error"], got["code"]) == (False, "denied", "BMCP003E")


async def test_search_filter_values_are_data_not_sql(store: SQLiteAuditStore) -> None:
    await store.insert_many([make_event(user="o'brien"), make_event(user="%")])
    assert len(await store.search(AuditQuery(user="o'brien"))) == 1
    assert len(await store.search(AuditQuery(user="%"))) == 1
    assert await store.search(AuditQuery(user="' OR 1=1 --")) == []


def test_query_limit_must_not_be_negative() -> None:
    with pytest.raises(ValidationError, match="limit"):
        AuditQuery(limit=-1)


def test_query_limit_zero_means_no_limit_and_there_is_no_cap() -> None:
    assert AuditQuery(limit=0).limit == 0
    assert AuditQuery(limit=store_module.MAX_LIMIT + 1).limit == store_module.MAX_LIMIT + 1


def test_query_outcome_is_success_or_failure() -> None:
    with pytest.raises(ValidationError, match='outcome must be "success" or "failure", got "ok"'):
        AuditQuery(outcome="ok")


def test_query_order_must_be_asc_or_desc() -> None:
    with pytest.raises(ValidationError, match='audit search order must be "asc" or "desc", got "newest"'):
        AuditQuery(order="newest")


# ------------------------------------------------------------------ secrets


async def test_secrets_never_reach_the_file(store: SQLiteAuditStore) -> None:
    secrets = ["hunter2-pw", "tok-abc123", "sk-live-key", "Bearer eyJhbGciOi", "sid=cookie-val", "apikey-777"]
    redact = Redactor()
    params = {
        "name": "deploy",
        "arguments": {
            "db": {"url": "postgres://db", "password": secrets[0]},
            "steps": [{"run": "echo hi", "env": {"GITHUB_TOKEN": secrets[1]}}],
            "stripeSecretKey": secrets[2],
        },
    }
    headers = {"Authorization": secrets[3], "Cookie": secrets[4], "X-API-Key": secrets[5], "Accept": "*/*"}
    e = make_event(params=redact(params), headers=redact_headers(headers))
    await store.insert_many([e])
    await store.complete_many([Completion(e.id, True, "", 5.0)])

    [got] = await everything(store)
    assert got["params"]["arguments"]["db"] == {"url": "postgres://db", "password": REDACTED}
    assert got["params"]["arguments"]["steps"][0]["env"] == {"GITHUB_TOKEN": REDACTED}
    assert got["headers"] == {
        "Authorization": REDACTED,
        "Cookie": REDACTED,
        "X-API-Key": REDACTED,
        "Accept": "*/*",
    }
    await store.close()  # everything checkpointed into the main file
    blob = b"".join(p.read_bytes() for p in store.path.parent.iterdir() if p.name.startswith(AUDIT_DB_NAME))
    assert b"postgres://db" in blob  # the data is there...
    for secret in secrets:
        assert secret.encode() not in blob  # ...the secrets are not


# ------------------------------------------------------------------ failures


async def test_an_index_that_cannot_be_written_keeps_the_journal_and_retries(
    store: SQLiteAuditStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sqlite_module, "INDEX_RETRY", 0.05)
    conn = sqlite3.connect(store.path)
    conn.execute(
        "CREATE TRIGGER no_rows BEFORE INSERT ON audit_events BEGIN SELECT RAISE(ABORT, 'nope'); END"
    )
    conn.commit()
    conn.close()
    events = [make_event() for _ in range(3)]
    await store.insert_many(events[:2])  # committed: journaled
    with (
        caplog.at_level(logging.ERROR, logger="bastion.audit"),
        pytest.raises(BackendError, match=r"audit database .*: cannot index: nope"),
    ):
        await store.flush()
    assert any("cannot index 2 journaled items" in r.getMessage() for r in caplog.records)
    await store.insert_many(events[2:])
    # Searches still see them (from the journal), in order.
    assert [g["id"] for g in await everything(store)] == [e.id for e in events]
    conn = sqlite3.connect(store.path)
    conn.execute("DROP TRIGGER no_rows")
    conn.commit()
    conn.close()
    deadline = time.monotonic() + 10  # the retry indexes them by itself
    while raw_rows(store.path, "SELECT count(*) FROM audit_events") != [(3,)]:
        assert time.monotonic() < deadline, "not indexed after the index was repaired"
        await asyncio.sleep(0.02)
    assert [g["id"] for g in await everything(store)] == [e.id for e in events]


async def test_writes_are_refused_when_too_much_waits_to_be_indexed(
    store: SQLiteAuditStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "MAX_UNINDEXED", 5)
    monkeypatch.setattr(sqlite_module, "INDEX_RETRY", 3600.0)
    conn = sqlite3.connect(store.path)
    conn.execute("DROP TABLE audit_events")
    conn.close()
    await store.insert_many([make_event() for _ in range(5)])
    with pytest.raises(BackendError):
        await store.flush()
    with pytest.raises(
        BackendError, match=r"cannot insert: 5 journaled events wait to be indexed \(no such table"
    ):
        await store.insert_many([make_event()])
    with pytest.raises(BackendError, match=r"cannot search: no such table"):
        await store.search(AuditQuery())


async def test_a_slow_indexer_slows_writes_down_instead_of_failing_them(
    store: SQLiteAuditStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "INDEX_ITEMS", 10)
    monkeypatch.setattr(sqlite_module, "INDEX_BEHIND", 50)
    monkeypatch.setattr(sqlite_module, "MAX_UNINDEXED", 100)
    real = sqlite_module._index_rows

    def slow(*args: Any) -> str:
        time.sleep(0.05)  # a slow disk, in the indexer's thread
        return real(*args)

    monkeypatch.setattr(sqlite_module, "_index_rows", slow)
    most = 0
    for _ in range(40):
        await store.insert_many([make_event() for _ in range(10)])  # faster than it indexes
        most = max(most, len(store._rows) + len(store._updates) + store._indexing)
    assert most <= 50 + 10
    assert len(await everything(store)) == 400
    assert await indexed(store, "SELECT count(*) FROM audit_events") == [(400,)]


async def test_a_transaction_left_open_does_not_wedge_the_writer(store: SQLiteAuditStore) -> None:
    # As after a COMMIT that failed and a ROLLBACK that failed too.
    store._conn.execute("BEGIN")
    e = make_event()
    await store.insert_many([e])
    assert await indexed(store, "SELECT id FROM audit_events") == [(e.id,)]


async def test_cancelled_close_still_closes(tmp_path: Path) -> None:
    s = await SQLiteAuditStore.open(tmp_path)
    await s.insert_many([make_event()])
    closing = asyncio.create_task(s.close())
    await asyncio.sleep(0)  # let it start
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    await asyncio.wait_for(s.close(), timeout=10)  # joins the close under way
    # The last connection is closed: the WAL was checkpointed and removed.
    assert not (tmp_path / f"{AUDIT_DB_NAME}-wal").exists()
    with pytest.raises(BackendError, match="closed"):
        await s.insert_many([make_event()])


async def test_the_wal_starts_again_and_stays_small(
    store: SQLiteAuditStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Checkpoints run after commits in the indexer's thread, where nothing else
    # writes: they finish, and the next commit starts the WAL from its beginning.
    monkeypatch.setattr(sqlite_module, "CHECKPOINT_ROWS", 50)
    wal = Path(f"{store.path}-wal")

    def wal_restarts() -> int:
        # The WAL header's "checkpoint sequence number" (bytes 12-15) counts its restarts.
        with wal.open("rb") as f:
            return int.from_bytes(f.read(16)[12:16], "big")

    await store.insert_many([make_event(params={"blob": "x" * 500}) for _ in range(60)])
    await store.flush()
    first = wal_restarts()
    for _ in range(6):
        await store.insert_many([make_event(params={"blob": "x" * 500}) for _ in range(60)])
        await store.flush()
    assert wal_restarts() - first >= 5
    assert wal.stat().st_size < 4 << 20
    assert len(await everything(store)) == 7 * 60


async def test_a_big_wal_is_truncated(store: SQLiteAuditStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_module, "WAL_LIMIT", 64 * 1024)
    monkeypatch.setattr(sqlite_module, "CHECKPOINT_ROWS", 1000)  # a checkpoint after each batch below
    wal = Path(f"{store.path}-wal")
    for batch in range(3):
        await store.insert_many(
            [make_event(id=f"e{batch}-{i}", params={"blob": "x" * 500}) for i in range(2000)]
        )
        await store.flush()
    assert wal.stat().st_size < sqlite_module.WAL_LIMIT  # truncated, not ever-growing
    assert len(await everything(store)) == 3 * 2000
