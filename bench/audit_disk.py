"""Disk cost of the audit log per million events, and the share of its seals (decision 0032).

Writes ``--calls`` tools/call events (shaped like ``bench/audit_micro.py``'s: the same fields,
redacted headers and params) through ``AuditLog``, ``--concurrency`` callers at once, each event
completed after one loop iteration, into a fresh ``SQLiteAuditStore`` (and, with ``--dsn``, a
``PostgresAuditStore`` in a database made for the run and dropped after); then reports bytes per
million events: the whole store, the events with their indexes, the seals.

    .venv/bin/python bench/audit_disk.py --calls 200000
    .venv/bin/python bench/audit_disk.py --calls 100000 --dsn postgresql://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bastion.audit.chain import signer_of
from bastion.audit.emitter import AuditLog
from bastion.audit.events import REQUEST, AuditEvent
from bastion.audit.redact import redact_headers
from bastion.audit.store import AuditStore


def _key() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _event(sid: str, headers: dict[str, str], rid: int) -> AuditEvent:
    return AuditEvent(
        id=uuid.uuid4().hex,
        type=REQUEST,
        time=datetime.now(UTC),
        success=True,
        cluster_name="bench-cluster",
        user="bench",
        app="bench-http",
        session_id=sid,
        roles=("mcp-user",),
        app_uri="http://127.0.0.1:38811/mcp",
        upstream_session_id=secrets.token_hex(16),
        method="tools/call",
        request_id=rid,
        tool="echo",
        params={"name": "echo", "arguments": {"message": "hello from wrk"}},
        client_info="bench-client/1.0",
        server_info="bench-upstream/0.1",
        protocol_version="2025-06-18",
        transport="http",
        remote_addr="127.0.0.1",
        headers=headers,
    )


async def _drive(store: AuditStore, calls: int, concurrency: int) -> None:
    log = AuditLog(store)

    async def caller(n: int) -> None:
        sid = secrets.token_hex(16)
        headers = redact_headers(
            {
                "content-type": "application/json",
                "accept": "application/json, text/event-stream",
                "mcp-protocol-version": "2025-06-18",
                "mcp-session-id": sid,
                "authorization": "Bearer " + secrets.token_urlsafe(300),
            }
        )
        for rid in range(calls // concurrency):
            event = _event(sid, headers, rid)
            await log.record(event)
            await asyncio.sleep(0)
            log.complete(event.id, True, "", 0.42)

    await asyncio.gather(*(caller(n) for n in range(concurrency)))
    await log.close()


async def _sqlite(args: argparse.Namespace) -> dict[str, Any]:
    import sqlite3

    from bastion.audit.sqlite_store import SQLiteAuditStore

    with tempfile.TemporaryDirectory(prefix="audit-disk-") as tmp:
        store = await SQLiteAuditStore.open(tmp, signer=signer_of(_key()))
        await _drive(store, args.calls, args.concurrency)
        await store.close()
        conn = sqlite3.connect(Path(tmp) / "audit.db")
        try:
            conn.execute("VACUUM")  # pages as a long-lived log settles, not the WAL's leftovers
            rows = conn.execute("SELECT count(*) FROM audit_events").fetchone()[0]
            sizes = dict(conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name").fetchall())
            seals = conn.execute("SELECT count(*) FROM audit_seals").fetchone()[0]
        finally:
            conn.close()
        total = (Path(tmp) / "audit.db").stat().st_size
    seal_bytes = sum(v for k, v in sizes.items() if k.startswith("audit_seals"))
    per_m = 1_000_000 / rows
    return {
        "store": "sqlite",
        "events": rows,
        "seals": seals,
        "MB_per_million_events": round(total * per_m / 1e6, 1),
        "seal_MB_per_million_events": round(seal_bytes * per_m / 1e6, 1),
    }


async def _postgres(args: argparse.Namespace) -> dict[str, Any]:
    import asyncpg

    from bastion.audit.pg_store import SEALS, TABLE, PostgresAuditStore

    name = f"bastion_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(args.dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = args.dsn.rsplit("/", 1)[0] + "/" + name
    try:
        store = await PostgresAuditStore.open(dsn, signer=signer_of(_key()))
        await _drive(store, args.calls, args.concurrency)
        await store.close()
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f"VACUUM FULL {TABLE}")
            await conn.execute(f"VACUUM FULL {SEALS}")
            rows = await conn.fetchval(f"SELECT count(*) FROM {TABLE}")
            events = await conn.fetchval(f"SELECT pg_total_relation_size('{TABLE}')")
            seal_bytes = await conn.fetchval(f"SELECT pg_total_relation_size('{SEALS}')")
            seals = await conn.fetchval(f"SELECT count(*) FROM {SEALS}")
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()
    per_m = 1_000_000 / rows
    return {
        "store": "postgres",
        "events": rows,
        "seals": seals,
        "MB_per_million_events": round((events + seal_bytes) * per_m / 1e6, 1),
        "seal_MB_per_million_events": round(seal_bytes * per_m / 1e6, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--dsn", default="", help="also measure PostgreSQL (a database is made and dropped)")
    args = ap.parse_args()
    print(json.dumps(asyncio.run(_sqlite(args))))
    if args.dsn:
        print(json.dumps(asyncio.run(_postgres(args))))


if __name__ == "__main__":
    main()
