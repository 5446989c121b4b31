"""`bastion mcp connect`: real MCP clients launch it as their stdio server, against a real cluster.

server-everything in its three modes (streamable HTTP, legacy SSE, stdio) sits behind the
gateway; the Python `mcp` SDK's stdio client and the MCP Inspector CLI start `bastion mcp
connect <app>`; a raw driver checks what the bridge writes on stdout line by line, a credential
that expires mid-session, and a gateway restart under a running bridge.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from bastion._time import utcnow
from bastion.client import profile as profiles
from bastion.client.bridge import EXPIRED_MESSAGE, LOGIN_REQUIRED
from tests.integration.conftest import START_DEADLINE, Node, bastion_cmd, start_node, stop_node, wait_for_log
from tests.peers import everything_cmd, inspector_cmd, node_env, requires_node_peers, run_everything

pytestmark = requires_node_peers

APPS = ["everything-http", "everything-sse", "everything-stdio"]
PW = "correct horse battery staple"
CALL_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def apps_config() -> Iterator[str]:
    """server-everything over streamable HTTP and SSE (running for the module), and as a command."""
    with ExitStack() as stack:
        http_url = stack.enter_context(run_everything("streamableHttp"))
        sse_url = stack.enter_context(run_everything("sse"))
        node_bin, *stdio_args = everything_cmd("stdio")
        yield f"""\
app_service:
  demo_server: true
  apps:
  - name: everything-http
    uri: mcp+{http_url}
  - name: everything-sse
    uri: mcp+sse+{sse_url}
  - name: everything-stdio
    mcp:
      command: {node_bin}
      args: {json.dumps(stdio_args)}
      run_as_host_user: root
"""


def _add_users(node: Node) -> None:
    node.cli("users", "add", "alice", "--roles=mcp-user", local=True)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, apps_config: str) -> Iterator[Node]:
    node = start_node(tmp_path_factory.mktemp("gw"), extra_config=apps_config)
    try:
        _add_users(node)
        yield node
    finally:
        stop_node(node)


def sign(node: Node, path: Path, *, user: str = "alice", ttl: str = "1h") -> Path:
    node.cli("auth", "sign", f"--user={user}", f"--ttl={ttl}", f"--out={path}", local=True)
    return path


def bridge_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env["BASTION_HOME"] = str(home)
    env.update(extra)
    return env


def connect_args(node: Node, app: str, ident: Path) -> list[str]:
    return ["mcp", "connect", app, "-i", str(ident), "--proxy", node.addr]


# ------------------------------------------------------------------ a raw stdio driver


class Driver:
    """Talks JSON-RPC to a running `bastion mcp connect` and checks every line it writes."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr: Path) -> None:
        self.proc = proc
        self.stderr = stderr
        self.lines: list[bytes] = []
        self._id = 0

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    async def send(self, obj: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj).encode() + b"\n")
        await self.proc.stdin.drain()

    async def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        assert line, f"the bridge closed stdout (exit {self.proc.returncode}):\n{self.log()}"
        self.lines.append(line)
        obj = json.loads(line)  # stdout carries JSON-RPC messages only, one per line
        assert isinstance(obj, dict) and obj.get("jsonrpc") == "2.0", line
        return obj

    async def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self._id += 1
        rid = self._id
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            msg["params"] = params
        await self.send(msg)
        async with asyncio.timeout(CALL_TIMEOUT):
            while True:
                got = await self.read()
                if got.get("id") == rid and "method" not in got:
                    return got

    async def handshake(self) -> dict[str, Any]:
        init = await self.request(
            "initialize",
            {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "itest", "version": "1"},
            },
        )
        assert "result" in init, init
        await self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return init

    async def echo(self, text: str) -> dict[str, Any]:
        return await self.request("tools/call", {"name": "echo", "arguments": {"message": text}})


@asynccontextmanager
async def bridge(args: list[str], env: dict[str, str], stderr: Path) -> AsyncIterator[Driver]:
    with stderr.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            *bastion_cmd(*args),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
            env=env,
            limit=16 * 1024 * 1024,
        )
    driver = Driver(proc, stderr)
    try:
        yield driver
    finally:
        if proc.returncode is None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                async with asyncio.timeout(15):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


def echo_text(answer: dict[str, Any]) -> str:
    assert "result" in answer, answer
    return str(answer["result"]["content"][0]["text"])


# ------------------------------------------------------------------ (a) the mcp SDK


@pytest.mark.parametrize("app", APPS)
async def test_sdk_stdio_client_lists_and_calls(gateway: Node, app: str, tmp_path: Path) -> None:
    from mcp import ClientSession, StdioServerParameters, stdio_client

    ident = sign(gateway, tmp_path / "alice.id")
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "bastion.cli.main", *connect_args(gateway, app, ident)],
        env={"BASTION_HOME": str(tmp_path / "home")},
    )
    with (tmp_path / "bridge.log").open("w") as errlog:
        async with (
            asyncio.timeout(90),
            stdio_client(params, errlog=errlog) as (r, w),
            ClientSession(r, w) as s,
        ):
            init = await s.initialize()
            assert init.server_info.name == "mcp-servers/everything"
            names = {t.name for t in (await s.list_tools()).tools}
            assert {"echo", "get-sum"} <= names
            res = await s.call_tool("echo", {"message": f"hi {app}"})
            assert res.content[0].text == f"Echo: hi {app}"
            # Concurrent requests on one bridge, each answered.
            many = await asyncio.gather(*(s.call_tool("echo", {"message": f"n{i}"}) for i in range(8)))
            assert [m.content[0].text for m in many] == [f"Echo: n{i}" for i in range(8)]
    log = (tmp_path / "bridge.log").read_text()
    assert f"connected to {app}" in log


# ------------------------------------------------------------------ (b) the Inspector CLI


@pytest.fixture(scope="module")
def logged_in_home(gateway: Node, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BASTION_HOME with a login profile (invite → set-password → login), as a person has."""
    home = tmp_path_factory.mktemp("carol-home")
    res = gateway.cli("users", "add", "carol", "--roles=mcp-user", local=True)
    code = re.search(r"--invite=(\S+)", res.stdout)
    fp = re.search(r"--ca-fingerprint=(\S+)", res.stdout)
    assert code and fp, res.stdout
    gateway.cli(
        "users",
        "set-password",
        f"--proxy={gateway.addr}",
        f"--ca-fingerprint={fp.group(1)}",
        f"--invite={code.group(1)}",
        "--password-stdin",
        input=PW + "\n",
        home=home,
    )
    gateway.cli(
        "login", f"--proxy={gateway.addr}", "--user=carol", "--password-stdin", input=PW + "\n", home=home
    )
    return home


@pytest.mark.parametrize("app", APPS)
def test_inspector_cli_runs_mcp_connect(gateway: Node, logged_in_home: Path, app: str) -> None:
    env = node_env(bridge_env(logged_in_home))
    base = [*inspector_cmd(), "--cli", sys.executable, "-m", "bastion.cli.main", "mcp", "connect", app]
    listed = subprocess.run(
        [*base, "--method", "tools/list"], capture_output=True, text=True, env=env, timeout=120
    )
    assert listed.returncode == 0, listed.stderr
    names = [t["name"] for t in json.loads(listed.stdout)["tools"]]
    assert "echo" in names and "get-sum" in names
    called = subprocess.run(
        [*base, "--method", "tools/call", "--tool-name", "echo", "--tool-arg", "message=insp"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout)["content"][0]["text"] == "Echo: insp"


# ------------------------------------------------------------------ (c) expiry and re-login


async def test_expired_credential_then_new_login_same_process(gateway: Node, tmp_path: Path) -> None:
    ident = sign(gateway, tmp_path / "alice.id")
    args = connect_args(gateway, "everything-http", ident)
    async with bridge(args, bridge_env(tmp_path / "home"), tmp_path / "bridge.log") as b:
        await b.handshake()
        assert echo_text(await b.echo("before")) == "Echo: before"

        # A short-lived credential replaces it (picked up on the next request), then expires.
        await asyncio.to_thread(sign, gateway, ident, ttl="3s")
        assert echo_text(await b.echo("short")) == "Echo: short"
        expires = profiles.load_identity(str(ident)).expires_at
        deadline = time.monotonic() + 30
        while utcnow() <= expires:  # poll the clock until the expiry has passed
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)

        expired = await b.echo("after expiry")
        assert expired["error"]["code"] == LOGIN_REQUIRED, expired
        assert expired["error"]["message"] == EXPIRED_MESSAGE
        assert "bastion login" in expired["error"]["message"]
        assert b.proc.returncode is None  # an answer, not a crash

        # `bastion login` (here: a new identity file) -> the same running bridge works again.
        await asyncio.to_thread(sign, gateway, ident)
        assert echo_text(await b.echo("again")) == "Echo: again"
        assert b.proc.returncode is None
    assert "credential reloaded" in b.log()


# ------------------------------------------------------------------ (d) gateway restart


def restart(node: Node) -> Node:
    """Stop the node and start it again on the same data directory and proxy port.

    The proxy port must stay (the bridge reconnects to it); every other listener takes a
    free port again (a fixed proxy port would otherwise default the tunnel to 3024). If
    another process takes the proxy port in the moment between stop and start, the
    test cannot go on: it is skipped saying so rather than failing for someone else's socket."""
    port = node.addr.rsplit(":", 1)[1]
    text = node.config.read_text()
    fixed = text.replace(
        "proxy_service:\n  listen_addr: 127.0.0.1:0",
        f"proxy_service:\n  listen_addr: 127.0.0.1:{port}\n  tunnel_listen_addr: 127.0.0.1:0",
    )
    assert fixed != text
    node.config.write_text(fixed)
    stop_node(node)
    log = node.root / f"server-{time.monotonic_ns()}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    with log.open("wb") as f:
        proc = subprocess.Popen(
            bastion_cmd("start", "--config", str(node.config)), stdout=f, stderr=subprocess.STDOUT, env=env
        )
    try:
        m = wait_for_log(log, r"proxy listening addr=https://([\d.]+:\d+)", proc, START_DEADLINE)
    except AssertionError:
        if f"{port}: Address already in use" in log.read_text():
            pytest.skip(f"another process took port {port} while the gateway restarted")
        raise
    assert m.group(1) == node.addr
    return Node(root=node.root, config=node.config, addr=node.addr, proc=proc, log=log)


async def test_bridge_survives_a_gateway_restart(
    apps_config: str, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    node = start_node(tmp_path_factory.mktemp("restart"), extra_config=apps_config)
    try:
        _add_users(node)
        ident = sign(node, tmp_path / "alice.id")
        env = bridge_env(tmp_path / "home")
        async with (
            bridge(connect_args(node, "everything-stdio", ident), env, tmp_path / "stdio.log") as b1,
            bridge(connect_args(node, "everything-http", ident), env, tmp_path / "http.log") as b2,
        ):
            for b in (b1, b2):
                await b.handshake()
                assert echo_text(await b.echo("before")) == "Echo: before"
            node = await asyncio.to_thread(restart, node)
            for b in (b1, b2):
                # The old session is gone with the old process: the bridge opens a new one
                # (replaying initialize) and the call goes through, transparently.
                assert echo_text(await b.echo("after")) == "Echo: after"
                assert b.proc.returncode is None
        for b in (b1, b2):
            assert "reconnected to" in b.log(), b.log()
            assert "Traceback" not in b.log(), b.log()
            assert b.proc.returncode == 0
    finally:
        stop_node(node)


# ------------------------------------------------------------------ (e) stdout discipline


async def test_stdout_carries_only_jsonrpc(gateway: Node, tmp_path: Path) -> None:
    ident = sign(gateway, tmp_path / "alice.id")
    args = connect_args(gateway, "everything-sse", ident)
    env = bridge_env(tmp_path / "home", BASTION_DEBUG="1")
    async with bridge(args, env, tmp_path / "bridge.log") as b:
        await b.handshake()
        assert echo_text(await b.echo("x")) == "Echo: x"
        assert "get-sum" in {t["name"] for t in (await b.request("tools/list"))["result"]["tools"]}
        assert (await b.request("ping"))["result"] == {}
        # Not JSON: a JSON-RPC parse error on stdout, the details on stderr, and it keeps going.
        assert b.proc.stdin is not None
        b.proc.stdin.write(b"this is not json\n")
        bad = await b.read()
        assert bad["id"] is None and bad["error"]["code"] == -32700
        assert echo_text(await b.echo("y")) == "Echo: y"
        assert b.proc.stdin is not None
        b.proc.stdin.close()  # EOF: end the session, exit 0
        assert b.proc.stdout is not None
        async with asyncio.timeout(30):
            rest = await b.proc.stdout.read()
            assert await b.proc.wait() == 0
    for line in [*b.lines, *rest.splitlines(keepends=True)]:
        assert line.endswith(b"\n")
        assert json.loads(line)["jsonrpc"] == "2.0"
    log = b.log()
    assert "INFO" in log and "DEBUG" in log and "closed stdin" in log


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_ends_the_session_and_exits_0(gateway: Node, tmp_path: Path, sig: int) -> None:
    ident = sign(gateway, tmp_path / "alice.id")
    args = connect_args(gateway, "everything-stdio", ident)
    async with bridge(args, bridge_env(tmp_path / "home"), tmp_path / "bridge.log") as b:
        await b.handshake()
        assert echo_text(await b.echo("x")) == "Echo: x"
        b.proc.send_signal(sig)  # SIGINT: Ctrl-C
        async with asyncio.timeout(30):
            assert await b.proc.wait() == 0
    assert b.log().count("stopping on a signal; ending the session") == 1
    assert "Traceback" not in b.log(), b.log()


def test_malformed_header_is_refused(gateway: Node, tmp_path: Path) -> None:
    ident = sign(gateway, tmp_path / "alice.id")
    res = gateway.cli(
        *connect_args(gateway, "everything-http", ident), "-H", "no colon here", check=False, home=tmp_path
    )
    assert res.returncode == 2
    assert "malformed header" in res.stderr
    assert res.stdout == ""


async def test_extra_headers_are_sent_along(gateway: Node, tmp_path: Path) -> None:
    """`-H` headers go with every request (the unit tests check the wire); the app still answers."""
    ident = sign(gateway, tmp_path / "alice.id")
    args = [*connect_args(gateway, "everything-http", ident), "-H", "X-Team: blue", "-H", "X-Other:  2 "]
    async with bridge(args, bridge_env(tmp_path / "home"), tmp_path / "bridge.log") as b:
        await b.handshake()
        assert echo_text(await b.echo("with headers")) == "Echo: with headers"
