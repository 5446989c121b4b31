"""``AuditStore`` on PostgreSQL: the audit log of a cluster whose processes share one database.

Same contract as ``SQLiteAuditStore`` (see ``bastion.audit.store``): the same
stored document (``AuditEvent.to_dict`` as JSON, built by the same helpers,
completions applied by the same ``_completed_json``), the same search
semantics (``since <= time < until``, types, user, app, session; oldest
first by event time, then insertion order; at most ``limit``).

Idempotent, so a writer may retry a batch whose outcome it does not know
(a connection lost around COMMIT): ``insert_many`` is ``ON CONFLICT (id) DO
NOTHING`` (a stored id keeps its row; never two rows for one event), and
completing an event again with the same outcome leaves the same row.  The
store itself retries a batch once when the connection dies under it.

Each ``insert_many`` is one statement (``INSERT ... SELECT FROM unnest(...)``:
one round trip whatever the batch size); each ``complete_many`` is one
transaction that reads the stored JSON of its events ``FOR UPDATE`` (in id
order, so concurrent completers cannot deadlock), rewrites it in Python and
updates the rows in one statement.  Commits are durable when they return
(PostgreSQL's ``synchronous_commit``, on by default).

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
import orjson

from bastion._pg import (
    CONNECT_TIMEOUT,
    Migration,
    UnreachableError,
    describe_dsn,
    map_error,
    migrate,
)
from bastion.audit.events import AuditEvent
from bastion.audit.store import AuditQuery, AuditStore, Completion, _clean, _completed_json, _micros, _row
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
_LOCK_FOR_COMPLETION: Final = (
    f"SELECT id, event FROM {TABLE} WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE"
)
_COMPLETE: Final = (
    f"UPDATE {TABLE} AS a SET success = u.success, error = u.error, duration_ms = u.duration_ms,"
    " event = u.event"
    " FROM unnest($1::text[], $2::boolean[], $3::text[], $4::float8[], $5::text[])"
    " AS u (id, success, error, duration_ms, event) WHERE a.id = u.id"
)

#: What the driver and the sockets under it raise.
_DRIVER_ERRORS: Final = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
    ValueError,
)
#: Columns of ``_row``'s tuple that are TEXT columns here (NUL not allowed).
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
        try:
            pool: asyncpg.Pool[asyncpg.Record] = await asyncpg.create_pool(
                dsn,
                min_size=1,
                max_size=max(1, pool_size),
                timeout=CONNECT_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT,
                # Plans made per statement: a cached generic plan picked while the table was
                # small (or never analysed, where autovacuum is off) would scan the whole
                # table for every completion by id.
                server_settings={"application_name": "bastion-audit", "plan_cache_mode": "force_custom_plan"},
            )
        except _DRIVER_ERRORS as exc:
            # ``from None``: the message summarises the driver's error without
            # the password; chaining it could print more.
            raise map_error(label, dsn, "connect", exc) from None
        try:
            async with pool.acquire() as conn:
                await migrate(conn, COMPONENT, MIGRATIONS, label)
        except BaseException as exc:
            pool.terminate()
            if isinstance(exc, _DRIVER_ERRORS):
                raise map_error(label, dsn, "migrate the schema", exc) from None
            raise
        return cls(pool, dsn)

    @property
    def label(self) -> str:
        """``postgres audit database postgresql://user@host:port/db`` (no password)."""
        return self._label

    async def insert_many(self, events: Sequence[AuditEvent]) -> None:
        if not events:
            return
        self._check_open()
        rows = [_pg_row(_row(e)) for e in events]
        columns = [list(column) for column in zip(*rows, strict=True)]

        async def insert(conn: _Conn) -> None:
            await conn.execute(_INSERT, *columns)

        # Safe to run again: a row already stored is left as it is.
        await self._run("insert", insert)

    async def complete_many(self, updates: Sequence[Completion]) -> None:
        if not updates:
            return
        self._check_open()
        wanted = [_nul_free(u.event_id) for u in updates]

        async def complete(conn: _Conn) -> None:
            async with conn.transaction():
                stored = {
                    str(r[0]): str(r[1]) for r in await conn.fetch(_LOCK_FOR_COMPLETION, sorted(set(wanted)))
                }
                # In order: a later completion of the same event builds on (and wins over) an earlier one.
                final: dict[str, tuple[bool, str, float | None, str]] = {}
                for event_id, (_, success, error, duration_ms) in zip(wanted, updates, strict=True):
                    text = stored.get(event_id)
                    if text is None:
                        continue  # not stored: ignored
                    success = bool(success)
                    error = _nul_free(_clean(error)) if error else ""
                    text = _completed_json(text, success, error, duration_ms)
                    stored[event_id] = text
                    final[event_id] = (success, error, duration_ms, text)
                if final:
                    ids = list(final)
                    await conn.execute(
                        _COMPLETE,
                        ids,
                        [final[i][0] for i in ids],
                        [final[i][1] for i in ids],
                        [final[i][2] for i in ids],
                        [final[i][3] for i in ids],
                    )

        # Safe to run again: the same completions give the same rows.
        await self._run("complete", complete)

    async def search(self, query: AuditQuery) -> list[dict[str, Any]]:
        self._check_open()
        sql, params = _search_sql(query)

        async def fetch(conn: _Conn) -> list[asyncpg.Record]:
            return await conn.fetch(sql, *params)

        rows = await self._run("search", fetch)
        return [orjson.loads(row[0]) for row in rows]

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
        except (TimeoutError, *_DRIVER_ERRORS):
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
            except _DRIVER_ERRORS as exc:
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
    """``store._row``'s tuple with its text columns made storable in PostgreSQL."""
    if not any("\x00" in row[i] for i in _TEXT_COLUMNS):
        return row
    fixed = list(row)
    for i in _TEXT_COLUMNS:
        fixed[i] = _nul_free(fixed[i])
    return tuple(fixed)


def _search_sql(query: AuditQuery) -> tuple[str, list[Any]]:
    """``store._search_sql`` for PostgreSQL: same filters, same order, ``$n`` parameters."""
    where: list[str] = []
    params: list[Any] = []

    def param(value: Any) -> str:
        params.append(value)
        return f"${len(params)}"

    if query.since is not None:
        where.append(f"time_us >= {param(_micros(query.since))}")
    if query.until is not None:
        where.append(f"time_us < {param(_micros(query.until))}")
    if query.types:
        where.append(f"type = ANY({param([_nul_free(_clean(t)) for t in query.types])}::text[])")
    for column, value in (('"user"', query.user), ("app", query.app), ("session_id", query.session_id)):
        if value:
            where.append(f"{column} = {param(_nul_free(_clean(value)))}")
    sql = f"SELECT event FROM {TABLE}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY time_us, seq LIMIT {param(query.limit)}"
    return sql, params


if TYPE_CHECKING:

    def _is_an_audit_store(store: PostgresAuditStore) -> AuditStore:
        return store  # mypy checks the protocol here
