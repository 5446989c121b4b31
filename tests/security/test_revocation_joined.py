"""Revocation reaches joined app services: a role change ends a session held by an app service
that joined over the tunnel, though it cannot read the cluster's backend itself.

The proxy follows users and roles and tells every connected app service ("access.changed");
the app service asks back for the current policies of the users it holds sessions of and ends
the sessions that lost their app: child process gone, end event written, no request needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bastion.tunnel.mux import Mux, Stream
from tests.integration.conftest import start_node, stop_node, wait_for_log
from tests.integration.test_agents import AgentProc, _start_agent, _token
from tests.peers import ROOT
from tests.security.conftest import ROLES, Gateway, recording_cmd
from tests.security.test_revocation import NO_APPS, _children, _wait

STDIO_APP = "recording_server"


@pytest.fixture(scope="module")
def joined(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, AgentProc]]:
    root = tmp_path_factory.mktemp("joined")
    node = start_node(root / "proxy", extra_config="app_service:\n  enabled: false\n")
    agent: AgentProc | None = None
    try:
        (root / "roles.yaml").write_text(ROLES + "---\n" + NO_APPS)
        node.cli("create", str(root / "roles.yaml"), local=True)
        token, pin = _token(node)
        host = root / "agent"
        host.mkdir()
        (host / "token").write_text(token + "\n")
        cmd = recording_cmd("stdio", root / "stdio.jsonl")
        cfg = host / "app.yaml"
        cfg.write_text(
            "version: v1\n"
            "bastion:\n"
            f"  data_dir: {host / 'data'}\n"
            f"  proxy_server: {node.addr}\n"
            f"  ca_pin: {pin}\n"
            f"  join_params: {{token_name: {host / 'token'}}}\n"
            "auth_service: {enabled: false}\n"
            "proxy_service: {enabled: false}\n"
            "app_service:\n"
            "  apps:\n"
            "  - name: rec-stdio\n"
            "    labels: {env: dev}\n"
            "    mcp:\n"
            f"      command: {cmd[0]}\n"
            f"      args: {json.dumps(cmd[1:])}\n"
            "      run_as_host_user: root\n"
            f'      env: {{PYTHONPATH: "{ROOT}"}}\n'
        )
        agent = _start_agent(host, cfg)
        wait_for_log(node.log, r"app service serves .*apps=rec-stdio", node.proc, 30.0)
        yield Gateway(node, {}), agent
    finally:
        if agent is not None:
            agent.stop()
        stop_node(node)


def _stdio_children(agent: AgentProc) -> set[int]:
    return {p for p, cmd in _children(agent.proc.pid).items() if STDIO_APP in cmd}


def test_a_revoked_role_ends_a_session_on_a_joined_app_service(
    joined: tuple[Gateway, AgentProc], tmp_path: Path
) -> None:
    gateway, agent = joined
    node = gateway.node
    node.cli("users", "add", "carol", "--roles=echo-only", local=True)
    node.cli("users", "add", "dave", "--roles=echo-only", local=True)
    before = _stdio_children(agent)
    with gateway.session("carol", "rec-stdio") as s:
        child = _stdio_children(agent) - before
        assert child, "carol's stdio child was not found on the app service's host"
        kept = gateway.session("dave", "rec-stdio")

        node.cli("users", "update", "carol", "--roles=prod-only", local=True)

        _wait(
            "carol's session on the joined app service did not end",
            lambda: bool(gateway.audit("--type=mcp.session.end", f"--session={s.id}")),
        )
        _wait("carol's stdio child did not exit", lambda: not child & _stdio_children(agent))
        (end,) = gateway.audit("--type=mcp.session.end", f"--session={s.id}")
        assert end["user"] == "carol" and end["success"] is False
        assert end["error"].startswith("access to app 'rec-stdio' was revoked: "), end["error"]

        # dave's session of the same app, still allowed, goes on.
        kept.sync()
        assert not gateway.audit("--type=mcp.session.end", f"--session={kept.id}")
        kept.close()

    node.cli("users", "add", "erin", "--roles=echo-only", local=True)
    with gateway.session("erin", "rec-stdio") as gone:
        node.cli("users", "rm", "erin", local=True)
        _wait(
            "erin's session did not end",
            lambda: bool(gateway.audit("--type=mcp.session.end", f"--session={gone.id}")),
        )
        (end,) = gateway.audit("--type=mcp.session.end", f"--session={gone.id}")
        assert end["error"] == "access to app 'rec-stdio' was revoked: user \"erin\" no longer exists"


def test_a_host_reads_only_the_policies_of_users_it_served(joined: tuple[Gateway, AgentProc]) -> None:
    """A compromised app service asks the proxy for the roles and traits of users: only those
    whose requests the proxy carried to it are answered (it saw their actors then).  Nor may it
    read or write the pinned tool definitions of apps it does not serve on that connection."""
    gateway, agent = joined
    node = gateway.node
    node.cli("users", "add", "frank", "--roles=echo-only", local=True)
    node.cli("users", "add", "grace", "--roles=echo-only", local=True)
    gateway.session("grace", "rec-stdio").close()  # grace's requests went to the host
    m = re.search(r"tunnel listening addr=([\d.]+):(\d+)", node.log.read_text())
    assert m, "the proxy's tunnel address is not in its log"
    host_dir = agent.root / "data" / "host"

    async def ask(calls: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(cafile=str(host_dir / "ca.pem"))
        ctx.load_cert_chain(str(host_dir / "host.crt"), str(host_dir / "host.key"))
        reader, writer = await asyncio.open_connection(m.group(1), int(m.group(2)), ssl=ctx)

        async def no_streams(stream: Stream) -> None:
            stream.reset("not served")

        mux = Mux(reader, writer, initiator=True, on_stream=no_streams)
        runner = asyncio.create_task(mux.run())
        try:
            replies = []
            for method, args in calls:
                stream = await mux.open({"kind": "rpc", "method": method})
                await stream.send(json.dumps(args).encode())
                await stream.end()
                parts = []
                while (chunk := await stream.recv()) is not None:
                    parts.append(chunk)
                replies.append(json.loads(b"".join(parts)))
            return replies
        finally:
            await mux.close("done")
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await runner

    # Last in the module: this connection takes the host's place at the proxy.
    echo = {"name": "echo", "description": "now with instructions"}
    reply, *pins = asyncio.run(
        ask(
            [
                ("policies", {"users": ["frank", "grace"]}),
                ("pins.get", {"app": "rec-stdio"}),
                ("pins.record", {"app": "rec-stdio", "new": [echo], "changed": []}),
                ("pins.list", {}),
            ]
        )
    )
    for refused in pins[:2]:
        assert "does not serve app 'rec-stdio'" in refused["error"]["message"]
    assert pins[2] == {"result": {"items": []}}
    assert not json.loads(node.cli("mcp", "pins", "ls", "rec-stdio", "--format=json", local=True).stdout)
    got = reply["result"]["policies"]
    assert got["frank"] == {"unknown": True}
    assert [r["metadata"]["name"] for r in got["grace"]["roles"]] == ["echo-only"]
