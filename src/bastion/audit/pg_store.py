"""``AuditStore`` on PostgreSQL: the audit log of a cluster whose processes share one database.

Same contract as ``SQLiteAuditStore`` (see ``bastion.audit.store``): the same
stored document (``AuditEvent.to_dict`` as JSON, built by the same helpers),
the outcome of a call kept in the ``success``/``error``/``duration_ms``
columns and merged into the document by search (the same ``merge_outcome``; rows
completed by versions before 2026-11-22, which also rewrote the JSON, read
the same), the same search semantics (``since <= time < until``, types,
user, app, session; oldest first by event time, then insertion order, or
newest first; at most ``limit`` from that end), and the optional ``write_batch``.

Idempotent, so a writer may retry a batch whose outcome it does not know
(a connection lost around COMMIT): ``insert_many`` is ``ON CONFLICT (id) DO
NOTHING`` (a stored id keeps its row; never two rows for one event), and
completing an event again with the same outcome leaves the same row.  The
store itself retries a batch once when the connection dies under it.

Each ``insert_many`` and each ``complete_many`` is one statement (``INSERT
... SELECT FROM unnest(...)``, ``UPDATE ... FROM unnest(...)``: one round trip
whatever the batch size; of several completions of one event in a batch the
last is sent); ``write_batch`` is both in one transaction.  Commits are
durable when they return (PostgreSQL's ``synchronous_commit``, on by default).

Seals (decision 0032, ``bastion.audit.chain``): each store instance is a
writer with its own chain (a number from a sequence), so proxies sharing the
database never contend for one; the seal of a batch is stored by the batch's
own statement (a CTE: no extra round trip), and after a write of unknown
outcome the chain's head is read back before the next one.  ``verify`` and
``prune`` (retention, one process at a time: an advisory lock) as in
``sqlite_store``.  ``open(dsn, seal=False)`` opens a reader (search, verify).

PostgreSQL text cannot hold NUL characters: in the indexed columns they are
stored as U+FFFD (the JSON document keeps them, escaped as ``\\u0000``), and
search filters are mapped the same way.

What it must not do: let ``asyncpg`` or socket exceptions escape (they become
``BackendError``), show the DSN's password, or import anything above
``bastion.errors``, ``bastion.audit.events``/``store`` and ``bastion._pg``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, TypeAlias, TypeVar

import asyncpg
import orjson

from bastion._pg import (
    AUDIT_DB,
    DRIVER_ERRORS,
    Migration,
    UnreachableError,
    map_error,
    open_pool,
)
from bastion.audit import chain as chain_mod
from bastion.audit.chain import Chain, Checker, Seal, Signer, Verifier, VerifyReport
from bastion.audit.events import AuditEvent
from bastion.audit.store import (
    UNFINISHED,
    AuditQuery,
    AuditStore,
    Completion,
    FeedPage,
    clean_text,
    epoch_micros,
    event_row,
    merge_outcome,
    take_feed,
)
from bastion.errors import BackendError, BastionError, ValidationError

if TYPE_CHECKING:
    _Conn: TypeAlias = asyncpg.pool.PoolConnectionProxy[asyncpg.Record]

__all__ = ["ExportLease", "PostgresAuditStore"]

log = logging.getLogger("bastion.audit")

_T = TypeVar("_T")

#: Component name of this schema in ``bastion_schema_migrations``.
COMPONENT: Final = "audit"
TABLE: Final = "bastion_audit_events"
SEALS: Final = "bastion_audit_seals"
META: Final = "bastion_audit_meta"
#: Each store instance (process) is a writer with its own chain of seals (ADR 32).
WRITERS: Final = "bastion_audit_writers"
#: Feed positions of completions (ADR 34), and where each exporter stands (ADR 35).
REVS: Final = "bastion_audit_revs"
EXPORTS: Final = "bastion_audit_exports"
#: A seal is signed at least this often (seconds) while events come in, and this
#: long after the last unsigned one when they stop.
SIGN_EVERY: Final = 10.0
#: Seals pruned per transaction (retention), at most, and events (the step ends with the
#: seal that passes it).
PRUNE_SEALS: Final = 256
PRUNE_EVENTS: Final = 4096
#: ``verify --since``: seals this much older are read too (events dated by other hosts' clocks).
SINCE_SLACK_US: Final = 3600 * 1_000_000
#: Rows per page of a streaming search, and the largest page a feed read answers.
PAGE_ROWS: Final = 2000
#: Seconds a statement may take before it is abandoned.
COMMAND_TIMEOUT: Final = 30.0

MIGRATIONS: Final = (
    Migration(
        1,
        "audit events",
        (
            f"CREATE TABLE {TABLE} ("
            " seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " id TEXT NOT NULL UNIQUE,"
            " time_us BIGINT NOT NULL,"
            " type TEXT NOT NULL,"
            ' "user" TEXT NOT NULL,'
            " app TEXT NOT NULL,"
            " session_id TEXT NOT NULL,"
            " success BOOLEAN NOT NULL,"
            " error TEXT NOT NULL,"
            " duration_ms DOUBLE PRECISION NULL,"
            # TEXT, not JSONB: kept byte for byte as written, and JSONB
            # would refuse the \u0000 a tool argument may contain.
            " event TEXT NOT NULL)",
            f"CREATE INDEX {TABLE}_time ON {TABLE} (time_us, seq)",
            f"CREATE INDEX {TABLE}_type ON {TABLE} (type, time_us)",
            f'CREATE INDEX {TABLE}_user ON {TABLE} ("user", time_us)',
            f"CREATE INDEX {TABLE}_app ON {TABLE} (app, time_us)",
            f"CREATE INDEX {TABLE}_session ON {TABLE} (session_id, time_us)",
        ),
    ),
    Migration(
        2,
        "audit seals",
        (
            f"CREATE TABLE {SEALS} ("
            " writer BIGINT NOT NULL,"
            " seq BIGINT NOT NULL,"
            " time_us BIGINT NOT NULL,"
            " kind TEXT NOT NULL,"
            " prev BYTEA NOT NULL,"
            " items BYTEA NOT NULL,"
            " payload TEXT NOT NULL,"
            " sig BYTEA NULL,"
            " PRIMARY KEY (writer, seq))",
            f"CREATE INDEX {SEALS}_time ON {SEALS} (time_us)",
            f"CREATE SEQUENCE {WRITERS}",
            f"CREATE TABLE {META} (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            # Events stored before seals existed are not sealed: verify counts them.
            f"INSERT INTO {META} SELECT 'legacy_seq', coalesce(max(seq), 0)::text FROM {TABLE}",
        ),
    ),
    Migration(
        3,
        "audit feed, tool, failures",
        (
            # Constant defaults: existing rows are not rewritten (they read as xid 0, rev 0:
            # first in the feed, in seq order).  New rows take their transaction's id.
            f"ALTER TABLE {TABLE} ADD COLUMN tool TEXT NOT NULL DEFAULT ''",
            f"ALTER TABLE {TABLE} ADD COLUMN xid xid8 NOT NULL DEFAULT '0'",
            f"ALTER TABLE {TABLE} ALTER COLUMN xid SET DEFAULT pg_current_xact_id()",
            f"ALTER TABLE {TABLE} ADD COLUMN rev BIGINT NOT NULL DEFAULT 0",
            f"CREATE SEQUENCE {REVS}",
            f"CREATE INDEX {TABLE}_feed ON {TABLE} (xid, rev, seq)",
            f"CREATE INDEX {TABLE}_tool ON {TABLE} (tool, time_us)",
            f"CREATE INDEX {TABLE}_failed ON {TABLE} (time_us, seq) WHERE NOT success",
            # Rows up to this seq were stored without the tool column.
            f"INSERT INTO {META} SELECT 'feed_base', coalesce(max(seq), 0)::text FROM {TABLE}",
            f"CREATE TABLE {EXPORTS} (name TEXT PRIMARY KEY, cursor TEXT NOT NULL)",
        ),
    ),
    Migration(
        4,
        "audit calls without an outcome",
        # Small: a row is in it from its insert to its completion (decision 0038).
        (f"CREATE INDEX {TABLE}_unfinished ON {TABLE} (time_us) WHERE {UNFINISHED}",),
    ),
)

_SEAL_COLUMNS: Final = "writer, seq, time_us, kind, prev, items, payload, sig"


def _seal_cte(first: int) -> str:
    """A data-modifying CTE storing one seal (parameters ``$first``..): same statement, no round trip."""
    params = ", ".join(f"${first + i}" for i in range(8))
    return f"WITH seal AS (INSERT INTO {SEALS} ({_SEAL_COLUMNS}) VALUES ({params}) ON CONFLICT DO NOTHING) "


def _now_us() -> int:
    return time.time_ns() // 1000


# A row's feed position (ADR 34) is taken when it is written, after the batch's outcomes of
# earlier rows (``write_batch`` runs those first): a session's calls keep their order.
_INSERT: Final = (
    f'INSERT INTO {TABLE} (id, time_us, type, "user", app, session_id, success, error, duration_ms, event,'
    f" tool, rev) SELECT u.*, nextval('{REVS}') FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[],"
    " $5::text[], $6::text[], $7::boolean[], $8::text[], $9::float8[], $10::text[], $11::text[]) AS u"
    " ON CONFLICT (id) DO NOTHING"
)
# The outcome goes in the columns only; search merges it into the stored JSON.  The
# row moves to this transaction's place in the feed (ADR 34): read again, completed.
_COMPLETE: Final = (
    f"UPDATE {TABLE} AS a SET success = u.success, error = u.error, duration_ms = u.duration_ms,"
    f" xid = pg_current_xact_id(), rev = nextval('{REVS}')"
    " FROM unnest($1::text[], $2::boolean[], $3::text[], $4::float8[])"
    " AS u (id, success, error, duration_ms) WHERE a.id = u.id"
    # The same outcome again changes nothing, so the row keeps its place in the feed.
    " AND (a.success, a.error, a.duration_ms) IS DISTINCT FROM (u.success, u.error, u.duration_ms)"
)
#: The feed's rows after a position, below the oldest transaction still running (ADR 34).
_FEED: Final = (
    f"SELECT xid::text, rev, seq, time_us, event, success, error, duration_ms FROM {TABLE}"
    " WHERE (xid, rev, seq) > ($1::xid8, $2, $3) AND xid < pg_snapshot_xmin(pg_current_snapshot())"
    " ORDER BY xid, rev, seq LIMIT $4"
)

#: Columns of ``event_row``'s tuple that are TEXT columns here (NUL not allowed).
_TEXT_COLUMNS: Final = (0, 2, 3, 4, 5, 7)


class PostgresAuditStore:
    """``AuditStore`` on a PostgreSQL database; open with ``await PostgresAuditStore.open(dsn)``."""

    def __init__(
        self,
        pool: asyncpg.Pool[asyncpg.Record],
        dsn: str,
        chain: Chain | None = None,
        clock: Callable[[], int] = _now_us,
    ) -> None:
        # Use ``open``: the pool must be created and the schema migrated first.
        self._pool = pool
        self._dsn = dsn
        self._label = AUDIT_DB
        self._closed = False
        self._closer: asyncio.Task[None] | None = None
        # This writer's chain of seals (ADR 32); one write at a time extends it.
        self._chain = chain
        self._clock = clock
        self._lock = asyncio.Lock()
        self._head_unknown = False
        self._last_signed = time.monotonic()
        self._sign_timer: asyncio.TimerHandle | None = None
        self._signing: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        pool_size: int = 4,
        signer: Signer | None = None,
        clock: Callable[[], int] | None = None,
        seal: bool = True,
    ) -> PostgresAuditStore:
        """Connect to ``dsn`` (``postgresql://user:password@host:port/db``) and migrate.

        Unless ``seal`` is false (a reader: search, verify), the store is a
        writer: it draws a writer number and writes its signed opening seal.
        """
        pool = await open_pool(
            dsn,
            AUDIT_DB,
            pool_size=pool_size,
            command_timeout=COMMAND_TIMEOUT,
            # Plans made per statement: a cached generic plan picked while the table was
            # small (or never analysed, where autovacuum is off) would scan the whole
            # table for every completion by id.
            server_settings={"application_name": "bastion-audit", "plan_cache_mode": "force_custom_plan"},
            component=COMPONENT,
            migrations=MIGRATIONS,
        )
        if not seal:
            return cls(pool, dsn)
        store = cls(pool, dsn, clock=clock or _now_us)
        try:

            async def writer(conn: _Conn) -> int:
                return int(await conn.fetchval(f"SELECT nextval('{WRITERS}')"))

            store._chain = Chain(await store._run("open", writer), signer=signer)
            await store._write_seal(chain_mod.OPEN)
        except BaseException:
            await store.close()
            raise
        return store

    @property
    def label(self) -> str:
        """What errors call it (``AUDIT_DB``: never its address)."""
        return self._label

    async def insert_many(self, events: Sequence[AuditEvent]) -> None:
        if events:
            await self.write_batch(events, ())

    async def complete_many(self, updates: Sequence[Completion]) -> None:
        if updates:
            await self.write_batch((), updates)

    async def write_batch(self, events: Sequence[AuditEvent], updates: Sequence[Completion]) -> None:
        """``insert_many(events)`` then ``complete_many(updates)``, in one transaction, sealed."""
        if not (events or updates):
            return
        self._check_open()
        rows = [_pg_row(event_row(e)) for e in events]
        # The last completion of each event (a later one wins), in one statement;
        # the seal keeps them all, in order.
        final: dict[str, tuple[bool, str, float | None]] = {}
        items: list[list[Any]] = [["i", r[0], chain_mod.event_digest(r[9])] for r in rows]
        for event_id, success, error, duration_ms in updates:
            eid = _nul_free(clean_text(event_id))
            outcome = (bool(success), _nul_free(clean_text(error)) if error else "", duration_ms)
            final[eid] = outcome
            items.append(["c", eid, *outcome])
        # An outcome of a row written in this batch goes into the row (as SQLite's indexer
        # does): an UPDATE after the INSERT would move the row behind the batch's later rows.
        # It is applied again after the INSERT, for a row stored before (a batch written
        # again after a lost connection, or re-sent by a joined host): that UPDATE changes
        # nothing on a row this INSERT wrote, so the row keeps its place.
        again: dict[str, tuple[bool, str, float | None]] = {}
        if final and rows:
            merged = []
            for r in rows:
                outcome_ = final.pop(r[0], None)
                if outcome_ is not None:
                    again[r[0]] = outcome_
                merged.append(r if outcome_ is None else (*r[:6], *outcome_, *r[9:]))
            rows = merged
        repeat = [list(again), *([list(c) for c in zip(*again.values(), strict=True)] if again else [])]
        columns = [list(c) for c in zip(*rows, strict=True)] if events else []
        if events:
            columns.append([_nul_free(clean_text(e.tool)) for e in events])
        outcomes = [list(final), *([list(c) for c in zip(*final.values(), strict=True)] if final else [])]
        action = "write" if events and (final or again) else "insert" if events else "complete"
        async with self._lock:
            seal = await self._next_seal(items)

            async def write(conn: _Conn) -> None:
                # Outcomes of earlier rows first: their feed positions come before this
                # batch's new rows (ADR 34).
                if seal is None:
                    if events and (final or again):
                        async with conn.transaction():
                            if final:
                                await conn.execute(_COMPLETE, *outcomes)
                            await conn.execute(_INSERT, *columns)
                            if again:
                                await conn.execute(_COMPLETE, *repeat)
                    elif events:
                        await conn.execute(_INSERT, *columns)
                    else:
                        await conn.execute(_COMPLETE, *outcomes)
                    return
                if events and (final or again):
                    async with conn.transaction():
                        if final:
                            await conn.execute(_COMPLETE, *outcomes)
                        await conn.execute(_seal_cte(12) + _INSERT, *columns, *seal)
                        if again:
                            await conn.execute(_COMPLETE, *repeat)
                elif events:
                    await conn.execute(_seal_cte(12) + _INSERT, *columns, *seal)
                else:
                    await conn.execute(_seal_cte(5) + _COMPLETE, *outcomes, *seal)

            # Safe to run again: a row already stored is left as it is, the
            # same outcomes give the same rows, and the same seal is stored once.
            await self._sealed(action, write, seal)

    # -- seals (ADR 32) ------------------------------------------------------

    async def _next_seal(
        self, items: list[list[Any]], kind: str = chain_mod.SEAL, payload: str = ""
    ) -> Seal | None:
        """The seal for ``items`` (under ``_lock``); after a failed write, from the head as stored."""
        c = self._chain
        if c is None:
            return None
        if self._head_unknown:
            # A write whose commit is unknown: whether its seal was stored decides the head.
            async def head(conn: _Conn) -> asyncpg.Record | None:
                return await conn.fetchrow(
                    f"SELECT {_SEAL_COLUMNS} FROM {SEALS} WHERE writer = $1 ORDER BY seq DESC LIMIT 1",
                    c.writer,
                )

            row = await self._run("read the seal chain", head)
            if row is not None:
                last = Seal(*row)
                c.seq, c.head = last.seq, last.hash()
            self._head_unknown = False
        sign = c.signer is not None and (
            kind != chain_mod.SEAL or time.monotonic() - self._last_signed >= SIGN_EVERY
        )
        return c.next(items, self._clock(), kind=kind, payload=payload, sign=sign)

    async def _sealed(
        self, action: str, write: Callable[[_Conn], Awaitable[None]], seal: Seal | None
    ) -> None:
        try:
            await self._run(action, write)
        except BaseException:
            self._head_unknown = seal is not None
            raise
        self._advance(seal)

    def _advance(self, seal: Seal | None) -> None:
        """``seal`` is committed: the chain's head moves (and its end is signed later)."""
        if seal is None or self._chain is None:
            return
        self._chain.advance(seal)
        if seal.sig is not None:
            self._last_signed = time.monotonic()
            if self._sign_timer is not None:
                self._sign_timer.cancel()
                self._sign_timer = None
        elif self._chain.signer is not None and self._sign_timer is None and not self._closed:
            self._sign_timer = asyncio.get_running_loop().call_later(SIGN_EVERY, self._sign_later)

    def _sign_later(self) -> None:
        # Writes stopped after an unsigned seal: sign the chain's end now.
        self._sign_timer = None
        if not self._closed:
            task = asyncio.get_running_loop().create_task(self._sign_end(), name="bastion-audit-sign")
            self._signing = task

    async def _sign_end(self) -> None:
        try:
            await self._write_seal(chain_mod.SEAL, sign=True)
        except BastionError as e:
            log.warning("audit: cannot write a signed seal (retried with the next write): %s", e)

    async def _write_seal(self, kind: str, payload: str = "", *, sign: bool = True) -> None:
        async with self._lock:
            if self._chain is None:
                return
            seal = await self._next_seal([], kind, payload)
            if seal is not None and sign and seal.sig is None and self._chain.signer is not None:
                seal = seal._replace(sig=self._chain.signer(chain_mod.SIGNED_PREFIX + seal.hash()))

            async def write(conn: _Conn) -> None:
                await conn.execute(
                    f"INSERT INTO {SEALS} ({_SEAL_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                    " ON CONFLICT DO NOTHING",
                    *seal,  # type: ignore[misc]
                )

            await self._sealed("seal", write, seal)

    async def complete_unfinished(
        self, before: datetime, reason: Callable[[str], str], limit: int = 1000
    ) -> int:
        """Complete calls left without an outcome (``bastion.audit.store``; decision 0038).

        One transaction: the rows are chosen and locked (``SKIP LOCKED``: a row another
        proxy's sweep or a completion holds is left to it), completed and sealed.  Not
        retried on a lost connection (the rows chosen again could differ from the seal's).
        """
        self._check_open()
        before_us = epoch_micros(before)
        async with self._lock:
            seal: Seal | None = None

            async def sweep(conn: _Conn) -> int:
                nonlocal seal
                async with conn.transaction():
                    found = await conn.fetch(
                        f"SELECT id, session_id FROM {TABLE} WHERE {UNFINISHED} AND time_us < $1"
                        " ORDER BY time_us LIMIT $2 FOR UPDATE SKIP LOCKED",
                        before_us,
                        limit,
                    )
                    if not found:
                        return 0
                    ids = [str(r[0]) for r in found]
                    errors = [_nul_free(clean_text(reason(str(r[1])))) for r in found]
                    seal = await self._next_seal(
                        [["c", i, False, e, None] for i, e in zip(ids, errors, strict=True)]
                    )
                    outcomes = [ids, [False] * len(ids), errors, [None] * len(ids)]
                    if seal is None:
                        await conn.execute(_COMPLETE, *outcomes)
                    else:
                        await conn.execute(_seal_cte(5) + _COMPLETE, *outcomes, *seal)
                    return len(found)

            try:
                async with self._pool.acquire() as conn:
                    n = await sweep(conn)
            except DRIVER_ERRORS as exc:
                self._head_unknown = self._chain is not None
                error = self._error("complete calls without an outcome", exc)
                if isinstance(error, UnreachableError):
                    await self._pool.expire_connections()
                raise error from None
            except BaseException:
                self._head_unknown = self._chain is not None
                raise
            self._advance(seal)
            return n

    async def search(self, query: AuditQuery) -> list[dict[str, Any]]:
        self._check_open()
        sql, params = _search_sql(query)

        async def fetch(conn: _Conn) -> list[asyncpg.Record]:
            return await conn.fetch(sql, *params)

        rows = await self._run("search", fetch)
        return [merge_outcome(row[0], row[1], row[2], row[3]) for row in rows]

    async def search_pages(self, query: AuditQuery) -> AsyncIterator[list[dict[str, Any]]]:
        """``search`` in pages of ``PAGE_ROWS``, read from a server-side cursor as they are
        consumed (constant memory; one read-only transaction holds a connection meanwhile)."""
        self._check_open()
        sql, params = _search_sql(query)
        try:
            async with self._pool.acquire() as conn, conn.transaction(readonly=True):
                page: list[dict[str, Any]] = []
                async for row in conn.cursor(sql, *params, prefetch=PAGE_ROWS):
                    page.append(merge_outcome(row[0], row[1], row[2], row[3]))
                    if len(page) >= PAGE_ROWS:
                        yield page
                        page = []
                if page:
                    yield page
        except DRIVER_ERRORS as exc:
            raise self._error("search", exc) from None

    # -- the feed (ADR 34) and exporters (ADR 35) ------------------------------

    async def feed(self, cursor: str, limit: int, hold_us: int = 0) -> FeedPage:
        """Events changed after ``cursor`` in commit order: ordered by (transaction id, rev, seq),
        and only below the oldest transaction still running, so nothing can commit behind it."""
        xid, rev, seq = _position(cursor)

        async def fetch(conn: _Conn) -> list[asyncpg.Record]:
            return await conn.fetch(_FEED, xid, rev, seq, max(1, min(limit, PAGE_ROWS)))

        self._check_open()
        rows = await self._run("read the feed", fetch)
        found = [(f"{r[0]}:{r[1]}:{r[2]}", int(r[3]), merge_outcome(r[4], r[5], r[6], r[7])) for r in rows]
        return take_feed(found, cursor, hold_us, _now_us())

    async def feed_start(self, last: int) -> str:
        """The cursor after which the ``last`` newest changes come (``0``: the feed's end)."""
        self._check_open()

        async def fetch(conn: _Conn) -> asyncpg.Record | None:
            return await conn.fetchrow(
                f"SELECT xid::text, rev, seq FROM {TABLE} WHERE xid < pg_snapshot_xmin(pg_current_snapshot())"
                " ORDER BY xid DESC, rev DESC, seq DESC OFFSET $1 LIMIT 1",
                max(0, last),
            )

        row = await self._run("read the feed", fetch)
        return "" if row is None else f"{row[0]}:{row[1]}:{row[2]}"

    async def feed_backlog(self, cursor: str) -> int:
        """How many events the feed holds after ``cursor``."""
        self._check_open()
        xid, rev, seq = _position(cursor)

        async def fetch(conn: _Conn) -> int:
            return int(
                await conn.fetchval(
                    f"SELECT count(*) FROM {TABLE} WHERE (xid, rev, seq) > ($1::xid8, $2, $3)", xid, rev, seq
                )
            )

        return await self._run("read the feed", fetch)

    @contextlib.asynccontextmanager
    async def export_lease(self, name: str) -> AsyncIterator[ExportLease | None]:
        """Exporter ``name``'s lease: one process of the cluster at a time (ADR 35).

        Yields ``None`` when another process holds it, else an ``ExportLease``
        whose cursor lives in the database; the lease (a session advisory lock
        on a connection of the pool) ends with the block, or with the
        connection (the database restarted: ``save`` then fails).
        """
        self._check_open()
        try:
            conn = await self._pool.acquire()
        except DRIVER_ERRORS as exc:
            raise self._error("take the export lease", exc) from None
        try:
            key = f"{EXPORTS}.{name}"
            try:
                held = bool(await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key))
            except DRIVER_ERRORS as exc:
                raise self._error("take the export lease", exc) from None
            if not held:
                yield None
                return
            try:
                yield ExportLease(conn, name, self._error)
            finally:
                with contextlib.suppress(*DRIVER_ERRORS, asyncpg.InterfaceError):
                    await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", key)
        finally:
            with contextlib.suppress(*DRIVER_ERRORS, asyncpg.InterfaceError):
                await self._pool.release(conn)

    async def prune(self, before: datetime) -> None:
        """Retention: remove what was sealed before ``before``, leaving a signed prune seal (ADR 32).

        ``PRUNE_SEALS`` seals (``PRUNE_EVENTS`` events) per transaction; one
        process of the cluster at a time (an advisory lock; the others skip this
        round).  The prune seals go in a chain of their own (a writer number
        drawn for the run), so writers never wait for a prune, nor a prune
        holding row locks for a writer.
        """
        self._check_open()
        before_us = epoch_micros(before)

        async def writer(conn: _Conn) -> int:
            return int(await conn.fetchval(f"SELECT nextval('{WRITERS}')"))

        pruner = Chain(await self._run("prune", writer), signer=self._chain.signer if self._chain else None)
        while await self._run("prune", lambda conn: self._prune_step(conn, before_us, pruner)):
            pass

    async def _prune_step(self, conn: _Conn, before_us: int, pruner: Chain) -> bool:
        tr = conn.transaction()
        await tr.start()
        try:
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtext($1))", f"{SEALS}.prune"):
                await tr.rollback()
                return False
            old = [
                Seal(*r)
                for r in await conn.fetch(
                    f"SELECT {_SEAL_COLUMNS} FROM {SEALS} WHERE time_us < $1 AND kind <> $2"
                    " ORDER BY time_us, writer, seq LIMIT $3",
                    before_us,
                    chain_mod.PRUNE,
                    PRUNE_SEALS,
                )
            ]
            row = await conn.fetchrow(
                f"SELECT {_SEAL_COLUMNS} FROM {SEALS} WHERE kind = $1"
                " ORDER BY time_us DESC, writer DESC, seq DESC LIMIT 1",
                chain_mod.PRUNE,
            )
            anchors: dict[int, tuple[int, bytes]] = {}
            legacy = int(await conn.fetchval(f"SELECT value FROM {META} WHERE key = 'legacy_seq'") or 0)
            removed = 0
            if legacy:  # events from before seals existed (schema version 1): by time
                status = await conn.execute(
                    f"DELETE FROM {TABLE} WHERE seq IN"
                    f" (SELECT seq FROM {TABLE} WHERE seq <= $1 AND time_us < $2 LIMIT $3)",
                    legacy,
                    before_us,
                    PRUNE_EVENTS,
                )
                removed = int(status.split()[-1])
            full = len(old) >= PRUNE_SEALS or removed >= PRUNE_EVENTS
            events = 0
            for n, seal in enumerate(old):  # fewer seals when they are big
                events += seal.items.count(b'["i",')
                if events >= PRUNE_EVENTS:
                    full = full or n + 1 < len(old)
                    old = old[: n + 1]
                    break
            if row is not None:
                newest = Seal(*row)
                for w, seq, h in orjson.loads(newest.payload):
                    anchors[int(w)] = (int(seq), bytes.fromhex(h))
                if not full and newest.time_us < before_us:
                    old.append(newest)
            if not old and not removed:
                await tr.rollback()
                return False
            last: dict[int, Seal] = {}
            for seal in old:
                if seal.writer not in last or last[seal.writer].seq < seal.seq:
                    last[seal.writer] = seal
            ids: list[str] = []
            for w, top in last.items():
                for (items,) in await conn.fetch(
                    f"SELECT items FROM {SEALS} WHERE writer = $1 AND seq <= $2", w, top.seq
                ):
                    ids.extend(str(item[1]) for item in orjson.loads(items) if item[0] == "i")
                await conn.execute(f"DELETE FROM {SEALS} WHERE writer = $1 AND seq <= $2", w, top.seq)
                anchors[w] = (top.seq, top.hash())
            if ids:
                await conn.execute(f"DELETE FROM {TABLE} WHERE id = ANY($1::text[])", ids)
            seal = pruner.next(
                [], self._clock(), kind=chain_mod.PRUNE, payload=chain_mod.prune_anchors(anchors), sign=True
            )
            # No ON CONFLICT: a step run again after a commit it did not hear of must fail,
            # not store deletions its stored seal does not name.
            await conn.execute(
                f"INSERT INTO {SEALS} ({_SEAL_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)", *seal
            )
            await tr.commit()
            pruner.advance(seal)
        except BaseException:
            # A transaction already finished refuses a rollback; nothing to undo then.
            with contextlib.suppress(*DRIVER_ERRORS, asyncpg.InterfaceError):
                await tr.rollback()
            raise
        log.info("audit retention: pruned %d events sealed before the limit", len(ids) + removed)
        return full

    async def verify(self, checker: Checker | None, since: datetime | None = None) -> VerifyReport:
        """Check the stored events against every writer's seals (ADR 32), in one snapshot."""
        self._check_open()
        since_us = None if since is None else epoch_micros(since)

        async def check(conn: _Conn) -> Verifier:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                legacy = int(await conn.fetchval(f"SELECT value FROM {META} WHERE key = 'legacy_seq'") or 0)
                v = Verifier(checker, since_us, legacy)
                v.tool_base = int(
                    await conn.fetchval(f"SELECT value FROM {META} WHERE key = 'feed_base'") or 0
                )
                sql = f"SELECT {_SEAL_COLUMNS} FROM {SEALS}"
                args: list[Any] = []
                if since_us is not None:
                    sql += " WHERE time_us >= $1"
                    args.append(since_us - SINCE_SLACK_US)
                async for r in conn.cursor(sql + " ORDER BY writer, seq", *args, prefetch=1000):
                    v.add_seals([Seal(*r)])
                async for r in conn.cursor(
                    'SELECT seq, id, time_us, type, "user", app, session_id, success, error,'
                    f" duration_ms, event, tool FROM {TABLE} ORDER BY seq",
                    prefetch=2000,
                ):
                    v.check_row(chain_mod.Row(*list(r)[1:]), r[0])
            return v

        v = await self._run("verify", check)
        return VerifyReport(v, v.finish(), 0)

    async def close(self) -> None:
        if self._closer is None:
            if self._closed:
                return
            self._closed = True
            self._closer = asyncio.get_running_loop().create_task(
                self._close(), name="bastion-audit-store-close"
            )
        # Shielded: a cancelled caller must not leave connections open.
        await asyncio.shield(self._closer)

    async def _close(self) -> None:
        if self._sign_timer is not None:
            self._sign_timer.cancel()
            self._sign_timer = None
        if self._signing is not None:
            await asyncio.wait([self._signing])
        if self._chain is not None:
            try:
                # The signed end of this writer's chain (ADR 32).
                await self._write_seal(chain_mod.CLOSE)
            except BastionError as e:
                log.error("%s: cannot write the closing seal: %s", self._label, e)
        try:
            async with asyncio.timeout(10):
                await self._pool.close()  # waits for operations under way
        except (TimeoutError, *DRIVER_ERRORS):
            self._pool.terminate()

    # -- plumbing ------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError(f"{self._label}: store is closed")

    async def _run(self, action: str, operation: Callable[[_Conn], Awaitable[_T]]) -> _T:
        """Run ``operation`` on a pooled connection; once more if that connection died under it.

        Every operation here is idempotent, so running it again after a lost
        connection (even one lost around COMMIT) is always safe.
        """
        for attempt in range(2):
            acquired = False
            try:
                async with self._pool.acquire() as conn:
                    acquired = True
                    return await operation(conn)
            except DRIVER_ERRORS as exc:
                error = self._error(action, exc)
                if isinstance(error, UnreachableError):
                    # After a restart every pooled connection is dead.
                    await self._pool.expire_connections()
                    if acquired and attempt == 0 and not isinstance(exc, TimeoutError) and not self._closed:
                        continue
                raise error from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _error(self, action: str, exc: BaseException) -> BastionError:
        if self._closed:
            return BackendError(f"{self._label}: store is closed")
        return map_error(self._label, self._dsn, action, exc)


class ExportLease:
    """An exporter's cursor in the database, read and written on the connection holding its lock."""

    def __init__(self, conn: _Conn, name: str, error: Callable[[str, BaseException], BastionError]) -> None:
        self._conn = conn
        self._name = name
        self._error = error

    async def load(self) -> str:
        try:
            value = await self._conn.fetchval(f"SELECT cursor FROM {EXPORTS} WHERE name = $1", self._name)
        except DRIVER_ERRORS as exc:
            raise self._error("read the export cursor", exc) from None
        return str(value or "")

    async def save(self, cursor: str) -> None:
        try:
            await self._conn.execute(
                f"INSERT INTO {EXPORTS} (name, cursor) VALUES ($1, $2)"
                " ON CONFLICT (name) DO UPDATE SET cursor = excluded.cursor",
                self._name,
                cursor,
            )
        except DRIVER_ERRORS as exc:
            raise self._error("save the export cursor", exc) from None


def _position(cursor: str) -> tuple[int, int, int]:
    """A feed cursor ``"xid:rev:seq"`` ("": the beginning)."""
    if not cursor:
        return 0, 0, 0
    parts = cursor.split(":")
    if len(parts) != 3 or not all(p.isdigit() and len(p) <= 20 for p in parts):
        raise ValidationError(f'bad audit feed cursor "{cursor[:60]}" (expected one from this store)')
    return int(parts[0]), int(parts[1]), int(parts[2])


def _nul_free(text: str) -> str:
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def _pg_row(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """``store.event_row``'s tuple with its text columns made storable in PostgreSQL."""
    if not any("\x00" in row[i] for i in _TEXT_COLUMNS):
        return row
    fixed = list(row)
    for i in _TEXT_COLUMNS:
        fixed[i] = _nul_free(fixed[i])
    return tuple(fixed)


def _search_sql(query: AuditQuery) -> tuple[str, list[Any]]:
    """``sqlite_store._search_sql`` for PostgreSQL: same filters, same order, ``$n`` parameters."""
    where: list[str] = []
    params: list[Any] = []

    def param(value: Any) -> str:
        params.append(value)
        return f"${len(params)}"

    if query.since is not None:
        where.append(f"time_us >= {param(epoch_micros(query.since))}")
    if query.until is not None:
        where.append(f"time_us < {param(epoch_micros(query.until))}")
    if query.types:
        where.append(f"type = ANY({param([_nul_free(clean_text(t)) for t in query.types])}::text[])")
    for column, value in (('"user"', query.user), ("app", query.app), ("session_id", query.session_id)):
        if value:
            where.append(f"{column} = {param(_nul_free(clean_text(value)))}")
    if query.tool:
        tool = param(_nul_free(clean_text(query.tool)))
        # Rows stored before the tool column (migration 3) have their tool in the document only.
        base = f"(SELECT value::bigint FROM {META} WHERE key = 'feed_base')"
        where.append(f"(tool = {tool} OR (seq <= {base} AND tool = '' AND event::json ->> 'tool' = {tool}))")
    if query.outcome is not None:
        where.append("success" if query.outcome == "success" else "NOT success")
    sql = f"SELECT event, success, error, duration_ms FROM {TABLE}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    direction = " DESC" if query.order == "desc" else ""
    sql += f" ORDER BY time_us{direction}, seq{direction}"
    if query.limit:
        sql += f" LIMIT {param(query.limit)}"
    return sql, params


if TYPE_CHECKING:

    def _is_an_audit_store(store: PostgresAuditStore) -> AuditStore:
        return store  # mypy checks the protocol here
