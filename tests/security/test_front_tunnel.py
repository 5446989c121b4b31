"""F3, F5 and F6 over the reverse tunnel: a joined app service applies the same rules.

The proxy routes a session's requests by the tag in its id to the app service that holds it
(``proxy/routing.py``); that app service, not the proxy, decides what reaches its upstream.
So the app binding, the path allow-list and the header stripping are asserted here with the
apps served by a joined host in front of the recording upstream.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator

import pytest

from tests.integration.conftest import start_node, stop_node, wait_for_log
from tests.integration.test_agents import _agent_config, _start_agent, _token
from tests.security.conftest import INIT, ROLES
from tests.security.test_front import Front, call, refusal_events, start_recording


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    root = tmp_path_factory.mktemp("tunnel")
    up = start_recording(root)
    node = start_node(root / "cluster", extra_config="app_service:\n  enabled: false\n")
    agent = None
    try:
        (root / "roles.yaml").write_text(ROLES)
        node.cli("create", str(root / "roles.yaml"), local=True)
        node.cli("users", "add", "limited", "--roles=echo-only", local=True)
        token, pin = _token(node)
        cfg = _agent_config(root / "agent", node, token, pin, "{kind: none}")
        with cfg.open("a") as out:
            out.write(
                "  apps:\n"
                f"  - {{name: remote-a, uri: 'mcp+{up.url}/a', labels: {{env: dev}},"
                " rewrite: {headers: ['X-Upstream-Identity: {{internal.jwt}}']}}\n"
                f"  - {{name: remote-b, uri: 'mcp+{up.url}/b', labels: {{env: dev}}}}\n"
            )
        agent = _start_agent(root / "agent", cfg)
        wait_for_log(agent.log, r"tunnel connected", agent.proc, 30.0)
        ca = root / "ca.pem"
        ca.write_text(node.cli("auth", "export", "--type=tls", local=True).stdout)
        tok = node.cli("auth", "sign", "--user=limited", "--format=token", local=True).stdout.strip()
        f = Front(node, up, ssl.create_default_context(cafile=str(ca)), {"limited": tok})
        deadline = time.monotonic() + 20
        # Until the proxy sees the host's apps; the misses (audited 404s) from an address of their own.
        while f.send("/mcp/apps/remote-a", INIT, source="127.0.0.20")[0] != 200:
            assert time.monotonic() < deadline, "remote-a was not served within 20s"
        yield f
    finally:
        if agent is not None:
            agent.stop()
        stop_node(node)
        up.stop()


def test_a_remote_session_is_bound_to_its_app_and_paths(remote: Front) -> None:
    forged = {"X-Upstream-Identity": "FORGED", "X-Forwarded-User": "admin", "Teleport-Jwt-Assertion": "x.y.z"}
    status, hdrs, _ = remote.send("/mcp/apps/remote-a", INIT, headers=forged)
    assert status == 200
    sid = hdrs["mcp-session-id"]
    assert "." in sid  # tagged: routed to the joined host
    assert remote.send("/mcp/apps/remote-a", call(2), headers={**forged, "Mcp-Session-Id": sid})[0] == 200
    n = len(remote.up.requests())
    # Another app of the same host, with this session: 404, nothing forwarded.
    assert remote.send("/mcp/apps/remote-b", call(3), headers={"Mcp-Session-Id": sid})[0] == 404
    # Another endpoint of the upstream host under this app's name: 404; an encoded one: 400.
    assert remote.send("/mcp/apps/remote-a/b", call(4), headers={"Mcp-Session-Id": sid})[0] == 404
    assert remote.send("/mcp/apps/remote-a/..%2fb", call(5), headers={"Mcp-Session-Id": sid})[0] == 400
    got = remote.up.requests()
    assert len(got) == n
    for req in got:
        assert req["raw_path"] == "/a"
        names = [k for k, _ in req["headers"]]
        values = dict(req["headers"])
        assert names.count("x-upstream-identity") == 1 and values["x-upstream-identity"] != "FORGED"
        assert "x-forwarded-user" not in names and "teleport-jwt-assertion" not in names
    # Refused by the proxy (400) and by the joined host (404s, audited over the tunnel).
    rejected = refusal_events(remote, 0, want=3, session_id=sid)
    assert sorted(e["extra"]["status"] for e in rejected) == [400, 404, 404]
