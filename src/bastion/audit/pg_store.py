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

PostgreSQL text cannot hold NUL characters: in the indexed columns they are
stored as U+FFFD (the JSON document keeps them, escaped as ``\\u0000``), and
search filters are mapped the same way.

What it must not do: let ``asyncpg`` or socket exceptions escape (they become
``BackendError``), show the DSN's password, or import anything above
``bastion.errors``, ``bastion.audit.events``/``store`` and ``bastion._pg``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeAlias, TypeVar

import asyncpg

from bastion._pg import (
    DRIVER_ERRORS,
    Migration,
    UnreachableError,
    describe_dsn,
    map_error,
    open_pool,
)
from bastion.audit.events import AuditEvent
from bastion.audit.store import (
    AuditQuery,
    AuditStore,
    Completion,
    clean_text,
    epoch_micros,
    event_row,
    merge_outcome,
)
from bastion.errors import BackendError, BastionError

if TYPE_CHECKING:
    _Conn: TypeAlias = asyncpg.pool.PoolConnectionProxy[asyncpg.Record]

__all__ = ["PostgresAuditStore"]

_T = TypeVar("_T")

#: Component name of this schema in ``bastion_schema_migrations``.
COMPONENT: Final = "audit"
TABLE: Final = "bastion_audit_events"
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
)

_INSERT: Final = (
    f'INSERT INTO {TABLE} (id, time_us, type, "user", app, session_id, success, error, duration_ms, event)'
    " SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[],"
    " $7::boolean[], $8::text[], $9::float8[], $10::text[])"
    " ON CONFLICT (id) DO NOTHING"
)
# The outcome goes in the columns only; search merges it into the stored JSON.
_COMPLETE: Final = (
    f"UPDATE {TABLE} AS a SET success = u.success, error = u.error, duration_ms = u.duration_ms"
    " FROM unnest($1::text[], $2::boolean[], $3::text[], $4::float8[])"
    " AS u (id, success, error, duration_ms) WHERE a.id = u.id"
)

#: Columns of ``event_row``'s tuple that are TEXT columns here (NUL not allowed).
_TEXT_COLUMNS: Final = (0, 2, 3, 4, 5, 7)


class PostgresAuditStore:
    """``AuditStore`` on a PostgreSQL database; open with ``await PostgresAuditStore.open(dsn)``."""

    def __init__(self, pool: asyncpg.Pool[asyncpg.Record], dsn: str) -> None:
        # Use ``open``: the pool must be created and the schema migrated first.
        self._pool = pool
        self._dsn = dsn
        self._label = f"postgres audit database {describe_dsn(dsn)}"
        self._closed = False
        self._closer: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, dsn: str, *, pool_size: int = 4) -> PostgresAuditStore:
        """Connect to ``dsn`` (``postgresql://user:password@host:port/db``) and migrate."""
        label = f"postgres audit database {describe_dsn(dsn)}"
        pool = await open_pool(
            dsn,
            label,
            pool_size=pool_size,
            command_timeout=COMMAND_TIMEOUT,
            # Plans made per statement: a cached generic plan picked while the table was
            # small (or never analysed, where autovacuum is off) would scan the whole
            # table for every completion by id.
            server_settings={"application_name": "bastion-audit", "plan_cache_mode": "force_custom_plan"},
            component=COMPONENT,
            migrations=MIGRATIONS,
        )
        return cls(pool, dsn)

    @property
    def label(self) -> str:
        """``postgres audit database postgresql://user@host:port/db`` (no password)."""
        return self._label

    async def insert_many(self, events: Sequence[AuditEvent]) -> None:
        if events:
            await self.write_batch(events, ())

    async def complete_many(self, updates: Sequence[Completion]) -> None:
        if updates:
            await self.write_batch((), updates)

    async def write_batch(self, events: Sequence[AuditEvent], updates: Sequence[Completion]) -> None:
        """``insert_many(events)`` then ``complete_many(updates)``, in one transaction."""
        if not (events or updates):
            return
        self._check_open()
        columns = (
            [list(c) for c in zip(*[_pg_row(event_row(e)) for e in events], strict=True)] if events else []
        )
        # The last completion of each event (a later one wins), in one statement.
        final: dict[str, tuple[bool, str, float | None]] = {}
        for event_id, success, error, duration_ms in updates:
            final[_nul_free(clean_text(event_id))] = (
                bool(success),
                _nul_free(clean_text(error)) if error else "",
                duration_ms,
            )
        outcomes = [list(final), *([list(c) for c in zip(*final.values(), strict=True)] if final else [])]
        action = "write" if events and final else "insert" if events else "complete"

        async def write(conn: _Conn) -> None:
            if events and final:
                async with conn.transaction():
                    await conn.execute(_INSERT, *columns)
                    await conn.execute(_COMPLETE, *outcomes)
            elif events:
                await conn.execute(_INSERT, *columns)
            else:
                await conn.execute(_COMPLETE, *outcomes)

        # Safe to run again: a row already stored is left as it is, and the
        # same outcomes give the same rows.
        await self._run(action, write)

    async def search(self, query: AuditQuery) -> list[dict[str, Any]]:
        self._check_open()
        sql, params = _search_sql(query)

        async def fetch(conn: _Conn) -> list[asyncpg.Record]:
            return await conn.fetch(sql, *params)

        rows = await self._run("search", fetch)
        return [merge_outcome(row[0], row[1], row[2], row[3]) for row in rows]

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
    sql = f"SELECT event, success, error, duration_ms FROM {TABLE}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    direction = " DESC" if query.order == "desc" else ""
    sql += f" ORDER BY time_us{direction}, seq{direction} LIMIT {param(query.limit)}"
    return sql, params


if TYPE_CHECKING:

    def _is_an_audit_store(store: PostgresAuditStore) -> AuditStore:
        return store  # mypy checks the protocol here
