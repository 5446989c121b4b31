"""An HTTP upstream that restarts forgets its sessions: the gateway ends them and says 404.

server-everything over streamable HTTP (a real process, restarted on the same port) behind a
gateway node, and the official ``mcp`` SDK as the client (decision 0039). After the restart
the old session's next call is answered 404 (so a spec client starts over with initialize),
its audit row says it failed and why, the session is gone with that reason, and a new
session works.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import Node, start_node, stop_node
from tests.peers import EverythingOnPort, requires_node_peers

pytestmark = requires_node_peers


@dataclass
class Gateway:
    node: Node
    #: Restarted by the test.
    upstream: EverythingOnPort


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("restart")
    upstream = EverythingOnPort()
    upstream.start()
    try:
        apps = f"app_service:\n  apps:\n  - name: everything\n    uri: mcp+{upstream.url}\n"
        node = start_node(root, extra_config=apps)
        try:
            node.cli("users", "add", "alice", "--roles=mcp-user", local=True)
            yield Gateway(node, upstream)
        finally:
            stop_node(node)
    finally:
        upstream.stop()


@asynccontextmanager
async def sdk_session(node: Node, statuses: list[int]) -> AsyncIterator[Any]:
    """An ``mcp`` SDK session through the gateway; the HTTP status of every answer is noted."""
    import httpx2
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    ca = node.root / "ca.pem"
    if not ca.exists():
        ca.write_text(node.cli("auth", "export", local=True).stdout)
    token = node.cli("auth", "sign", "--user=alice", "--format=token", local=True).stdout.strip()

    async def note(response: Any) -> None:
        if response.request.method == "POST":
            statuses.append(response.status_code)

    client = httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {token}"},
        verify=ssl.create_default_context(cafile=str(ca)),
        timeout=30,
        event_hooks={"response": [note]},
    )
    url = f"https://{node.addr}/mcp/apps/everything"
    async with client, streamable_http_client(url, http_client=client) as (r, w), ClientSession(r, w) as s:
        await s.initialize()
        yield s


def audited(node: Node, text: str) -> list[dict[str, Any]]:
    out = node.cli("audit", "search", "--type=mcp.session.request", "--format=json", local=True).stdout
    return [
        r
        for r in json.loads(out)
        if r.get("tool") == "echo" and r.get("params", {}).get("arguments", {}).get("message") == text
    ]


async def test_old_sessions_get_404_after_an_upstream_restart_and_start_over(
    gw: Gateway, tmp_path: Path
) -> None:
    from mcp.shared.exceptions import MCPError

    statuses: list[int] = []
    async with sdk_session(gw.node, statuses) as old:
        assert (await old.call_tool("echo", {"message": "before"})).content[0].text == "Echo: before"
        gw.upstream.restart()  # same port, no memory of the session
        statuses.clear()
        with pytest.raises(MCPError) as lost:
            await old.call_tool("echo", {"message": "after the restart"})
        assert statuses == [404], "the old session's call is answered 404: a spec client starts over"
        assert "no longer knows this session" in str(lost.value)
        assert "start a new one with initialize" in str(lost.value)
        # The session is over, and its owner hears why; the id it used is free with it.
        statuses.clear()
        with pytest.raises(MCPError) as again:
            await old.call_tool("echo", {"message": "once more"})
        assert statuses == [404]
        assert "this session ended (the upstream MCP server no longer knows the session" in str(again.value)
    # The client initializes again, through the same gateway: it works.
    async with sdk_session(gw.node, []) as new:
        assert (await new.call_tool("echo", {"message": "new session"})).content[
            0
        ].text == "Echo: new session"
    # The audit log shows the call that met the forgotten session as failed, with the reason;
    # the one after it never reached the upstream (no session), and the others succeeded.
    [failed] = audited(gw.node, "after the restart")
    assert failed["success"] is False
    assert (
        "no longer knows the session (HTTP 400: Bad Request: No valid session ID provided)" in failed["error"]
    )
    assert "duration_ms" in failed
    assert audited(gw.node, "once more") == []
    assert [r["success"] for r in audited(gw.node, "before") + audited(gw.node, "new session")] == [
        True,
        True,
    ]
    ends = json.loads(
        gw.node.cli("audit", "search", "--type=mcp.session.end", "--format=json", local=True).stdout
    )
    assert any(
        e["session_id"] == failed["session_id"]
        and e["success"] is False
        and "no longer knows the session" in e["error"]
        for e in ends
    ), ends
