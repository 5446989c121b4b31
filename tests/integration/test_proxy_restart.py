"""A proxy that restarts never throws away a session that lives on another app service.

Two all-in-one nodes on PostgreSQL (decision 0030); a client's session lives on node B's app
service.  Node A is restarted: until B's tunnel to the new A is up, A holds the session's
requests or answers 503 with ``Retry-After``, never 404, and ``/readyz`` says why it is not
ready (decision 0036).  Then the same session goes on through A.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Node, stop_node, wait_for_log
from tests.integration.test_topology import Client, Pair, dsn_of, running_pair, start_pair_node, tag_of, until
from tests.peers import requires_node_peers

pytestmark = [requires_node_peers, pytest.mark.postgres]


def _session_on(p: Pair, node: Node) -> Client:
    """A session held by ``node``'s app service (new sessions go round robin over both)."""
    for _ in range(20):
        c = Client(p)
        c.start(node)
        if c.sid.startswith(tag_of(node) + "."):
            return c
        c.close()
    raise AssertionError(f"no session landed on {node.root.name}'s app service")


def _echo(c: Client, via: Node, text: str) -> httpx.Response:
    c.n += 1
    body: dict[str, Any] = {
        "jsonrpc": "2.0",
        "id": c.n,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": {"message": text}},
    }
    return c.post(via, body)


def _retry_or_ok(r: httpx.Response, text: str) -> bool:
    """True for the call's answer; False for a 503 that says when to retry; anything else fails."""
    if r.status_code == 503:
        assert r.headers["retry-after"].isdigit(), r.headers
        assert "retry" in r.json()["error"]["message"]
        return False
    assert r.status_code == 200, (r.status_code, r.text)
    assert f"Echo: {text}" in r.text
    return True


def test_a_restarted_proxy_holds_or_defers_a_live_session_never_404(tmp_path: Path) -> None:
    with running_pair(tmp_path) as p:
        dsn = dsn_of(p.a)
        c = _session_on(p, p.b)
        restarted: list[Node] = []
        try:
            c.echo(p.a, "through A before")

            # 1. A restarts (on new ports, as after a reschedule). The client's very next call
            # goes through the new A at once: held until B's tunnel is up, or 503 + Retry-After.
            stop_node(p.a)
            a2 = start_pair_node(p.a.root, dsn)
            restarted.append(a2)
            statuses: list[int] = []

            def carried() -> bool:
                r = _echo(c, a2, "through the new A")
                statuses.append(r.status_code)
                return _retry_or_ok(r, "through the new A")

            until("B's session carried through the restarted A", carried, 60.0)
            assert 404 not in statuses, statuses
            c.echo(p.b, "through B after")
            ready = wait_for_log(a2.log, r"proxy ready after_s=([\d.]+)", a2.proc, 30.0)
            print(f"\nrestarted proxy ready after {ready.group(1)} s; answers in the gap: {statuses}")
            assert c.http.get(f"https://{a2.addr}/readyz").status_code == 200

            # 2. A restarts where B cannot reach its tunnel (a port bound but not listening): B is
            # alive (its heartbeats go on), so A is not ready and defers B's session, by the rules,
            # whatever the timing.
            stop_node(a2)
            with socket.socket() as dead_end:
                dead_end.bind(("127.0.0.1", 0))
                unreachable = f"127.0.0.1:{dead_end.getsockname()[1]}"
                a3 = start_pair_node(p.a.root, dsn, proxy_config=f"  tunnel_public_addr: {unreachable}\n")
                restarted.append(a3)
                r = c.http.get(f"https://{a3.addr}/readyz")
                assert r.status_code == 503, r.text
                assert re.search(r"1 of 1 app services .* have not connected", r.json()["reason"]), r.text
                assert r.headers["retry-after"].isdigit()
                deferred = _echo(c, a3, "deferred")
                assert deferred.status_code == 503, deferred.text
                assert not _retry_or_ok(deferred, "deferred")
                # The session was never touched: it goes on through B.
                c.echo(p.b, "still alive")
        finally:
            c.close()
            for n in restarted:
                stop_node(n)
