"""Real MCP software for the tests: where `make test` installed it, and how to run it.

The npm packages live in tests/node (package.json + package-lock.json, installed by the
Makefile's `npm ci` step): the reference server `@modelcontextprotocol/server-everything`,
the official conformance suite, the inspector CLI (0.15.0, and 2.x as `inspector-v2`, which
can send custom headers), supergateway, and the npm `node` package, a Node 22 binary: the
conformance suite and inspector 2.x need Node >= 22 and the machine's own node is 20. Every
command here runs under that Node 22, started with `node <script>` (never npx, so the PID we
hold is the server's own).

    from tests.peers import requires_node_peers, run_everything

    @requires_node_peers
    async def test_x() -> None:
        with run_everything("streamableHttp") as url:   # http://127.0.0.1:<port>/mcp
            ...
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Literal

import pytest

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "tests" / "node"
NODE_MODULES = NODE_DIR / "node_modules"

EVERYTHING_JS = NODE_MODULES / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"
CONFORMANCE_JS = NODE_MODULES / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
INSPECTOR_JS = NODE_MODULES / "@modelcontextprotocol" / "inspector" / "cli" / "build" / "cli.js"
INSPECTOR_V2_JS = NODE_MODULES / "inspector-v2" / "clients" / "launcher" / "build" / "index.js"
SUPERGATEWAY_JS = NODE_MODULES / "supergateway" / "dist" / "index.js"

START_DEADLINE = 10.0
"""Seconds a server gets to accept connections."""

EverythingMode = Literal["stdio", "sse", "streamableHttp"]


def node22_bin() -> Path:
    """The Node 22 binary from the npm `node` package (tests/node/node_modules/node/bin/node)."""
    return NODE_MODULES / "node" / "bin" / "node"


def _required() -> dict[str, Path]:
    return {
        "node 22 (npm package `node`)": node22_bin(),
        "@modelcontextprotocol/server-everything": EVERYTHING_JS,
        "@modelcontextprotocol/conformance": CONFORMANCE_JS,
        "@modelcontextprotocol/inspector": INSPECTOR_JS,
        "inspector-v2 (@modelcontextprotocol/inspector 2.x)": INSPECTOR_V2_JS,
        "supergateway": SUPERGATEWAY_JS,
    }


def missing_node_peers() -> list[str]:
    """The npm-installed peers that are not there (empty when all are)."""
    return [name for name, path in _required().items() if not path.exists()]


def have_node_peers() -> bool:
    """True when `make test`'s npm step has installed every peer in tests/node."""
    return not missing_node_peers()


def node_peers_skip_reason() -> str:
    return (
        f"npm test peers missing in {NODE_MODULES.relative_to(ROOT)}: {', '.join(missing_node_peers())} "
        "(run `make node-peers`, or `make test`, which installs them)"
    )


requires_node_peers = pytest.mark.skipif(not have_node_peers(), reason=node_peers_skip_reason())
"""Mark a test that needs the npm peers; it skips, saying what is missing, if they are absent."""


def node_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with Node 22 first on PATH: the inspector and the conformance
    suite start `node` by name, and stdio targets given as `node ...` must get Node 22 too."""
    env = dict(os.environ)
    env["PATH"] = f"{node22_bin().parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("NO_COLOR", "1")
    if extra:
        env.update(extra)
    return env


def everything_cmd(mode: EverythingMode = "stdio") -> list[str]:
    """server-everything: `stdio` (newline JSON), `sse` (GET /sse + POST /message) or
    `streamableHttp` (/mcp). The HTTP modes listen on all interfaces at $PORT (default 3001)."""
    return [str(node22_bin()), str(EVERYTHING_JS), mode]


def conformance_cmd() -> list[str]:
    """The conformance CLI, e.g. `conformance_cmd() + ["server", "--url", url, "-o", dir]`."""
    return [str(node22_bin()), str(CONFORMANCE_JS)]


def run_conformance_suite(url: str, workdir: Path) -> tuple[int, str]:
    """The conformance suite's server scenarios against ``url``: (exit code, the output's last
    6,000 characters, with its summary)."""
    out_file = workdir / "conformance.out"
    with out_file.open("w+") as out:
        res = subprocess.run(
            [*conformance_cmd(), "server", "--url", url, "-o", str(workdir / "results")],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env=node_env(),
            cwd=workdir,
            timeout=300,
        )
        out.seek(0)
        return res.returncode, out.read()[-6000:]


def inspector_cmd() -> list[str]:
    """Inspector 0.15.0, e.g. `inspector_cmd() + ["--cli", *target, "--method", "tools/list"]`
    (run it with `env=node_env()`: it starts `node` by name)."""
    return [str(node22_bin()), str(INSPECTOR_JS)]


def inspector_v2_cmd() -> list[str]:
    """Inspector 2.x: adds `--header "K: V"`, `--format json`, `--load` (see the reference doc)."""
    return [str(node22_bin()), str(INSPECTOR_V2_JS)]


def supergateway_cmd(*args: str) -> list[str]:
    """supergateway 4.0.0, e.g. `supergateway_cmd("--stdio", cmd, "--outputTransport",
    "streamableHttp", "--stateful", "--port", port)`."""
    return [str(node22_bin()), str(SUPERGATEWAY_JS), *args]


PEERS_VENV = ROOT / ".venv-peers"
"""`make peers-venv`: Python peers that pin `mcp<2` (mcp-proxy), kept out of our venv."""


def mcp_proxy_cmd(*args: str) -> list[str]:
    """mcp-proxy 0.13.0 from .venv-peers, e.g. `mcp_proxy_cmd("--port", port, "--host", "127.0.0.1",
    *stdio_cmd)`; check `Path(cmd[0]).exists()` first (benchmarks only, not installed by `make test`)."""
    return [str(PEERS_VENV / "bin" / "mcp-proxy"), *args]


def conformance_fixture_cmd(transport: Literal["stdio", "http"] = "stdio", *args: str) -> list[str]:
    """The Python conformance fixture (tests/fixtures/conformance_server.py); run it with cwd=ROOT."""
    return [sys.executable, "-m", "tests.fixtures.conformance_server", "--transport", transport, *args]


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (for servers that cannot listen on port 0).

    Another process may take it before the server does: ``run_server`` checks that whatever
    listens there is the server it started, and says so when it is not."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _read_log(log: IO[bytes]) -> str:
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")[-4000:]


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes], log: IO[bytes], deadline: float = START_DEADLINE
) -> None:
    """Return once 127.0.0.1:port accepts a connection; fail early if ``proc`` exits."""
    end = time.monotonic() + deadline
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args!r} exited with {proc.returncode}:\n{_read_log(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > end:
            raise AssertionError(f"{proc.args!r} did not listen on {port} in {deadline}s:\n{_read_log(log)}")
        time.sleep(0.05)  # between connection attempts, bounded by the deadline


def _listeners(port: int) -> set[int] | None:
    """The processes listening on TCP ``port`` that we can see (from /proc); None off Linux."""
    inodes: set[str] = set()
    tables = [Path(t) for t in ("/proc/net/tcp", "/proc/net/tcp6") if Path(t).exists()]
    if not tables:
        return None
    for table in tables:
        for line in table.read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{f[9]}]")
    pids: set[int] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):  # gone, or not ours to read
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                pids.add(int(proc.name))
    return pids


def _check_listener_is(proc: subprocess.Popen[bytes], port: int, log: IO[bytes]) -> None:
    """Fail, saying why, if what answers on ``port`` is not ``proc`` (or a child in its group):
    a port picked by ``free_port`` can be taken by another program before ``proc`` binds it."""
    pids = _listeners(port)
    if pids is None:
        return
    ours = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            if os.getpgid(pid) == proc.pid:  # start_new_session: the group is proc's alone
                ours.add(pid)
    if not ours:
        raise AssertionError(
            f"port {port} was taken by another process before {proc.args!r} could listen on it "
            f"(a free port is only free until someone binds it); run the test again:\n{_read_log(log)}"
        )


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Stop ``proc`` and its children: it was started in a session of its own, so its process
    group is ours alone. SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # Children may outlive a leader that exited on SIGTERM.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def run_server(
    cmd: Sequence[str],
    port: int,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path = ROOT,
    deadline: float = START_DEADLINE,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` (a server that will listen on ``port``) until the block ends; output goes to
    a temporary log that failures quote."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
        try:
            wait_for_port(port, proc, log, deadline)
            _check_listener_is(proc, port, log)
            yield proc
        finally:
            stop_process(proc)


@contextlib.contextmanager
def run_everything(mode: Literal["sse", "streamableHttp"] = "streamableHttp") -> Iterator[str]:
    """server-everything over HTTP on a free port; yields its URL (`.../mcp` or `.../sse`)."""
    if not have_node_peers():
        pytest.skip(node_peers_skip_reason())
    port = free_port()
    with run_server(everything_cmd(mode), port, env=node_env({"PORT": str(port)})):
        yield f"http://127.0.0.1:{port}/{'sse' if mode == 'sse' else 'mcp'}"


class EverythingOnPort:
    """server-everything over streamable HTTP on a port of its own, which a test stops and starts
    again: a fresh process on the same port (its URL stays valid) that remembers no session."""

    def __init__(self) -> None:
        if not have_node_peers():
            pytest.skip(node_peers_skip_reason())
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self._running: contextlib.ExitStack | None = None

    def start(self) -> None:
        assert self._running is None, "already running"
        with contextlib.ExitStack() as stack:
            env = node_env({"PORT": str(self.port)})
            stack.enter_context(run_server(everything_cmd("streamableHttp"), self.port, env=env))
            self._running = stack.pop_all()

    def stop(self) -> None:
        if self._running is not None:
            running, self._running = self._running, None
            running.close()

    def restart(self) -> None:
        self.stop()
        self.start()


@contextlib.contextmanager
def run_conformance_fixture(transport: Literal["http"] = "http", *args: str) -> Iterator[str]:
    """The conformance fixture over streamable HTTP on a free loopback port; yields
    `http://127.0.0.1:<port>/mcp`. ``args`` go to the fixture (`--stateless`, `--event-store`,
    `--json-response`, `--no-host-check`). For stdio, hand `conformance_fixture_cmd()` to whatever
    spawns it."""
    if transport != "http":
        raise ValueError("run_conformance_fixture serves HTTP; use conformance_fixture_cmd('stdio')")
    port = free_port()
    cmd = conformance_fixture_cmd("http", "--port", str(port), *args)
    with run_server(cmd, port, env=dict(os.environ, PYTHONUNBUFFERED="1")):
        yield f"http://127.0.0.1:{port}/mcp"
