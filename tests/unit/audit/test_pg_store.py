"""PostgresAuditStore on the machine's real PostgreSQL (a fresh database per test).

Mirrors the store-level assertions of ``test_store.py`` (same documents, same
completions, same search results), plus what PostgreSQL adds: schema
migrations shared by concurrent openers, idempotent retries, outages.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
import orjson
import pytest

from bastion._pg import MIGRATIONS_TABLE
from bastion.audit import store as store_module
from bastion.audit.events import NOTIFICATION, REQUEST, SESSION_END, SESSION_START, AuditEvent
from bastion.audit.pg_store import MIGRATIONS, TABLE, PostgresAuditStore
from bastion.audit.redact import REDACTED, Redactor, redact_headers
from bastion.audit.store import AuditQuery, Completion
from bastion.errors import BackendError
from tests.pg import TcpProxy, fresh_database
from tests.unit.audit.test_store import T0, _events_of_every_shape, as_stored, make_event

pytestmark = pytest.mark.postgres

PASSWORD = "audit-Pa55-secret"


@pytest.fixture
async def dsn() -> AsyncIterator[str]:
    async with fresh_database() as database:
        yield database


@pytest.fixture
async def store(dsn: str) -> AsyncIterator[PostgresAuditStore]:
    s = await PostgresAuditStore.open(dsn)
    try:
        yield s
    finally:
        await s.close()


@asynccontextmanager
async def sql(dsn: str) -> AsyncIterator[asyncpg.Connection[Any]]:
    """An independent connection (not the store's)."""
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def raw_rows(dsn: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    async with sql(dsn) as conn:
        return [tuple(r) for r in await conn.fetch(query, *params)]


async def everything(store: PostgresAuditStore) -> list[dict[str, Any]]:
    return await store.search(AuditQuery(limit=store_module.MAX_LIMIT))


# ------------------------------------------------------------------ schema


async def test_reopen_keeps_rows(dsn: str) -> None:
    e = make_event()
    s = await PostgresAuditStore.open(dsn)
    await s.insert_many([e])
    await s.close()
    s = await PostgresAuditStore.open(dsn)
    try:
        assert await everything(s) == [as_stored(e)]
    finally:
        await s.close()


async def test_concurrent_openers_migrate_once(dsn: str) -> None:
    stores = await asyncio.gather(*(PostgresAuditStore.open(dsn) for _ in range(5)))
    try:
        rows = await raw_rows(dsn, f"SELECT component, version FROM {MIGRATIONS_TABLE} ORDER BY version")
        assert rows == [("audit", m.version) for m in MIGRATIONS]
        e = make_event()
        await stores[0].insert_many([e])
        assert all([await s.search(AuditQuery()) == [as_stored(e)] for s in stores])
    finally:
        for s in stores:
            await s.close()


async def test_newer_schema_is_refused(dsn: str) -> None:
    s = await PostgresAuditStore.open(dsn)
    await s.close()
    async with sql(dsn) as conn:
        await conn.execute(
            f"INSERT INTO {MIGRATIONS_TABLE} (component, version, description) VALUES ('audit', 99, 'x')"
        )
    with pytest.raises(BackendError, match="audit schema version 99 is newer"):
        await PostgresAuditStore.open(dsn)


async def test_closed_store_refuses_and_close_is_idempotent(store: PostgresAuditStore) -> None:
    await store.close()
    await store.close()
    with pytest.raises(BackendError, match="closed"):
        await store.insert_many([make_event()])
    with pytest.raises(BackendError, match="closed"):
        await store.complete_many([Completion("x", True)])
    with pytest.raises(BackendError, match="closed"):
        await store.search(AuditQuery())


async def test_cancelled_close_still_closes(dsn: str) -> None:
    s = await PostgresAuditStore.open(dsn)
    await s.insert_many([make_event()])
    closing = asyncio.create_task(s.close())
    await asyncio.sleep(0)  # let it start
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    await asyncio.wait_for(s.close(), timeout=10)  # joins the close under way
    with pytest.raises(BackendError, match="closed"):
        await s.insert_many([make_event()])
    assert await raw_rows(
        dsn,
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE application_name = 'bastion-audit' AND datname = current_database()",
    ) == [(0,)]


# ------------------------------------------------------------------ rows


async def test_insert_stores_indexed_columns_and_full_json(store: PostgresAuditStore, dsn: str) -> None:
    e = make_event(user="bob", app="git", session_id="s-9", headers={"Accept": "*/*"})
    await store.insert_many([e])
    rows = await raw_rows(
        dsn, f'SELECT id, type, "user", app, session_id, success, error, duration_ms, event FROM {TABLE}'
    )
    assert len(rows) == 1
    *columns, event = rows[0]
    assert columns == [e.id, REQUEST, "bob", "git", "s-9", True, "", None]
    assert orjson.loads(event) == as_stored(e)
    indexes = {
        r[0] for r in await raw_rows(dsn, "SELECT indexname FROM pg_indexes WHERE tablename = $1", TABLE)
    }
    assert {f"{TABLE}_{name}" for name in ("time", "type", "user", "app", "session")} <= indexes


async def test_empty_batches_are_no_ops(store: PostgresAuditStore) -> None:
    await store.insert_many([])
    await store.complete_many([])
    assert await everything(store) == []


async def test_insert_of_a_stored_id_keeps_the_stored_row(store: PostgresAuditStore) -> None:
    first = make_event(tool="one")
    again = make_event(id=first.id, tool="two")
    await store.insert_many([first])
    await store.insert_many([again, make_event(tool="three")])
    got = await everything(store)
    assert [g["tool"] for g in got] == ["one", "three"]
    await store.complete_many([Completion(first.id, False, "boom", 2.0)])
    got = await everything(store)
    assert got[0]["tool"] == "one"
    assert (got[0]["success"], got[0]["error"], got[0]["duration_ms"]) == (False, "boom", 2.0)


async def test_a_retried_batch_never_doubles_an_event(store: PostgresAuditStore, dsn: str) -> None:
    # A writer that lost its connection around COMMIT sends the same batches again.
    events = [make_event() for _ in range(5)]
    done = [
        Completion(e.id, i % 2 == 0, "" if i % 2 == 0 else "failed", float(i)) for i, e in enumerate(events)
    ]
    table = f"SELECT seq, id, success, error, duration_ms, event FROM {TABLE} ORDER BY seq"
    await store.insert_many(events)
    await store.complete_many(done)
    first_pass = await raw_rows(dsn, table)
    await store.insert_many(events)
    await store.complete_many(done)
    again = await raw_rows(dsn, table)
    assert again == first_pass
    assert [r[1] for r in again] == [e.id for e in events]
    # Duplicates inside one batch, too.
    extra = make_event()
    await store.insert_many([extra, extra])
    assert await raw_rows(dsn, f"SELECT count(*) FROM {TABLE} WHERE id = $1", extra.id) == [(1,)]


async def test_stored_json_is_to_dict_for_every_shape(store: PostgresAuditStore, dsn: str) -> None:
    events = _events_of_every_shape()
    await store.insert_many(events)
    stored = {row[0]: orjson.loads(row[1]) for row in await raw_rows(dsn, f"SELECT id, event FROM {TABLE}")}
    for e in events:
        assert stored[e.id] == as_stored(e), e


async def test_odd_values_do_not_fail_the_write(store: PostgresAuditStore) -> None:
    broken = "bad \ud800 text"  # a lone surrogate: not encodable as UTF-8
    e = make_event(user=broken, params={"arg": broken}, extra={"body": b"\xff\xfe raw", "tags": {"b", "a"}})
    await store.insert_many([e])
    [got] = await everything(store)
    assert got["id"] == e.id
    assert got["user"] == "bad ? text"
    assert got["params"] == {"arg": "bad ? text"}
    assert got["extra"]["body"] == "\ufffd\ufffd raw"
    assert got["extra"]["tags"] == ["a", "b"]
    await store.complete_many([Completion(e.id, False, "upstream said \udc80", 1.0)])
    [got] = await everything(store)
    assert got["error"] == "upstream said ?"


async def test_nul_characters_are_stored(store: PostgresAuditStore, dsn: str) -> None:
    # PostgreSQL text cannot hold NUL: the columns get U+FFFD, the document keeps it.
    e = make_event(user="nul\x00user", params={"arg": "a\x00b"})
    await store.insert_many([e])
    await store.complete_many([Completion(e.id, False, "err\x00or", 1.0)])
    [got] = await store.search(AuditQuery(user="nul\x00user"))
    assert got["params"] == {"arg": "a\x00b"}
    assert (got["user"], got["error"]) == ("nul\x00user", "err\ufffdor")
    assert await raw_rows(dsn, f'SELECT "user", error FROM {TABLE}') == [("nul\ufffduser", "err\ufffdor")]


# ------------------------------------------------------------------ completions


async def test_completion_updates_the_row_in_place(store: PostgresAuditStore, dsn: str) -> None:
    ok, bad = make_event(), make_event()
    await store.insert_many([ok, bad])
    await store.complete_many([Completion(ok.id, True, "", 12.5), Completion(bad.id, False, "HTTP 502", 3.0)])
    cols = await raw_rows(dsn, f"SELECT id, success, error, duration_ms FROM {TABLE} ORDER BY seq")
    assert cols == [(ok.id, True, "", 12.5), (bad.id, False, "HTTP 502", 3.0)]
    got_ok, got_bad = await everything(store)
    assert got_ok == as_stored(ok) | {"duration_ms": 12.5}
    assert got_bad == as_stored(bad) | {
        "success": False,
        "code": "BMCP003E",
        "error": "HTTP 502",
        "duration_ms": 3.0,
    }


async def test_completion_omits_empty_fields_like_to_dict(store: PostgresAuditStore) -> None:
    e = make_event(success=False, error="pending", duration_ms=1.0)
    await store.insert_many([e])
    await store.complete_many([Completion(e.id, True, "", None)])
    [got] = await everything(store)
    assert "error" not in got
    assert "duration_ms" not in got
    assert (got["success"], got["code"]) == (True, "BMCP003I")


async def test_later_completion_of_the_same_event_wins(store: PostgresAuditStore, dsn: str) -> None:
    e = make_event()
    await store.insert_many([e])
    await store.complete_many([Completion(e.id, True, "", 1.0), Completion(e.id, False, "late", 2.0)])
    [got] = await everything(store)
    assert (got["success"], got["error"], got["duration_ms"]) == (False, "late", 2.0)
    await store.complete_many([Completion(e.id, False, "later", 3.0)])
    [got] = await everything(store)
    assert (got["success"], got["error"], got["duration_ms"]) == (False, "later", 3.0)
    assert await raw_rows(dsn, f"SELECT error FROM {TABLE}") == [("later",)]


async def test_the_stored_json_is_the_event_as_recorded_and_the_columns_hold_the_outcome(
    store: PostgresAuditStore, dsn: str
) -> None:
    e = make_event()
    await store.insert_many([e])
    await store.complete_many([Completion(e.id, False, "HTTP 502", 3.0)])
    [(success, error, duration, text)] = await raw_rows(
        dsn, f"SELECT success, error, duration_ms, event FROM {TABLE}"
    )
    assert (success, error, duration) == (False, "HTTP 502", 3.0)
    assert orjson.loads(text) == as_stored(e)  # not rewritten: search merges the columns in
    [got] = await everything(store)
    assert got == as_stored(replace(e, success=False, error="HTTP 502", duration_ms=3.0))


async def test_rows_completed_by_an_earlier_version_read_the_same(
    store: PostgresAuditStore, dsn: str
) -> None:
    # Versions before 2026-11-22 rewrote the JSON on completion, as well as the columns.
    e = make_event()
    await store.insert_many([e])
    [(text,)] = await raw_rows(dsn, f"SELECT event FROM {TABLE}")
    old = store_module._completed_json(text, False, "boom", 7.0)
    async with sql(dsn) as conn:
        await conn.execute(
            f"UPDATE {TABLE} SET success = false, error = 'boom', duration_ms = 7.0, event = $1", old
        )
    [got] = await everything(store)
    assert list(got.items()) == list(orjson.loads(old).items())
    await store.complete_many([Completion(e.id, True, "", 1.0)])  # and completing it again still works
    [got] = await everything(store)
    assert got == as_stored(replace(e, success=True, duration_ms=1.0))


async def test_write_batch_inserts_then_completes_in_one_transaction(
    store: PostgresAuditStore, dsn: str
) -> None:
    old, new = make_event(), make_event()
    await store.insert_many([old])
    await store.write_batch([new], [Completion(old.id, True, "", 1.0), Completion(new.id, False, "x", 2.0)])
    got = {g["id"]: g for g in await everything(store)}
    assert (got[old.id]["success"], got[old.id]["duration_ms"]) == (True, 1.0)
    assert (got[new.id]["success"], got[new.id]["error"], got[new.id]["duration_ms"]) == (False, "x", 2.0)
    await store.write_batch([], [])  # a no-op
    # All or nothing: a failing completion undoes the inserts of the same batch.
    async with sql(dsn) as conn:
        await conn.execute(
            "CREATE FUNCTION nope() RETURNS trigger"
            " AS $$ BEGIN RAISE EXCEPTION 'nope'; END $$ LANGUAGE plpgsql"
        )
        await conn.execute(
            f"CREATE TRIGGER no_updates BEFORE UPDATE ON {TABLE} FOR EACH ROW EXECUTE FUNCTION nope()"
        )
    lost = make_event()
    with pytest.raises(BackendError, match="cannot write"):
        await store.write_batch([lost], [Completion(old.id, False, "y", 3.0)])
    assert lost.id not in {g["id"] for g in await everything(store)}


async def test_completion_of_an_unknown_event_is_ignored(store: PostgresAuditStore) -> None:
    await store.complete_many([Completion("no-such-event", True, "", 1.0)])
    assert await everything(store) == []


async def test_completion_by_another_instance(dsn: str) -> None:
    # One process records, another completes (several bastions, one database).
    e = make_event()
    a, b = await PostgresAuditStore.open(dsn), await PostgresAuditStore.open(dsn)
    try:
        await a.insert_many([e])
        await b.complete_many([Completion(e.id, False, "HTTP 500", 4.0)])
        assert await a.search(AuditQuery()) == [
            as_stored(e) | {"success": False, "code": "BMCP003E", "error": "HTTP 500", "duration_ms": 4.0}
        ]
    finally:
        await a.close()
        await b.close()


async def test_concurrent_completers_do_not_deadlock(dsn: str) -> None:
    events = [make_event() for _ in range(40)]
    a, b = await PostgresAuditStore.open(dsn), await PostgresAuditStore.open(dsn)
    try:
        await a.insert_many(events)
        forward = [Completion(e.id, True, "", 1.0) for e in events]
        await asyncio.wait_for(
            asyncio.gather(*(s.complete_many(batch) for s, batch in [(a, forward), (b, forward[::-1])] * 5)),
            timeout=30,
        )
        assert [g["duration_ms"] for g in await a.search(AuditQuery())] == [1.0] * 40
    finally:
        await a.close()
        await b.close()


# ------------------------------------------------------------------ search


@pytest.fixture
async def populated(store: PostgresAuditStore) -> list[AuditEvent]:
    events = [
        make_event(at=10, user="alice", app="files", session_id="s1"),
        make_event(at=20, user="bob", app="files", session_id="s2", type=SESSION_START),
        make_event(at=30, user="alice", app="git", session_id="s3"),
        make_event(at=40, user="alice", app="files", session_id="s1", type=NOTIFICATION),
        make_event(at=50, user="bob", app="git", session_id="s4", type=SESSION_END),
    ]
    # Inserted out of time order: results are ordered by event time.
    await store.insert_many(events[3:])
    await store.insert_many(events[:3])
    return events


async def search_times(store: PostgresAuditStore, **filters: Any) -> list[int]:
    got = await store.search(AuditQuery(**filters))
    return [round((datetime.fromisoformat(g["time"]) - T0).total_seconds()) for g in got]


async def test_search_everything_oldest_first(store: PostgresAuditStore, populated: list[AuditEvent]) -> None:
    assert await search_times(store) == [10, 20, 30, 40, 50]
    assert await store.search(AuditQuery()) == [as_stored(e) for e in populated]


async def test_search_same_time_is_insertion_order(store: PostgresAuditStore) -> None:
    events = [make_event(at=5, tool=f"t{i}") for i in range(4)]
    await store.insert_many(events[2:])
    await store.insert_many(events[:2])
    assert [g["tool"] for g in await everything(store)] == ["t2", "t3", "t0", "t1"]


async def test_search_time_range_is_since_inclusive_until_exclusive(
    store: PostgresAuditStore, populated: list[AuditEvent]
) -> None:
    def at(seconds: int) -> datetime:
        return T0 + timedelta(seconds=seconds)

    assert await search_times(store, since=at(20)) == [20, 30, 40, 50]
    assert await search_times(store, until=at(40)) == [10, 20, 30]
    assert await search_times(store, since=at(20), until=at(40)) == [20, 30]
    assert await search_times(store, since=at(21), until=at(29)) == []
    assert await search_times(store, since=at(30).replace(tzinfo=None)) == [30, 40, 50]
    plus2 = timezone(timedelta(hours=2))
    assert await search_times(store, since=at(30).astimezone(plus2), until=at(31).astimezone(plus2)) == [30]


async def test_search_filters(store: PostgresAuditStore, populated: list[AuditEvent]) -> None:
    assert await search_times(store, user="alice") == [10, 30, 40]
    assert await search_times(store, app="git") == [30, 50]
    assert await search_times(store, session_id="s1") == [10, 40]
    assert await search_times(store, types=(SESSION_START, SESSION_END)) == [20, 50]
    assert await search_times(store, types=(REQUEST,), user="alice", app="files") == [10]
    assert await search_times(store, user="nobody") == []
    assert await search_times(store, user=None, app="", session_id=None) == [10, 20, 30, 40, 50]
    assert await search_times(store, user="alice", since=T0 + timedelta(seconds=15), limit=1) == [30]


async def test_search_limit(store: PostgresAuditStore, populated: list[AuditEvent]) -> None:
    assert await search_times(store, limit=2) == [10, 20]
    assert await search_times(store, limit=1, since=T0 + timedelta(seconds=35)) == [40]


async def test_search_newest_first_takes_the_newest(
    store: PostgresAuditStore, populated: list[AuditEvent]
) -> None:
    assert await search_times(store, order="desc") == [50, 40, 30, 20, 10]
    assert await search_times(store, order="desc", limit=2) == [50, 40]
    assert await search_times(store, order="desc", limit=2, user="alice") == [40, 30]
    assert await search_times(store, order="desc", limit=1, until=T0 + timedelta(seconds=35)) == [30]
    assert await store.search(AuditQuery(order="desc")) == [as_stored(e) for e in reversed(populated)]


async def test_search_newest_first_same_time_is_reverse_insertion_order(store: PostgresAuditStore) -> None:
    events = [make_event(at=5, tool=f"t{i}") for i in range(4)]
    await store.insert_many(events[2:])
    await store.insert_many(events[:2])
    got = await store.search(AuditQuery(order="desc", limit=3))
    assert [g["tool"] for g in got] == ["t1", "t0", "t3"]


async def test_search_sees_completions(store: PostgresAuditStore, populated: list[AuditEvent]) -> None:
    await store.complete_many([Completion(populated[0].id, False, "denied", 0.5)])
    [got] = await store.search(AuditQuery(until=T0 + timedelta(seconds=11)))
    assert (got["success"], got["error"], got["code"]) == (False, "denied", "BMCP003E")


async def test_search_filter_values_are_data_not_sql(store: PostgresAuditStore) -> None:
    await store.insert_many([make_event(user="o'brien"), make_event(user="%")])
    assert len(await store.search(AuditQuery(user="o'brien"))) == 1
    assert len(await store.search(AuditQuery(user="%"))) == 1
    assert await store.search(AuditQuery(user="' OR 1=1 --")) == []


# ------------------------------------------------------------------ secrets


async def test_secrets_never_reach_the_table(store: PostgresAuditStore, dsn: str) -> None:
    secrets = ["hunter2-pw", "tok-abc123", "sk-live-key", "Bearer eyJhbGciOi", "sid=cookie-val", "apikey-777"]
    redact = Redactor()
    params = {
        "name": "deploy",
        "arguments": {
            "db": {"url": "postgres://db", "password": secrets[0]},
            "steps": [{"run": "echo hi", "env": {"GITHUB_TOKEN": secrets[1]}}],
            "stripeSecretKey": secrets[2],
        },
    }
    headers = {"Authorization": secrets[3], "Cookie": secrets[4], "X-API-Key": secrets[5], "Accept": "*/*"}
    e = make_event(params=redact(params), headers=redact_headers(headers))
    await store.insert_many([e])
    await store.complete_many([Completion(e.id, True, "", 5.0)])
    [got] = await everything(store)
    assert got["params"]["arguments"]["db"] == {"url": "postgres://db", "password": REDACTED}
    assert got["headers"]["Authorization"] == REDACTED
    table = "".join(str(r) for r in await raw_rows(dsn, f"SELECT * FROM {TABLE}"))
    assert "postgres://db" in table  # the data is there...
    for secret in secrets:
        assert secret not in table  # ...the secrets are not


# ------------------------------------------------------------------ failures


async def test_postgres_failures_become_backend_errors(
    store: PostgresAuditStore, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with sql(dsn) as conn:
        await conn.execute(f"DROP TABLE {TABLE}")
    missing = f'relation "{TABLE}" does not exist'
    for action, call in (
        ("insert", lambda: store.insert_many([make_event()])),
        ("complete", lambda: store.complete_many([Completion("x", True)])),
        ("search", lambda: store.search(AuditQuery())),
    ):
        # The error names the component; the detail is logged.
        with pytest.raises(BackendError, match=rf"the audit database failed \(cannot {action}\)"):
            await call()
        assert f"the audit database: cannot {action}: {missing}" in caplog.text


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_unreachable_database_is_a_clear_error_without_the_password() -> None:
    dsn = f"postgresql://bastion:{PASSWORD}@127.0.0.1:{closed_port()}/audit"
    with pytest.raises(BackendError, match="the audit database is unreachable") as info:
        await PostgresAuditStore.open(dsn)
    assert PASSWORD not in str(info.value)
    assert info.value.origin == "gateway"


async def test_outage_then_recovery_without_reopening(dsn: str) -> None:
    async with TcpProxy.for_dsn(dsn) as proxy:
        through = proxy.dsn(dsn).replace("//postgres@", f"//postgres:{PASSWORD}@", 1)
        s = await PostgresAuditStore.open(through)
        try:
            e = make_event()
            await s.insert_many([e])
            await proxy.cut()
            for call in (
                lambda: s.insert_many([make_event()]),
                lambda: s.complete_many([Completion(e.id, False, "x", 1.0)]),
                lambda: s.search(AuditQuery()),
            ):
                with pytest.raises(BackendError, match="the audit database is unreachable") as info:
                    await call()
                assert PASSWORD not in str(info.value)
            await proxy.restore()
            await s.complete_many([Completion(e.id, False, "after", 1.0)])
            [got] = await s.search(AuditQuery())
            assert (got["id"], got["error"]) == (e.id, "after")
        finally:
            await s.close()


async def test_pooled_connections_killed_while_idle_are_replaced(store: PostgresAuditStore, dsn: str) -> None:
    e = make_event()
    await store.insert_many([e])
    server = dsn.rsplit("/", 1)[0] + "/postgres"
    async with sql(server) as conn:
        killed = await conn.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = $1 AND application_name = 'bastion-audit'",
            dsn.rsplit("/", 1)[1],
        )
    assert killed and all(row[0] for row in killed)
    # No error: the dead connection is replaced, the batch run on a new one.
    await store.complete_many([Completion(e.id, False, "after", 1.0)])
    [got] = await store.search(AuditQuery())
    assert (got["id"], got["error"]) == (e.id, "after")
