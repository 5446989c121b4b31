"""Dynamic registration on one node: `bastion create|create -f|rm` on app resources, no restart."""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import Node, start_node, stop_node
from tests.peers import requires_node_peers, run_everything

pytestmark = requires_node_peers

APP = """\
kind: app
version: v3
metadata:
  name: dyn
  description: registered at run time
  labels: {{team: {team}, env: dev}}
spec:
  uri: mcp+{url}
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Node, str]]:
    root = tmp_path_factory.mktemp("dyn")
    with run_everything("streamableHttp") as url:
        extra = (
            "app_service:\n  resources:\n  - labels: {team: '^(a|b)$'}\n  apps:\n  - name: static-one\n"
            f"    uri: mcp+{url}\n"
            # The host lets dynamic apps reach the loopback server (refused by default).
            "  dynamic_apps: {upstream_networks: [127.0.0.1/32]}\n"
        )
        n = start_node(root, extra_config=extra)
        try:
            n.cli("users", "add", "alice", "--roles=mcp-user", local=True)
            yield n, url
        finally:
            stop_node(n)


def _ls(node: Node, ident: Path) -> set[str]:
    out = node.cli("mcp", "ls", "--format=json", "-i", str(ident), "--proxy", node.addr).stdout
    return {a["name"] for a in json.loads(out)}


def _wait(node: Node, ident: Path, present: bool, deadline: float = 10.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < deadline:
        if ("dyn" in _ls(node, ident)) is present:
            return time.monotonic() - start
    raise AssertionError(f"dyn {'did not appear' if present else 'did not go away'} within {deadline}s")


def test_create_update_delete(node: tuple[Node, str], tmp_path: Path) -> None:
    n, url = node
    ident = tmp_path / "alice.id"
    n.cli("auth", "sign", "--user=alice", f"--out={ident}", local=True)
    f = tmp_path / "app.yaml"
    f.write_text(APP.format(team="a", url=url))
    assert _ls(n, ident) == {"static-one"}
    n.cli("create", str(f), local=True)
    _wait(n, ident, True)
    called = n.cli(
        "mcp", "call", "dyn", "echo", "--arg", "message=dynamic", "-i", str(ident), "--proxy", n.addr
    )
    assert called.stdout.strip() == "Echo: dynamic"

    # A live session of the app ends when the app goes away.
    ca = tmp_path / "ca.pem"
    ca.write_text(n.cli("auth", "export", local=True).stdout)
    token = n.cli("auth", "sign", "--user=alice", "--format=token", local=True).stdout.strip()
    hdrs = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"}
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), headers=hdrs, timeout=30) as c:
        init = c.post(
            f"https://{n.addr}/mcp/apps/dyn",
            json={
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-06-18",
                    "capabilities": {},
                    "clientInfo": {"name": "t", "version": "1"},
                },
            },
        )
        sid = init.headers["mcp-session-id"]
        f.write_text(APP.format(team="c", url=url))  # labels stop matching
        n.cli("create", "-f", str(f), local=True)
        _wait(n, ident, False)
        gone = c.post(
            f"https://{n.addr}/mcp/apps/dyn",
            json={"jsonrpc": "2.0", "id": 2, "method": "ping"},
            headers={"Mcp-Session-Id": sid},
        )
        assert gone.status_code == 404
        # Not the client's fault, and not "no such app": the cluster removed it.
        assert gone.json()["error"]["message"] == (
            "app 'dyn' was removed by the cluster; its sessions ended (see `bastion mcp ls`)"
        )
        assert gone.headers["x-bastion-error-origin"] == "gateway"
    ended = json.loads(
        n.cli(
            "audit", "search", "--format=json", "--type=mcp.session.end", f"--session={sid}", local=True
        ).stdout
    )
    assert ended and "no longer served" in ended[0]["error"]

    f.write_text(APP.format(team="b", url=url))
    n.cli("create", "-f", str(f), local=True)
    _wait(n, ident, True)
    n.cli("rm", "app/dyn", local=True)
    _wait(n, ident, False)


def test_config_file_wins_a_name_clash(node: tuple[Node, str], tmp_path: Path) -> None:
    # The clash is refused at create (it used to be "created" and silently ignored: issue 15).
    n, _url = node
    f = tmp_path / "clash.yaml"
    f.write_text(
        APP.format(team="a", url="http://127.0.0.1:9/elsewhere").replace("name: dyn", "name: static-one")
    )
    refused = n.cli("create", str(f), local=True, check=False)
    assert refused.returncode == 1
    assert 'app "static-one" is defined in the configuration file of ' in refused.stderr
    assert "(the file wins, decision 8): choose another name" in refused.stderr
    ident = tmp_path / "alice.id"
    n.cli("auth", "sign", "--user=alice", f"--out={ident}", local=True)
    out = n.cli(
        "mcp",
        "call",
        "static-one",
        "echo",
        "--arg",
        "message=still-static",
        "-i",
        str(ident),
        "--proxy",
        n.addr,
    )
    assert out.stdout.strip() == "Echo: still-static"
    assert n.cli("get", "app/static-one", local=True, check=False).returncode == 1  # never created
