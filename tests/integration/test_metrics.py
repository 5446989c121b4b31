"""The diagnostics listener of a real `bastion start`: /metrics moves as MCP calls go through.

A node with ``bastion.diag_addr: 127.0.0.1:0`` serves the demo app (a message-stream
upstream), our conformance fixture over streamable HTTP and an HTTP app whose upstream is
not listening.  Real calls go through the proxy; the scrape must show them.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import bastion.service
from bastion.metrics import KNOWN_METHODS
from tests.integration.conftest import START_DEADLINE, Node, bastion_cmd, stop_node, wait_for_log
from tests.peers import free_port, run_conformance_fixture


def _service_serves_diag() -> bool:
    return "DiagServer" in Path(bastion.service.__file__).read_text()


pytestmark = pytest.mark.skipif(
    not _service_serves_diag(), reason="waiting for service wiring: service.py does not start DiagServer yet"
)

ROLES = """\
kind: role
version: v1
metadata: {name: simple-only}
spec:
  allow:
    app_labels: {env: test}
    mcp: {tools: [test_simple_text]}
"""

PROTOCOL = "2025-06-18"


class Metrics:
    """One scrape, parsed: ``m.get(name, **labels)`` (0 when the series does not exist)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]

    def get(self, name: str, **labels: str) -> float:
        return sum(
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def label_values(self, name: str, label: str) -> set[str]:
        return {s.labels[label] for s in self.samples if s.name == name and label in s.labels}


@pytest.fixture(scope="module")
def node_with_diag(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Node, str]]:
    root = tmp_path_factory.mktemp("diag")
    with run_conformance_fixture("http") as conf_url:
        config = root / "bastion.yaml"
        config.write_text(
            "version: v1\n"
            "bastion:\n"
            f"  data_dir: {root / 'data'}\n"
            "  cluster_name: itest\n"
            '  diag_addr: "127.0.0.1:0"\n'
            "auth_service:\n"
            "  listen_addr: 127.0.0.1:0\n"
            "proxy_service:\n"
            "  listen_addr: 127.0.0.1:0\n"
            "app_service:\n"
            "  demo_server: true\n"
            "  apps:\n"
            "  - name: conformance-http\n"
            f"    uri: mcp+{conf_url}\n"
            "    labels: {env: test}\n"
            "  - name: nobody-home\n"
            f"    uri: mcp+http://127.0.0.1:{free_port()}/mcp\n"
            "    labels: {env: test}\n"
        )
        log = root / "server.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
        with log.open("wb") as f:
            proc = subprocess.Popen(
                bastion_cmd("start", "--config", str(config)), stdout=f, stderr=subprocess.STDOUT, env=env
            )
        node: Node | None = None
        try:
            m = wait_for_log(log, r"proxy listening addr=https://([\d.]+:\d+)", proc, START_DEADLINE)
            node = Node(root=root, config=config, addr=m.group(1), proc=proc, log=log)
            diag = wait_for_log(log, r"diag listening addr=(http://[\d.]+:\d+)", proc, START_DEADLINE).group(
                1
            )
            (root / "roles.yaml").write_text(ROLES)
            node.cli("create", str(root / "roles.yaml"), local=True)
            node.cli("users", "add", "alice", "--roles=mcp-user", local=True)
            node.cli("users", "add", "sam", "--roles=simple-only", local=True)
            yield node, diag
        finally:
            if node is not None:
                stop_node(node)
            else:
                proc.kill()
                proc.wait()


class Client:
    """Raw streamable-HTTP calls through the proxy, as one user."""

    def __init__(self, node: Node, user: str) -> None:
        ca = node.root / "ca.pem"
        if not ca.exists():
            ca.write_text(node.cli("auth", "export", "--type=tls", local=True).stdout)
        token = node.cli("auth", "sign", f"--user={user}", "--format=token", local=True).stdout.strip()
        self.http = httpx.Client(
            base_url=f"https://{node.addr}",
            verify=ssl.create_default_context(cafile=str(ca)),
            timeout=30,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"},
        )
        self.sid = ""
        self.next_id = 0

    def post(self, app: str, method: str, params: Any = None, *, notify: bool = False) -> httpx.Response:
        body: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if not notify:
            self.next_id += 1
            body["id"] = self.next_id
        if params is not None:
            body["params"] = params
        headers = {"Mcp-Protocol-Version": PROTOCOL}
        if self.sid:
            headers["Mcp-Session-Id"] = self.sid
        return self.http.post(f"/mcp/apps/{app}", content=json.dumps(body), headers=headers)

    def open(self, app: str) -> httpx.Response:
        r = self.post(
            app,
            "initialize",
            {"protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
        )
        self.sid = r.headers.get("mcp-session-id", "")
        if r.status_code == 200:
            assert self.post(app, "notifications/initialized", notify=True).status_code == 202
        return r

    def close(self, app: str) -> None:
        if self.sid:
            self.http.delete(f"/mcp/apps/{app}", headers={"Mcp-Session-Id": self.sid})
        self.sid = ""
        self.http.close()


def scrape(diag: str) -> Metrics:
    r = httpx.get(f"{diag}/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return Metrics(r.text)


def test_health_and_readiness(node_with_diag: tuple[Node, str]) -> None:
    _, diag = node_with_diag
    assert httpx.get(f"{diag}/healthz", timeout=10).text == "ok\n"
    assert httpx.get(f"{diag}/readyz", timeout=10).status_code == 200
    assert httpx.get(f"{diag}/nope", timeout=10).status_code == 404


def test_calls_move_the_counters(node_with_diag: tuple[Node, str]) -> None:
    node, diag = node_with_diag
    before = scrape(diag)

    # The demo app: a message-stream upstream.
    alice = Client(node, "alice")
    assert alice.open("bastion-demo").status_code == 200
    during = scrape(diag)
    assert (
        during.get("bastion_mcp_sessions", app="bastion-demo")
        == before.get("bastion_mcp_sessions", app="bastion-demo") + 1
    )
    for _ in range(3):
        r = alice.post("bastion-demo", "tools/call", {"name": "bastion_user_info", "arguments": {}})
        assert r.status_code == 200, r.text
    assert alice.post("bastion-demo", "tools/list").status_code == 200
    alice.close("bastion-demo")

    # The conformance fixture over streamable HTTP: one allowed call, one denied.
    sam = Client(node, "sam")
    assert sam.open("conformance-http").status_code == 200
    assert sam.post("conformance-http", "tools/call", {"name": "test_simple_text"}).status_code == 200
    denied = sam.post("conformance-http", "tools/call", {"name": "test_image_content"})
    assert denied.status_code == 200 and "not allowed" in denied.json()["error"]["message"]
    assert sam.post("conformance-http", "made/up/method").status_code in (200, 202)
    sam.close("conformance-http")

    # An HTTP app whose upstream is not listening.
    lost = Client(node, "alice")
    assert lost.open("nobody-home").status_code == 502
    lost.close("nobody-home")

    after = scrape(diag)

    def moved(name: str, **labels: str) -> float:
        return after.get(name, **labels) - before.get(name, **labels)

    demo, conf = {"app": "bastion-demo"}, {"app": "conformance-http"}
    assert moved("bastion_mcp_sessions_started_total", **demo) == 1
    assert moved("bastion_mcp_sessions_started_total", **conf) == 1
    assert after.get("bastion_mcp_sessions", **demo) == before.get("bastion_mcp_sessions", **demo)
    assert after.get("bastion_mcp_sessions", **conf) == before.get("bastion_mcp_sessions", **conf)

    client, upstream = {"direction": "client"}, {"direction": "upstream"}
    assert moved("bastion_mcp_messages_total", **demo, method="tools/call", **client) == 3
    assert moved("bastion_mcp_messages_total", **demo, method="tools/call", **upstream) == 3
    assert moved("bastion_mcp_messages_total", **demo, method="initialize", **upstream) == 1
    assert moved("bastion_mcp_messages_total", **demo, method="notifications/initialized", **client) == 1
    assert moved("bastion_mcp_messages_total", **demo, method="tools/list", **client) == 1
    assert moved("bastion_mcp_messages_total", **conf, method="tools/call", **client) == 2
    assert moved("bastion_mcp_messages_total", **conf, method="tools/call", **upstream) == 1
    assert moved("bastion_mcp_messages_total", **conf, method="other", **client) == 1
    assert after.label_values("bastion_mcp_messages_total", "method") <= KNOWN_METHODS | {"other"}

    assert moved("bastion_mcp_denials_total", **conf, reason="tool") == 1
    assert moved("bastion_mcp_denials_total", **demo, reason="tool") == 0

    # Each forwarded request waited for its answer: initialize, 3 calls and tools/list on the
    # demo; initialize, the allowed call and the unknown method (forwarded, answered with an
    # error) on the fixture.  The denied call never reached the upstream.
    assert moved("bastion_upstream_request_seconds_count", **demo, transport="demo") == 5
    assert moved("bastion_upstream_request_seconds_count", **conf, transport="http") == 3
    assert moved("bastion_upstream_errors_total", app="nobody-home", kind="unreachable") == 1
    assert moved("bastion_upstream_errors_total", **demo) == 0

    assert "bastion_audit_queue_depth" in {s.name for s in after.samples}
    assert after.get("process_resident_memory_bytes") > 0
    # No user names, session ids or tool names as labels.
    for s in after.samples:
        assert not ({"user", "session_id", "tool"} & set(s.labels)), s
        assert "alice" not in s.labels.values() and "sam" not in s.labels.values()
