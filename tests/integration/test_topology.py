"""Several all-in-one nodes on one PostgreSQL are one cluster: any node carries any session.

Two `bastion start` processes, each with the auth service, a proxy and an app service, on a
fresh PostgreSQL database (decision 0030). A session begun through node A is carried by node B
too (B reaches A's app service over A's tunnel to B, as it reaches a joined app service), and
each call is audited exactly once. A node that dies takes only its own sessions with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bastion.tunnel.agent import load_creds
from tests import pg
from tests.integration.conftest import Node, start_node, stop_node, wait_for_log
from tests.integration.mcp_https import McpOverHttps
from tests.peers import everything_cmd, requires_node_peers

pytestmark = [requires_node_peers, pytest.mark.postgres]

VERSION = "2025-06-18"


@dataclass
class Pair:
    a: Node
    b: Node
    token: str
    ca: Path


def app_entry(cmd: list[str]) -> str:
    """The stdio app ``everything`` running ``cmd``: one item of ``app_service.apps``."""
    return (
        "  - name: everything\n"
        "    labels: {env: dev}\n"
        "    mcp:\n"
        f"      command: {cmd[0]}\n"
        f"      args: {json.dumps(cmd[1:])}\n"
        "      run_as_host_user: root\n"
    )


def app_config(cmd: list[str], *more: str) -> str:
    """An ``app_service:`` section serving ``app_entry(cmd)`` and the items ``more``."""
    return "app_service:\n  apps:\n" + app_entry(cmd) + "".join(more)


def start_pair_node(root: Path, dsn: str, *, proxy_config: str = "") -> Node:
    """One all-in-one node of the pair's cluster (also to restart one on its data);
    ``proxy_config``: more lines of its ``proxy_service:`` section (indented two spaces)."""
    auth = f"  backend:\n    type: postgres\n    dsn: {dsn}\n"
    extra = proxy_config + app_config(everything_cmd("stdio"))
    return start_node(root, auth_config=auth, cluster="pair", extra_config=extra)


def dsn_of(node: Node) -> str:
    return node.config.read_text().split("dsn: ", 1)[1].split("\n", 1)[0]


@contextlib.contextmanager
def running_pair(root: Path) -> Iterator[Pair]:
    """Two all-in-one nodes on a fresh PostgreSQL database, each joined to the other's proxy."""
    server, dbname, dsn = asyncio.run(pg.create_database())
    nodes: list[Node] = []
    try:
        for name in ("a", "b"):
            nodes.append(start_pair_node(root / name, dsn))
        a, b = nodes
        # Each node's app service has joined the other node's proxy (its first heartbeat there).
        for n in nodes:
            wait_for_log(n.log, r"app service serves .*apps=everything", n.proc, 30.0)
        a.cli("users", "add", "alice", "--roles=mcp-user", local=True)
        ca = root / "ca.pem"
        ca.write_text(a.cli("auth", "export", local=True).stdout)
        token = a.cli("auth", "sign", "--user=alice", "--format=token", local=True).stdout.strip()
        yield Pair(a, b, token, ca)
    finally:
        for n in nodes:
            stop_node(n)
        asyncio.run(pg.drop_database(server, dbname))


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    with running_pair(tmp_path_factory.mktemp("topology")) as p:
        yield p


def until(what: str, check: Callable[[], bool], deadline: float) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {deadline}s")


def tag_of(node: Node) -> str:
    creds = load_creds(node.root / "data" / "peer")
    assert creds is not None, "the node has no identity for its app service"
    return creds.tag


class Client(McpOverHttps):
    def __init__(self, p: Pair) -> None:
        super().__init__(p.ca, p.token)


def audited_calls(node: Node, sid: str) -> list[str]:
    out = node.cli(
        "audit",
        "search",
        "--type=mcp.session.request",
        "--user=alice",
        "--format=json",
        "--limit=10000",
        local=True,
    )
    rows = json.loads(out.stdout)
    return [
        r["params"]["arguments"]["message"]
        for r in rows
        if r.get("session_id") == sid and r.get("tool") == "echo"
    ]


def test_a_proxy_without_an_app_service_reaches_both_nodes(pair: Pair, tmp_path: Path) -> None:
    """A mixed topology: a proxy-only node joins the pair's database; both all-in-one nodes'
    app services serve it (each dials every live proxy), and a session through it is carried
    through the other nodes too."""
    dsn = dsn_of(pair.a)
    proxy = start_node(
        tmp_path / "p",
        auth_config=f"  backend:\n    type: postgres\n    dsn: {dsn}\n",
        cluster="pair",
        extra_config="app_service:\n  enabled: false\n",
    )
    try:

        def joined() -> int:
            return len(re.findall(r"app service serves .*apps=everything", proxy.log.read_text()))

        until("both nodes' app services joined the new proxy", lambda: joined() >= 2, 30.0)
        s = Client(pair)
        try:
            s.start(proxy)
            assert s.sid.split(".")[0] in (tag_of(pair.a), tag_of(pair.b))
            for i, via in enumerate((proxy, pair.a, pair.b, proxy)):
                s.echo(via, f"mixed {i}")
        finally:
            s.close()
    finally:
        stop_node(proxy)


def test_any_node_carries_any_session_and_a_dead_node_takes_only_its_own(pair: Pair) -> None:
    a, b = pair.a, pair.b
    s = Client(pair)
    try:
        s.start(a)
        assert s.sid.startswith(tag_of(a) + "."), "a session begun through A is A's"
        sent = [f"hop {i}" for i in range(20)]
        for i, text in enumerate(sent):
            s.echo(b if i % 2 == 0 else a, text)
        tools = s.rpc(b, "tools/list")
        assert "echo" in {t["name"] for t in tools["result"]["tools"]}
        r = s.http.delete(s.url(a), headers={"Mcp-Session-Id": s.sid})
        assert r.status_code == 200, r.text
        gone = s.post(b, {"jsonrpc": "2.0", "id": 99, "method": "tools/list"})
        assert gone.status_code == 404, gone.text
        assert "session not found" in gone.json()["error"]["message"]
        # Every call audited exactly once (either node reads the one audit log).
        assert sorted(audited_calls(b, s.sid)) == sorted(sent)
    finally:
        s.close()

    # Sessions of each node, then A dies: B's still work through B; A's are a clear 404.
    mine: Client | None = None
    theirs: Client | None = None
    opened: list[Client] = []
    try:
        for _ in range(8):  # new sessions through B go to either node's app service
            c = Client(pair)
            opened.append(c)
            c.start(b)
            if c.sid.startswith(tag_of(b) + "."):
                mine = mine or c
            elif c.sid.startswith(tag_of(a) + "."):
                theirs = theirs or c
        if theirs is None:
            theirs = Client(pair)
            opened.append(theirs)
            theirs.start(a)
        assert mine is not None, "no session through B landed on B's own app service"
        a.proc.kill()
        a.proc.wait(15)
        mine.echo(b, "after A died")
        # A is believed alive while its heartbeat record lives (503, retry); then known dead:
        # 404, start a new session (decision 0036).
        answers: list[int] = []

        def told_gone() -> bool:
            lost = theirs.post(b, {"jsonrpc": "2.0", "id": 7, "method": "tools/list"})
            answers.append(lost.status_code)
            if lost.status_code == 503:
                assert lost.headers["retry-after"].isdigit(), lost.headers
                return False
            assert lost.status_code == 404, lost.text
            assert "start a new one with initialize" in lost.json()["error"]["message"]
            return True

        until("A's sessions are told gone through B", told_gone, 60.0)
        assert set(answers) <= {503, 404}, answers
        again = Client(pair)
        opened.append(again)
        again.start(b)  # re-initialize through the living node
        again.echo(b, "a new session")
    finally:
        for c in opened:
            c.close()
