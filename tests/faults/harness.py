"""What every fault scenario shares: a bounded load of MCP clients, and the checks after it.

``Load`` runs one thread per client; each holds an MCP session over HTTPS (through the node it
is given, or round robin over several) and calls ``echo`` with a message of its own, unique
per call, paced by ``pace`` seconds between calls.  Each answer is classified:

* ``ok``: a result with the echoed text;
* ``lost``: 404 for the session (the spec says: initialize again, which the client then does);
* ``error``: anything else (its status and the start of its body are kept).

After a fault, ``check_audit`` asserts what issue 21 asks of every scenario: every call answered
OK is in the audit log exactly once, with a successful outcome and a duration, and no row of
any call is left without an outcome. ``check_failures`` asserts that only the clients the
fault touched failed, and how; ``recovery`` says how long after a moment the first OK answer of
every affected client came.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.integration.conftest import Node
from tests.integration.mcp_https import McpOverHttps

#: Seconds a scenario waits for the audit log to hold every OK call (the spool may be draining).
AUDIT_DEADLINE = 60.0

#: Config for every node of the suite: calls cut off by a fault are completed as "outcome
#: unknown" within seconds (decision 0038), not after the default hour.
SHORT_UNKNOWN_OUTCOME = "audit:\n  unknown_outcome_after: 3s\n"


@dataclass
class Call:
    client: str
    message: str
    at: float
    outcome: str  # ok | lost | error
    status: int = 0
    detail: str = ""


@dataclass
class Client:
    name: str
    via: Sequence[Any]
    calls: list[Call] = field(default_factory=list)
    sessions: list[str] = field(default_factory=list)


class Load:
    """``clients`` MCP clients calling ``echo`` until ``stop``; see the module doc."""

    def __init__(
        self,
        ca: Path,
        token_of: Callable[[str], str],
        clients: Mapping[str, Sequence[Any]],
        *,
        app: str,
        pace: float = 0.02,
    ) -> None:
        self.ca, self.token_of, self.app, self.pace = ca, token_of, app, pace
        self.clients = {name: Client(name, via) for name, via in clients.items()}
        #: Makes every message of this load unique in an audit log other loads wrote to too.
        self.run = uuid.uuid4().hex[:8]
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(c,), daemon=True) for c in self.clients.values()
        ]
        self._ready = threading.Barrier(len(self._threads) + 1)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        try:
            self._ready.wait(timeout=60)
        except threading.BrokenBarrierError:
            self.stop()
            raise AssertionError(f"the clients could not all start a session: {self.summary()}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def calls(self, outcome: str | None = None) -> list[Call]:
        return [c for cl in self.clients.values() for c in cl.calls if outcome in (None, c.outcome)]

    def ok_count(self) -> int:
        return len(self.calls("ok"))

    def wait_for_calls(self, n: int, deadline: float = 30.0) -> None:
        """Until ``n`` more OK answers than now have come (the load is really running)."""
        want, end = self.ok_count() + n, time.monotonic() + deadline
        while self.ok_count() < want:
            if time.monotonic() > end:
                raise AssertionError(f"the load made no progress: {self.summary()}")
            self._stop.wait(0.05)

    def wait_for_recovery(self, names: Collection[str], since: float, deadline: float = 60.0) -> None:
        """Until each client of ``names`` has failed since ``since`` and had an OK answer after."""
        end = time.monotonic() + deadline
        while not all(self._back(self.clients[n], since) for n in names):
            if time.monotonic() > end:
                raise AssertionError(f"clients {sorted(names)} did not fail and recover: {self.summary()}")
            self._stop.wait(0.05)

    @staticmethod
    def _back(cl: Client, since: float) -> bool:
        calls = list(cl.calls)  # appended to by the client's thread meanwhile
        failed = [c.at for c in calls if c.at >= since and c.outcome != "ok"]
        return bool(failed) and calls[-1].outcome == "ok" and calls[-1].at > failed[-1]

    def check_failures(self, theirs: Collection[str], statuses: Collection[int]) -> None:
        """The clients ``theirs`` failed only with ``statuses`` (0: no HTTP answer), the last
        time with 404, and went on in a new session; no other client failed."""
        for cl in self.clients.values():
            bad = [x for x in cl.calls if x.outcome != "ok"]
            if cl.name in theirs:
                assert {x.status for x in bad} <= set(statuses), (cl.name, bad[:3])
                assert bad and bad[-1].status == 404, (cl.name, bad[-3:])
                assert len(cl.sessions) > 1, (cl.name, "no new session after the 404")
            else:
                assert not bad, f"{cl.name}'s session was not touched by the fault, yet it failed: {bad[:3]}"

    def summary(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for cl in self.clients.values():
            counts = out.setdefault(cl.name, {"ok": 0, "lost": 0, "error": 0})
            for c in cl.calls:
                counts[c.outcome] += 1
        return out

    def recovery(self, since: float) -> float:
        """Seconds from ``since`` until every client that failed after it had an OK answer again."""
        worst = 0.0
        for cl in self.clients.values():
            failed = [c for c in cl.calls if c.at >= since and c.outcome != "ok"]
            if not failed:
                continue
            back = [c.at for c in cl.calls if c.at > failed[-1].at and c.outcome == "ok"]
            assert back, f"client {cl.name} never recovered: last failure {failed[-1]}"
            worst = max(worst, back[0] - since)
        return worst

    # ------------------------------------------------------------------ the clients

    def _run(self, cl: Client) -> None:
        mcp = McpOverHttps(self.ca, self.token_of(cl.name), app=self.app)
        first = True
        n = 0
        try:
            while not self._stop.is_set():
                where = cl.via[n % len(cl.via)]
                if not mcp.sid:
                    if not self._start(mcp, cl, where):
                        if first:
                            cl.calls.append(Call(cl.name, "", time.monotonic(), "error", 0, "no session"))
                            self._ready.abort()  # the scenario fails at once, saying so
                            return
                        self._stop.wait(0.2)  # pacing retries while the fault lasts
                        continue
                    if first:
                        first = False
                        self._ready.wait(timeout=60)
                n += 1
                self._call(mcp, cl, where, f"{self.run}-{cl.name}-{n}")
                self._stop.wait(self.pace)
        finally:
            if mcp.sid:  # end the session, as a client that is done does (its upstream stops)
                with contextlib.suppress(httpx.HTTPError):
                    mcp.http.delete(mcp.url(cl.via[0]), headers={"Mcp-Session-Id": mcp.sid})
            mcp.close()

    def _start(self, mcp: McpOverHttps, cl: Client, where: Any) -> bool:
        mcp.sid = ""
        try:
            mcp.start(where)
        except (AssertionError, httpx.HTTPError, KeyError, ValueError):
            mcp.sid = ""
            return False
        cl.sessions.append(mcp.sid)
        return True

    def _call(self, mcp: McpOverHttps, cl: Client, where: Any, message: str) -> None:
        mcp.n += 1
        body = {
            "jsonrpc": "2.0",
            "id": mcp.n,
            "method": "tools/call",
            "params": {"name": "echo", "arguments": {"message": message}},
        }
        at = time.monotonic()
        try:
            r = mcp.post(where, body)
        except httpx.HTTPError as e:
            cl.calls.append(Call(cl.name, message, at, "error", 0, type(e).__name__))
            return
        if r.status_code == 404:
            cl.calls.append(Call(cl.name, message, at, "lost", 404, r.text[:200]))
            mcp.sid = ""
            return
        answer = _answer(r, mcp.n) if r.status_code == 200 else None
        text = ((answer or {}).get("result") or {}).get("content", [{}])[0].get("text")
        if text == f"Echo: {message}":
            cl.calls.append(Call(cl.name, message, at, "ok", 200))
        else:
            cl.calls.append(Call(cl.name, message, at, "error", r.status_code, r.text[:200]))


def _answer(r: httpx.Response, rid: int) -> dict[str, Any] | None:
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        for line in r.text.splitlines():
            if line.startswith("data:"):
                msg = json.loads(line[5:])
                if msg.get("id") == rid:
                    return dict(msg)
        return None
    return dict(r.json())


def enrol(node: Node, users: Sequence[str], ca: Path) -> dict[str, str]:
    """Add ``users`` (role mcp-user) through ``node``, write the cluster's CA to ``ca`` and
    return each user's bearer token."""
    for u in users:
        node.cli("users", "add", u, "--roles=mcp-user", local=True)
    ca.write_text(node.cli("auth", "export", local=True).stdout)
    return {
        u: node.cli("auth", "sign", f"--user={u}", "--format=token", local=True).stdout.strip() for u in users
    }


def report(what: str, load: Load, recovery: float) -> None:
    """The line docs/reliability.md's figures come from (run with ``-s`` to see it)."""
    print(f"\n[fault] {what}: calls {load.summary()}; recovered in {recovery:.2f} s")


def audited_echoes(node: Node) -> dict[str, list[dict[str, Any]]]:
    """Every audited ``echo`` call, by its message."""
    out = node.cli(
        "audit",
        "search",
        "--type=mcp.session.request",
        "--format=json",
        "--limit=100000",
        "--order=asc",
        local=True,
    )
    rows: dict[str, list[dict[str, Any]]] = {}
    for r in json.loads(out.stdout):
        if r.get("tool") == "echo":
            msg = ((r.get("params") or {}).get("arguments") or {}).get("message")
            rows.setdefault(str(msg), []).append(r)
    return rows


def check_audit(node: Node, load: Load, *, failures_failed: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Every OK call audited exactly once with a successful outcome; no row without an outcome.

    Never "outcome unknown" for an OK call, whatever was killed: a call is answered only once
    its outcome is durable (decision 0040). Calls a fault cut off (not OK) may read so.

    ``failures_failed``: also, every call answered with an error that has a row is audited as
    failed (not where a fault cuts the client off from a call that may still succeed behind it).
    """
    ok = {c.message for c in load.calls("ok")}
    end = time.monotonic() + AUDIT_DEADLINE

    def pending(rows: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
        mine = [r for m, rs in rows.items() if m.startswith(load.run) for r in rs]
        return [r for r in mine if r["success"] and r.get("duration_ms") is None]

    # Wait for the spool to drain, and for calls cut off by the fault to be completed as
    # "outcome unknown" (the cluster's audit.unknown_outcome_after is short here).
    while True:
        rows = audited_echoes(node)
        missing = ok - set(rows)
        if (not missing and not pending(rows)) or time.monotonic() > end:
            break
    assert not missing, f"{len(missing)} OK calls not audited, e.g. {sorted(missing)[:5]}"
    twice = {m: r for m, r in rows.items() if m in ok and len(r) != 1}
    assert not twice, f"OK calls audited more than once: {list(twice.items())[:3]}"
    wrong = {
        m: r[0]
        for m, r in rows.items()
        if m in ok and not (r[0]["success"] and r[0].get("duration_ms") is not None)
    }
    assert not wrong, f"OK calls audited without a successful outcome: {list(wrong.items())[:3]}"
    left = pending(rows)
    assert not left, f"rows left without an outcome (they read as successes): {left[:3]}"
    if failures_failed:
        failed = {c.message for c in load.calls() if c.outcome != "ok"}
        passed = [r for m in failed for r in rows.get(m, []) if r["success"]]
        assert not passed, f"calls answered with an error audited as successes: {passed[:3]}"
    return rows
