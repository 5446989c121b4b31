"""An audit store that never loses an event while its database is away: a local on-disk spool.

``SpoolingAuditStore(primary, spool_path)`` writes to ``primary`` (PostgreSQL)
while it answers.  When a write fails or takes longer than ``write_timeout``,
that write and every later one go to a local SQLite file (WAL, one
transaction per batch — the same durability as the audit log on a single
node), and the caller is told "committed": the request goes upstream with its
event safe on disk.  A drainer replays the spool to the primary in order,
oldest first, and deletes each batch only after the primary committed it;
then writes go straight to the primary again.

Nothing is doubled: events are inserted by id with ``ON CONFLICT DO NOTHING``
and completions set the outcome of an id, so replaying a batch that the
primary had in fact committed (the answer was lost) changes nothing.
Nothing is lost: a batch leaves the spool only after the primary's commit.
Order holds: while anything is spooled, new writes queue behind it.

Draining is batched (decision 0035): up to ``DRAIN_ITEMS`` spooled events and
outcomes go to the primary in one transaction (its inserts, then its outcomes:
an outcome is always spooled after its event, so it is never written before
it), so the backlog of an outage drains many times faster than calls arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from bastion._tasks import stop_tasks
from bastion.audit import codec
from bastion.audit.chain import Checker, VerifyReport
from bastion.audit.events import AuditEvent
from bastion.audit.store import AuditQuery, AuditStore, Completion, FeedPage, iter_search
from bastion.errors import BackendError

log = logging.getLogger("bastion.audit.spool")

_INSERT, _COMPLETE = "insert", "complete"
#: Spooled events and outcomes replayed to the primary in one transaction, at most.
DRAIN_ITEMS = 4096
_SCHEMA = "CREATE TABLE IF NOT EXISTS spool (seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, body BLOB NOT NULL)"


class SpoolingAuditStore:
    def __init__(
        self,
        primary: AuditStore,
        spool_path: Path,
        *,
        write_timeout: float = 3.0,
        retry_min: float = 0.25,
        retry_max: float = 5.0,
        target: str = "the audit database",
    ) -> None:
        """``target``: what ``primary`` is, in log lines ("the cluster" for a joined app
        service's queue of call outcomes)."""
        self.primary = primary
        self.target = target
        self.path = spool_path
        self.write_timeout = write_timeout
        self._retry = (retry_min, retry_max)
        spool_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._db = sqlite3.connect(spool_path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        self._pending = int(self._db.execute("SELECT count(*) FROM spool").fetchone()[0])
        self._drainer: asyncio.Task[None] | None = None
        self._closed = False
        if self._pending:
            log.warning(
                "audit events spooled by an earlier run will be written",
                extra={"batches": self._pending, "to": self.target},
            )

    # ----------------------------------------------------------------- API

    @property
    def spooled(self) -> int:
        """Batches waiting on disk for the primary."""
        return self._pending

    async def insert_many(self, events: Sequence[AuditEvent]) -> None:
        await self.write_batch(events, ())

    async def complete_many(self, updates: Sequence[Completion]) -> None:
        await self.write_batch((), updates)

    async def write_batch(self, events: Sequence[AuditEvent], updates: Sequence[Completion]) -> None:
        """``insert_many(events)`` then ``complete_many(updates)``: one transaction, here or in the spool."""
        if not (events or updates):
            return
        if not self._pending:
            try:
                async with asyncio.timeout(self.write_timeout):
                    await self._to_primary(events, updates)
                return
            except (BackendError, TimeoutError, OSError) as e:
                log.warning(
                    "audit writes failed: spooling them to disk until they can be written",
                    extra={"to": self.target, "error": str(e) or type(e).__name__, "spool": str(self.path)},
                )
        self._append(
            [
                *([(_INSERT, [codec.event_to_wire(e) for e in events])] if events else []),
                *([(_COMPLETE, [codec.completion_to_wire(c) for c in updates])] if updates else []),
            ]
        )
        self._wake()

    async def search(self, query: AuditQuery) -> list[dict[str, Any]]:
        return await self.primary.search(query)

    def search_pages(self, query: AuditQuery) -> AsyncIterator[list[dict[str, Any]]]:
        """The primary's streaming search (what is spooled is found once drained)."""
        return iter_search(self.primary, query)

    async def feed(self, cursor: str, limit: int, hold_us: int = 0) -> FeedPage:
        """The primary's feed (decision 0034): spooled events enter it when they are drained."""
        page: FeedPage = await self._primary_method("feed")(cursor, limit, hold_us)
        return page

    async def feed_start(self, last: int) -> str:
        return str(await self._primary_method("feed_start")(last))

    async def feed_backlog(self, cursor: str) -> int:
        return int(await self._primary_method("feed_backlog")(cursor))

    def export_lease(self, name: str) -> Any:
        """The primary's exporter lease (decision 0035)."""
        return self._primary_method("export_lease")(name)

    def _primary_method(self, name: str) -> Any:
        method = getattr(self.primary, name, None)
        if method is None:
            raise BackendError(f"this audit store has no {name.replace('_', ' ')}")
        return method

    async def verify(self, checker: Checker | None, since: datetime | None = None) -> VerifyReport:
        """The primary's ``verify``: what is spooled is not sealed yet (it is when replayed)."""
        verify = getattr(self.primary, "verify", None)
        if verify is None:
            raise BackendError("this audit store keeps no seals")
        report: VerifyReport = await verify(checker, since)
        report.journaled = self._pending
        return report

    async def prune(self, before: datetime) -> None:
        """Retention: the primary's ``prune`` (the spool holds only what it has not stored yet)."""
        prune = getattr(self.primary, "prune", None)
        if prune is not None:
            await prune(before)

    async def complete_unfinished(
        self, before: datetime, reason: Callable[[str], str], limit: int = 1000
    ) -> int:
        """The primary's (decision 0038), but only while nothing is spooled: an outcome waiting
        here must not be taken for one that never came."""
        complete = getattr(self.primary, "complete_unfinished", None)
        if complete is None or self._pending:
            return 0
        n: int = await complete(before, reason, limit)
        return n

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._drainer is not None and self._pending:
            # One last attempt to hand the backlog over; what stays is kept for the next start.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._drainer), 5.0)
        if self._drainer is not None:
            await stop_tasks(self._drainer)
        await self.primary.close()
        self._db.close()

    async def wait_drained(self) -> None:
        """Return once nothing is spooled (for tests and orderly shutdowns)."""
        while self._pending and self._drainer is not None:
            await asyncio.shield(self._drainer)

    def start(self) -> None:
        """Replay what an earlier run left in the spool (call once a loop runs)."""
        if self._pending:
            self._wake()

    # ------------------------------------------------------------ internals

    async def _to_primary(self, events: Sequence[AuditEvent], updates: Sequence[Completion]) -> None:
        write_batch = getattr(self.primary, "write_batch", None)
        if write_batch is not None and events and updates:
            await write_batch(events, updates)
            return
        if events:
            await self.primary.insert_many(events)
        if updates:
            await self.primary.complete_many(updates)

    def _append(self, batches: list[tuple[str, list[Any]]]) -> None:
        """Spool ``batches`` (kind, wire items) in one transaction."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(
                    "INSERT INTO spool (kind, body) VALUES (?, ?)",
                    [(kind, orjson.dumps(wire)) for kind, wire in batches],
                )
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise BackendError(f"audit spool {self.path}: cannot write: {e}") from None
        self._pending += len(batches)

    def _wake(self) -> None:
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.get_running_loop().create_task(self._drain(), name="audit-spool-drain")

    async def _drain(self) -> None:
        delay = self._retry[0]
        while True:
            last, events, updates = self._next_batches()
            if last is None:
                self._pending = 0
                log.info("audit spool drained: writing straight through again", extra={"to": self.target})
                return
            try:
                async with asyncio.timeout(self.write_timeout * 3):
                    await self._to_primary(events, updates)
            except (BackendError, TimeoutError, OSError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry[1])
                continue
            delay = self._retry[0]
            n = self._db.execute("DELETE FROM spool WHERE seq <= ?", (last,)).rowcount
            self._pending = max(0, self._pending - n)

    def _next_batches(self) -> tuple[int | None, list[AuditEvent], list[Completion]]:
        """The oldest spooled batches, up to ``DRAIN_ITEMS`` items (at least one batch):
        the last seq read, their events and their outcomes, in order."""
        last: int | None = None
        events: list[AuditEvent] = []
        updates: list[Completion] = []
        for seq, kind, body in self._db.execute("SELECT seq, kind, body FROM spool ORDER BY seq LIMIT 512"):
            wire = orjson.loads(body)
            if last is not None and len(events) + len(updates) + len(wire) > DRAIN_ITEMS:
                break
            last = seq
            if kind == _INSERT:
                events.extend(codec.event_from_wire(d) for d in wire)
            else:
                updates.extend(codec.completion_from_wire(d) for d in wire)
        return last, events, updates
