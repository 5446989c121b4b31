"""PostgreSQL-specific behaviour of ``PostgresBackend`` (the contract is in ``test_contract.py``).

Against the machine's real server (``tests/pg.py``), in a fresh database per
test.  Outages are real: a LISTEN connection killed with
``pg_terminate_backend``, a TCP hop that is cut (``TcpProxy``), a port nobody
listens on, and the server itself restarted.  Nothing waits by sleeping:
every expected change is awaited with a deadline.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from bastion._pg import MIGRATIONS_TABLE, describe_dsn, scrub
from bastion.backend import Event, EventType, Item
from bastion.backend.factory import open_backend
from bastion.backend.postgres import APP_NAME, LISTEN_APP_NAME, MIGRATIONS, PostgresBackend
from bastion.config import Backend as BackendConfig
from bastion.errors import BackendError, NotFoundError, ValidationError
from tests.pg import (
    TcpProxy,
    fresh_database,
    local_cluster,
    pg_ctlcluster,
    server_dsn,
    wait_until_answers,
    with_port,
)

from .conftest import FakeClock

pytestmark = pytest.mark.postgres

#: Seconds an expected event or state may take before the test fails.
DEADLINE = 10
PASSWORD = "s3cret-Pa55word"


@pytest.fixture
async def dsn() -> AsyncIterator[str]:
    async with fresh_database() as database:
        yield database


@pytest.fixture
async def opened() -> AsyncIterator[list[PostgresBackend]]:
    """Backends to close at teardown, whatever the test did."""
    backends: list[PostgresBackend] = []
    yield backends
    for backend in backends:
        await backend.close()


@pytest.fixture
def open_pg(opened: list[PostgresBackend]) -> Callable[..., Awaitable[PostgresBackend]]:
    async def _open(dsn: str, **kwargs: Any) -> PostgresBackend:
        backend = await PostgresBackend.open(dsn, **kwargs)
        opened.append(backend)
        return backend

    return _open


@asynccontextmanager
async def admin(dsn: str) -> AsyncIterator[asyncpg.Connection[Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


@asynccontextmanager
async def watching(backend: PostgresBackend, from_revision: int) -> AsyncIterator[AsyncIterator[Event]]:
    events = backend.watch(from_revision)
    try:
        yield events
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


async def next_events(events: AsyncIterator[Event], count: int) -> list[Event]:
    return [await asyncio.wait_for(anext(events), timeout=DEADLINE) for _ in range(count)]


async def eventually(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``condition`` until it holds; fail after ``DEADLINE`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not await condition():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        await asyncio.sleep(0.05)


def with_password(dsn: str) -> str:
    parts = urlsplit(dsn)
    assert parts.password is None, "the test server's DSN already has a password"
    user = parts.username or "postgres"
    return dsn.replace(f"//{user}@", f"//{user}:{PASSWORD}@", 1)


async def listener_pids(conn: asyncpg.Connection[Any], database: str) -> list[int]:
    rows = await conn.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND application_name = $2",
        database,
        LISTEN_APP_NAME,
    )
    return [int(row[0]) for row in rows]


def database_of(dsn: str) -> str:
    return urlsplit(dsn).path.lstrip("/")


def server_of(dsn: str) -> str:
    return dsn.rsplit("/", 1)[0] + "/postgres"


def assert_unreachable(error: BaseException, *, secret: str = PASSWORD) -> None:
    assert isinstance(error, BackendError)
    assert error.origin == "gateway"
    assert "the cluster database is unreachable" in error.message
    assert "postgresql://" not in error.message and "127.0.0.1" not in error.message
    assert secret not in str(error)
    # The driver's exception is summarised, not chained (it could say more).
    assert error.__cause__ is None


# ------------------------------------------------------------------ migrations


async def test_concurrent_openers_apply_migrations_once(
    dsn: str, open_pg: Callable[..., Awaitable[PostgresBackend]]
) -> None:
    backends = await asyncio.gather(*(open_pg(dsn) for _ in range(6)))
    async with admin(dsn) as conn:
        rows = await conn.fetch(
            f"SELECT component, version FROM {MIGRATIONS_TABLE} ORDER BY component, version"
        )
    assert [(r[0], r[1]) for r in rows] == [("backend", m.version) for m in MIGRATIONS]
    written = await backends[0].put(Item("/m/k", b"v"))
    assert all([await b.get("/m/k") == written for b in backends])

    # Opening again later finds nothing to do and keeps the data.
    again = await open_pg(dsn)
    assert await again.get("/m/k") == written
    async with admin(dsn) as conn:
        assert await conn.fetchval(f"SELECT count(*) FROM {MIGRATIONS_TABLE}") == len(MIGRATIONS)


async def test_newer_schema_is_refused(dsn: str, open_pg: Callable[..., Awaitable[PostgresBackend]]) -> None:
    await open_pg(dsn)
    async with admin(dsn) as conn:
        await conn.execute(
            f"INSERT INTO {MIGRATIONS_TABLE} (component, version, description) VALUES ('backend', 99, 'x')"
        )
    with pytest.raises(BackendError, match=r"backend schema version 99 is newer than this bastion supports"):
        await PostgresBackend.open(dsn)


# ------------------------------------------------------------------ watch


async def test_watch_is_woken_by_notify_from_other_instance(
    dsn: str, open_pg: Callable[..., Awaitable[PostgresBackend]]
) -> None:
    # Polling once a minute: only NOTIFY can deliver within the deadline.
    watcher = await open_pg(dsn, poll_interval=60)
    writer = await open_pg(dsn, poll_interval=60)
    async with watching(watcher, await watcher.current_revision()) as events:
        for i in range(3):
            pending = asyncio.ensure_future(anext(events))
            written = await writer.put(Item(f"/n/{i}", b"x"))
            assert await asyncio.wait_for(pending, timeout=DEADLINE) == Event(EventType.PUT, written)


async def test_watch_catches_up_after_listen_connection_is_terminated(
    dsn: str, open_pg: Callable[..., Awaitable[PostgresBackend]]
) -> None:
    database = database_of(dsn)
    watcher = await open_pg(dsn, poll_interval=60)
    writer = await open_pg(dsn, poll_interval=60)
    async with watching(watcher, await watcher.current_revision()) as events, admin(server_of(dsn)) as sql:
        first = await writer.put(Item("/t/0", b"before"))
        assert [e.item for e in await next_events(events, 1)] == [first]

        async def listening() -> bool:
            return len(await listener_pids(sql, database)) == 1

        await eventually(listening, "the watch has its LISTEN connection")
        [old_pid] = await listener_pids(sql, database)
        # Delivered by NOTIFY: from here on the watcher waits for a wake-up.
        second = await writer.put(Item("/t/0", b"listening"))
        assert [e.item for e in await next_events(events, 1)] == [second]
        pending = asyncio.ensure_future(anext(events))

        # Kill the LISTEN connection and keep it from coming back while the
        # writer (whose pooled connection stays open) writes: those
        # notifications go to nobody.
        await sql.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        try:
            assert await sql.fetchval("SELECT pg_terminate_backend($1)", old_pid)

            async def listener_gone() -> bool:
                return await listener_pids(sql, database) == []

            await eventually(listener_gone, "the LISTEN connection is gone")
            missed = [await writer.put(Item(f"/t/{i}", b"while away")) for i in range(1, 4)]
            await writer.delete("/t/1")
            deleted_at = await writer.current_revision()
        finally:
            await sql.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')

        # Polling is a minute away: only the reconnection's catch-up delivers these.
        got = [await asyncio.wait_for(pending, timeout=DEADLINE), *await next_events(events, 3)]
        assert [e.item for e in got[:3]] == missed
        assert (got[3].type, got[3].item.key, got[3].revision) == (EventType.DELETE, "/t/1", deleted_at)
        [new_pid] = await listener_pids(sql, database)
        assert new_pid != old_pid

        # And notifications reach the new connection; nothing came twice.
        after = await writer.put(Item("/t/after", b"x"))
        [event] = await next_events(events, 1)
        assert event.item == after
        revisions = [first.revision, second.revision] + [e.revision for e in got] + [event.revision]
        assert revisions == sorted(set(revisions))


async def test_lost_notification_is_found_by_fallback_poll(
    dsn: str, open_pg: Callable[..., Awaitable[PostgresBackend]]
) -> None:
    watcher = await open_pg(dsn, poll_interval=0.2)
    async with watching(watcher, await watcher.current_revision()) as events, admin(dsn) as sql:
        # A change committed without NOTIFY, as if the notification were lost.
        revision = await sql.fetchval(
            "INSERT INTO bastion_events (key, type, value) VALUES ('/raw', 'put', 'x') RETURNING revision"
        )
        [event] = await next_events(events, 1)
    assert (event.type, event.item.key, event.item.value, event.revision) == (
        EventType.PUT,
        "/raw",
        b"x",
        revision,
    )


async def test_expire_deletes_in_key_order(
    dsn: str, open_pg: Callable[..., Awaitable[PostgresBackend]]
) -> None:
    clock = FakeClock()
    backend = await open_pg(dsn, clock=clock)
    soon = clock.now() + timedelta(seconds=5)
    for key in ["/e/c", "/e/a", "/e/b"]:
        await backend.put(Item(key, b"x", expires=soon))
    start = await backend.current_revision()
    clock.advance(5)
    async with watching(backend, start) as events:
        assert await backend.expire() == 3
        got = await next_events(events, 3)
    assert [(e.type, e.item.key) for e in got] == [(EventType.DELETE, k) for k in ["/e/a", "/e/b", "/e/c"]]
    assert [e.revision for e in got] == [start + 1, start + 2, start + 3]


# ------------------------------------------------------------------ failures


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_open_on_closed_port_is_a_clear_backend_error() -> None:
    port = closed_port()
    dsn = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/bastion"
    with pytest.raises(BackendError) as info:
        await PostgresBackend.open(dsn)
    assert_unreachable(info.value)
    assert str(port) not in info.value.message  # the component is named, never its address
    assert "cannot connect" in info.value.message


async def test_operations_while_unreachable_then_recovery(
    dsn: str, open_pg: Callable[..., Awaitable[PostgresBackend]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger: ours and the driver's
    async with TcpProxy.for_dsn(dsn) as proxy:
        backend = await open_pg(with_password(proxy.dsn(dsn)), poll_interval=60)
        direct = await open_pg(dsn, poll_interval=60)
        assert PASSWORD not in backend.label
        async with (
            watching(backend, await backend.current_revision()) as events,
            admin(server_of(dsn)) as sql,
        ):
            first = await backend.put(Item("/u/0", b"x"))
            assert [e.item for e in await next_events(events, 1)] == [first]

            async def listening() -> bool:
                return len(await listener_pids(sql, database_of(dsn))) == 1

            await eventually(listening, "the watch has its LISTEN connection")
            pending = asyncio.ensure_future(anext(events))

            await proxy.cut()  # every connection through it is closed; new ones are refused
            operations: list[Callable[[], Awaitable[object]]] = [
                lambda: backend.get("/u/0"),
                lambda: backend.list("/u/"),
                backend.current_revision,
                lambda: backend.put(Item("/u/lost", b"x")),
                lambda: backend.update(Item("/u/0", b"y"), first.revision),
                lambda: backend.delete("/u/0"),
                backend.expire,
            ]
            for operation in operations:
                with pytest.raises(BackendError) as info:
                    await operation()
                assert_unreachable(info.value)
            written = [await direct.put(Item(f"/u/{i}", b"meanwhile")) for i in range(1, 3)]
            assert not pending.done()

            await proxy.restore()
            # The same instance works again, without reopening...
            assert await backend.get("/u/1") == written[0]
            assert [i.key for i in await backend.list("/u/")] == ["/u/0", "/u/1", "/u/2"]
            # ...and the watch resumes where it was: in order, nothing lost, nothing twice.
            got = [await asyncio.wait_for(pending, timeout=DEADLINE), *await next_events(events, 1)]
            assert [e.item for e in got] == written
            later = await direct.put(Item("/u/3", b"x"))
            assert [e.item for e in await next_events(events, 1)] == [later]
            # The writes that failed wrote nothing.
            with pytest.raises(NotFoundError):
                await direct.get("/u/lost")
            assert (await direct.get("/u/0")) == first
    messages = [r.getMessage() for r in caplog.records if r.name == "bastion.backend"]
    assert "backend watch: LISTEN connection lost; reconnecting" in messages
    assert "backend watch: listening again" in messages
    assert PASSWORD not in caplog.text
    assert all(PASSWORD not in str(record.__dict__) for record in caplog.records)


async def test_pooled_connections_killed_while_idle_are_replaced(
    dsn: str, open_pg: Callable[..., Awaitable[PostgresBackend]]
) -> None:
    backend = await open_pg(dsn)
    written = await backend.put(Item("/k/0", b"x"))
    async with admin(server_of(dsn)) as sql:
        killed = await sql.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = $1 AND application_name = $2",
            database_of(dsn),
            APP_NAME,
        )
    assert killed and all(row[0] for row in killed)
    # No error: a connection found dead is replaced (and a read on one that
    # died under it is run again on a new one).
    assert await backend.get("/k/0") == written
    assert [i.key for i in await backend.list("/k/")] == ["/k/0"]
    assert (await backend.put(Item("/k/1", b"y"))).revision > written.revision


async def test_server_restart(dsn: str, open_pg: Callable[..., Awaitable[PostgresBackend]]) -> None:
    """The real server stops and starts again under a running backend and its watch."""
    server = await server_dsn()
    version = local_cluster(server)
    if version is None:
        pytest.skip("needs this machine's own PostgreSQL cluster (pg_ctlcluster) to restart it")
    backend = await open_pg(dsn, poll_interval=60)
    other = await open_pg(dsn, poll_interval=60)
    async with watching(backend, await backend.current_revision()) as events:
        first = await backend.put(Item("/r/0", b"x"))
        assert [e.item for e in await next_events(events, 1)] == [first]
        pending = asyncio.ensure_future(anext(events))
        await pg_ctlcluster(version, "stop")
        try:
            with pytest.raises(BackendError) as info:
                await backend.get("/r/0")
            assert_unreachable(info.value)
            with pytest.raises(BackendError) as info:
                await backend.put(Item("/r/lost", b"x"))
            assert_unreachable(info.value)
        finally:
            await pg_ctlcluster(version, "start")
            assert await wait_until_answers(server) is None
        # Both instances work again without reopening; the watch hears the
        # other instance's write (NOTIFY on a new LISTEN connection, or its catch-up).
        assert await backend.get("/r/0") == first
        second = await other.put(Item("/r/1", b"y"))
        assert (await asyncio.wait_for(pending, timeout=DEADLINE)).item == second
        third = await backend.put(Item("/r/2", b"z"))
        assert [e.item for e in await next_events(events, 1)] == [third]


# ------------------------------------------------------------------ keys and config


async def test_keys_postgres_cannot_store_are_validation_errors(
    dsn: str, open_pg: Callable[..., Awaitable[PostgresBackend]]
) -> None:
    backend = await open_pg(dsn)
    with pytest.raises(ValidationError, match="NUL"):
        await backend.put(Item("/nul/\x00", b"x"))
    with pytest.raises(ValidationError, match="not valid Unicode"):
        await backend.put(Item("/bad/\udc80", b"x"))
    with pytest.raises(ValidationError, match="not valid Unicode"):
        await backend.get("/bad/\udc80")
    assert await backend.list("") == []


async def test_factory_opens_postgres_from_config(dsn: str, tmp_path: Path) -> None:
    cfg = BackendConfig.model_validate({"type": "postgres", "dsn": dsn})
    backend = await open_backend(cfg, tmp_path)
    try:
        assert isinstance(backend, PostgresBackend)
        written = await backend.put(Item("/f", b"x"))
        assert await backend.get("/f") == written
    finally:
        await backend.close()
    assert list(tmp_path.iterdir()) == []  # no SQLite file made


async def test_connect_errors_never_show_the_dsn(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    # One DSN the server rejects (no such database), one that cannot even be parsed.
    port = urlsplit(dsn).port or 5432
    no_database = with_password(server_of(dsn)).rsplit("/", 1)[0] + "/no_such_database_here"
    bad_port = with_password(with_port(dsn, "127.0.0.1", port)).replace(f":{port}/", ":notaport/")
    for bad, said, logged in [
        (no_database, "the cluster database failed (cannot connect)", 'database "<database>" does not exist'),
        (bad_port, "auth_service.backend.dsn is not a valid PostgreSQL address", ""),
    ]:
        with pytest.raises(BackendError) as info:
            await PostgresBackend.open(bad)
        assert said in str(info.value)
        assert logged in caplog.text
        for part in (PASSWORD, "no_such_database_here", "notaport", "127.0.0.1"):
            assert part not in str(info.value)
        for part in (PASSWORD, "no_such_database_here", "127.0.0.1"):
            assert part not in caplog.text


def test_dsn_is_shown_without_password() -> None:
    dsn = "postgresql://bastion:p%40ss-w0rd@db.example.com:5433/cluster?sslmode=require&password=q-s3cret"
    assert describe_dsn(dsn) == "postgresql://bastion@db.example.com:5433/cluster"
    assert describe_dsn("postgres://u:pw-s3cret@[::1]/db") == "postgres://u@[::1]/db"
    text = scrub(f"failed: p@ss-w0rd / p%40ss-w0rd / q-s3cret in {dsn}", dsn)
    for secret in ("p@ss-w0rd", "p%40ss-w0rd", "q-s3cret"):
        assert secret not in text
    assert text.startswith("failed: *** / *** / ***")


async def test_rate_buckets_are_one_gcra_for_every_instance(
    dsn: str, open_pg: Callable[..., Awaitable[PostgresBackend]]
) -> None:
    """Two instances (two nodes) drawing at once from one bucket, 5/s burst 5 (decision 0051):
    5 + 5 x elapsed are admitted (within one), the rest told how long to wait."""
    import time

    a, b = await open_pg(dsn), await open_pg(dsn)
    interval, tolerance = 0.2, 0.8
    start = time.monotonic()
    waits = await asyncio.gather(*(x.take("app/k", interval, tolerance) for x in (a, b) * 50))
    elapsed = time.monotonic() - start
    admitted = sum(1 for w in waits if w == 0.0)
    assert 5 <= admitted <= 5 + elapsed / interval + 1, (admitted, elapsed)
    assert all(0.0 < w <= interval + 0.05 for w in waits if w)
    assert await a.take("app/other", interval, tolerance) == 0.0  # another bucket is full
    await a.expire()  # drops only full buckets
    assert await b.take("app/k", interval, tolerance) > 0.0
