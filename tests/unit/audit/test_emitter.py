"""AuditLog: durable waits, group commit, order, completions, failures, backpressure, close.

Nothing here sleeps to wait for a condition: the tests await futures and
events with deadlines (``wait_for``), so a slow machine makes them slower,
never flaky.  ``asyncio.sleep(0)`` only lets ready tasks run once, to show
that something does *not* happen without a trigger.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sqlite3
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bastion.audit.emitter import WRITER_TASK_NAME, AuditLog
from bastion.audit.events import NOTIFICATION, REQUEST, SESSION_START, AuditEvent
from bastion.audit.sqlite_store import SQLiteAuditStore, search_files
from bastion.audit.store import AuditQuery, AuditStore, Completion
from bastion.errors import BackendError

#: Seconds any awaited condition may take before the test fails.
DEADLINE = 10

T0 = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
_seconds = itertools.count()


def make_event(**overrides: Any) -> AuditEvent:
    fields: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "type": REQUEST,
        "time": T0 + timedelta(seconds=next(_seconds)),
        "success": True,
        "cluster_name": "test-cluster",
        "user": "alice",
        "app": "files",
        "session_id": "sess-1",
        "method": "tools/call",
        "request_id": 1,
        "tool": "read_file",
        "params": {"name": "read_file", "arguments": {"path": "/etc/hosts"}},
    }
    fields.update(overrides)
    return AuditEvent(**fields)


async def within(aw: Any) -> Any:
    return await asyncio.wait_for(aw, timeout=DEADLINE)


async def let_ready_tasks_run(rounds: int = 5) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


def writer_task() -> asyncio.Task[Any]:
    [task] = [t for t in asyncio.all_tasks() if t.get_name() == WRITER_TASK_NAME]
    return task


class MemoryStore:
    """An ``AuditStore`` in memory that records every call and can fail or stall on demand."""

    def __init__(self) -> None:
        #: ("insert", ids) and ("complete", [(id, success, error, duration)]) in call order.
        self.calls: list[tuple[str, list[Any]]] = []
        self.rows: dict[str, dict[str, Any]] = {}
        #: Exceptions raised by the next insert_many / complete_many calls, in order.
        self.insert_errors: list[Exception] = []
        self.complete_errors: list[Exception] = []
        #: When set, insert_many waits for ``gate`` after setting ``entered``.
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.closed = False

    async def insert_many(self, events: Sequence[AuditEvent]) -> None:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.insert_errors:
            raise self.insert_errors.pop(0)
        self.calls.append(("insert", [e.id for e in events]))
        for e in events:
            self.rows.setdefault(e.id, e.to_dict())

    async def complete_many(self, updates: Sequence[Completion]) -> None:
        if self.complete_errors:
            raise self.complete_errors.pop(0)
        self.calls.append(("complete", [tuple(u) for u in updates]))
        for u in updates:
            if u.event_id in self.rows:
                self.rows[u.event_id].update(success=u.success, error=u.error, duration_ms=u.duration_ms)

    async def search(self, query: AuditQuery) -> list[dict[str, Any]]:
        return [r for r in self.rows.values() if query.user in (None, "", r["user"])][: query.limit]

    async def close(self) -> None:
        self.closed = True

    def inserted(self) -> list[str]:
        return [i for kind, ids in self.calls if kind == "insert" for i in ids]


class BatchingStore(MemoryStore):
    """A ``MemoryStore`` that also has the optional ``write_batch`` (one transaction per batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_errors: list[Exception] = []

    async def write_batch(self, events: Sequence[AuditEvent], updates: Sequence[Completion]) -> None:
        if self.batch_errors:
            raise self.batch_errors.pop(0)
        self.calls.append(("batch", [[e.id for e in events], [tuple(u) for u in updates]]))
        await self.insert_many(events)
        self.calls.pop(-1)
        await self.complete_many(updates)
        self.calls.pop(-1)


class CountingStore:
    """Wraps a real store, counting its write transactions."""

    def __init__(self, inner: AuditStore) -> None:
        self.inner = inner
        self.insert_batches: list[int] = []
        self.complete_batches: list[int] = []

    async def insert_many(self, events: Sequence[AuditEvent]) -> None:
        self.insert_batches.append(len(events))
        await self.inner.insert_many(events)

    async def complete_many(self, updates: Sequence[Completion]) -> None:
        self.complete_batches.append(len(updates))
        await self.inner.complete_many(updates)

    async def search(self, query: AuditQuery) -> list[dict[str, Any]]:
        return await self.inner.search(query)

    async def close(self) -> None:
        await self.inner.close()


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SQLiteAuditStore]:
    s = await SQLiteAuditStore.open(tmp_path)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def memory() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
async def mlog(memory: MemoryStore) -> AsyncIterator[AuditLog]:
    log = AuditLog(memory)
    try:
        yield log
    finally:
        if memory.gate is not None:
            memory.gate.set()
        await log.close()


def raw_rows(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Rows read by an independent connection (not the store's)."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


# ------------------------------------------------------------------ durability


async def test_recorded_event_is_visible_to_another_connection(sqlite_store: SQLiteAuditStore) -> None:
    log = AuditLog(sqlite_store)
    try:
        e = make_event()
        await log.record(e)
        # Nothing else awaited in between: the event is committed already (to the
        # journal), and another process searching the audit log sees it.
        rows = await search_files(sqlite_store.path.parent, AuditQuery())
        assert [r["id"] for r in rows] == [e.id]
    finally:
        await log.close()


async def test_recorded_event_survives_a_crash_right_after(tmp_path: Path) -> None:
    # A child process records one event, says so, and dies at once without
    # closing anything; this process then reads the file.
    script = textwrap.dedent(
        """
        import asyncio, os, sys, uuid
        from datetime import UTC, datetime
        from bastion.audit.emitter import AuditLog
        from bastion.audit.events import REQUEST, AuditEvent
        from bastion.audit.sqlite_store import SQLiteAuditStore

        async def main():
            store = await SQLiteAuditStore.open(sys.argv[1])
            log = AuditLog(store)
            e = AuditEvent(id=sys.argv[2], type=REQUEST, time=datetime.now(UTC), success=True,
                           cluster_name="c", user="alice", app="files", session_id="s")
            await log.record(e)
            print("recorded", flush=True)
            os._exit(3)  # a crash: no close, no flush, no atexit

        asyncio.run(main())
        """
    )
    event_id = uuid.uuid4().hex
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        str(tmp_path),
        event_id,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await within(proc.communicate())
    assert proc.returncode == 3, err.decode()
    assert out == b"recorded\n"
    # Journaled, not indexed yet: another process's search sees it...
    assert [(r["id"], r["user"]) for r in await search_files(tmp_path, AuditQuery())] == [(event_id, "alice")]
    # ...and the next writer indexes it.
    store = await SQLiteAuditStore.open(tmp_path)
    await store.close()
    rows = raw_rows(tmp_path / "audit.db", "SELECT id, user FROM audit_events")
    assert rows == [(event_id, "alice")]


async def test_completion_updates_the_same_row(sqlite_store: SQLiteAuditStore) -> None:
    log = AuditLog(sqlite_store)
    ok, bad = make_event(), make_event()
    await asyncio.gather(log.record(ok), log.record(bad))
    log.complete(ok.id, True, "", 4.5)
    log.complete(bad.id, False, "HTTP 500 Internal Server Error", 9.0)
    await log.close()
    await sqlite_store.flush()
    rows = raw_rows(sqlite_store.path, "SELECT id, success, error, duration_ms FROM audit_events")
    assert len(rows) == 2  # one row per call
    by_id = {r[0]: r for r in rows}
    assert by_id[ok.id][1:4] == (1, "", 4.5)
    assert by_id[bad.id][1:4] == (0, "HTTP 500 Internal Server Error", 9.0)
    docs = {d["id"]: d for d in await log.search(AuditQuery())}
    doc = docs[bad.id]
    assert (doc["success"], doc["code"], doc["error"], doc["duration_ms"]) == (
        False,
        "BMCP003E",
        "HTTP 500 Internal Server Error",
        9.0,
    )
    assert (docs[ok.id]["success"], docs[ok.id]["code"], docs[ok.id]["duration_ms"]) == (
        True,
        "BMCP003I",
        4.5,
    )


# ------------------------------------------------------------------ order and group commit


async def test_everything_is_written_in_queue_order(memory: MemoryStore, mlog: AuditLog) -> None:
    start = make_event(type=SESSION_START)
    calls = [make_event() for _ in range(3)]
    note = make_event(type=NOTIFICATION)
    mlog.record_nowait(start)
    await mlog.record(calls[0])
    mlog.complete(calls[0].id, True, "", 1.0)
    mlog.record_nowait(note)
    await asyncio.gather(mlog.record(calls[1]), mlog.record(calls[2]))
    mlog.complete(calls[2].id, False, "x", 2.0)
    mlog.complete(calls[1].id, True, "", 3.0)
    await mlog.close()

    assert memory.inserted() == [start.id, calls[0].id, note.id, calls[1].id, calls[2].id]
    completes = [c for kind, cs in memory.calls if kind == "complete" for c in cs]
    assert completes == [
        (calls[0].id, True, "", 1.0),
        (calls[2].id, False, "x", 2.0),
        (calls[1].id, True, "", 3.0),
    ]
    # Every completion is written after the insert of its event.
    seen: set[str] = set()
    for kind, items in memory.calls:
        if kind == "insert":
            seen.update(items)
        else:
            assert all(c[0] in seen for c in items)


async def test_rows_are_stored_in_queue_order(sqlite_store: SQLiteAuditStore) -> None:
    log = AuditLog(sqlite_store, max_batch=7)
    events = [make_event() for _ in range(50)]
    for e in events[:25]:
        log.record_nowait(e)
    await asyncio.gather(*(log.record(e) for e in events[25:]))
    await log.close()
    await sqlite_store.flush()
    rows = raw_rows(sqlite_store.path, "SELECT id FROM audit_events ORDER BY seq")
    assert [r[0] for r in rows] == [e.id for e in events]


async def test_concurrent_records_share_transactions(sqlite_store: SQLiteAuditStore) -> None:
    counting = CountingStore(sqlite_store)
    log = AuditLog(counting)
    events = [make_event() for _ in range(300)]
    await within(asyncio.gather(*(log.record(e) for e in events)))
    # All 300 were queued before the writer ran: one transaction.
    assert counting.insert_batches == [300]
    for e in events:
        log.complete(e.id, True, "", 1.0)
    await log.close()
    assert counting.complete_batches == [300]
    await sqlite_store.flush()
    assert raw_rows(sqlite_store.path, "SELECT count(*), sum(duration_ms) FROM audit_events") == [
        (300, 300.0)
    ]


async def test_batches_are_capped(sqlite_store: SQLiteAuditStore) -> None:
    counting = CountingStore(sqlite_store)
    log = AuditLog(counting, max_batch=64)
    await within(asyncio.gather(*(log.record(make_event()) for _ in range(200))))
    await log.close()
    assert counting.insert_batches == [64, 64, 64, 8]


async def test_callers_arriving_during_a_slow_write_share_the_next_one(
    memory: MemoryStore, mlog: AuditLog
) -> None:
    memory.gate = asyncio.Event()
    first = asyncio.create_task(mlog.record(make_event()))
    await within(memory.entered.wait())  # the writer is inside the first write
    later = [asyncio.create_task(mlog.record(make_event())) for _ in range(20)]
    await let_ready_tasks_run()
    assert mlog.queue_depth == 20
    assert not first.done()
    memory.gate.set()
    await within(asyncio.gather(first, *later))
    assert [len(ids) for kind, ids in memory.calls if kind == "insert"] == [1, 20]
    assert mlog.queue_depth == 0


async def test_writer_is_a_named_task(mlog: AuditLog) -> None:
    await mlog.record(make_event())
    assert not writer_task().done()


async def test_a_store_that_can_write_a_batch_at_once_gets_one_call_per_batch() -> None:
    store = BatchingStore()
    log = AuditLog(store)
    first = make_event()
    await log.record(first)  # inserts only: insert_many
    log.complete(first.id, True, "", 1.0)
    second = make_event()
    await log.record(second)  # an insert and a completion: write_batch
    log.complete(second.id, False, "x", 2.0)
    await log.close()  # a completion only: complete_many
    assert store.calls == [
        ("insert", [first.id]),
        ("batch", [[second.id], [(first.id, True, "", 1.0)]]),
        ("complete", [(second.id, False, "x", 2.0)]),
    ]
    assert (store.rows[first.id]["duration_ms"], store.rows[second.id]["error"]) == (1.0, "x")


async def test_a_failed_batch_fails_its_waiters_and_its_outcomes_are_written_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = BatchingStore()
    log = AuditLog(store)
    first = make_event()
    await log.record(first)
    store.batch_errors = [BackendError("audit database x: cannot write: disk I/O error")]
    log.complete(first.id, True, "", 1.0)
    with (
        caplog.at_level(logging.ERROR, logger="bastion.audit"),
        pytest.raises(BackendError, match=r"^audit log unavailable: .*disk I/O error"),
    ):
        await log.record(make_event())
    await log.close()
    assert store.calls == [("insert", [first.id]), ("complete", [(first.id, True, "", 1.0)])]
    assert store.rows[first.id]["duration_ms"] == 1.0
    assert not any("lost" in r.getMessage() for r in caplog.records)


async def test_batches_are_one_transaction_with_the_sqlite_store(sqlite_store: SQLiteAuditStore) -> None:
    log = AuditLog(sqlite_store)
    calls = 0
    append = sqlite_store._append

    def counted(*args: Any) -> None:
        nonlocal calls
        calls += 1
        append(*args)

    sqlite_store._append = counted  # type: ignore[method-assign,assignment]
    events = [make_event() for _ in range(20)]
    await asyncio.gather(*(log.record(e) for e in events[:10]))
    assert calls == 1
    # Queued in the same loop iteration: calls arriving while answers come back.
    records = [asyncio.ensure_future(log.record(e)) for e in events[10:]]
    for e in events[:10]:
        log.complete(e.id, True, "", 1.0)
    await within(asyncio.gather(*records))
    assert calls == 2  # ten inserts and ten completions: one append
    await log.close()
    got = await sqlite_store.search(AuditQuery())
    assert sum(1 for g in got if g.get("duration_ms") == 1.0) == 10


# ------------------------------------------------------------------ failures


async def test_failed_commit_is_raised_and_the_writer_carries_on(memory: MemoryStore, mlog: AuditLog) -> None:
    memory.insert_errors = [BackendError("audit database x: cannot insert: disk I/O error")]
    with pytest.raises(BackendError, match=r"^audit log unavailable: .*disk I/O error"):
        await mlog.record(make_event())
    later = make_event()
    await within(mlog.record(later))
    assert memory.inserted() == [later.id]


async def test_every_waiter_of_a_failed_batch_hears_of_it(memory: MemoryStore, mlog: AuditLog) -> None:
    memory.insert_errors = [RuntimeError("bug in the store")]
    results = await within(
        asyncio.gather(*(mlog.record(make_event()) for _ in range(5)), return_exceptions=True)
    )
    assert all(isinstance(r, BackendError) for r in results)
    assert {str(r) for r in results} == {"audit log unavailable: bug in the store"}
    assert len({id(r) for r in results}) == 5  # one exception object per caller


async def test_lost_fire_and_forget_events_are_logged(
    memory: MemoryStore, mlog: AuditLog, caplog: pytest.LogCaptureFixture
) -> None:
    memory.insert_errors = [BackendError("disk full")]
    note = make_event(type=NOTIFICATION)
    mlog.record_nowait(note)
    with caplog.at_level(logging.ERROR, logger="bastion.audit"):
        await within(mlog.close())
    assert any("lost 1 events" in r.getMessage() and note.id in r.event_ids for r in caplog.records)  # type: ignore[attr-defined]


async def test_failed_completions_are_logged_and_the_writer_carries_on(
    memory: MemoryStore, mlog: AuditLog, caplog: pytest.LogCaptureFixture
) -> None:
    memory.complete_errors = [BackendError("database is locked")]
    e = make_event()
    await mlog.record(e)
    with caplog.at_level(logging.ERROR, logger="bastion.audit"):
        mlog.complete(e.id, True, "", 1.0)
        later = make_event()
        await within(mlog.record(later))
    assert any("lost 1 call outcomes" in r.getMessage() for r in caplog.records)
    assert memory.inserted() == [e.id, later.id]


async def test_completed_returns_once_the_outcomes_are_committed(sqlite_store: SQLiteAuditStore) -> None:
    log = AuditLog(sqlite_store)
    try:
        e = make_event()
        await log.record(e)
        await within(log.completed([Completion(e.id, False, "upstream said no", 4.0)]))
        # Committed when it returned: another process reads the outcome (journal or index).
        [row] = await search_files(sqlite_store.path.parent, AuditQuery())
        assert (row["success"], row["error"], row["duration_ms"]) == (False, "upstream said no", 4.0)
        await within(log.completed([]))  # nothing to wait for
    finally:
        await log.close()


async def test_completed_raises_when_the_store_fails_and_logs_nothing_as_lost(
    memory: MemoryStore, mlog: AuditLog, caplog: pytest.LogCaptureFixture
) -> None:
    memory.complete_errors = [BackendError("database is locked")]
    e = make_event()
    await mlog.record(e)
    # Raised to its caller, who still holds the outcome and may try again: not "lost".
    with (
        caplog.at_level(logging.ERROR, logger="bastion.audit"),
        pytest.raises(BackendError, match="audit log unavailable: database is locked"),
    ):
        await within(mlog.completed([Completion(e.id, True, "", 1.0)]))
    assert not [r for r in caplog.records if "lost" in r.getMessage()]
    await within(mlog.completed([Completion(e.id, True, "", 1.0)]))  # and again: written
    assert memory.rows[e.id]["duration_ms"] == 1.0


async def test_completed_is_refused_once_the_log_is_closed(memory: MemoryStore) -> None:
    log = AuditLog(memory)
    await log.record(make_event())
    await log.close()
    with pytest.raises(BackendError, match="closed"):
        await log.completed([Completion("x", True, "", 1.0)])


async def test_cancelled_caller_does_not_stop_the_writer(memory: MemoryStore, mlog: AuditLog) -> None:
    memory.gate = asyncio.Event()
    e = make_event()
    caller = asyncio.create_task(mlog.record(e))
    await within(memory.entered.wait())
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    memory.gate.set()
    # Accepted before the cancellation, so written; and the writer goes on.
    later = make_event()
    await within(mlog.record(later))
    assert memory.inserted() == [e.id, later.id]


async def test_writer_cancelled_from_outside_fails_waiters_and_closes(memory: MemoryStore) -> None:
    memory.gate = asyncio.Event()
    log = AuditLog(memory)
    first = asyncio.create_task(log.record(make_event()))
    await within(memory.entered.wait())
    queued = asyncio.create_task(log.record(make_event()))
    await let_ready_tasks_run()
    writer = writer_task()
    writer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writer
    for task in (first, queued):
        with pytest.raises(BackendError, match="audit writer was cancelled"):
            await within(task)
    with pytest.raises(BackendError, match="closed"):
        await log.record(make_event())
    await log.close()


# ------------------------------------------------------------------ backpressure


async def test_full_queue_makes_record_wait_then_proceed(memory: MemoryStore) -> None:
    memory.gate = asyncio.Event()
    log = AuditLog(memory, max_queue=2)
    try:
        log.record_nowait(make_event())
        await within(memory.entered.wait())  # the writer holds that one
        log.record_nowait(make_event())
        log.record_nowait(make_event())
        assert log.queue_depth == 2
        with pytest.raises(BackendError, match="waiting to be written"):
            log.record_nowait(make_event())
        log.complete("any", True)  # completions are never refused while open
        assert log.queue_depth == 3
        waiting = asyncio.create_task(log.record(make_event()))
        await let_ready_tasks_run()
        assert not waiting.done()
        assert log.queue_depth == 3
        memory.gate.set()
        await within(waiting)
        assert len(memory.inserted()) == 4
    finally:
        memory.gate.set()
        await log.close()


async def test_full_queue_wait_is_bounded(memory: MemoryStore) -> None:
    memory.gate = asyncio.Event()
    log = AuditLog(memory, max_queue=1, enqueue_timeout=0.05)
    try:
        log.record_nowait(make_event())
        await within(memory.entered.wait())
        log.record_nowait(make_event())
        with pytest.raises(BackendError, match=r"audit log unavailable: .* after 0.05s"):
            await within(log.record(make_event()))
    finally:
        memory.gate.set()
        await log.close()
    assert len(memory.inserted()) == 2


async def test_close_fails_callers_waiting_for_room(memory: MemoryStore) -> None:
    memory.gate = asyncio.Event()
    log = AuditLog(memory, max_queue=1)
    log.record_nowait(make_event())
    await within(memory.entered.wait())
    log.record_nowait(make_event())
    waiting = asyncio.create_task(log.record(make_event()))
    await let_ready_tasks_run()
    closing = asyncio.create_task(log.close())
    with pytest.raises(BackendError, match="closed"):
        await within(waiting)
    memory.gate.set()
    await within(closing)
    assert len(memory.inserted()) == 2


# ------------------------------------------------------------------ close


async def test_close_flushes_pending_completions(sqlite_store: SQLiteAuditStore) -> None:
    log = AuditLog(sqlite_store)
    events = [make_event() for _ in range(100)]
    await asyncio.gather(*(log.record(e) for e in events))
    for i, e in enumerate(events):
        log.complete(e.id, i % 3 != 0, "" if i % 3 else "denied", float(i))
    notes = [make_event(type=NOTIFICATION) for _ in range(10)]
    for n in notes:
        log.record_nowait(n)
    assert log.queue_depth == 110
    await log.close()
    assert log.queue_depth == 0
    await sqlite_store.flush()
    rows = raw_rows(
        sqlite_store.path, "SELECT id, success, error, duration_ms FROM audit_events ORDER BY seq"
    )
    assert rows[:100] == [
        (e.id, int(i % 3 != 0), "" if i % 3 else "denied", float(i)) for i, e in enumerate(events)
    ]
    assert [r[0] for r in rows[100:]] == [n.id for n in notes]


async def test_closed_log_refuses_writes(memory: MemoryStore) -> None:
    log = AuditLog(memory)
    await log.record(make_event())
    await log.close()
    await log.close()  # idempotent
    with pytest.raises(BackendError, match="closed"):
        await log.record(make_event())
    with pytest.raises(BackendError, match="closed"):
        log.record_nowait(make_event())
    with pytest.raises(BackendError, match="closed"):
        log.complete("x", True)
    assert not memory.closed  # the store belongs to whoever opened it


async def test_close_without_any_write(memory: MemoryStore) -> None:
    log = AuditLog(memory)
    await log.close()
    assert memory.calls == []


async def test_cancelled_close_still_flushes(memory: MemoryStore) -> None:
    memory.gate = asyncio.Event()
    log = AuditLog(memory)
    log.record_nowait(make_event())
    await within(memory.entered.wait())
    log.record_nowait(make_event())
    log.complete("x", True)
    closing = asyncio.create_task(log.close())
    await let_ready_tasks_run()
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    writer = writer_task()
    memory.gate.set()
    await within(writer)
    assert len(memory.inserted()) == 2
    assert [kind for kind, _ in memory.calls] == ["insert", "insert", "complete"]


async def test_completions_accepted_while_close_drains(memory: MemoryStore) -> None:
    log = AuditLog(memory)
    e = make_event()
    await log.record(e)
    memory.gate = asyncio.Event()
    memory.entered.clear()
    log.record_nowait(make_event())
    await within(memory.entered.wait())  # the writer is busy: close() must wait for it
    closing = asyncio.create_task(log.close())
    await let_ready_tasks_run()
    assert not closing.done()
    # The call was in flight when close() began: its outcome still counts.
    log.complete(e.id, True, "", 1.0)
    memory.gate.set()
    await within(closing)
    assert memory.rows[e.id]["duration_ms"] == 1.0
    # Once the writer has stopped, nothing more can be written.
    with pytest.raises(BackendError, match="closed"):
        log.complete(e.id, True, "", 2.0)


# ------------------------------------------------------------------ misc


async def test_search_delegates_to_the_store(sqlite_store: SQLiteAuditStore) -> None:
    log = AuditLog(sqlite_store)
    try:
        await asyncio.gather(log.record(make_event(user="alice")), log.record(make_event(user="bob")))
        got = await log.search(AuditQuery(user="bob"))
        assert [g["user"] for g in got] == ["bob"]
    finally:
        await log.close()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_batch": 0},
        {"max_queue": 0},
        {"enqueue_timeout": 0},
        {"enqueue_timeout": -1.0},
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be"):
        AuditLog(MemoryStore(), **kwargs)
