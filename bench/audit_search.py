"""`bastion audit search` over a million events, and the spool's drain rate (issue 21, item 6).

Search: builds a scratch data directory whose ``audit.db`` holds ``--events`` (default 1,000,000)
request events, written straight into the index in bulk (the schema ``SQLiteAuditStore.open``
made; rows as ``store.event_row`` makes them: 100 users, 10 apps, 50 tools, 2% failed, spread
over 30 days), then times the queries the CLI sends (``sqlite_store.search_files``, the data-dir
path: a new read-only connection each, the journal merged in), and streams every event of one
filter and of the whole log (``search_pages_files``) measuring the peak RSS it adds.

Spool (``--spool``, needs PostgreSQL at ``$BASTION_TEST_PG_DSN`` or the local default): spools
``--calls`` calls as the gateway would during an outage (an insert batch and a completion batch
per call), then times the drain into a fresh database, batched (this version) and one spooled
batch per transaction (as before: ``DRAIN_ITEMS = 1``).

    .venv/bin/python bench/audit_search.py
    .venv/bin/python bench/audit_search.py --events 200000 --spool --calls 20000
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bastion.audit import spool as spool_mod
from bastion.audit.events import REQUEST, AuditEvent
from bastion.audit.sqlite_store import AUDIT_DB_NAME, SQLiteAuditStore, search_files, search_pages_files
from bastion.audit.store import AuditQuery, Completion, event_row

NOW = datetime.now(UTC)


def event(i: int, rng: random.Random) -> tuple[AuditEvent, bool]:
    failed = rng.random() < 0.02
    tool = f"tool_{rng.randrange(50)}"
    return (
        AuditEvent(
            id=uuid.UUID(int=rng.getrandbits(128)).hex,
            type=REQUEST,
            time=NOW - timedelta(seconds=30 * 86400 * (1 - i / 1_000_000)),
            success=not failed,
            cluster_name="bench",
            user=f"user{rng.randrange(100)}",
            app=f"app{rng.randrange(10)}",
            session_id=uuid.UUID(int=rng.getrandbits(128)).hex,
            roles=("access",),
            method="tools/call",
            request_id=i,
            tool=tool,
            params={"name": tool, "arguments": {"path": f"/srv/data/{i}.txt", "limit": 100}},
            error="upstream error: boom" if failed else "",
            duration_ms=round(rng.random() * 50, 3),
            transport="http",
            remote_addr="10.0.0.7",
            headers={"user-agent": "bench/1.0", "accept": "application/json, text/event-stream"},
        ),
        failed,
    )


async def build(data: Path, n: int) -> None:
    store = await SQLiteAuditStore.open(data)  # the schema, as a gateway makes it
    await store.close()
    conn = sqlite3.connect(data / AUDIT_DB_NAME)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = OFF")
    rng = random.Random(7)
    started = time.perf_counter()
    chunk = 50_000
    for k in range(0, n, chunk):
        rows = []
        for i in range(k, min(n, k + chunk)):
            ev, _ = event(i, rng)
            rows.append((*event_row(ev), ev.tool, i + 1))
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO audit_events (id, time_us, type, user, app, session_id, success, error,"
            " duration_ms, event, tool, rev) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("ANALYZE")
    conn.close()
    size = (data / AUDIT_DB_NAME).stat().st_size
    print(f"built {n:,} events in {time.perf_counter() - started:.0f} s ({size / 1e6:,.0f} MB)")


QUERIES: list[tuple[str, dict[str, Any]]] = [
    ("(no filter)", {}),
    ("--type=mcp.session.request --user=user7", {"types": (REQUEST,), "user": "user7"}),
    ("--tool=tool_3", {"tool": "tool_3"}),
    ("--outcome=failure", {"outcome": "failure"}),
    ("--app=app2 --tool=tool_5 --outcome=failure", {"app": "app2", "tool": "tool_5", "outcome": "failure"}),
    ("--user=user7 --since=1h", {"user": "user7", "since": NOW - timedelta(hours=1)}),
    ("--user=user7 --order=asc", {"user": "user7", "order": "asc"}),
]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def searches(data: Path, runs: int) -> None:
    print("\nquery (default --limit 1000, newest first unless said)      median s   max s   events")
    for label, kw in QUERIES:
        times, found = [], 0
        kw = dict(kw)
        order = kw.pop("order", "desc")
        for _ in range(runs):
            t = time.perf_counter()
            found = len(await search_files(data, AuditQuery(limit=1000, order=order, **kw)))
            times.append(time.perf_counter() - t)
        print(f"  {label:58s} {statistics.median(times):7.3f} {max(times):7.3f}  {found:7,}")
    for label, kw in (("--all --user=user7", {"user": "user7"}), ("--all (every event)", {})):
        before = rss_mb()
        t = time.perf_counter()
        n = 0
        async for page in search_pages_files(data, AuditQuery(limit=0, **kw)):
            n += len(page)
        took = time.perf_counter() - t
        print(
            f"  {label:58s} {took:7.3f}          {n:7,}  ({n / took:,.0f} events/s; "
            f"peak RSS +{rss_mb() - before:.0f} MB)"
        )


async def drain(calls: int) -> None:
    from bastion.audit.pg_store import PostgresAuditStore
    from bastion.audit.spool import SpoolingAuditStore

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.pg import fresh_database

    rng = random.Random(3)
    print(f"\nspool drain, {calls:,} calls spooled (an insert and a completion each)")
    for label, items in (("batched (this version)", spool_mod.DRAIN_ITEMS), ("one batch at a time", 1)):
        async with fresh_database() as dsn:
            primary = await PostgresAuditStore.open(dsn)
            with tempfile.TemporaryDirectory() as tmp:
                spool = SpoolingAuditStore(primary, Path(tmp) / "spool.db")
                batches = []
                for i in range(calls):
                    ev, failed = event(i, rng)
                    batches.append(("insert", [ev]))
                    batches.append(("complete", [Completion(ev.id, not failed, "", 1.0)]))
                from bastion.audit import codec

                spool._append(
                    [
                        (
                            kind,
                            [codec.event_to_wire(x) for x in xs]
                            if kind == "insert"
                            else [codec.completion_to_wire(x) for x in xs],
                        )  # type: ignore[arg-type]
                        for kind, xs in batches
                    ]
                )
                spool_mod.DRAIN_ITEMS = items
                t = time.perf_counter()
                spool.start()
                await spool.wait_drained()
                took = time.perf_counter() - t
                print(f"  {label:28s} {took:7.2f} s  {calls / took:9,.0f} calls/s")
                await spool.close()
    spool_mod.DRAIN_ITEMS = 4096


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--data", type=Path, help="reuse (or build once in) this directory")
    ap.add_argument("--spool", action="store_true", help="also measure the spool's drain (PostgreSQL)")
    ap.add_argument("--calls", type=int, default=20_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or Path(tmp) / "data"
        if not (data / AUDIT_DB_NAME).exists():
            await build(data, args.events)
        await searches(data, args.runs)
    if args.spool:
        await drain(args.calls)


if __name__ == "__main__":
    asyncio.run(main())
