"""The audit log's CPU cost per tools/call, without the rest of the gateway.

Drives ``bastion.audit.emitter.AuditLog`` over a fresh ``SQLiteAuditStore`` the way the MCP
handler does for a ``tools/call``: ``await log.record(event)`` (the commit the forward waits for),
one loop iteration for the upstream round trip, then ``log.complete(...)``; ``--concurrency``
callers at once (default 16, one client session each), the process pinned to one core (default
0).  Events look like the benchmark's calls through the gateway (same fields, headers, params,
and ids made like the session engine makes them).  Reports CPU time (``time.process_time``: every
thread of the process, so SQLite checkpoints in worker threads count) per call, wall calls/s, and
the p50/p99 of ``record``'s wait.

Variants, each run in its own process on a fresh file, interleaved, medians of ``--runs``:

- ``none``: the callers alone (events built, a resolved future awaited): the floor;
- ``current``: the working tree's ``bastion``;
- ``ref``: the ``bastion`` package of a git revision (``--ref``, default HEAD), extracted with
  ``git archive`` into a temporary directory (so before/after compare in the same session).

    .venv/bin/python bench/audit_micro.py                      # none, ref=HEAD, current; 3 runs
    .venv/bin/python bench/audit_micro.py --variants current --runs 5 --calls 200000
    .venv/bin/python bench/audit_micro.py --ref d1a2d55 --json out.json

"Audit µs/call" is a variant's CPU µs per call minus the median of ``none``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- the child (one measurement)


def _child(args: argparse.Namespace) -> dict[str, Any]:
    import asyncio
    import importlib.util
    import secrets
    from dataclasses import MISSING, fields
    from datetime import UTC, datetime

    from bastion.audit.emitter import AuditLog
    from bastion.audit.events import REQUEST, AuditEvent
    from bastion.audit.redact import redact_headers
    from bastion.audit.sqlite_store import SQLiteAuditStore

    # The gateway runs on uvloop where it can.
    uvloop: Any = importlib.import_module("uvloop") if importlib.util.find_spec("uvloop") else None

    # Event ids as bastion.session.engine._EventIds makes them: a random base per session, a counter.
    class Ids:
        def __init__(self) -> None:
            self.base = (
                int.from_bytes(os.urandom(16), "big") & ~0xFFFFFFFF & ~(0xF << 76) & ~(0x3 << 62)
            ) | ((0x4 << 76) | (0x2 << 62))
            self.n = 0

        def next(self) -> str:
            self.n += 1
            if args.ids == "ordered":
                # Time-ordered (uuid7-like: milliseconds first), same uuid4 bits otherwise.
                return f"{time.time_ns() // 1_000_000:012x}{(self.base + self.n) & ((1 << 80) - 1):020x}"
            return f"{self.base + self.n:032x}"

    template = {f.name: (None if f.default is MISSING else f.default) for f in fields(AuditEvent)}
    factories = tuple(
        (f.name, f.default_factory) for f in fields(AuditEvent) if f.default_factory is not MISSING
    )
    fast = "__slots__" not in vars(AuditEvent) and not hasattr(AuditEvent, "__post_init__")

    def session_base(n: int) -> tuple[dict[str, Any], dict[str, str], Ids]:
        sid = f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(16)}"
        base = dict(template)
        base.update(
            cluster_name="bench-cluster",
            user="bench",
            app="bench-http",
            session_id=sid,
            roles=("mcp-user",),
            app_uri="http://127.0.0.1:38811/mcp",
            upstream_session_id=secrets.token_hex(16),
            client_info="bench-client/1.0",
            server_info="bench-upstream/0.1",
            protocol_version="2025-06-18",
            transport="http",
            remote_addr="127.0.0.1",
        )
        headers = redact_headers(
            {
                "content-type": "application/json",
                "accept": "application/json, text/event-stream",
                "mcp-protocol-version": "2025-06-18",
                "mcp-session-id": sid,
                "authorization": "Bearer " + secrets.token_urlsafe(300),
            }
        )
        return base, headers, Ids()

    def make_event(base: dict[str, Any], headers: dict[str, str], ids: Ids, rid: int) -> AuditEvent:
        # What Session._event does for a tools/call.
        values = base.copy()
        for name, factory in factories:
            values[name] = factory()
        values["id"] = ids.next()
        values["headers"] = headers
        values["type"] = REQUEST
        values["time"] = datetime.now(UTC)
        values["success"] = True
        values["method"] = "tools/call"
        values["request_id"] = rid
        values["params"] = {"name": "echo", "arguments": {"message": "hello from wrk"}}
        values["tool"] = "echo"
        if fast:
            event = object.__new__(AuditEvent)
            object.__setattr__(event, "__dict__", values)
            return event
        return AuditEvent(**values)

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        tmp = tempfile.mkdtemp(prefix="audit-micro-")
        log: Any = None
        store: Any = None
        if args.variant != "none":
            store = await SQLiteAuditStore.open(tmp)
            log = AuditLog(store)
        per_caller = args.calls // args.concurrency
        waits: list[int] = []

        sessions = [session_base(n) for n in range(args.sessions)]

        async def caller(n: int, count: int, sample: bool) -> None:
            base, headers, ids = sessions[n % len(sessions)]
            for rid in range(count):
                event = make_event(base, headers, ids, rid)
                t0 = time.perf_counter_ns()
                if log is not None:
                    await log.record(event)
                else:
                    fut = loop.create_future()
                    loop.call_soon(fut.set_result, None)
                    await fut
                if sample:
                    waits.append(time.perf_counter_ns() - t0)
                await asyncio.sleep(0)  # the upstream round trip: at least one loop iteration
                if log is not None:
                    log.complete(event.id, True, "", 0.42)

        # Warm-up (not measured): fills caches, creates the writer and the WAL.
        await asyncio.gather(*(caller(n, 200, False) for n in range(args.concurrency)))
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(caller(n, per_caller, n == 0) for n in range(args.concurrency)))
        if log is not None:
            # Everything queued is written before the clock stops (but not the store's close).
            await log.close()
            flush = getattr(store, "flush", None)
            if flush is not None:
                await flush()  # a journaling store: indexing what is journaled is part of the cost
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        calls = per_caller * args.concurrency
        out: dict[str, Any] = {
            "variant": args.variant,
            "calls": calls,
            "cpu_us_per_call": cpu / calls * 1e6,
            "calls_per_s": calls / wall,
            "record_wait_p50_us": statistics.median(waits) / 1000,
            "record_wait_p99_us": sorted(waits)[int(len(waits) * 0.99)] / 1000,
        }
        if store is not None:
            wal = Path(tmp) / "audit.db-wal"
            out["wal_mib_end"] = (wal.stat().st_size if wal.exists() else 0) / (1 << 20)
            await store.close()
            # The result must be right, not only fast: every call stored once, completed.
            import sqlite3

            conn = sqlite3.connect(Path(tmp) / "audit.db")
            try:
                out["rows"], out["completed"] = conn.execute(
                    "SELECT count(*), sum(duration_ms IS NOT NULL) FROM audit_events"
                ).fetchone()
            finally:
                conn.close()
            out["rows_expected"] = calls + 200 * args.concurrency
        for p in Path(tmp).iterdir():
            p.unlink()
        os.rmdir(tmp)
        return out

    if uvloop is not None and not args.asyncio:
        result: dict[str, Any] = uvloop.run(main())
        return result
    return asyncio.run(main())


# ---------------------------------------------------------------- the parent (runs and medians)


def _ref_tree(ref: str, where: Path) -> Path:
    """``src/bastion`` of git revision ``ref``, extracted under ``where``; returns the ``src`` dir."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "src/bastion"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return where / "src"


def _run_one(variant: str, args: argparse.Namespace, ref_src: Path | None) -> dict[str, Any]:
    env = dict(os.environ)
    src = ref_src if variant == "ref" else ROOT / "src"
    env["PYTHONPATH"] = str(src)
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--variant",
        variant,
        "--calls",
        str(args.calls),
        "--concurrency",
        str(args.concurrency),
        "--sessions",
        str(args.sessions),
        "--ids",
        args.ids,
    ]
    if args.asyncio:
        cmd.append("--asyncio")
    if args.core >= 0:
        cmd = ["taskset", "-c", str(args.core), *cmd]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="none,ref,current", help="comma-separated: none, ref, current")
    ap.add_argument("--ref", default="HEAD", help="git revision for the 'ref' variant (default HEAD)")
    ap.add_argument("--runs", type=int, default=3, help="runs per variant, interleaved (default 3)")
    ap.add_argument("--calls", type=int, default=100_000, help="measured calls per run (default 100000)")
    ap.add_argument("--concurrency", type=int, default=16, help="concurrent callers (default 16)")
    ap.add_argument(
        "--sessions", type=int, default=16, help="client sessions the callers share (default 16: one each)"
    )
    ap.add_argument(
        "--ids",
        choices=("engine", "ordered"),
        default="engine",
        help="event ids as the session engine makes them (default), or time-ordered",
    )
    ap.add_argument("--core", type=int, default=0, help="CPU core to pin each run to (-1: none)")
    ap.add_argument("--asyncio", action="store_true", help="plain asyncio instead of uvloop")
    ap.add_argument("--json", type=Path, help="also write every run to this file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="current", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args)))
        return

    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in ("none", "ref", "current"):
            ap.error(f"unknown variant {v!r}")
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="audit-micro-ref-") as tmp:
        ref_src = _ref_tree(args.ref, Path(tmp)) if "ref" in variants else None
        for rep in range(args.runs):
            order = variants[rep % len(variants) :] + variants[: rep % len(variants)]
            for v in order:
                r = _run_one(v, args, ref_src)
                results[v].append(r)
                print(
                    f"run {rep + 1} {v:8} {r['cpu_us_per_call']:7.1f} µs CPU/call "
                    f"{r['calls_per_s']:9,.0f} calls/s  record wait p50 {r['record_wait_p50_us']:.0f} µs"
                    + (
                        f"  rows {r['rows']}/{r['rows_expected']} completed {r['completed']}"
                        f" WAL {r['wal_mib_end']:.1f} MiB"
                        if "rows" in r
                        else ""
                    ),
                    file=sys.stderr,
                    flush=True,
                )
    floor = statistics.median(r["cpu_us_per_call"] for r in results["none"]) if "none" in results else 0.0
    label = {"none": "none (callers only)", "ref": f"ref ({args.ref})", "current": "current (working tree)"}
    print(
        f"\naudit micro-benchmark: {args.calls:,} calls/run, concurrency {args.concurrency}, "
        f"{args.sessions} sessions, {args.ids} ids, core {args.core}, medians of {args.runs}"
    )
    print("| variant | CPU µs/call | audit µs/call | calls/s | record wait p50 / p99 µs |")
    print("|---|---:|---:|---:|---:|")
    for v in variants:
        rs = results[v]
        cpu = statistics.median(r["cpu_us_per_call"] for r in rs)
        print(
            f"| {label[v]} | {cpu:.1f} | {cpu - floor if v != 'none' else 0:.1f} | "
            f"{statistics.median(r['calls_per_s'] for r in rs):,.0f} | "
            f"{statistics.median(r['record_wait_p50_us'] for r in rs):.0f} / "
            f"{statistics.median(r['record_wait_p99_us'] for r in rs):.0f} |"
        )
        bad = [
            r for r in rs if "rows" in r and (r["rows"] != r["rows_expected"] or r["completed"] != r["rows"])
        ]
        if bad:
            print(f"  WARNING {v}: rows or completions missing in {len(bad)} run(s)")
    if args.json:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": results})
        )


if __name__ == "__main__":
    main()
