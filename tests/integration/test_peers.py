"""Smoke tests of the real MCP software the suite relies on (installed by `make test`).

They prove the installs work, before any test puts the gateway between these peers:
the Python SDK client against server-everything over streamable HTTP, HTTP+SSE and stdio;
the inspector CLIs; the conformance suite against our conformance fixture.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters
from mcp.client.sse import sse_client
from mcp_types import TextContent

from tests.peers import (
    EVERYTHING_JS,
    ROOT,
    conformance_cmd,
    conformance_fixture_cmd,
    everything_cmd,
    free_port,
    inspector_cmd,
    inspector_v2_cmd,
    node22_bin,
    node_env,
    requires_node_peers,
    run_conformance_fixture,
    run_everything,
    run_server,
    supergateway_cmd,
)

# conformance 0.1.16, `--suite active`: 30 scenarios, 40 checks.
ACTIVE_SCENARIOS = 30


def _text(result: Any) -> str:
    block = result.content[0]
    assert isinstance(block, TextContent), result
    return block.text


async def _echo_roundtrip(client: Client, message: str) -> None:
    names = {t.name for t in (await client.list_tools()).tools}
    assert {"echo", "get-sum"} <= names, names
    assert _text(await client.call_tool("echo", {"message": message})) == f"Echo: {message}"


def _run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=node_env(),
        cwd=ROOT,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, f"{cmd} -> {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def test_node22_binary() -> None:
    if not node22_bin().exists():
        pytest.skip("tests/node not installed (npm package `node`)")
    out = subprocess.run([str(node22_bin()), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("v22."), out.stdout


@requires_node_peers
async def test_sdk_client_everything_streamable_http() -> None:
    with run_everything("streamableHttp") as url:
        async with Client(url, mode="legacy") as client:
            await _echo_roundtrip(client, "hi-http")
            assert _text(await client.call_tool("get-sum", {"a": 2, "b": 3})) == "The sum of 2 and 3 is 5."


@requires_node_peers
async def test_sdk_client_everything_sse() -> None:
    with run_everything("sse") as url:
        async with Client(sse_client(url), mode="legacy") as client:
            await _echo_roundtrip(client, "hi-sse")


@requires_node_peers
async def test_sdk_client_everything_stdio() -> None:
    cmd = everything_cmd("stdio")
    params = StdioServerParameters(command=cmd[0], args=cmd[1:], cwd=ROOT)
    async with Client(params, mode="legacy") as client:
        await _echo_roundtrip(client, "hi-stdio")


async def test_sdk_client_conformance_fixture_stdio() -> None:
    cmd = conformance_fixture_cmd("stdio")
    params = StdioServerParameters(command=cmd[0], args=cmd[1:], cwd=ROOT)
    async with Client(params, mode="legacy") as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert {"test_simple_text", "test_sampling", "test_elicitation"} <= names
        result = await client.call_tool("test_simple_text", {})
        assert _text(result) == "This is a simple text response for testing."
        contents = (await client.read_resource("test://static-text")).contents
        assert getattr(contents[0], "text", None) == "This is the content of the static text resource."


@requires_node_peers
def test_inspector_cli_lists_tools_over_stdio() -> None:
    res = _run([*inspector_cmd(), "--cli", "node", str(EVERYTHING_JS), "stdio", "--method", "tools/list"])
    tools = {t["name"] for t in json.loads(res.stdout)["tools"]}
    assert "echo" in tools, tools


@requires_node_peers
def test_inspector_v2_calls_tool_with_header_over_http() -> None:
    with run_everything("streamableHttp") as url:
        res = _run(
            [
                *inspector_v2_cmd(),
                "--cli",
                url,
                "--transport",
                "http",
                "--method",
                "tools/call",
                "--tool-name",
                "echo",
                "--tool-arg",
                "message=hello-v2",
                "--header",
                "Authorization: Bearer test-token",
            ]
        )
    assert json.loads(res.stdout)["content"][0]["text"] == "Echo: hello-v2"


@requires_node_peers
async def test_supergateway_serves_fixture_over_http() -> None:
    port = free_port()
    stdio = " ".join(conformance_fixture_cmd("stdio"))
    cmd = supergateway_cmd(
        "--stdio", stdio, "--outputTransport", "streamableHttp", "--stateful", "--port", str(port)
    )
    with run_server(cmd, port, env=node_env()):
        async with Client(f"http://127.0.0.1:{port}/mcp", mode="legacy") as client:
            assert _text(await client.call_tool("test_simple_text", {})).startswith("This is a simple text")


def _conformance_results(out: Path) -> dict[str, list[dict[str, Any]]]:
    return {d.name: json.loads((d / "checks.json").read_text()) for d in sorted(out.iterdir()) if d.is_dir()}


@pytest.mark.slow
@requires_node_peers
def test_conformance_suite_passes_against_fixture(tmp_path: Path) -> None:
    out = tmp_path / "results"
    with run_conformance_fixture("http") as url:
        res = subprocess.run(
            [*conformance_cmd(), "server", "--url", url, "--suite", "active", "-o", str(out)],
            capture_output=True,
            text=True,
            env=node_env(),
            cwd=ROOT,
            timeout=110,
            stdin=subprocess.DEVNULL,
        )
    results = _conformance_results(out)
    checks = [c for cs in results.values() for c in cs]
    failed = [f"{c['id']}: {c.get('errorMessage')}" for c in checks if c["status"] == "FAILURE"]
    passed = sum(c["status"] == "SUCCESS" for c in checks)
    summary = res.stdout[res.stdout.find("=== SUMMARY") :]
    assert res.returncode == 0 and not failed, f"{failed}\n{summary}\n{res.stderr[-3000:]}"
    assert len(results) >= ACTIVE_SCENARIOS, sorted(results)
    assert passed >= 40, summary
