"""Issue 19: every version pair through the gateway (decisions 0046, 0047).

Clients: the SDK (``mcp`` 2.3.0) negotiating 2026-07-28 (``server/discover``), the same SDK
pinned to the handshake (2025-11-25), and pinned to the handshake with its handshake version set
to 2025-06-18.  Upstreams: server-everything (2025 only; HTTP and stdio), the SDK fixture speaking
only 2026-07-28 over HTTP (found by the gateway's probe) and over stdio (pinned ``protocol:
2026-07-28``), and the SDK fixture speaking both, over HTTP and stdio (served in the handshake
era).  Each cell, as a limited user: the list is filtered, an allowed tool works, a denied one is
refused with the gateway's error, and the audit log has both with user, app and tool.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest

from tests.integration.conftest import Node
from tests.integration.test_data_path import token
from tests.integration.test_mcp2026 import audit, client2026, gateway_with
from tests.peers import ROOT, free_port, requires_node_peers, run_server

pytestmark = requires_node_peers

MODERN_CMD = [sys.executable, "-m", "tests.fixtures.modern_server"]


@contextmanager
def run_modern(*args: str) -> Iterator[str]:
    port = free_port()
    cmd = [*MODERN_CMD, "--transport", "http", "--port", str(port), *args]
    with run_server(cmd, port, env=dict(os.environ, PYTHONUNBUFFERED="1")):
        yield f"http://127.0.0.1:{port}/mcp"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with ExitStack() as stack:
        modern = stack.enter_context(run_modern())
        both = stack.enter_context(run_modern("--both"))
        more = f"""\
  - name: modern-http
    uri: mcp+{modern}
    labels: {{env: dev}}
  - name: modern-stdio
    labels: {{env: dev}}
    protocol: "2026-07-28"
    mcp:
      command: {MODERN_CMD[0]}
      args: {json.dumps([*MODERN_CMD[1:], "--transport", "stdio"])}
      run_as_host_user: root
      env: {{PYTHONPATH: "{ROOT}"}}
  - name: both-http
    uri: mcp+{both}
    labels: {{env: dev}}
  - name: both-stdio
    labels: {{env: dev}}
    mcp:
      command: {MODERN_CMD[0]}
      args: {json.dumps([*MODERN_CMD[1:], "--transport", "stdio"])}
      run_as_host_user: root
      env: {{PYTHONPATH: "{ROOT}"}}
"""
        yield stack.enter_context(gateway_with(tmp_path_factory.mktemp("matrix"), more))


@pytest.fixture(scope="module")
def bearer(gateway: Node) -> dict[str, str]:
    """A token per user, signed once: each `bastion auth sign` is a CLI start (~1 s)."""
    return {user: token(gateway, user) for user in ("alice", "eve")}


APPS = ["everything-http", "everything-stdio", "modern-http", "modern-stdio", "both-http", "both-stdio"]
CLIENTS = {"2026-07-28": "auto", "2025-11-25": "legacy", "2025-06-18": "legacy"}
UPSTREAM_HANDSHAKE = {"2026-07-28": "2025-11-25", "2025-11-25": "2025-11-25", "2025-06-18": "2025-06-18"}
"""The version a server that speaks both eras is initialized with: a 2025 client's own; the
gateway's latest handshake version for a 2026 client (it holds that session on its behalf)."""


@pytest.fixture
def client_version(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The client's version: the SDK's handshake offers its latest (2025-11-25) and has no knob
    for an older one, so a 2025-06-18 client is the SDK with that constant set to 2025-06-18."""
    version: str = request.param
    if version == "2025-06-18":
        import mcp.client.session

        monkeypatch.setattr(mcp.client.session, "LATEST_HANDSHAKE_VERSION", version)
    return version


@pytest.mark.parametrize("app", APPS)
@pytest.mark.parametrize("client_version", list(CLIENTS), indirect=True)
async def test_matrix_cell(gateway: Node, bearer: dict[str, str], client_version: str, app: str) -> None:
    from mcp.shared.exceptions import MCPError

    client = client_version
    name = f"cell-{client}-{app}"
    denied = "get-sum" if app.startswith("everything") else "add"
    async with client2026(gateway, "eve", app, mode=CLIENTS[client], name=name, bearer=bearer["eve"]) as c:
        assert c.session.protocol_version == client
        assert [t.name for t in (await c.list_tools()).tools] == ["echo"]
        assert (await c.call_tool("echo", {"message": "x"})).content[0].text == "Echo: x"
        with pytest.raises(MCPError) as refused:
            await c.call_tool(denied, {"a": 1, "b": 2})
        assert denied in str(refused.value) and "not allowed" in str(refused.value)
    calls = [e for e in audit(gateway, "--user=eve", f"--app={app}") if e.get("method") == "tools/call"]
    mine = [e for e in calls if e.get("client_info") == f"{name}/1.0"]
    assert [(e["tool"], e["success"]) for e in mine] == [("echo", True), (denied, False)], mine


@pytest.mark.parametrize("app", ["modern-http", "modern-stdio", "both-http", "both-stdio"])
@pytest.mark.parametrize("client_version", list(CLIENTS), indirect=True)
async def test_what_the_sdk_server_saw(
    gateway: Node, bearer: dict[str, str], client_version: str, app: str
) -> None:
    """The server's own view: a 2026-only server gets self-contained 2026 requests carrying the
    client's name whatever the client's version; one that speaks both is served in the handshake era."""
    client = client_version
    name = f"who-{client}-{app}"
    async with client2026(
        gateway, "alice", app, mode=CLIENTS[client], name=name, bearer=bearer["alice"]
    ) as c:
        saw = json.loads((await c.call_tool("whoami", {})).content[0].text)
    assert saw["client"] == name
    assert saw["protocol_version"] == (
        "2026-07-28" if app.startswith("modern") else UPSTREAM_HANDSHAKE[client]
    )


@pytest.mark.parametrize("client_version", list(CLIENTS), indirect=True)
async def test_mirrored_parameters_reach_a_2026_server(
    gateway: Node, bearer: dict[str, str], client_version: str
) -> None:
    """A tool whose argument is declared ``x-mcp-header``: the 2026 server refuses a call without
    the ``Mcp-Param-*`` header, so the gateway makes it from the body it forwards."""
    client = client_version
    async with client2026(
        gateway, "alice", "modern-http", mode=CLIENTS[client], name=f"param-{client}", bearer=bearer["alice"]
    ) as c:
        assert "region" in {t.name for t in (await c.list_tools()).tools}
        r = await c.call_tool("region", {"region": "eu-west é"})
        assert not r.is_error, r
        assert r.content[0].text == "region eu-west é"


async def test_a_2025_client_cancels_a_call_on_a_2026_server(gateway: Node) -> None:
    """``notifications/cancelled`` from a 2025 session: the gateway ends the 2026 request (over
    HTTP, by closing its stream); the waiting POST is answered at once, the call audited as
    cancelled."""
    import anyio
    import httpx

    from tests.integration.test_mcp2026 import ca_ctx, token

    url = f"https://{gateway.addr}/mcp/apps/modern-http"
    base = {
        "Authorization": f"Bearer {token(gateway, 'alice')}",
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
    }
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "canceller", "version": "1"},
        },
    }
    async with httpx.AsyncClient(verify=ca_ctx(gateway), timeout=60) as c:
        r = await c.post(url, json=init, headers=base)
        assert r.status_code == 200, r.text
        hs = {**base, "Mcp-Session-Id": r.headers["mcp-session-id"], "MCP-Protocol-Version": "2025-06-18"}
        await c.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=hs)
        call = {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "sleep", "arguments": {"seconds": 30}},
        }
        cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 2}}
        with anyio.fail_after(20):  # far less than the 30 s the call would take
            async with anyio.create_task_group() as tg:
                answers: list[httpx.Response] = []

                async def waiting_call() -> None:
                    answers.append(await c.post(url, json=call, headers=hs))

                tg.start_soon(waiting_call)
                # The call's audit row is committed before it goes upstream: then cancel it.
                for _ in range(1000):
                    rows = audit(gateway, "--user=alice", "--app=modern-http", "--tool=sleep")
                    if any(e.get("client_info") == "canceller/1" for e in rows):
                        break
                    await anyio.sleep(0.1)
                r = await c.post(url, json=cancel, headers=hs)
                assert r.status_code == 202
        assert "cancelled" in answers[0].text
    events = audit(gateway, "--user=alice", "--app=modern-http", "--tool=sleep")
    mine = [e for e in events if e.get("client_info") == "canceller/1"]
    assert mine and not mine[-1]["success"] and "cancelled" in mine[-1]["error"]
