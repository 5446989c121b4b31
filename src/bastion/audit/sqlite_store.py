"""``SQLiteAuditStore``: the ``AuditStore`` of one node, a journal in front of SQLite.

The contract, the query and outcome types and the stored rows are
``bastion.audit.store``'s.

``SQLiteAuditStore`` keeps ``<data_dir>/audit.db`` (mode 0600), an index
of the events that ``search`` reads, and in front of it a journal,
``<data_dir>/audit.journal`` (0600): a write is committed when its batch
is appended to the journal, with one ``write(2)`` (durable against a crash
of the process, like SQLite's WAL with ``synchronous=NORMAL``; an OS crash
or power loss may lose the last writes).  What is journaled is indexed into
``audit.db`` in the background, in a worker thread, in large transactions:
one row per event, a call's outcome merged into its row when it came
before the row was indexed (the common case) and an ``UPDATE`` otherwise;
then that part of the journal is removed.  At open, a journal left by a
crash is indexed first.  ``search`` reads the index and the journal, so it
sees every committed event whether indexed yet or not (also from another
process: ``search_files``).  One process writes a data directory's audit
log (a lock, ``audit.lock``, says which); any process may search it.

The journal: one line per item, UTF-8.  An inserted event is its JSON
document as stored (``{...}``, the ``to_dict`` form); an outcome is
``["<event id>", success, "error", duration_ms]``.  ``audit.journal`` takes
the appends; when indexing starts it is renamed ``audit.journal.indexing``
(and a new ``audit.journal`` started), and that file is removed once its
transaction is committed: so the journal files hold exactly what may not
be indexed yet, the older one first.  A line that does not parse (a write
torn by an OS crash) is skipped with a warning.

Seals (decision 0032, ``bastion.audit.chain``): each indexing transaction
also stores the seal covering what it indexed (``audit_seals``: one chain,
continued across restarts, as one process writes at a time), signed at open,
at close and every ``SIGN_EVERY`` seconds; so a journal replayed after a
crash is sealed like any other.  ``verify_files`` checks the log against
them (read-only, any process); ``prune`` (retention) removes what was sealed
before a time, in steps between indexing runs, leaving a signed prune seal.

Why, measured 2026-11-22 on this 2-vCPU host (CPython 3.11.7, SQLite
3.40.1, uvloop, the process pinned to one core; ``bench/audit_micro.py``:
``AuditLog`` over this store, 16 concurrent callers, a tools/call event of
~900 bytes of JSON; CPU of the whole process, worker threads included,
minus the callers alone; docs/benchmarks.md has the table)::

    audit CPU µs per call, medians                  1 session   16 sessions
    two SQLite commits per batch, JSON rebuilt
      on completion (before 2026-11-22)                33.5         48.7
    one SQLite transaction per batch, on the loop      24.1         36.4
      (again, same run as the line below)              25.2         37.6
    this version (journal, indexed in the background)   19.0         20.4

A SQLite transaction of a few rows costs far more per row than a large one
(each commit writes every page it dirtied, whole, to the WAL: ~25 pages
for 16 calls; the six b-trees each dirty a leaf or more), and with one
call in flight the old design paid two transactions per call (75 µs);
an append to a file costs a few microseconds however small the batch.
The index transactions run in a thread so that the loop never stalls on
them (SQLite releases the GIL while it works; there are a few per second,
so the thread hand-offs cost nothing measurable), and checkpoints (copying
the WAL into the database file) run in the same thread after a commit,
when nothing else writes the database: they always finish, and the WAL
starts again from its beginning instead of growing.

What this store must not do: block the loop on anything but its own
journal appends, let ``sqlite3`` exceptions escape, keep unbounded memory
(when more is written than the indexer keeps up with, writes wait for it past
``INDEX_BEHIND`` items waiting; when the index cannot be written at all, past
``MAX_UNINDEXED`` they are refused: calls are refused rather than
unaudited), or import anything above ``bastion.errors`` and
``bastion.audit.events``/``store``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import heapq
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Final, TypeVar

import orjson

from bastion.audit import chain as chain_mod
from bastion.audit.chain import Break, Chain, Checker, Seal, Signer, Verifier, VerifyReport
from bastion.audit.events import AuditEvent
from bastion.audit.store import (
    UNFINISHED,
    AuditQuery,
    Completion,
    FeedPage,
    apply_outcome,
    clean_text,
    epoch_micros,
    event_row,
    merge_outcome,
    take_feed,
)
from bastion.errors import BackendError, ValidationError

_T = TypeVar("_T")

log = logging.getLogger("bastion.audit")

__all__ = [
    "AUDIT_DB_NAME",
    "AuditFiles",
    "SQLiteAuditStore",
    "feed_backlog_files",
    "feed_files",
    "feed_start_files",
    "search_files",
    "search_pages_files",
    "verify_files",
]

AUDIT_DB_NAME: Final = "audit.db"
JOURNAL_NAME: Final = "audit.journal"
#: The journal being indexed (renamed from ``JOURNAL_NAME`` when indexing starts).
INDEXING_NAME: Final = "audit.journal.indexing"
LOCK_NAME: Final = "audit.lock"
#: ``PRAGMA user_version`` of the schema below; bump it with a migration.
SCHEMA_VERSION: Final = 3
#: How long a write waits for another process's write lock (the index thread
#: and the open; reads too).
BUSY_TIMEOUT_MS: Final = 5000
#: Journaled items (events and outcomes) that start indexing at once...
INDEX_ITEMS: Final = 2048
#: ...or this long (seconds) after the first of them was journaled.
INDEX_DELAY: Final = 0.1
#: After a failed indexing, the next try (seconds).
INDEX_RETRY: Final = 1.0
#: Journaled items not yet indexed past which writes wait for the indexer to catch up
#: (when more come in than it indexes: backpressure, not failure)...
INDEX_BEHIND: Final = 8_192
#: ...and past which writes are refused (the index is failing: memory must stay
#: bounded, and calls are refused rather than unaudited).
MAX_UNINDEXED: Final = 20_000
#: Rows indexed between two checkpoints (about 10-20 MiB of WAL with this schema).
CHECKPOINT_ROWS: Final = 8192
#: WAL size past which a checkpoint also truncates it (after readers kept it from restarting).
WAL_LIMIT: Final = 64 << 20

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS audit_events (
    seq         INTEGER PRIMARY KEY,
    id          TEXT    NOT NULL UNIQUE,
    time_us     INTEGER NOT NULL,
    type        TEXT    NOT NULL,
    user        TEXT    NOT NULL,
    app         TEXT    NOT NULL,
    session_id  TEXT    NOT NULL,
    success     INTEGER NOT NULL,
    error       TEXT    NOT NULL,
    duration_ms REAL    NULL,
    event       TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_events_time ON audit_events (time_us);
CREATE INDEX IF NOT EXISTS audit_events_type ON audit_events (type, time_us);
CREATE INDEX IF NOT EXISTS audit_events_user ON audit_events (user, time_us);
CREATE INDEX IF NOT EXISTS audit_events_app ON audit_events (app, time_us);
CREATE INDEX IF NOT EXISTS audit_events_session ON audit_events (session_id, time_us);

CREATE TABLE IF NOT EXISTS audit_seals (
    writer  INTEGER NOT NULL,
    seq     INTEGER NOT NULL,
    time_us INTEGER NOT NULL,
    kind    TEXT    NOT NULL,
    prev    BLOB    NOT NULL,
    items   BLOB    NOT NULL,
    payload TEXT    NOT NULL,
    sig     BLOB    NULL,
    PRIMARY KEY (writer, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS audit_seals_time ON audit_seals (time_us);
CREATE TABLE IF NOT EXISTS audit_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)
"""

# Version 3 (decisions 0034, 0035): the tool column (search --tool), the feed's
# position (``rev``: the commit order of the latest change of a row; NULL for rows
# stored before, read first in seq order), and the failures (search --outcome).
# Adding columns rewrites nothing; the indexes are built once, at the first open.
_SCHEMA_V3: Final = (
    "ALTER TABLE audit_events ADD COLUMN tool TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE audit_events ADD COLUMN rev INTEGER NULL",
    "CREATE INDEX IF NOT EXISTS audit_events_rev ON audit_events (rev)",
    "CREATE INDEX IF NOT EXISTS audit_events_tool ON audit_events (tool, time_us)",
    "CREATE INDEX IF NOT EXISTS audit_events_failed ON audit_events (time_us) WHERE success = 0",
    # Rows up to this seq were stored before version 3: no rev, the tool column empty.
    "INSERT OR REPLACE INTO audit_meta (key, value)"
    " SELECT 'feed_base', CAST(coalesce(max(seq), 0) AS TEXT) FROM audit_events",
)

#: The one chain of an ``audit.db`` (one writer at a time: the lock): ADR 32.
WRITER: Final = 1
#: A seal is signed at least this often (seconds) while events come in, and this
#: long after the last unsigned one when they stop.
SIGN_EVERY: Final = 10.0
#: Seals pruned per transaction (retention), at most, and events (the step ends with
#: the seal that passes it), so indexing waits little behind a step.
PRUNE_SEALS: Final = 256
PRUNE_EVENTS: Final = 4096

_INSERT_SEAL: Final = (
    "INSERT INTO audit_seals (writer, seq, time_us, kind, prev, items, payload, sig)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_SEAL_COLUMNS: Final = "writer, seq, time_us, kind, prev, items, payload, sig"


def _now_us() -> int:
    return time.time_ns() // 1000


# One row per event.  A row journaled with its outcome (the 11th parameter
# true) sets that outcome on a stored row of the same id (a retried insert
# whose first try was indexed); otherwise the stored row stays as it is.
# ?12 is the tool, ?13 the row's place in the feed (ADR 34).
_INSERT: Final = (
    "INSERT INTO audit_events"
    " (id, time_us, type, user, app, session_id, success, error, duration_ms, event, tool, rev)"
    " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?12, ?13) ON CONFLICT (id) DO UPDATE SET"
    " success = excluded.success, error = excluded.error, duration_ms = excluded.duration_ms,"
    " rev = excluded.rev WHERE ?11"
)

#: Calls without an outcome (decision 0038): a small index, since a row enters it only when
#: it is indexed before its outcome (rare: outcomes are merged into rows before indexing).
_UNFINISHED_INDEX: Final = (
    f"CREATE INDEX IF NOT EXISTS audit_events_unfinished ON audit_events (time_us) WHERE {UNFINISHED}"
)

# A completion sets the outcome columns only; the stored JSON stays the event
# as recorded, and search merges the columns into it (``merge_outcome``).  It
# moves the row to the end of the feed (ADR 34): read again, with its outcome.
_COMPLETE: Final = "UPDATE audit_events SET success = ?, error = ?, duration_ms = ?, rev = ? WHERE id = ?"


class _Revs:
    """The next feed position (``rev``) to hand out; moved on only by committed transactions."""

    __slots__ = ("next",)

    def __init__(self, next_rev: int) -> None:
        self.next = next_rev


class SQLiteAuditStore:
    """``AuditStore`` on ``<data_dir>/audit.db`` and its journal: ``await SQLiteAuditStore.open(data_dir)``.

    Writes are appended to the journal on the calling (event-loop) thread,
    one ``write(2)`` per batch; a task indexes them into ``audit.db`` in a
    worker thread, ``INDEX_ITEMS`` at a time or ``INDEX_DELAY`` after the
    first; see the module doc for why and for the numbers.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        lock_fd: int,
        segment: int,
        journal_fd: int,
        chain: Chain | None = None,
        clock: Callable[[], int] = _now_us,
        revs: _Revs | None = None,
    ) -> None:
        # Use ``open``: the connection must be configured, migrated and the
        # journal left by a crash indexed first.
        self._conn = conn
        self._path = path
        self._dir = path.parent
        self._lock_fd = lock_fd
        # The journal segment taking appends, its fd and size; the older
        # segments still on disk (being indexed, or left by a failed indexing).
        self._segment = segment
        self._jfd = journal_fd
        self._jsize = 0
        self._old_segments: list[int] = []
        # Journaled and not yet handed to the indexer: rows by event id, in
        # order (lists: an outcome journaled before indexing is merged in),
        # and the outcomes of events not among them.
        self._rows: dict[str, list[Any]] = {}
        self._updates: list[tuple[Any, ...]] = []
        # Items the indexer is writing now (counted against MAX_UNINDEXED).
        self._indexing = 0
        self._indexer: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._index_error = ""
        self._rows_since_checkpoint = 0
        self._closed = False
        self._closer: asyncio.Task[None] | None = None
        # The chain of seals (ADR 32): extended by the indexer only, one run at a time.
        self._chain = chain if chain is not None else Chain(WRITER)
        self._revs = revs if revs is not None else _next_rev(conn)
        self._clock = clock
        self._last_signed = time.monotonic()
        self._sign_timer: asyncio.TimerHandle | None = None
        self._seal_due = False
        self._prune_before: int | None = None
        self._prune_error = ""
        # complete_unfinished: (before_us, reason, limit) until the indexer ran it, and its count.
        self._sweep: tuple[int, Callable[[str], str], int] | None = None
        self._swept: int | BaseException = 0

    @classmethod
    async def open(
        cls,
        data_dir: str | Path,
        *,
        signer: Signer | None = None,
        clock: Callable[[], int] | None = None,
    ) -> SQLiteAuditStore:
        """Open (creating if needed) ``<data_dir>/audit.db`` and its journal.

        ``data_dir`` is created with mode 0700 if missing; the files are made
        0600 (tool arguments may be sensitive even after redaction).  Events
        journaled and not indexed when the last writer stopped (a crash) are
        indexed first.  Refused (``BackendError``) while another process has
        the same audit log open for writing.

        ``signer`` signs seals (ADR 32; the cluster's JWT key); ``clock``
        (microseconds since the epoch) dates them, for tests.
        """
        path = Path(data_dir) / AUDIT_DB_NAME
        now = clock or _now_us
        # Creating files, migrating and indexing a journal touch the disk
        # (and may wait for a lock): keep them off the event loop.
        conn, lock_fd, segment, jfd, chain, revs = await asyncio.to_thread(_open_writer, path, signer, now)
        return cls(conn, path, lock_fd, segment, jfd, chain, now, revs)

    @property
    def path(self) -> Path:
        return self._path

    async def insert_many(self, events: Sequence[AuditEvent]) -> None:
        if events:
            await self._keep_up()
            self._append("insert", events, ())

    async def complete_many(self, updates: Sequence[Completion]) -> None:
        if updates:
            await self._keep_up()
            self._append("complete", (), updates)

    async def write_batch(self, events: Sequence[AuditEvent], updates: Sequence[Completion]) -> None:
        """``insert_many(events)`` then ``complete_many(updates)``, in one append."""
        if events or updates:
            await self._keep_up()
            self._append("write", events, updates)

    async def search(self, query: AuditQuery) -> list[dict[str, Any]]:
        if self._closed:
            raise self._closed_error()
        # Threads: a big search must not stall the loop; it reads the index
        # on its own read-only connection, and the journal.
        return await search_files(self._dir, query)

    async def search_pages(self, query: AuditQuery) -> AsyncIterator[list[dict[str, Any]]]:
        """``search`` in pages read as they are consumed (decision 0035)."""
        if self._closed:
            raise self._closed_error()
        async for page in search_pages_files(self._dir, query):
            yield page

    async def feed(self, cursor: str, limit: int, hold_us: int = 0) -> FeedPage:
        """Events changed after ``cursor``, in commit order (``feed_files``; decision 0034)."""
        if self._closed:
            raise self._closed_error()
        return await feed_files(self._dir, cursor, limit, hold_us)

    async def feed_start(self, last: int) -> str:
        if self._closed:
            raise self._closed_error()
        return await feed_start_files(self._dir, last)

    async def feed_backlog(self, cursor: str) -> int:
        if self._closed:
            raise self._closed_error()
        return await feed_backlog_files(self._dir, cursor)

    async def flush(self) -> None:
        """Index everything journaled so far into ``audit.db`` now (tests, tools).

        Raises ``BackendError`` if that fails (it is retried in the background).
        """
        if self._closed:
            raise self._closed_error()
        while True:
            if self._indexer is not None:
                await asyncio.wait([self._indexer])
                continue
            if not (self._rows or self._updates or self._seal_due or self._prune_before is not None):
                break
            await asyncio.wait([self._start_indexer()])
            if self._index_error:
                raise BackendError(f"audit database {self._path}: cannot index: {self._index_error}")

    async def close(self) -> None:
        if self._closer is None:
            if self._closed:
                return
            self._closed = True
            self._closer = asyncio.get_running_loop().create_task(
                self._close(), name="bastion-audit-store-close"
            )
        # Shielded: a cancelled caller must not leave files open or close the
        # connection under a running indexer; the close finishes anyway.
        await asyncio.shield(self._closer)

    async def verify(self, checker: Checker | None, since: datetime | None = None) -> VerifyReport:
        """``verify_files`` on this store's data directory (read-only, in a thread)."""
        if self._closed:
            raise self._closed_error()
        return await verify_files(self._dir, checker, since)

    async def prune(self, before: datetime) -> None:
        """Retention: remove what was sealed before ``before`` and leave a signed prune seal (ADR 32).

        Runs in the indexer's thread, ``PRUNE_SEALS`` seals per transaction
        between indexing runs: writes go on being journaled meanwhile.
        """
        if self._closed:
            raise self._closed_error()
        self._prune_before = epoch_micros(before)
        self._prune_error = ""
        while self._prune_before is not None and not self._closed:
            await asyncio.wait([self._indexer or self._start_indexer()])
        if self._prune_error:
            raise BackendError(f"audit database {self._path}: cannot prune: {self._prune_error}")

    async def complete_unfinished(
        self, before: datetime, reason: Callable[[str], str], limit: int = 1000
    ) -> int:
        """Complete calls left without an outcome (``bastion.audit.store``; decision 0038).

        Runs in the indexer's thread after it indexed what is journaled, so an outcome
        journaled before this call is in its row when the condition is checked.
        """
        if self._closed:
            raise self._closed_error()
        self._sweep = (epoch_micros(before), reason, limit)
        self._swept = 0
        while self._sweep is not None and not self._closed:
            await asyncio.wait([self._indexer or self._start_indexer()])
        if isinstance(self._swept, BaseException):
            raise _error(self._path, "complete calls without an outcome", self._swept)
        return self._swept

    async def _close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sign_timer is not None:
            self._sign_timer.cancel()
            self._sign_timer = None
        if self._indexer is not None:
            await asyncio.wait([self._indexer])
        if self._rows or self._updates:
            await asyncio.wait([self._start_indexer()])
        left = len(self._rows) + len(self._updates)
        if left:
            log.error(
                "audit database %s: %d journaled items could not be indexed (%s); they stay in %s "
                "and are indexed when the audit log is next opened",
                self._path,
                left,
                self._index_error,
                self._dir,
            )
        # Closing the last connection checkpoints the whole WAL (fsyncs): in a thread.
        try:
            await asyncio.to_thread(self._close_files, not left)
        except (sqlite3.Error, OSError) as exc:
            raise _error(self._path, "close", exc) from exc

    def _close_files(self, indexed: bool) -> None:
        try:
            try:
                # The signed end of this run's chain: a log truncated after it is told apart
                # from one whose writer stopped (ADR 32).
                _write_seal(self._conn, self._chain, [], self._clock(), chain_mod.CLOSE, "")
            except sqlite3.Error as exc:
                log.error("audit database %s: cannot write the closing seal: %s", self._path, exc)
            self._conn.close()
        finally:
            os.close(self._jfd)
            if indexed:
                for n in [*self._old_segments, self._segment]:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self._dir / f"{JOURNAL_NAME}.{n}")
            os.close(self._lock_fd)  # releases the lock

    # -- writing -------------------------------------------------------------

    async def _keep_up(self) -> None:
        """Backpressure: while ``INDEX_BEHIND`` items or more wait for a working indexer,
        writes wait for it to catch up (rather than memory growing, or calls being refused)."""
        while (
            self._indexer is not None
            and not self._index_error
            and len(self._rows) + len(self._updates) + self._indexing >= INDEX_BEHIND
        ):
            await asyncio.wait([self._indexer])

    def _append(self, action: str, events: Sequence[AuditEvent], updates: Sequence[Completion]) -> None:
        """Journal ``events`` and ``updates`` with one write; see the module doc."""
        if self._closed:
            raise self._closed_error()
        waiting = len(self._rows) + len(self._updates) + self._indexing
        if waiting >= MAX_UNINDEXED:
            raise BackendError(
                f"audit database {self._path}: cannot {action}: {waiting} journaled events wait to be "
                f"indexed ({self._index_error or 'indexing is behind'})"
            )
        rows = [event_row(e) for e in events]
        # (success, error, duration_ms, id) for _COMPLETE.  Only text that is
        # not ASCII can hold a lone surrogate (which can be neither bound nor
        # written as UTF-8).
        outcomes = [
            (
                bool(success),
                (error if error.isascii() else clean_text(error)) if error else "",
                duration_ms,
                event_id if event_id.isascii() else clean_text(event_id),
            )
            for event_id, success, error, duration_ms in updates
        ]
        data = "\n".join([r[9] for r in rows]).encode() + b"\n" if rows else b""
        if outcomes:
            data += b"".join([orjson.dumps((i, s, e, d)) + b"\n" for s, e, d, i in outcomes])
        fd = self._jfd
        try:
            written = os.write(fd, data)
            while written < len(data):  # a short write: rare (a signal, a full disk)
                written += os.write(fd, memoryview(data)[written:])
        except OSError as exc:
            # Whole lines only: cut a partial append back off.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self._jsize)
            raise BackendError(
                f"audit journal {self._dir / JOURNAL_NAME}.{self._segment}: cannot {action}: "
                f"{exc.strerror or exc}"
            ) from exc
        self._jsize += len(data)
        pending = self._rows
        for e, r in zip(events, rows, strict=True):
            if r[0] not in pending:  # an id already journaled: the first one stays
                tool = e.tool
                pending[r[0]] = [*r, False, tool if tool.isascii() else clean_text(tool)]
        for outcome in outcomes:
            _pend_outcome(pending, self._updates, outcome)
        if self._indexer is None:
            if len(pending) + len(self._updates) >= INDEX_ITEMS:
                self._start_indexer()
            elif self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(INDEX_DELAY, self._on_timer)

    # -- indexing ------------------------------------------------------------

    def _on_timer(self) -> None:
        self._timer = None
        if self._indexer is None and (self._rows or self._updates) and not self._closed:
            self._start_indexer()

    def _on_sign_timer(self) -> None:
        # Events stopped coming after an unsigned seal: sign the chain's end now.
        self._sign_timer = None
        if self._closed or self._chain.signer is None:
            return
        self._seal_due = True
        if self._indexer is None:
            self._start_indexer()

    def _start_indexer(self) -> asyncio.Task[None]:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task = asyncio.get_running_loop().create_task(self._index(), name="bastion-audit-indexer")
        self._indexer = task
        return task

    async def _index(self) -> None:
        """Index what is journaled now in a worker thread, then drop its journal segments."""
        rows, updates = list(self._rows.values()), self._updates
        self._rows, self._updates = {}, []
        self._indexing = len(rows) + len(updates)
        signer = self._chain.signer
        sign = signer is not None and (self._seal_due or time.monotonic() - self._last_signed >= SIGN_EVERY)
        retry = False
        try:
            try:
                covered = self._rotate()
            except OSError as exc:
                raise _IndexFailed(f"cannot start a new journal segment: {exc.strerror or exc}") from exc
            checkpoint = self._rows_since_checkpoint + len(rows) >= CHECKPOINT_ROWS
            try:
                if self._prune_before is not None:
                    await self._prune_step(self._prune_before)
                warning = ""
                if rows or updates or sign:
                    warning = await asyncio.to_thread(
                        _index_rows,
                        self._conn,
                        self._path,
                        rows,
                        updates,
                        checkpoint,
                        self._chain,
                        self._clock(),
                        sign,
                        self._revs,
                    )
            except sqlite3.Error as exc:
                raise _IndexFailed(str(exc) or type(exc).__name__) from exc
            swept = False
            if self._sweep is not None:
                await self._sweep_step(*self._sweep)
                swept = isinstance(self._swept, int) and self._swept > 0
            if sign:
                self._last_signed = time.monotonic()
                self._seal_due = False
                if self._sign_timer is not None:
                    self._sign_timer.cancel()
                    self._sign_timer = None
            elif (
                (rows or updates or swept)
                and signer is not None
                and self._sign_timer is None
                and not self._closed
            ):
                self._sign_timer = asyncio.get_running_loop().call_later(SIGN_EVERY, self._on_sign_timer)
            if warning:
                log.warning("audit database %s: checkpoint failed: %s", self._path, warning)
            self._rows_since_checkpoint = 0 if checkpoint else self._rows_since_checkpoint + len(rows)
            if self._index_error:
                log.info("audit database %s: indexing works again", self._path)
            self._index_error = ""
            self._drop_segments(covered)
        except _IndexFailed as exc:
            if exc.reason != self._index_error:
                log.error(
                    "audit database %s: cannot index %d journaled items (they stay in the journal; "
                    "retrying every %gs): %s",
                    self._path,
                    len(rows) + len(updates),
                    INDEX_RETRY,
                    exc.reason,
                )
            self._index_error = exc.reason
            if self._sweep is not None:  # not tried: what is journaled must be indexed first
                self._swept, self._sweep = exc, None
            # Back in front of what came since, in order.
            restored = {r[0]: r for r in rows}
            for k, v in self._rows.items():
                restored.setdefault(k, v)
            self._rows = restored
            self._updates = updates + self._updates
            retry = True
        finally:
            self._indexing = 0
            self._indexer = None
        if self._closed:
            return  # close() indexes what is left itself
        if retry:
            self._timer = asyncio.get_running_loop().call_later(INDEX_RETRY, self._on_timer)
        elif (
            len(self._rows) + len(self._updates) >= INDEX_ITEMS
            or self._prune_before is not None
            or self._seal_due
        ):
            self._start_indexer()
        elif (self._rows or self._updates) and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(INDEX_DELAY, self._on_timer)

    async def _prune_step(self, before_us: int) -> None:
        """One retention step, before indexing; its failure never keeps rows from being indexed."""
        try:
            more = await asyncio.to_thread(
                _prune, self._conn, self._chain, before_us, self._clock(), self._revs
            )
        except sqlite3.Error as exc:
            self._prune_error = str(exc) or type(exc).__name__
            log.warning("audit database %s: cannot prune (retried at the next run): %s", self._path, exc)
            more = False
        if not more:
            self._prune_before = None

    async def _sweep_step(self, before_us: int, reason: Callable[[str], str], limit: int) -> None:
        """``complete_unfinished``, after indexing; its failure is the caller's, not indexing's."""
        try:
            self._swept = await asyncio.to_thread(
                _complete_unfinished,
                self._conn,
                self._chain,
                before_us,
                reason,
                limit,
                self._clock(),
                self._revs,
            )
        except sqlite3.Error as exc:
            self._swept = exc
        self._sweep = None

    def _rotate(self) -> int:
        """Start a new journal segment (when the current one holds anything); returns
        the newest segment whose items are all in the snapshot being indexed."""
        if self._jsize == 0:
            return self._segment - 1
        nxt = self._segment + 1
        fd = _open_segment(self._dir, nxt)
        os.close(self._jfd)
        self._old_segments.append(self._segment)
        self._segment, self._jfd, self._jsize = nxt, fd, 0
        return nxt - 1

    def _drop_segments(self, covered: int) -> None:
        keep = []
        for n in self._old_segments:
            if n > covered:
                keep.append(n)
                continue
            try:
                os.unlink(self._dir / f"{JOURNAL_NAME}.{n}")
            except FileNotFoundError:
                pass
            except OSError as exc:
                # Harmless (indexing it again changes nothing), but it takes space.
                log.warning("audit journal %s.%d: cannot remove: %s", self._dir / JOURNAL_NAME, n, exc)
        self._old_segments = keep

    def _closed_error(self) -> BackendError:
        return BackendError(f"audit database {self._path}: store is closed")


def _pend_outcome(
    rows: dict[str, list[Any]], updates: list[tuple[Any, ...]], outcome: tuple[Any, ...]
) -> None:
    """Merge ``outcome`` (success, error, duration_ms, id) into its not yet indexed row,
    or keep it as an ``UPDATE`` for a row indexed already (or unknown)."""
    row = rows.get(outcome[3])
    if row is None:
        updates.append(outcome)
    else:
        row[6], row[7], row[8], row[10] = outcome[0], outcome[1], outcome[2], True


class _IndexFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _seal_items(rows: Sequence[Sequence[Any]], updates: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """What a seal says of ``rows`` and ``updates`` (ADR 32): each event's digest, each outcome."""
    digest = chain_mod.event_digest
    items: list[list[Any]] = []
    for r in rows:
        items.append(["i", r[0], digest(r[9])])
        if r[10]:  # an outcome merged into the row
            items.append(["c", r[0], bool(r[6]), r[7], r[8]])
    items.extend(["c", eid, bool(success), error, duration] for success, error, duration, eid in updates)
    return items


def _index_rows(
    conn: sqlite3.Connection,
    path: Path,
    rows: Sequence[Sequence[Any]],
    updates: Sequence[Sequence[Any]],
    checkpoint: bool,
    chain: Chain | None = None,
    time_us: int = 0,
    sign: bool = False,
    revs: _Revs | None = None,
) -> str:
    """One transaction: insert ``rows`` (outcomes merged), then apply ``updates``, sealed; in a worker thread.

    The seal (ADR 32) that covers them is stored in the same transaction, and
    the chain's head moves only once it is committed.  Then, if ``checkpoint``,
    copy the WAL into the database (nothing else writes it, so the copy
    finishes and the next commit starts the WAL again).  Returns a checkpoint
    failure ("" if none): the rows are committed anyway.
    """
    cur = conn.cursor()
    if conn.in_transaction:
        # Left open by a failed COMMIT whose ROLLBACK failed too; without this
        # every later transaction would fail ("within a transaction").
        cur.execute("ROLLBACK")
    seal = None if chain is None else chain.next(_seal_items(rows, updates), time_us or _now_us(), sign=sign)
    # Feed positions (ADR 34): the outcomes of rows indexed before, then the new rows (their
    # own outcomes merged in). A session's calls are sequential, so a call's outcome always
    # comes before its next call's row: the feed keeps each session's order.
    first = revs.next if revs is not None else _next_rev(conn).next
    cur.execute("BEGIN IMMEDIATE")
    try:
        if updates:
            cur.executemany(
                _COMPLETE, [(s, e, d, first + i, eid) for i, (s, e, d, eid) in enumerate(updates)]
            )
        if rows:
            base = first + len(updates)
            cur.executemany(_INSERT, [(*r, base + i) for i, r in enumerate(rows)])
        if seal is not None:
            cur.execute(_INSERT_SEAL, seal)
        cur.execute("COMMIT")
    except BaseException:
        # After a failed COMMIT SQLite may already have rolled back.
        with contextlib.suppress(sqlite3.Error):
            cur.execute("ROLLBACK")
        raise
    if chain is not None and seal is not None:
        chain.advance(seal)
    if revs is not None:
        revs.next = first + len(rows) + len(updates)
    if not checkpoint:
        return ""
    try:
        try:
            big = os.stat(f"{path}-wal").st_size > WAL_LIMIT
        except OSError:
            big = False
        cur.execute(f"PRAGMA wal_checkpoint({'TRUNCATE' if big else 'PASSIVE'})").fetchall()
    except sqlite3.Error as exc:
        return str(exc) or type(exc).__name__
    return ""


def _write_seal(
    conn: sqlite3.Connection, chain: Chain, items: list[list[Any]], time_us: int, kind: str, payload: str
) -> None:
    """Store one signed seal alone (opening, closing), in its own transaction."""
    seal = chain.next(items, time_us, kind=kind, payload=payload, sign=True)
    with _immediate(conn):
        conn.execute(_INSERT_SEAL, seal)
    chain.advance(seal)


def _prune(
    conn: sqlite3.Connection, chain: Chain, before_us: int, now_us: int, revs: _Revs | None = None
) -> bool:
    """Retention, one step: remove up to ``PRUNE_SEALS`` seals older than ``before_us`` and
    the events they sealed, and seal where the chains now start (a signed prune seal).

    Returns whether older seals remain.  One transaction; in the indexer's thread.
    """
    if conn.in_transaction:
        conn.execute("ROLLBACK")
    conn.execute("BEGIN IMMEDIATE")
    try:
        old = [
            Seal(*r)
            for r in conn.execute(
                f"SELECT {_SEAL_COLUMNS} FROM audit_seals WHERE time_us < ? AND kind != ?"
                " ORDER BY time_us, writer, seq LIMIT ?",
                (before_us, chain_mod.PRUNE, PRUNE_SEALS),
            )
        ]
        # Prune seals too once a newer one carries their anchors (only the newest is needed).
        newest_prune = conn.execute(
            f"SELECT {_SEAL_COLUMNS} FROM audit_seals WHERE kind = ? ORDER BY time_us DESC, seq DESC LIMIT 1",
            (chain_mod.PRUNE,),
        ).fetchone()
        anchors: dict[int, tuple[int, bytes]] = {}
        if newest_prune is not None:
            for w, seq, h in orjson.loads(Seal(*newest_prune).payload):
                anchors[int(w)] = (int(seq), bytes.fromhex(h))
        # Events from before seals existed (schema version 1): by time.
        legacy = int(_meta(conn, "legacy_seq", "0"))
        removed_legacy = 0
        if legacy:
            removed_legacy = conn.execute(
                "DELETE FROM audit_events WHERE seq IN"
                " (SELECT seq FROM audit_events WHERE seq <= ? AND time_us < ? LIMIT ?)",
                (legacy, before_us, PRUNE_EVENTS),
            ).rowcount
        full = len(old) >= PRUNE_SEALS or removed_legacy >= PRUNE_EVENTS
        # Seals cover up to INDEX_ITEMS items each: fewer of them when they are big.
        events = 0
        for n, seal in enumerate(old):
            events += seal.items.count(b'["i",')
            if events >= PRUNE_EVENTS:
                full = full or n + 1 < len(old)
                old = old[: n + 1]
                break
        if not full and newest_prune is not None and Seal(*newest_prune).time_us < before_us:
            old.append(Seal(*newest_prune))
        if not old and not removed_legacy:
            conn.execute("ROLLBACK")
            return False
        # Pruning removes a prefix of each chain: up to the newest old seal of each writer.
        last: dict[int, Seal] = {}
        for seal in old:
            if seal.writer not in last or last[seal.writer].seq < seal.seq:
                last[seal.writer] = seal
        ids: list[tuple[str]] = []
        for w, top in last.items():
            for (items,) in conn.execute(
                "SELECT items FROM audit_seals WHERE writer = ? AND seq <= ?", (w, top.seq)
            ):
                ids.extend((str(item[1]),) for item in orjson.loads(items) if item[0] == "i")
            conn.execute("DELETE FROM audit_seals WHERE writer = ? AND seq <= ?", (w, top.seq))
            anchors[w] = (top.seq, top.hash())
        conn.executemany("DELETE FROM audit_events WHERE id = ?", ids)
        if revs is not None:
            # Positions are never handed out twice, even when the newest rows are pruned (ADR 34).
            conn.execute(
                "INSERT OR REPLACE INTO audit_meta (key, value) VALUES ('rev_high', ?)", (str(revs.next - 1),)
            )
        seal = chain.next(
            [], now_us, kind=chain_mod.PRUNE, payload=chain_mod.prune_anchors(anchors), sign=True
        )
        conn.execute(_INSERT_SEAL, seal)
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    chain.advance(seal)
    log.info("audit retention: pruned %d events sealed before the limit", len(ids) + removed_legacy)
    return full


def _complete_unfinished(
    conn: sqlite3.Connection,
    chain: Chain,
    before_us: int,
    reason: Callable[[str], str],
    limit: int,
    now_us: int,
    revs: _Revs,
) -> int:
    """Complete up to ``limit`` calls without an outcome recorded before ``before_us``, sealed.

    One transaction holding the write lock: the rows chosen cannot get an outcome between
    the choice and the update.  In the indexer's thread.  Each completion takes the next feed
    position (ADR 34), so exporters and ``audit tail`` read the row again with its outcome.
    """
    with _immediate(conn):
        found = conn.execute(
            f"SELECT id, session_id FROM audit_events WHERE {UNFINISHED} AND time_us < ?"
            " ORDER BY time_us LIMIT ?",
            (before_us, limit),
        ).fetchall()
        if not found:
            return 0
        updates = [(False, reason(str(sid)), None, str(eid)) for eid, sid in found]
        first = revs.next
        conn.executemany(_COMPLETE, [(s, e, d, first + i, eid) for i, (s, e, d, eid) in enumerate(updates)])
        seal = chain.next(_seal_items((), updates), now_us)
        conn.execute(_INSERT_SEAL, seal)
    chain.advance(seal)
    revs.next = first + len(updates)
    return len(found)


@contextlib.contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction (``BEGIN IMMEDIATE``): committed at the end, rolled back on any error."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


def _meta(conn: sqlite3.Connection, key: str, default: str) -> str:
    row = conn.execute("SELECT value FROM audit_meta WHERE key = ?", (key,)).fetchone()
    return default if row is None else str(row[0])


def _next_rev(conn: sqlite3.Connection) -> _Revs:
    """The first feed position not handed out yet (ADR 34)."""
    top = conn.execute("SELECT max(rev) FROM audit_events").fetchone()[0] or 0
    floor = max(int(_meta(conn, "feed_base", "0")), int(_meta(conn, "rev_high", "0")))
    return _Revs(max(int(top), floor) + 1)


def _chain_head(conn: sqlite3.Connection, signer: Signer | None) -> Chain:
    row = conn.execute(
        f"SELECT {_SEAL_COLUMNS} FROM audit_seals WHERE writer = ? ORDER BY seq DESC LIMIT 1", (WRITER,)
    ).fetchone()
    if row is None:
        return Chain(WRITER, signer=signer)
    last = Seal(*row)
    return Chain(WRITER, last.seq, last.hash(), signer)


# -- opening, the journal, reading (worker threads) ----------------------------------


def _open_writer(
    path: Path, signer: Signer | None = None, clock: Callable[[], int] = _now_us
) -> tuple[sqlite3.Connection, int, int, int, Chain, _Revs]:
    """Create/open the files, take the writer's lock, migrate, index a journal left behind.

    Returns the connection, the lock's fd, the first journal segment number and its fd,
    and the chain of seals (a signed opening seal written: ADR 32).
    """
    folder = path.parent
    try:
        # The mode only applies to directories created here.
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Create the file ourselves so it is never world-readable, not even
        # between sqlite creating it and a chmod; chmod also fixes an old
        # file.  SQLite gives -wal and -shm the database file's mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        path.chmod(0o600)
        lock_fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise BackendError(f"audit database {path}: cannot create: {exc}") from exc
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise BackendError(
                    f"audit database {path}: in use by another process (it holds {folder / LOCK_NAME}); "
                    "only one bastion process may write a data directory's audit log"
                ) from None
            raise BackendError(f"audit database {path}: cannot lock {folder / LOCK_NAME}: {exc}") from exc
        try:
            # isolation_level=None: no implicit transactions, only our BEGINs.
            # check_same_thread=False: used by the indexer's worker threads.
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise _error(path, "open", exc) from exc
        try:
            _configure(conn, path)
            chain = _chain_head(conn, signer)
            revs = _next_rev(conn)
            segment = _replay(conn, path, chain, clock, revs)
            _write_seal(conn, chain, [], clock(), chain_mod.OPEN, "")
            jfd = _open_segment(folder, segment)
        except OSError as exc:
            conn.close()
            raise BackendError(f"audit journal {folder / JOURNAL_NAME}: cannot open: {exc}") from exc
        except BaseException:
            conn.close()
            raise
    except BaseException:
        os.close(lock_fd)
        raise
    return conn, lock_fd, segment, jfd, chain, revs


def _open_segment(folder: Path, n: int) -> int:
    return os.open(
        folder / f"{JOURNAL_NAME}.{n}", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
    )


def _segments(folder: Path) -> list[int]:
    """The journal segments in ``folder``, oldest first."""
    prefix = JOURNAL_NAME + "."
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted(int(n[len(prefix) :]) for n in names if n.startswith(prefix) and n[len(prefix) :].isdigit())


# A journal item: an inserted event ("i", id, document, its JSON) or an outcome
# ("c", id, success, error, duration_ms).
_Item = tuple[Any, ...]


def _read_journal(folder: Path) -> list[_Item]:
    """Every item of the journal segments in ``folder``, in the order written.

    A segment removed while this reads was indexed before it was removed.
    Lines that do not parse (a torn write) are skipped with a warning.
    """
    items: list[_Item] = []
    bad = 0
    for n in _segments(folder):
        try:
            data = (folder / f"{JOURNAL_NAME}.{n}").read_bytes()
        except FileNotFoundError:
            continue
        for line in data.split(b"\n"):
            if not line:
                continue
            try:
                value = orjson.loads(line)
                if isinstance(value, dict):
                    items.append(("i", str(value["id"]), value, line.decode()))
                elif isinstance(value, list) and len(value) == 4:
                    items.append(("c", str(value[0]), bool(value[1]), str(value[2] or ""), value[3]))
                else:
                    bad += 1
            except (orjson.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                bad += 1
    if bad:
        log.warning(
            "audit journal %s: %d unreadable lines skipped (torn writes?)", folder / JOURNAL_NAME, bad
        )
    return items


def _row_of(doc: dict[str, Any], text: str) -> list[Any]:
    """The row of a journaled event document (as ``event_row`` built it from the event)."""
    return [
        str(doc["id"]),
        _doc_micros(doc),
        str(doc.get("event", "")),
        str(doc.get("user", "")),
        str(doc.get("app", "")),
        str(doc.get("session_id", "")),
        bool(doc.get("success")),
        str(doc.get("error", "")),
        doc.get("duration_ms"),
        text,
        False,
        str(doc.get("tool", "")),
    ]


def _doc_micros(doc: dict[str, Any]) -> int:
    try:
        return epoch_micros(datetime.fromisoformat(doc["time"]))
    except (KeyError, TypeError, ValueError):
        return 0


def _replay(conn: sqlite3.Connection, path: Path, chain: Chain, clock: Callable[[], int], revs: _Revs) -> int:
    """Index what a previous writer journaled and did not index; returns the next segment number."""
    folder = path.parent
    segments = _segments(folder)
    if not segments:
        return 1
    rows: dict[str, list[Any]] = {}
    updates: list[tuple[Any, ...]] = []
    for item in _read_journal(folder):
        if item[0] == "i":
            try:
                rows.setdefault(item[1], _row_of(item[2], item[3]))
            except (TypeError, ValueError):
                continue
        else:
            _, eid, success, error, duration = item
            _pend_outcome(rows, updates, (success, error, duration, eid))
    try:
        warning = _index_rows(conn, path, list(rows.values()), updates, True, chain, clock(), True, revs)
    except sqlite3.Error as exc:
        raise _error(path, "index the journal left by the last run", exc) from exc
    if warning:
        log.warning("audit database %s: checkpoint failed: %s", path, warning)
    log.info(
        "audit database %s: indexed %d events and %d outcomes journaled by the last run",
        path,
        len(rows),
        len(updates),
    )
    for n in segments:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folder / f"{JOURNAL_NAME}.{n}")
    return segments[-1] + 1


def _configure(conn: sqlite3.Connection, path: Path) -> None:
    try:
        # busy_timeout first, so switching to WAL and migrating wait for
        # another process doing the same instead of failing at once.
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
        if mode != "wal":
            raise BackendError(
                f"audit database {path}: cannot use WAL journal mode (got {mode!r}); "
                "is it on a network filesystem?"
            )
        # NORMAL is durable across application crashes in WAL mode.
        conn.execute("PRAGMA synchronous = NORMAL")
        # Checkpoints run in a worker thread (see SQLiteAuditStore), never
        # inside one of this connection's commits on the loop.
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        # A WAL that grew (checkpoints kept back by readers) is cut back when
        # it starts again from its beginning.
        conn.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT}")
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise BackendError(
                    f"audit database {path}: schema version {version} is newer than "
                    f"this bastion supports ({SCHEMA_VERSION}); upgrade bastion"
                )
            if version < 2:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                # Events stored before seals existed (version 1) are not sealed: verify counts them.
                legacy = conn.execute("SELECT coalesce(max(seq), 0) FROM audit_events").fetchone()[0]
                conn.execute(
                    "INSERT OR REPLACE INTO audit_meta (key, value) VALUES ('legacy_seq', ?)", (str(legacy),)
                )
            if version < 3:
                for statement in _SCHEMA_V3:
                    conn.execute(statement)
            if version < SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            # Added to version 2 later (decision 0038): made where missing, no version change.
            conn.execute(_UNFINISHED_INDEX)
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        raise _error(path, "open", exc) from exc


# -- searching (worker threads; any process) ---------------------------------------


#: Rows read at a time by a streaming search, and the largest page a feed read answers.
PAGE_ROWS: Final = 2000


async def search_files(data_dir: str | Path, query: AuditQuery) -> list[dict[str, Any]]:
    """``search`` on a data directory's audit log without opening it for writing.

    For another process (``bastion audit search --config``): it may run while
    the cluster writes; it sees every committed event, indexed or journaled.
    """
    found: list[dict[str, Any]] = []
    async for page in search_pages_files(data_dir, query):
        found.extend(page)
    return found


async def search_pages_files(data_dir: str | Path, query: AuditQuery) -> AsyncIterator[list[dict[str, Any]]]:
    """``search_files`` in pages read as they are consumed: constant memory (decision 0035)."""
    pages = _search_pages(Path(data_dir) / AUDIT_DB_NAME, query)
    try:
        while True:
            page = await asyncio.to_thread(next, pages, None)
            if page is None:
                return
            yield page
    finally:
        # A consumer gone mid-read (cancelled): the thread still holds the generator.
        with contextlib.suppress(ValueError):
            pages.close()


def _search_pages(path: Path, query: AuditQuery) -> Generator[list[dict[str, Any]], None, None]:
    """The events matching ``query``: the journal's merged into the index's, in pages.

    The journal is read first (it is bounded: ``MAX_UNINDEXED`` items), then the
    index in one read transaction: an item indexed between the two reads is
    found in the index, and its journal copy dropped.  The index's rows are
    read ``PAGE_ROWS`` at a time, so memory stays bounded however many match.
    """
    items = _read_journal(path.parent)
    desc = query.order == "desc"
    journaled: dict[str, tuple[int, int, dict[str, Any]]] = {}
    outcomes: dict[str, tuple[Any, ...]] = {}
    for j, item in enumerate(items):
        if item[0] == "i":
            if item[1] not in journaled:
                journaled[item[1]] = (_doc_micros(item[2]), j, item[2])
        else:
            outcomes[item[1]] = item[2:]
    limit = query.limit or -1
    if not path.exists():
        yield from _pages((f[3] for f in _journal_matches(query, journaled, outcomes, desc)), limit)
        return
    try:
        # mode=ro: a reader can never write, whatever goes wrong.
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
    except sqlite3.Error as exc:
        raise _error(path, "search", exc) from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("BEGIN")  # one snapshot: the check below and the rows read
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        feed_base = int(_meta(conn, "feed_base", "0")) if version >= 3 else -1
        ids = list(journaled)
        for n in range(0, len(ids), 500):
            chunk = ids[n : n + 500]
            placeholders = ", ".join("?" * len(chunk))
            for (eid,) in conn.execute(f"SELECT id FROM audit_events WHERE id IN ({placeholders})", chunk):
                del journaled[eid]  # indexed meanwhile: the index's copy is the one
        sql, params = _search_sql(query, feed_base)
        cur = conn.execute(sql, params)

        def indexed() -> Iterator[tuple[int, int, int, dict[str, Any]]]:
            while rows := cur.fetchmany(PAGE_ROWS):
                for seq, eid, t, text, success, error, duration in rows:
                    doc = merge_outcome(text, success, error, duration)
                    late = outcomes.get(eid)
                    if late is not None:
                        apply_outcome(doc, *late)
                        if not _outcome_matches(query, doc):
                            continue
                    yield t, 0, seq, doc

        # Indexed items were written before journaled ones: (time, 0|1, position) is insertion order.
        merged = heapq.merge(
            indexed(), _journal_matches(query, journaled, outcomes, desc), key=lambda f: f[:3], reverse=desc
        )
        yield from _pages((f[3] for f in merged), limit)
    except sqlite3.Error as exc:
        raise _error(path, "search", exc) from exc
    finally:
        conn.close()


def _pages(docs: Iterator[dict[str, Any]], limit: int) -> Iterator[list[dict[str, Any]]]:
    """``docs`` in lists of ``PAGE_ROWS``, at most ``limit`` of them (``-1``: all)."""
    page: list[dict[str, Any]] = []
    for doc in docs:
        if limit == 0:
            break
        limit -= 1
        page.append(doc)
        if len(page) >= PAGE_ROWS:
            yield page
            page = []
    if page:
        yield page


def _journal_matches(
    query: AuditQuery,
    journaled: dict[str, tuple[int, int, dict[str, Any]]],
    outcomes: dict[str, tuple[Any, ...]],
    desc: bool,
) -> list[tuple[int, int, int, dict[str, Any]]]:
    found = []
    for eid, (t, j, doc) in journaled.items():
        late = outcomes.get(eid)
        if late is not None:
            apply_outcome(doc, *late)
        if _matches(query, doc, t):
            found.append((t, 1, j, doc))
    found.sort(key=lambda f: f[:3], reverse=desc)
    return found


def _matches(query: AuditQuery, doc: dict[str, Any], t: int) -> bool:
    if query.since is not None and t < epoch_micros(query.since):
        return False
    if query.until is not None and t >= epoch_micros(query.until):
        return False
    if query.types and doc.get("event") not in query.types:
        return False
    if not _outcome_matches(query, doc):
        return False
    return all(
        not want or doc.get(field, "") == want
        for field, want in (
            ("user", query.user),
            ("app", query.app),
            ("session_id", query.session_id),
            ("tool", query.tool),
        )
    )


def _outcome_matches(query: AuditQuery, doc: dict[str, Any]) -> bool:
    return query.outcome is None or bool(doc.get("success")) == (query.outcome == "success")


def _search_sql(query: AuditQuery, feed_base: int = 0) -> tuple[str, list[Any]]:
    """The index's part of a search; ``feed_base``: rows up to it have no tool column (-1: none has)."""
    where: list[str] = []
    params: list[Any] = []
    if query.since is not None:
        where.append("time_us >= ?")
        params.append(epoch_micros(query.since))
    if query.until is not None:
        where.append("time_us < ?")
        params.append(epoch_micros(query.until))
    if query.types:
        where.append(f"type IN ({', '.join('?' * len(query.types))})")
        params.extend(query.types)
    for column, value in (("user", query.user), ("app", query.app), ("session_id", query.session_id)):
        if value:
            where.append(f"{column} = ?")
            params.append(value)
    if query.tool:
        if feed_base < 0:  # a log no bastion with the tool column has opened yet
            where.append("json_extract(event, '$.tool') = ?")
            params.append(query.tool)
        elif feed_base == 0:
            where.append("tool = ?")
            params.append(query.tool)
        else:  # rows stored before the tool column: their tool is in the document only
            where.append("(tool = ? OR (seq <= ? AND tool = '' AND json_extract(event, '$.tool') = ?))")
            params.extend((query.tool, feed_base, query.tool))
    if query.outcome is not None:
        # Literal, so the partial index of failures serves "failure".
        where.append("success = 1" if query.outcome == "success" else "success = 0")
    sql = "SELECT seq, id, time_us, event, success, error, duration_ms FROM audit_events"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY time_us DESC, seq DESC" if query.order == "desc" else " ORDER BY time_us, seq"
    if query.limit:
        sql += " LIMIT ?"
        params.append(query.limit)
    return sql, params


# -- the feed: commit order (worker threads; any process; decision 0034) ---------------


def _position(cursor: str) -> int:
    if not cursor:
        return 0
    if not cursor.isdigit() or len(cursor) > 19:
        raise ValidationError(f'bad audit feed cursor "{cursor[:40]}" (expected a number from this store)')
    return int(cursor)


async def feed_files(data_dir: str | Path, cursor: str, limit: int, hold_us: int = 0) -> FeedPage:
    """Events changed after ``cursor`` in commit order, at most ``limit`` (``FeedPage``; ADR 34).

    Read-only, from any process.  Rows are in the feed once indexed (at most
    ``INDEX_DELAY`` after their commit).  A row stored before the feed existed
    (schema version 2) comes first, in the order it was indexed.
    """
    after = _position(cursor)
    rows = await asyncio.to_thread(
        _feed, Path(data_dir) / AUDIT_DB_NAME, after, max(1, min(limit, PAGE_ROWS))
    )
    return take_feed(rows, cursor, hold_us, _now_us())


async def feed_start_files(data_dir: str | Path, last: int) -> str:
    """The cursor after which the ``last`` newest changes of the feed come (``0``: its end)."""
    return str(await asyncio.to_thread(_feed_start, Path(data_dir) / AUDIT_DB_NAME, max(0, last)))


async def feed_backlog_files(data_dir: str | Path, cursor: str) -> int:
    """How many events the feed holds after ``cursor`` (an exporter's backlog)."""
    return await asyncio.to_thread(_feed_backlog, Path(data_dir) / AUDIT_DB_NAME, _position(cursor))


def _feed_read(path: Path, read: Callable[[sqlite3.Connection, int], _T]) -> _T:
    if not path.exists():
        raise BackendError(f"audit database {path}: not found")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise _error(path, "read the feed of", exc) from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("BEGIN")
        if int(conn.execute("PRAGMA user_version").fetchone()[0]) < 3:
            raise BackendError(
                f"audit database {path}: written by an older bastion without a feed; start the cluster once"
            )
        return read(conn, int(_meta(conn, "feed_base", "0")))
    except sqlite3.Error as exc:
        raise _error(path, "read the feed of", exc) from exc
    finally:
        conn.close()


_FEED_COLUMNS: Final = "time_us, event, success, error, duration_ms"


def _feed(path: Path, after: int, limit: int) -> list[tuple[str, int, dict[str, Any]]]:
    def read(conn: sqlite3.Connection, base: int) -> list[tuple[str, int, dict[str, Any]]]:
        rows: list[Any] = []
        if after < base:  # rows stored before the feed existed, in the order they were indexed
            rows = conn.execute(
                f"SELECT seq, {_FEED_COLUMNS} FROM audit_events WHERE rev IS NULL AND seq > ? AND seq <= ?"
                " ORDER BY seq LIMIT ?",
                (after, base, limit),
            ).fetchall()
            if len(rows) >= limit:
                return _feed_rows(rows)
        rows += conn.execute(
            f"SELECT rev, {_FEED_COLUMNS} FROM audit_events WHERE rev > ? ORDER BY rev LIMIT ?",
            (max(after, base), limit - len(rows)),
        ).fetchall()
        return _feed_rows(rows)

    return _feed_read(path, read)


def _feed_rows(rows: list[Any]) -> list[tuple[str, int, dict[str, Any]]]:
    return [(str(pos), t, merge_outcome(text, s, e, d)) for pos, t, text, s, e, d in rows]


def _feed_start(path: Path, last: int) -> int:
    def read(conn: sqlite3.Connection, base: int) -> int:
        if last == 0:
            top = conn.execute("SELECT max(rev) FROM audit_events").fetchone()[0]
            return max(int(top or 0), base)
        row = conn.execute(
            "SELECT rev FROM audit_events WHERE rev IS NOT NULL ORDER BY rev DESC LIMIT 1 OFFSET ?", (last,)
        ).fetchone()
        if row is not None:
            return int(row[0])
        newer = int(conn.execute("SELECT count(*) FROM audit_events WHERE rev IS NOT NULL").fetchone()[0])
        row = conn.execute(
            "SELECT seq FROM audit_events WHERE rev IS NULL AND seq <= ? ORDER BY seq DESC LIMIT 1 OFFSET ?",
            (base, last - newer),
        ).fetchone()
        return 0 if row is None else int(row[0])

    return _feed_read(path, read)


def _feed_backlog(path: Path, after: int) -> int:
    def read(conn: sqlite3.Connection, base: int) -> int:
        n = int(
            conn.execute("SELECT count(*) FROM audit_events WHERE rev > ?", (max(after, base),)).fetchone()[0]
        )
        if after < base:
            n += int(
                conn.execute(
                    "SELECT count(*) FROM audit_events WHERE rev IS NULL AND seq > ? AND seq <= ?",
                    (after, base),
                ).fetchone()[0]
            )
        return n

    return _feed_read(path, read)


def _error(path: Path, action: str, exc: BaseException) -> BackendError:
    detail = str(exc) or type(exc).__name__
    return BackendError(f"audit database {path}: cannot {action}: {detail}")


# -- verifying (worker threads; any process) -------------------------------------------

#: ``verify --since``: seals this much older than ``since`` are read too, so events dated
#: (by the host that made them) a little before their seal are still found sealed.
SINCE_SLACK_US: Final = 3600 * 1_000_000


async def verify_files(
    data_dir: str | Path, checker: Checker | None, since: datetime | None = None
) -> VerifyReport:
    """Check a data directory's audit log against its seals (ADR 32), read-only, from any process."""
    return await asyncio.to_thread(_verify, Path(data_dir) / AUDIT_DB_NAME, checker, since)


def _verify(path: Path, checker: Checker | None, since: datetime | None) -> VerifyReport:
    since_us = None if since is None else epoch_micros(since)
    if not path.exists():
        raise BackendError(f"audit database {path}: not found")
    journaled = sum(1 for _ in _read_journal(path.parent))
    writer_running = _writer_running(path.parent)
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise _error(path, "verify", exc) from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # One read transaction: seals and rows from the same snapshot, whatever the indexer does.
        conn.execute("BEGIN")
        if int(conn.execute("PRAGMA user_version").fetchone()[0]) < 2:
            raise BackendError(
                f"audit database {path}: written by a bastion without seals; start the cluster once"
            )
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        v = Verifier(checker, since_us, int(_meta(conn, "legacy_seq", "0")))
        v.tool_base = int(_meta(conn, "feed_base", "0"))
        sql = f"SELECT {_SEAL_COLUMNS} FROM audit_seals"
        params: list[Any] = []
        if since_us is not None:
            sql += " WHERE time_us >= ?"
            params.append(since_us - SINCE_SLACK_US)
        v.add_seals(Seal(*r) for r in conn.execute(sql + " ORDER BY writer, seq", params))
        rows: Iterator[Any] = conn.execute(
            "SELECT seq, id, time_us, type, user, app, session_id, success, error, duration_ms, event, "
            + ("tool" if version >= 3 else "NULL")
            + " FROM audit_events ORDER BY seq"
        )
        for seq, *rest in rows:
            v.check_row(chain_mod.Row(*rest), seq)
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        raise _error(path, "verify", exc) from exc
    finally:
        conn.close()
    breaks = v.finish()
    tail = v.tails.get(WRITER)
    if (
        since_us is None
        and not writer_running
        and tail is not None
        and tail[2] != chain_mod.CLOSE
        and not breaks
    ):
        breaks.append(
            Break(
                tail[1],
                f"(seal {WRITER}/{tail[0]})",
                "the log does not end with its writer's closing seal: its end was cut off, or the "
                "gateway stopped without closing it (start it again: it seals what it left)",
            )
        )
    return VerifyReport(v, breaks, journaled)


def _writer_running(folder: Path) -> bool:
    """Whether a process holds the audit log's writer lock now."""
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # releases a lock taken
    return False


class AuditFiles:
    """A data directory's audit log, read-only, from any process: search, feed (decisions 0034, 0035).

    What ``bastion audit search``/``tail`` use on the server host while the
    cluster runs and writes it; ``close`` is there for the reader protocol.
    """

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)

    async def search(self, query: AuditQuery) -> list[dict[str, Any]]:
        return await search_files(self.data_dir, query)

    def search_pages(self, query: AuditQuery) -> AsyncIterator[list[dict[str, Any]]]:
        return search_pages_files(self.data_dir, query)

    async def feed(self, cursor: str, limit: int, hold_us: int = 0) -> FeedPage:
        return await feed_files(self.data_dir, cursor, limit, hold_us)

    async def feed_start(self, last: int) -> str:
        return await feed_start_files(self.data_dir, last)

    async def feed_backlog(self, cursor: str) -> int:
        return await feed_backlog_files(self.data_dir, cursor)

    async def close(self) -> None:
        return None
