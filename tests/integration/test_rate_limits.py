"""Issue 20 item 4: a rate limit holds across two nodes on one PostgreSQL (decision 0051).

Two all-in-one nodes share a database (`test_topology.running_pair`). User ``bob``'s role allows
``echo`` at ``5/s`` with a burst of 5. 100 calls sent at once, half through each node's proxy
(two sessions, so both app services draw), admit 5 + 5 x the time the draws took (within one);
the rest are answered -32051 with ``retryAfter`` and audited, and never reach the server.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import pytest

from tests.integration.mcp_https import McpOverHttps
from tests.integration.test_topology import Pair, running_pair
from tests.peers import requires_node_peers

pytestmark = [requires_node_peers, pytest.mark.postgres]

ROLE = """\
kind: role
version: v1
metadata: {name: metered}
spec:
  allow:
    app_labels: {env: dev}
    mcp:
      tools: ["*"]
      rate_limits:
      - {name: echo-5ps, tools: [echo], per_user: "5/s", burst: 5}
"""


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pair, str]]:
    root = tmp_path_factory.mktemp("rates")
    with running_pair(root) as p:
        (root / "role.yaml").write_text(ROLE)
        p.a.cli("create", str(root / "role.yaml"), local=True)
        p.a.cli("users", "add", "bob", "--roles=metered", local=True)
        token = p.a.cli("auth", "sign", "--user=bob", "--format=token", local=True).stdout.strip()
        yield p, token


def _answer(s: McpOverHttps, where: Any, i: int) -> dict[str, Any]:
    body = {
        "jsonrpc": "2.0",
        "id": i,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": {"message": f"m{i}"}},
    }
    r = s.post(where, body)
    assert r.status_code == 200, (r.status_code, r.text)
    if r.headers["content-type"].startswith("text/event-stream"):
        data = [ln[5:] for ln in r.text.splitlines() if ln.startswith("data:")]
        return dict(json.loads(data[-1]))
    return dict(r.json())


def test_a_burst_of_100_across_two_nodes(pair: tuple[Pair, str]) -> None:
    p, token = pair
    sessions = [McpOverHttps(p.ca, token), McpOverHttps(p.ca, token)]
    try:
        sessions[0].start(p.a)
        sessions[1].start(p.b)
        calls = [(sessions[i % 2], (p.a, p.b)[(i // 2) % 2], 1000 + i) for i in range(100)]
        with ThreadPoolExecutor(max_workers=20) as pool:
            answers = list(pool.map(lambda c: _answer(*c), calls))
    finally:
        for s in sessions:
            s.close()
    ok = [a for a in answers if "result" in a]
    refused = [a["error"] for a in answers if "error" in a]
    assert len(ok) + len(refused) == 100
    assert all(e["code"] == -32051 and e["data"]["retryAfter"] > 0 for e in refused), refused[:3]
    assert 'rate limit "echo-5ps" of role "metered"' in refused[0]["message"]

    out = p.b.cli(
        "audit",
        "search",
        "--type=mcp.session.request",
        "--user=bob",
        "--format=json",
        "--limit=1000",
        local=True,
    )
    rows = [r for r in json.loads(out.stdout) if r.get("tool") == "echo"]
    assert len(rows) == 100  # every call audited once, admitted or refused
    times = sorted(datetime.fromisoformat(r["time"]) for r in rows)
    span = (times[-1] - times[0]).total_seconds()
    expected = 5 + 5 * span
    assert abs(len(ok) - expected) <= 1, (len(ok), span)
    assert sum(1 for r in rows if (r.get("error") or "").startswith("rate limited: ")) == len(refused)
