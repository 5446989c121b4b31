"""F8 and F14: a joined app service serves only what the cluster lets it; join refusals say what happened.

One node (auth + proxy + its own app service with a static app ``logger``), an app resource
``prod-app`` labelled ``env=prod`` by the administrator, and two joined hosts:

* a *hostile* one, joined with an ordinary token, advertising its own ``logger`` and a
  ``prod-app`` relabelled ``env=dev`` (the F8 reproduction), both pointing at a recording
  upstream that must receive nothing;
* a *scoped* one, joined with ``tokens add --apps=scoped-dev,scoped-prod,scoped-dyn
  --labels=env=dev`` and selecting every app resource: it serves one static app and the app
  resource ``scoped-dyn`` inside its scope, and is refused two static apps outside it and never
  even told about ``prod-app``.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from bastion.auth.ca import new_host_key
from tests.integration.conftest import Node, start_node, stop_node, wait_for_log
from tests.integration.test_agents import AgentProc, _agent_config, _start_agent
from tests.integration.test_cluster import _ca
from tests.peers import free_port, run_server
from tests.security.conftest import INIT, ROLES, Recording, recording_cmd


@dataclass
class Upstream:
    """A recording MCP server over HTTP (tests/fixtures/recording_server.py) and what reached it."""

    url: str
    recording: Recording

    def received(self) -> list[dict[str, Any]]:
        return self.recording.records()


@contextmanager
def recording_upstream(root: Path, name: str) -> Iterator[Upstream]:
    port, record = free_port(), root / f"{name}.jsonl"
    cmd = [*recording_cmd("http", record), "--port", str(port)]
    with run_server(cmd, port, env=dict(os.environ, PYTHONUNBUFFERED="1")):
        yield Upstream(f"http://127.0.0.1:{port}", Recording(record))


def static_apps(*apps: tuple[str, str, str]) -> str:
    """``app_service.apps`` entries (name, env label, uri), indented to follow a config's app_service."""
    return "  apps:\n" + "".join(
        f"  - name: {name}\n    labels: {{env: {env}}}\n    uri: mcp+{uri}\n" for name, env, uri in apps
    )


@dataclass
class Cluster:
    node: Node
    legit: Upstream
    hostile: Upstream
    scoped: Upstream
    tokens: dict[str, str]
    hostile_agent: AgentProc
    scoped_agent: AgentProc


def _token(node: Node, *scope: str) -> tuple[str, str]:
    out = json.loads(node.cli("tokens", "add", "--type=app", *scope, "--format=json", local=True).stdout)
    return out["token"], out["ca_pin"]


def _join_agent(root: Path, node: Node, scope: tuple[str, ...], apps: str, selector: str) -> AgentProc:
    token, pin = _token(node, *scope)
    cfg = _agent_config(root, node, token, pin, selector)
    # Continues the config's dynamic_apps: the app resources here name hosts under example.com.
    cfg.write_text(cfg.read_text() + "    upstream_networks: ['*.example.com']\n" + apps)
    return _start_agent(root, cfg)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("join")
    with ExitStack() as stack:
        legit = stack.enter_context(recording_upstream(root, "legit"))
        hostile = stack.enter_context(recording_upstream(root, "hostile"))
        scoped = stack.enter_context(recording_upstream(root, "scoped"))
        node = start_node(
            root / "node",
            extra_config="app_service:\n  enabled: true\n"
            + static_apps(("logger", "dev", f"{legit.url}/mcp")),
        )
        stack.callback(stop_node, node)
        role = root / "echo-only.yaml"
        role.write_text(ROLES)  # env=dev apps, tool echo
        node.cli("create", str(role), local=True)
        for name, env in (("prod-app", "prod"), ("scoped-dyn", "dev")):
            app = root / f"{name}.yaml"
            app.write_text(
                f"kind: app\nversion: v1\nmetadata: {{name: {name}, labels: {{env: {env}}}}}\n"
                f"spec: {{uri: 'mcp+https://{name}.example.com/mcp'}}\n"
            )
            node.cli("create", str(app), local=True)
        node.cli("users", "add", "alice", "--roles=mcp-user", local=True)
        node.cli("users", "add", "limited", "--roles=echo-only", local=True)
        tokens = {
            u: node.cli("auth", "sign", f"--user={u}", "--format=token", local=True).stdout.strip()
            for u in ("alice", "limited")
        }
        bad = _join_agent(
            root / "hostile",
            node,
            (),
            static_apps(
                ("logger", "dev", f"{hostile.url}/mcp"),
                ("prod-app", "dev", f"{hostile.url}/mcp"),
                ("squat", "dev", f"{hostile.url}/squat"),
            ),
            "{x: y}",
        )
        stack.callback(bad.stop)
        narrow = _join_agent(
            root / "scoped",
            node,
            ("--apps=scoped-dev,scoped-prod,scoped-dyn", "--labels=env=dev"),
            static_apps(
                ("scoped-dev", "dev", f"{scoped.url}/dev"),
                ("scoped-prod", "prod", f"{scoped.url}/prod"),
                ("scoped-other", "dev", f"{scoped.url}/other"),
            ),
            "{'*': '*'}",
        )
        stack.callback(narrow.stop)
        for agent, app_name in (
            (bad, "logger"),
            (bad, "prod-app"),
            (narrow, "scoped-prod"),
            (narrow, "scoped-other"),
        ):
            wait_for_log(
                agent.log, rf"the cluster refused an app of this host app={app_name} ", agent.proc, 30.0
            )
        yield Cluster(node, legit, hostile, scoped, tokens, bad, narrow)


def _initialize(c: Cluster, user: str, app: str) -> httpx.Response:
    with httpx.Client(verify=_ca(c.node), timeout=30) as client:
        return client.post(
            f"https://{c.node.addr}/mcp/apps/{app}",
            json=INIT,
            headers={
                "Authorization": f"Bearer {c.tokens[user]}",
                "Accept": "application/json, text/event-stream",
            },
        )


def _audit(node: Node, event_type: str) -> list[dict[str, Any]]:
    out = node.cli("audit", "search", f"--type={event_type}", "--format=json", local=True).stdout
    return list(json.loads(out))


def test_a_hostile_host_gets_no_session_of_an_existing_app(cluster: Cluster) -> None:
    """F8: the hostile host's `logger` is refused, not load-balanced: every session stays home."""
    for _ in range(6):
        r = _initialize(cluster, "alice", "logger")
        assert r.status_code == 200, r.text
    assert cluster.hostile.received() == []
    assert len([x for x in cluster.legit.received() if '"initialize"' in x["body"]]) == 6
    refused = {e["app"] for e in _audit(cluster.node, "host.app_refused")}
    assert {"logger", "prod-app"} <= refused
    assert "app of a joined host refused" in cluster.node.log.read_text()


def test_a_relabelled_copy_of_an_admin_app_is_refused(cluster: Cluster) -> None:
    """F8: `prod-app` relabelled env=dev by a host does not reach a user limited to env=dev."""
    r = _initialize(cluster, "limited", "prod-app")
    assert r.status_code == 404, r.text
    assert cluster.hostile.received() == []


def test_a_resource_created_later_takes_its_name_back(cluster: Cluster, tmp_path: Path) -> None:
    """A host that was first to serve `squat` loses it once an administrator defines `app/squat`."""
    app = tmp_path / "squat.yaml"
    app.write_text(
        "kind: app\nversion: v1\nmetadata: {name: squat, labels: {env: dev}}\n"
        "spec: {uri: 'mcp+https://squat.example.com/mcp'}\n"
    )
    cluster.node.cli("create", str(app), local=True)
    wait_for_log(cluster.node.log, r"app of a joined host refused .*app=squat", cluster.node.proc, 10.0)
    assert _initialize(cluster, "alice", "squat").status_code == 404
    assert cluster.hostile.received() == []


def test_a_scoped_token_refuses_apps_outside_its_scope(cluster: Cluster) -> None:
    assert _initialize(cluster, "alice", "scoped-dev").status_code == 200
    for app in ("scoped-prod", "scoped-other"):  # labels outside the scope; a name outside it
        assert _initialize(cluster, "alice", app).status_code == 404
    paths = {x["path"] for x in cluster.scoped.received()}
    assert paths == {"/dev"}, paths
    agent = cluster.scoped_agent
    wait_for_log(agent.log, r"dynamic app registered app=scoped-dyn", agent.proc, 10.0)
    servers = json.loads(cluster.node.cli("get", "app_servers", "--format=json", local=True).stdout)
    served = {a["metadata"]["name"] for s in servers for a in s["spec"]["apps"]}
    assert {"scoped-dev", "scoped-dyn"} <= served
    assert not served & {"scoped-prod", "scoped-other", "prod-app"}
    # The app resource outside its scope was never even shown to the scoped host.
    assert "app=prod-app" not in agent.log.read_text()


async def _join(client: httpx.AsyncClient, url: str, token: str, i: int) -> httpx.Response:
    _, pub = new_host_key()
    body = {"token": token, "role": "app", "public_key": pub.decode(), "hostname": f"racer{i}"}
    return await client.post(url, json=body)


def test_concurrent_joins_one_wins_the_others_are_told_by_whom(cluster: Cluster) -> None:
    """F14: 4 joins with one fresh token: 1 success, 3 "already used by <winner> at <time>"."""
    token, _ = _token(cluster.node)

    async def race() -> list[httpx.Response]:
        async with httpx.AsyncClient(verify=_ca(cluster.node), timeout=30) as client:
            url = f"https://{cluster.node.addr}/v1/webapi/host/join"
            return await asyncio.gather(*(_join(client, url, token, i) for i in range(4)))

    answers = asyncio.run(race())
    won = [r for r in answers if r.status_code == 200]
    lost = [r for r in answers if r.status_code != 200]
    assert len(won) == 1 and len(lost) == 3, [r.text for r in answers]
    winner = won[0].json()["host_id"]
    for r in lost:
        assert r.status_code == 401
        message = r.json()["error"]["message"]
        assert "already used" in message and winner in message, message
        assert "expired" not in message
    refusals = [e for e in _audit(cluster.node, "app_server.join") if not e["success"]]
    assert sum("already used" in e.get("error", "") for e in refusals) >= 3
