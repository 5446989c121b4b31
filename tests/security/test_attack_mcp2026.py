"""Attacks through the MCP 2026-07-28 path (sessionless requests; decision 0046).

* ``Mcp-Name`` naming an allowed tool while the body calls another (and the reverse): a gateway
  or router that trusted the header would authorise one tool and run another.
* A 2026 request for a denied tool: refused by the gateway, audited, never forwarded.
* ``requestState`` (the 2026 multi-round-trip token) on a retried call: the retry is judged
  again, so a denied tool does not pass on the strength of an earlier round.
* Routing headers repeated (first-copy and last-copy readers disagree).
* A 2025 client's mirrored headers never reach the upstream as something the body did not say.

The upstream is the recording server: each test asserts what really reached it.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from tests.security.conftest import Gateway

V2026 = "2026-07-28"
APPS = ["rec-http", "rec-stdio"]


def _req(rid: Any, method: str, params: dict[str, Any], who: str = "attacker-2026") -> bytes:
    p = dict(params)
    p["_meta"] = {
        "io.modelcontextprotocol/protocolVersion": V2026,
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": who, "version": "1"},
    }
    return json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": p}).encode()


def _post(
    gw: Gateway, user: str, app: str, body: bytes, headers: dict[str, str] | list[tuple[str, str]]
) -> httpx.Response:
    base = [
        ("Authorization", f"Bearer {gw.token(user)}"),
        ("Accept", "application/json, text/event-stream"),
        ("Content-Type", "application/json"),
        ("MCP-Protocol-Version", V2026),
    ]
    extra = list(headers.items()) if isinstance(headers, dict) else headers
    with gw.http() as c:
        return c.post(f"https://{gw.node.addr}/mcp/apps/{app}", content=body, headers=base + extra)


def _answer(r: httpx.Response) -> Any:
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        data = [ln[5:].strip() for ln in r.text.splitlines() if ln.startswith("data:")]
        return json.loads(data[-1])
    return r.json()


def _calls(gw: Gateway, app: str) -> list[dict[str, Any]]:
    return [
        m for m in gw.recordings[app].messages() if isinstance(m, dict) and m.get("method") == "tools/call"
    ]


def _sync(gw: Gateway, app: str, tag: str) -> None:
    """An allowed call after the attack: once it is answered, anything sent before it reached the upstream."""
    r = _post(
        gw,
        "alice",
        app,
        _req(f"sync-{tag}", "tools/call", {"name": "echo", "arguments": {"sync": tag}}),
        {"Mcp-Method": "tools/call", "Mcp-Name": "echo"},
    )
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("app", APPS)
def test_mcp_name_cannot_smuggle_another_tool_than_the_body(gateway: Gateway, app: str) -> None:
    before = len(_calls(gateway, app))
    # Header says the allowed tool, body calls the denied one; then the reverse.
    for header_tool, body_tool in (("echo", "get-env"), ("get-env", "echo")):
        body = _req(f"smuggle-{header_tool}", "tools/call", {"name": body_tool, "arguments": {}})
        r = _post(gateway, "limited", app, body, {"Mcp-Method": "tools/call", "Mcp-Name": header_tool})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == -32020
    # Base64 spelling of the allowed name over a body calling the denied tool.
    body = _req("smuggle-b64", "tools/call", {"name": "get-env", "arguments": {}})
    r = _post(gateway, "limited", app, body, {"Mcp-Method": "tools/call", "Mcp-Name": "=?base64?ZWNobw==?="})
    assert r.status_code == 400 and r.json()["error"]["code"] == -32020
    _sync(gateway, app, "smuggle")
    after = _calls(gateway, app)[before:]
    assert [c["params"]["name"] for c in after] == ["echo"], after  # only the sync call
    assert all(c["params"]["arguments"] == {"sync": "smuggle"} for c in after)


def test_repeated_routing_headers_are_refused(gateway: Gateway) -> None:
    body = _req("dup", "tools/call", {"name": "echo", "arguments": {}})
    headers = [("Mcp-Method", "tools/call"), ("Mcp-Name", "echo"), ("Mcp-Name", "get-env")]
    r = _post(gateway, "limited", "rec-http", body, headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == -32020
    assert "mcp-name" in r.json()["error"]["message"]


@pytest.mark.parametrize("app", APPS)
def test_a_denied_tool_is_refused_audited_and_never_forwarded(gateway: Gateway, app: str) -> None:
    before = len(_calls(gateway, app))
    body = _req("denied", "tools/call", {"name": "get-env", "arguments": {}}, who=f"denied-{app}")
    r = _post(gateway, "limited", app, body, {"Mcp-Method": "tools/call", "Mcp-Name": "get-env"})
    msg = _answer(r)
    assert (
        msg["id"] == "denied"
        and "get-env" in msg["error"]["message"]
        and "not allowed" in msg["error"]["message"]
    )
    _sync(gateway, app, "denied")
    assert all(c["params"]["name"] != "get-env" for c in _calls(gateway, app)[before:])
    events = gateway.audit("--user=limited", f"--app={app}", "--tool=get-env")
    mine = [e for e in events if e.get("client_info") == f"denied-{app}/1"]
    assert mine and not mine[-1]["success"] and "access denied" in mine[-1]["error"]


@pytest.mark.parametrize("app", APPS)
def test_request_state_is_passed_untouched_and_a_denied_retry_is_refused(gateway: Gateway, app: str) -> None:
    state = "opaque-state-\u00e9-" + "x" * 64
    before = len(_calls(gateway, app))
    # An allowed call carrying requestState and inputResponses: forwarded as the client sent them.
    params = {"name": "echo", "arguments": {"a": 1}, "requestState": state, "inputResponses": {"k": {"v": 1}}}
    r = _post(
        gateway,
        "limited",
        app,
        _req("rs-ok", "tools/call", params),
        {"Mcp-Method": "tools/call", "Mcp-Name": "echo"},
    )
    assert r.status_code == 200 and "result" in _answer(r), r.text
    got = _calls(gateway, app)[before:]
    assert got and got[-1]["params"]["requestState"] == state
    assert got[-1]["params"]["inputResponses"] == {"k": {"v": 1}}
    # The retry of a round names a denied tool with the same state: judged again, refused.
    params = {"name": "get-env", "arguments": {}, "requestState": state, "inputResponses": {"k": {"v": 1}}}
    r = _post(
        gateway,
        "limited",
        app,
        _req("rs-denied", "tools/call", params),
        {"Mcp-Method": "tools/call", "Mcp-Name": "get-env"},
    )
    assert "error" in _answer(r) and "get-env" in _answer(r)["error"]["message"]
    _sync(gateway, app, "rs")
    assert all(c["params"]["name"] != "get-env" for c in _calls(gateway, app)[before:])


def test_the_upstream_of_a_2026_client_gets_no_client_routing_headers(gateway: Gateway) -> None:
    """The 2025 upstream behind a 2026 client hears the session's version, never the client's
    Mcp-* headers (checked by the gateway, then dropped)."""
    records = gateway.recordings["rec-http"]
    before = len(records.records())
    _sync(gateway, "rec-http", "headers")
    new = records.records()[before:]
    call = [r for r in new if '"tools/call"' in r.get("body", "")]
    assert call, new
    names = {k for k, _ in call[-1]["headers"]}
    assert "mcp-name" not in names and "mcp-method" not in names
    assert dict(call[-1]["headers"])["mcp-protocol-version"] != V2026


def test_closing_the_response_stream_cancels_the_call_upstream(gateway: Gateway) -> None:
    """2026-07-28: a client that closes its response stream cancels the request.  The upstream
    hears ``notifications/cancelled`` for the id the gateway sent, and the call's audit row is
    completed as cancelled (not left open, nor waiting for the response timeout)."""
    rec = gateway.recordings["rec-stdio"]
    params = {"name": "echo", "arguments": {"hold": 1}, "x-no-reply": True}
    body = _req("held-call", "tools/call", params, who="canceller")
    headers = {
        "Authorization": f"Bearer {gateway.token('limited')}",
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "MCP-Protocol-Version": V2026,
        "Mcp-Method": "tools/call",
        "Mcp-Name": "echo",
    }
    with gateway.http() as c, pytest.raises(httpx.ReadTimeout):
        # Gives up after a second and closes the connection: the stream is closed.
        c.post(f"https://{gateway.node.addr}/mcp/apps/rec-stdio", content=body, headers=headers, timeout=1.0)
    sent = [m for m in rec.messages() if isinstance(m, dict) and (m.get("params") or {}).get("x-no-reply")]
    assert sent, "the call never reached the upstream"
    upstream_id = sent[-1]["id"]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        cancels = [
            m
            for m in rec.messages()
            if isinstance(m, dict)
            and m.get("method") == "notifications/cancelled"
            and m["params"].get("requestId") == upstream_id
        ]
        if cancels:
            break
        time.sleep(0.05)  # polling a file for a condition, bounded by the deadline
    assert cancels, "the upstream never heard the cancel"
    events = gateway.audit("--user=limited", "--app=rec-stdio", "--tool=echo")
    mine = [e for e in events if e.get("client_info") == "canceller/1" and e.get("method") == "tools/call"]
    assert mine and not mine[-1]["success"] and "cancelled" in mine[-1]["error"]


def test_a_question_of_the_upstream_to_a_2026_client_is_answered_by_the_gateway(gateway: Gateway) -> None:
    """A 2025 upstream asking the client (sampling) in the middle of a 2026 request: the 2026
    client cannot be asked, so the gateway says so to the upstream — which goes on, instead of
    waiting for its timeout — and the client never sees the question."""
    params = {"name": "echo", "arguments": {}, "x-ask": True}
    r = _post(
        gateway,
        "limited",
        "rec-stdio",
        _req("asks", "tools/call", params),
        {"Mcp-Method": "tools/call", "Mcp-Name": "echo"},
    )
    assert r.status_code == 200, r.text
    assert "sampling/createMessage" not in r.text
    msg = _answer(r)
    said = json.loads(msg["result"]["content"][0]["text"])
    assert said["error"]["code"] == -32601 and "2026-07-28" in said["error"]["message"]
