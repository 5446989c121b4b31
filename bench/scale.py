"""Two proxies and two app services on PostgreSQL, side by side with one node on SQLite.

``make bench-scale`` (or ``.venv/bin/python bench/scale.py [--quick]``). Everything runs on
loopback and is started here, in a temporary directory:

- a fresh database on the machine's PostgreSQL (``--pg``, default
  ``postgresql://postgres@127.0.0.1:5432/postgres``), dropped at the end;
- ``proxy0``, ``proxy1``: ``bastion start`` with the auth service on that database, the proxy,
  and no app service; each with its own ``public_addr`` and ``tunnel_public_addr``;
- ``app0``, ``app1``: ``bastion start`` with only the app service, joined with
  ``bastion tokens add --type=app`` tokens, each connected to both proxies;
- the apps ``bench-http`` (the bench HTTP echo server, ``upstream_http.py``) and ``bench-stdio``
  (``upstream_stdio.py``, a child per session) as dynamic ``app`` resources (``bastion create``),
  served by both app services;
- ``single``: the one-node cluster of ``run.py`` (SQLite backend and audit, the apps in its config).

Measured in one run, targets interleaved, medians of ``--reps`` (3):

(a) ``tools/call`` throughput at concurrency 16 and 64 (``wrk -t1`` with ``tools_call.lua``)
    through one proxy, through both at once (one wrk per proxy, each with its own session on its
    own app service, summed) and through the single node;
(b) latency at concurrency 1 (a blocking client, one call at a time) through a proxy, through the
    single node, and to the upstream directly;
(c) session set-up (initialize + initialized + tools/list + DELETE; 16 clients) through one proxy,
    through both (8 clients each), and through the single node;
(d) one session whose requests alternate between the two proxies: latency at concurrency 1 and
    throughput (the session's load split over both proxies), each as a ratio to one proxy.

Nothing is pinned (two cores, seven processes; only the single node's stdio children are, by the
config ``run.start_bastion`` writes): next to calls/s the script reports the gateway's CPU per
call, the robust figure on a shared machine: utime + stime from ``/proc`` of the proxies and app
services (or the single node), the stdio children apart, and the CPU of the PostgreSQL server
processes serving this run's database apart (readable when run as root or as their user).

Before every measurement the database gets ``VACUUM (ANALYZE)``, as autovacuum would
(``--no-vacuum`` to leave it alone: the test machine's server runs with autovacuum off, and
without statistics the audit completions scan the whole audit table). At the end the audit rows
of the loaded sessions are counted against the calls answered.

Results: Markdown tables on stdout, JSON in ``bench/results/scale-<UTC>.json`` (gitignored).
See ``docs/scaling.md``.  Not a test: no assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import functools
import json
import os
import pwd
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import mcp_client as mc
import run

PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"
DB_PREFIX = "bastion_bench_"
CLUSTER = "bench-scale"
CONCURRENCY = (16, 64)
SETUP_CLIENTS = 16
PG_AUDIT_TABLE = "bastion_audit_events"
#: Successful tools/call answers received per session (every run, warm-ups and re-measured runs too),
#: and the most calls that may have been forwarded without an answer counted (wrk stops with up
#: to one call per connection in flight): the audit check at the end compares them with the rows.
CALLS: dict[str, int] = {}
IN_FLIGHT_AT_END: dict[str, int] = {}


def count(sid: str, calls: int, in_flight: int = 0) -> None:
    CALLS[sid] = CALLS.get(sid, 0) + calls
    IN_FLIGHT_AT_END[sid] = IN_FLIGHT_AT_END.get(sid, 0) + in_flight


# ------------------------------------------------------------------ processes


class Procs(run.Procs):
    """``run.Procs`` without the pinning: with two cores and seven processes, nothing is pinned."""

    def start(
        self,
        name: str,
        cmd: list[str],
        *,
        core: int = -1,
        env: dict[str, str] | None = None,
        stdout: int | None = None,
    ) -> subprocess.Popen[bytes]:
        log = (self.logdir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else log,
            stderr=log,
            env=env,
            cwd=run.ROOT,
            start_new_session=True,
        )
        self.procs.append(proc)
        run.ALL_PROCS.append(proc)
        return proc


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}


def bastion(*args: str) -> list[str]:
    return [run.PY, "-m", "bastion.cli.main", *args]


def wait_log(procs: Procs, name: str, proc: subprocess.Popen[bytes], pattern: str, deadline: float) -> str:
    """Wait for ``pattern`` in ``name``'s log; returns its first group (or the whole match)."""
    rx = re.compile(pattern)
    end = time.monotonic() + deadline
    while True:
        path = procs.logdir / f"{name}.log"
        m = rx.search(path.read_text(errors="replace")) if path.exists() else None
        if m:
            return m.group(1) if m.groups() else m.group(0)
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited ({proc.returncode}):\n{procs.log(name)}")
        if time.monotonic() > end:
            raise RuntimeError(f"{name}: no {pattern!r} in its log within {deadline:g}s:\n{procs.log(name)}")
        time.sleep(0.1)


def until(what: str, check: Callable[[], bool], deadline: float) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > deadline:
            raise RuntimeError(f"{what}: not within {deadline:g}s")
        time.sleep(0.2)
    return time.monotonic() - start


# ------------------------------------------------------------------ PostgreSQL


T = TypeVar("T")


def pg_run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def with_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path="/" + name))


def safe_dsn(dsn: str) -> str:
    parts = urlsplit(dsn)
    if parts.password:
        return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))
    return dsn


async def _pg_create(server: str) -> tuple[str, dict[str, str]]:
    name = f"{DB_PREFIX}{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(server, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
        settings = {}
        for key in (
            "server_version",
            "synchronous_commit",
            "fsync",
            "shared_buffers",
            "max_connections",
            "autovacuum",
        ):
            settings[key] = str(await conn.fetchval(f"SHOW {key}"))
        settings["started"] = str(await conn.fetchval("SELECT pg_postmaster_start_time()"))
    finally:
        await conn.close()
    return name, settings


async def _pg_drop(server: str, name: str) -> str:
    """Drop ``name``; returns when the server started (to tell whether it restarted meanwhile)."""
    conn = await asyncpg.connect(server, timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        return str(await conn.fetchval("SELECT pg_postmaster_start_time()"))
    finally:
        await conn.close()


class PgBackends:
    """The PostgreSQL server processes serving one database (found through pg_stat_activity;
    readable in /proc when this runs as root or as the server's user)."""

    def __init__(self, server: str, dbname: str) -> None:
        self.server = server
        self.dbname = dbname
        self.conn: asyncpg.Connection[Any] | None = None
        self.loop = asyncio.new_event_loop()

    def pids(self) -> list[int]:
        async def query() -> list[int]:
            if self.conn is None or self.conn.is_closed():
                self.conn = await asyncpg.connect(self.server, timeout=10)
            rows = await self.conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1", self.dbname)
            return [int(r["pid"]) for r in rows]

        try:
            return self.loop.run_until_complete(query())
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            self.conn = None
            return []

    def vacuum_analyze(self) -> float:
        """``VACUUM (ANALYZE)`` this database (what autovacuum would have done); returns seconds,
        -1 if it failed (a server restarting under us)."""

        async def vacuum() -> None:
            conn = await asyncpg.connect(with_database(self.server, self.dbname), timeout=10)
            try:
                await conn.execute("VACUUM (ANALYZE)")
            finally:
                await conn.close()

        t = time.perf_counter()
        try:
            self.loop.run_until_complete(vacuum())
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            print(f"VACUUM (ANALYZE) failed (measuring anyway): {e}", file=sys.stderr)
            return -1.0
        return time.perf_counter() - t

    def audit_rows(self, sids: list[str]) -> dict[str, dict[str, int]]:
        async def query() -> dict[str, dict[str, int]]:
            conn = await asyncpg.connect(with_database(self.server, self.dbname), timeout=10)
            try:
                rows = await conn.fetch(
                    f"SELECT session_id, count(*) AS n, count(*) FILTER (WHERE success) AS ok "
                    f"FROM {PG_AUDIT_TABLE} WHERE type = 'mcp.session.request' "
                    "AND session_id = ANY($1::text[]) GROUP BY session_id",
                    sids,
                )
            finally:
                await conn.close()
            return {str(r["session_id"]): {"requests": int(r["n"]), "succeeded": int(r["ok"])} for r in rows}

        return self.loop.run_until_complete(query())

    def close(self) -> None:
        if self.conn is not None and not self.conn.is_closed():
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(self.conn.close())
        self.loop.close()


# -------------------------------------------------------------------- topology


@dataclass
class Node:
    name: str
    proc: subprocess.Popen[bytes]
    config: Path
    addr: str = ""  # proxies: host:port of the HTTPS listener
    tunnel: str = ""  # proxies: host:port of the tunnel listener
    tag: str = ""  # app services: the route tag their session ids start with


@dataclass
class Topology:
    proxies: list[Node]
    apps: list[Node]
    single: Node
    upstream: subprocess.Popen[bytes]
    http_port: int
    token: str = ""
    ctx: ssl.SSLContext | None = None
    single_token: str = ""
    single_ctx: ssl.SSLContext | None = None
    single_base: str = ""
    join_s: dict[str, float] = field(default_factory=dict)

    def proxy_target(self, i: int, app: str = "bench-http") -> mc.Target:
        return mc.Target(f"https://{self.proxies[i].addr}/mcp/apps/{app}", token=self.token, ssl_ctx=self.ctx)

    def single_target(self, app: str = "bench-http") -> mc.Target:
        return mc.Target(
            f"{self.single_base}/mcp/apps/{app}", token=self.single_token, ssl_ctx=self.single_ctx
        )

    def direct_target(self) -> mc.Target:
        return mc.Target(f"http://127.0.0.1:{self.http_port}/mcp")


def proxy_config(root: Path, dsn: str, port: int, tport: int) -> str:
    return (
        "version: v1\n"
        "bastion:\n"
        f"  data_dir: {root / 'data'}\n"
        f"  cluster_name: {CLUSTER}\n"
        "auth_service:\n"
        "  backend:\n"
        "    type: postgres\n"
        f"    dsn: {dsn}\n"
        "proxy_service:\n"
        f"  listen_addr: 127.0.0.1:{port}\n"
        f"  public_addr: 127.0.0.1:{port}\n"
        f"  tunnel_listen_addr: 127.0.0.1:{tport}\n"
        f"  tunnel_public_addr: 127.0.0.1:{tport}\n"
        "app_service:\n"
        "  enabled: false\n"
    )


def app_service_config(root: Path, proxy: str, pin: str, token_file: Path) -> str:
    return (
        "version: v1\n"
        "bastion:\n"
        f"  data_dir: {root / 'data'}\n"
        f"  proxy_server: {proxy}\n"
        f"  ca_pin: {pin}\n"
        "  join_params:\n"
        f"    token_name: {token_file}\n"
        "auth_service: {enabled: false}\n"
        "proxy_service: {enabled: false}\n"
        "app_service:\n"
        "  enabled: true\n"
        "  sessions_per_user: 100000\n"
        "  stdio_limits: {per_user: 100000, per_app: 100000}\n"
        "  resources:\n"
        "  - labels: {'*': '*'}\n"
        # The host lets the dynamic bench apps run the bench stdio server and reach loopback.
        "  dynamic_apps:\n"
        f"    commands: [{run.PY}]\n"
        f"    run_as: [{pwd.getpwuid(os.geteuid()).pw_name}]\n"
        "    upstream_networks: [127.0.0.1/32]\n"
    )


def apps_yaml(http_port: int) -> str:
    run_as = "root" if os.geteuid() == 0 else ""
    return (
        "kind: app\n"
        "version: v3\n"
        "metadata:\n"
        "  name: bench-http\n"
        "  labels: {bench: scale}\n"
        "spec:\n"
        f"  uri: mcp+http://127.0.0.1:{http_port}/mcp\n"
        "---\n"
        "kind: app\n"
        "version: v3\n"
        "metadata:\n"
        "  name: bench-stdio\n"
        "  labels: {bench: scale}\n"
        "spec:\n"
        "  mcp:\n"
        f"    command: {run.PY}\n"
        f"    args: {json.dumps([str(run.BENCH / 'upstream_stdio.py')])}\n"
        f"    run_as_host_user: {json.dumps(run_as)}\n"
    )


def make_cli(config: Path, home: Path) -> Callable[..., str]:
    env = dict(clean_env(), BASTION_CONFIG=str(config), BASTION_HOME=str(home), NO_COLOR="1", COLUMNS="200")

    def cli(*args: str) -> str:
        res = subprocess.run(
            bastion(*args), env=env, capture_output=True, text=True, timeout=120, check=False
        )
        if res.returncode != 0:
            raise RuntimeError(
                f"bastion {' '.join(args)} failed ({res.returncode}): {res.stdout}{res.stderr}"
            )
        return res.stdout

    return cli


def start_topology(procs: Procs, tmp: Path, dsn: str) -> Topology:
    up = procs.start("upstream-http", [run.PY, str(run.BENCH / "upstream_http.py")], stdout=subprocess.PIPE)
    assert up.stdout is not None
    http_port = int(up.stdout.readline())

    t0 = time.monotonic()
    proxies: list[Node] = []
    for i in range(2):
        root = tmp / f"proxy{i}"
        root.mkdir()
        port, tport = run.free_port(), run.free_port()
        cfg = root / "bastion.yaml"
        cfg.write_text(proxy_config(root, dsn, port, tport))
        proc = procs.start(f"proxy{i}", bastion("start", "--config", str(cfg)), env=clean_env())
        proxies.append(Node(f"proxy{i}", proc, cfg, addr=f"127.0.0.1:{port}", tunnel=f"127.0.0.1:{tport}"))
    for p in proxies:
        wait_log(procs, p.name, p.proc, r"proxy listening addr=https://([\d.]+:\d+)", 60)
    join_s = {"proxies_listening": round(time.monotonic() - t0, 2)}

    cli = make_cli(proxies[0].config, tmp / "home")
    cli("users", "add", "bench", "--roles=mcp-user")
    apps: list[Node] = []
    for i in range(2):
        root = tmp / f"app{i}"
        root.mkdir()
        doc = json.loads(cli("tokens", "add", "--type=app", "--ttl=30m", "--format=json"))
        token_file = root / "token"
        token_file.write_text(doc["token"] + "\n")
        cfg = root / "bastion.yaml"
        cfg.write_text(app_service_config(root, proxies[0].addr, doc["ca_pin"], token_file))
        proc = procs.start(f"app{i}", bastion("start", "--config", str(cfg)), env=clean_env())
        apps.append(Node(f"app{i}", proc, cfg))
    t1 = time.monotonic()
    for a in apps:
        wait_log(procs, a.name, a.proc, r"tunnel connected", 60)

    def servers() -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = json.loads(cli("get", "app_servers", "--format=json"))
        return [s for s in out if s["spec"].get("via") != "proxy"]

    def connected_to_both() -> bool:
        s = servers()
        return len(s) == 2 and all(len(x["spec"]["proxies"]) == 2 for x in s)

    until("each app service connected to both proxies", connected_to_both, 60)
    join_s["app_services_on_both_proxies"] = round(time.monotonic() - t1, 2)

    app_file = tmp / "apps.yaml"
    app_file.write_text(apps_yaml(http_port))
    t2 = time.monotonic()
    cli("create", str(app_file))

    def served() -> bool:
        want = {"bench-http", "bench-stdio"}
        return sum(want <= {a["metadata"]["name"] for a in s["spec"]["apps"]} for s in servers()) == 2

    until("both app services serve bench-http and bench-stdio", served, 30)
    join_s["apps_served_by_both"] = round(time.monotonic() - t2, 2)
    tags = {s["spec"]["tag"] for s in servers()}
    for a, tag in zip(apps, sorted(tags), strict=True):
        a.tag = tag  # which is which does not matter: only that sessions land on both

    token = cli("auth", "sign", "--user=bench", "--format=token", "--ttl=8h").strip()
    ca = tmp / "ca.pem"
    ca.write_text(cli("auth", "export", "--type=tls"))
    ctx = ssl.create_default_context(cafile=str(ca))

    single_pid, base, s_token, s_ctx, _ = run.start_bastion(procs, tmp, http_port)
    single_proc = next(p for p in procs.procs if p.pid == single_pid)
    single = Node("single", single_proc, tmp / "bastion" / "bastion.yaml", addr=base.removeprefix("https://"))
    topo = Topology(proxies, apps, single, up, http_port, token, ctx, s_token, s_ctx, base, join_s)
    return topo


# ------------------------------------------------------------------ measuring


@dataclass
class Snapshot:
    cpu: dict[str, float]
    kids: dict[str, dict[int, float]]
    pg: dict[int, float]
    ours: float
    cores: dict[int, tuple[int, ...]]
    t: float


class Meter:
    """CPU of every process of the run over a measured window, by role."""

    def __init__(self, topo: Topology, pg: PgBackends) -> None:
        self.pids = {n.name: n.proc.pid for n in (*topo.proxies, *topo.apps, topo.single)}
        self.pids["upstream"] = topo.upstream.pid
        self.pg = pg

    def _pg_cpu(self) -> dict[int, float]:
        return {pid: run.cpu_seconds(pid) for pid in self.pg.pids()}

    def begin(self) -> Snapshot:
        pg = self._pg_cpu()
        cpu = {k: run.cpu_seconds(p) for k, p in self.pids.items()}
        kids = {k: {c: run.cpu_seconds(c) for c in run.descendants(p)} for k, p in self.pids.items()}
        return Snapshot(cpu, kids, pg, run.our_cpu(), run.core_busy(), time.perf_counter())

    def end(self, s: Snapshot) -> dict[str, Any]:
        ours, cores, t = run.our_cpu(), run.core_busy(), time.perf_counter()
        cpu = {k: run.cpu_seconds(p) - s.cpu[k] for k, p in self.pids.items()}
        kids: dict[str, float] = {}
        for k, p in self.pids.items():
            kids[k] = sum(run.cpu_seconds(c) - s.kids[k].get(c, 0.0) for c in run.descendants(p))
        pg_now = self._pg_cpu()
        pg = sum(v - s.pg.get(pid, 0.0) for pid, v in pg_now.items())
        return {
            "wall_s": round(t - s.t, 3),
            "cpu_s": {k: round(v, 3) for k, v in cpu.items()},
            "children_cpu_s": {k: round(v, 3) for k, v in kids.items() if v},
            "postgres_cpu_s": round(pg, 3),
            "postgres_backends": len(pg_now),
            "busy": run.busy_pct(s.cores, cores),
            "other_load": run.foreign_cores(s.cores, cores, ours - s.ours + pg),
        }


CLUSTER_GW = ("proxy0", "proxy1", "app0", "app1")
SINGLE_GW = ("single",)


def per_call(m: dict[str, Any], gw: tuple[str, ...], n: int) -> dict[str, Any]:
    """Gateway, stdio-children and PostgreSQL CPU per call (µs) of a measured window."""
    if not n:
        return {"gateway_cpu_us_per_call": None, "postgres_cpu_us_per_call": None}
    gw_s = sum(m["cpu_s"].get(k, 0.0) for k in gw)
    kids = sum(m["children_cpu_s"].get(k, 0.0) for k in gw)
    out: dict[str, Any] = {
        "gateway_cpu_us_per_call": round(gw_s / n * 1e6, 1),
        "calls_per_gateway_cpu_s": round(n / gw_s) if gw_s else None,
        "children_cpu_us_per_call": round(kids / n * 1e6, 1),
        "postgres_cpu_us_per_call": round(m["postgres_cpu_s"] / n * 1e6, 1) if gw == CLUSTER_GW else None,
        "gateway_plus_postgres_cpu_us_per_call": (
            round((gw_s + m["postgres_cpu_s"]) / n * 1e6, 1) if gw == CLUSTER_GW else round(gw_s / n * 1e6, 1)
        ),
    }
    if gw == CLUSTER_GW:
        proxies = m["cpu_s"]["proxy0"] + m["cpu_s"]["proxy1"]
        out["proxies_cpu_us_per_call"] = round(proxies / n * 1e6, 1)
        out["app_services_cpu_us_per_call"] = round((gw_s - proxies) / n * 1e6, 1)
    return out


@dataclass
class Load:
    """One wrk process: a URL, the session it loads, the bearer token."""

    url: str
    sid: str
    token: str = ""


def wrk_once(
    meter: Meter, loads: list[Load], conns: int, duration: float, gw: tuple[str, ...]
) -> dict[str, Any]:
    """One wrk process per load, all at once; calls summed over them."""
    secs = max(1, round(duration))
    snap = meter.begin()
    running = []
    for load in loads:
        env = dict(
            os.environ, MCP_SESSION_ID=load.sid, BEARER_TOKEN=load.token, ID_BASE=str(run.next_id_base())
        )
        cmd = ["wrk", "-t1", f"-c{conns}", f"-d{secs}s", "--timeout", "10s", "-s", str(run.LUA), load.url]
        running.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outs = [p.communicate(timeout=secs + 60) for p in running]
    m = meter.end(snap)
    per_wrk = []
    for load, p, (out, err) in zip(loads, running, outs, strict=True):
        found = re.search(r"^WRKJSON (\{.*\})$", out, re.M)
        if p.returncode != 0 or not found:
            raise RuntimeError(f"wrk failed: {out}{err}")
        w = json.loads(found.group(1))
        ok = w["requests"] - w["status"]
        count(load.sid, ok, conns)
        per_wrk.append(
            {
                "calls": ok,
                "calls_per_s": round(ok / (w["duration_us"] / 1e6), 1),
                "errors": w["connect"] + w["read"] + w["write"] + w["status"] + w["timeout"],
            }
        )
    calls = sum(w["calls"] for w in per_wrk)
    return {
        "wrk_processes": len(loads),
        "connections_per_wrk": conns,
        "calls": calls,
        "calls_per_s": round(sum(w["calls_per_s"] for w in per_wrk), 1),
        "errors": sum(w["errors"] for w in per_wrk),
        "per_wrk": per_wrk,
        **per_call(m, gw, calls),
        **m,
    }


def wrk_run(
    meter: Meter, loads: list[Load], conns: int, duration: float, gw: tuple[str, ...], max_wait: float
) -> dict[str, Any]:
    """``wrk_once``, measured again (the quieter kept) when other tenants were busy, as run.py does."""
    first = wrk_once(meter, loads, conns, duration, gw)
    if first["other_load"].get("foreign", 0) <= run.NOISY:
        return first
    run.quiet(max_wait)
    again = wrk_once(meter, loads, conns, duration, gw)
    again["retried"] = first["other_load"]
    return again if again["other_load"].get("foreign", 0) < first["other_load"].get("foreign", 0) else first


def alternating_latency(targets: list[mc.Target], sid: str, duration: float, id_base: int) -> dict[str, Any]:
    """Like ``mc.latency_run``, but call ``i`` goes over connection ``i % len(targets)`` (one
    keep-alive connection per target): one session alternating between proxies."""
    conns = [mc.BlockingConn(t) for t in targets]
    try:
        heads = [t.headers(sid) for t in targets]
        for i in range(20):  # warm-up
            k = i % len(conns)
            conns[k].send_raw(mc.request_bytes(targets[k], "POST", heads[k], mc.call_body(id_base + i)))
        lat: list[int] = []
        bad = 0
        n = 0
        pc = time.perf_counter_ns
        start = time.perf_counter()
        end = start + duration
        while True:
            n += 1
            k = n % len(conns)
            data = mc.request_bytes(targets[k], "POST", heads[k], mc.call_body(id_base + 100 + n))
            t0 = pc()
            r = conns[k].send_raw(data)
            lat.append(pc() - t0)
            if r.status != 200 or b'"result"' not in r.body:
                bad += 1
            if n % 64 == 0 and time.perf_counter() > end:
                break
        wall = time.perf_counter() - start
    finally:
        for c in conns:
            c.close()
    lat.sort()
    k = len(lat)
    return {
        "calls": k,
        "calls_per_s": k / wall,
        "p50_us": lat[k // 2] / 1000,
        "p90_us": lat[int(k * 0.9)] / 1000,
        "p99_us": lat[min(k - 1, int(k * 0.99))] / 1000,
        "mean_us": sum(lat) / k / 1000,
        "bad": bad,
    }


def latency_run(
    meter: Meter, targets: list[mc.Target], sid: str, duration: float, gw: tuple[str, ...]
) -> dict[str, Any]:
    snap = meter.begin()
    if len(targets) == 1:
        lat: dict[str, Any] = dict(mc.latency_run(targets[0], sid, duration, run.next_id_base()))
    else:
        lat = alternating_latency(targets, sid, duration, run.next_id_base())
    m = meter.end(snap)
    count(sid, int(lat["calls"]) - int(lat["bad"]) + 20)  # + the 20 warm-up calls
    return {**lat, **per_call(m, gw, int(lat["calls"])), **m}


def setup_run(
    meter: Meter, targets: list[mc.Target], clients: int, duration: float, gw: tuple[str, ...]
) -> dict[str, Any]:
    """Set-up cycles, ``clients`` spread evenly over ``targets``, in one event loop."""
    each = clients // len(targets)

    async def both() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(mc._setup_cycles(t, each, duration) for t in targets)))

    snap = meter.begin()
    parts: list[dict[str, Any]] = mc.run_async(both())
    m = meter.end(snap)
    sessions = sum(int(p["sessions"]) for p in parts)
    wall = max(float(p["wall_s"]) for p in parts)
    return {
        "clients": each * len(targets),
        "sessions": sessions,
        "sessions_per_s": round(sessions / wall, 1),
        "errors": sum(int(p["errors"]) for p in parts),
        "first_error": next((p["first_error"] for p in parts if p["first_error"]), ""),
        "client_cpu_s": round(sum(float(p["client_cpu_s"]) for p in parts), 3),
        **per_call(m, gw, sessions),
        **m,
    }


def open_session(target: mc.Target, check: bool = True) -> str:
    conn = mc.BlockingConn(target)
    try:
        sid, _ = conn.open_session()
        count(sid, 1)  # initialize is a request too
        if check:
            msg = conn.call(sid, 1, "check")
            text = msg["result"]["content"][0]["text"] if msg and "result" in msg else None
            if text != "check":
                raise RuntimeError(f"{target.url}: unexpected tools/call answer {msg!r}")
            count(sid, 1)
        return sid
    finally:
        conn.close()


def delete_session(target: mc.Target, sid: str) -> None:
    conn = mc.BlockingConn(target)
    try:
        conn.delete(sid)
    finally:
        conn.close()


# ---------------------------------------------------------------- scenarios


@dataclass
class Scenario:
    key: str
    kind: str  # "wrk" | "latency" | "setup"
    label: str
    fn: Callable[[], dict[str, Any]]


def scenarios(
    topo: Topology,
    meter: Meter,
    sids: dict[str, str],
    dur: float,
    lat_dur: float,
    setup_dur: float,
    max_wait: float,
) -> list[Scenario]:
    p0, p1 = topo.proxy_target(0), topo.proxy_target(1)
    single, direct = topo.single_target(), topo.direct_target()
    tok, s_tok = topo.token, topo.single_token
    out: list[Scenario] = []
    for c in CONCURRENCY:
        one = [Load(p0.url, sids["s0"], tok)]
        both = [Load(p0.url, sids["s0"], tok), Load(p1.url, sids["s1"], tok)]
        split = [Load(p0.url, sids["s0"], tok), Load(p1.url, sids["s0"], tok)]
        alone = [Load(single.url, sids["single"], s_tok)]
        out += [
            Scenario(
                f"tp_one_c{c}",
                "wrk",
                f"one proxy, c={c}",
                functools.partial(wrk_run, meter, one, c, dur, CLUSTER_GW, max_wait),
            ),
            Scenario(
                f"tp_both_c{c}",
                "wrk",
                f"both proxies, 2 x c={c} (a session each, summed)",
                functools.partial(wrk_run, meter, both, c, dur, CLUSTER_GW, max_wait),
            ),
            Scenario(
                f"tp_split_c{c}",
                "wrk",
                f"one session over both proxies, 2 x c={c // 2}",
                functools.partial(wrk_run, meter, split, c // 2, dur, CLUSTER_GW, max_wait),
            ),
            Scenario(
                f"tp_single_c{c}",
                "wrk",
                f"single node (SQLite), c={c}",
                functools.partial(wrk_run, meter, alone, c, dur, SINGLE_GW, max_wait),
            ),
        ]
    out += [
        Scenario(
            "tp_stdio_one_c16",
            "wrk",
            "stdio app, one proxy, c=16",
            lambda: wrk_run(
                meter,
                [Load(topo.proxy_target(0, "bench-stdio").url, sids["stdio"], tok)],
                16,
                dur,
                CLUSTER_GW,
                max_wait,
            ),
        ),
        Scenario(
            "tp_stdio_single_c16",
            "wrk",
            "stdio app, single node (SQLite), c=16",
            lambda: wrk_run(
                meter,
                [Load(topo.single_target("bench-stdio").url, sids["single_stdio"], s_tok)],
                16,
                dur,
                SINGLE_GW,
                max_wait,
            ),
        ),
        Scenario(
            "lat_direct",
            "latency",
            "upstream directly",
            lambda: latency_run(meter, [direct], sids["direct"], lat_dur, ()),
        ),
        Scenario(
            "lat_proxy",
            "latency",
            "through a proxy",
            lambda: latency_run(meter, [p0], sids["s0"], lat_dur, CLUSTER_GW),
        ),
        Scenario(
            "lat_alt",
            "latency",
            "one session alternating between the proxies",
            lambda: latency_run(meter, [p0, p1], sids["s0"], lat_dur, CLUSTER_GW),
        ),
        Scenario(
            "lat_same2",
            "latency",
            "same, two connections to one proxy (control)",
            lambda: latency_run(meter, [p0, p0], sids["s0"], lat_dur, CLUSTER_GW),
        ),
        Scenario(
            "lat_single",
            "latency",
            "single node (SQLite)",
            lambda: latency_run(meter, [single], sids["single"], lat_dur, SINGLE_GW),
        ),
        Scenario(
            "lat_stdio_proxy",
            "latency",
            "stdio app through a proxy",
            lambda: latency_run(
                meter, [topo.proxy_target(0, "bench-stdio")], sids["stdio"], lat_dur, CLUSTER_GW
            ),
        ),
        Scenario(
            "lat_stdio_single",
            "latency",
            "stdio app, single node (SQLite)",
            lambda: latency_run(
                meter, [topo.single_target("bench-stdio")], sids["single_stdio"], lat_dur, SINGLE_GW
            ),
        ),
        Scenario(
            "setup_one",
            "setup",
            f"one proxy ({SETUP_CLIENTS} clients)",
            lambda: setup_run(meter, [p0], SETUP_CLIENTS, setup_dur, CLUSTER_GW),
        ),
        Scenario(
            "setup_both",
            "setup",
            f"both proxies ({SETUP_CLIENTS // 2} clients each)",
            lambda: setup_run(meter, [p0, p1], SETUP_CLIENTS, setup_dur, CLUSTER_GW),
        ),
        Scenario(
            "setup_single",
            "setup",
            f"single node (SQLite, {SETUP_CLIENTS} clients)",
            lambda: setup_run(meter, [single], SETUP_CLIENTS, setup_dur, SINGLE_GW),
        ),
    ]
    return out


def open_sessions(topo: Topology) -> dict[str, Any]:
    """The sessions the runs load; ``s0`` (via proxy0) and ``s1`` (via proxy1) on different app
    services, so that "both proxies" also means both app services."""
    p0, p1 = topo.proxy_target(0), topo.proxy_target(1)
    sids = {"s0": open_session(p0)}
    spare: list[str] = []
    for _ in range(6):
        sid = open_session(p1)
        if sid.split(".")[0] != sids["s0"].split(".")[0]:
            sids["s1"] = sid
            break
        spare.append(sid)
    else:
        raise RuntimeError(f"proxy1 never placed a session on the other app service: {spare}")
    for sid in spare:
        delete_session(p1, sid)
    sids["stdio"] = open_session(topo.proxy_target(0, "bench-stdio"))
    sids["single"] = open_session(topo.single_target())
    sids["single_stdio"] = open_session(topo.single_target("bench-stdio"))
    sids["direct"] = open_session(topo.direct_target())
    # One session, every request on the other proxy than the last: it must just work.
    conns = [mc.BlockingConn(p0), mc.BlockingConn(p1)]
    try:
        sid, _ = conns[0].open_session()
        for i in range(6):
            msg = conns[i % 2].call(sid, 10 + i, f"hop {i}")
            if msg["result"]["content"][0]["text"] != f"hop {i}":
                raise RuntimeError(f"alternating session: unexpected answer {msg!r}")
        status = conns[1].delete(sid)
    finally:
        for c in conns:
            c.close()
    return {"sessions": sids, "alternating_check": {"calls": 6, "delete_status": status}}


# ------------------------------------------------------------------- report


def summarize(raw: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    keys = (
        "calls_per_s",
        "sessions_per_s",
        "p50_us",
        "p99_us",
        "mean_us",
        "gateway_cpu_us_per_call",
        "calls_per_gateway_cpu_s",
        "children_cpu_us_per_call",
        "proxies_cpu_us_per_call",
        "app_services_cpu_us_per_call",
        "postgres_cpu_us_per_call",
        "gateway_plus_postgres_cpu_us_per_call",
    )
    out: dict[str, dict[str, Any]] = {}
    for key, runs in raw.items():
        s: dict[str, Any] = {k: run.med([r.get(k) for r in runs]) for k in keys if any(k in r for r in runs)}
        s["errors"] = sum(int(r.get("errors", 0)) + int(r.get("bad", 0)) for r in runs)
        s["foreign_cores"] = run.med([r["other_load"].get("foreign") for r in runs])
        s["runs"] = len(runs)
        out[key] = s
    return out


def fmt(v: Any, digits: int = 0) -> str:
    return str(run.fmt(v, digits))


def ratio(a: Any, b: Any) -> str:
    return f"{a / b:.2f}" if a and b else "—"


def tables(summary: dict[str, dict[str, Any]], labels: dict[str, str]) -> str:
    s = summary
    lines = [
        "Throughput, tools/call (bench-http unless said; CPU µs per call: the gateway = proxies + app "
        "services, or the single node; PostgreSQL = the backends of this run's database)",
        "",
        "| path | calls/s | gateway CPU µs/call | of which proxies / app services | PostgreSQL µs/call "
        "| calls per gateway CPU-s | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, v in s.items():
        if not key.startswith("tp_"):
            continue
        split = "—"
        if v.get("proxies_cpu_us_per_call") is not None:
            split = f"{fmt(v['proxies_cpu_us_per_call'])} / {fmt(v['app_services_cpu_us_per_call'])}"
        pg = v.get("postgres_cpu_us_per_call")
        lines.append(
            f"| {labels[key]} | {fmt(v.get('calls_per_s'))} | {fmt(v.get('gateway_cpu_us_per_call'))} "
            f"| {split} | {fmt(pg)} | {fmt(v.get('calls_per_gateway_cpu_s'))} | {v['errors']} |"
        )
    d = s.get("lat_direct", {})
    lines += [
        "",
        "Latency at concurrency 1 (bench-http unless said; added = minus the upstream called directly)",
        "",
        "| path | p50 µs | p99 µs | added p50 / p99 µs | gateway CPU µs/call | PostgreSQL µs/call | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, v in s.items():
        if not key.startswith("lat_"):
            continue
        added = "—"
        if key != "lat_direct" and "stdio" not in key and d.get("p50_us") and v.get("p50_us"):
            added = f"{v['p50_us'] - d['p50_us']:,.0f} / {v['p99_us'] - d['p99_us']:,.0f}"
        gw = "—" if key == "lat_direct" else fmt(v.get("gateway_cpu_us_per_call"))
        lines.append(
            f"| {labels[key]} | {fmt(v.get('p50_us'))} | {fmt(v.get('p99_us'))} | {added} | {gw} "
            f"| {fmt(v.get('postgres_cpu_us_per_call'))} | {v['errors']} |"
        )
    lines += [
        "",
        "Session set-up (initialize + initialized + tools/list + DELETE)",
        "",
        "| path | set-ups/s | gateway CPU µs/set-up | PostgreSQL µs/set-up | errors |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, v in s.items():
        if key.startswith("setup_"):
            lines.append(
                f"| {labels[key]} | {fmt(v.get('sessions_per_s'))} | {fmt(v.get('gateway_cpu_us_per_call'))} "
                f"| {fmt(v.get('postgres_cpu_us_per_call'))} | {v['errors']} |"
            )
    lines += [
        "",
        "One session alternating between the two proxies (ratio to the same session on one proxy)",
        "",
        "| measure | one proxy | alternating | ratio |",
        "|---|---:|---:|---:|",
    ]
    one, alt = s.get("lat_proxy", {}), s.get("lat_alt", {})
    for k, name in (
        ("p50_us", "p50 µs, c=1"),
        ("p99_us", "p99 µs, c=1"),
        ("gateway_cpu_us_per_call", "gateway CPU µs/call, c=1"),
    ):
        lines.append(f"| {name} | {fmt(one.get(k))} | {fmt(alt.get(k))} | {ratio(alt.get(k), one.get(k))} |")
    for c in CONCURRENCY:
        a, b = s.get(f"tp_one_c{c}", {}), s.get(f"tp_split_c{c}", {})
        for k, name in (
            ("calls_per_s", f"calls/s, c={c}"),
            ("gateway_cpu_us_per_call", f"gateway CPU µs/call, c={c}"),
        ):
            lines.append(f"| {name} | {fmt(a.get(k))} | {fmt(b.get(k))} | {ratio(b.get(k), a.get(k))} |")
    return "\n".join(lines)


# --------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(
        description="Two proxies + two app services on PostgreSQL vs one SQLite node (see docs/scaling.md)"
    )
    ap.add_argument("--quick", action="store_true", help="one repetition, short runs (~1-1.5 minutes)")
    ap.add_argument("--reps", type=int, help="repetitions (default 3; 1 with --quick)")
    ap.add_argument("--duration", type=float, help="seconds per wrk run (default 4; 2 with --quick)")
    ap.add_argument(
        "--pg",
        default=os.environ.get("BASTION_BENCH_PG_DSN", PG_DEFAULT),
        help="PostgreSQL server DSN "
        "(a database is created there and dropped at the end; env BASTION_BENCH_PG_DSN)",
    )
    ap.add_argument(
        "--no-vacuum",
        action="store_true",
        help="do not VACUUM (ANALYZE) the database before each measurement (by default the script does, "
        "as autovacuum would: without statistics the audit completions scan the whole table)",
    )
    ap.add_argument("--only", default="", help="comma-separated scenario keys to run (default: all)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, configs)")
    ap.add_argument(
        "--max-wait", type=float, default=5.0, help="seconds to wait for other load to fall before each block"
    )
    args = ap.parse_args()
    if not shutil.which("wrk"):
        print("wrk not found: run `make bench-deps` (apt-get install wrk)", file=sys.stderr)
        return 2
    reps = args.reps or (1 if args.quick else 3)
    dur = args.duration or (2.0 if args.quick else 4.0)
    lat_dur = 1.5 if args.quick else 2.5
    setup_dur = 1.5 if args.quick else 2.5

    started = datetime.datetime.now(datetime.UTC)
    meta: dict[str, Any] = run.machine()
    meta.update(
        {
            "reps": reps,
            "wrk_seconds": dur,
            "latency_seconds": lat_dur,
            "setup_seconds": setup_dur,
            "setup_clients": SETUP_CLIENTS,
            "quick": args.quick,
            "started": started.isoformat(),
            "pinned": False,
            "vacuum_analyze_before_each_measurement": not args.no_vacuum,
            "postgres": safe_dsn(args.pg),
        }
    )
    try:
        dbname, pg_settings = pg_run(_pg_create(args.pg))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        print(f"PostgreSQL at {safe_dsn(args.pg)} is not usable: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    meta["postgres_settings"] = pg_settings
    meta["database"] = dbname
    tmp = Path(tempfile.mkdtemp(prefix="bastion-scale-"))
    procs = Procs(tmp)
    pg = PgBackends(args.pg, dbname)
    t_start = time.monotonic()
    raw: dict[str, list[dict[str, Any]]] = {}
    labels: dict[str, str] = {}
    extra: dict[str, Any] = {}
    try:
        print(
            f"starting 2 proxies, 2 app services, the single node and the upstream (logs in {tmp}) ...",
            flush=True,
        )
        topo = start_topology(procs, tmp, with_database(args.pg, dbname))
        meta["start_s"] = topo.join_s
        meta["topology"] = {
            "proxies": {p.name: {"addr": p.addr, "tunnel": p.tunnel} for p in topo.proxies},
            "app_services": {a.name: {"tag": a.tag} for a in topo.apps},
            "single": topo.single.addr,
        }
        extra = open_sessions(topo)
        sids: dict[str, str] = extra["sessions"]
        meter = Meter(topo, pg)
        todo = scenarios(topo, meter, sids, dur, lat_dur, setup_dur, args.max_wait)
        if args.only:
            keep = set(args.only.split(","))
            todo = [sc for sc in todo if sc.key in keep]
        labels = {sc.key: sc.label for sc in todo}
        # Warm-up: connections, caches, allocator arenas, the pools to PostgreSQL.
        for load, gw in (
            ([Load(topo.proxy_target(0).url, sids["s0"], topo.token)], CLUSTER_GW),
            ([Load(topo.proxy_target(1).url, sids["s1"], topo.token)], CLUSTER_GW),
            ([Load(topo.single_target().url, sids["single"], topo.single_token)], SINGLE_GW),
            ([Load(topo.proxy_target(0, "bench-stdio").url, sids["stdio"], topo.token)], CLUSTER_GW),
            (
                [Load(topo.single_target("bench-stdio").url, sids["single_stdio"], topo.single_token)],
                SINGLE_GW,
            ),
        ):
            wrk_once(meter, load, 16, 1.0, gw)
        meta["warm_up_done_s"] = round(time.monotonic() - t_start, 1)
        background: list[dict[str, float]] = []
        vacuumed: list[float] = []
        for rep in range(reps):
            shift = rep % len(todo) if todo else 0
            for sc in todo[shift:] + todo[:shift]:
                print(f"rep {rep + 1}/{reps} {sc.key} ...", flush=True)
                if not args.no_vacuum:
                    vacuumed.append(pg.vacuum_analyze())
                if sc.kind != "latency":
                    background.append(run.quiet(args.max_wait))
                raw.setdefault(sc.key, []).append(sc.fn())
        meta["background_busy_max_pct"] = max((max(b.values()) for b in background if b), default=None)
        meta["vacuum_analyze_s"] = {"runs": len(vacuumed), "max": round(max(vacuumed, default=0.0), 2)}
        time.sleep(1.0)  # completions land after the answers
        audited = [sids[k] for k in ("s0", "s1", "stdio")]
        rows = pg.audit_rows(audited)
        extra["audit_check"] = {
            sid: {
                **rows.get(sid, {"requests": 0, "succeeded": 0}),
                "calls_answered": CALLS.get(sid, 0),
                "at_most_in_flight_when_wrk_stopped": IN_FLIGHT_AT_END.get(sid, 0),
            }
            for sid in audited
        }
        # End the sessions: an app service stopping with sessions open waits 10 s for each
        # session's end event (see docs/scaling.md), and the proxies are stopped after them.
        ends = {
            "s0": topo.proxy_target(0),
            "s1": topo.proxy_target(1),
            "stdio": topo.proxy_target(0, "bench-stdio"),
            "single": topo.single_target(),
            "single_stdio": topo.single_target("bench-stdio"),
        }
        for key, target in ends.items():
            with contextlib.suppress(OSError, ConnectionError, RuntimeError):
                delete_session(target, sids[key])
        extra["logs_tail"] = {
            name: _warnings(procs.logdir / f"{name}.log")
            for name in ("proxy0", "proxy1", "app0", "app1", "bastion")
        }
    finally:
        procs.stop_all()
        pg.close()
        try:
            started_at = pg_run(_pg_drop(args.pg, dbname))
            meta["postgres_started"] = [pg_settings["started"], started_at]
            meta["postgres_restarted"] = started_at != pg_settings["started"]
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            print(f"could not drop database {dbname}: {e}", file=sys.stderr)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    meta["loadavg_end"] = os.getloadavg()
    meta["wall_s"] = round(time.monotonic() - t_start, 1)
    summary = summarize(raw)
    out = {"meta": meta, "labels": labels, "summary": summary, **extra, "raw": raw}
    results = run.BENCH / "results"
    results.mkdir(exist_ok=True)
    path = results / f"scale-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(out, indent=2, default=str))

    print()
    print(
        f"{meta['cpu']}, {meta['cpus']} CPUs, nothing pinned; "
        f"PostgreSQL {pg_settings.get('server_version', '?')} on loopback; medians of {reps}; "
        f"{dur:g} s per wrk run; whole run {meta['wall_s']:.0f} s"
    )
    print()
    print(tables(summary, labels))
    print()
    for sid, a in extra.get("audit_check", {}).items():
        extra_rows = a["requests"] - a["calls_answered"]
        verdict = "ok" if 0 <= extra_rows <= a["at_most_in_flight_when_wrk_stopped"] else "MISMATCH"
        print(
            f"audit {verdict}: session {sid}: {a['calls_answered']:,} calls answered, {a['requests']:,} "
            f"request rows ({a['succeeded']:,} successful; at most "
            f"{a['at_most_in_flight_when_wrk_stopped']:,} more could have been in flight when wrk stopped)"
        )
    if meta.get("postgres_restarted"):
        print(
            "PostgreSQL restarted during the run (not by this script): see meta.postgres_started in the JSON"
        )
    noisy = {k: v["foreign_cores"] for k, v in summary.items() if (v.get("foreign_cores") or 0) > run.NOISY}
    if noisy:
        print(f"other tenants used more than {run.NOISY} of a core during: {noisy}")
    print(f"\nJSON: {path.relative_to(run.ROOT)}")
    return 0


def _warnings(log: Path) -> list[str]:
    """The last warnings and errors of a log, kept with the results."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return [line for line in text.splitlines() if re.search(r"\b(WARN|WARNING|ERROR|error)\b", line)][-10:]


if __name__ == "__main__":
    sys.exit(main())
