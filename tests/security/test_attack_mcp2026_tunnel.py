"""MCP 2026-07-28 requests to a joined app service (over the reverse tunnel): sessionless, so
the proxy routes them like a new session's; the joined host applies the same ladder, policy
and audit as the proxy's own app service (decision 0046)."""

from __future__ import annotations

import json
from typing import Any

from tests.security.test_attack_mcp2026 import V2026, _req
from tests.security.test_front import Front
from tests.security.test_front_tunnel import remote  # noqa: F401 - the module's fixture

_HEADERS = {"MCP-Protocol-Version": V2026, "Mcp-Method": "tools/call"}


def _message(body: bytes) -> Any:
    text = body.decode()
    if text.startswith("{"):
        return json.loads(text)
    return json.loads([ln[5:] for ln in text.splitlines() if ln.startswith("data:")][-1])


def test_a_2026_client_through_a_joined_host(remote: Front) -> None:  # noqa: F811
    calls = len([r for r in remote.up.requests() if '"tools/call"' in r.get("body", "")])
    ok = _req("t1", "tools/call", {"name": "echo", "arguments": {"m": 1}}, who="tunnel-2026")
    status, hdrs, body = remote.send("/mcp/apps/remote-a", ok, headers={**_HEADERS, "Mcp-Name": "echo"})
    assert status == 200, body
    assert "mcp-session-id" not in hdrs and _message(body)["result"]["resultType"] == "complete"
    denied = _req("t2", "tools/call", {"name": "get-env", "arguments": {}}, who="tunnel-2026")
    status, _, body = remote.send("/mcp/apps/remote-a", denied, headers={**_HEADERS, "Mcp-Name": "get-env"})
    assert "get-env" in _message(body)["error"]["message"]
    status, _, body = remote.send("/mcp/apps/remote-a", denied, headers={**_HEADERS, "Mcp-Name": "echo"})
    assert status == 400 and _message(body)["error"]["code"] == -32020
    names = [
        json.loads(r["body"])["params"]["name"]
        for r in remote.up.requests()
        if '"tools/call"' in r.get("body", "")
    ][calls:]
    assert names == ["echo"]
    events = [
        e for e in remote.audit("--user=limited", "--app=remote-a") if e.get("client_info") == "tunnel-2026/1"
    ]
    assert [(e.get("tool"), e["success"]) for e in events if e.get("method") == "tools/call"] == [
        ("echo", True),
        ("get-env", False),
    ]
