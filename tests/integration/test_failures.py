"""Bad upstreams and bad input: clear errors naming whose fault, nothing lost, other sessions fine."""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Node, start_node, stop_node
from tests.peers import ROOT, free_port, run_server

ACCEPT = "application/json, text/event-stream"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    root = tmp_path_factory.mktemp("fail")
    port = free_port()
    cmd = [sys.executable, "-m", "tests.fixtures.crashy_server"]
    with run_server([*cmd, "--transport", "http", "--port", str(port)], port):
        apps = f"""\
app_service:
  response_timeout: 2s
  idle_timeout: 3s
  max_body: 65536
  apps:
  - name: crashy-http
    uri: mcp+http://127.0.0.1:{port}/mcp
  - name: crashy-stdio
    mcp:
      command: {cmd[0]}
      args: {json.dumps([*cmd[1:], "--transport", "stdio"])}
      run_as_host_user: root
      env: {{PYTHONPATH: "{ROOT}"}}
"""
        node = start_node(root, extra_config=apps)
        try:
            node.cli("users", "add", "alice", "--roles=mcp-user", local=True)
            yield node
        finally:
            stop_node(node)


class Client:
    """A bare streamable-HTTP client, to see exactly what the gateway answers."""

    def __init__(self, node: Node, app: str) -> None:
        token = node.cli("auth", "sign", "--user=alice", "--format=token", local=True).stdout.strip()
        ca = node.root / "ca.pem"
        if not ca.exists():
            ca.write_text(node.cli("auth", "export", local=True).stdout)
        self.url = f"https://{node.addr}/mcp/apps/{app}"
        self.http = httpx.AsyncClient(
            verify=ssl.create_default_context(cafile=str(ca)),
            timeout=30,
            headers={"Authorization": f"Bearer {token}", "Accept": ACCEPT},
        )
        self.sid = ""
        self.next_id = 0

    async def start(self) -> None:
        r = await self.rpc(
            "initialize",
            {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "t", "version": "1"},
            },
        )
        assert r.status_code == 200, r.text
        self.sid = r.headers["mcp-session-id"]
        n = await self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert n.status_code == 202

    async def post(self, body: Any, raw: bytes | None = None) -> httpx.Response:
        headers = {"Mcp-Session-Id": self.sid} if self.sid else {}
        content = raw if raw is not None else json.dumps(body).encode()
        return await self.http.post(
            self.url, content=content, headers={**headers, "Content-Type": "application/json"}
        )

    async def rpc(self, method: str, params: Any = None) -> httpx.Response:
        self.next_id += 1
        return await self.post(
            {"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params or {}}
        )

    async def call(self, tool: str) -> httpx.Response:
        return await self.rpc("tools/call", {"name": tool, "arguments": {"x": tool}})

    async def aclose(self) -> None:
        await self.http.aclose()


def _audit(node: Node) -> list[dict[str, Any]]:
    return json.loads(
        node.cli("audit", "search", "--format=json", "--order=asc", "--app=crashy-stdio", local=True).stdout
    ) + json.loads(
        node.cli("audit", "search", "--format=json", "--order=asc", "--app=crashy-http", local=True).stdout
    )


async def test_stdio_server_dying_mid_call(gw: Node) -> None:
    victim, bystander = Client(gw, "crashy-stdio"), Client(gw, "crashy-stdio")
    try:
        await victim.start()
        await bystander.start()
        r = await victim.call("die")
        assert r.status_code == 502
        assert r.headers["x-bastion-error-origin"] == "upstream"
        assert "upstream" in r.json()["error"]["message"] and "code 3" in r.json()["error"]["message"]
        again = await victim.call("echo")
        assert again.status_code == 404  # the session ended with its process: re-initialize
        # ...and its owner hears why, not only "not found".
        assert "this session ended (stdio server exited with code 3" in again.json()["error"]["message"]
        ok = await bystander.call("echo")
        assert ok.status_code == 200 and "echo" in ok.text
        fresh = Client(gw, "crashy-stdio")
        await fresh.start()
        assert (await fresh.call("echo")).status_code == 200
        await fresh.aclose()
    finally:
        await victim.aclose()
        await bystander.aclose()
    calls = [e for e in _audit(gw) if e.get("tool") == "die"]
    assert calls and calls[-1]["success"] is False


async def test_http_upstream_cut_mid_call_and_hanging(gw: Node) -> None:
    c, other = Client(gw, "crashy-http"), Client(gw, "crashy-http")
    try:
        await c.start()
        await other.start()
        r = await c.call("die")
        assert r.status_code == 502
        assert r.headers["x-bastion-error-origin"] == "upstream"
        hung = await c.call("hang")
        assert hung.status_code == 504
        assert hung.headers["x-bastion-error-origin"] == "upstream"
        assert (await other.call("echo")).status_code == 200
    finally:
        await c.aclose()
        await other.aclose()
    tools = {e.get("tool"): e for e in _audit(gw) if e.get("method") == "tools/call"}
    assert tools["die"]["success"] is False and tools["hang"]["success"] is False


async def test_upstream_garbage_is_dropped_and_the_call_still_answers(gw: Node) -> None:
    c = Client(gw, "crashy-stdio")
    try:
        await c.start()
        r = await c.call("garbage")
        assert r.status_code == 200 and r.json()["result"]["content"][0]["text"] == "ok"
    finally:
        await c.aclose()
    # The engine's Log command is carried out: the dropped line is in the service log, on one line.
    lines = [
        ln for ln in gw.log.read_text().splitlines() if "dropped an invalid message from the upstream" in ln
    ]
    assert lines and "WARN" in lines[0] and "session_id=" in lines[0]


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"this is not json", 400, -32700),
        (b'[{"jsonrpc":"2.0","id":1,"method":"ping"}]', 400, -32600),
        (
            b'{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"echo","Name":"die"}}',
            400,
            -32600,
        ),
    ],
)
async def test_bad_client_bodies(gw: Node, raw: bytes, status: int, code: int) -> None:
    c = Client(gw, "crashy-stdio")
    try:
        await c.start()
        r = await c.post(None, raw=raw)
        assert r.status_code == status, r.text
        assert r.json()["error"]["code"] == code
        assert (await c.call("echo")).status_code == 200  # the session carries on
    finally:
        await c.aclose()


async def test_oversized_body_gets_413(gw: Node) -> None:
    c = Client(gw, "crashy-http")
    try:
        await c.start()
        r = await c.rpc("tools/call", {"name": "echo", "arguments": {"blob": "x" * 70_000}})
        assert r.status_code == 413
        assert r.headers["x-bastion-error-origin"] == "client"
        assert (await c.call("echo")).status_code == 200
    finally:
        await c.aclose()


async def test_many_sessions_at_once_stay_separate(gw: Node) -> None:
    clients = [Client(gw, "crashy-stdio") for _ in range(8)]
    try:
        await asyncio.gather(*(c.start() for c in clients))
        results = await asyncio.gather(
            *(c.rpc("tools/call", {"name": "echo", "arguments": {"i": i}}) for i, c in enumerate(clients))
        )
        for i, r in enumerate(results):
            assert json.loads(r.json()["result"]["content"][0]["text"]) == {"i": i}
        assert len({c.sid for c in clients}) == 8
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))


async def test_idle_sessions_are_reaped_with_an_end_event(gw: Node) -> None:
    import time

    c = Client(gw, "crashy-stdio")
    try:
        await c.start()
        assert (await c.call("echo")).status_code == 200
        deadline = time.monotonic() + 30
        ended: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not ended:
            out = gw.cli(
                "audit", "search", "--format=json", "--type=mcp.session.end", f"--session={c.sid}", local=True
            ).stdout
            ended = json.loads(out)
        assert ended, "no end event for the idle session"
        assert "idle" in ended[0].get("error", "")
        assert (await c.call("echo")).status_code == 404  # gone: the client must re-initialize
    finally:
        await c.aclose()
