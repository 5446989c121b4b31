"""Attacks around the audit bounds (F12): a client's self-description is stored in every event.

``clientInfo`` (and the protocol version) of ``initialize`` go into every audit event of the
session.  They were stored as sent: after one initialize with a 1 MiB ``clientInfo.name``,
twenty denied calls of 84 bytes each grew the data directory by 21 MB (x12,000; with a 4 MiB
name, x50,000).  They are cut like the other names a client controls (``audit/bound.py``).
"""

from __future__ import annotations

import json

from bastion.audit.bound import MAX_NAME
from bastion.session import RecordAudit
from tests.security.conftest import INIT, Gateway
from tests.security.test_properties import new_session

BIG = 1 << 20


def test_a_huge_client_info_is_stored_cut_not_in_every_event(gateway: Gateway) -> None:
    init = json.loads(json.dumps(INIT))
    init["params"]["clientInfo"] = {"name": "N" * BIG, "version": "1"}
    init["params"]["protocolVersion"] = "2025-06-18" + "x" * BIG
    rec = gateway.recordings["rec-http"]
    n = len(rec.records())
    headers = {
        "Authorization": f"Bearer {gateway.token('limited')}",
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
    }
    url = f"https://{gateway.node.addr}/mcp/apps/rec-http"
    with gateway.http() as c:
        r = c.post(url, content=json.dumps(init), headers=headers)
        assert r.status_code == 200, r.text[:200]
        sid = r.headers["mcp-session-id"]
        for i in range(5):
            call = {"jsonrpc": "2.0", "id": 100 + i, "method": "tools/call", "params": {"name": "get-env"}}
            r = c.post(url, json=call, headers={**headers, "Mcp-Session-Id": sid})
            assert r.status_code == 200 and "not allowed" in r.json()["error"]["message"]
    assert "tools/call" not in [m.get("method") for m in rec.messages()[n:] if isinstance(m, dict)]
    events = [e for e in gateway.audit() if e.get("session_id") == sid]
    assert len(events) >= 6  # start, initialize, five denied calls
    for e in events:
        assert len(e.get("client_info", "")) <= MAX_NAME + 100, (e["event"], len(e["client_info"]))
        assert len(e.get("protocol_version", "")) <= MAX_NAME + 100
    denied = [e for e in events if e.get("tool") == "get-env"]
    assert len(denied) == 5
    assert "cut: " in denied[0]["client_info"] and "sha256:" in denied[0]["client_info"]
    assert sum(len(json.dumps(e)) for e in denied) < 5 * 16 * 1024


def test_a_hostile_upstreams_session_id_and_server_info_are_stored_cut() -> None:
    """The same for what an upstream says of itself (an app's creator chooses the upstream): its
    session id (up to 64 KiB of response headers) and serverInfo are in every event too."""
    s = new_session()  # initialized; a second initialize is noted like the first
    s.client_sent(b'{"jsonrpc":"2.0","id":"init2","method":"initialize","params":{}}')
    big = {"protocolVersion": "2025-06-18", "serverInfo": {"name": "S" * BIG, "version": "1"}}
    s.upstream_sent(json.dumps({"jsonrpc": "2.0", "id": "init2", "result": big}).encode())
    s.upstream_session_known("U" * 60_000)
    cmds = s.client_sent(b'{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"get-env"}}')
    events = [c.event for c in cmds if isinstance(c, RecordAudit)]
    assert events
    for e in events:
        assert len(e.upstream_session_id) <= MAX_NAME + 100
        assert len(e.server_info) <= MAX_NAME + 100
    assert "cut: " in events[-1].server_info and "cut: " in events[-1].upstream_session_id
