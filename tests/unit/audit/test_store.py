"""SQLiteAuditStore on a real file: rows, completions in place, search, secrets, failures."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import stat
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest

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
from bastion.audit.store import AUDIT_DB_NAME, AuditQuery, Completion, SQLiteAuditStore
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
    conn.execute(f"PRAGMA user_version = {store_module.SCHEMA_VERSION + 1}")
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
    rows = raw_rows(
        store.path,
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
    indexes = {r[0] for r in raw_rows(store.path, "SELECT name FROM sqlite_master WHERE type = 'index'")}
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
        row[0]: orjson.loads(row[1]) for row in raw_rows(store.path, "SELECT id, event FROM audit_events")
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
    assert raw_rows(store.path, "SELECT count(*) FROM audit_events") == [(2,)]
    cols = raw_rows(store.path, "SELECT id, success, error, duration_ms FROM audit_events ORDER BY seq")
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
    assert raw_rows(store.path, "SELECT error FROM audit_events") == [("later",)]


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
    [(success, error, duration, text)] = raw_rows(
        store.path, "SELECT success, error, duration_ms, event FROM audit_events"
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
    stored = dict(raw_rows(store.path, "SELECT id, event FROM audit_events"))
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
    [(text,)] = raw_rows(store.path, "SELECT event FROM audit_events")
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

    # All or nothing: a failing completion undoes the inserts of the same batch.
    conn = sqlite3.connect(store.path)
    conn.execute(
        "CREATE TRIGGER no_updates BEFORE UPDATE ON audit_events BEGIN SELECT RAISE(ABORT, 'nope'); END"
    )
    conn.close()
    lost = make_event()
    with pytest.raises(BackendError, match="cannot write: nope"):
        await store.write_batch([lost], [Completion(old.id, False, "y", 3.0)])
    assert lost.id not in {g["id"] for g in await everything(store)}


async def test_nothing_is_kept_in_memory_per_event(store: SQLiteAuditStore) -> None:
    # Earlier versions kept each call's JSON until its completion (and kept that of
    # events never completed until evicted).
    await store.insert_many([make_event(type=SESSION_START) for _ in range(500)])
    await store.insert_many([make_event() for _ in range(500)])
    sizes = {k: len(v) for k, v in vars(store).items() if isinstance(v, dict | list | set)}
    assert all(n < 100 for n in sizes.values()), sizes


async def test_checkpoints_run_off_the_loop(store: SQLiteAuditStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "CHECKPOINT_PAGES", 5)
    await store.insert_many([make_event() for _ in range(6)])
    tasks = [t for t in asyncio.all_tasks() if t.get_name() == "bastion-audit-checkpoint"]
    assert len(tasks) == 1
    await asyncio.wait_for(tasks[0], timeout=10)
    # The writer does not checkpoint inside its commits.
    assert raw_rows(store.path, "PRAGMA wal_autocheckpoint") == [(1000,)]  # a fresh connection's default
    await store.insert_many([make_event() for _ in range(6)])
    assert len(await everything(store)) == 12


async def test_the_wal_starts_again_under_constant_writes(
    store: SQLiteAuditStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A checkpoint beside a writer that never pauses never catches up, and the
    # WAL only grows; the store's last checkpoint round holds the writes back so
    # that it does, and the next write starts the WAL again from its beginning.
    monkeypatch.setattr(store_module, "CHECKPOINT_PAGES", 100)
    monkeypatch.setattr(store_module, "HOLD_FRAMES", 200)
    wal = Path(f"{store.path}-wal")

    def wal_restarts() -> int:
        # The WAL header's "checkpoint sequence number" (bytes 12-15) counts its restarts.
        with wal.open("rb") as f:
            return int.from_bytes(f.read(16)[12:16], "big")

    first = None
    batches = 0
    while batches < 3000:
        events = [make_event(params={"blob": "x" * 500}) for _ in range(10)]
        await store.write_batch(events, [Completion(e.id, True, "", 1.0) for e in events])
        batches += 1
        await asyncio.sleep(0)  # the checkpoint task's turn
        if first is None:
            first = wal_restarts()
        elif wal_restarts() - first >= 5:
            break
    assert wal_restarts() - (first or 0) >= 5, batches
    assert len(await everything(store)) == 10 * batches


async def test_writes_wait_while_a_checkpoint_holds_them(store: SQLiteAuditStore) -> None:
    hold = asyncio.get_running_loop().create_future()
    store._hold = hold
    e = make_event()
    writing = asyncio.create_task(store.insert_many([e]))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not writing.done()
    assert raw_rows(store.path, "SELECT count(*) FROM audit_events") == [(0,)]
    store._release_hold()
    await asyncio.wait_for(writing, timeout=10)
    assert raw_rows(store.path, "SELECT id FROM audit_events") == [(e.id,)]


async def test_a_hold_that_is_never_released_delays_writes_only_a_little(
    store: SQLiteAuditStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As when the checkpoint's thread is stuck in an fsync.
    monkeypatch.setattr(store_module, "HOLD_MAX", 0.01)
    store._hold = asyncio.get_running_loop().create_future()
    await asyncio.wait_for(store.insert_many([make_event()]), timeout=10)
    assert raw_rows(store.path, "SELECT count(*) FROM audit_events") == [(1,)]
    # ...and once: the writes after it do not wait for that hold any more.
    assert store._hold is None
    monkeypatch.setattr(store_module, "HOLD_MAX", 3600)
    await asyncio.wait_for(store.insert_many([make_event()]), timeout=10)
    store._release_hold()


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


async def test_search_sees_completions(store: SQLiteAuditStore, populated: list[AuditEvent]) -> None:
    await store.complete_many([Completion(populated[0].id, False, "denied", 0.5)])
    [got] = await store.search(AuditQuery(until=T0 + timedelta(seconds=11)))
    assert (got["success"], got["error"], got["code"]) == (False, "denied", "BMCP003E")


async def test_search_filter_values_are_data_not_sql(store: SQLiteAuditStore) -> None:
    await store.insert_many([make_event(user="o'brien"), make_event(user="%")])
    assert len(await store.search(AuditQuery(user="o'brien"))) == 1
    assert len(await store.search(AuditQuery(user="%"))) == 1
    assert await store.search(AuditQuery(user="' OR 1=1 --")) == []


@pytest.mark.parametrize("limit", [0, -1, store_module.MAX_LIMIT + 1])
def test_query_limit_must_be_sane(limit: int) -> None:
    with pytest.raises(ValidationError, match="limit"):
        AuditQuery(limit=limit)


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


async def test_sqlite_failures_become_backend_errors(store: SQLiteAuditStore) -> None:
    conn = sqlite3.connect(store.path)
    conn.execute("DROP TABLE audit_events")
    conn.close()
    with pytest.raises(BackendError, match=r"audit database .*: cannot insert: no such table"):
        await store.insert_many([make_event()])
    with pytest.raises(BackendError, match=r"cannot complete: no such table"):
        await store.complete_many([Completion("x", True)])
    with pytest.raises(BackendError, match=r"cannot search: no such table"):
        await store.search(AuditQuery())


async def test_a_transaction_left_open_does_not_wedge_the_writer(store: SQLiteAuditStore) -> None:
    # As after a COMMIT that failed and a ROLLBACK that failed too.
    store._conn.execute("BEGIN")  # type: ignore[union-attr]
    e = make_event()
    await store.insert_many([e])
    assert raw_rows(store.path, "SELECT id FROM audit_events") == [(e.id,)]


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


async def test_a_big_wal_is_truncated(store: SQLiteAuditStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import bastion.audit.store as store_mod

    monkeypatch.setattr(store_mod, "WAL_LIMIT", 64 * 1024)
    monkeypatch.setattr(store_mod, "CHECKPOINT_PAGES", 1000)  # a checkpoint after each batch below
    wal = Path(f"{store.path}-wal")
    for batch in range(3):
        await store.insert_many(
            [make_event(id=f"e{batch}-{i}", params={"blob": "x" * 500}) for i in range(2000)]
        )
        if store._checkpointer is not None:
            await store._checkpointer
    assert wal.stat().st_size < store_mod.WAL_LIMIT  # truncated, not ever-growing
    assert len(await everything(store)) == 3 * 2000
