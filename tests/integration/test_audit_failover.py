"""No audit outcome is lost when proxies or app services die (issue 21, item 3; decision 0038).

Real processes on the machine's real PostgreSQL (a fresh database): two proxies and one
joined app service serving server-everything over stdio. The app service's audit calls go to
one proxy; that proxy is SIGKILLed while calls go through the other: no call is refused
("the audit log is unavailable"), and every call answered OK has its row, once, with its
outcome. An outcome no proxy can take waits in the app service's on-disk outcome queue, survives its
SIGKILL and is delivered after the restart. A call whose app service dies with it is
completed as "outcome unknown" by the proxies' sweep, never left looking successful.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import pg
from tests.integration.conftest import Node, start_node, stop_node, wait_for_log
from tests.integration.mcp_https import McpOverHttps
from tests.integration.test_agents import AgentProc, _agent_config, _start_agent, _token, _until
from tests.integration.test_scale import APP
from tests.peers import everything_cmd, requires_node_peers

pytestmark = [requires_node_peers, pytest.mark.postgres]

#: The proxies' sweep completes calls left without an outcome this long (decision 0038).
UNKNOWN_AFTER = "3s"


@dataclass
class Cluster:
    root: Path
    auth: str
    proxies: list[Node]
    agent: AgentProc
    agent_cfg: tuple[str, str]
    token: str
    ca: Path

    def start_proxy(self, i: int) -> None:
        self.proxies[i] = start_node(
            self.root / f"proxy{i}",
            auth_config=self.auth,
            cluster="faults",
            extra_config="app_service:\n  enabled: false\n"
            f"audit:\n  unknown_outcome_after: {UNKNOWN_AFTER}\n",
        )

    def live(self) -> Node:
        return next(p for p in self.proxies if p.proc.poll() is None)

    def heal(self) -> None:
        """Every process up again, and the app service connected to both proxies."""
        for i, p in enumerate(self.proxies):
            if p.proc.poll() is not None:
                self.start_proxy(i)
        if self.agent.proc.poll() is not None:
            # Its identity is in its data dir; the proxies listen on new ports.
            cfg = _agent_config(self.root / "agent", self.proxies[0], *self.agent_cfg, "{'*': '*'}")
            self.agent = _start_agent(self.root / "agent", cfg)

        def connected_to_both() -> bool:
            out = json.loads(self.proxies[0].cli("get", "app_servers", "--format=json", local=True).stdout)
            return len(out) == 1 and len(out[0]["spec"]["proxies"]) == 2 and bool(out[0]["spec"]["apps"])

        _until("the app service connected to both proxies and serving", connected_to_both, 30.0)

    def rows(self, **filters: str) -> list[dict[str, Any]]:
        args = [f"--{k}={v}" for k, v in filters.items()]
        out = self.live().cli("audit", "search", "--format=json", "--limit=100000", *args, local=True)
        return list(json.loads(out.stdout))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    server, dbname, dsn = asyncio.run(pg.create_database())
    root = tmp_path_factory.mktemp("faults-audit")
    auth = f"  backend:\n    type: postgres\n    dsn: {dsn}\n"
    c = Cluster(root, auth, [], None, ("", ""), "", root / "ca.pem")  # type: ignore[arg-type]
    try:
        for i in range(2):
            c.proxies.append(None)  # type: ignore[arg-type]
            c.start_proxy(i)
        a = c.proxies[0]
        a.cli("users", "add", "alice", "--roles=mcp-user", local=True)
        c.agent_cfg = _token(a)
        cfg = _agent_config(root / "agent", a, *c.agent_cfg, "{'*': '*'}")
        c.agent = _start_agent(root / "agent", cfg)
        wait_for_log(c.agent.log, r"tunnel connected", c.agent.proc, 30.0)
        cmd = everything_cmd("stdio")
        (root / "app.yaml").write_text(APP.format(command=cmd[0], args=json.dumps(cmd[1:])))
        a.cli("create", str(root / "app.yaml"), local=True)
        c.heal()
        c.ca.write_text(a.cli("auth", "export", local=True).stdout)
        c.token = a.cli("auth", "sign", "--user=alice", "--format=token", local=True).stdout.strip()
        yield c
    finally:
        if c.agent is not None:
            c.agent.stop()
        for p in c.proxies:
            if p is not None:
                stop_node(p)
        asyncio.run(pg.drop_database(server, dbname))


class Client(McpOverHttps):
    def __init__(self, c: Cluster) -> None:
        super().__init__(c.ca, c.token)

    def start(self, where: Any, then: Any = None) -> None:
        """initialize, once the proxy routes the app (a proxy started a moment ago may not yet)."""

        def started() -> bool:
            self.sid = ""
            try:
                super(Client, self).start(where, then)
            except AssertionError:
                return False
            return True

        _until("a session through the proxy", started, 30.0)


def outcome(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["success"], row.get("error", ""), "duration_ms" in row)


def test_a_proxy_killed_under_load_costs_no_call_and_no_outcome(cluster: Cluster) -> None:
    cluster.heal()
    # The app service sends its audit calls to the proxy it dialled first (proxy 0); clients
    # come through proxy 1, several at once, so that audit calls are in flight at the kill.
    doomed, survivor = cluster.proxies
    clients = [Client(cluster) for _ in range(4)]
    answers: list[tuple[str, str, int, str]] = []
    stop = threading.Event()

    def load(s: Client, who: int) -> None:
        while not stop.is_set():
            s.n += 1
            text = f"client {who} call {s.n}"
            r = s.post(
                survivor,
                {
                    "jsonrpc": "2.0",
                    "id": s.n,
                    "method": "tools/call",
                    "params": {"name": "echo", "arguments": {"message": text}},
                },
            )
            answers.append((s.sid, text, r.status_code, r.text[:300]))

    workers = [threading.Thread(target=load, args=(s, i), name=f"calls-{i}") for i, s in enumerate(clients)]
    try:
        for s in clients:
            s.start(survivor)
        for w in workers:
            w.start()
        _until("calls flowing", lambda: len(answers) >= 40, 30.0)
        doomed.proc.kill()  # SIGKILL: no goodbye to the app service
        doomed.proc.wait(15)
        seen = len(answers)
        _until("calls after the kill", lambda: len(answers) >= seen + 80, 60.0)
    finally:
        stop.set()
        for w in workers:
            w.join(60)
        for s in clients:
            s.close()
    refused = [a for a in answers if a[2] != 200]
    assert refused == [], refused  # no 503 "the audit log is unavailable", nothing else either
    # Every call answered OK is audited exactly once, with its outcome.
    sids = {s.sid for s in clients}
    ok = sorted(text for _, text, status, _ in answers if status == 200)

    def mine() -> list[dict[str, Any]]:
        return [
            r
            for r in cluster.rows(type="mcp.session.request", user="alice")
            if r.get("session_id") in sids and r.get("tool") == "echo"
        ]

    def all_completed() -> bool:
        rows = mine()
        return len(rows) == len(ok) and all(outcome(r) == (True, "", True) for r in rows)

    with contextlib.suppress(AssertionError):  # then say what differs
        _until("every OK call's row has its outcome", all_completed, 30.0)
    rows = mine()
    assert sorted(r["params"]["arguments"]["message"] for r in rows) == ok
    assert [r for r in rows if outcome(r) != (True, "", True)] == []


def _long_call_under_way(c: Cluster, seconds: int) -> tuple[Client, threading.Thread, list[Any]]:
    """A session through proxy 1 and a call that takes ``seconds``, recorded and in flight:
    the client, the thread waiting for its answer, and where that answer goes."""
    c.heal()
    s = Client(c)
    got: list[Any] = []
    s.start(c.proxies[1])
    s.n += 1
    body = {
        "jsonrpc": "2.0",
        "id": s.n,
        "method": "tools/call",
        "params": {"name": "trigger-long-running-operation", "arguments": {"duration": seconds, "steps": 1}},
    }

    def call() -> None:
        try:
            r = s.post(c.proxies[1], body)
            # A 200 may be an event stream begun (progress) and cut: a success has a result.
            got.append(r.status_code if r.status_code != 200 or '"result"' in r.text else "cut")
        except Exception as e:  # the proxy carrying it may be killed: that is the test
            got.append(repr(e))

    worker = threading.Thread(target=call, name="long-call")
    worker.start()
    _until("the long call recorded", lambda: len(_long_rows(c, s.sid)) == 1, 30.0)
    return s, worker, got


def _long_rows(c: Cluster, sid: str) -> list[dict[str, Any]]:
    return [
        r
        for r in c.rows(type="mcp.session.request", user="alice")
        if r.get("session_id") == sid and r.get("tool") == "trigger-long-running-operation"
    ]


def test_an_outcome_no_proxy_takes_waits_on_disk_across_an_app_service_restart(cluster: Cluster) -> None:
    s, worker, _ = _long_call_under_way(cluster, 4)
    try:
        for p in cluster.proxies:  # every proxy gone while the upstream works on the call
            p.proc.kill()
            p.proc.wait(15)
        worker.join(60)
        # The upstream answered; no proxy can take the outcome: it goes to the queue on disk.
        wait_for_log(
            cluster.agent.log, r"audit writes failed: spooling .*to=\"the cluster\"", cluster.agent.proc, 60
        )
        cluster.agent.proc.kill()  # and the app service dies too, before it could deliver it
        cluster.agent.proc.wait(15)
        cluster.heal()  # the proxies first, then the app service, which replays its queue
    finally:
        s.close()

    def delivered() -> bool:
        rows = _long_rows(cluster, s.sid)
        return len(rows) == 1 and rows[0]["success"] is True and "duration_ms" in rows[0]

    # The proxies' sweep may have marked it "outcome unknown" meanwhile; the real one wins.
    _until("the outcome delivered from the queue", delivered, 60.0)
    assert "spooled by an earlier run will be written" in cluster.agent.log.read_text()


def test_a_call_whose_app_service_died_is_completed_as_outcome_unknown(cluster: Cluster) -> None:
    s, worker, got = _long_call_under_way(cluster, 60)
    try:
        cluster.agent.proc.kill()  # the call, and its outcome, die with it
        cluster.agent.proc.wait(15)
        worker.join(60)
    finally:
        s.close()
    assert got and got[0] != 200, got  # the client did not hear of a success either

    def swept() -> bool:
        [row] = _long_rows(cluster, s.sid)
        return row["success"] is False and row.get("error", "").startswith("outcome unknown")

    _until("the call completed as 'outcome unknown'", swept, 60.0)
    [row] = _long_rows(cluster, s.sid)
    assert "no outcome was recorded within 3s" in row["error"]
    assert row["code"] == "BMCP003E"
