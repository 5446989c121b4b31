"""The embedded SQLite storage backend (the default).

What it is for: one file holds every resource of a cluster, and any number
of bastion processes on the same host may share it.  Revisions come from
the ``events`` table's AUTOINCREMENT rowid, so they are global, strictly
increasing and shared by every process that opens the file; each write
(create, update, put, delete, expiry) appends exactly one event row and
updates ``kv`` in the same ``BEGIN IMMEDIATE`` transaction, so the change
log and the current state can never disagree.  ``watch`` replays that log;
writes made through this instance wake watchers at once, writes made by
other processes are found by polling.

What it must not do: let a ``sqlite3``/``aiosqlite`` exception escape (they
become ``BackendError`` naming the file), match prefixes with ``LIKE`` (``_``
and ``%`` in keys would leak across prefixes), read while one of its own
write transactions is half done (one connection sees its own uncommitted
rows), or import anything above ``bastion.errors``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from bastion._time import Clock, SystemClock
from bastion.backend import Event, EventType, Item
from bastion.errors import (
    AlreadyExistsError,
    BackendError,
    ConflictError,
    NotFoundError,
    ValidationError,
    WatchExpiredError,
)
from bastion.metrics import backend_error

__all__ = ["SQLiteBackend", "prefix_upper_bound"]

_T = TypeVar("_T")

#: ``PRAGMA user_version`` of the schema below; bump it with a migration.
SCHEMA_VERSION = 1
#: How long a writer waits for another process's write lock, in milliseconds.
BUSY_TIMEOUT_MS = 5000
#: Events fetched per query by a watcher that is catching up.
WATCH_BATCH = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key      TEXT PRIMARY KEY,
    value    BLOB NOT NULL,
    revision INTEGER NOT NULL,
    expires  REAL NULL
);
CREATE INDEX IF NOT EXISTS kv_expires ON kv (expires) WHERE expires IS NOT NULL;
CREATE TABLE IF NOT EXISTS events (
    revision INTEGER PRIMARY KEY AUTOINCREMENT,
    key      TEXT NOT NULL,
    type     TEXT NOT NULL,
    value    BLOB NOT NULL,
    expires  REAL NULL
);
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""

# The highest revision removed by compaction: a watcher starting below it
# has missed changes.  Kept explicitly rather than inferred from the oldest
# retained event so a gap in revisions can never be mistaken for compaction.
_COMPACTED = "compacted_revision"


def _epoch(when: datetime) -> float:
    if when.tzinfo is None:
        # Naive datetimes are taken as UTC (the clock and resources use UTC);
        # ``timestamp()`` would otherwise read them as local time.
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _to_epoch(when: datetime | None) -> float | None:
    return None if when is None else _epoch(when)


def _from_epoch(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def prefix_upper_bound(prefix: str) -> str | None:
    """The smallest string greater than every string starting with ``prefix``.

    SQLite compares TEXT with memcmp on UTF-8, which orders like Python's
    code-point comparison, so ``prefix <= key < bound`` is an exact, indexed
    prefix match.  ``None`` means no upper bound (empty prefix, or a prefix
    made only of U+10FFFF).
    """
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        if last < 0x10FFFF:
            nxt = last + 1
            if 0xD800 <= nxt <= 0xDFFF:
                # Surrogates cannot be encoded as UTF-8; none can be in a key.
                nxt = 0xE000
            return "".join(chars) + chr(nxt)
    return None


class SQLiteBackend:
    """``Backend`` on one SQLite file (WAL mode), shared safely by processes.

    Open with ``await SQLiteBackend.open(path)``; close with ``close()``.
    Besides the ``Backend`` methods, ``expire()`` and ``compact()`` do the
    housekeeping the service runs periodically.
    """

    def __init__(
        self,
        conn: aiosqlite.Connection,
        path: Path,
        *,
        clock: Clock,
        poll_interval: float,
        event_retention: int,
    ) -> None:
        # Use ``open``: the connection must be configured and migrated first.
        self._conn: aiosqlite.Connection | None = conn
        self._path = path
        self._clock = clock
        self._poll_interval = poll_interval
        self._event_retention = max(1, event_retention)
        # One connection runs every statement, so a read issued between the
        # statements of a write transaction would see uncommitted rows; the
        # lock makes each transaction (and each read) exclusive.
        self._lock = asyncio.Lock()
        # Replaced after every committed write; watchers wait on the one
        # current when they last queried, so none misses a wake-up.
        self._changed = asyncio.Event()
        self._closed = False
        # Write transactions run as tasks shielded from the caller's
        # cancellation (see ``_transact``); keep references until they end.
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- opening and closing -------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        clock: Clock | None = None,
        poll_interval: float = 0.2,
        event_retention: int = 100_000,
    ) -> SQLiteBackend:
        """Open (creating if needed) the database at ``path``.

        The parent directory is created with mode 0700 if missing and the
        file is made 0600: it holds credentials.  ``poll_interval`` is how
        often watchers look for writes by other processes;
        ``event_retention`` is how many events ``compact()`` keeps.
        """
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        db = Path(path)
        # Filesystem calls block; keep them off the event loop.
        await asyncio.to_thread(_prepare_file, db)

        try:
            # isolation_level=None: the driver never opens transactions
            # implicitly; every write transaction is our explicit BEGIN IMMEDIATE.
            conn = await aiosqlite.connect(db, isolation_level=None)
        except sqlite3.Error as exc:
            backend_error("sqlite", "open")
            raise BackendError(f"sqlite database {db}: cannot open: {exc}") from exc
        try:
            await cls._configure(conn, db)
        except BaseException:
            await conn.close()
            raise
        return cls(
            conn,
            db,
            clock=clock or SystemClock(),
            poll_interval=poll_interval,
            event_retention=event_retention,
        )

    @staticmethod
    async def _configure(conn: aiosqlite.Connection, db: Path) -> None:
        try:
            # busy_timeout first, so switching to WAL and migrating wait for
            # another process doing the same instead of failing at once.
            await _exec(conn, f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            rows = list(await conn.execute_fetchall("PRAGMA journal_mode = WAL"))
            mode = str(rows[0][0]).lower() if rows else ""
            if mode != "wal":
                raise BackendError(
                    f"sqlite database {db}: cannot use WAL journal mode (got {mode!r}); "
                    "is it on a network filesystem?"
                )
            # NORMAL is durable across application crashes in WAL mode; only
            # an OS crash may lose the last commits, never corrupt the file.
            await _exec(conn, "PRAGMA synchronous = NORMAL")
            await _exec(conn, "BEGIN IMMEDIATE")
            try:
                rows = list(await conn.execute_fetchall("PRAGMA user_version"))
                version = int(rows[0][0])
                if version > SCHEMA_VERSION:
                    raise BackendError(
                        f"sqlite database {db}: schema version {version} is newer than "
                        f"this bastion supports ({SCHEMA_VERSION}); upgrade bastion"
                    )
                if version < SCHEMA_VERSION:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            await _exec(conn, statement)
                    await _exec(conn, f"PRAGMA user_version = {SCHEMA_VERSION}")
                await _exec(conn, "COMMIT")
            except BaseException:
                await _rollback(conn)
                raise
        except sqlite3.Error as exc:
            raise _backend_error(db, "open", exc) from exc

    async def close(self) -> None:
        """Finish queued operations, close the file and end every watcher."""
        if self._closed:
            return
        self._closed = True
        self._notify()  # watchers waiting for changes see ``_closed`` and stop
        # Operations already waiting for the lock were accepted before close;
        # the lock is FIFO, so they run before the connection goes away.
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                try:
                    await conn.close()
                except sqlite3.Error as exc:
                    raise _backend_error(self._path, "close", exc) from exc
        self._notify()

    @property
    def path(self) -> Path:
        return self._path

    # -- reads ---------------------------------------------------------------

    async def get(self, key: str) -> Item:
        rows = await self._query(
            "read",
            "SELECT key, value, revision, expires FROM kv WHERE key = ? AND (expires IS NULL OR expires > ?)",
            (key, self._now()),
        )
        if not rows:
            raise NotFoundError(f"{key} not found")
        return _item(rows[0])

    async def list(self, prefix: str) -> builtins.list[Item]:
        upper = prefix_upper_bound(prefix)
        live = "(expires IS NULL OR expires > ?)"
        if upper is None:
            sql = f"SELECT key, value, revision, expires FROM kv WHERE key >= ? AND {live}"
            params: tuple[Any, ...] = (prefix, self._now())
        else:
            sql = f"SELECT key, value, revision, expires FROM kv WHERE key >= ? AND key < ? AND {live}"
            params = (prefix, upper, self._now())
        rows = await self._query("list", sql + " ORDER BY key", params)
        return [_item(row) for row in rows]

    async def current_revision(self) -> int:
        # Compaction always keeps the newest event, so max() is the newest
        # revision ever written.
        rows = await self._query("read", "SELECT COALESCE(MAX(revision), 0) FROM events", ())
        return int(rows[0][0])

    # -- writes --------------------------------------------------------------

    async def create(self, item: Item) -> Item:
        async def body(conn: aiosqlite.Connection, now: float) -> Item:
            current = await _current(conn, item.key)
            if current is not None and _live(current[1], now):
                raise AlreadyExistsError(f"{item.key} already exists")
            return await _write_put(conn, item)

        return await self._transact("create", body)

    async def update(self, item: Item, expected_revision: int) -> Item:
        async def body(conn: aiosqlite.Connection, now: float) -> Item:
            current = await _current(conn, item.key)
            if current is None or not _live(current[1], now):
                raise NotFoundError(f"{item.key} not found")
            if current[0] != expected_revision:
                raise ConflictError(
                    f"{item.key} was modified: revision is {current[0]}, expected {expected_revision}"
                )
            return await _write_put(conn, item)

        return await self._transact("update", body)

    async def put(self, item: Item) -> Item:
        async def body(conn: aiosqlite.Connection, now: float) -> Item:
            return await _write_put(conn, item)

        return await self._transact("put", body)

    async def delete(self, key: str, expected_revision: int | None = None) -> None:
        async def body(conn: aiosqlite.Connection, now: float) -> None:
            current = await _current(conn, key)
            if current is None or not _live(current[1], now):
                raise NotFoundError(f"{key} not found")
            if expected_revision is not None and current[0] != expected_revision:
                raise ConflictError(
                    f"{key} was modified: revision is {current[0]}, expected {expected_revision}"
                )
            await _append_event(conn, EventType.DELETE, key, b"", None)
            await _exec(conn, "DELETE FROM kv WHERE key = ?", (key,))

        await self._transact("delete", body)

    # -- housekeeping --------------------------------------------------------

    async def expire(self) -> int:
        """Delete every expired item, one DELETE event each; return how many."""

        async def body(conn: aiosqlite.Connection, now: float) -> int:
            # Inside BEGIN IMMEDIATE nothing else writes, so the INSERT and
            # the DELETE see the same set of expired rows.  ORDER BY key makes
            # the event order deterministic.
            count = await _exec(
                conn,
                "INSERT INTO events (key, type, value, expires)"
                " SELECT key, ?, X'', NULL FROM kv"
                " WHERE expires IS NOT NULL AND expires <= ? ORDER BY key",
                (EventType.DELETE.value, now),
            )
            if count:
                await _exec(conn, "DELETE FROM kv WHERE expires IS NOT NULL AND expires <= ?", (now,))
            return count

        return await self._transact("expire items", body)

    async def compact(self) -> int:
        """Drop all but the newest ``event_retention`` events; return how many.

        The newest event is always kept, so ``current_revision`` survives.
        Watchers asking for a dropped revision get ``WatchExpiredError``.
        """

        async def body(conn: aiosqlite.Connection, now: float) -> int:
            # The newest revision that falls outside the retention window;
            # counted in rows, not revision numbers, so gaps cannot matter.
            rows = list(
                await conn.execute_fetchall(
                    "SELECT revision FROM events ORDER BY revision DESC LIMIT 1 OFFSET ?",
                    (self._event_retention,),
                )
            )
            if not rows:
                return 0
            threshold = int(rows[0][0])
            count = await _exec(conn, "DELETE FROM events WHERE revision <= ?", (threshold,))
            await _exec(
                conn,
                "INSERT INTO meta (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = max(value, excluded.value)",
                (_COMPACTED, threshold),
            )
            return count

        return await self._transact("compact events", body)

    # -- watch ---------------------------------------------------------------

    async def watch(self, from_revision: int) -> AsyncIterator[Event]:
        """Yield every change with revision > ``from_revision``, in order, forever.

        Ends when the backend is closed.  Raises ``WatchExpiredError`` (on
        the first iteration, or later if this watcher falls behind a
        compaction) when some of those changes were compacted away.
        """
        last = from_revision
        while not self._closed:
            # Taken before querying: a write committed after the query sets
            # this event, so the wait below cannot sleep through it.
            changed = self._changed
            batch = await self._events_after(last)
            if batch is None:
                return  # closed meanwhile
            for event in batch:
                yield event
                last = event.revision
            if len(batch) >= WATCH_BATCH:
                continue  # catching up: fetch the next batch at once
            if self._closed:
                return
            try:
                # Local writes set ``changed``; other processes' writes are
                # only seen by querying again after the poll interval.
                async with asyncio.timeout(self._poll_interval):
                    await changed.wait()
            except TimeoutError:
                pass

    async def _events_after(self, revision: int) -> builtins.list[Event] | None:
        async with self._lock:
            conn = self._conn
            if conn is None:
                return None
            try:
                rows = list(
                    await conn.execute_fetchall(
                        "SELECT revision, key, type, value, expires FROM events"
                        " WHERE revision > ? ORDER BY revision LIMIT ?",
                        (revision, WATCH_BATCH),
                    )
                )
                if not rows:
                    # Compaction keeps the newest event, so an empty result
                    # means nothing after ``revision`` existed to be lost.
                    return []
                # Read after the events: if nothing above ``revision`` had
                # been compacted by now, none was missing from the rows read.
                meta = list(
                    await conn.execute_fetchall("SELECT value FROM meta WHERE name = ?", (_COMPACTED,))
                )
            except sqlite3.Error as exc:
                raise _backend_error(self._path, "read events", exc) from exc
        compacted = int(meta[0][0]) if meta else 0
        if revision < compacted:
            raise WatchExpiredError(
                f"cannot watch from revision {revision}: changes up to revision "
                f"{compacted} were compacted; list again and watch from its revision"
            )
        return [_event(row) for row in rows]

    # -- plumbing ------------------------------------------------------------

    def _now(self) -> float:
        return _epoch(self._clock.now())

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError(f"sqlite database {self._path}: backend is closed")

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _query(self, action: str, sql: str, params: Sequence[Any]) -> builtins.list[Any]:
        self._check_open()
        async with self._lock:
            conn = self._conn
            if conn is None:
                raise BackendError(f"sqlite database {self._path}: backend is closed")
            try:
                # fetchall resets the statement, so no read snapshot stays
                # open and the next query sees other processes' commits.
                return list(await conn.execute_fetchall(sql, params))
            except sqlite3.Error as exc:
                raise _backend_error(self._path, action, exc) from exc
            except UnicodeEncodeError as exc:
                raise _unencodable(exc) from exc

    async def _transact(
        self, action: str, body: Callable[[aiosqlite.Connection, float], Awaitable[_T]]
    ) -> _T:
        """Run ``body`` in one BEGIN IMMEDIATE transaction and wake watchers.

        The transaction runs in its own task, shielded from the caller's
        cancellation: a caller cancelled half-way must not leave the shared
        connection inside an open transaction that the next operation would
        silently join.  The write then commits or rolls back on its own.
        """
        self._check_open()
        task = asyncio.ensure_future(self._run_transaction(action, body))
        self._tasks.add(task)
        task.add_done_callback(self._transaction_done)
        return await asyncio.shield(task)

    def _transaction_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        # Mark the outcome as retrieved: if the caller was cancelled nobody
        # else will, and asyncio would log "exception was never retrieved".
        if not task.cancelled():
            task.exception()

    async def _run_transaction(
        self, action: str, body: Callable[[aiosqlite.Connection, float], Awaitable[_T]]
    ) -> _T:
        async with self._lock:
            conn = self._conn
            if conn is None:
                raise BackendError(f"sqlite database {self._path}: backend is closed")
            try:
                await _exec(conn, "BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise _backend_error(self._path, action, exc) from exc
            committed = False
            try:
                result = await body(conn, self._now())
                await _exec(conn, "COMMIT")
                committed = True
            except sqlite3.Error as exc:
                raise _backend_error(self._path, action, exc) from exc
            except UnicodeEncodeError as exc:
                raise _unencodable(exc) from exc
            finally:
                if not committed:
                    await _rollback(conn)
        self._notify()
        return result


def _prepare_file(db: Path) -> None:
    """Create the parent directory (0700) and the database file (0600)."""
    try:
        # The mode only applies to directories created here: an existing
        # parent (maybe shared, like /var/lib) is left as its owner set it.
        db.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Create the file ourselves so it is never world-readable, not even
        # between sqlite creating it and a chmod; chmod also fixes an old file.
        fd = os.open(db, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        db.chmod(0o600)
    except OSError as exc:
        raise BackendError(f"sqlite database {db}: cannot create: {exc}") from exc


def _backend_error(path: Path, action: str, exc: BaseException) -> BackendError:
    backend_error("sqlite", action)  # every sqlite3 failure passes here
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, sqlite3.OperationalError) and "locked" in detail:
        detail = f"{detail} (another process held the write lock for more than {BUSY_TIMEOUT_MS // 1000}s)"
    return BackendError(f"sqlite database {path}: cannot {action}: {detail}")


def _unencodable(exc: UnicodeEncodeError) -> ValidationError:
    # Keys are stored as UTF-8 text; a str with lone surrogates (e.g. from
    # undecodable bytes) cannot be, and that is the caller's input at fault.
    return ValidationError(f"key is not valid Unicode text: {exc.reason} at {exc.start}")


async def _exec(conn: aiosqlite.Connection, sql: str, params: Sequence[Any] = ()) -> int:
    """Run one statement that returns no rows; return how many rows it changed."""
    async with conn.execute(sql, params) as cursor:
        return cursor.rowcount


async def _rollback(conn: aiosqlite.Connection) -> None:
    # After a failed COMMIT SQLite may already have rolled back ("no
    # transaction is active"); the original error is what matters.
    with contextlib.suppress(sqlite3.Error):
        await _exec(conn, "ROLLBACK")


def _live(expires: float | None, now: float) -> bool:
    return expires is None or expires > now


def _item(row: Sequence[Any]) -> Item:
    return Item(key=row[0], value=bytes(row[1]), revision=int(row[2]), expires=_from_epoch(row[3]))


def _event(row: Sequence[Any]) -> Event:
    revision, key, kind, value, expires = row
    return Event(
        type=EventType(kind),
        item=Item(key=key, value=bytes(value), revision=int(revision), expires=_from_epoch(expires)),
    )


async def _current(conn: aiosqlite.Connection, key: str) -> tuple[int, float | None] | None:
    """``(revision, expires)`` of the stored row for ``key``, expired or not."""
    rows = list(await conn.execute_fetchall("SELECT revision, expires FROM kv WHERE key = ?", (key,)))
    if not rows:
        return None
    return int(rows[0][0]), rows[0][1]


async def _append_event(
    conn: aiosqlite.Connection, kind: EventType, key: str, value: bytes, expires: float | None
) -> int:
    """Append one event; its rowid is the new revision."""
    rows = list(
        await conn.execute_fetchall(
            "INSERT INTO events (key, type, value, expires) VALUES (?, ?, ?, ?) RETURNING revision",
            (key, kind.value, value, expires),
        )
    )
    return int(rows[0][0])


async def _write_put(conn: aiosqlite.Connection, item: Item) -> Item:
    expires = _to_epoch(item.expires)
    value = bytes(item.value)
    revision = await _append_event(conn, EventType.PUT, item.key, value, expires)
    await _exec(
        conn,
        "INSERT INTO kv (key, value, revision, expires) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (key) DO UPDATE SET"
        " value = excluded.value, revision = excluded.revision, expires = excluded.expires",
        (item.key, value, revision, expires),
    )
    return Item(key=item.key, value=value, revision=revision, expires=_from_epoch(expires))
