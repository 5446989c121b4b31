"""App services on "other hosts": joined with tokens, serving over the reverse tunnel.

One `bastion start` runs auth + proxy; two more run app_service alone, each with
its own data dir, joined with `bastion tokens add --type=app`.  The seed-004 walk
(create, list, call, relabel so one drops it, delete) and failover when one dies.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import Node, bastion_cmd, start_node, stop_node, wait_for_log
from tests.peers import everything_cmd, requires_node_peers

pytestmark = requires_node_peers

APP = """\
kind: app
version: v3
metadata:
  name: everything
  description: The Everything MCP server
  labels: {{env: {env}}}
spec:
  mcp:
    command: {command}
    args: {args}
    run_as_host_user: {user}
"""


@dataclass
class AgentProc:
    root: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _token(node: Node, ttl: str = "30m") -> tuple[str, str]:
    out = _token_doc(node, ttl)
    return out["token"], out["ca_pin"]


def _token_doc(node: Node, ttl: str = "30m") -> dict[str, str]:
    res = node.cli("tokens", "add", "--type=app", f"--ttl={ttl}", "--format=json", local=True)
    return dict(json.loads(res.stdout))


def _agent_config(root: Path, node: Node, token: str, pin: str, selector: str, *, apps: str = "") -> Path:
    """An app-service-only host joining ``node``'s cluster with ``token``; ``apps``: items of its
    own ``app_service.apps`` (static apps), besides the dynamic ones ``selector`` picks."""
    root.mkdir(parents=True, exist_ok=True)
    tok = root / "token"
    tok.write_text(token + "\n")
    cfg = root / "app.yaml"
    cfg.write_text(
        "version: v1\n"
        "bastion:\n"
        f"  data_dir: {root / 'data'}\n"
        f"  proxy_server: {node.addr}\n"
        f"  ca_pin: {pin}\n"
        "  join_params:\n"
        f"    token_name: {tok}\n"
        "auth_service: {enabled: false}\n"
        "proxy_service: {enabled: false}\n"
        "app_service:\n"
        "  enabled: true\n"
        "  resources:\n"
        f"  - labels: {selector}\n"
        # The host lets dynamic apps run server-everything, as root or the test's user.
        "  dynamic_apps:\n"
        f"    commands: [{everything_cmd('stdio')[0]}]\n"
        f"    run_as: [root, {os.environ.get('USER') or 'root'}]\n" + (f"  apps:\n{apps}" if apps else "")
    )
    return cfg


def _start_agent(root: Path, cfg: Path) -> AgentProc:
    log = root / "agent.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    with log.open("ab") as f:
        proc = subprocess.Popen(
            bastion_cmd("start", "--config", str(cfg)), stdout=f, stderr=subprocess.STDOUT, env=env
        )
    return AgentProc(root, proc, log)


def _until(what: str, check: Callable[[], bool], deadline: float = 10.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < deadline:
        if check():
            return time.monotonic() - start
    raise AssertionError(f"{what}: not within {deadline}s")


@dataclass
class Topology:
    node: Node
    agents: list[AgentProc]
    ident: Path


@pytest.fixture(scope="module")
def topo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    root = tmp_path_factory.mktemp("agents")
    # Short host certificates, so the module also sees them renewed.
    node = start_node(
        root / "cluster",
        auth_config="  host_cert_ttl: 30s\n",
        extra_config="app_service:\n  enabled: false\n",
    )
    agents: list[AgentProc] = []
    try:
        node.cli("users", "add", "alice", "--roles=mcp-user", local=True)
        ident = root / "alice.id"
        node.cli("auth", "sign", "--user=alice", f"--out={ident}", local=True)
        for i, selector in enumerate(("{env: dev}", "{'*': '*'}")):
            token, pin = _token(node)
            cfg = _agent_config(root / f"agent{i}", node, token, pin, selector)
            agents.append(_start_agent(root / f"agent{i}", cfg))
        for a in agents:
            wait_for_log(a.log, r"tunnel connected", a.proc, 30.0)
        yield Topology(node, agents, ident)
    finally:
        for a in agents:
            a.stop()
        stop_node(node)


def _servers(node: Node) -> dict[str, list[str]]:
    out = json.loads(node.cli("get", "app_servers", "--format=json", local=True).stdout)
    return {
        s["spec"]["hostname"] + "/" + s["metadata"]["name"]: [
            a["metadata"]["name"] for a in s["spec"]["apps"]
        ]
        for s in out
    }


def _ls(t: Topology) -> set[str]:
    out = t.node.cli("mcp", "ls", "--format=json", "-i", str(t.ident), "--proxy", t.node.addr).stdout
    return {a["name"] for a in json.loads(out)}


async def _via_bridge(t: Topology, tmp: Path) -> str:
    from mcp import ClientSession, StdioServerParameters, stdio_client

    params = StdioServerParameters(
        command=sys.executable,
        args=[
            "-m",
            "bastion.cli.main",
            "mcp",
            "connect",
            "everything",
            "-i",
            str(t.ident),
            "--proxy",
            t.node.addr,
        ],
        env={"BASTION_HOME": str(tmp / "home")},
    )
    with (tmp / "bridge.log").open("w") as errlog:
        async with (
            asyncio.timeout(60),
            stdio_client(params, errlog=errlog) as (r, w),
            ClientSession(r, w) as s,
        ):
            await s.initialize()
            assert "echo" in {x.name for x in (await s.list_tools()).tools}
            res = await s.call_tool("echo", {"message": "bridged"})
            text = res.content[0].text  # type: ignore[union-attr]
            return str(text)


def _serving(t: Topology) -> int:
    return sum("everything" in apps for apps in _servers(t.node).values())


def test_join_walk_and_failover(topo: Topology, tmp_path: Path) -> None:
    t = topo
    assert len(_servers(t.node)) == 2  # both joined and heartbeating
    assert _ls(t) == set()

    cmd = everything_cmd("stdio")
    app = tmp_path / "mcp_server.yaml"
    user = os.environ.get("USER") or "root"
    app.write_text(APP.format(env="dev", command=cmd[0], args=json.dumps(cmd[1:]), user=user))
    t.node.cli("create", str(app), local=True)
    took = _until("both app services serve it", lambda: _serving(t) == 2)
    assert took < 2.0 + 1.0  # the guide's "within 2 seconds", plus CLI start-up time
    assert _ls(t) == {"everything"}

    for _ in range(4):  # new sessions are spread over both; each works
        called = t.node.cli(
            "mcp",
            "call",
            "everything",
            "echo",
            "--arg",
            "message=via tunnel",
            "-i",
            str(t.ident),
            "--proxy",
            t.node.addr,
        )
        assert called.stdout.strip() == "Echo: via tunnel"
    # What MCP clients run: the stdio bridge, with the SDK's stdio client.
    assert asyncio.run(_via_bridge(t, tmp_path)) == "Echo: bridged"
    events = json.loads(
        t.node.cli("audit", "search", "--type=mcp.session.request", "--format=json", local=True).stdout
    )
    calls = [e for e in events if e.get("tool") == "echo"]
    assert len(calls) >= 4 and all(e["user"] == "alice" and e["success"] for e in calls)
    # Joined app services' events are sealed by the proxy they write through (decision 0032).
    verified = t.node.cli("audit", "verify", local=True, check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    # Relabel: the app service selecting env=dev drops it, the other keeps it.
    app.write_text(APP.format(env="prod", command=cmd[0], args=json.dumps(cmd[1:]), user=user))
    t.node.cli("create", "-f", str(app), local=True)
    _until("one app service drops it", lambda: _serving(t) == 1)
    assert _ls(t) == {"everything"}

    # Delete: gone everywhere.
    t.node.cli("rm", "app/everything", local=True)
    _until("no app service serves it", lambda: _serving(t) == 0)
    assert _ls(t) == set()


def test_a_dynamic_app_the_hosts_refuse_is_reported_not_served(topo: Topology, tmp_path: Path) -> None:
    app = tmp_path / "sh.yaml"
    app.write_text(APP.format(env="dev", command="/bin/sh", args='["-c", "id"]', user="root"))
    t = topo
    t.node.cli("create", str(app), local=True)

    def refused_by_both() -> bool:
        out = json.loads(t.node.cli("get", "app_servers", "--format=json", local=True).stdout)
        why = [s["spec"].get("refused", {}).get("everything", "") for s in out]
        return len(why) == 2 and all("is not in app_service.dynamic_apps.commands" in w for w in why)

    _until("both app services report the refusal", refused_by_both)
    assert _serving(t) == 0
    t.node.cli("rm", "app/everything", local=True)


def test_kill_one_of_two(topo: Topology, tmp_path: Path) -> None:
    t = topo
    cmd = everything_cmd("stdio")
    app = tmp_path / "mcp_server.yaml"
    user = os.environ.get("USER") or "root"
    app.write_text(APP.format(env="dev", command=cmd[0], args=json.dumps(cmd[1:]), user=user))
    t.node.cli("create", "-f", str(app), local=True)
    _until("both serve it", lambda: _serving(t) == 2)
    victim = t.agents[0]
    victim.proc.kill()
    victim.proc.wait()
    for _ in range(4):
        called = t.node.cli(
            "mcp",
            "call",
            "everything",
            "echo",
            "--arg",
            "message=still here",
            "-i",
            str(t.ident),
            "--proxy",
            t.node.addr,
        )
        assert called.stdout.strip() == "Echo: still here"
    _until("the dead one is gone from app_servers", lambda: len(_servers(t.node)) == 1)


def test_used_and_expired_tokens_are_refused(topo: Topology, tmp_path: Path) -> None:
    t = topo
    token, pin = _token(t.node)
    first = _start_agent(tmp_path / "a", _agent_config(tmp_path / "a", t.node, token, pin, "{x: y}"))
    try:
        wait_for_log(first.log, r"tunnel connected", first.proc, 30.0)
    finally:
        first.stop()
    # Once joined, the token file is not needed again: the host certificate is what counts.
    (tmp_path / "a" / "token").unlink()
    first.log.write_text("")
    restarted = _start_agent(tmp_path / "a", tmp_path / "a" / "app.yaml")
    try:
        wait_for_log(restarted.log, r"tunnel connected", restarted.proc, 30.0)
    finally:
        restarted.stop()
    again = subprocess.run(
        bastion_cmd("start", "--config", str(_agent_config(tmp_path / "b", t.node, token, pin, "{x: y}"))),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode != 0
    assert "already used" in again.stderr, again.stderr

    doc = _token_doc(t.node, ttl="1s")
    short = doc["token"]

    def listed() -> set[str]:
        out = t.node.cli("tokens", "ls", "--format=json", local=True).stdout
        return {x["metadata"]["name"] for x in json.loads(out)}

    _until("the short-lived token expired", lambda: doc["id"] not in listed())
    late = subprocess.run(
        bastion_cmd("start", "--config", str(_agent_config(tmp_path / "c", t.node, short, pin, "{x: y}"))),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert late.returncode != 0
    assert "expired" in late.stderr, late.stderr

    bad_pin = subprocess.run(
        bastion_cmd(
            "start",
            "--config",
            str(_agent_config(tmp_path / "d", t.node, _token(t.node)[0], "SHA256:AAAA", "{x: y}")),
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad_pin.returncode != 0
    assert "not in bastion.ca_pin" in bad_pin.stderr, bad_pin.stderr


def test_host_certificates_are_renewed(topo: Topology) -> None:
    for a in topo.agents:
        if a.proc.poll() is None:
            wait_for_log(a.log, r"host certificate renewed expires=", a.proc, 40.0)
    assert "host certificate renewed" in topo.node.log.read_text()
    # Still serving, still connected, with its new certificate.
    assert len(_servers(topo.node)) >= 1


def test_stopping_an_app_service_ends_its_sessions(topo: Topology, tmp_path: Path) -> None:
    """Last: it stops the app services. Their open sessions end, with end events, promptly."""
    import ssl

    import httpx

    t = topo
    ca = tmp_path / "ca.pem"
    ca.write_text(t.node.cli("auth", "export", local=True).stdout)
    token = t.node.cli("auth", "sign", "--user=alice", "--format=token", local=True).stdout.strip()
    live = [a for a in t.agents if a.proc.poll() is None]
    assert live
    with httpx.Client(
        verify=ssl.create_default_context(cafile=str(ca)),
        timeout=30,
        headers={"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"},
    ) as c:
        r = c.post(
            f"https://{t.node.addr}/mcp/apps/everything",
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
        assert r.status_code == 200, r.text
        sid = r.headers["mcp-session-id"]
    started = time.monotonic()
    for a in live:
        a.stop()
    assert time.monotonic() - started < 10.0
    ends = json.loads(
        t.node.cli("audit", "search", "--type=mcp.session.end", "--format=json", local=True).stdout
    )
    assert any(e["session_id"] == sid for e in ends), ends
