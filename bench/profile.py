"""Where the gateway's CPU goes per call: py-spy on ``bastion start`` under wrk load.

Starts the same set-up as ``run.py`` (HTTP echo upstream, a bastion cluster pinned to core 0,
apps bench-http and bench-stdio, user ``bench``), opens one session on the chosen app, runs
``wrk -t1 -c16`` against it while ``py-spy record`` samples the gateway, and prints the
heaviest functions (self and inclusive, % of samples) and a breakdown by area, plus the CPU µs
per call measured from /proc over the same window.  py-spy is not a project dependency: install it
in a scratch venv and pass its path.

    python3 -m venv /tmp/pyspy && /tmp/pyspy/bin/pip install py-spy
    .venv/bin/python bench/profile.py --py-spy /tmp/pyspy/bin/py-spy [--app bench-http|bench-stdio]
                                      [--perf] [--seconds 15] [--out prof.txt]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mcp_client as mc
import run

# Areas, checked in order against "function (file)" of a frame; first match wins.
AREAS: list[tuple[str, str]] = [
    ("audit (bastion.audit)", r"bastion/audit/"),
    ("session engine + RBAC (bastion.session, policy)", r"bastion/session/|bastion/policy/"),
    ("JSON-RPC parsing (bastion.protocol)", r"bastion/protocol/"),
    ("upstream HTTP client (bastion.transport.http)", r"bastion/transport/http"),
    ("stdio upstream (bastion.transport.stdio)", r"bastion/transport/stdio|bastion/transport/__init__"),
    ("MCP handler (bastion.appservice)", r"bastion/appservice/"),
    ("auth + front (bastion.proxy, bastion.auth)", r"bastion/proxy/|bastion/auth/"),
    ("uvicorn HTTP server (httptools protocol)", r"uvicorn/"),
    ("TLS (ssl)", r"ssl\.py|sslproto|_ssl|SSL_|ssl3_|tls_|EVP_|aesni|gcm_"),
    ("sqlite3", r"sqlite"),
    ("logging", r"logging/"),
    ("asyncio / uvloop", r"asyncio/|uvloop|libuv|uv__"),
]


# Innermost frames of threads waiting for work (idle, though py-spy may count them as active).
IDLE = re.compile(
    r"^(_worker \(concurrent/futures/thread\.py|_connection_worker_thread \(aiosqlite/|Thread\.wait|"
    r"Condition\.wait|Queue\.get|epoll_wait|__GI_epoll_wait|pthread_cond_wait|__futex|futex_|"
    r"syscall|__pthread_clockjoin|do_futex_wait|sem_wait|__new_sem_wait)"
)


def area_of(frame: str) -> str:
    for name, rx in AREAS:
        if re.search(rx, frame):
            return name
    return "other"


def summarize(raw: Path, top: int) -> str:
    self_count: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    area_self: collections.Counter[str] = collections.Counter()
    area_incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = [
            f for f in stack.split(";") if f and not f.startswith("process ") and not f.startswith("thread ")
        ]
        if not frames or IDLE.match(frames[-1]):
            continue
        total += count
        self_count[frames[-1]] += count
        area_self[area_of(frames[-1])] += count
        for f in set(frames):
            incl[f] += count
        for a in {area_of(f) for f in frames}:
            area_incl[a] += count
    out = [f"{total} samples", "", "## by area (self = samples whose innermost frame is there)", ""]
    out.append(f"{'area':<52} {'self %':>7} {'incl %':>7}")
    for a, _ in area_self.most_common():
        out.append(f"{a:<52} {100 * area_self[a] / total:7.1f} {100 * area_incl[a] / total:7.1f}")
    out += ["", f"## top {top} functions by self time", ""]
    for f, c in self_count.most_common(top):
        out.append(f"{100 * c / total:6.1f}%  {f}")
    out += ["", f"## top {top} bastion functions by inclusive time", ""]
    for f, c in [(f, c) for f, c in incl.most_common() if "bastion/" in f][:top]:
        out.append(f"{100 * c / total:6.1f}%  {f}")
    return "\n".join(out)


def perf_summary(data: Path, top: int) -> str:
    """CPU by shared object (kernel, libpython, libsqlite3, libssl/libcrypto, extensions), top symbols."""
    out = []
    for sort, n in (("dso", 15), ("dso,sym", top)):
        res = subprocess.run(
            [
                "perf",
                "report",
                "-i",
                str(data),
                "--no-children",
                "--sort",
                sort,
                "--stdio",
                "--percent-limit",
                "0.5",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        rows = [line for line in res.stdout.splitlines() if line.strip() and not line.startswith("#")]
        out += ["", f"## perf: by {sort}", "", *rows[:n]]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description="py-spy (and perf) profile of the gateway under wrk load")
    ap.add_argument("--py-spy", help="path of a py-spy binary (a scratch venv); skipped if not given")
    ap.add_argument("--perf", action="store_true", help="also sample with `perf record` (CPU by library)")
    ap.add_argument("--app", default="bench-http", choices=["bench-http", "bench-stdio"])
    ap.add_argument("--modern", action="store_true", help="calls as an MCP 2026-07-28 client (no session)")
    ap.add_argument("--lines", action="store_true", help="py-spy: by line, not by function")
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument(
        "--workload",
        default="calls",
        choices=["calls", "setup"],
        help="calls: wrk tools/call in one session; setup: initialize+initialized+tools/list+DELETE cycles",
    )
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", help="also write the summary here (and the raw samples beside it)")
    args = ap.parse_args()
    if not args.py_spy and not args.perf:
        ap.error("give --py-spy PATH and/or --perf")
    os.sched_setaffinity(0, {run.LOAD_CORE})
    tmp = Path(tempfile.mkdtemp(prefix="bastion-prof-"))
    procs = run.Procs(tmp)
    texts: list[str] = []
    try:
        up = procs.start(
            "upstream-http",
            [run.PY, str(run.BENCH / "upstream_http.py")],
            core=run.LOAD_CORE,
            stdout=subprocess.PIPE,
        )
        assert up.stdout is not None
        port = int(up.stdout.readline())
        gw_pid, base, token, ctx, _ = run.start_bastion(procs, tmp, port)
        t = run.Target(
            args.app,
            args.app,
            "http" if args.app == "bench-http" else "stdio",
            gw_pid,
            url=f"{base}/mcp/apps/{args.app}",
            token=token,
            ssl_ctx=ctx,
            modern=args.modern,
        )
        run.open_wrk_session(t)
        run.wrk_run(t, args.connections, 2)  # warm-up

        def sampled(cmd: list[str]) -> dict[str, object]:
            sampler = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)
            if args.workload == "calls":
                load = run.wrk_run(t, args.connections, args.seconds - 2)
            else:
                cpu0 = run.cpu_seconds(gw_pid)
                st = mc.setup_rate(t.client_target(), args.connections, args.seconds - 2)
                cpu = run.cpu_seconds(gw_pid) - cpu0
                n = st["sessions"] or 1
                load = {
                    "calls_per_s": st["sessions_per_s"],
                    "gateway_cpu_us_per_call": cpu / n * 1e6,
                    "calls_per_gateway_cpu_s": n / cpu if cpu else 0,
                    "busy": "n/a",
                }
            _, err = sampler.communicate(timeout=args.seconds + 60)
            if sampler.returncode != 0:
                raise RuntimeError(f"{cmd[0]} failed: {err.decode(errors='replace')}")
            return load

        def head(what: str, load: dict[str, object]) -> str:
            return (
                f"# {what}: app {args.app}, {args.workload} x{args.connections}: "
                f"{load['calls_per_s']:,.0f}/s, "
                f"gateway CPU {load['gateway_cpu_us_per_call']:.0f} µs each "
                f"({load['calls_per_gateway_cpu_s']:,.0f} per CPU-s), core busy {load['busy']}"
            )

        if args.py_spy:
            raw = tmp / "pyspy.txt"
            load = sampled(
                [
                    args.py_spy,
                    "record",
                    "--pid",
                    str(gw_pid),
                    "--rate",
                    "250",
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                    "--duration",
                    str(args.seconds),
                    *([] if args.lines else ["--function"]),
                    "--nonblocking",
                ]
            )
            texts.append(head("py-spy", load) + "\n" + summarize(raw, args.top))
            if args.out:
                shutil.copy(raw, Path(args.out).with_suffix(".pyspy.txt"))
        if args.perf:
            data = tmp / "perf.data"
            load = sampled(
                [
                    "perf",
                    "record",
                    "-F",
                    "999",
                    "-p",
                    str(gw_pid),
                    "-o",
                    str(data),
                    "--",
                    "sleep",
                    str(args.seconds),
                ]
            )
            texts.append(head("perf", load) + "\n" + perf_summary(data, args.top))
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    text = "\n\n".join(texts)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
