"""The front door under attack (issue 13: F3, F5, F6, F7, F10), against a real `bastion start`.

Every attack is sent as written in the issue, byte for byte (``http.client`` sends the request
target unchanged, so ``%2f`` stays ``%2f``), to a node whose HTTP apps sit in front of the
recording upstream (``tests/fixtures/recording_server.py``); each test asserts what reached
the upstream, the HTTP status, and the audit events.
"""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import Node, start_node, stop_node
from tests.peers import ROOT
from tests.security.conftest import INIT, ROLES, Recording, recording_cmd

DYN = """\
kind: app
version: v1
metadata:
  name: dyn-log
  labels: {{kind: dyn, env: {env}}}
spec:
  uri: mcp+{url}/dyn
"""


def call(rid: int, tool: str = "echo") -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": rid,
        "method": "tools/call",
        "params": {"name": tool, "arguments": {"m": rid}},
    }


@dataclass
class Upstream:
    """The recording HTTP upstream: its base URL and what reached it."""

    url: str
    rec: Recording
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def requests(self) -> list[dict[str, Any]]:
        return self.rec.records()


def start_recording(root: Path) -> Upstream:
    file = root / "upstream.jsonl"
    proc = subprocess.Popen(recording_cmd("http", file), stdout=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()  # printed once it accepts connections; "" if it died
    up = Upstream(line.split()[-1] if line else "", Recording(file), proc)
    if not line.startswith("listening on "):
        up.stop()
        raise AssertionError(f"recording upstream did not start: {line!r}")
    return up


@dataclass
class Front:
    node: Node
    up: Upstream
    ctx: ssl.SSLContext
    tokens: dict[str, str]

    def send(
        self,
        target: str,
        body: Any = None,
        *,
        user: str | None = "limited",
        headers: dict[str, str] | None = None,
        method: str = "POST",
        token: str | None = None,
        source: str = "127.0.0.1",
    ) -> tuple[int, dict[str, str], bytes]:
        """One request with ``target`` sent exactly as given, from loopback address ``source``
        (tests of refusals use their own, so that each has its own audit rate limit)."""
        host, port = self.node.addr.rsplit(":", 1)
        conn = http.client.HTTPSConnection(
            host, int(port), context=self.ctx, timeout=30, source_address=(source, 0)
        )
        h = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        elif user is not None:
            h["Authorization"] = f"Bearer {self.tokens[user]}"
        h.update(headers or {})
        data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
        try:
            conn.request(method, target, body=data, headers=h)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def session(self, app: str, user: str = "limited") -> str:
        status, hdrs, body = self.send(f"/mcp/apps/{app}", INIT, user=user)
        assert status == 200, body
        return hdrs["mcp-session-id"]

    def audit(self, *args: str) -> list[dict[str, Any]]:
        out = self.node.cli("audit", "search", "--format=json", "--order=asc", *args, local=True).stdout
        return list(json.loads(out))


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    root = tmp_path_factory.mktemp("front")
    up = start_recording(root)
    try:
        apps = f"""\
app_service:
  resources:
  - labels: {{kind: dyn}}
  dynamic_apps: {{upstream_networks: [127.0.0.1/32]}}  # dyn-log's loopback upstream
  apps:
  - name: logger
    uri: mcp+{up.url}/logger
    labels: {{env: dev}}
    extra_paths: [/v2]
    rewrite:
      headers: ["X-Upstream-Identity: {{{{internal.jwt}}}}"]
  - name: prod
    uri: mcp+{up.url}/prod
    labels: {{env: prod}}
"""
        node = start_node(root, extra_config=apps)
        try:
            (root / "roles.yaml").write_text(ROLES)
            node.cli("create", str(root / "roles.yaml"), local=True)
            node.cli("users", "add", "limited", "--roles=echo-only", local=True)
            tokens = {
                u: node.cli("auth", "sign", f"--user={u}", "--format=token", local=True).stdout.strip()
                for u in ("limited",)
            }
            ca = root / "ca.pem"
            ca.write_text(node.cli("auth", "export", "--type=tls", local=True).stdout)
            yield Front(node, up, ssl.create_default_context(cafile=str(ca)), tokens)
        finally:
            stop_node(node)
    finally:
        up.stop()


def _error(body: bytes) -> str:
    return str(json.loads(body)["error"]["message"])


def refusal_events(f: Front, since: int, want: int = 1, **match: Any) -> list[dict[str, Any]]:
    """``mcp.session.rejected``/``auth.failed`` events after the first ``since`` ones, matching
    ``match``: once at least ``want`` are searchable (refusals are not waited for when recorded)."""
    deadline = time.monotonic() + 10
    while True:
        events = f.audit("--type=mcp.session.rejected,auth.failed")[since:]
        got = [
            e
            for e in events
            if all(e.get(k) == v or e.get("extra", {}).get(k) == v for k, v in match.items())
        ]
        if len(got) >= want or time.monotonic() > deadline:
            return got


def _count(f: Front) -> int:
    return len(f.audit("--type=mcp.session.rejected,auth.failed"))


# ------------------------------------------------------------------------- F3: paths


def test_f3_a_sub_path_does_not_reach_another_endpoint(front: Front) -> None:
    sid = front.session("logger")
    before, n = _count(front), len(front.up.requests())
    status, hdrs, body = front.send("/mcp/apps/logger/prod", call(2), headers={"Mcp-Session-Id": sid})
    assert status == 404 and hdrs["x-bastion-error-origin"] == "client"
    assert "not served by app 'logger'" in _error(body)
    assert front.up.requests()[n:] == []  # nothing reached the upstream host
    (ev,) = refusal_events(front, before, status=404)
    assert (ev["user"], ev["app"], ev["session_id"]) == ("limited", "logger", sid)
    assert ev["extra"]["path"] == "/mcp/apps/logger/prod"


@pytest.mark.parametrize(
    ("sub", "why"),
    [
        ("..%2fprod", "encoded '/'"),
        ("%2fadmin", "encoded '/'"),
        ("%3Fq=1", "encoded '?'"),
        ("a%00b", "control"),
    ],
)
def test_f3_encoded_separators_are_refused_before_any_decision(front: Front, sub: str, why: str) -> None:
    sid = front.session("logger")
    before, n = _count(front), len(front.up.requests())
    status, _, body = front.send(f"/mcp/apps/logger/{sub}", call(2), headers={"Mcp-Session-Id": sid})
    assert status == 400 and why in _error(body)
    assert front.up.requests()[n:] == []  # nothing reached the upstream host
    assert refusal_events(front, before, status=400, app="logger", user="limited")  # the caller is named


def test_f3_dot_segments_are_resolved_then_decided(front: Front) -> None:
    sid = front.session("logger")
    n = len(front.up.requests())
    status, _, _ = front.send("/mcp/apps/logger/%2e%2e/prod", call(2), headers={"Mcp-Session-Id": sid})
    assert status == 400  # above the app's root
    status, _, _ = front.send(
        "/mcp/apps/logger/v2/%2e%2e/%2e%2e/prod", call(3), headers={"Mcp-Session-Id": sid}
    )
    assert status == 400
    status, _, _ = front.send("/mcp/apps/logger/v2/../prod", call(4), headers={"Mcp-Session-Id": sid})
    assert status == 404  # "/prod": not one of logger's paths
    assert front.up.requests()[n:] == []


def test_f3_the_apps_own_paths_still_reach_it(front: Front) -> None:
    sid = front.session("logger")
    n = len(front.up.requests())
    for target, raw in [
        ("/mcp/apps/logger", "/logger"),
        ("/mcp/apps/logger/", "/logger"),
        ("/mcp/apps/logger/logger", "/logger"),
        ("/mcp/apps/logger/v2/a%20b", "/v2/a%20b"),  # an extra_paths prefix, re-encoded as decided
        ("/mcp/apps/logger/v2/./c", "/v2/c"),
        ("/mcp/apps/logger/.well-known/oauth-protected-resource", "/.well-known/oauth-protected-resource"),
    ]:
        status, _, body = front.send(
            target, {"jsonrpc": "2.0", "id": 7, "method": "ping"}, headers={"Mcp-Session-Id": sid}
        )
        assert status == 200, (target, body)
        assert front.up.requests()[-1]["raw_path"] == raw
    assert len(front.up.requests()) == n + 6


# --------------------------------------------------------------------- F10: no 500s


def test_f10_a_strange_path_is_a_client_error_not_a_500(front: Front) -> None:
    sid = front.session("logger")
    before = _count(front)
    status, hdrs, body = front.send("/mcp/apps/logger/%20x", call(5), headers={"Mcp-Session-Id": sid})
    assert status == 404 and hdrs["content-type"] == "application/json"
    assert hdrs["x-bastion-error-origin"] == "client"
    assert refusal_events(front, before, status=404)
    # The engine never saw it: no request row (let alone a "success"), and id 5 is not in flight.
    assert not [
        e for e in front.audit("--type=mcp.session.request", f"--session={sid}") if e.get("request_id") == 5
    ]
    status, _, body = front.send("/mcp/apps/logger", call(5), headers={"Mcp-Session-Id": sid})
    assert status == 200 and "result" in json.loads(body)
    assert "Traceback" not in front.node.log.read_text()


# ------------------------------------------------------------------- F5: headers


def test_f5_identity_and_rewrite_headers_from_the_client_never_reach_the_upstream(front: Front) -> None:
    forged = {
        "X-Upstream-Identity": "FORGED",
        "X-Forwarded-User": "admin",
        "X-Forwarded-For": "10.9.9.9",
        "Forwarded": "for=10.9.9.9;by=admin",
        "X-Real-IP": "10.9.9.9",
        "Teleport-Jwt-Assertion": "forged.jwt.value",
        "Bastion-Jwt-Assertion": "forged.jwt.value",
        "True-Client-IP": "10.9.9.9",
        "Remote-User": "admin",
        "X-Auth-Request-User": "admin",
        "X-Original-URL": "/prod",
        "X-Request-Id": "kept-1",
    }
    n = len(front.up.requests())
    status, hdrs, _ = front.send("/mcp/apps/logger", INIT, headers=forged)
    assert status == 200
    sid = hdrs["mcp-session-id"]
    status, _, _ = front.send("/mcp/apps/logger", call(2), headers={**forged, "Mcp-Session-Id": sid})
    assert status == 200
    got = front.up.requests()[n:]
    assert len(got) == 2
    for req in got:
        names = [k for k, _ in req["headers"]]
        values = dict(req["headers"])
        assert names.count("x-upstream-identity") == 1 and names.count("bastion-jwt-assertion") == 1
        assert values["x-upstream-identity"] == values["bastion-jwt-assertion"] != "FORGED"
        assert (
            values["bastion-jwt-assertion"].count(".") == 2
            and "forged" not in values["bastion-jwt-assertion"]
        )
        for name in (
            "x-forwarded-user",
            "x-forwarded-for",
            "forwarded",
            "x-real-ip",
            "teleport-jwt-assertion",
            "true-client-ip",
            "remote-user",
            "x-auth-request-user",
            "x-original-url",
        ):
            assert name not in names, name
        assert values["x-request-id"] == "kept-1"  # other headers still pass


# ------------------------------------------------------------------- F6: sessions


def test_f6_a_session_is_bound_to_its_app_and_its_definition(front: Front, tmp_path: Path) -> None:
    f = tmp_path / "dyn.yaml"
    f.write_text(DYN.format(env="dev", url=front.up.url))
    front.node.cli("create", str(f), local=True)
    deadline = time.monotonic() + 10
    while True:  # until the app service serves it
        # Each miss is an audited 404: polled from an address of its own, so that the
        # misses cannot use up 127.0.0.1's audit rate and hide the refusal checked below.
        status, hdrs, _ = front.send("/mcp/apps/dyn-log", INIT, source="127.0.0.20")
        if status == 200:
            break
        assert time.monotonic() < deadline, "dyn-log was not served within 10s"
    sid = hdrs["mcp-session-id"]
    assert front.send("/mcp/apps/dyn-log", call(2), headers={"Mcp-Session-Id": sid})[0] == 200

    # Another app's name with this session: 404, and nothing reaches either upstream.
    n = len(front.up.requests())
    before = _count(front)
    status, _, body = front.send("/mcp/apps/logger", call(3), headers={"Mcp-Session-Id": sid})
    assert status == 404 and "session not found" in _error(body)
    assert len(front.up.requests()) == n
    assert refusal_events(front, before, status=404, app="logger", session_id=sid)

    # Relabelled out of limited's reach (still served): the session ends, and no name reaches it.
    f.write_text(DYN.format(env="prod", url=front.up.url))
    front.node.cli("create", "-f", str(f), local=True)
    deadline = time.monotonic() + 10
    while not front.audit("--type=mcp.session.end", f"--session={sid}"):
        assert time.monotonic() < deadline, "the dyn-log session did not end within 10s"
    (end,) = front.audit("--type=mcp.session.end", f"--session={sid}")
    assert "redefined" in end["error"]
    n = len(front.up.requests())
    for app in ("logger", "dyn-log"):
        status, _, _ = front.send(f"/mcp/apps/{app}", call(4), headers={"Mcp-Session-Id": sid})
        assert status == 404
    assert len(front.up.requests()) == n
    front.node.cli("rm", "app/dyn-log", local=True)


# -------------------------------------------------------------- F7: refusals audited


def test_f7_every_refusal_is_an_audit_event(front: Front) -> None:
    before = _count(front)
    src = "127.0.0.7"
    # An app the user may not reach, answered like a missing one.
    status, _, body = front.send("/mcp/apps/prod", INIT, source=src)
    assert status == 404 and "no MCP app named 'prod'" in _error(body)
    # No credential, and a bad one.
    assert front.send("/mcp/apps/logger", INIT, user=None, source=src)[0] == 401
    assert front.send("/mcp/apps/logger", INIT, token="not-a-token", source=src)[0] == 401
    # A bad Origin.
    assert (
        front.send("/mcp/apps/logger", INIT, headers={"Origin": "https://evil.example"}, source=src)[0] == 403
    )
    # A call without a session, and with an unknown one.
    assert front.send("/mcp/apps/logger", call(2), source=src)[0] == 400
    assert front.send("/mcp/apps/logger", call(2), headers={"Mcp-Session-Id": "f" * 44}, source=src)[0] == 404
    # Malformed input outside a session.
    assert front.send("/mcp/apps/logger", b"{not json", source=src)[0] == 400
    events = refusal_events(front, before, want=7, remote_addr=src)
    got = sorted((e["event"], e["extra"]["status"], e.get("user", ""), e.get("app", "")) for e in events)
    assert got == sorted(
        [
            ("mcp.session.rejected", 404, "limited", "prod"),
            ("auth.failed", 401, "", "logger"),
            ("auth.failed", 401, "", "logger"),
            ("mcp.session.rejected", 403, "", "logger"),
            ("mcp.session.rejected", 400, "limited", "logger"),
            ("mcp.session.rejected", 404, "limited", "logger"),
            ("mcp.session.rejected", 400, "limited", "logger"),
        ]
    )
    for e in events:
        assert e["error"] and e["code"].endswith("E") and len(e["error"]) < 300


def test_f7_error_answers_and_events_are_bounded(front: Front) -> None:
    before, src = _count(front), "127.0.0.8"
    status, _, body = front.send(
        "/mcp/apps/logger", INIT, headers={"Origin": "https://" + "o" * 6000}, source=src
    )
    assert status == 403 and len(body) < 600
    status, _, body = front.send("/mcp/apps/" + "a" * 6000, INIT, source=src)
    assert status == 404 and len(body) < 600
    status, _, body = front.send(
        "/mcp/apps/logger", INIT, headers={"MCP-Protocol-Version": "v" * 6000}, source=src
    )
    assert status == 400 and len(body) < 1000
    events = refusal_events(front, before, want=3, remote_addr=src)
    assert len(events) == 3
    assert all(len(json.dumps(e)) < 8000 for e in events)
    assert any("sha256:" in e.get("app", "") for e in events)  # the long app name, cut and hashed


def test_f7_a_flood_of_refusals_is_rate_limited(front: Front) -> None:
    src = "127.0.0.9"
    for _ in range(100):
        assert front.send("/mcp/apps/logger", INIT, token="bad", source=src)[0] == 401
    # The per-source burst (30, plus what refilled during the flood at 30 a minute) is recorded;
    # the rest is counted for one audit.suppressed event (tests/unit/audit/test_refusals.py).
    recorded = refusal_events(front, 0, want=30, remote_addr=src)
    assert 30 <= len(recorded) <= 40
