"""Issue 19: MCP 2026-07-28 clients through the gateway (decisions 0046, 0047).

The official SDK (``mcp`` 2.3.0) as a 2026 client — sessionless, ``server/discover`` first —
against server-everything (a 2025 server, over streamable HTTP and stdio): the gateway holds an
upstream session for the client, filters and audits every request as it does a session's.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Node, start_node, stop_node
from tests.integration.test_data_path import ROLES, ca_file, token
from tests.peers import everything_cmd, requires_node_peers, run_everything

pytestmark = requires_node_peers

V2026 = "2026-07-28"
APPS = ["everything-http", "everything-stdio"]


@contextmanager
def gateway_with(root: Path, more_apps: str = "") -> Iterator[Node]:
    """A node serving server-everything over HTTP and stdio (and ``more_apps``, YAML list items),
    with ``alice`` (every tool) and ``eve`` (echo only)."""
    with ExitStack() as stack:
        http_url = stack.enter_context(run_everything("streamableHttp"))
        node_bin, *stdio_args = everything_cmd("stdio")
        apps = f"""\
app_service:
  apps:
  - name: everything-http
    uri: mcp+{http_url}
    labels: {{env: dev}}
  - name: everything-stdio
    labels: {{env: dev}}
    mcp:
      command: {node_bin}
      args: {json.dumps(stdio_args)}
      run_as_host_user: root
"""
        node = start_node(root, extra_config=apps + more_apps)
        try:
            (root / "roles.yaml").write_text(ROLES)
            node.cli("create", str(root / "roles.yaml"), local=True)
            node.cli("users", "add", "alice", "--roles=mcp-user", local=True)
            node.cli("users", "add", "eve", "--roles=echo-only", local=True)
            yield node
        finally:
            stop_node(node)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with gateway_with(tmp_path_factory.mktemp("gw2026")) as node:
        yield node


def ca_ctx(node: Node) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file(node)))


@asynccontextmanager
async def client2026(
    node: Node, user: str, app: str, *, mode: str = "auto", name: str = "sdk-2026", bearer: str | None = None
) -> AsyncIterator[Any]:
    """The SDK's own client, negotiating as it does by default (server/discover, then 2026-07-28);
    ``bearer``: a token already signed for ``user`` (else one is signed)."""
    import httpx2
    from mcp.client.client import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp_types import Implementation

    http = httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {bearer or token(node, user)}"}, verify=ca_ctx(node), timeout=30
    )
    url = f"https://{node.addr}/mcp/apps/{app}"
    async with (
        http,
        Client(
            streamable_http_client(url, http_client=http),
            mode=mode,
            client_info=Implementation(name=name, version="1.0"),
            cache=None,
        ) as c,
    ):
        yield c


def audit(node: Node, *filters: str) -> list[dict[str, Any]]:
    out = node.cli("audit", "search", "--format=json", "--order=asc", *filters, local=True).stdout
    events: list[dict[str, Any]] = json.loads(out)
    return events


def post(
    node: Node, user: str, app: str, body: Any, headers: dict[str, str] | None = None, method: str = "POST"
) -> httpx.Response:
    hs = {
        "Authorization": f"Bearer {token(node, user)}",
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
    }
    hs.update(headers or {})
    with httpx.Client(verify=ca_ctx(node), timeout=30) as c:
        return c.request(
            method, f"https://{node.addr}/mcp/apps/{app}", content=json.dumps(body).encode(), headers=hs
        )


def req(
    method: str, params: dict[str, Any] | None = None, *, rid: Any = 1, version: str = V2026
) -> dict[str, Any]:
    p = dict(params or {})
    p["_meta"] = {
        "io.modelcontextprotocol/protocolVersion": version,
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "raw-2026", "version": "1"},
    }
    return {"jsonrpc": "2.0", "id": rid, "method": method, "params": p}


def hdrs(method: str, name: str | None = None, version: str = V2026) -> dict[str, str]:
    out = {"MCP-Protocol-Version": version, "Mcp-Method": method}
    if name is not None:
        out["Mcp-Name"] = name
    return out


def answer(r: httpx.Response) -> Any:
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        data = [ln[5:].strip() for ln in r.text.splitlines() if ln.startswith("data:")]
        return json.loads(data[-1])
    return r.json()


@pytest.mark.parametrize("app", APPS)
async def test_sdk_2026_client_discovers_lists_and_calls(gateway: Node, app: str) -> None:
    async with client2026(gateway, "alice", app) as c:
        assert c.session.protocol_version == V2026  # discover answered: no fallback to initialize
        names = {t.name for t in (await c.list_tools()).tools}
        assert {"echo", "get-sum"} <= names
        r = await c.call_tool("echo", {"message": f"hi {app}"})
        assert r.content[0].text == f"Echo: hi {app}"
        r = await c.call_tool("get-sum", {"a": 2, "b": 40})
        assert "42" in r.content[0].text


@pytest.mark.parametrize("app", APPS)
async def test_limited_2026_client_is_filtered_refused_and_audited(gateway: Node, app: str) -> None:
    from mcp.shared.exceptions import MCPError

    async with client2026(gateway, "eve", app, name=f"eve-2026-{app}") as c:
        assert [t.name for t in (await c.list_tools()).tools] == ["echo"]
        assert (await c.call_tool("echo", {"message": "x"})).content[0].text == "Echo: x"
        with pytest.raises(MCPError) as denied:
            await c.call_tool("get-sum", {"a": 1, "b": 2})
        assert "get-sum" in str(denied.value) and "not allowed" in str(denied.value)
    events = audit(gateway, "--user=eve", f"--app={app}")
    calls = [e for e in events if e.get("method") == "tools/call"]
    ok = [e for e in calls if e.get("tool") == "echo"]
    refused = [e for e in calls if e.get("tool") == "get-sum"]
    assert ok and ok[-1]["success"] and ok[-1]["client_info"] == f"eve-2026-{app}/1.0"
    assert refused and not refused[-1]["success"] and "access denied" in refused[-1]["error"]
    # One session held for that client: its start event names the client, and both calls are in it.
    assert ok[-1]["session_id"] == refused[-1]["session_id"]
    starts = [
        e for e in events if e["event"] == "mcp.session.start" and e["session_id"] == ok[-1]["session_id"]
    ]
    assert starts and "2026" in starts[0]["transport"]


def test_discover_answers_versions_and_filtered_capabilities(gateway: Node) -> None:
    r = post(gateway, "eve", "everything-http", req("server/discover"), hdrs("server/discover"))
    assert r.status_code == 200, r.text
    res = r.json()["result"]
    assert V2026 in res["supportedVersions"] and "2025-06-18" in res["supportedVersions"]
    assert "tools" in res["capabilities"] and "logging" not in res["capabilities"]
    assert res["cacheScope"] == "private" and res["resultType"] == "complete"
    assert "mcp-session-id" not in r.headers


def test_list_results_are_private_with_a_ttl(gateway: Node) -> None:
    r = post(gateway, "eve", "everything-http", req("tools/list", rid="a"), hdrs("tools/list"))
    assert r.status_code == 200, r.text
    msg = answer(r)
    assert msg["id"] == "a"
    res = msg["result"]
    assert [t["name"] for t in res["tools"]] == ["echo"]
    assert res["cacheScope"] == "private" and 0 <= res["ttlMs"] <= 2000 and res["resultType"] == "complete"
    r = post(
        gateway,
        "eve",
        "everything-http",
        req("tools/call", {"name": "echo", "arguments": {"message": "m"}}, rid=7),
        hdrs("tools/call", "echo"),
    )
    msg = answer(r)
    assert msg["id"] == 7 and msg["result"]["resultType"] == "complete"
    assert "mcp-session-id" not in r.headers


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_get_and_delete_are_405_for_2026(gateway: Node, method: str) -> None:
    with httpx.Client(verify=ca_ctx(gateway), timeout=30) as c:
        r = c.request(
            method,
            f"https://{gateway.addr}/mcp/apps/everything-http",
            headers={"Authorization": f"Bearer {token(gateway, 'alice')}", "MCP-Protocol-Version": V2026},
        )
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_unsupported_version_lists_the_supported_ones(gateway: Node) -> None:
    r = post(
        gateway,
        "alice",
        "everything-http",
        req("tools/list", version="2099-01-01"),
        hdrs("tools/list", version="2099-01-01"),
    )
    assert r.status_code == 400
    err = r.json()["error"]
    assert (
        err["code"] == -32022
        and V2026 in err["data"]["supported"]
        and err["data"]["requested"] == "2099-01-01"
    )


@pytest.mark.parametrize(
    ("headers", "what"),
    [
        (hdrs("tools/list", "echo"), "Mcp-Method"),
        ({"MCP-Protocol-Version": V2026}, "Mcp-Method"),
        (hdrs("tools/call", "=?base64?ZWNobw==?="), None),  # "echo", base64: agrees
        (hdrs("tools/call", "get-sum"), "Mcp-Name"),
        (hdrs("tools/call", None), "Mcp-Name"),
    ],
)
def test_header_body_agreement(gateway: Node, headers: dict[str, str], what: str | None) -> None:
    body = req("tools/call", {"name": "echo", "arguments": {"message": "m"}})
    r = post(gateway, "alice", "everything-http", body, headers)
    if what is None:
        assert r.status_code == 200 and answer(r)["result"]["content"][0]["text"] == "Echo: m"
        return
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == -32020 and what in r.json()["error"]["message"]


def test_missing_envelope_and_removed_methods(gateway: Node) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    r = post(gateway, "alice", "everything-http", body, hdrs("tools/list"))
    assert r.status_code == 400 and r.json()["error"]["code"] == -32602
    r = post(gateway, "alice", "everything-http", req("ping"), hdrs("ping"))
    assert r.status_code == 404 and r.json()["error"]["code"] == -32601
    # A 2026 body without the version header (it would otherwise read as a 2025 request).
    r = post(gateway, "alice", "everything-http", req("tools/list"), {"Mcp-Method": "tools/list"})
    assert r.status_code == 400 and r.json()["error"]["code"] == -32020


async def test_a_role_change_applies_to_the_next_2026_request(gateway: Node) -> None:
    """A 2026 client mid-conversation: its user loses every tool but echo; the next request is
    decided on the new roles (the held session follows the user's roles, as a session does)."""
    import anyio
    from mcp.shared.exceptions import MCPError

    gateway.cli("users", "add", "carol", "--roles=mcp-user", local=True)
    async with client2026(gateway, "carol", "everything-http") as c:
        assert "get-sum" in {t.name for t in (await c.list_tools()).tools}
        assert "42" in (await c.call_tool("get-sum", {"a": 40, "b": 2})).content[0].text
        gateway.cli("users", "update", "carol", "--roles=echo-only", local=True)
        names: list[str] = []
        with anyio.fail_after(15):  # the proxy's actor cache: seconds, not the session's life
            for _ in range(1000):
                names = [t.name for t in (await c.list_tools()).tools]
                if names == ["echo"]:
                    break
                await anyio.sleep(0.2)
        assert names == ["echo"]
        with pytest.raises(MCPError) as denied:
            await c.call_tool("get-sum", {"a": 1, "b": 2})
        assert "not allowed" in str(denied.value)
        assert (await c.call_tool("echo", {"message": "still"})).content[0].text == "Echo: still"


async def test_listen_acknowledges_and_carries_list_changed_on_a_role_change(gateway: Node) -> None:
    """``subscriptions/listen`` on a stdio app: acknowledged at once with the types the gateway
    honours; when the user's roles change, the next request makes the gateway tell the stream
    ``notifications/tools/list_changed`` (a 2026 client re-lists and gets the new filter)."""
    import anyio

    gateway.cli("users", "add", "dave", "--roles=mcp-user", local=True)
    url = f"https://{gateway.addr}/mcp/apps/everything-stdio"
    auth = {
        "Authorization": f"Bearer {token(gateway, 'dave')}",
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
    }
    listen = req(
        "subscriptions/listen", {"notifications": {"toolsListChanged": True, "resourceSubscriptions": ["x"]}}
    )
    async with httpx.AsyncClient(verify=ca_ctx(gateway), timeout=30) as c:
        await c.post(
            url, json=req("tools/list"), headers={**auth, **hdrs("tools/list")}
        )  # opens the held session
        async with c.stream("POST", url, json=listen, headers={**auth, **hdrs("subscriptions/listen")}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            lines = r.aiter_lines()
            messages: list[dict[str, Any]] = []

            async def next_message() -> dict[str, Any]:
                async for line in lines:
                    if line.startswith("data:"):
                        msg: dict[str, Any] = json.loads(line[5:])
                        messages.append(msg)
                        return msg
                raise AssertionError(f"the listen stream ended: {messages}")

            with anyio.fail_after(10):
                ack = await next_message()
            assert ack["method"] == "notifications/subscriptions/acknowledged"
            assert ack["params"]["notifications"] == {"toolsListChanged": True}  # no resource subscriptions
            gateway.cli("users", "update", "dave", "--roles=echo-only", local=True)
            with anyio.fail_after(20):
                while True:
                    r2 = await c.post(url, json=req("tools/list"), headers={**auth, **hdrs("tools/list")})
                    if [t["name"] for t in answer(r2)["result"]["tools"]] == ["echo"]:
                        break
                    await anyio.sleep(0.2)
                note = await next_message()
            assert note["method"] == "notifications/tools/list_changed", messages


async def test_listen_on_an_http_upstream_is_acknowledged_at_once(gateway: Node) -> None:
    """server-everything sends its GET stream's headers only with a first event: the listen is
    acknowledged without waiting for it, and closing the stream ends the relay."""
    import anyio

    url = f"https://{gateway.addr}/mcp/apps/everything-http"
    headers = {
        "Authorization": f"Bearer {token(gateway, 'alice')}",
        "Accept": "application/json, text/event-stream",
        **hdrs("subscriptions/listen"),
    }
    body = req("subscriptions/listen", {"notifications": {"promptsListChanged": True}})
    async with httpx.AsyncClient(verify=ca_ctx(gateway), timeout=30) as c:
        for _ in range(2):  # a second listen after the first closed is served too
            with anyio.fail_after(10):
                async with c.stream("POST", url, json=body, headers=headers) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data:"):
                            ack = json.loads(line[5:])
                            break
            assert ack["params"]["notifications"] == {"promptsListChanged": True}


def test_held_sessions_make_room_for_new_2026_clients(tmp_path: Path) -> None:
    """With a limit of 2 sessions per user, a third 2026 client (another self-description) is
    served: the held session idle longest is ended for it (audited with the reason), and a
    2025 session of the user's own is never ended for that."""
    node = start_node(tmp_path, extra_config="app_service:\n  demo_server: true\n  sessions_per_user: 2\n")
    try:
        node.cli("users", "add", "alice", "--roles=mcp-user", local=True)
        url_app = "bastion-demo"
        init = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "own", "version": "1"},
            },
        }
        r = post(node, "alice", url_app, init)
        assert r.status_code == 200, r.text  # the user's own 2025 session: one of the two
        for name in ("first", "second", "third"):
            body = req("tools/list")
            body["params"]["_meta"]["io.modelcontextprotocol/clientInfo"] = {"name": name, "version": "1"}
            r = post(node, "alice", url_app, body, hdrs("tools/list"))
            assert r.status_code == 200, (name, r.text)
        ends = [e for e in audit(node, "--user=alice") if e["event"] == "mcp.session.end"]
        assert len(ends) == 2 and all("make room" in e.get("error", "") for e in ends), ends
        assert [e["client_info"] for e in ends] == ["first/1", "second/1"]
    finally:
        stop_node(node)


def test_mcp_tools_and_call_speak_2026_where_the_gateway_does(gateway: Node, tmp_path: Path) -> None:
    """`bastion mcp tools/call` discover 2026-07-28 and send self-contained requests: filtered,
    refused and audited as the held session's, under the CLI's name."""
    from tests.integration.test_data_path import _identity

    as_eve = ["-i", str(_identity(gateway, "eve")), "--proxy", gateway.addr]

    def mcp(*args: str, check: bool = True) -> Any:
        return gateway.cli("mcp", *args, *as_eve, home=tmp_path / "h", check=check)

    assert [t["name"] for t in json.loads(mcp("tools", "everything-stdio", "--format=json").stdout)] == [
        "echo"
    ]
    assert (
        mcp("call", "everything-stdio", "echo", "--arg=message=cli-2026").stdout.strip() == "Echo: cli-2026"
    )
    denied = mcp("call", "everything-stdio", "get-sum", "--arg=a=1", "--arg=b=2", check=False)
    assert denied.returncode != 0 and "not allowed" in denied.stdout + denied.stderr
    calls = [
        e
        for e in audit(gateway, "--user=eve", "--app=everything-stdio")
        if e.get("method") == "tools/call" and str(e.get("client_info", "")).startswith("bastion-cli/")
    ]
    assert [(e["tool"], e["success"]) for e in calls][-2:] == [("echo", True), ("get-sum", False)]
    sid = calls[-1]["session_id"]
    starts = [
        e
        for e in audit(gateway, "--user=eve")
        if e["event"] == "mcp.session.start" and e["session_id"] == sid
    ]
    assert starts and starts[0]["transport"].startswith("http(2026)"), starts


@pytest.mark.parametrize("app", APPS)
async def test_sdk_2026_stdio_client_through_mcp_connect(gateway: Node, app: str, tmp_path: Path) -> None:
    """The SDK's 2026 client on stdio through `bastion mcp connect`: it discovers 2026-07-28 and
    its self-contained requests are filtered, refused and audited as a 2026 HTTP client's; the
    bridge's log says which version the client speaks."""
    import sys

    from mcp.client.client import Client
    from mcp.client.stdio import StdioServerParameters, stdio_client
    from mcp.shared.exceptions import MCPError
    from mcp_types import Implementation

    from tests.integration.test_mcp_connect import connect_args, sign

    ident = sign(gateway, tmp_path / "eve.id", user="eve")
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "bastion.cli.main", *connect_args(gateway, app, ident)],
        env={"BASTION_HOME": str(tmp_path / "home")},
    )
    name = f"stdio-2026-{app}"
    with (tmp_path / "bridge.log").open("w") as errlog:
        async with Client(
            stdio_client(params, errlog=errlog),
            client_info=Implementation(name=name, version="1.0"),
            cache=None,
        ) as c:
            assert c.session.protocol_version == V2026
            assert [t.name for t in (await c.list_tools()).tools] == ["echo"]
            assert (await c.call_tool("echo", {"message": "via stdio"})).content[0].text == "Echo: via stdio"
            with pytest.raises(MCPError) as denied:
                await c.call_tool("get-sum", {"a": 1, "b": 2})
            assert "not allowed" in str(denied.value)
    assert "the MCP client speaks 2026-07-28" in (tmp_path / "bridge.log").read_text()
    calls = [
        e
        for e in audit(gateway, "--user=eve", f"--app={app}")
        if e.get("method") == "tools/call" and e.get("client_info") == f"{name}/1.0"
    ]
    assert [(e["tool"], e["success"]) for e in calls] == [("echo", True), ("get-sum", False)]


async def test_sdk_2026_client_through_proxy_mcp(gateway: Node, tmp_path: Path) -> None:
    """`bastion proxy mcp` passes a 2026 client's self-contained requests on as they are (its
    log says the version the client speaks)."""
    import httpx2
    from mcp.client.client import Client
    from mcp.client.streamable_http import streamable_http_client

    from tests.integration.test_data_path import local_proxy

    with local_proxy(gateway, "everything-http", "eve", tmp_path) as addr:
        async with (
            httpx2.AsyncClient(timeout=30) as http,
            Client(streamable_http_client(f"http://{addr}/mcp", http_client=http), cache=None) as c,
        ):
            assert c.session.protocol_version == V2026
            assert [t.name for t in (await c.list_tools()).tools] == ["echo"]
            assert (await c.call_tool("echo", {"message": "local"})).content[0].text == "Echo: local"
    assert "an MCP client speaks 2026-07-28 (no session)" in (tmp_path / "proxy.log").read_text()
