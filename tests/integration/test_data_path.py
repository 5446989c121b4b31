"""Issue 3's acceptance: real MCP servers behind the gateway, real clients in front of it.

server-everything (npm) in its three modes and our conformance fixture (HTTP and stdio) are
registered as apps; the Python `mcp` SDK, the MCP Inspector CLI and the official conformance
suite talk to them through `/mcp/apps/<app>` with a user's bearer credential.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Node, start_node, stop_node
from tests.peers import (
    ROOT,
    everything_cmd,
    inspector_v2_cmd,
    node_env,
    requires_node_peers,
    run_conformance_fixture,
    run_conformance_suite,
    run_everything,
)

pytestmark = requires_node_peers

ROLES = """\
kind: role
version: v1
metadata: {name: echo-only}
spec:
  allow:
    app_labels: {env: dev}
    mcp: {tools: [echo]}
---
kind: role
version: v1
metadata: {name: prod-only}
spec:
  allow:
    app_labels: {env: prod}
    mcp: {tools: ["*"]}
---
kind: role
version: v1
metadata: {name: auditor}
spec:
  allow:
    rules: [{resources: [event], verbs: [list, read]}]
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    root = tmp_path_factory.mktemp("gw")
    with ExitStack() as stack:
        http_url = stack.enter_context(run_everything("streamableHttp"))
        sse_url = stack.enter_context(run_everything("sse"))
        conf_url = stack.enter_context(run_conformance_fixture("http"))
        node_bin, *stdio_args = everything_cmd("stdio")
        fixture_cmd = [sys.executable, "-m", "tests.fixtures.conformance_server", "--transport", "stdio"]
        apps = f"""\
app_service:
  demo_server: true
  # The conformance suite leaves ~30 sessions open (a stdio server each); the default cap is 16.
  stdio_limits: {{per_user: 64}}
  apps:
  - name: everything-http
    uri: mcp+{http_url}
    labels: {{env: dev}}
  - name: everything-sse
    uri: mcp+sse+{sse_url}
    labels: {{env: dev}}
  - name: everything-stdio
    labels: {{env: dev}}
    mcp:
      command: {node_bin}
      args: {json.dumps(stdio_args)}
      run_as_host_user: root
  - name: conformance-http
    uri: mcp+{conf_url}
    labels: {{env: test}}
  - name: conformance-stdio
    labels: {{env: test}}
    mcp:
      command: {fixture_cmd[0]}
      args: {json.dumps(fixture_cmd[1:])}
      run_as_host_user: root
      env: {{PYTHONPATH: "{ROOT}"}}
"""
        node = start_node(root, extra_config=apps)
        try:
            (root / "roles.yaml").write_text(ROLES)
            node.cli("create", str(root / "roles.yaml"), local=True)
            for user, roles in (
                ("alice", "mcp-user"),
                ("eve", "echo-only"),
                ("bob", "prod-only"),
                ("audrey", "auditor"),
            ):
                node.cli("users", "add", user, f"--roles={roles}", local=True)
            yield node
        finally:
            stop_node(node)


def token(node: Node, user: str) -> str:
    return node.cli("auth", "sign", f"--user={user}", "--format=token", local=True).stdout.strip()


def ca_file(node: Node) -> Path:
    path = node.root / "ca.pem"
    if not path.exists():
        path.write_text(node.cli("auth", "export", "--type=tls", local=True).stdout)
    return path


@asynccontextmanager
async def mcp_session(node: Node, user: str, app: str) -> AsyncIterator[Any]:
    import httpx2
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    ctx = ssl.create_default_context(cafile=str(ca_file(node)))
    client = httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {token(node, user)}"}, verify=ctx, timeout=30
    )
    url = f"https://{node.addr}/mcp/apps/{app}"
    async with client, streamable_http_client(url, http_client=client) as (r, w), ClientSession(r, w) as s:
        await s.initialize()
        yield s


@pytest.mark.parametrize("app", ["everything-http", "everything-sse", "everything-stdio"])
async def test_sdk_lists_and_calls_through_each_transport(gateway: Node, app: str) -> None:
    async with mcp_session(gateway, "alice", app) as s:
        names = {t.name for t in (await s.list_tools()).tools}
        assert {"echo", "get-sum", "get-env"} <= names
        r = await s.call_tool("echo", {"message": f"hi {app}"})
        assert r.content[0].text == f"Echo: hi {app}"
        r = await s.call_tool("get-sum", {"a": 2, "b": 40})
        assert "42" in r.content[0].text


@pytest.mark.parametrize("app", ["everything-http", "everything-sse", "everything-stdio"])
async def test_echo_only_role_sees_and_calls_only_echo(gateway: Node, app: str) -> None:
    from mcp.shared.exceptions import MCPError

    async with mcp_session(gateway, "eve", app) as s:
        assert [t.name for t in (await s.list_tools()).tools] == ["echo"]
        assert (await s.call_tool("echo", {"message": "x"})).content[0].text == "Echo: x"
        with pytest.raises(MCPError) as denied:
            await s.call_tool("get-sum", {"a": 1, "b": 2})
        assert "get-sum" in str(denied.value) and "bastion mcp tools" in str(denied.value)


def _post_init(node: Node, user: str, app: str) -> httpx.Response:
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        },
    }
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca_file(node)))) as c:
        return c.post(
            f"https://{node.addr}/mcp/apps/{app}",
            json=body,
            headers={
                "Authorization": f"Bearer {token(node, user)}",
                "Accept": "application/json, text/event-stream",
            },
        )


def test_app_outside_the_users_labels_looks_missing(gateway: Node) -> None:
    hidden = _post_init(gateway, "bob", "everything-http")
    missing = _post_init(gateway, "bob", "no-such-app")
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json()["error"]["message"].replace("everything-http", "X") == missing.json()["error"][
        "message"
    ].replace("no-such-app", "X")


def test_missing_or_bad_credential_gets_401(gateway: Node) -> None:
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca_file(gateway)))) as c:
        for headers in ({}, {"Authorization": "Bearer nope"}):
            r = c.post(f"https://{gateway.addr}/mcp/apps/everything-http", json={}, headers=headers)
            assert r.status_code == 401
            assert r.headers["www-authenticate"].startswith("Bearer")


def test_sessions_are_bound_to_their_user(gateway: Node) -> None:
    first = _post_init(gateway, "alice", "bastion-demo")
    sid = first.headers["mcp-session-id"]
    ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca_file(gateway)))) as c:
        for user, want in (("eve", 404), ("alice", 200)):
            r = c.post(
                f"https://{gateway.addr}/mcp/apps/bastion-demo",
                json=ping,
                headers={
                    "Authorization": f"Bearer {token(gateway, user)}",
                    "Mcp-Session-Id": sid,
                    "Accept": "application/json, text/event-stream",
                },
            )
            assert r.status_code == want, (user, r.text)


async def test_audit_shows_the_calls(gateway: Node) -> None:
    async with mcp_session(gateway, "eve", "everything-stdio") as s:
        await s.call_tool("echo", {"message": "audited", "password": "hunter2-hunter2"})
        from mcp.shared.exceptions import MCPError

        with pytest.raises(MCPError):
            await s.call_tool("get-sum", {"a": 1, "b": 2})
    out = gateway.cli(
        "audit", "search", "--order=asc", "--user=eve", "--app=everything-stdio", "--format=json", local=True
    ).stdout
    events = json.loads(out)
    calls = [e for e in events if e.get("method") == "tools/call"]
    echo = [
        e for e in calls if e.get("tool") == "echo" and e["params"]["arguments"].get("message") == "audited"
    ]
    assert echo and echo[-1]["success"] is True and echo[-1]["code"] == "BMCP003I"
    assert echo[-1]["params"]["arguments"]["password"] == "<REDACTED>"
    assert echo[-1]["headers"]["authorization"] == "<REDACTED>"  # recorded, never the credential
    assert echo[-1]["headers"]["mcp-protocol-version"]
    denied = [e for e in calls if e.get("tool") == "get-sum"]
    assert denied and denied[-1]["success"] is False and denied[-1]["code"] == "BMCP003E"
    assert any(e["event"] == "mcp.session.start" for e in events)
    assert "hunter2" not in out
    # Only users whose roles allow reading events may search.
    home = gateway.root / "eve-home"
    refused = gateway.cli("audit", "search", "-i", str(_identity(gateway, "eve")), home=home, check=False)
    assert refused.returncode == 1 and "may not list event" in refused.stderr
    allowed = gateway.cli(
        "audit", "search", "--format=json", "-i", str(_identity(gateway, "audrey")), home=home
    )
    assert json.loads(allowed.stdout)


def _identity(node: Node, user: str) -> Path:
    path = node.root / f"{user}.id"
    node.cli("auth", "sign", f"--user={user}", f"--out={path}", local=True)
    return path


@contextmanager
def local_proxy(gateway: Node, app: str, user: str, tmp_path: Path) -> Iterator[str]:
    """`bastion proxy mcp APP -p 0` as USER (identity file); yields its `127.0.0.1:PORT`."""
    ident = _identity(gateway, user)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env["BASTION_HOME"] = str(tmp_path / "home")
    cmd = [
        sys.executable,
        "-m",
        "bastion.cli.main",
        "proxy",
        "mcp",
        app,
        "-p",
        "0",
        "-i",
        str(ident),
        "--proxy",
        gateway.addr,
    ]
    with (
        (tmp_path / "proxy.log").open("w") as log,
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env) as proxy,
    ):
        try:
            assert proxy.stdout is not None
            line = proxy.stdout.readline()
            m = re.search(r"Proxying connections to \S+ on (127\.0\.0\.1:\d+)", line)
            assert m, line
            yield m.group(1)
        finally:
            proxy.terminate()
            try:
                proxy.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proxy.kill()
                raise


def test_jwks_is_published(gateway: Node) -> None:
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca_file(gateway)))) as c:
        keys = c.get(f"https://{gateway.addr}/.well-known/jwks.json").json()["keys"]
    assert keys and keys[0]["kty"] == "EC" and "d" not in keys[0]


@pytest.mark.parametrize("app", ["everything-http", "everything-sse", "everything-stdio"])
def test_inspector_cli_through_the_gateway(gateway: Node, app: str) -> None:
    url = f"https://{gateway.addr}/mcp/apps/{app}"
    env = node_env({"NODE_EXTRA_CA_CERTS": str(ca_file(gateway))})
    base = [
        *inspector_v2_cmd(),
        "--cli",
        url,
        "--transport",
        "http",
        "--header",
        f"Authorization: Bearer {token(gateway, 'eve')}",
    ]
    listed = subprocess.run(
        [*base, "--method", "tools/list"], capture_output=True, text=True, env=env, timeout=120
    )
    assert listed.returncode == 0, listed.stderr
    assert [t["name"] for t in json.loads(listed.stdout)["tools"]] == ["echo"]
    called = subprocess.run(
        [*base, "--method", "tools/call", "--tool-name", "echo", "--tool-arg", "message=insp"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert called.returncode == 0, called.stderr
    assert "Echo: insp" in called.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("app", ["conformance-http", "conformance-stdio"])
def test_conformance_suite_through_the_gateway(gateway: Node, app: str, tmp_path: Path) -> None:
    with local_proxy(gateway, app, "alice", tmp_path) as addr:
        code, summary = run_conformance_suite(f"http://{addr}/mcp", tmp_path)
    assert code == 0, summary
    m = re.search(r"(\d+) passed, (\d+) failed", summary)
    assert m and int(m.group(2)) == 0, summary


def test_mcp_ls_tools_and_call(gateway: Node, tmp_path: Path) -> None:
    home = tmp_path / "h"
    alice = ["-i", str(_identity(gateway, "alice")), "--proxy", gateway.addr]
    listed = json.loads(gateway.cli("mcp", "ls", "--format=json", *alice, home=home).stdout)
    types = {a["name"]: a["type"] for a in listed}
    assert types["everything-http"] == "Streamable HTTP"
    assert types["everything-sse"] == "SSE"
    assert types["everything-stdio"] == "stdio"
    assert all(a["permissions"]["mcp"]["tools"]["allowed"] == ["*"] for a in listed)
    text = gateway.cli("mcp", "ls", *alice, home=home).stdout
    assert re.search(r"everything-sse\s.*SSE\s+\[\*\]\s+env=dev", text), text

    gateway.cli("users", "add", "notools", "--roles=access", local=True, check=False)
    nobody = ["-i", str(_identity(gateway, "notools")), "--proxy", gateway.addr]
    warned = gateway.cli("mcp", "ls", *nobody, home=home).stdout
    assert "(none) [!]" in warned and "Warning" in warned

    eve = ["-i", str(_identity(gateway, "eve")), "--proxy", gateway.addr]
    tools = json.loads(
        gateway.cli("mcp", "tools", "everything-http", "--format=json", *eve, home=home).stdout
    )
    assert [t["name"] for t in tools] == ["echo"]
    called = gateway.cli(
        "mcp", "call", "everything-sse", "echo", "--arg", "message=from-cli", *eve, home=home
    )
    assert called.stdout.strip() == "Echo: from-cli"
    denied = gateway.cli(
        "mcp",
        "call",
        "everything-sse",
        "get-sum",
        "--arg",
        "a=1",
        "--arg",
        "b=2",
        *eve,
        home=home,
        check=False,
    )
    assert denied.returncode == 1 and 'tool "get-sum" is not allowed' in denied.stderr


async def test_role_change_reaches_a_live_session(gateway: Node) -> None:
    import asyncio

    widened = ROLES.split("---")[0].replace("tools: [echo]", "tools: [echo, get-sum]")
    role_file = gateway.root / "echo-only.yaml"
    try:
        async with mcp_session(gateway, "eve", "everything-stdio") as s:
            assert [t.name for t in (await s.list_tools()).tools] == ["echo"]
            role_file.write_text(widened)
            gateway.cli("create", "-f", str(role_file), local=True)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 15
            names: list[str] = []
            while loop.time() < deadline:
                names = sorted(t.name for t in (await s.list_tools()).tools)
                if names == ["echo", "get-sum"]:
                    break
                await asyncio.sleep(0.2)  # polling the condition, bounded by the deadline
            assert names == ["echo", "get-sum"]
            assert "5" in (await s.call_tool("get-sum", {"a": 2, "b": 3})).content[0].text
    finally:
        role_file.write_text(ROLES.split("---")[0])
        gateway.cli("create", "-f", str(role_file), local=True)


def test_mirrored_headers_must_match_the_body(gateway: Node) -> None:
    init = _post_init(gateway, "alice", "bastion-demo")
    headers = {
        "Authorization": f"Bearer {token(gateway, 'alice')}",
        "Mcp-Session-Id": init.headers["mcp-session-id"],
        "Accept": "application/json, text/event-stream",
        "Mcp-Method": "tools/list",
    }
    body = {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "bastion_user_info"}}
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca_file(gateway)))) as c:
        r = c.post(f"https://{gateway.addr}/mcp/apps/bastion-demo", json=body, headers=headers)
        assert r.status_code == 400 and r.json()["error"]["code"] == -32020
        headers["Mcp-Method"] = "tools/call"
        headers["Mcp-Name"] = "bastion_user_info"
        ok = c.post(f"https://{gateway.addr}/mcp/apps/bastion-demo", json=body, headers=headers)
        assert ok.status_code == 200 and "alice" in ok.text


async def test_a_dropped_stream_resumes_with_last_event_id(gateway: Node) -> None:
    """Progress events of a long call: read one, drop the connection, GET the rest with Last-Event-ID."""
    ctx = ssl.create_default_context(cafile=str(ca_file(gateway)))
    url = f"https://{gateway.addr}/mcp/apps/everything-stdio"
    headers = {
        "Authorization": f"Bearer {token(gateway, 'alice')}",
        "Accept": "application/json, text/event-stream",
    }
    async with httpx.AsyncClient(verify=ctx, timeout=30, headers=headers) as c:
        init = await c.post(
            url,
            json={
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-11-25",
                    "capabilities": {},
                    "clientInfo": {"name": "t", "version": "1"},
                },
            },
        )
        c.headers["Mcp-Session-Id"] = init.headers["mcp-session-id"]
        c.headers["MCP-Protocol-Version"] = "2025-11-25"
        await c.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        call = {
            "jsonrpc": "2.0",
            "id": 7,
            "method": "tools/call",
            "params": {
                "name": "trigger-long-running-operation",
                "arguments": {"duration": 2, "steps": 4},
                "_meta": {"progressToken": "tok"},
            },
        }
        last_id = ""
        async with c.stream("POST", url, json=call) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            async for line in r.aiter_lines():
                if line.startswith("id:"):
                    last_id = line[3:].strip()
                if line.startswith("data:") and "progress" in line:
                    break  # drop the connection after the first progress event
        assert last_id
        seen: list[dict[str, Any]] = []
        async with c.stream("GET", url, headers={"Last-Event-ID": last_id}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data:") and line[5:].strip():
                    msg = json.loads(line[5:])
                    seen.append(msg)
                    if msg.get("id") == 7:
                        break
    assert seen[-1]["id"] == 7 and "result" in seen[-1]
    progress = [m["params"]["progress"] for m in seen if m.get("method") == "notifications/progress"]
    assert progress and progress == sorted(progress)  # the rest, in order, nothing replayed twice


@pytest.mark.parametrize("app", ["everything-http", "everything-sse", "everything-stdio"])
def test_inspector_through_bastion_proxy_mcp(gateway: Node, app: str, tmp_path: Path) -> None:
    """The guide's own check, as written: the Inspector CLI against `bastion proxy mcp` at `/`."""
    from tests.peers import inspector_cmd

    base = [*inspector_cmd(), "--transport", "http", "--cli"]
    with local_proxy(gateway, app, "eve", tmp_path) as addr:
        listed = subprocess.run(
            [*base, "--method", "tools/list", f"http://{addr}"],
            capture_output=True,
            text=True,
            env=node_env(),
            timeout=120,
        )
        assert listed.returncode == 0, listed.stderr
        assert [t["name"] for t in json.loads(listed.stdout)["tools"]] == ["echo"]
        called = subprocess.run(
            [
                *base,
                f"http://{addr}/mcp",
                "--method",
                "tools/call",
                "--tool-name",
                "echo",
                "--tool-arg",
                "message=via-proxy",
            ],
            capture_output=True,
            text=True,
            env=node_env(),
            timeout=120,
        )
        assert called.returncode == 0, called.stderr
        assert "Echo: via-proxy" in called.stdout


def test_server_discover_without_its_version_header_is_a_mismatch(gateway: Node) -> None:
    """A server/discover must say its version in MCP-Protocol-Version too: without it, -32020 at
    once (a modern-first client's probe is answered, not left to hang; test_mcp2026.py has the rest)."""
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "server/discover",
        "params": {"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}},
    }
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca_file(gateway))), timeout=10) as c:
        r = c.post(
            f"https://{gateway.addr}/mcp/apps/everything-http",
            json=body,
            headers={
                "Authorization": f"Bearer {token(gateway, 'alice')}",
                "Accept": "application/json, text/event-stream",
                "Mcp-Method": "server/discover",
            },
        )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == -32020
    assert "MCP-Protocol-Version" in r.json()["error"]["message"]
