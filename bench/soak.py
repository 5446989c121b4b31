"""The soak (issue 21): many live sessions, calls for minutes, and whether anything degrades.

One node (SQLite, the default store) with the benchmark's HTTP upstream; ``--sessions`` MCP
sessions opened through the proxy (default 1,000), then for ``--minutes`` (default 10)
``--workers`` (default 32, one keep-alive connection each) send ``tools/call`` round robin over
every session at ``--rate`` calls/s in all (default 1,000), so each session stays live.  Every
answer is checked (HTTP 200 and a JSON-RPC result); the gateway's resident memory is sampled
every 10 s.  At the end the sessions are closed and the audit log is counted: every call
answered OK must have its row, with an outcome.

    .venv/bin/python bench/soak.py                       # 1,000 sessions, 10 minutes
    .venv/bin/python bench/soak.py --minutes 1 --sessions 200

Prints one JSON document: calls, errors (and the first few), calls/s, memory samples (MiB) with
the first, last and largest, and the audit check.  Figures go into docs/reliability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mcp_client as mc
import run


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def soak(
    target: mc.Target, sids: list[str], workers: int, seconds: float, pid: int, rate: float
) -> dict[str, Any]:
    ok = 0
    errors: list[str] = []
    samples: list[tuple[float, float]] = []
    turn = itertools.cycle(sids)
    end = time.monotonic() + seconds
    start = time.monotonic()

    async def worker(w: int) -> None:
        nonlocal ok
        conn = await mc.AsyncConn.open(target)
        rid = w * 10_000_000
        every = workers / rate if rate > 0 else 0.0  # this worker's share of the rate
        due = time.monotonic()
        try:
            while time.monotonic() < end:
                if every:
                    due += every
                    if due > time.monotonic():
                        await asyncio.sleep(due - time.monotonic())  # pacing the load
                sid = next(turn)
                rid += 1
                try:
                    r = await conn.request("POST", target.headers(sid), mc.call_body(rid, f"soak {rid}"))
                    msg = mc.rpc_body(r)
                    if r.status == 200 and msg and "result" in msg:
                        ok += 1
                        continue
                    errors.append(f"{r.status} {r.body[:200]!r}")
                except (ConnectionError, OSError) as e:
                    errors.append(f"{type(e).__name__}: {e}")
                    conn.close()
                    conn = await mc.AsyncConn.open(target)
        finally:
            conn.close()

    async def sampler() -> None:
        while time.monotonic() < end:
            samples.append((round(time.monotonic() - start, 1), round(rss_mib(pid), 1)))
            await asyncio.sleep(10)  # a sampling period, not a wait for a condition

    await asyncio.gather(sampler(), *(worker(w) for w in range(workers)))
    wall = time.monotonic() - start
    mem = [m for _, m in samples]
    return {
        "calls_ok": ok,
        "errors": len(errors),
        "first_errors": errors[:5],
        "calls_per_s": round(ok / wall, 1),
        "wall_s": round(wall, 1),
        "rss_mib": {"first": mem[0], "last": mem[-1], "max": max(mem), "samples": samples},
    }


def audit_check(data_dir: Path, calls_ok: int) -> dict[str, Any]:
    """Rows of tools/call in the audit index (the gateway flushed it when it stopped)."""
    db = sqlite3.connect(f"file:{data_dir / 'audit.db'}?mode=ro", uri=True)
    try:
        total, done = db.execute(
            "SELECT count(*), sum(duration_ms IS NOT NULL) FROM audit_events"
            " WHERE type = 'mcp.session.request' AND tool = 'echo'"
        ).fetchone()
    finally:
        db.close()
    return {"rows": total, "rows_with_outcome": done, "calls_answered_ok": calls_ok}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=32)
    ap.add_argument(
        "--rate", type=float, default=1000.0, help="calls per second in all (0: as fast as possible)"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bastion-soak-") as tmp_s:
        tmp = Path(tmp_s)
        procs = run.Procs(tmp)
        try:
            up = procs.start(
                "upstream-http", [run.PY, str(run.BENCH / "upstream_http.py")], core=run.LOAD_CORE, stdout=-1
            )
            assert up.stdout is not None
            http_port = int(up.stdout.readline())
            pid, base, token, ctx, data_dir = run.start_bastion(procs, tmp, http_port)
            target = mc.Target(f"{base}/mcp/apps/bench-http", token=token, ssl_ctx=ctx)
            opened = time.monotonic()
            sids = mc.open_idle_sessions(target, args.sessions, concurrency=16)
            result: dict[str, Any] = {
                "sessions": len(sids),
                "open_s": round(time.monotonic() - opened, 1),
                "rss_mib_idle": round(rss_mib(pid), 1),
            }
            result |= mc.run_async(soak(target, sids, args.workers, args.minutes * 60, pid, args.rate))
            result["closed"] = mc.close_sessions(target, sids)
        finally:
            procs.stop_all()
        result["audit"] = audit_check(data_dir, result.get("calls_ok", 0))
    print(json.dumps(result, indent=2))
    a = result["audit"]
    good = (
        result["errors"] == 0 and a["rows"] >= a["calls_answered_ok"] and a["rows"] == a["rows_with_outcome"]
    )
    return 0 if good else 1


if __name__ == "__main__":
    raise SystemExit(main())
