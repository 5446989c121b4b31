"""Where audit events are kept: the ``AuditStore`` protocol and its SQLite file.

Contract of every ``AuditStore``:

- ``insert_many(events)`` stores all of ``events`` in ONE transaction and
  returns only once that transaction is committed (durable against a crash
  of the process); if it raises, none of them is stored.  Inserting an id
  that is already stored keeps the stored row (idempotent retries; one row
  per event, always).
- ``complete_many(updates)`` sets ``success``, ``error`` and ``duration_ms``
  of already stored events: ``search`` returns them with that outcome
  (``code`` follows ``success``; an empty ``error`` or a ``None`` duration
  removes the field, as ``AuditEvent.to_dict`` would have omitted it; a
  field the outcome adds comes after the event's own fields).  One
  transaction; ids not stored are ignored; a later completion of the same
  event wins.
- ``search(query)`` returns stored events (the ``to_dict`` form, completions
  applied) matching every given filter, oldest first (by event time, then
  by insertion order), at most ``query.limit`` of them.
- Failures raise ``BackendError``; ``close()`` is idempotent, and any other
  call after it raises ``BackendError``.
- Optional: ``write_batch(events, updates)`` does ``insert_many(events)``
  then ``complete_many(updates)`` in ONE transaction (if it raises, nothing
  of either is stored).  ``AuditLog`` uses it when a store has it (one
  commit per batch instead of two) and the two methods above otherwise, so
  a store without it is still a complete ``AuditStore``.

``SQLiteAuditStore`` keeps ``<data_dir>/audit.db`` (mode 0600, WAL,
``synchronous=NORMAL``: a commit survives a crash of the process; an OS
crash or power loss may lose the last commits but never corrupts the file).
It is its own file so audit writes never contend with the backend's.  One
process writes it; any process may read it while it is written.  One row
per event: the ``event`` column holds its JSON as recorded (built once, at
insert), the ``success``/``error``/``duration_ms`` columns its outcome,
which completions update and ``search`` merges into the document
(``_merge``).  Rows completed by versions before 2026-11-23, which also
rewrote the JSON, read the same.

Why writes run synchronously on the event loop: measured 2026-11-22 on
this 2-vCPU host, CPython 3.11.7, SQLite 3.40.1, uvloop, the process pinned
to one core; 64 concurrent callers each looping ``await
AuditLog.record(e)`` then ``complete(...)``, medians of 3 interleaved runs:
sqlite3 on the loop 95.0 CPU µs per call, the same in a worker thread
(``asyncio.to_thread``) 107.7.  On one core a thread buys no extra CPU and
every batch pays the thread hand-offs.  The price is that the loop is busy
for each transaction (about 1-2 ms per batch of 16 calls).

The cost per call (``bench/audit_micro.py``: ``AuditLog`` over this store,
16 concurrent callers, a tools/call event of ~900 bytes of JSON, one core;
CPU of the whole process, checkpoint thread included, minus the callers
alone; see docs/benchmarks.md)::

    audit CPU µs per call, medians of 5             1 session   16 sessions
    before (JSON rebuilt on completion, two
      commits per batch, WAL never restarted)          33.5         48.7
    this version                                       24.1         36.4

What it is made of now (one session): building the row in Python (the
event's JSON, ~3.5 µs), the emitter's queue and futures (~1.3 µs), SQLite
(~18 µs: inserting into the table and its six b-trees, the in-place update
of the outcome, the commit's WAL writes, and the checkpoints).  The WAL is
the big part: a commit writes every page it dirtied, whole; measured ~8
pages per commit plus ~0.4 per row, i.e. 25 pages (100 KiB) for a batch of
16 calls with one session, 65 with 16 sessions: each index whose key
differs per session (``id``, ``session_id``) dirties one leaf per session
per commit.  Time-ordered event ids would make the ``id`` index append at
its right edge (measured with ``--ids ordered``: 16 sessions, about 6 µs
less per call).  The secondary indexes themselves cost ~6 µs per call at
one session (measured in raw SQLite: 14.7 µs per call with them, 7.8
without any).

Checkpoints (copying the WAL into the database file, with two fsyncs) run
in a worker thread on their own connection, never inside a commit on the
loop (automatic checkpoints inside commits stalled the loop for 5-20 ms
each), every ``CHECKPOINT_PAGES`` pages of WAL (estimated per commit,
calibrated by what each checkpoint finds), in rounds that end, when the WAL
did not start again by itself, by holding the writes back for a
millisecond or two so that it is entirely copied and the next commit starts
it again from its beginning (``SQLiteAuditStore._checkpoint``; measured: the
WAL file peaks at 25-45 MiB).  A WAL that never
starts again only grows (the previous version: ~1 GB in half a minute of
benchmark, truncated at 64 MiB on the loop), and appending new file blocks
costs the kernel far more than rewriting cached ones (raw SQLite, same
writes: 6.0 vs 4.2 µs of system CPU per call with one session, 41 vs 10
with 16).

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

from bastion.audit.events import AuditEvent, code_for
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

# A completion sets the outcome columns only; the stored JSON stays the event
# as recorded, and search merges the columns into it (``_merge``).
_COMPLETE: Final = "UPDATE audit_events SET success = ?, error = ?, duration_ms = ? WHERE id = ?"

#: WAL pages written between two checkpoints (see ``SQLiteAuditStore._checkpoint``):
#: 16 MiB of WAL.  Fewer, longer checkpoints delay fewer calls: measured in the
#: gateway at one call in flight, p99 1.43 ms with 8 MiB, 1.22 with 32 (1.14
#: before this version), CPU the same.  Pages are estimated, from what this
#: schema measured with one client session: about ``TX_PAGES`` per transaction
#: (page 1, the six b-trees' last leaves) plus one per two rows inserted or
#: completed; then scaled by what the checkpoints find (with many sessions, up
#: to 3 times as many).
CHECKPOINT_PAGES: Final = 4_096
TX_PAGES: Final = 8
#: Checkpoint rounds per checkpoint at most; the last one holds the writes back.
CHECKPOINT_ROUNDS: Final = 4
#: WAL pages written during a checkpoint round under which the next round
#: holds the writes back so that it finishes (a millisecond or two of copying).
HOLD_PAGES: Final = 512
#: Frames in the WAL (i.e. since it last started again) under which no round
#: holds the writes back: one and a half checkpoints' worth.
HOLD_FRAMES: Final = CHECKPOINT_PAGES * 3 // 2
#: The longest writes wait for that round (seconds); then they go on, and the
#: WAL starts again after a later checkpoint.
HOLD_MAX: Final = 0.1
#: WAL size past which the writer truncates it (see ``SQLiteAuditStore._truncate_wal``);
#: also the size a WAL restarted from its beginning is cut back to.
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
    transaction per batch; see the module doc for why and for the numbers.
    Checkpoints (copying the WAL into the database file, with two fsyncs)
    run in a worker thread on their own connection, never inside a commit on
    the loop; see ``_checkpoint`` for how they keep the WAL small.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        # Use ``open``: the connection must be configured and migrated first.
        self._conn: sqlite3.Connection | None = conn
        # One cursor for every write: no cursor object per statement.
        self._cur = conn.cursor()
        self._path = path
        #: WAL pages written since opened (estimated); when the last checkpoint began,
        #: and when the WAL last started again (approximately).
        self._pages = 0
        self._pages_checkpointed = 0
        self._pages_restarted = 0
        # WAL frames really written per estimated page (measured by each checkpoint:
        # many sessions at once dirty more index leaves than the estimate counts).
        self._scale = 1.0
        self._checkpointer: asyncio.Task[None] | None = None
        # Opened by the first checkpoint, in its thread; used by one
        # checkpoint at a time, then closed by close().
        self._checkpoint_conn: sqlite3.Connection | None = None
        # Set while the last round of a checkpoint runs: writes wait for it
        # (the loop does not), so that the checkpoint catches up with the WAL
        # and the next write starts it again from the beginning.
        self._hold: asyncio.Future[None] | None = None
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
        if events:
            await self._write("insert", events, ())

    async def complete_many(self, updates: Sequence[Completion]) -> None:
        if updates:
            await self._write("complete", (), updates)

    async def write_batch(self, events: Sequence[AuditEvent], updates: Sequence[Completion]) -> None:
        """``insert_many(events)`` then ``complete_many(updates)``, in one transaction."""
        if events or updates:
            await self._write("write", events, updates)

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

    async def _write(self, action: str, events: Sequence[AuditEvent], updates: Sequence[Completion]) -> None:
        """Insert ``events`` (ignoring ids already stored), then apply ``updates``, in one transaction."""
        hold = self._hold
        if hold is not None:
            # asyncio.wait: a cancelled writer must not cancel the hold for the others.
            await asyncio.wait([hold], timeout=HOLD_MAX)
            if self._hold is hold and not hold.done():
                # A checkpoint stuck on a slow disk must not slow the log down:
                # stop holding the writes for it (the WAL restarts another time).
                self._hold = None
        rows = [_row(e) for e in events]
        # (success, error, duration_ms, id) for _COMPLETE.  Only text that is
        # not ASCII can hold a lone surrogate (which cannot be bound).
        outcomes = [
            (
                bool(success),
                (error if error.isascii() else _clean(error)) if error else "",
                duration_ms,
                event_id if event_id.isascii() else _clean(event_id),
            )
            for event_id, success, error, duration_ms in updates
        ]
        conn = self._conn
        if conn is None:
            raise self._closed_error()
        cur = self._cur
        try:
            if conn.in_transaction:
                # Left open by a failed COMMIT whose ROLLBACK failed too;
                # without this every later write would fail ("within a
                # transaction") and the audit log would stay down.
                cur.execute("ROLLBACK")
            cur.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _error(self._path, action, exc) from exc
        try:
            if rows:
                cur.executemany(_INSERT, rows)
            if outcomes:
                cur.executemany(_COMPLETE, outcomes)
            cur.execute("COMMIT")
        except sqlite3.Error as exc:
            # After a failed COMMIT SQLite may already have rolled back.
            with contextlib.suppress(sqlite3.Error):
                cur.execute("ROLLBACK")
            raise _error(self._path, action, exc) from exc
        self._pages += TX_PAGES + (len(rows) + len(outcomes) + 1) // 2
        due = (self._pages - self._pages_checkpointed) * self._scale >= CHECKPOINT_PAGES
        if due and self._checkpointer is None:
            self._start_checkpoint()

    def _start_checkpoint(self) -> None:
        self._pages_checkpointed = self._pages
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
        """The safety net: past ``WAL_LIMIT`` (when checkpoints could not catch up, e.g.
        because long searches kept reading old frames) the writer checkpoints everything
        and truncates the WAL itself: one pause of the loop, rarely, instead of
        unbounded disk use."""
        conn = self._conn
        if conn is None:
            return
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as exc:
            log.warning("audit database %s: WAL truncation failed: %s", self._path, exc)

    async def _checkpoint(self) -> None:
        """Copy the WAL into the database, in a worker thread, until it is all copied.

        SQLite starts the WAL again from its beginning (reusing its disk
        blocks and cached pages) only at a write that finds it entirely
        copied.  A ``PASSIVE`` checkpoint running beside the writer never
        gets there under constant load (the writer appends while it copies),
        and a WAL that only grows costs far more to write (new blocks) and
        to keep.  So the checkpoint runs in rounds beside the writer while
        the writer keeps appending much, and its last round (what was
        appended during the previous one, at most ``HOLD_PAGES`` pages
        unless the rounds run out) holds the writes back: they wait (the
        event loop does not) for a millisecond or two, then the next write
        restarts the WAL.  Only when the WAL did not start again by itself
        (``HOLD_FRAMES``): under light load it does, in a pause of the writer.
        """
        loop = asyncio.get_running_loop()
        hold = False
        try:
            for round_ in range(CHECKPOINT_ROUNDS):
                if hold:
                    self._hold = loop.create_future()
                pages = self._pages
                try:
                    self._checkpoint_conn, frames, copied = await asyncio.to_thread(
                        _checkpoint, self._path, self._checkpoint_conn
                    )
                finally:
                    if hold:
                        self._release_hold()
                appended = self._pages - pages
                since = pages - self._pages_restarted
                if round_ == 0 and since > 0:
                    # The frames really written since the WAL started again, against
                    # the estimate (smoothed: the restart point is approximate).
                    self._scale = (self._scale + min(max(frames / since, 1.0), 16.0)) / 2
                if copied >= frames and (hold or not appended):
                    # All copied, nothing written since: the next write starts it again.
                    self._pages_restarted = self._pages
                if hold or copied < frames or not appended or frames < HOLD_FRAMES:
                    # All copied (the next write restarts the WAL); or a reader
                    # still uses what is left; or the WAL is still small: it
                    # restarted not long ago, and will again when the writer
                    # pauses (holding it costs the one caller then waiting a
                    # millisecond or two).  The next checkpoint will do.
                    return
                hold = appended <= HOLD_PAGES or round_ == CHECKPOINT_ROUNDS - 2
        except (sqlite3.Error, OSError) as exc:
            # Not fatal: the WAL grows until a later checkpoint succeeds.
            self._checkpoint_conn = None  # closed by _checkpoint
            log.warning("audit database %s: checkpoint failed: %s", self._path, exc)
        finally:
            self._checkpointer = None

    def _release_hold(self) -> None:
        hold, self._hold = self._hold, None
        if hold is not None and not hold.done():
            hold.set_result(None)

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
    """The stored JSON ``text`` rewritten with an outcome (for stores that keep it in the JSON).

    ``SQLiteAuditStore`` keeps the outcome in columns instead (see ``_merge``);
    ``bastion.audit.pg_store`` rewrites its JSON with this.
    """
    return orjson.dumps(_merge(text, success, error, duration_ms)).decode()


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


def _checkpoint(path: Path, conn: sqlite3.Connection | None) -> tuple[sqlite3.Connection, int, int]:
    """Checkpoint what it can of the WAL without blocking anyone.

    Returns the connection (for the next checkpoint), the frames in the WAL
    and how many of them are copied into the database.
    """
    if conn is None:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        _busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    except BaseException:
        conn.close()
        raise
    return conn, int(frames), int(copied)


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
    sql = "SELECT event, success, error, duration_ms FROM audit_events"
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
    return [_merge(*row) for row in rows]


def _merge(text: str, success: Any, error: str, duration_ms: float | None) -> dict[str, Any]:
    """The stored event with the outcome columns applied.

    The same document earlier versions stored on completion (``_completed_json``:
    ``code`` follows ``success``; an empty error or a NULL duration is omitted;
    keys a completion adds come last).  The columns hold the event's own values
    until a completion changes them, so an event never completed comes back
    exactly as it was stored.
    """
    doc: dict[str, Any] = orjson.loads(text)
    success = bool(success)
    if bool(doc.get("success")) != success:
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
    elif doc.get("duration_ms") is not None:
        del doc["duration_ms"]
    return doc


def _error(path: Path, action: str, exc: BaseException) -> BackendError:
    detail = str(exc) or type(exc).__name__
    return BackendError(f"audit database {path}: cannot {action}: {detail}")
