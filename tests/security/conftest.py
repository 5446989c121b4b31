"""A node with recording upstreams, and a raw MCP client that sends exactly the bytes an attacker would.

The apps ``rec-stdio`` and ``rec-http`` (labels ``env: dev``) run
``tests/fixtures/recording_server.py``, which writes down everything that
reached it; user ``limited`` may call ``echo`` only, ``alice`` everything.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Node, start_node, stop_node
from tests.peers import ROOT

ROLES = """\
kind: role
version: v1
metadata: {name: echo-only}
spec:
  allow:
    app_labels: {env: dev}
    mcp: {tools: [echo]}
"""

INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "attacker", "version": "1"},
    },
}


@dataclass
class Recording:
    """What one recording upstream received (its --record file)."""

    path: Path

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines()]

    def messages(self) -> list[Any]:
        """Each line (stdio) or body (HTTP) parsed; None where it did not parse."""
        out: list[Any] = []
        for r in self.records():
            text = r.get("line", r.get("body", ""))
            try:
                out.append(json.loads(text))
            except ValueError:
                out.append(None)
        return out

    def methods(self) -> list[str | None]:
        return [m.get("method") if isinstance(m, dict) else None for m in self.messages()]


@dataclass
class Gateway:
    node: Node
    recordings: dict[str, Recording]
    _tokens: dict[str, str] = field(default_factory=dict)

    def token(self, user: str) -> str:
        if user not in self._tokens:
            out = self.node.cli("auth", "sign", f"--user={user}", "--format=token", local=True)
            self._tokens[user] = out.stdout.strip()
        return self._tokens[user]

    def http(self) -> httpx.Client:
        ca = self.node.root / "ca.pem"
        if not ca.exists():
            ca.write_text(self.node.cli("auth", "export", "--type=tls", local=True).stdout)
        return httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), timeout=30)

    def audit(self, *filters: str) -> list[dict[str, Any]]:
        out = self.node.cli("audit", "search", "--format=json", "--order=asc", *filters, local=True).stdout
        events: list[dict[str, Any]] = json.loads(out)
        return events

    def session(self, user: str, app: str) -> RawSession:
        return RawSession(self, user, app)


class RawSession:
    """One MCP session over HTTPS whose messages are raw bytes, sent exactly as given."""

    def __init__(self, gw: Gateway, user: str, app: str) -> None:
        self.gw, self.user, self.app = gw, user, app
        self._pings = 0
        self.client = gw.http()
        self.url = f"https://{gw.node.addr}/mcp/apps/{app}"
        r = self.post(json.dumps(INIT).encode(), session=False)
        if r.status_code != 200:
            self.client.close()
            raise AssertionError(f"initialize on {app} as {user}: {r.status_code} {r.text}")
        self.id = r.headers["mcp-session-id"]
        r = self.post(b'{"jsonrpc":"2.0","method":"notifications/initialized"}')
        assert r.status_code == 202, r.text
        self.sync()

    def sync(self) -> None:
        """Return once everything sent so far reached the upstream: a ping was answered after it."""
        self._pings += 1
        r = self.post(b'{"jsonrpc":"2.0","id":"sync-%d","method":"ping"}' % self._pings)
        assert r.status_code == 200, r.text

    def post(self, body: bytes, *, session: bool = True, path: str = "") -> httpx.Response:
        headers = {
            "Authorization": f"Bearer {self.gw.token(self.user)}",
            "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json",
        }
        if session:
            headers["Mcp-Session-Id"] = self.id
        return self.client.post(self.url + path, content=body, headers=headers)

    def answer(self, r: httpx.Response) -> Any:
        """The JSON-RPC message of a response, whether sent as JSON or as one SSE event."""
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            data = [ln[5:].strip() for ln in r.text.splitlines() if ln.startswith("data:")]
            return json.loads(data[-1])
        return r.json()

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> RawSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def recording_cmd(transport: str, record: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tests.fixtures.recording_server",
        "--transport",
        transport,
        "--record",
        str(record),
    ]


@contextlib.contextmanager
def recording_http(record: Path) -> Iterator[str]:
    """The recording server over HTTP on a free loopback port; yields its base URL."""
    http = subprocess.Popen(recording_cmd("http", record), stdout=subprocess.PIPE, cwd=ROOT)
    try:
        assert http.stdout is not None
        line = http.stdout.readline().decode()  # "listening on http://127.0.0.1:PORT"
        assert line.startswith("listening on "), line
        yield line.split()[-1]
    finally:
        http.terminate()
        http.wait(timeout=10)
        if http.stdout is not None:
            http.stdout.close()


def recording_app(name: str, cmd: list[str], more: str = "") -> str:
    """One ``app_service.apps`` item: the stdio app ``name`` (labels ``env: dev``) running ``cmd``;
    ``more``: further lines of the item (indented four spaces)."""
    return f"""\
  - name: {name}
    labels: {{env: dev}}
{more}    mcp:
      command: {cmd[0]}
      args: {json.dumps(cmd[1:])}
      run_as_host_user: root
      env: {{PYTHONPATH: "{ROOT}"}}
"""


def recording_stdio_apps(record: Path) -> str:
    """An ``app_service`` section with the app ``rec-stdio`` (labels ``env: dev``) recording to ``record``."""
    cmd = recording_cmd("stdio", record)
    return f"""\
app_service:
  apps:
  - name: rec-stdio
    labels: {{env: dev}}
    mcp:
      command: {cmd[0]}
      args: {json.dumps(cmd[1:])}
      run_as_host_user: root
      env: {{PYTHONPATH: "{ROOT}"}}
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("sec")
    rec_stdio, rec_http = root / "stdio.jsonl", root / "http.jsonl"
    with recording_http(rec_http) as url:
        apps = f"""\
{recording_stdio_apps(rec_stdio)}\
  - name: rec-http
    uri: mcp+{url}/mcp
    labels: {{env: dev}}
"""
        node = start_node(root, extra_config=apps)
        try:
            (root / "roles.yaml").write_text(ROLES)
            node.cli("create", str(root / "roles.yaml"), local=True)
            node.cli("users", "add", "limited", "--roles=echo-only", local=True)
            node.cli("users", "add", "alice", "--roles=mcp-user", local=True)
            yield Gateway(node, {"rec-stdio": Recording(rec_stdio), "rec-http": Recording(rec_http)})
        finally:
            stop_node(node)
