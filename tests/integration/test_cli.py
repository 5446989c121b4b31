"""The CLI's edges, as a user meets them: piped output, `proxy mcp` checks and stops, slow starts."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from tests.integration.conftest import Node, bastion_cmd, start_node, stop_node

ROOT = Path(__file__).resolve().parents[2]
PW = "correct horse battery staple"
CRASHY = [sys.executable, "-m", "tests.fixtures.crashy_server", "--transport", "stdio"]
#: The slow app's start: longer than bastion.client.slow.SLOW_START.
SLOW_START_DELAY = 2.5
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"},
    },
}


def _apps() -> str:
    def stdio(name: str, extra: list[str], labels: str) -> str:
        return f"""\
  - name: {name}
    labels: {labels}
    mcp:
      command: {CRASHY[0]}
      args: {json.dumps([*CRASHY[1:], *extra])}
      run_as_host_user: root
      env: {{PYTHONPATH: "{ROOT}"}}
"""

    return (
        "app_service:\n  apps:\n"
        + stdio("crashy", [], "{env: dev}")
        + stdio("slow", ["--start-delay", str(SLOW_START_DELAY)], "{env: dev}")
        + stdio("secret", [], "{env: prod}")
    )


DEV_ONLY = """\
kind: role
version: v1
metadata: {name: dev-only}
spec:
  allow:
    app_labels: {env: dev}
    mcp: {tools: ["*"]}
"""


def _login(node: Node, user: str, roles: str, home: Path) -> None:
    invite = node.cli("users", "add", user, f"--roles={roles}", local=True).stdout
    code = re.search(r"--invite=(\S+)", invite)
    fp = re.search(r"--ca-fingerprint=(\S+)", invite)
    assert code and fp, invite
    node.cli(
        "users", "set-password", f"--proxy={node.addr}", f"--ca-fingerprint={fp.group(1)}",
        f"--invite={code.group(1)}", "--password-stdin", input=PW + "\n", home=home,
    )  # fmt: skip
    node.cli(
        "login", f"--proxy={node.addr}", f"--user={user}", "--password-stdin", input=PW + "\n", home=home
    )


@pytest.fixture(scope="module")
def cli_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    node = start_node(tmp_path_factory.mktemp("cli"), extra_config=_apps())
    try:
        role = node.root / "dev-only.yaml"
        role.write_text(DEV_ONLY)
        node.cli("create", str(role), local=True)
        _login(node, "alice", "mcp-user", node.root / "alice")
        _login(node, "dave", "dev-only", node.root / "dave")
        yield node
    finally:
        stop_node(node)


def _env(home: Path, **extra: str) -> dict[str, str]:
    """A user's environment, without the test runner's COLUMNS: a pipe must not be cut at 80."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_") and k != "COLUMNS"}
    return {**env, "BASTION_HOME": str(home), "NO_COLOR": "1", **extra}


def _run(home: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        bastion_cmd(*args), capture_output=True, text=True, env=_env(home, **extra), timeout=60
    )


# ------------------------------------------------------------------ audit search


def test_audit_search_piped_is_whole_and_newest_first(cli_node: Node) -> None:
    home = cli_node.root / "alice"
    for word in ("one", "two", "three"):
        assert _run(home, "mcp", "call", "crashy", "echo", f"--arg=word={word}").returncode == 0
    local = {"BASTION_CONFIG": str(cli_node.config)}
    every = json.loads(
        _run(home, "audit", "search", "--since=1h", "--order=asc", "--format=json", **local).stdout
    )
    assert len(every) >= 6
    times = [e["time"] for e in every]
    assert times == sorted(times)
    newest = json.loads(_run(home, "audit", "search", "--limit=2", "--format=json", **local).stdout)
    assert [e["id"] for e in newest] == [e["id"] for e in every[::-1][:2]]
    oldest = json.loads(
        _run(home, "audit", "search", "--limit=2", "--order=asc", "--format=json", **local).stdout
    )
    assert [e["id"] for e in oldest] == [e["id"] for e in every[:2]]

    # The table, piped (stdout is not a terminal here), with no COLUMNS: nothing is cut.
    res = _run(home, "audit", "search", "--since=1h", **local)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["Time", "Event", "Code", "User", "App", "Method", "Tool", "Details"]
    assert len(lines) == len(every) + 1
    for line, event in zip(lines[1:], every[::-1], strict=True):
        assert line.startswith(event["time"] + " ")  # the whole timestamp, newest first
        assert f" {event['event']} " in line
        assert f" {event['user']} " in line
    assert any('{"name":"echo","arguments":{"word":"three"}}' in line for line in lines)

    res = _run(home, "audit", "search", "--order=up", **local)
    assert res.returncode == 2 and 'Invalid value for --order: "up" is not asc or desc' in res.stderr


# ------------------------------------------------------------------ proxy mcp: the checks


@pytest.mark.parametrize(("user", "app"), [("alice", "nosuchapp"), ("dave", "secret")])
def test_proxy_mcp_refuses_an_app_the_user_cannot_reach(cli_node: Node, user: str, app: str) -> None:
    res = _run(cli_node.root / user, "proxy", "mcp", app)
    assert res.returncode == 1
    assert res.stdout == ""  # never "Proxying connections to ..."
    assert res.stderr == (
        f'error: no MCP app "{app}" that you may use at {cli_node.addr}: see `bastion mcp ls`\n'
    )


def test_proxy_mcp_not_logged_in(tmp_path: Path) -> None:
    res = _run(tmp_path / "nobody", "proxy", "mcp", "crashy")
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr == "error: not logged in: run `bastion login --proxy=HOST:PORT --user=NAME`\n"


# ------------------------------------------------------------------ proxy mcp: stopping


class LocalProxy:
    """`bastion proxy mcp APP` in a subprocess, and a client of its listener."""

    def __init__(self, home: Path, app: str, stderr: Path) -> None:
        self.stderr_path = stderr
        self._err: IO[bytes] = stderr.open("wb")
        self.proc = subprocess.Popen(
            bastion_cmd("proxy", "mcp", app),
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
            env=_env(home),
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        m = re.fullmatch(rf"Proxying connections to {app} on 127\.0\.0\.1:(\d+)\n", first)
        assert m, (first, self.stderr())
        self.url = f"http://127.0.0.1:{m.group(1)}/"
        self.http = httpx.Client(timeout=30)

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def post(self, msg: dict[str, Any], sid: str = "") -> httpx.Response:
        headers = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
        if sid:
            headers |= {"mcp-session-id": sid, "mcp-protocol-version": "2025-06-18"}
        return self.http.post(self.url, json=msg, headers=headers)

    def session(self) -> str:
        r = self.post(INIT)
        assert r.status_code == 200, r.text
        sid = r.headers["mcp-session-id"]
        assert self.post({"jsonrpc": "2.0", "method": "notifications/initialized"}, sid).status_code == 202
        return sid

    def stream(self, sid: str) -> Any:
        """The session's GET stream, opened (its response headers received)."""
        headers = {"accept": "text/event-stream", "mcp-session-id": sid, "mcp-protocol-version": "2025-06-18"}
        return self.http.stream("GET", self.url, headers=headers)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.http.close()
        self._err.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _stream_ends(resp: httpx.Response) -> None:
    """Read the stream to its end; an httpx error here would be a stream cut, not ended."""
    for _ in resp.iter_bytes():
        pass


def test_proxy_mcp_ctrl_c_with_an_open_stream(cli_node: Node, tmp_path: Path) -> None:
    p = LocalProxy(cli_node.root / "alice", "crashy", tmp_path / "proxy.log")
    try:
        sid = p.session()
        with p.stream(sid) as resp:
            assert resp.status_code == 200
            p.proc.send_signal(signal.SIGINT)
            _stream_ends(resp)  # ended by the proxy, not cut
        assert p.proc.wait(timeout=30) == 130
        log = p.stderr()
        assert "Traceback" not in log and "Exception" not in log, log
        assert log.count("[bastion.client.proxy] stopping (interrupted)") == 1, log
    finally:
        p.close()


def test_proxy_mcp_when_the_cluster_goes_away(tmp_path: Path) -> None:
    node = start_node(tmp_path / "node", extra_config=_apps())
    p: LocalProxy | None = None
    try:
        _login(node, "alice", "mcp-user", tmp_path / "alice")
        p = LocalProxy(tmp_path / "alice", "crashy", tmp_path / "proxy.log")
        sid = p.session()
        with p.stream(sid) as resp:
            assert resp.status_code == 200
            stop_node(node)
            _stream_ends(resp)
        r = p.post({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, sid)
        assert r.status_code == 502
        assert r.json()["error"]["message"].startswith("cannot reach the bastion proxy: ")
        assert p.proc.poll() is None  # still serving: the cluster may come back
        p.proc.terminate()
        assert p.proc.wait(timeout=30) != 0
        log = p.stderr()
        assert "Traceback" not in log and "Exception" not in log, log
        assert log.count(f"the cluster cut a stream of crashy: upstream https://{node.addr} ") == 1, log
        assert log.count("cannot reach the bastion proxy: ") == 1, log
        assert log.count("stopping (signal SIGTERM)") == 1, log
    finally:
        if p is not None:
            p.close()
        stop_node(node)


# ------------------------------------------------------------------ slow stdio starts


def test_mcp_call_says_it_waits_for_a_slow_start(cli_node: Node) -> None:
    home = cli_node.root / "alice"
    started = time.monotonic()
    res = _run(home, "mcp", "call", "slow", "echo", "--arg=x=1")
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - started >= SLOW_START_DELAY
    assert res.stderr == "waiting for slow to start…\n"
    quick = _run(home, "mcp", "call", "crashy", "echo", "--arg=x=1")
    assert quick.returncode == 0 and quick.stderr == ""


def test_mcp_connect_says_it_waits_for_a_slow_start(cli_node: Node, tmp_path: Path) -> None:
    lines = [json.dumps(INIT), json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"})]
    res = subprocess.run(
        bastion_cmd("mcp", "connect", "slow"),
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        env=_env(cli_node.root / "alice"),
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.splitlines()[0])["result"]["serverInfo"]["name"] == "crashy"
    assert res.stderr.count("[bastion.mcp.connect] waiting for slow to start…\n") == 1, res.stderr
