"""Rate limits (decision 0051): a refused call never reaches the upstream, whoever sends it.

One node (SQLite: the buckets are in the app service's memory) with the recording server as an
app limited to 2 calls at once and 1 a minute for all users together; a user's role adds 1 a
minute of ``add`` per user.  Calls past the limits are answered -32051 with ``retryAfter``, are
audited, and the recording upstream shows only the admitted ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.integration.conftest import start_node, stop_node
from tests.security.conftest import Gateway, RawSession, Recording, recording_app, recording_cmd

ROLE = """\
kind: role
version: v1
metadata: {name: metered}
spec:
  allow:
    app_labels: {env: dev}
    mcp:
      tools: ["*"]
      rate_limits: [{tools: [add], per_user: "1/m"}]
"""


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("rates")
    record = root / "rec.jsonl"
    cmd = recording_cmd("stdio", record)
    limit = '    rate_limit: {rate: "1/m", burst: 2, tools: [echo]}\n'
    apps = "app_service:\n  apps:\n" + recording_app("rec-limited", cmd, limit)
    node = start_node(root, extra_config=apps)
    try:
        (root / "role.yaml").write_text(ROLE)
        node.cli("create", str(root / "role.yaml"), local=True)
        for user in ("alice", "bob"):
            node.cli("users", "add", user, "--roles=metered", local=True)
        yield Gateway(node, {"rec-limited": Recording(record)})
    finally:
        stop_node(node)


def _call(s: RawSession, rid: int, tool: str) -> dict[str, object]:
    body = {
        "jsonrpc": "2.0",
        "id": rid,
        "method": "tools/call",
        "params": {"name": tool, "arguments": {"n": rid}},
    }
    answer: dict[str, object] = s.answer(s.post(json.dumps(body).encode()))
    return answer


def test_calls_past_a_limit_never_reach_the_upstream(limited: Gateway) -> None:
    with limited.session("alice", "rec-limited") as a, limited.session("bob", "rec-limited") as b:
        got = {
            ("alice", "echo", 1): _call(a, 1, "echo"),
            ("bob", "echo", 2): _call(b, 2, "echo"),  # the app's burst of 2 is shared
            ("bob", "echo", 3): _call(b, 3, "echo"),
            ("alice", "add", 4): _call(a, 4, "add"),  # per user: each has one
            ("alice", "add", 5): _call(a, 5, "add"),
            ("bob", "add", 6): _call(b, 6, "add"),
        }
        a.sync()
        b.sync()
    admitted = sorted(k[2] for k, v in got.items() if "result" in v)
    assert admitted == [1, 2, 4, 6]
    for key in (("bob", "echo", 3), ("alice", "add", 5)):
        error = got[key]["error"]
        assert error["code"] == -32051 and error["data"]["retryAfter"] > 0  # type: ignore[index]
    reached = [
        m["params"]["arguments"]["n"]
        for m in limited.recordings["rec-limited"].messages()
        if isinstance(m, dict) and m.get("method") == "tools/call"
    ]
    assert sorted(reached) == [1, 2, 4, 6]
    refused = [
        e for e in limited.audit("--type=mcp.session.request") if "rate limited" in (e.get("error") or "")
    ]
    assert sorted(e["params"]["arguments"]["n"] for e in refused) == [3, 5]
