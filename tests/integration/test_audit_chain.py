"""`bastion audit verify` on real gateways (decision 0032): tampering is found, retention keeps it verifiable.

On SQLite (the data directory) and PostgreSQL: an untouched log verifies; one byte edited in
one stored event, one row deleted, the last ten cut off each make `audit verify` exit 1 and name
the first bad event.  Retention (`audit.retention`) on a log with events older than the limit
removes them, and what is left verifies.  A gateway on PostgreSQL killed under load and
restarted leaves a log that verifies.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests import pg
from tests.integration.conftest import Node, start_node, stop_node
from tests.integration.test_failures import Client

DEMO = "app_service:\n  demo_server: true\n"


async def some_calls(node: Node, n: int = 30, *, add_user: bool = True) -> None:
    if add_user:
        node.cli("users", "add", "alice", "--roles=mcp-user", local=True)
    client = Client(node, "bastion-demo")
    try:
        await client.start()
        for _ in range(n):
            r = await client.call("bastion_user_info")
            assert r.status_code == 200, r.text
    finally:
        await client.aclose()


def verify(node: Node, *args: str) -> tuple[int, str]:
    r = node.cli("audit", "verify", *args, local=True, check=False)
    return r.returncode, r.stdout + r.stderr


def request_ids(node: Node) -> list[str]:
    """Ids of the audited tools/call requests, oldest first."""
    out = node.cli(
        "audit",
        "search",
        "--format=json",
        "--type=mcp.session.request",
        "--limit=100000",
        "--order=asc",
        local=True,
    ).stdout
    return [e["id"] for e in json.loads(out) if e.get("method") == "tools/call"]


def until(what: str, check: Callable[[], bool], deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {deadline}s")


# ------------------------------------------------------------------ SQLite


def db_sql(data: Path, statement: str, params: tuple[Any, ...] = ()) -> list[Any]:
    conn = sqlite3.connect(data / "audit.db")
    try:
        with conn:
            return conn.execute(statement, params).fetchall()
    finally:
        conn.close()


async def test_tampering_with_the_sqlite_log_is_named(tmp_path: Path) -> None:
    node = start_node(tmp_path, extra_config=DEMO)
    try:
        await some_calls(node)
        code, out = verify(node)  # while it runs
        assert code == 0, out
        ids = request_ids(node)
        # Through the web API, for users whose roles allow reading events.
        node.cli("users", "add", "ed", "--roles=editor", local=True)
        home = tmp_path / "remote-home"
        for user, want in (("ed", 0), ("alice", 1)):
            ident = tmp_path / f"{user}.id"
            node.cli("auth", "sign", f"--user={user}", f"--out={ident}", local=True)
            r = node.cli("audit", "verify", "--format=json", "-i", str(ident), home=home, check=False)
            assert r.returncode == want, r.stdout + r.stderr
            if want == 0:
                assert json.loads(r.stdout)["ok"] is True
            else:
                assert "may not list event" in r.stderr
    finally:
        stop_node(node)
    data = tmp_path / "data"
    code, out = verify(node)
    assert code == 0 and out.startswith("ok: "), out
    pristine = tmp_path / "audit.db.pristine"
    shutil.copy(data / "audit.db", pristine)

    def tampered(statement: str, params: tuple[Any, ...] = ()) -> tuple[int, str]:
        shutil.copy(pristine, data / "audit.db")
        db_sql(data, statement, params)
        return verify(node)

    # One byte of one stored event.
    code, out = tampered(
        'UPDATE audit_events SET event = replace(event, \'"tool":"bastion_user_info"\','
        ' \'"tool":"bastion_user_infp"\') WHERE id = ?',
        (ids[5],),
    )
    assert code == 1 and out.startswith(f"first bad event: {ids[5]}: "), out
    # One row deleted.
    code, out = tampered("DELETE FROM audit_events WHERE id = ?", (ids[17],))
    assert code == 1 and out.startswith(f"first bad event: {ids[17]}: "), out
    # The last ten cut off.
    last = [i for (i,) in db_sql(data, "SELECT id FROM audit_events ORDER BY seq DESC LIMIT 10")][::-1]
    code, out = tampered(f"DELETE FROM audit_events WHERE id IN ({','.join('?' * 10)})", tuple(last))
    assert code == 1 and out.startswith(f"first bad event: {last[0]}: "), out
    # ... with the seals that held them, and the closing seal.
    shutil.copy(pristine, data / "audit.db")
    first_cut = next(
        seq
        for seq, items in db_sql(data, "SELECT seq, items FROM audit_seals ORDER BY seq")
        if any(item[1] == last[0] for item in json.loads(items))
    )
    gone = [
        item[1]
        for (items,) in db_sql(data, "SELECT items FROM audit_seals WHERE seq >= ?", (first_cut,))
        for item in json.loads(items)
    ]
    db_sql(data, "DELETE FROM audit_seals WHERE seq >= ?", (first_cut,))
    db_sql(data, f"DELETE FROM audit_events WHERE id IN ({','.join('?' * len(gone))})", tuple(gone))
    code, out = verify(node)
    assert code == 1 and "closing seal" in out, out
    # Untouched again: verifies.
    shutil.copy(pristine, data / "audit.db")
    assert verify(node)[0] == 0


async def test_retention_prunes_old_events_and_the_rest_verifies(tmp_path: Path) -> None:
    node = start_node(tmp_path, extra_config=DEMO)
    stop_node(node)  # the cluster's keys exist now
    # Events from 2025, written with the cluster's JWT key signing their seals.
    from bastion.audit.chain import signer_of
    from bastion.audit.sqlite_store import SQLiteAuditStore
    from bastion.client.local import LocalAdmin
    from tests.unit.audit.test_store import make_event

    admin = await LocalAdmin.open(node.config)
    try:
        key = admin.auth.cas["jwt"].private_key_pem
    finally:
        await admin.close()
    then = int(datetime(2025, 1, 1, tzinfo=UTC).timestamp() * 1_000_000)
    store = await SQLiteAuditStore.open(tmp_path / "data", signer=signer_of(key), clock=lambda: then)
    old = [make_event(time=datetime(2025, 1, 1, tzinfo=UTC)) for _ in range(50)]
    await store.insert_many(old)
    await store.close()
    assert verify(node)[0] == 0

    node = start_node(tmp_path, extra_config=DEMO + "audit:\n  retention: 90d\n")
    try:
        await some_calls(node, 5)
        old_ids = {e.id for e in old}
        until(
            "old events pruned",
            lambda: not old_ids & {i for (i,) in db_sql(tmp_path / "data", "SELECT id FROM audit_events")},
        )
        assert len(request_ids(node)) == 5
        code, out = verify(node)
        assert code == 0, out
    finally:
        stop_node(node)
    code, out = verify(node)
    assert code == 0, out


# ------------------------------------------------------------------ PostgreSQL


@pytest.fixture
async def dsn() -> AsyncIterator[str]:
    async with pg.fresh_database() as database:
        yield database


async def pg_sql(dsn: str, statement: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(statement, *args))
    finally:
        await conn.close()


@pytest.mark.postgres
async def test_tampering_with_the_postgres_log_is_named(tmp_path: Path, dsn: str) -> None:
    auth = f"  backend:\n    type: postgres\n    dsn: {dsn}\n"
    node = start_node(tmp_path, extra_config=DEMO, auth_config=auth)
    try:
        await some_calls(node)
        ids = request_ids(node)
    finally:
        stop_node(node)
    code, out = verify(node)
    assert code == 0 and out.startswith("ok: "), out
    events = "bastion_audit_events"
    backup = "bastion_audit_events_pristine"
    await pg_sql(dsn, f"CREATE TABLE {backup} AS SELECT * FROM {events}")

    async def tampered(statement: str, *args: Any) -> tuple[int, str]:
        await pg_sql(dsn, f"DELETE FROM {events}")
        await pg_sql(dsn, f"INSERT INTO {events} OVERRIDING SYSTEM VALUE SELECT * FROM {backup}")
        await pg_sql(dsn, statement, *args)
        return await asyncio.to_thread(verify, node)

    code, out = await tampered(
        f"UPDATE {events} SET event = replace(event, 'bastion_user_info', 'bastion_user_infp') WHERE id = $1",
        ids[3],
    )
    assert code == 1 and out.startswith(f"first bad event: {ids[3]}: "), out
    code, out = await tampered(f"DELETE FROM {events} WHERE id = $1", ids[20])
    assert code == 1 and out.startswith(f"first bad event: {ids[20]}: "), out
    last = [r[0] for r in await pg_sql(dsn, f"SELECT id FROM {backup} ORDER BY seq DESC LIMIT 10")][::-1]
    code, out = await tampered(f"DELETE FROM {events} WHERE id = ANY($1::text[])", last)
    assert code == 1 and out.startswith(f"first bad event: {last[0]}: "), out
    code, out = await tampered("SELECT 1")
    assert code == 0, out


pytestmark = pytest.mark.timeout(240)


@pytest.mark.postgres
async def test_postgres_log_verifies_after_a_sigkill_under_load(tmp_path: Path, dsn: str) -> None:
    auth = f"  backend:\n    type: postgres\n    dsn: {dsn}\n"
    node = start_node(tmp_path, extra_config=DEMO, auth_config=auth)
    try:
        node.cli("users", "add", "alice", "--roles=mcp-user", local=True)
        client = Client(node, "bastion-demo")
        await client.start()
        answered = 0
        enough = asyncio.Event()

        async def caller() -> None:
            nonlocal answered
            while True:
                try:
                    r = await client.call("bastion_user_info")
                except Exception:  # the gateway is gone
                    return
                if r.status_code == 200:
                    answered += 1
                    if answered >= 300:
                        enough.set()

        callers = [asyncio.create_task(caller()) for _ in range(8)]
        async with asyncio.timeout(60):
            await enough.wait()
        node.proc.send_signal(signal.SIGKILL)  # mid-load: writes in flight
        node.proc.wait(timeout=10)
        async with asyncio.timeout(30):
            await asyncio.gather(*callers)
        await client.aclose()
        # Its chain is cut where the process died; that is no break (writers elsewhere may run).
        code, out = verify(node)
        assert code == 0, out
        node = start_node(tmp_path, extra_config=DEMO, auth_config=auth)
        await some_calls(node, 5, add_user=False)
        code, out = verify(node)
        assert code == 0, out
    finally:
        if node.proc.poll() is None:
            stop_node(node)
    code, out = verify(node)
    assert code == 0, out
