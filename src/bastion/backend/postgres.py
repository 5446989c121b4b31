"""The PostgreSQL storage backend: one database shared by every bastion process.

What it is for: running several auth services (or processes on several hosts)
on one cluster state.  Same contract as ``SQLiteBackend`` (``bastion.backend``;
``tests/unit/backend/test_contract.py`` runs against both), same expiry
semantics (the injected clock decides; expired items stay absent until
``expire()`` deletes them with one DELETE event each).

How it works (see docs/decisions/0009-postgres-backend.md):

* Revisions come from the sequence ``bastion_revision``.  Every write
  transaction first takes ``LOCK TABLE bastion_events IN EXCLUSIVE MODE``
  (readers are not blocked), so writes are serialised cluster-wide: revisions
  are allocated and committed in the same order, and any snapshot sees a
  prefix of the revision order.  That is what lets a watcher read
  ``revision > last`` without ever skipping a revision committed late.  The
  lock also makes compare-and-swap a plain read-then-write.
* Each write appends its events to ``bastion_events`` and updates
  ``bastion_kv`` in the same transaction, and sends ``NOTIFY bastion_events``
  (delivered on commit only).
* ``watch`` reads the events table after the last revision it yielded.  It is
  woken by this instance's own commits, by a NOTIFY received on one shared
  LISTEN connection per instance, by that connection's reconnection (catch-up
  after an outage or a missed notification) and, as a fallback, every
  ``poll_interval`` seconds.  A watch survives a database outage: it waits
  and resumes where it was, in order, with no gap and no duplicate.
* Operations during an outage raise ``BackendError`` saying the database is
  unreachable; the pool reconnects by itself when it is back.  A read that
  fails on a connection that died while idle is retried once on a new one,
  and so is a write whose COMMIT was never sent (it cannot have committed).

What it must not do: let an ``asyncpg`` or socket exception escape (they become
``BackendError``/``ValidationError``), show the DSN's password anywhere, use
``LIKE`` for prefixes, or import anything above ``bastion.errors`` (and the
shared ``bastion._pg`` helpers).
"""

from __future__ import annotations

import asyncio
import builtins
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, TypeAlias, TypeVar

import asyncpg

from bastion._pg import (
    CLUSTER_DB,
    CONNECT_TIMEOUT,
    DRIVER_ERRORS,
    Migration,
    UnreachableError,
    map_error,
    open_pool,
    wait_event,
)
from bastion._tasks import stop_tasks
from bastion._time import Clock, SystemClock
from bastion.backend import Event, EventType, Item
from bastion.backend.sqlite import prefix_upper_bound
from bastion.errors import (
    AlreadyExistsError,
    BackendError,
    BastionError,
    ConflictError,
    NotFoundError,
    WatchExpiredError,
)

__all__ = ["PostgresBackend"]

log = logging.getLogger("bastion.backend")

_T = TypeVar("_T")
if TYPE_CHECKING:
    # Generic in the stubs only; not subscriptable at run time.
    _Conn: TypeAlias = asyncpg.pool.PoolConnectionProxy[asyncpg.Record]

#: Component name of this schema in ``bastion_schema_migrations``.
COMPONENT: Final = "backend"
#: The NOTIFY channel every write signals on (scoped to the database).
CHANNEL: Final = "bastion_events"
#: Events fetched per query by a watcher that is catching up.
WATCH_BATCH: Final = 500
#: Seconds a write waits for another process's write lock before failing.
LOCK_TIMEOUT_S: Final = 10
#: Seconds a query may take before it is abandoned (a hung server).
COMMAND_TIMEOUT: Final = 30.0
#: How often the LISTEN connection checks it is still alive.
HEARTBEAT_S: Final = 15.0
#: Back-off bounds for reconnecting the LISTEN connection, seconds.
RECONNECT_MIN_S: Final = 0.1
RECONNECT_MAX_S: Final = 2.0
#: ``application_name`` of the pool's and of the LISTEN connections.
APP_NAME: Final = "bastion"
LISTEN_APP_NAME: Final = "bastion-watch"

# The highest revision removed by compaction (see SQLiteBackend).
_COMPACTED: Final = "compacted_revision"

MIGRATIONS: Final = (
    Migration(
        1,
        "kv, events, meta",
        (
            "CREATE SEQUENCE bastion_revision AS BIGINT",
            # COLLATE "C": keys sort by code point, as the contract (and SQLite) orders them.
            'CREATE TABLE bastion_kv (key TEXT COLLATE "C" PRIMARY KEY, value BYTEA NOT NULL,'
            " revision BIGINT NOT NULL, expires TIMESTAMPTZ NULL)",
            "CREATE INDEX bastion_kv_expires ON bastion_kv (expires) WHERE expires IS NOT NULL",
            "CREATE TABLE bastion_events ("
            " revision BIGINT PRIMARY KEY DEFAULT nextval('bastion_revision'),"
            ' key TEXT COLLATE "C" NOT NULL,'
            " type TEXT NOT NULL CHECK (type IN ('put', 'delete')),"
            " value BYTEA NOT NULL, expires TIMESTAMPTZ NULL)",
            "ALTER SEQUENCE bastion_revision OWNED BY bastion_events.revision",
            "CREATE TABLE bastion_meta (name TEXT PRIMARY KEY, value BIGINT NOT NULL)",
        ),
    ),
    Migration(
        2,
        "rate limit buckets (decision 0051)",
        (
            # Unlogged: a crash forgets the buckets (they refill), nothing else is lost.
            "CREATE UNLOGGED TABLE bastion_rate (key TEXT PRIMARY KEY, tat DOUBLE PRECISION NOT NULL)",
        ),
    ),
)

# GCRA in one statement (decision 0051), on the database's clock so that every node agrees: the
# row's theoretical arrival time (tat) moves on by the interval if it is at most the tolerance
# ahead of now (admitted: 0), else nothing changes and the answer is the wait.  The row lock of
# ON CONFLICT serialises concurrent draws on one key; other keys never wait.
_TAKE: Final = (
    "WITH now AS (SELECT extract(epoch FROM clock_timestamp())::float8 AS t),"
    " up AS (INSERT INTO bastion_rate AS r (key, tat) SELECT $1, now.t + $2 FROM now"
    " ON CONFLICT (key) DO UPDATE SET tat = GREATEST(r.tat, (SELECT t FROM now)) + $2"
    " WHERE GREATEST(r.tat, (SELECT t FROM now)) - (SELECT t FROM now) <= $3"
    " RETURNING 0.0::float8 AS wait)"
    " SELECT COALESCE((SELECT wait FROM up),"
    " (SELECT GREATEST(r.tat - now.t - $3, 0.001) FROM bastion_rate r, now WHERE r.key = $1), $2)"
)

_LOCK_WRITES: Final = "LOCK TABLE bastion_events IN EXCLUSIVE MODE"
_SELECT_ITEM: Final = "SELECT key, value, revision, expires FROM bastion_kv"
_LIVE: Final = "(expires IS NULL OR expires > $2)"


@dataclass(slots=True)
class _Tx:
    """One write transaction: its connection, its ``now`` and the newest revision it wrote."""

    conn: _Conn
    now: datetime
    revision: int = 0


class PostgresBackend:
    """``Backend`` on a PostgreSQL database, shared safely by any number of processes.

    Open with ``await PostgresBackend.open(dsn)``; close with ``close()``.
    Besides the ``Backend`` methods, ``expire()`` and ``compact()`` do the
    housekeeping the service runs periodically.
    """

    def __init__(
        self,
        pool: asyncpg.Pool[asyncpg.Record],
        dsn: str,
        *,
        clock: Clock,
        poll_interval: float,
        event_retention: int,
    ) -> None:
        # Use ``open``: the pool must be created and the schema migrated first.
        self._pool = pool
        self._dsn = dsn
        self._label = CLUSTER_DB
        self._clock = clock
        self._poll_interval = poll_interval
        self._event_retention = max(1, event_retention)
        # Replaced on every wake-up (own commit, NOTIFY, LISTEN reconnected);
        # watchers wait on the one current when they last queried.
        self._changed = asyncio.Event()
        self._closed = False
        # Set by close(): ends the LISTEN loop's waits.
        self._closing = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        # Write transactions run as tasks shielded from the caller's
        # cancellation; close() waits for them.
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- opening and closing -------------------------------------------------

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        clock: Clock | None = None,
        poll_interval: float = 5.0,
        event_retention: int = 100_000,
        pool_size: int = 10,
    ) -> PostgresBackend:
        """Connect to ``dsn`` (``postgresql://user:password@host:port/db``) and migrate.

        ``poll_interval`` is how often watchers look for changes when no
        notification came (only a fallback: NOTIFY wakes them at once);
        ``event_retention`` is how many events ``compact()`` keeps.
        """
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        pool = await open_pool(
            dsn,
            CLUSTER_DB,
            pool_size=pool_size,
            command_timeout=COMMAND_TIMEOUT,
            server_settings={
                "application_name": APP_NAME,
                "lock_timeout": str(LOCK_TIMEOUT_S * 1000),
                # A client that vanishes mid-transaction must not hold the
                # write lock for ever.
                "idle_in_transaction_session_timeout": "60000",
            },
            component=COMPONENT,
            migrations=MIGRATIONS,
        )
        return cls(
            pool,
            dsn,
            clock=clock or SystemClock(),
            poll_interval=poll_interval,
            event_retention=event_retention,
        )

    async def close(self) -> None:
        """Finish accepted writes, end every watcher and close all connections."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        self._notify()  # watchers waiting for changes see ``_closed`` and stop
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        listener, self._listener = self._listener, None
        if listener is not None:
            await stop_tasks(listener)
        try:
            # Graceful: waits for connections in use (a watcher's last query).
            async with asyncio.timeout(10):
                await self._pool.close()
        except (TimeoutError, *DRIVER_ERRORS):
            self._pool.terminate()
        self._notify()

    @property
    def label(self) -> str:
        """What errors call it (``CLUSTER_DB``: never its address)."""
        return self._label

    # -- reads ---------------------------------------------------------------

    async def get(self, key: str) -> Item:
        row = await self._read(
            "read", lambda c: c.fetchrow(f"{_SELECT_ITEM} WHERE key = $1 AND {_LIVE}", key, self._now())
        )
        if row is None:
            raise NotFoundError(f"{key} not found")
        return _item(row)

    async def list(self, prefix: str) -> builtins.list[Item]:
        upper = prefix_upper_bound(prefix)
        now = self._now()
        if upper is None:
            sql = f"{_SELECT_ITEM} WHERE key >= $1 AND {_LIVE} ORDER BY key"
            rows = await self._read("list", lambda c: c.fetch(sql, prefix, now))
        else:
            sql = f"{_SELECT_ITEM} WHERE key >= $1 AND {_LIVE} AND key < $3 ORDER BY key"
            rows = await self._read("list", lambda c: c.fetch(sql, prefix, now, upper))
        return [_item(row) for row in rows]

    async def current_revision(self) -> int:
        # Compaction always keeps the newest event, so max() is the newest
        # revision ever written.
        value = await self._read(
            "read", lambda c: c.fetchval("SELECT COALESCE(MAX(revision), 0) FROM bastion_events")
        )
        return int(value)

    # -- writes --------------------------------------------------------------

    async def create(self, item: Item) -> Item:
        async def body(tx: _Tx) -> Item:
            current = await _current(tx, item.key)
            if current is not None and _live(current[1], tx.now):
                raise AlreadyExistsError(f"{item.key} already exists")
            return await _write_put(tx, item)

        return await self._transact("create", body)

    async def update(self, item: Item, expected_revision: int) -> Item:
        async def body(tx: _Tx) -> Item:
            current = await _current(tx, item.key)
            if current is None or not _live(current[1], tx.now):
                raise NotFoundError(f"{item.key} not found")
            if current[0] != expected_revision:
                raise ConflictError(
                    f"{item.key} was modified: revision is {current[0]}, expected {expected_revision}"
                )
            return await _write_put(tx, item)

        return await self._transact("update", body)

    async def put(self, item: Item) -> Item:
        return await self._transact("put", lambda tx: _write_put(tx, item))

    async def delete(self, key: str, expected_revision: int | None = None) -> None:
        async def body(tx: _Tx) -> None:
            current = await _current(tx, key)
            if current is None or not _live(current[1], tx.now):
                raise NotFoundError(f"{key} not found")
            if expected_revision is not None and current[0] != expected_revision:
                raise ConflictError(
                    f"{key} was modified: revision is {current[0]}, expected {expected_revision}"
                )
            tx.revision = await _append_event(tx, EventType.DELETE, key, b"", None)
            await tx.conn.execute("DELETE FROM bastion_kv WHERE key = $1", key)

        await self._transact("delete", body)

    # -- housekeeping --------------------------------------------------------

    async def take(self, key: str, interval: float, tolerance: float) -> float:
        """Draw a token from the rate limit bucket ``key`` (decision 0051): 0.0 if there was one,
        else the seconds until there is.  One statement, outside the change feed."""

        async def query(conn: _Conn) -> float:
            return float(await conn.fetchval(_TAKE, key, interval, tolerance))

        return await self._read("count a rate limit", query)

    async def expire(self) -> int:
        """Delete every expired item, one DELETE event each (in key order); return how many.
        Full rate limit buckets (their time in the past) go too: absent is the same."""
        await self._read(
            "drop full rate limit buckets",
            lambda conn: conn.execute(
                "DELETE FROM bastion_rate WHERE tat < extract(epoch FROM clock_timestamp()) - 60"
            ),
        )

        async def body(tx: _Tx) -> int:
            # Under the write lock nothing else writes, so the keys read here
            # are exactly the rows deleted below.
            keys = [
                str(row[0])
                for row in await tx.conn.fetch(
                    "SELECT key FROM bastion_kv WHERE expires IS NOT NULL AND expires <= $1 ORDER BY key",
                    tx.now,
                )
            ]
            if not keys:
                return 0
            # nextval() runs in the outer query, over rows already in key order.
            revision = await tx.conn.fetchval(
                "WITH added AS (INSERT INTO bastion_events (revision, key, type, value)"
                " SELECT nextval('bastion_revision'), k, 'delete', ''::bytea FROM"
                " (SELECT k FROM unnest($1::text[]) WITH ORDINALITY AS t (k, n) ORDER BY n) AS ordered"
                " RETURNING revision) SELECT max(revision) FROM added",
                keys,
            )
            await tx.conn.execute("DELETE FROM bastion_kv WHERE key = ANY($1::text[])", keys)
            tx.revision = int(revision)
            return len(keys)

        return await self._transact("expire items", body)

    async def compact(self) -> int:
        """Drop all but the newest ``event_retention`` events; return how many.

        The newest event is always kept, so ``current_revision`` survives.
        Watchers asking for a dropped revision get ``WatchExpiredError``.
        """

        async def body(tx: _Tx) -> int:
            threshold = await tx.conn.fetchval(
                "SELECT revision FROM bastion_events ORDER BY revision DESC LIMIT 1 OFFSET $1",
                self._event_retention,
            )
            if threshold is None:
                return 0
            status = await tx.conn.execute("DELETE FROM bastion_events WHERE revision <= $1", threshold)
            await tx.conn.execute(
                "INSERT INTO bastion_meta (name, value) VALUES ($1, $2)"
                " ON CONFLICT (name) DO UPDATE SET value = GREATEST(bastion_meta.value, excluded.value)",
                _COMPACTED,
                threshold,
            )
            return int(status.rsplit(" ", 1)[-1])

        return await self._transact("compact events", body)

    # -- watch ---------------------------------------------------------------

    async def watch(self, from_revision: int) -> AsyncIterator[Event]:
        """Yield every change with revision > ``from_revision``, in order, until closed.

        Raises ``WatchExpiredError`` when some of those changes were
        compacted away.  A database outage does not end the watch: it
        waits for the database and goes on from the last revision yielded.
        """
        self._start_listener()
        last = from_revision
        outage = False
        while not self._closed:
            # Taken before querying: a wake-up after the query sets this
            # event, so the wait below cannot sleep through it.
            changed = self._changed
            try:
                batch = await self._events_after(last)
            except UnreachableError as exc:
                if self._closed:
                    return
                if not outage:
                    log.warning(
                        "backend watch: database unreachable; waiting for it",
                        extra={"error": exc.message, "revision": last},
                    )
                outage = True
                # The LISTEN loop wakes us when it has reconnected.
                await wait_event(changed, self._poll_interval)
                continue
            if batch is None:
                return  # closed meanwhile
            if outage:
                log.info("backend watch: database reachable again", extra={"revision": last})
                outage = False
            for event in batch:
                yield event
                last = event.revision
            if len(batch) >= WATCH_BATCH:
                continue  # catching up: fetch the next batch at once
            if self._closed:
                return
            await wait_event(changed, self._poll_interval)

    async def _events_after(self, revision: int) -> builtins.list[Event] | None:
        async def query(conn: _Conn) -> tuple[builtins.list[asyncpg.Record], int]:
            rows = await conn.fetch(
                "SELECT revision, key, type, value, expires FROM bastion_events"
                " WHERE revision > $1 ORDER BY revision LIMIT $2",
                revision,
                WATCH_BATCH,
            )
            if not rows:
                # Compaction keeps the newest event: nothing after ``revision``
                # existed to be lost.
                return rows, 0
            # Read after the events: if nothing above ``revision`` had been
            # compacted by now, none was missing from the rows read.
            compacted = await conn.fetchval("SELECT value FROM bastion_meta WHERE name = $1", _COMPACTED)
            return rows, int(compacted or 0)

        if self._closed:
            return None
        try:
            rows, compacted = await self._read("read events", query)
        except BackendError:
            if self._closed:
                return None
            raise
        if revision < compacted:
            raise WatchExpiredError(
                f"cannot watch from revision {revision}: changes up to revision "
                f"{compacted} were compacted; list again and watch from its revision"
            )
        return [_event(row) for row in rows]

    def _start_listener(self) -> None:
        if self._listener is None and not self._closed:
            self._listener = asyncio.get_running_loop().create_task(
                self._listen(), name="bastion-backend-listen"
            )

    async def _listen(self) -> None:
        """Keep one connection LISTENing; wake watchers on NOTIFY and after every (re)connect.

        Never ends on its own (close() cancels it): any failure is logged and
        followed by a reconnection, with a growing delay while they keep failing.
        """
        loop = asyncio.get_running_loop()
        delay = RECONNECT_MIN_S
        failing = False
        while not self._closed:
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(
                    self._dsn,
                    timeout=CONNECT_TIMEOUT,
                    command_timeout=CONNECT_TIMEOUT,
                    server_settings={"application_name": LISTEN_APP_NAME},
                )
            except Exception as exc:
                if not failing:
                    log.warning(
                        "backend watch: cannot LISTEN; retrying",
                        extra={"error": map_error(self._label, self._dsn, "listen", exc).message},
                    )
                failing = True
                await wait_event(self._closing, delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
                continue
            connected_at = loop.time()
            reason = "connection closed"
            try:
                conn.add_termination_listener(_setter(lost))
                await conn.add_listener(CHANNEL, self._on_notify)
                if failing:
                    log.info("backend watch: listening again")
                failing = False
                # Catch up: anything committed while nobody listened is read now.
                self._notify()
                while not self._closed and not lost.is_set():
                    if await wait_event(lost, HEARTBEAT_S):
                        break
                    # A connection can die without a word (a dropped network):
                    # ask it something now and then.
                    await conn.execute("SELECT 1")
            except Exception as exc:
                reason = map_error(self._label, self._dsn, "listen", exc).message
            finally:
                conn.terminate()
            if self._closed:
                return
            log.warning("backend watch: LISTEN connection lost; reconnecting", extra={"error": reason})
            failing = True
            if loop.time() - connected_at < RECONNECT_MAX_S:
                # Lost soon after connecting: do not hammer the server.
                await wait_event(self._closing, delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
            else:
                delay = RECONNECT_MIN_S

    def _on_notify(self, conn: object, pid: int, channel: str, payload: object) -> None:
        self._notify()

    # -- plumbing ------------------------------------------------------------

    def _now(self) -> datetime:
        return _aware(self._clock.now())

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError(f"{self._label} connection is closed (this node is stopping)")

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _read(self, action: str, query: Callable[[_Conn], Awaitable[_T]]) -> _T:
        """Run ``query`` on a pooled connection; retry once if that connection had died."""
        self._check_open()
        for attempt in range(2):
            acquired = False
            try:
                async with self._pool.acquire() as conn:
                    acquired = True
                    return await query(conn)
            except DRIVER_ERRORS as exc:
                error = self._error(action, exc)
                if isinstance(error, UnreachableError):
                    # After a restart every pooled connection is dead: have the
                    # pool replace them all rather than fail on each in turn.
                    await self._pool.expire_connections()
                    if acquired and attempt == 0 and not isinstance(exc, TimeoutError):
                        continue
                raise error from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _transact(self, action: str, body: Callable[[_Tx], Awaitable[_T]]) -> _T:
        """Run ``body`` in one serialised write transaction, then wake watchers.

        The transaction runs in its own task, shielded from the caller's
        cancellation, so it commits or rolls back on its own terms and
        ``close()`` can wait for it.
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

    async def _run_transaction(self, action: str, body: Callable[[_Tx], Awaitable[_T]]) -> _T:
        for attempt in range(2):
            acquired = commit_sent = False
            try:
                async with self._pool.acquire() as conn:
                    acquired = True
                    async with conn.transaction():
                        await conn.execute(_LOCK_WRITES)
                        tx = _Tx(conn, self._now())
                        result = await body(tx)
                        if tx.revision:
                            # Delivered to listeners when (and only if) this commits.
                            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(tx.revision))
                        commit_sent = True
            except DRIVER_ERRORS as exc:
                error = self._error(action, exc)
                if isinstance(error, UnreachableError):
                    await self._pool.expire_connections()
                    if commit_sent:
                        raise UnreachableError(
                            f"{error.message}; the write may or may not have been committed"
                        ) from None
                    if acquired and attempt == 0 and not isinstance(exc, TimeoutError):
                        continue  # nothing was committed: safe to run again
                raise error from None
            self._notify()
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _error(self, action: str, exc: BaseException) -> BastionError:
        if self._closed:
            return BackendError(f"{self._label} connection is closed (this node is stopping)")
        return map_error(self._label, self._dsn, action, exc)


def _setter(event: asyncio.Event) -> Callable[[object], None]:
    """A termination listener that sets ``event``."""
    return lambda _conn: event.set()


def _aware(when: datetime) -> datetime:
    # Naive datetimes are taken as UTC (the clock and resources use UTC).
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def _live(expires: datetime | None, now: datetime) -> bool:
    return expires is None or expires > now


def _item(row: asyncpg.Record) -> Item:
    return Item(key=row[0], value=bytes(row[1]), revision=int(row[2]), expires=row[3])


def _event(row: asyncpg.Record) -> Event:
    return Event(
        type=EventType(row[2]),
        item=Item(key=row[1], value=bytes(row[3]), revision=int(row[0]), expires=row[4]),
    )


async def _current(tx: _Tx, key: str) -> tuple[int, datetime | None] | None:
    """``(revision, expires)`` of the stored row for ``key``, expired or not."""
    row = await tx.conn.fetchrow("SELECT revision, expires FROM bastion_kv WHERE key = $1", key)
    if row is None:
        return None
    return int(row[0]), row[1]


async def _append_event(tx: _Tx, kind: EventType, key: str, value: bytes, expires: datetime | None) -> int:
    """Append one event; its revision is the sequence's next value."""
    revision = await tx.conn.fetchval(
        "INSERT INTO bastion_events (key, type, value, expires) VALUES ($1, $2, $3, $4) RETURNING revision",
        key,
        kind.value,
        value,
        expires,
    )
    return int(revision)


async def _write_put(tx: _Tx, item: Item) -> Item:
    expires = None if item.expires is None else _aware(item.expires)
    value = bytes(item.value)
    revision = await _append_event(tx, EventType.PUT, item.key, value, expires)
    await tx.conn.execute(
        "INSERT INTO bastion_kv (key, value, revision, expires) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (key) DO UPDATE SET"
        " value = excluded.value, revision = excluded.revision, expires = excluded.expires",
        item.key,
        value,
        revision,
        expires,
    )
    tx.revision = revision
    return Item(key=item.key, value=value, revision=revision, expires=expires)
