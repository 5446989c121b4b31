"""A gateway killed (SIGKILL) under load: every call it answered is in the audit log, once.

The audit commit is an append to the journal (ADR 12); what the crash left journaled and not yet
indexed must be visible to `bastion audit search` at once (read-only, from another process) and
be indexed by the next start, without duplicates; and the log's hash chain verifies (decision 0032).
"""

from __future__ import annotations

import asyncio
import collections
import json
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import Node, start_node, stop_node
from tests.integration.test_failures import Client

DEMO = "app_service:\n  demo_server: true\n"


def calls_in_audit(node: Node) -> collections.Counter[Any]:
    out = node.cli(
        "audit",
        "search",
        "--format=json",
        "--app=bastion-demo",
        "--type=mcp.session.request",
        "--limit=100000",
        local=True,
    ).stdout
    return collections.Counter(
        e.get("request_id") for e in json.loads(out) if e.get("method") == "tools/call"
    )


async def test_calls_answered_before_a_crash_are_all_audited_once(tmp_path: Path) -> None:
    node = start_node(tmp_path, extra_config=DEMO)
    try:
        node.cli("users", "add", "alice", "--roles=mcp-user", local=True)
        client = Client(node, "bastion-demo")
        await client.start()
        answered: list[int] = []
        enough = asyncio.Event()
        next_id = iter(range(1000, 10**9))

        async def caller() -> None:
            while True:
                rid = next(next_id)
                try:
                    r = await client.post(
                        {
                            "jsonrpc": "2.0",
                            "id": rid,
                            "method": "tools/call",
                            "params": {"name": "bastion_user_info", "arguments": {}},
                        }
                    )
                except Exception:  # the gateway is gone
                    return
                if r.status_code == 200 and '"result"' in r.text:
                    answered.append(rid)
                    if len(answered) >= 400:
                        enough.set()

        callers = [asyncio.create_task(caller()) for _ in range(8)]
        async with asyncio.timeout(60):
            await enough.wait()
        node.proc.send_signal(signal.SIGKILL)  # mid-load: calls in flight
        node.proc.wait(timeout=10)
        async with asyncio.timeout(30):
            await asyncio.gather(*callers)
        await client.aclose()

        # Right after the crash, read-only: journal and index together.
        seen = calls_in_audit(node)
        missing = [rid for rid in answered if rid not in seen]
        assert not missing, f"{len(missing)} answered calls not in the audit log: {missing[:10]}"
        assert not [rid for rid, n in seen.items() if n > 1]

        # The next start indexes what the crash left in the journal; nothing doubles.
        left = sorted(p.name for p in (tmp_path / "data").glob("audit.journal.*"))
        assert left, "expected journal segments left by the crash"
        node = start_node(tmp_path, extra_config=DEMO)
        assert not [n for n in left if (tmp_path / "data" / n).exists()]  # indexed at open
        assert calls_in_audit(node) == seen
        # The hash chain held across the crash and the journal's replay (decision 0032).
        verified = node.cli("audit", "verify", local=True, check=False)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        # A clean stop indexes everything and leaves no journal behind.
        stop_node(node)
        assert not list((tmp_path / "data").glob("audit.journal.*"))
        assert calls_in_audit(node) == seen
        verified = node.cli("audit", "verify", local=True, check=False)
        assert verified.returncode == 0, verified.stdout + verified.stderr
    finally:
        if node.proc.poll() is None:
            stop_node(node)


pytestmark = pytest.mark.timeout(180)
