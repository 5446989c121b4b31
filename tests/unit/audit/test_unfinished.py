"""Calls without an outcome completed as "outcome unknown": the reason, and both real stores.

The stores run on a real SQLite file and the machine's real PostgreSQL (a fresh database):
the sweep completes only old calls that have no outcome, says why, leaves everything else as
it is, lets a real outcome that arrives later win, and keeps the log verifiable (ADR 32).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from bastion.audit import unfinished
from bastion.audit.events import NOTIFICATION
from bastion.audit.pg_store import PostgresAuditStore
from bastion.audit.spool import SpoolingAuditStore
from bastion.audit.sqlite_store import SQLiteAuditStore, verify_files
from bastion.audit.store import AuditQuery, Completion
from tests.pg import fresh_database
from tests.unit.audit.test_chain import CHECK, SIGN
from tests.unit.audit.test_store import T0, make_event

AFTER = timedelta(hours=1)


def test_the_reason_says_whether_the_app_service_is_gone() -> None:
    gone = unfinished.reason_for("0123abcd.s1", {"live0000"}, AFTER)
    assert gone.startswith("outcome unknown: no outcome was recorded within 1h")
    assert "the app service that carried the call is gone" in gone
    alive = unfinished.reason_for("live0000.s1", {"live0000"}, AFTER)
    assert "did not report it" in alive and "gone" not in alive
    # A session id without a route tag: nothing to tell about its app service.
    assert "did not report it" in unfinished.reason_for("plain-session", set(), AFTER)


class Sweepable:
    """One store under test, and how to reopen or verify it."""

    def __init__(self, kind: str, where: Any) -> None:
        self.kind = kind
        self.where = where

    async def open(self) -> Any:
        if self.kind == "sqlite":
            return await SQLiteAuditStore.open(self.where, signer=SIGN)
        return await PostgresAuditStore.open(self.where, signer=SIGN)

    async def breaks(self) -> list[tuple[str, str]]:
        if self.kind == "sqlite":
            report = await verify_files(self.where, CHECK)
        else:
            reader = await PostgresAuditStore.open(self.where, seal=False)
            try:
                report = await reader.verify(CHECK)
            finally:
                await reader.close()
        return [(b.event_id, b.reason) for b in report.breaks]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def sweepable(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Sweepable]:
    if request.param == "sqlite":
        yield Sweepable("sqlite", tmp_path / "data")
        return
    async with fresh_database() as dsn:
        yield Sweepable("postgres", dsn)


def by_id(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in rows}


async def test_old_calls_without_an_outcome_are_completed_with_the_reason(sweepable: Sweepable) -> None:
    store = await sweepable.open()
    try:
        open_live = make_event(at=0, session_id="live0000.s1")
        open_gone = make_event(at=1, session_id="gone0000.s2")
        done = make_event(at=2, session_id="live0000.s1")
        failed = make_event(at=3, session_id="live0000.s1")
        note = make_event(at=4, type=NOTIFICATION, session_id="live0000.s1")
        recent = make_event(at=7200, session_id="gone0000.s2")
        await store.insert_many([open_live, open_gone, done, failed, note, recent])
        await store.complete_many(
            [Completion(done.id, True, "", 3.0), Completion(failed.id, False, "no", 1.0)]
        )
        live = {"live0000"}
        complete: Callable[..., Any] = store.complete_unfinished
        now = T0 + timedelta(hours=1, minutes=1)
        assert await unfinished.sweep(complete, now=now, after=AFTER, live_tags=live) == 2
        assert await unfinished.sweep(complete, now=now, after=AFTER, live_tags=live) == 0
        rows = by_id(await store.search(AuditQuery()))
        assert rows[open_live.id]["success"] is False
        assert "did not report it" in rows[open_live.id]["error"]
        assert "duration_ms" not in rows[open_live.id]
        assert rows[open_live.id]["code"] == "BMCP003E"
        assert "app service that carried the call is gone" in rows[open_gone.id]["error"]
        # Everything else as it was: outcomes kept, a notification is not a call, a recent
        # call may still be running.
        assert (rows[done.id]["success"], rows[done.id]["duration_ms"]) == (True, 3.0)
        assert (rows[failed.id]["error"], rows[failed.id]["duration_ms"]) == ("no", 1.0)
        assert rows[note.id]["success"] is True and "error" not in rows[note.id]
        assert rows[recent.id]["success"] is True and "error" not in rows[recent.id]
        # The real outcome, delivered late (an outcome queue replayed), replaces "unknown".
        await store.complete_many([Completion(open_live.id, True, "", 12.5)])
        rows = by_id(await store.search(AuditQuery()))
        assert (rows[open_live.id]["success"], rows[open_live.id]["duration_ms"]) == (True, 12.5)
        assert "error" not in rows[open_live.id]
    finally:
        await store.close()
    # Sealed like any completion: the log still verifies, the late outcome included.
    assert await sweepable.breaks() == []


async def test_a_backlog_is_completed_in_batches(
    sweepable: Sweepable, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(unfinished, "BATCH", 3)
    store = await sweepable.open()
    try:
        events = [make_event(at=i, session_id="gone0000.s") for i in range(7)]
        await store.insert_many(events)
        n = await unfinished.sweep(
            store.complete_unfinished, now=T0 + timedelta(hours=2), after=AFTER, live_tags=set()
        )
        assert n == 7
        rows = await store.search(AuditQuery())
        assert all(r["success"] is False and r["error"].startswith("outcome unknown") for r in rows)
    finally:
        await store.close()
    assert await sweepable.breaks() == []


async def test_behind_a_spool_nothing_is_swept_while_outcomes_wait_in_it(tmp_path: Path) -> None:
    primary = await SQLiteAuditStore.open(tmp_path / "data")
    spool = SpoolingAuditStore(primary, tmp_path / "spool.db")
    try:
        e = make_event(at=0, session_id="gone0000.s")
        await spool.insert_many([e])
        now = T0 + timedelta(hours=2)
        spool._pending = 1  # as if an outcome were waiting on disk for the database
        assert await unfinished.sweep(spool.complete_unfinished, now=now, after=AFTER, live_tags=()) == 0
        spool._pending = 0
        assert await unfinished.sweep(spool.complete_unfinished, now=now, after=AFTER, live_tags=()) == 1
    finally:
        await spool.close()
