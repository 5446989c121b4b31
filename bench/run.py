"""The gateway benchmark, in one command: ``make bench`` (or ``.venv/bin/python bench/run.py [--quick]``).

Starts everything itself on loopback and measures, in one run, ``tools/call`` through:

- ``direct-http``: the bench streamable-HTTP echo server (``upstream_http.py``) called directly;
- ``bastion-http``: a bastion cluster (``bastion start``) in front of that server;
- ``direct-stdio``: the bench stdio echo server (``upstream_stdio.py``) driven over its pipes;
- ``bastion-stdio``: bastion in front of the stdio server (one child process per session);
- ``bastion2026-http``, ``bastion2026-stdio``: the same gateway and apps, called as an MCP
  2026-07-28 client calls (no session: each POST carries its envelope in ``_meta``; the gateway
  holds the upstream session); reported also as ratios against the session path and the direct
  server (no session set-up or idle-session figures: there are no client sessions);
- the peers installable here, each in front of the same stdio server: ``supergateway``
  (``--stateful``), ``mcp-proxy-npm`` (bench/node) and ``mcp-proxy-pypi`` (.venv-peers).

Placement: the measured process (gateway, peer, or the direct server) runs on core 0; wrk, this
script, the upstream servers and every stdio child (started through ``taskset -c 1``) on core 1.

Per target and repetition (targets interleaved, order rotated each repetition):

- throughput: ``wrk -t1 -c{1,16,64}`` with ``tools_call.lua`` (one session, unique request ids);
  calls/s, and calls per CPU-second of the measured process (utime+stime from /proc; the stdio
  children's CPU is reported apart, never counted as the gateway's);
- latency at concurrency 1: a blocking Python client (one keep-alive connection, one call at a
  time, ``perf_counter_ns`` around each); wrk's own c=1 percentiles are kept in the JSON too;
- session set-up: initialize + initialized + tools/list + DELETE cycles/s, 16 concurrent clients.

Once per target, after the warm-up and before the repetitions: memory per idle session (RSS of the
measured process over two steps of N idle sessions, 500 per step, 50 where every session spawns a
stdio child; the figure is the second step's increase / N; the children's RSS apart).

This host is shared: before each target's block the script waits (up to ``--max-wait`` s) for
the cores to quieten, records how much CPU other tenants used during every throughput run, and
measures a run again (keeping the quieter one) when they used more than a quarter of a core.

Results: a Markdown table on stdout and JSON in ``bench/results/<timestamp>.json`` (gitignored).
Medians of the repetitions.  Not a test: no assertions.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mcp_client as mc

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PY = sys.executable
NODE22 = ROOT / "tests" / "node" / "node_modules" / "node" / "bin" / "node"
SUPERGATEWAY_JS = ROOT / "tests" / "node" / "node_modules" / "supergateway" / "dist" / "index.js"
MCP_PROXY_NPM_JS = BENCH / "node" / "node_modules" / "mcp-proxy" / "dist" / "bin" / "mcp-proxy.mjs"
MCP_PROXY_PYPI = ROOT / ".venv-peers" / "bin" / "mcp-proxy"
TASKSET = shutil.which("taskset") or "/usr/bin/taskset"
LUA = BENCH / "tools_call.lua"
GW_CORE, LOAD_CORE = 0, 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
CONCURRENCY = (1, 16, 64)
#: A throughput run during which other tenants used more than this many cores is measured again.
NOISY = 0.25

# ------------------------------------------------------------------ processes


def threads_of(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def pin(pid: int, core: int) -> None:
    """Pin every thread of ``pid`` to ``core``."""
    for tid in threads_of(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.sched_setaffinity(tid, {core})


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds; 0 if it is gone."""
    try:
        f = _stat_fields(pid)
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(f[11]) + int(f[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_KIB
    except (FileNotFoundError, ProcessLookupError):
        return 0


def descendants(*roots: int) -> list[int]:
    """Every process below ``roots`` (children, their children...)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(_stat_fields(int(entry))[1])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def core_busy() -> dict[int, tuple[int, ...]]:
    """Per-core jiffies from /proc/stat: (busy, total, task time, irq + softirq, steal); busy counts
    everything but idle and iowait, task time is user + nice + system."""
    out: dict[int, tuple[int, ...]] = {}
    with open("/proc/stat") as f:
        for line in f:
            m = re.match(r"cpu(\d+) (.*)", line)
            if m:
                v = [int(x) for x in m.group(2).split()]
                total = sum(v[:8])
                out[int(m.group(1))] = (total - v[3] - v[4], total, v[0] + v[1] + v[2], v[5] + v[6], v[7])
    return out


def quiet(max_wait: float, threshold: float = 25.0) -> dict[str, float]:
    """Wait (up to ``max_wait`` s) until neither core is more than ``threshold`` % busy with other
    work (this host is shared); returns the last 0.5 s sample, kept with the results."""
    end = time.monotonic() + max_wait
    while True:
        before = core_busy()
        time.sleep(0.5)
        sample = busy_pct(before, core_busy())
        if max(sample.values()) <= threshold or time.monotonic() >= end:
            return sample
        time.sleep(1.0)


def busy_pct(before: dict[int, tuple[int, ...]], after: dict[int, tuple[int, ...]]) -> dict[str, float]:
    out = {}
    for core in before:
        db = after[core][0] - before[core][0]
        dt = after[core][1] - before[core][1]
        out[f"core{core}"] = round(100.0 * db / dt, 1) if dt else 0.0
    return out


def foreign_cores(
    before: dict[int, tuple[int, ...]], after: dict[int, tuple[int, ...]], ours_s: float
) -> dict[str, float]:
    """Cores' worth of CPU, over a run, used by tasks not ours ("foreign": this host is shared),
    by interrupts (loopback networking's softirq time is not charged to any process) and stolen by
    the hypervisor."""

    def cores(i: int) -> float:
        return sum(after[c][i] - before[c][i] for c in before) / CLK_TCK

    wall = sum(after[c][1] - before[c][1] for c in before) / CLK_TCK / len(before)
    if not wall:
        return {}
    return {
        "foreign": round(max(0.0, cores(2) - ours_s) / wall, 3),
        "irq": round(cores(3) / wall, 3),
        "steal": round(cores(4) / wall, 3),
    }


ALL_PROCS: list[subprocess.Popen[bytes]] = []


def our_cpu() -> float:
    """CPU seconds of everything this run started (and their children), of wrk runs that ended, and
    of this process."""
    pids = [p.pid for p in ALL_PROCS if p.poll() is None]
    every = set(pids) | set(descendants(*pids))
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return sum(cpu_seconds(p) for p in every) + ru.ru_utime + ru.ru_stime + time.process_time()


class Procs:
    """Every process this run starts (each in a session of its own); stopped by their ids."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        name: str,
        cmd: list[str],
        *,
        core: int,
        env: dict[str, str] | None = None,
        stdout: int | None = None,
    ) -> subprocess.Popen[bytes]:
        log = (self.logdir / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [TASKSET, "-c", str(core), *cmd],
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else log,
            stderr=log,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
        self.procs.append(proc)
        ALL_PROCS.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.logdir / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            # children left in the group (stdio servers) go with it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(
    port: int, proc: subprocess.Popen[bytes], what: str, procs: Procs, deadline: float = 30
) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}):\n{procs.log(what)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {deadline}s:\n{procs.log(what)}")


def stdio_cmd() -> list[str]:
    """The stdio echo server, started on the load core whoever spawns it."""
    return [TASKSET, "-c", str(LOAD_CORE), PY, str(BENCH / "upstream_stdio.py")]


# -------------------------------------------------------------------- targets


@dataclass
class Target:
    key: str
    name: str
    upstream: str  # "http" | "stdio"
    pid: int  # the measured process
    url: str = ""
    token: str = ""
    ssl_ctx: ssl.SSLContext | None = None
    sid: str = ""
    idle_n: int = 500
    spawns_per_session: bool = False
    modern: bool = False  # MCP 2026-07-28: sessionless calls
    pipe: subprocess.Popen[bytes] | None = None  # direct-stdio only
    on_enter: Callable[[], None] | None = None
    on_exit: Callable[[], None] | None = None
    results: dict[str, Any] = field(default_factory=dict)

    def client_target(self) -> mc.Target:
        return mc.Target(self.url, token=self.token, ssl_ctx=self.ssl_ctx, modern=self.modern)


#: More YAML appended to the measured gateway's configuration (``--gateway-config``), e.g. an
#: ``audit.export`` to a dead port, to measure what a setting costs per call.
GATEWAY_CONFIG_EXTRA = ""
#: A CEL expression (``--tool-rule``): the bench user also gets a role with one deny argument
#: rule on ``echo`` (decision 0044), to measure what a rule costs per call.
TOOL_RULE = ""
#: The rule ``--tool-rule`` uses when given without an expression; the bench's echo calls pass it.
DEFAULT_TOOL_RULE = 'has(arguments.message) && arguments.message.contains("secret")'


def start_bastion(
    procs: Procs, tmp: Path, http_port: int, name: str = "bastion", src: Path | None = None
) -> tuple[int, str, str, ssl.SSLContext, Path]:
    """A one-node cluster with apps bench-http and bench-stdio and a user `bench` (mcp-user).

    ``src``: run the package from that source tree (a checkout of an earlier commit) instead.
    """
    root = tmp / name
    root.mkdir()
    stdio = stdio_cmd()
    run_as = "root" if os.geteuid() == 0 else ""
    config = root / "bastion.yaml"
    config.write_text(
        "version: v1\n"
        "bastion:\n"
        f"  data_dir: {root / 'data'}\n"
        "  cluster_name: bench\n"
        "auth_service:\n"
        "  listen_addr: 127.0.0.1:0\n"
        "proxy_service:\n"
        "  listen_addr: 127.0.0.1:0\n"
        "app_service:\n"
        "  sessions_per_user: 100000\n"
        # The idle-memory step opens 100 stdio sessions as one user (default cap: 16);
        # a baseline from before stdio_limits existed does not know the key.
        + ("  stdio_limits: {per_user: 100000, per_app: 100000}\n" if _knows_stdio_limits(src) else "")
        + "  apps:\n"
        "  - name: bench-http\n"
        f"    uri: mcp+http://127.0.0.1:{http_port}/mcp\n"
        "  - name: bench-stdio\n"
        "    mcp:\n"
        f"      command: {stdio[0]}\n"
        f"      args: {json.dumps(stdio[1:])}\n"
        f"      run_as_host_user: {json.dumps(run_as)}\n" + (GATEWAY_CONFIG_EXTRA if src is None else "")
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    if src is not None:
        env["PYTHONPATH"] = str(src)
    proc = procs.start(
        name, [PY, "-m", "bastion.cli.main", "start", "--config", str(config)], core=GW_CORE, env=env
    )
    end = time.monotonic() + 60
    addr = ""
    while not addr:
        m = re.search(r"proxy listening addr=https://([\d.]+:\d+)", procs.log(name))
        if m:
            addr = m.group(1)
        elif proc.poll() is not None or time.monotonic() > end:
            raise RuntimeError(f"{name} start failed:\n{procs.log(name)}")
        else:
            time.sleep(0.1)

    cli_env = dict(env, BASTION_CONFIG=str(config), BASTION_HOME=str(root / "home"), NO_COLOR="1")

    def cli(*args: str) -> str:
        res = subprocess.run(
            [PY, "-m", "bastion.cli.main", *args],
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if res.returncode != 0:
            raise RuntimeError(f"bastion {' '.join(args)} failed: {res.stdout}{res.stderr}")
        return res.stdout

    roles = "mcp-user"
    if TOOL_RULE and src is None:
        rule = {"name": "bench-rule", "tools": ["echo"], "when": TOOL_RULE}
        doc = {"kind": "role", "version": "v1", "metadata": {"name": "bench-rule"}}
        doc["spec"] = {"allow": {"app_labels": {"*": "*"}}, "deny": {"mcp": {"tool_rules": [rule]}}}
        (root / "bench-rule.json").write_text(json.dumps(doc))
        cli("create", str(root / "bench-rule.json"))
        roles += ",bench-rule"
    cli("users", "add", "bench", f"--roles={roles}")
    token = cli("auth", "sign", "--user=bench", "--format=token", "--ttl=8h").strip()
    ca = root / "ca.pem"
    ca.write_text(cli("auth", "export", "--type=tls"))
    ctx = ssl.create_default_context(cafile=str(ca))
    return proc.pid, f"https://{addr}", token, ctx, root / "data"


def _knows_stdio_limits(src: Path | None) -> bool:
    """Whether the gateway's source (None: this checkout) has ``app_service.stdio_limits``."""
    return src is None or "stdio_limits" in (src / "bastion" / "config.py").read_text()


def start_all(procs: Procs, tmp: Path, skipped: dict[str, str], baseline: Path | None = None) -> list[Target]:
    targets: list[Target] = []

    up = procs.start(
        "upstream-http", [PY, str(BENCH / "upstream_http.py")], core=LOAD_CORE, stdout=subprocess.PIPE
    )
    assert up.stdout is not None
    http_port = int(up.stdout.readline())
    up_pid = up.pid
    targets.append(
        Target(
            "direct-http",
            "HTTP echo server, direct",
            "http",
            up_pid,
            url=f"http://127.0.0.1:{http_port}/mcp",
            on_enter=lambda: pin(up_pid, GW_CORE),
            on_exit=lambda: pin(up_pid, LOAD_CORE),
        )
    )

    gw_pid, base, token, ctx, _ = start_bastion(procs, tmp, http_port)
    targets.append(
        Target(
            "bastion-http",
            "bastion → HTTP upstream",
            "http",
            gw_pid,
            url=f"{base}/mcp/apps/bench-http",
            token=token,
            ssl_ctx=ctx,
        )
    )

    pipe = subprocess.Popen(
        [TASKSET, "-c", str(GW_CORE), PY, str(BENCH / "upstream_stdio.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    procs.procs.append(pipe)
    ALL_PROCS.append(pipe)
    targets.append(Target("direct-stdio", "stdio echo server, direct (pipe)", "stdio", pipe.pid, pipe=pipe))
    targets.append(
        Target(
            "bastion-stdio",
            "bastion → stdio upstream",
            "stdio",
            gw_pid,
            url=f"{base}/mcp/apps/bench-stdio",
            token=token,
            ssl_ctx=ctx,
            idle_n=50,
            spawns_per_session=True,
        )
    )

    for kind in ("http", "stdio"):
        targets.append(
            Target(
                f"bastion2026-{kind}",
                f"bastion → {kind} upstream, 2026-07-28 client",
                kind,
                gw_pid,
                url=f"{base}/mcp/apps/bench-{kind}",
                token=token,
                ssl_ctx=ctx,
                modern=True,
            )
        )

    if baseline is not None:
        # The same gateway at an earlier commit, same machine, same run: "before" figures.
        b_pid, b_base, b_token, b_ctx, _ = start_bastion(procs, tmp, http_port, "before", baseline / "src")
        for kind, app, extra in (("http", "bench-http", {}), ("stdio", "bench-stdio", {"idle_n": 50})):
            targets.append(
                Target(
                    f"before-{kind}",
                    f"bastion before (baseline) → {kind} upstream",
                    kind,
                    b_pid,
                    url=f"{b_base}/mcp/apps/{app}",
                    token=b_token,
                    ssl_ctx=b_ctx,
                    spawns_per_session=kind == "stdio",
                    **extra,  # type: ignore[arg-type]
                )
            )

    peers: list[tuple[str, str, list[str], Path, bool]] = []
    stdio_line = " ".join(stdio_cmd())
    peers.append(
        (
            "supergateway",
            "supergateway 4.0.0 --stateful → stdio",
            [
                str(NODE22),
                str(SUPERGATEWAY_JS),
                "--stdio",
                stdio_line,
                "--outputTransport",
                "streamableHttp",
                "--stateful",
                "--port",
                "{port}",
                "--logLevel",
                "none",
            ],
            SUPERGATEWAY_JS,
            True,
        )
    )
    peers.append(
        (
            "mcp-proxy-npm",
            "mcp-proxy 6.7.19 (npm) → stdio",
            [
                str(NODE22),
                str(MCP_PROXY_NPM_JS),
                "--port",
                "{port}",
                "--host",
                "127.0.0.1",
                "--server",
                "stream",
                "--",
                *stdio_cmd(),
            ],
            MCP_PROXY_NPM_JS,
            False,
        )
    )
    peers.append(
        (
            "mcp-proxy-pypi",
            "mcp-proxy 0.13.0 (PyPI) → stdio",
            [
                str(MCP_PROXY_PYPI),
                "--port",
                "{port}",
                "--host",
                "127.0.0.1",
                "--log-level",
                "WARNING",
                "--",
                *stdio_cmd(),
            ],
            MCP_PROXY_PYPI,
            False,
        )
    )
    for key, name, cmd, needs, spawns in peers:
        if not needs.exists() or (str(NODE22) in cmd and not NODE22.exists()):
            skipped[key] = f"{needs.relative_to(ROOT)} is not installed (run `make bench-deps`)"
            continue
        port = free_port()
        proc = procs.start(key, [c.replace("{port}", str(port)) for c in cmd], core=GW_CORE)
        try:
            wait_port(port, proc, key, procs)
        except RuntimeError as e:
            skipped[key] = f"did not start: {str(e)[:300]}"
            continue
        targets.append(
            Target(
                key,
                name,
                "stdio",
                proc.pid,
                url=f"http://127.0.0.1:{port}/mcp",
                idle_n=50 if spawns else 500,
                spawns_per_session=spawns,
            )
        )
    return targets


# ---------------------------------------------------------------- measuring


@contextlib.contextmanager
def measuring(t: Target) -> Iterator[None]:
    if t.on_enter:
        t.on_enter()
    try:
        yield
    finally:
        if t.on_exit:
            t.on_exit()


def cpu_snapshot(t: Target) -> tuple[float, dict[int, float]]:
    kids = {p: cpu_seconds(p) for p in descendants(t.pid)}
    return cpu_seconds(t.pid), kids


def cpu_delta(
    before: tuple[float, dict[int, float]], after: tuple[float, dict[int, float]]
) -> tuple[float, float]:
    own = after[0] - before[0]
    kids = sum(after[1][p] - before[1].get(p, 0.0) for p in after[1])
    return own, kids


_ID_BASE = [0]


def next_id_base() -> int:
    _ID_BASE[0] += 10_000_000
    return _ID_BASE[0]


def wrk_run(t: Target, conns: int, duration: float) -> dict[str, Any]:
    env = dict(os.environ, MCP_SESSION_ID=t.sid, BEARER_TOKEN=t.token, ID_BASE=str(next_id_base()))
    if t.modern:
        env["MCP_MODERN"] = "1"
    cmd = [
        TASKSET,
        "-c",
        str(LOAD_CORE),
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        t.url,
    ]
    cores0, cpu0, ours0 = core_busy(), cpu_snapshot(t), our_cpu()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration + 60, check=False)
    ours1, cpu1, cores1 = our_cpu(), cpu_snapshot(t), core_busy()
    m = re.search(r"^WRKJSON (\{.*\})$", res.stdout, re.M)
    if res.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed for {t.key}: {res.stdout}{res.stderr}")
    w = json.loads(m.group(1))
    own, kids = cpu_delta(cpu0, cpu1)
    ok = w["requests"] - w["status"]
    wall = w["duration_us"] / 1e6
    errors = w["connect"] + w["read"] + w["write"] + w["status"] + w["timeout"]
    return {
        "concurrency": conns,
        "calls": ok,
        "calls_per_s": ok / wall,
        "errors": errors,
        "gateway_cpu_s": own,
        "children_cpu_s": kids,
        "calls_per_gateway_cpu_s": ok / own if own > 0 else None,
        "gateway_cpu_us_per_call": own / ok * 1e6 if ok else None,
        "children_cpu_us_per_call": kids / ok * 1e6 if ok else None,
        "busy": busy_pct(cores0, cores1),
        "other_load": foreign_cores(cores0, cores1, ours1 - ours0),
        "wrk_p50_us": w["p50_us"],
        "wrk_p99_us": w["p99_us"],
        "wrk_mean_us": w["mean_us"],
        # wrk's c=1 histogram was inconsistent on this VM (see docs/benchmarks.md): keep a check.
        "wrk_mean_x_calls_over_wall": round(w["mean_us"] * w["requests"] / w["duration_us"], 2),
    }


def pipe_run(t: Target, conns: int, duration: float) -> dict[str, Any]:
    """direct-stdio: keep ``conns`` requests outstanding on the pipe; latency per call at conns=1."""
    assert t.pipe is not None and t.pipe.stdin is not None and t.pipe.stdout is not None
    fin, fout = t.pipe.stdin.fileno(), t.pipe.stdout.fileno()
    base = next_id_base()
    head = b'{"jsonrpc":"2.0","id":'
    tail = b',"method":"tools/call","params":{"name":"echo","arguments":{"message":"hello from pipe"}}}\n'
    n = 0

    def reqs(k: int) -> bytes:
        nonlocal n
        out = []
        for _ in range(k):
            n += 1
            out.append(head + str(base + n).encode() + tail)
        return b"".join(out)

    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fin, view) :]

    cores0, cpu0, ours0 = core_busy(), cpu_snapshot(t), our_cpu()
    pc = time.perf_counter_ns
    lat: list[int] = []
    got = bad = 0
    pending = b""
    start = time.perf_counter()
    end = start + duration
    outstanding = conns
    t0 = pc()
    write(reqs(conns))
    while outstanding:
        data = os.read(fout, 1 << 16)
        if not data:
            raise RuntimeError("the stdio server closed its stdout")
        *lines, pending = (pending + data).split(b"\n")
        k = len(lines)
        if not k:
            continue
        now = pc()
        if conns == 1:
            lat.append(now - t0)
        got += k
        bad += sum(1 for line in lines if b'"result"' not in line)
        if time.perf_counter() < end:
            t0 = now
            write(reqs(k))
        else:
            outstanding -= k
    wall = time.perf_counter() - start
    ours1, cpu1, cores1 = our_cpu(), cpu_snapshot(t), core_busy()
    own, _ = cpu_delta(cpu0, cpu1)
    out: dict[str, Any] = {
        "concurrency": conns,
        "calls": got,
        "calls_per_s": got / wall,
        "errors": bad,
        "gateway_cpu_s": own,
        "children_cpu_s": 0.0,
        "calls_per_gateway_cpu_s": got / own if own > 0 else None,
        "gateway_cpu_us_per_call": own / got * 1e6 if got else None,
        "children_cpu_us_per_call": None,
        "busy": busy_pct(cores0, cores1),
        "other_load": foreign_cores(cores0, cores1, ours1 - ours0),
    }
    if lat:
        lat.sort()
        k = len(lat)
        out["latency"] = {
            "calls": k,
            "calls_per_s": k / wall,
            "p50_us": lat[k // 2] / 1000,
            "p90_us": lat[int(k * 0.9)] / 1000,
            "p99_us": lat[min(k - 1, int(k * 0.99))] / 1000,
            "mean_us": sum(lat) / k / 1000,
            "bad": 0,
        }
    return out


def open_pipe_session(t: Target) -> None:
    assert t.pipe is not None and t.pipe.stdin is not None and t.pipe.stdout is not None
    t.pipe.stdin.write(mc.initialize_body() + b"\n")
    t.pipe.stdin.flush()
    line = t.pipe.stdout.readline()
    if b'"result"' not in line:
        raise RuntimeError(f"direct stdio initialize failed: {line[:300]!r}")
    t.pipe.stdin.write(mc.INITIALIZED + b"\n")
    t.pipe.stdin.flush()


def open_wrk_session(t: Target) -> None:
    """The session wrk loads; checks one call end to end first."""
    if t.pipe is not None:
        open_pipe_session(t)
        return
    conn = mc.BlockingConn(t.client_target())
    try:
        if not t.modern:
            t.sid, _ = conn.open_session()
        msg = conn.call(t.sid, 1, "check")
        text = msg["result"]["content"][0]["text"] if msg and "result" in msg else None
        if text != "check":
            raise RuntimeError(f"{t.key}: unexpected tools/call answer {msg!r}")
    finally:
        conn.close()


def idle_memory(t: Target, n: int) -> dict[str, Any]:
    """RSS of the measured process over two steps of ``n`` idle sessions each (initialize +
    initialized, then nothing).  The figure is the second step's increase / n: the first step
    also fills whatever the allocator had free from earlier runs.  Children's RSS apart."""
    target = t.client_target()

    def sample() -> tuple[int, int, int]:
        kids = descendants(t.pid)
        return rss_kib(t.pid), sum(rss_kib(p) for p in kids), len(kids)

    time.sleep(0.5)
    s0 = sample()
    sids = mc.open_idle_sessions(target, n)
    time.sleep(1.0)
    s1 = sample()
    sids += mc.open_idle_sessions(target, n)
    time.sleep(1.0)
    s2 = sample()
    closed = mc.close_sessions(target, sids)
    return {
        "sessions_per_step": n,
        "rss_kib": [s0[0], s1[0], s2[0]],
        "children_rss_kib": [s0[1], s1[1], s2[1]],
        "children": [s0[2], s1[2], s2[2]],
        "kib_per_session": (s2[0] - s1[0]) / n,
        "kib_per_session_first_step": (s1[0] - s0[0]) / n,
        "children_kib_per_session": (s2[1] - s1[1]) / n,
        "closed": closed,
    }


def audit_rows(data_dir: Path, sids: list[str]) -> dict[str, Any]:
    db = data_dir / "audit.db"
    if not db.exists():
        return {}
    wal = db.with_name(db.name + "-wal")
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        rows: dict[str, Any] = {}
        out: dict[str, Any] = {
            "audit_db_mib": round(db.stat().st_size / 2**20, 1),
            "audit_wal_mib": round(wal.stat().st_size / 2**20, 1) if wal.exists() else 0,
            "rows_per_session": rows,
        }
        for sid in sids:
            row = con.execute(
                "SELECT count(*), sum(success) FROM audit_events WHERE session_id=? AND type=?",
                (sid, "mcp.session.request"),
            ).fetchone()
            rows[sid] = {"requests": row[0], "succeeded": row[1] or 0}
        return out
    finally:
        con.close()


# ------------------------------------------------------------------- report


def med(values: list[Any]) -> Any:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(t: Target) -> dict[str, Any]:
    r = t.results
    s: dict[str, Any] = {"name": t.name, "upstream": t.upstream}
    for c in CONCURRENCY:
        runs = r.get(f"c{c}", [])
        s[f"calls_per_s_c{c}"] = med([x["calls_per_s"] for x in runs])
        s[f"calls_per_gateway_cpu_s_c{c}"] = med([x["calls_per_gateway_cpu_s"] for x in runs])
        s[f"gateway_cpu_us_per_call_c{c}"] = med([x["gateway_cpu_us_per_call"] for x in runs])
        s[f"children_cpu_us_per_call_c{c}"] = med([x["children_cpu_us_per_call"] for x in runs])
        s[f"core0_busy_c{c}"] = med([x["busy"].get(f"core{GW_CORE}") for x in runs])
        s[f"core1_busy_c{c}"] = med([x["busy"].get(f"core{LOAD_CORE}") for x in runs])
        s[f"errors_c{c}"] = sum(x["errors"] for x in runs)
        s[f"foreign_cores_c{c}"] = med([x.get("other_load", {}).get("foreign") for x in runs])
    lat = r.get("latency", [])
    for k in ("p50_us", "p90_us", "p99_us", "mean_us"):
        s[f"lat_{k}"] = med([x[k] for x in lat])
    s["wrk_c1_p50_us"] = med([x.get("wrk_p50_us") for x in r.get("c1", [])])
    s["wrk_c1_p99_us"] = med([x.get("wrk_p99_us") for x in r.get("c1", [])])
    setup = r.get("setup", [])
    s["sessions_per_s"] = med([x["sessions_per_s"] for x in setup])
    s["setup_errors"] = sum(x["errors"] for x in setup)
    mem = r.get("memory")
    s["kib_per_idle_session"] = mem["kib_per_session"] if mem else None
    s["kib_per_idle_session_first_step"] = mem["kib_per_session_first_step"] if mem else None
    s["children_kib_per_idle_session"] = mem["children_kib_per_session"] if mem else None
    bg = [max(x.values()) for x in r.get("background_busy", []) if x]
    s["background_busy_max_pct"] = max(bg) if bg else None
    return s


def fmt(v: Any, digits: int = 0) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}"


def table(summary: dict[str, dict[str, Any]]) -> str:
    d_http = summary.get("direct-http", {})
    d_stdio = summary.get("direct-stdio", {})
    rows = [
        "| target | calls/s c=1 | c=16 | c=64 | calls per gateway CPU-s (c=64) | gateway CPU µs/call (c=64) "
        "| p50 µs c=1 | p99 µs c=1 | added p50 / p99 µs | sessions/s | KiB per idle session |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, s in summary.items():
        base = d_http if s["upstream"] == "http" else d_stdio
        added = "—"
        if (
            not key.startswith("direct")
            and s["lat_p50_us"] is not None
            and base.get("lat_p50_us") is not None
        ):
            added = (
                f"{s['lat_p50_us'] - base['lat_p50_us']:,.0f} / {s['lat_p99_us'] - base['lat_p99_us']:,.0f}"
            )
        mem = fmt(s["kib_per_idle_session"], 1)
        if s.get("children_kib_per_idle_session"):
            mem += f" (+{s['children_kib_per_idle_session']:,.0f} child)"
        rows.append(
            f"| {s['name']} | {fmt(s['calls_per_s_c1'])} | {fmt(s['calls_per_s_c16'])} "
            f"| {fmt(s['calls_per_s_c64'])} | {fmt(s['calls_per_gateway_cpu_s_c64'])} "
            f"| {fmt(s['gateway_cpu_us_per_call_c64'], 1)} | {fmt(s['lat_p50_us'])} | {fmt(s['lat_p99_us'])} "
            f"| {added} | {fmt(s['sessions_per_s'])} | {mem} |"
        )
    return "\n".join(rows)


def ratios(summary: dict[str, dict[str, Any]]) -> str:
    b_http, b_stdio = summary.get("bastion-http"), summary.get("bastion-stdio")
    if not b_stdio:
        return ""
    rows = [
        "| vs bastion → stdio | calls/s c=16 | calls/s c=64 | calls per proxy CPU-s (c=64) | p50 c=1 "
        "| sessions/s | KiB per idle session |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def ratio(a: Any, b: Any) -> str:
        return f"{a / b:.2f}x" if a and b else "—"

    others = [(k, s) for k, s in summary.items() if s["upstream"] == "stdio" and k != "bastion-stdio"]
    if b_http:
        others.insert(0, ("bastion-http", b_http))
    for _key, s in others:
        rows.append(
            f"| {s['name']} | {ratio(s['calls_per_s_c16'], b_stdio['calls_per_s_c16'])} "
            f"| {ratio(s['calls_per_s_c64'], b_stdio['calls_per_s_c64'])} "
            f"| {ratio(s['calls_per_gateway_cpu_s_c64'], b_stdio['calls_per_gateway_cpu_s_c64'])} "
            f"| {ratio(s['lat_p50_us'], b_stdio['lat_p50_us'])} "
            f"| {ratio(s['sessions_per_s'], b_stdio['sessions_per_s'])} "
            f"| {ratio(s['kib_per_idle_session'], b_stdio['kib_per_idle_session'])} |"
        )
    return "\n".join(rows)


def ratios_2026(summary: dict[str, dict[str, Any]]) -> str:
    """The 2026-07-28 path against the session path and the direct server, same run."""
    rows = [
        "| 2026-07-28 client, per upstream | gateway CPU µs/call c=64: 2026 / session | calls per gateway "
        "CPU-s c=64: 2026 / session | calls/s c=64: 2026 / session | calls/s c=64: 2026 / direct "
        "| p50 c=1: 2026 / session | p50 c=1: 2026 / direct |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def ratio(a: Any, b: Any) -> str:
        return f"{a / b:.2f}x" if a and b else "—"

    for kind in ("http", "stdio"):
        m = summary.get(f"bastion2026-{kind}")
        if not m:
            continue
        ses, d = summary.get(f"bastion-{kind}", {}), summary.get(f"direct-{kind}", {})
        k = "gateway_cpu_us_per_call_c64"
        rows.append(
            f"| {kind} | {ratio(m.get(k), ses.get(k))} "
            f"| {ratio(m.get('calls_per_gateway_cpu_s_c64'), ses.get('calls_per_gateway_cpu_s_c64'))} "
            f"| {ratio(m.get('calls_per_s_c64'), ses.get('calls_per_s_c64'))} "
            f"| {ratio(m.get('calls_per_s_c64'), d.get('calls_per_s_c64'))} "
            f"| {ratio(m.get('lat_p50_us'), ses.get('lat_p50_us'))} "
            f"| {ratio(m.get('lat_p50_us'), d.get('lat_p50_us'))} |"
        )
    return "\n".join(rows) if len(rows) > 2 else ""


def verdicts(summary: dict[str, dict[str, Any]]) -> list[tuple[str, str, bool | None]]:
    out: list[tuple[str, str, bool | None]] = []
    h, s = summary.get("bastion-http", {}), summary.get("bastion-stdio", {})
    dh, ds = summary.get("direct-http", {}), summary.get("direct-stdio", {})

    def best(x: dict[str, Any], k: str) -> float | None:
        vals = [x.get(f"{k}_c{c}") for c in (16, 64)]
        vals = [v for v in vals if v is not None]
        return max(vals) if vals else None

    v = best(h, "calls_per_s")
    out.append(("≥ 10,000 calls/s on one core, HTTP upstream", fmt(v), v >= 10_000 if v else None))
    v = best(s, "calls_per_gateway_cpu_s")
    out.append(("≥ 10,000 calls per gateway CPU-s, stdio upstream", fmt(v), v >= 10_000 if v else None))
    for label, g, d in (("HTTP", h, dh), ("stdio", s, ds)):
        if g.get("lat_p50_us") is not None and d.get("lat_p50_us") is not None:
            added = g["lat_p50_us"] - d["lat_p50_us"]
            out.append((f"p50 added latency ≤ 0.5 ms, {label} upstream", f"{added:,.0f} µs", added <= 500))
    v = h.get("sessions_per_s")
    out.append(("≥ 1,000 session set-ups/s, HTTP upstream", fmt(v), v >= 1000 if v else None))
    v = h.get("kib_per_idle_session")
    out.append(("≤ 32 KiB per idle session, HTTP upstream", fmt(v, 1), v <= 32 if v is not None else None))
    v = s.get("kib_per_idle_session")
    out.append(
        (
            "≤ 32 KiB per idle session, stdio upstream (gateway only)",
            fmt(v, 1),
            v <= 32 if v is not None else None,
        )
    )
    return out


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        m = re.search(r"model name\s*:\s*(.*)", f.read())
        model = m.group(1) if m else ""
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False).stdout.split("\n")[0]
    node_v = ""
    if NODE22.exists():
        node_v = subprocess.run(
            [str(NODE22), "--version"], capture_output=True, text=True, check=False
        ).stdout
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "mem_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "node": node_v.strip(),
        "wrk": wrk_v.strip(),
        "loadavg_start": os.getloadavg(),
    }


# --------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description="mcp-bastion benchmark (see docs/benchmarks.md)")
    ap.add_argument("--quick", action="store_true", help="one repetition, short runs (~2 minutes)")
    ap.add_argument("--reps", type=int, help="repetitions (default 3; 1 with --quick)")
    ap.add_argument("--duration", type=float, help="seconds per wrk run (default 4; 2 with --quick)")
    ap.add_argument("--only", default="", help="comma-separated target keys to run (default: all)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, audit.db)")
    ap.add_argument(
        "--baseline",
        default="",
        help="a git commit: also measure the gateway at that commit (targets before-http, before-stdio)",
    )
    ap.add_argument(
        "--gateway-config",
        default="",
        help=r"YAML appended to the measured gateway's config (\n for newlines), e.g. "
        r"'audit:\n  export:\n    http: {url: \"http://127.0.0.1:9/\"}'",
    )
    ap.add_argument(
        "--tool-rule",
        nargs="?",
        const=DEFAULT_TOOL_RULE,
        default="",
        help="give the bench user one deny argument rule on echo (a CEL expression; default "
        f"{DEFAULT_TOOL_RULE!r}, which the bench's calls pass)",
    )
    ap.add_argument(
        "--max-wait",
        type=float,
        default=5.0,
        help="seconds to wait, before each target's block, for other load on the cores to fall",
    )
    args = ap.parse_args()
    global GATEWAY_CONFIG_EXTRA, TOOL_RULE
    TOOL_RULE = args.tool_rule
    GATEWAY_CONFIG_EXTRA = args.gateway_config.replace("\\n", "\n")
    if GATEWAY_CONFIG_EXTRA and not GATEWAY_CONFIG_EXTRA.endswith("\n"):
        GATEWAY_CONFIG_EXTRA += "\n"
    if (os.cpu_count() or 1) < 2:
        print("needs at least 2 CPUs (gateway on core 0, load on core 1)", file=sys.stderr)
        return 2
    if not shutil.which("wrk"):
        print("wrk not found: run `make bench-deps` (apt-get install wrk)", file=sys.stderr)
        return 2
    reps = args.reps or (1 if args.quick else 3)
    dur = args.duration or (2.0 if args.quick else 4.0)
    lat_dur = 1.5 if args.quick else 2.5
    setup_dur = 1.5 if args.quick else 2.5
    idle_scale = 0.4 if args.quick else 1.0
    os.sched_setaffinity(0, {LOAD_CORE})

    started = datetime.datetime.now(datetime.UTC)
    meta = machine()
    meta.update(
        {
            "reps": reps,
            "wrk_seconds": dur,
            "latency_seconds": lat_dur,
            "setup_seconds": setup_dur,
            "setup_concurrency": 16,
            "quick": args.quick,
            "started": started.isoformat(),
        }
    )
    skipped: dict[str, str] = {}
    tmp = Path(tempfile.mkdtemp(prefix="bastion-bench-"))
    procs = Procs(tmp)
    t_start = time.monotonic()
    try:
        print(f"starting servers (logs in {tmp}) ...", flush=True)
        baseline = None
        if args.baseline:
            baseline = tmp / "baseline-src"
            subprocess.run(
                ["git", "-C", str(BENCH.parent), "worktree", "add", "--detach", str(baseline), args.baseline],
                check=True,
                capture_output=True,
            )
            meta["baseline"] = args.baseline
        targets = start_all(procs, tmp, skipped, baseline)
        if args.only:
            keep = set(args.only.split(","))
            targets = [t for t in targets if t.key in keep]
        gw_pid = next((t.pid for t in targets if t.key.startswith("bastion")), None)
        data_dir = tmp / "bastion" / "data"
        for t in targets:
            open_wrk_session(t)
        # Warm-up: connections, caches, JIT (node), allocator arenas.
        for t in targets:
            with measuring(t):
                if t.pipe is not None:
                    pipe_run(t, 16, 1.0)
                else:
                    wrk_run(t, 16, 1.0)
        meta["affinity"] = {t.key: sorted(os.sched_getaffinity(t.pid)) for t in targets}
        phases = meta.setdefault("phase_s", {})
        phases["start_and_warm_up"] = round(time.monotonic() - t_start, 1)
        # Idle memory first, before the set-up cycles leave freed session memory to reuse.
        for t in targets:
            if t.pipe is not None or t.key == "direct-http" or t.modern:
                continue
            n = max(20, int(t.idle_n * idle_scale))
            print(f"idle memory {t.key} (2 x {n} sessions) ...", flush=True)
            t.results["background_busy"] = [quiet(args.max_wait)]
            with measuring(t):
                t.results["memory"] = idle_memory(t, n)
        phases["idle_memory"] = round(time.monotonic() - t_start - phases["start_and_warm_up"], 1)
        for rep in range(reps):
            order = targets[rep % len(targets) :] + targets[: rep % len(targets)]
            for t in order:
                print(f"rep {rep + 1}/{reps} {t.key} ...", flush=True)
                t.results.setdefault("background_busy", []).append(quiet(args.max_wait))
                with measuring(t):
                    for c in CONCURRENCY:
                        run = pipe_run(t, c, dur) if t.pipe is not None else wrk_run(t, c, dur)
                        if run["other_load"].get("foreign", 0) > NOISY:
                            # Another tenant was busy: wait for quiet, measure again, keep the quieter.
                            quiet(args.max_wait)
                            again = pipe_run(t, c, dur) if t.pipe is not None else wrk_run(t, c, dur)
                            again["retried"] = run["other_load"]
                            if again["other_load"].get("foreign", 0) < run["other_load"].get("foreign", 0):
                                run = again
                        t.results.setdefault(f"c{c}", []).append(run)
                        if "latency" in run:
                            t.results.setdefault("latency", []).append(run.pop("latency"))
                    if t.pipe is None:
                        lat = mc.latency_run(t.client_target(), t.sid, lat_dur, next_id_base())
                        t.results.setdefault("latency", []).append(lat)
                        if t.modern:
                            continue
                        st = mc.setup_rate(t.client_target(), 16, setup_dur)
                        st["children_after"] = len(descendants(t.pid))
                        t.results.setdefault("setup", []).append(st)
        audit = (
            audit_rows(data_dir, [t.sid for t in targets if t.key.startswith("bastion") and not t.modern])
            if gw_pid
            else {}
        )
    finally:
        procs.stop_all()
        if args.baseline:
            subprocess.run(
                ["git", "-C", str(BENCH.parent), "worktree", "remove", "--force", str(tmp / "baseline-src")],
                check=False,
                capture_output=True,
            )
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    meta["loadavg_end"] = os.getloadavg()
    meta["wall_s"] = round(time.monotonic() - t_start, 1)
    summary = {t.key: summarize(t) for t in targets}
    calls_sent = {
        t.key if t.modern else t.sid: sum(x["calls"] for c in CONCURRENCY for x in t.results.get(f"c{c}", []))
        + sum(x["calls"] for x in t.results.get("latency", []))
        for t in targets
        if t.key.startswith("bastion")
    }
    out = {
        "meta": meta,
        "skipped": skipped,
        "summary": summary,
        "verdicts": [{"target": a, "measured": b, "met": c} for a, b, c in verdicts(summary)],
        "audit_check": {**audit, "successful_calls_counted_per_session": calls_sent},
        "raw": {t.key: t.results for t in targets},
    }
    results = BENCH / "results"
    results.mkdir(exist_ok=True)
    path = results / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(out, indent=2, default=str))

    print()
    print(
        f"{meta['cpu']}, {meta['cpus']} CPUs; measured process on core {GW_CORE}, wrk/upstreams/children "
        f"on core {LOAD_CORE}; medians of {reps}; {dur:g} s per wrk run; whole run {meta['wall_s']:.0f} s"
    )
    print()
    print(table(summary))
    print()
    for rt in (ratios(summary), ratios_2026(summary)):
        if rt:
            print(rt)
            print()
    print("| target | measured | met? |")
    print("|---|---:|---|")
    for label, value, met in verdicts(summary):
        print(f"| {label} | {value} | {'yes' if met else 'no' if met is not None else 'n/a'} |")
    print()
    print("other tenants' CPU during the throughput runs (median cores, c=1/16/64; JSON: raw.*.other_load):")
    for key, s in summary.items():
        print(f"  {key}: " + " / ".join(fmt(s[f"foreign_cores_c{c}"], 2) for c in CONCURRENCY))
    for key, why in skipped.items():
        print(f"skipped {key}: {why}")
    errs = {
        k: {c: s[f"errors_c{c}"] for c in CONCURRENCY}
        for k, s in summary.items()
        if any(s[f"errors_c{c}"] for c in CONCURRENCY) or s["setup_errors"]
    }
    if errs:
        print(f"errors seen (see JSON): {errs}")
    print(f"\nJSON: {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
