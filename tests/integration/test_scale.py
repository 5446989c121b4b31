"""A cluster that outgrows one machine: two proxies and two app services on one PostgreSQL.

Real processes on loopback against the machine's real PostgreSQL (a fresh database): one MCP
session whose requests alternate between the proxies, from initialize to DELETE; and
PostgreSQL restarted while tool calls run — every forwarded call is in the audit log exactly
once, and calls keep succeeding without restarting anything.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import pg
from tests.integration.conftest import Node, start_node, stop_node, wait_for_log
from tests.integration.mcp_https import McpOverHttps
from tests.integration.test_agents import AgentProc, _agent_config, _start_agent, _token, _until
from tests.peers import everything_cmd, requires_node_peers

pytestmark = [requires_node_peers, pytest.mark.postgres]

APP = """\
kind: app
version: v3
metadata:
  name: everything
  labels: {{env: dev}}
spec:
  mcp:
    command: {command}
    args: {args}
    run_as_host_user: root
"""


@dataclass
class Topology:
    proxies: list[Node]
    agents: list[AgentProc]
    token: str
    ca: Path
    server_dsn: str


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def topo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    server, dbname, dsn = _run(pg.create_database())
    root = tmp_path_factory.mktemp("scale")
    auth = f"  backend:\n    type: postgres\n    dsn: {dsn}\n"
    proxies: list[Node] = []
    agents: list[AgentProc] = []
    try:
        for i in range(2):
            proxies.append(
                start_node(
                    root / f"proxy{i}",
                    auth_config=auth,
                    cluster="scale",
                    extra_config="app_service:\n  enabled: false\n",
                )
            )
        a = proxies[0]
        a.cli("users", "add", "alice", "--roles=mcp-user", local=True)
        for i in range(2):
            token, pin = _token(a)
            cfg = _agent_config(root / f"agent{i}", a, token, pin, "{'*': '*'}")
            agents.append(_start_agent(root / f"agent{i}", cfg))
        for ag in agents:
            wait_for_log(ag.log, r"tunnel connected", ag.proc, 30.0)

        def both_connected_to_both() -> bool:
            out = json.loads(a.cli("get", "app_servers", "--format=json", local=True).stdout)
            return len(out) == 2 and all(len(s["spec"]["proxies"]) == 2 for s in out)

        _until("each app service connected to both proxies", both_connected_to_both, 20.0)
        cmd = everything_cmd("stdio")
        app = root / "app.yaml"
        app.write_text(APP.format(command=cmd[0], args=json.dumps(cmd[1:])))
        a.cli("create", str(app), local=True)

        def served() -> bool:
            out = json.loads(a.cli("get", "app_servers", "--format=json", local=True).stdout)
            return (
                sum(any(x["metadata"]["name"] == "everything" for x in s["spec"]["apps"]) for s in out) == 2
            )

        _until("both app services serve the app", served)
        ca = root / "ca.pem"
        ca.write_text(a.cli("auth", "export", local=True).stdout)
        token = a.cli("auth", "sign", "--user=alice", "--format=token", local=True).stdout.strip()
        yield Topology(proxies, agents, token, ca, server)
    finally:
        for ag in agents:
            ag.stop()
        for p in proxies:
            stop_node(p)
        _run(pg.drop_database(server, dbname))


class Session(McpOverHttps):
    """One MCP session; each request names the proxy (0 or 1) it goes through."""

    def __init__(self, t: Topology) -> None:
        super().__init__(t.ca, t.token)
        self.t = t

    def addr_of(self, where: Any) -> str:
        return self.t.proxies[where].addr

    def start(self, where: Any = 0, then: Any = 1) -> None:
        super().start(where, then)


def test_one_session_alternating_between_proxies(topo: Topology) -> None:
    s = Session(topo)
    try:
        s.start()
        tools = s.rpc(1, "tools/list")
        assert "echo" in {t["name"] for t in tools["result"]["tools"]}
        for i in range(6):
            got = s.rpc(i % 2, "tools/call", {"name": "echo", "arguments": {"message": f"hop {i}"}})
            assert got["result"]["content"][0]["text"] == f"Echo: hop {i}"
        r = s.http.delete(s.url(1), headers={"Mcp-Session-Id": s.sid})
        assert r.status_code in (200, 204), r.text
        gone = s.http.post(
            s.url(0),
            json={"jsonrpc": "2.0", "id": 99, "method": "tools/list"},
            headers={"Mcp-Session-Id": s.sid, "MCP-Protocol-Version": "2025-06-18"},
        )
        assert gone.status_code == 404
    finally:
        s.close()


def test_postgres_restart_under_load_loses_and_doubles_nothing(topo: Topology) -> None:
    version = pg.local_cluster(topo.server_dsn)
    if version is None:
        pytest.skip("PostgreSQL is not a local cluster this test can restart")
    s = Session(topo)
    ok: list[str] = []
    errors: list[str] = []
    stop = threading.Event()

    def load() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            msg = f"load {s.sid[-6:]} {i}"
            try:
                got = s.rpc(i % 2, "tools/call", {"name": "echo", "arguments": {"message": msg}})
                if got.get("result", {}).get("content", [{}])[0].get("text") == f"Echo: {msg}":
                    ok.append(msg)
                else:
                    errors.append(json.dumps(got)[:200])
            except (AssertionError, httpx.HTTPError) as e:
                errors.append(str(e)[:200])

    try:
        s.start()
        worker = threading.Thread(target=load)
        worker.start()
        _until("calls flowing before the restart", lambda: len(ok) >= 20, 20.0)
        before = len(ok)
        _run(pg.pg_ctlcluster(version, "restart"))
        why = _run(pg.wait_until_answers(topo.server_dsn))
        assert why is None, why
        _until("calls flowing after the restart", lambda: len(ok) >= before + 40, 30.0)
        stop.set()
        worker.join(30)
    finally:
        stop.set()
        s.close()
    # Every forwarded call is in the audit log exactly once (the spool catches up).
    node = topo.proxies[1]

    def audited() -> list[dict[str, Any]]:
        out = node.cli(
            "audit",
            "search",
            "--type=mcp.session.request",
            "--user=alice",
            "--format=json",
            "--limit=10000",
            local=True,
            check=False,
        )
        if out.returncode != 0:
            return []
        return [e for e in json.loads(out.stdout) if e.get("session_id") == s.sid and e.get("tool") == "echo"]

    _until("the audit log caught up", lambda: len(audited()) >= len(ok), 30.0)
    events = audited()
    messages = [e["params"]["arguments"]["message"] for e in events]
    print(f"\nPostgreSQL restart under load: {len(ok)} calls ok, {len(errors)} failed, {len(events)} audited")
    assert len(messages) == len(set(messages)), "an event was doubled"
    assert set(ok) <= set(messages), "a forwarded call is missing from the audit log"
    # Calls the client saw fail were either never forwarded or audited as failed.
    assert len(messages) <= len(ok) + len(errors)
    after = Session(topo)
    try:
        after.start()
        got = after.rpc(1, "tools/call", {"name": "echo", "arguments": {"message": "recovered"}})
        assert got["result"]["content"][0]["text"] == "Echo: recovered"
    finally:
        after.close()


def test_a_killed_proxy_leaves_its_sessions_to_the_other(topo: Topology) -> None:
    """Last in the module: it kills proxy 0."""
    s = Session(topo)
    try:
        s.start()
        assert s.rpc(0, "tools/call", {"name": "echo", "arguments": {"message": "a"}})["result"]
        victim = topo.proxies[0]
        victim.proc.kill()
        victim.proc.wait()
        got = s.rpc(1, "tools/call", {"name": "echo", "arguments": {"message": "after the kill"}})
        assert got["result"]["content"][0]["text"] == "Echo: after the kill"
    finally:
        s.close()
