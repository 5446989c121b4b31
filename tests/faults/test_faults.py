"""The standing fault suite (issue 21): faults under a bounded load, and what must hold after each.

Two all-in-one nodes (auth + proxy + app service each, decision 0030) on a PostgreSQL server of
the suite's own (stopped, crashed and started again by a scenario), reached through a TCP relay
the test can cut (one cluster for the module: a scenario that kills
a node starts it again); server-everything behind them, over stdio (``everything``) and over
streamable HTTP on a port of its own (``everything-http``), and, for two scenarios, an app
service on a host of its own joined with a token, serving ``everything`` too; four
users, each a client holding a session and calling ``echo`` with a message of its own. After every
fault: every call answered OK is audited exactly once with its outcome, no row is left without an
outcome, no live session of a user the fault did not touch is lost, and the recovery time is
printed (figures in docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bastion.tunnel.agent import load_creds
from tests import pg
from tests.faults.harness import SHORT_UNKNOWN_OUTCOME, Load, check_audit, enrol, report
from tests.integration.conftest import Node, start_node, stop_node, wait_for_log
from tests.integration.test_agents import AgentProc, _agent_config, _start_agent, _token, _until
from tests.integration.test_topology import app_config, app_entry, tag_of
from tests.peers import EVERYTHING_JS, EverythingOnPort, everything_cmd, requires_node_peers

pytestmark = [requires_node_peers, pytest.mark.postgres]

USERS = ("u1", "u2", "u3", "u4")


class Relay:
    """``pg.TcpProxy`` on a loop of its own, for tests whose nodes are other processes."""

    def __init__(self, dsn: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.proxy = pg.TcpProxy.for_dsn(dsn)
        self._run(self.proxy.restore())

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def cut(self) -> None:
        self._run(self.proxy.cut())

    def restore(self) -> None:
        self._run(self.proxy.restore())

    def close(self) -> None:
        self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Cluster:
    root: Path
    a: Node
    b: Node
    relay: Relay
    dsn: str
    ca: Path
    tokens: dict[str, str]
    #: The app ``everything-http`` of both nodes (restarted by a scenario).
    http: EverythingOnPort
    #: The PostgreSQL server (the suite's own: stopped, crashed and started by scenarios).
    db: pg.OwnServer

    def start(self, name: str) -> Node:
        """Node ``name`` (``a`` or ``b``) started on its data dir; see ``serving``."""
        node = start_node(
            self.root / name, auth_config=_auth(self.dsn), cluster="faults", extra_config=_extra(self.http)
        )
        setattr(self, name, node)
        return node

    def serving(self, node: Node) -> None:
        """Until ``node``'s proxy has heard from the other node's app service (its first beat)."""
        wait_for_log(node.log, r"app service serves .*apps=everything", node.proc, 30.0)

    def restart(self, name: str) -> Node:
        stop_node(getattr(self, name))
        node = self.start(name)
        self.serving(node)
        return node


def _auth(dsn: str) -> str:
    return f"  backend:\n    type: postgres\n    dsn: {dsn}\n"


def _extra(http: EverythingOnPort) -> str:
    return (
        app_config(everything_cmd("stdio"), f"  - name: everything-http\n    uri: mcp+{http.url}\n")
        + SHORT_UNKNOWN_OUTCOME
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp_path = tmp_path_factory.mktemp("faults")
    db = pg.OwnServer()  # a server of the suite's own: a scenario stops and crashes it
    db.start()
    relay = Relay(db.dsn)
    http = EverythingOnPort()
    c = Cluster(tmp_path, None, None, relay, relay.proxy.dsn(db.dsn), tmp_path / "ca.pem", {}, http, db)  # type: ignore[arg-type]
    try:
        http.start()
        for n in (c.start("a"), c.start("b")):
            c.serving(n)
        c.tokens = enrol(c.a, USERS, c.ca)
        yield c
    finally:
        for n in (c.a, c.b):
            if n is not None:
                stop_node(n)
        http.stop()
        relay.close()
        db.close()


def _load(c: Cluster, via: dict[str, list[Any]], app: str = "everything") -> Load:
    return Load(c.ca, c.tokens.__getitem__, via, app=app)


def test_database_outage_fails_no_call_and_loses_no_outcome(cluster: Cluster) -> None:
    c = cluster
    with _load(c, {"u1": [c.a], "u2": [c.b], "u3": [c.a, c.b], "u4": [c.b, c.a]}) as load:
        load.wait_for_calls(40)
        cut = time.monotonic()
        c.relay.cut()
        load.wait_for_calls(400)  # calls go on while the database is away (the spool holds them)
        c.relay.restore()
        load.wait_for_calls(40)
    assert not load.calls("error") and not load.calls("lost"), load.summary()
    report("database away", load, load.recovery(cut))
    check_audit(c.a, load)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restart_fails_no_call_and_loses_no_outcome(cluster: Cluster, mode: str) -> None:
    """The database server itself stopped under load — ``fast`` (connections ended with an admin
    shutdown error, new ones refused) or ``immediate`` (a crash: recovery at the next start) —
    and started again a little later: no call fails, no outcome is lost."""
    c = cluster
    with _load(c, {"u1": [c.a], "u2": [c.b], "u3": [c.a, c.b], "u4": [c.b, c.a]}) as load:
        load.wait_for_calls(40)
        down = time.monotonic()
        c.db.stop(mode)
        load.wait_for_calls(200)  # calls go on while it is down (the spool holds the audit writes)
        c.db.start()
        load.wait_for_calls(40)
    assert not load.calls("error") and not load.calls("lost"), load.summary()
    report(f"PostgreSQL stopped ({mode}) and started", load, load.recovery(down))
    check_audit(c.a, load)


def _descendants(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def _upstreams(node: Node) -> list[int]:
    """The stdio upstream processes (server-everything) the node started."""
    found = []
    for pid in _descendants(node.proc.pid):
        try:
            cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes()
        except OSError:
            continue
        if str(EVERYTHING_JS).encode() in cmdline:
            found.append(pid)
    return found


def test_a_killed_stdio_child_costs_only_its_own_session(cluster: Cluster) -> None:
    c = cluster
    before = set(_upstreams(c.a) + _upstreams(c.b))
    with _load(c, {u: [c.a] for u in USERS}) as load:
        load.wait_for_calls(40)
        children = sorted(set(_upstreams(c.a) + _upstreams(c.b)) - before)
        assert len(children) == len(USERS), children  # one per session of this load
        killed = time.monotonic()
        os.kill(children[0], signal.SIGKILL)
        load.wait_for_calls(80)
    failed = {call.client for call in load.calls() if call.outcome != "ok"}
    assert len(failed) == 1, f"one child died: one user's session must end, no other: {load.summary()}"
    (victim,) = failed
    # Its session ended: the call in flight failed (502, origin upstream) or the next got 404.
    assert {x.status for x in load.clients[victim].calls if x.outcome != "ok"} <= {404, 502}
    report("stdio child killed", load, load.recovery(killed))
    check_audit(c.a, load)


def test_a_killed_node_takes_only_its_own_sessions(cluster: Cluster) -> None:
    c = cluster
    with _load(c, {u: [c.b] for u in USERS}) as load:
        load.wait_for_calls(40)
        theirs = {cl.name for cl in load.clients.values() if cl.sessions[-1].startswith(tag_of(c.a) + ".")}
        killed = time.monotonic()
        c.a.proc.kill()
        c.a.proc.wait(15)
        load.wait_for_calls(80)
        c.restart("a")
        load.wait_for_calls(40)
    # Sessions on A: the call in flight 502; then 503 + Retry-After while A is believed alive
    # (ADR 36), 404 once A is back without them; a new session then works.
    load.check_failures(theirs, {404, 502, 503})
    report("node killed and restarted", load, load.recovery(killed))
    check_audit(c.b, load)


def test_a_restarted_proxy_loses_no_session(cluster: Cluster) -> None:
    """Clients reach sessions on both nodes' app services through A's proxy; A is stopped and
    started again (a deploy). While it is down its clients cannot connect (a load balancer's
    business); once it listens, every session goes on — never a 404."""
    c = cluster
    with _load(c, {u: [c.a] for u in USERS}) as load:
        load.wait_for_calls(40)
        sessions = {cl.name: cl.sessions[-1] for cl in load.clients.values()}
        assert any(s.startswith(tag_of(c.b) + ".") for s in sessions.values()), sessions
        restarted = time.monotonic()
        fresh = c.restart("a")
        for cl in load.clients.values():
            cl.via = [fresh]  # the same address a load balancer would keep using
        load.wait_for_calls(80)
    lost = load.calls("lost")
    on_b = {n for n, s in sessions.items() if s.startswith(tag_of(c.b) + ".")}
    assert not [x for x in lost if x.client in on_b], f"sessions on B lost: {lost[:3]}"
    for name in on_b:
        assert load.clients[name].sessions[-1] == sessions[name], f"{name} had to start over"
    report("proxy restarted (sessions on the other node)", load, load.recovery(restarted))
    check_audit(c.b, load)


def test_a_restarted_http_upstream_costs_each_session_one_404(cluster: Cluster) -> None:
    """server-everything over streamable HTTP, an app of both nodes, is restarted on its port
    (it forgets every session) under load through both proxies: each session's next call is
    answered 404 and its client initializes again (ADR 39); a call that met the restart is
    audited as failed, and no OK call is lost."""
    c = cluster
    via = {"u1": [c.a], "u2": [c.b], "u3": [c.a, c.b], "u4": [c.b, c.a]}
    with _load(c, via, app="everything-http") as load:
        load.wait_for_calls(40)
        restarted = time.monotonic()
        c.http.restart()
        load.wait_for_recovery(USERS, restarted)
        load.wait_for_calls(40)
    # While it is down: 502 (origin upstream); once it is back: 404 (the session is gone).
    load.check_failures(USERS, {404, 502})
    report("HTTP upstream restarted", load, load.recovery(restarted))
    check_audit(c.a, load, failures_failed=True)


@dataclass
class Joined:
    """An app service on a host of its own (``bastion start`` with only ``app_service``),
    joined with a token, serving ``everything`` from its config file like the nodes do."""

    root: Path
    config: Path
    agent: AgentProc
    tag: str = ""

    def start(self) -> None:
        self.agent.log.write_text("")
        self.agent = _start_agent(self.root, self.config)
        wait_for_log(self.agent.log, r"tunnel connected", self.agent.proc, 30.0)


def _proxies_serving(c: Cluster, tag: str) -> int:
    """How many proxies the app service ``tag`` says (in its heartbeat) it serves apps through."""
    out = json.loads(c.a.cli("get", "app_servers", "--format=json", local=True).stdout)
    return sum(len(s["spec"]["proxies"]) for s in out if s["spec"]["tag"] == tag and s["spec"]["apps"])


@pytest.fixture
def joined(cluster: Cluster, tmp_path: Path) -> Iterator[Joined]:
    c, root = cluster, tmp_path / "joined"
    token, pin = _token(c.a)
    apps = app_entry(everything_cmd("stdio"))
    config = _agent_config(root, c.a, token, pin, "{dynamic: none}", apps=apps)
    j = Joined(root, config, _start_agent(root, config))
    try:
        wait_for_log(j.agent.log, r"tunnel connected", j.agent.proc, 30.0)
        creds = load_creds(root / "data")  # a joined host's identity (a node's is in data/peer)
        assert creds is not None
        j.tag = creds.tag
        _until("it serves through both proxies", lambda: _proxies_serving(c, j.tag) == 2, 30)
        yield j
    finally:
        j.agent.stop()


@pytest.mark.parametrize("restarted", [True, False], ids=["restarted", "gone"])
def test_a_killed_joined_app_service_takes_only_its_own_sessions(
    cluster: Cluster, joined: Joined, restarted: bool
) -> None:
    """Three app services serve ``everything``: both nodes' and a joined one, which is
    SIGKILLed (and started again, or not) while its sessions and others are used through both
    proxies.  Only its own clients fail, and start over: on another app service, or on it once
    restarted.  Not restarted, its sessions are 404 only once its record expires (ADR 36)."""
    c = cluster
    # Every session starts through A, whose round robin puts one on each of the three.
    with _load(c, {"u1": [c.a], "u2": [c.a, c.b], "u3": [c.a, c.b], "u4": [c.a, c.b]}) as load:
        load.wait_for_calls(40)
        theirs = {n for n, cl in load.clients.items() if cl.sessions[-1].startswith(joined.tag + ".")}
        assert theirs and len(theirs) < len(USERS), {n: cl.sessions for n, cl in load.clients.items()}
        killed = time.monotonic()
        joined.agent.proc.kill()
        joined.agent.proc.wait(15)
        if restarted:
            joined.start()
        load.wait_for_recovery(theirs, killed)
        load.wait_for_calls(40)
    # As for a node (above): 502, 503 while believed alive, then 404 and a new session.
    load.check_failures(theirs, {404, 502, 503})
    report(f"joined app service killed{', restarted' if restarted else ''}", load, load.recovery(killed))
    check_audit(c.a, load)
