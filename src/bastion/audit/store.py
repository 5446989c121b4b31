"""Where audit events are kept: the ``AuditStore`` protocol and its SQLite file.

Contract of every ``AuditStore``:

- ``insert_many(events)`` stores all of ``events`` in ONE transaction and
  returns only once that transaction is committed (durable against a crash
  of the process); if it raises, none of them is stored.  Inserting an id
  that is already stored keeps the stored row (idempotent retries; one row
  per event, always).
- ``complete_many(updates)`` sets ``success``, ``error`` and ``duration_ms``
  of already stored events, in the indexed columns and in the stored JSON
  alike (``code`` follows ``success``; an empty ``error`` or a ``None``
  duration removes the field, as ``AuditEvent.to_dict`` would have omitted
  it).  One transaction; ids not stored are ignored.
- ``search(query)`` returns stored events (the ``to_dict`` form, completions
  applied) matching every given filter, oldest first (by event time, then
  by insertion order), at most ``query.limit`` of them.
- Failures raise ``BackendError``; ``close()`` is idempotent, and any other
  call after it raises ``BackendError``.

``SQLiteAuditStore`` keeps ``<data_dir>/audit.db`` (mode 0600, WAL,
``synchronous=NORMAL``: a commit survives a crash of the process; an OS
crash or power loss may lose the last commits but never corrupts the file).
It is its own file so audit writes never contend with the backend's.  One
process writes it; any process may read it while it is written.

Why writes run synchronously on the event loop: measured 2026-11-22 on
this 2-vCPU host (shared: load average 2-3.5 from other jobs during the
runs), CPython 3.11.7, SQLite 3.40.1, uvloop, the process pinned to one
core; 64 concurrent callers each looping ``await AuditLog.record(e)`` then
``complete(...)`` (one insert + one completion per call), 200,000 calls
into a fresh file, medians of 3 interleaved runs::

    store variant                                   calls/s   CPU µs/call
    sync sqlite3 on the loop (this module)           10,477       95.0
    sqlite3 in a worker thread (asyncio.to_thread)    9,230      107.7
    (the callers alone, no audit)                    63,766       15.7

On one core a thread buys no extra CPU and every batch pays the thread
hand-offs, so it is slower.  The price of writing on the loop is that it
is busy for the whole transaction: median 2.7-3.5 ms per batch of 64
inserts and 0.9-1.2 ms per batch of 64 completions, p99 ~8 ms.  SQLite's
automatic checkpoints inside those commits (fsyncs) raised the p99 to 21 ms
and the worst case past 100 ms, hence the checkpoint thread below.

Where the SQLite cost goes (raw SQLite, insert + completion per call,
CPU µs, at 500,000 rows, checkpoints counted separately)::

    this schema, uuid4 event and session ids          45.4  + 11.7 checkpoint
    this schema, time-ordered (uuid7-like) ids        28.5  +  3.4
    no unique id index (complete by rowid)            23.2  +  4.3
    neither id nor session_id index                   14.7  +  2.2

Every random key (``id``; ``session_id`` with many live sessions) dirties
one index page per row, and every dirty page is written to the WAL at
commit and copied again at checkpoint.  Time-ordered ids would make both
indexes append at their right edge.

Reads (``search``) run in a worker thread on their own read-only
connection: they may scan many rows, and must block neither the loop nor
the writer (WAL readers do not block the writer).

What this store must not do: block the loop on anything but its own short
transactions (``busy_timeout`` is short: a second writer process on the same
file is a misconfiguration, and its lock waits would stall the loop), let
``sqlite3`` exceptions escape, or import anything above ``bastion.errors``
and ``bastion.audit.events``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, NamedTuple, Protocol

import orjson

from bastion.audit.events import REQUEST, AuditEvent, code_for
from bastion.errors import BackendError, ValidationError

log = logging.getLogger("bastion.audit")

__all__ = [
    "AUDIT_DB_NAME",
    "AuditQuery",
    "AuditStore",
    "Completion",
    "SQLiteAuditStore",
]

AUDIT_DB_NAME: Final = "audit.db"
#: ``PRAGMA user_version`` of the schema below; bump it with a migration.
SCHEMA_VERSION: Final = 1
#: How long a write waits for another process's write lock.  The wait
#: blocks the event loop, so it is short (see the module doc).
BUSY_TIMEOUT_MS: Final = 1000
#: The largest ``AuditQuery.limit`` accepted.
MAX_LIMIT: Final = 100_000

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
CREATE INDEX IF NOT EXISTS audit_events_session ON audit_events (session_id, time_us)
"""

_INSERT: Final = (
    "INSERT INTO audit_events"
    " (id, time_us, type, user, app, session_id, success, error, duration_ms, event)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING"
)

# A completion whose event's JSON is still in memory: the new JSON is built
# in Python, and SQLite only rewrites the row.
_COMPLETE: Final = "UPDATE audit_events SET success = ?, error = ?, duration_ms = ?, event = ? WHERE id = ?"

# A completion whose JSON is not in memory any more: patched by SQLite.
# json_patch (RFC 7396) sets success/error/duration_ms and deletes the keys
# patched with null, so the JSON omits empty fields exactly like to_dict;
# ``code`` keeps its prefix and takes the I/E suffix of the new outcome.
# Measured about twice as slow as the path above (three JSON parses).
_COMPLETE_IN_SQL: Final = (
    "UPDATE audit_events SET success = ?1, error = ?2, duration_ms = ?3,"
    " event = json_set(json_patch(event, ?4), '$.code',"
    " substr(json_extract(event, '$.code'), 1, length(json_extract(event, '$.code')) - 1) || ?5)"
    " WHERE id = ?6"
)

#: How many stored events' JSON is kept in memory for their completion
#: (oldest dropped first; a dropped one is completed by ``_COMPLETE_IN_SQL``).
#: Calls in flight at once rarely exceed a few thousand.
PENDING_MAX: Final = 16_384
#: Rows written between two checkpoints (see ``SQLiteAuditStore``).
CHECKPOINT_ROWS: Final = 2_000
#: WAL size past which the writer truncates it (see ``SQLiteAuditStore._truncate_wal``).
WAL_LIMIT: Final = 64 << 20


class Completion(NamedTuple):
    """The outcome of the call an already recorded event describes.

    A ``NamedTuple`` rather than a frozen dataclass: one is built per call
    on the hot path, and a tuple is built several times faster.
    """

    event_id: str
    success: bool
    error: str = ""
    duration_ms: float | None = None


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Filters for ``AuditStore.search``; every given filter must match.

    ``since <= time < until`` (naive datetimes are UTC); ``types`` empty
    means any type; ``user``/``app``/``session_id`` ``None`` (or empty) mean
    any.  Results are oldest first, at most ``limit`` (1..``MAX_LIMIT``).
    """

    since: datetime | None = None
    until: datetime | None = None
    types: tuple[str, ...] = ()
    user: str | None = None
    app: str | None = None
    session_id: str | None = None
    limit: int = 1000

    def __post_init__(self) -> None:
        if not 1 <= self.limit <= MAX_LIMIT:
            raise ValidationError(f"audit search limit must be between 1 and {MAX_LIMIT}, got {self.limit}")


class AuditStore(Protocol):
    """Durable storage of audit events; the contract is in the module doc."""

    async def insert_many(self, events: Sequence[AuditEvent]) -> None: ...

    async def complete_many(self, updates: Sequence[Completion]) -> None: ...

    async def search(self, query: AuditQuery) -> list[dict[str, Any]]: ...

    async def close(self) -> None: ...


class SQLiteAuditStore:
    """``AuditStore`` on ``<data_dir>/audit.db``; open with ``await SQLiteAuditStore.open(data_dir)``.

    Writes run synchronously on the calling (event-loop) thread, one short
    transaction per call; see the module doc for why and for the numbers.
    Checkpoints (copying the WAL into the database file, with two fsyncs)
    are the slow part of SQLite writing; left automatic they would run
    inside a commit on the loop and stall it for tens of milliseconds, so
    they run instead in a worker thread on their own connection, one at a
    time, every ``CHECKPOINT_ROWS`` rows written (``PASSIVE``: they never
    block the writer).
    """

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        # Use ``open``: the connection must be configured and migrated first.
        self._conn: sqlite3.Connection | None = conn
        self._path = path
        # JSON of stored, not yet completed events, by id (insertion order
        # = age, for eviction); see ``PENDING_MAX``.
        self._pending: dict[str, str] = {}
        self._since_checkpoint = 0
        self._checkpointer: asyncio.Task[None] | None = None
        # Opened by the first checkpoint, in its thread; used by one
        # checkpoint at a time, then closed by close().
        self._checkpoint_conn: sqlite3.Connection | None = None
        self._closer: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, data_dir: str | Path) -> SQLiteAuditStore:
        """Open (creating if needed) ``<data_dir>/audit.db``.

        ``data_dir`` is created with mode 0700 if missing; the file is made
        0600 (tool arguments may be sensitive even after redaction).
        """
        path = Path(data_dir) / AUDIT_DB_NAME
        # Creating the file, switching to WAL and migrating touch the disk
        # (and may wait for a lock): keep them off the event loop.
        conn = await asyncio.to_thread(_open_writer, path)
        return cls(conn, path)

    @property
    def path(self) -> Path:
        return self._path

    async def insert_many(self, events: Sequence[AuditEvent]) -> None:
        if not events:
            return
        rows = [_row(e) for e in events]
        changed = self._write("insert", _INSERT, rows, ())
        pending = self._pending
        if changed == len(rows):
            # Every row is new, so each JSON below is what is stored.  (A
            # duplicate id keeps the stored row; then nothing is cached and
            # the completion is done in SQL, on what is really stored.)
            for event, row in zip(events, rows, strict=True):
                # Only calls still waiting for their outcome get completed; session
                # start/end, notifications and refused calls never are, so caching
                # them only filled the cache (seen in the benchmarks: +27 MB RSS).
                if event.type == REQUEST and event.success and event.duration_ms is None:
                    pending[row[0]] = row[-1]
            while len(pending) > PENDING_MAX:
                del pending[next(iter(pending))]
        self._wrote(len(rows))

    async def complete_many(self, updates: Sequence[Completion]) -> None:
        if not updates:
            return
        pending = self._pending
        # JSON already rewritten in this batch, so a second completion of
        # the same event (in order) builds on the first.
        done: dict[str, str] = {}
        in_python: list[tuple[Any, ...]] = []
        in_sql: list[tuple[Any, ...]] = []
        for event_id, success, error, duration_ms in updates:
            success = bool(success)
            error = _clean(error) if error else ""
            text = done.get(event_id) or pending.pop(event_id, None)
            if text is None:
                patch = {"success": success, "error": error or None, "duration_ms": duration_ms}
                in_sql.append(
                    (
                        success,
                        error,
                        duration_ms,
                        orjson.dumps(patch).decode(),
                        "I" if success else "E",
                        event_id,
                    )
                )
                continue
            text = _completed_json(text, success, error, duration_ms)
            done[event_id] = text
            in_python.append((success, error, duration_ms, text, event_id))
        # The two lists never share an id (an id missing from memory stays
        # missing for the whole batch), so their relative order is free.
        self._write("complete", _COMPLETE, in_python, in_sql)
        self._wrote(len(updates))

    async def search(self, query: AuditQuery) -> list[dict[str, Any]]:
        if self._conn is None:
            raise self._closed_error()
        sql, params = _search_sql(query)
        # A thread with its own connection (closed by the thread): a big
        # search must not stall the loop, and a read-only connection can
        # neither disturb the writer nor outlive the read.
        return await asyncio.to_thread(_read, self._path, sql, params)

    async def close(self) -> None:
        if self._closer is None:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            self._pending.clear()
            self._closer = asyncio.get_running_loop().create_task(
                self._close(conn), name="bastion-audit-store-close"
            )
        # Shielded: a cancelled caller must not leave connections open or
        # close one under a running checkpoint; the close finishes anyway.
        await asyncio.shield(self._closer)

    async def _close(self, conn: sqlite3.Connection) -> None:
        checkpointer = self._checkpointer
        if checkpointer is not None:
            await asyncio.wait([checkpointer])  # it logs its own failures
        # Closing the last connection checkpoints the whole WAL (fsyncs):
        # done in a thread, like every other checkpoint.
        ckpt_conn, self._checkpoint_conn = self._checkpoint_conn, None
        try:
            await asyncio.to_thread(_close_all, conn, ckpt_conn)
        except sqlite3.Error as exc:
            raise _error(self._path, "close", exc) from exc

    # -- plumbing ------------------------------------------------------------

    def _write(
        self, action: str, sql: str, rows: Sequence[tuple[Any, ...]], more: Sequence[tuple[Any, ...]]
    ) -> int:
        """Run ``sql`` for ``rows`` (then ``_COMPLETE_IN_SQL`` for ``more``) in one transaction."""
        conn = self._conn
        if conn is None:
            raise self._closed_error()
        try:
            if conn.in_transaction:
                # Left open by a failed COMMIT whose ROLLBACK failed too;
                # without this every later write would fail ("within a
                # transaction") and the audit log would stay down.
                conn.execute("ROLLBACK")
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _error(self._path, action, exc) from exc
        try:
            changed = conn.executemany(sql, rows).rowcount if rows else 0
            if more:
                changed += conn.executemany(_COMPLETE_IN_SQL, more).rowcount
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            # After a failed COMMIT SQLite may already have rolled back.
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise _error(self._path, action, exc) from exc
        return changed

    def _wrote(self, rows: int) -> None:
        self._since_checkpoint += rows
        if self._since_checkpoint >= CHECKPOINT_ROWS and self._checkpointer is None:
            self._since_checkpoint = 0
            if self._wal_too_big():
                self._truncate_wal()
            self._checkpointer = asyncio.get_running_loop().create_task(
                self._checkpoint(), name="bastion-audit-checkpoint"
            )

    def _wal_too_big(self) -> bool:
        try:
            return os.stat(f"{self._path}-wal").st_size > WAL_LIMIT
        except OSError:
            return False

    def _truncate_wal(self) -> None:
        """Under constant load passive checkpoints never catch up and the WAL only grows
        (measured: ~1 GB in half a minute of benchmark).  Past ``WAL_LIMIT`` the writer
        checkpoints everything and truncates the WAL itself: one pause of the loop, rarely,
        instead of unbounded disk use."""
        conn = self._conn
        if conn is None:
            return
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as exc:
            log.warning("audit database %s: WAL truncation failed: %s", self._path, exc)

    async def _checkpoint(self) -> None:
        try:
            self._checkpoint_conn = await asyncio.to_thread(_checkpoint, self._path, self._checkpoint_conn)
        except (sqlite3.Error, OSError) as exc:
            # Not fatal: the WAL grows until a later checkpoint succeeds.
            self._checkpoint_conn = None  # closed by _checkpoint
            log.warning("audit database %s: checkpoint failed: %s", self._path, exc)
        finally:
            self._checkpointer = None

    def _closed_error(self) -> BackendError:
        return BackendError(f"audit database {self._path}: store is closed")


# -- rows ----------------------------------------------------------------------


def _micros(when: datetime) -> int:
    """Microseconds since the epoch; naive datetimes are UTC."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    # round(): the float is within 0.25 µs of the exact value at today's
    # magnitudes, so rounding recovers the datetime's exact microsecond.
    return round(when.timestamp() * 1_000_000)


def _doc(event: AuditEvent) -> dict[str, Any]:
    """``event.to_dict()``, as JSON, at a fraction of the cost.

    to_dict builds two containers per field to test emptiness; this tests
    the common types directly and hands the rest to ``_put``, which applies
    to_dict's own rule.  A test checks both agree, field by field.
    """
    d: dict[str, Any] = {"event": event.type, "code": code_for(event.type, event.success)}
    for k, v in event.__dict__.items():
        cls = v.__class__
        if cls is str or cls is dict or cls is list or cls is tuple:
            if v:  # for these types, empty is exactly what to_dict omits
                d[k] = v  # orjson writes a tuple as an array, like to_dict's list
        elif cls is bool or cls is int or cls is float:
            d[k] = v
        elif v is None:
            if k == "success":  # to_dict keeps success whatever it is
                d[k] = v
        elif cls is datetime and v.tzinfo is UTC:
            d[k] = v  # orjson writes it exactly like isoformat()
        else:
            _put(d, k, v)
    del d["type"]  # written as "event"
    return d


def _put(d: dict[str, Any], k: str, v: Any) -> None:
    # AuditEvent.to_dict's rule, for values of any other type.
    if isinstance(v, datetime):
        v = v.isoformat()
    elif isinstance(v, tuple):
        v = list(v)
    if v in (None, "", [], {}) and k != "success":
        return
    d[k] = v


def _row(event: AuditEvent) -> tuple[Any, ...]:
    doc = _doc(event)
    try:
        text = orjson.dumps(doc, default=_json_default).decode()
    except orjson.JSONEncodeError:
        # orjson refuses str with lone surrogates (and very deep nesting);
        # repair rather than lose the event.  Rare, so slow is fine.
        text = orjson.dumps(_sanitise(doc, 0), default=_json_default).decode()
        return (
            _clean(event.id),
            _micros(event.time),
            _clean(event.type),
            _clean(event.user),
            _clean(event.app),
            _clean(event.session_id),
            bool(event.success),
            _clean(event.error),
            event.duration_ms,
            text,
        )
    # orjson accepted every str in ``doc`` (the columns below among them),
    # so they encode as UTF-8 and binding them cannot fail.
    return (
        event.id,
        _micros(event.time),
        event.type,
        event.user,
        event.app,
        event.session_id,
        bool(event.success),
        event.error,
        event.duration_ms,
        text,
    )


def _completed_json(text: str, success: bool, error: str, duration_ms: float | None) -> str:
    doc = orjson.loads(text)
    doc["success"] = success
    code = doc.get("code")
    if isinstance(code, str) and code:
        doc["code"] = code[:-1] + ("I" if success else "E")
    # Empty values are omitted, as to_dict omits them.
    if error:
        doc["error"] = error
    else:
        doc.pop("error", None)
    if duration_ms is not None:
        doc["duration_ms"] = duration_ms
    else:
        doc.pop("duration_ms", None)
    return orjson.dumps(doc).decode()


def _json_default(value: Any) -> Any:
    """orjson's fallback: never fail an audit write over an odd type."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    return repr(value)


def _clean(text: str) -> str:
    """``text`` with lone surrogates replaced, so it encodes as UTF-8."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode()
    return text


_SANITISE_DEPTH = 200


def _sanitise(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        return _clean(value)
    if depth > _SANITISE_DEPTH:
        return "<TOO DEEP>"
    if isinstance(value, dict):
        return {_clean(str(k)): _sanitise(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_sanitise(v, depth + 1) for v in value]
    return value


# -- opening and reading (worker threads) ------------------------------------------


def _open_writer(path: Path) -> sqlite3.Connection:
    try:
        # The mode only applies to directories created here.
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Create the file ourselves so it is never world-readable, not even
        # between sqlite creating it and a chmod; chmod also fixes an old
        # file.  SQLite gives -wal and -shm the database file's mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        path.chmod(0o600)
    except OSError as exc:
        raise BackendError(f"audit database {path}: cannot create: {exc}") from exc
    try:
        # isolation_level=None: no implicit transactions, only our BEGINs.
        # check_same_thread=False: opened here, used on the loop's thread.
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise _error(path, "open", exc) from exc
    try:
        _configure(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


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
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise BackendError(
                    f"audit database {path}: schema version {version} is newer than "
                    f"this bastion supports ({SCHEMA_VERSION}); upgrade bastion"
                )
            if version < SCHEMA_VERSION:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        raise _error(path, "open", exc) from exc


def _checkpoint(path: Path, conn: sqlite3.Connection | None) -> sqlite3.Connection:
    """Checkpoint what it can of the WAL without blocking anyone; return the connection."""
    if conn is None:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    except BaseException:
        conn.close()
        raise
    return conn


def _close_all(writer: sqlite3.Connection, checkpointer: sqlite3.Connection | None) -> None:
    # The writer last: closing the last connection checkpoints and removes the WAL.
    try:
        if checkpointer is not None:
            checkpointer.close()
    finally:
        writer.close()


def _search_sql(query: AuditQuery) -> tuple[str, list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    if query.since is not None:
        where.append("time_us >= ?")
        params.append(_micros(query.since))
    if query.until is not None:
        where.append("time_us < ?")
        params.append(_micros(query.until))
    if query.types:
        where.append(f"type IN ({', '.join('?' * len(query.types))})")
        params.extend(query.types)
    for column, value in (("user", query.user), ("app", query.app), ("session_id", query.session_id)):
        if value:
            where.append(f"{column} = ?")
            params.append(value)
    sql = "SELECT event FROM audit_events"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY time_us, seq LIMIT ?"
    params.append(query.limit)
    return sql, params


def _read(path: Path, sql: str, params: list[Any]) -> list[dict[str, Any]]:
    try:
        # mode=ro: a reader can never write, whatever goes wrong.
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise _error(path, "search", exc) from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        rows = conn.execute(sql, params).fetchall()
    except sqlite3.Error as exc:
        raise _error(path, "search", exc) from exc
    finally:
        conn.close()
    return [orjson.loads(row[0]) for row in rows]


def _error(path: Path, action: str, exc: BaseException) -> BackendError:
    detail = str(exc) or type(exc).__name__
    return BackendError(f"audit database {path}: cannot {action}: {detail}")
