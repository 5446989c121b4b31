"""The audit exporter on real gateways (decision 0035), and `audit search`/`tail` as users run them.

- The file exporter, with the gateway SIGKILLed twice during a run of MCP calls, ends with every
  audited event at least once, each session's calls in order, and their outcomes.
- An HTTP exporter pointed at a port nobody listens on: every call answers, the backlog shows in
  the metrics, and when a receiver listens on that port the backlog is delivered.
- `audit search --tool/--outcome/--all` and `audit tail` on the data dir and through the proxy.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.integration.conftest import Node, bastion_cmd, start_node, stop_node, wait_for_log
from tests.integration.test_audit_chain import DEMO, some_calls
from tests.integration.test_failures import Client


async def until(what: str, check: Callable[[], bool], deadline: float = 30.0) -> None:
    """Wait for ``check`` with a deadline, letting the loop run (calls, the receiver) meanwhile."""
    end = time.monotonic() + deadline
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {deadline}s")
        await asyncio.sleep(0.05)  # polling a condition, bounded by the deadline


def stored(node: Node) -> list[dict[str, Any]]:
    """Every stored event, oldest first (streamed as JSON lines)."""
    out = node.cli("audit", "search", "--all", "--order=asc", local=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def exported_lines(path: Path) -> list[dict[str, Any]]:
    """The exported events, in the order written: rotated files (oldest first), then the file."""
    rotated = sorted(path.parent.glob(path.name + ".*"), key=lambda p: -int(p.suffix[1:]))
    return [json.loads(line) for f in [*rotated, path] if f.exists() for line in f.read_text().splitlines()]


async def sequential_calls(node: Node, sessions: int, stop: asyncio.Event, answered: list[int]) -> None:
    """``sessions`` clients calling one at a time each (counted in ``answered[0]``) until ``stop``
    or the gateway dies."""

    async def one() -> None:
        client = Client(node, "bastion-demo")
        try:
            await client.start()
            while not stop.is_set():
                r = await client.call("bastion_user_info")
                assert r.status_code == 200, r.text
                answered[0] += 1
        except httpx.HTTPError:
            return  # the gateway was killed
        finally:
            await client.aclose()

    await asyncio.gather(*(one() for _ in range(sessions)))


async def test_file_export_survives_two_sigkills(tmp_path: Path) -> None:
    out = tmp_path / "export" / "audit.jsonl"
    config = DEMO + (
        f"audit:\n  export:\n    hold: 1s\n"
        f"    file:\n      path: {out}\n      max_bytes: 65536\n      keep: 1000\n"
    )
    node = start_node(tmp_path, extra_config=config)
    node.cli("users", "add", "alice", "--roles=mcp-user", local=True)
    try:
        for round_ in range(3):
            stop, answered = asyncio.Event(), [0]
            calls = asyncio.create_task(sequential_calls(node, 4, stop, answered))
            await until("calls answered", lambda a=answered: a[0] >= 80, 60)  # type: ignore[misc]
            if round_ < 2:
                node.proc.send_signal(signal.SIGKILL)  # mid-run: calls in flight, a page half written
                node.proc.wait(timeout=10)
                await calls
                node = start_node(tmp_path, extra_config=config)
            else:
                stop.set()
                await calls
        events = stored(node)
        want = {e["id"] for e in events}
        await until("everything exported", lambda: want <= {e["id"] for e in exported_lines(out)}, 30)
    finally:
        stop_node(node)
    lines = exported_lines(out)
    assert len(list(out.parent.glob("audit.jsonl.*"))) >= 1  # it rotated
    first: dict[str, int] = {}
    for n, e in enumerate(lines):
        first.setdefault(e["id"], n)
    # Each session's calls (one at a time) in the order they were made.
    sessions: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        if e["event"] == "mcp.session.request" and e.get("method") == "tools/call":
            sessions.setdefault(e["session_id"], []).append(e)
    assert len(sessions) >= 12
    for calls_ in sessions.values():
        order = [first[e["id"]] for e in sorted(calls_, key=lambda e: e["time"])]
        assert order == sorted(order)
    # Outcomes reached the export: the last line of each completed call carries it.
    last = {e["id"]: e for e in lines}
    for e in events:
        if "duration_ms" in e:
            assert last[e["id"]].get("duration_ms") == e["duration_ms"], e["id"]


class Receiver:
    """A webhook on a socket bound before the gateway starts (so the port stays ours), listening
    only when told: until then, connections to it are refused."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.events: list[dict[str, Any]] = []
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def listen(self) -> None:
        self.server = await asyncio.start_server(self._serve, sock=self.sock)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
                body = await reader.readexactly(length)
                assert b"application/x-ndjson" in head.lower()
                self.events.extend(json.loads(line) for line in body.splitlines())
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in self.writers:
                w.close()
            await self.server.wait_closed()
        self.sock.close()


def backlog(diag: str) -> float:
    text = httpx.get(f"{diag}/metrics").text
    m = re.search(r'^bastion_audit_export_backlog\{sink="http"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else -1.0


async def test_http_export_to_a_dead_port_catches_up(tmp_path: Path) -> None:
    receiver = Receiver()
    config = DEMO + f"audit:\n  export:\n    http:\n      url: http://127.0.0.1:{receiver.port}/audit\n"
    node = start_node(tmp_path, extra_config=config, bastion_config='  diag_addr: "127.0.0.1:0"\n')
    try:
        diag = wait_for_log(node.log, r"diag listening addr=(http://[\d.]+:\d+)", node.proc, 10).group(1)
        await some_calls(node, 40)  # each asserts its 200: a dead endpoint fails no call
        await until("a backlog", lambda: backlog(diag) > 0, 30)
        assert receiver.events == []
        await receiver.listen()
        want = {e["id"] for e in stored(node)}
        await until("delivered", lambda: want <= {e["id"] for e in receiver.events}, 60)
        await until("no backlog", lambda: backlog(diag) == 0, 30)
        assert "audit export failed; retrying" in node.log.read_text()
    finally:
        stop_node(node)
        await receiver.aclose()


async def test_search_filters_and_tail_on_both_paths(tmp_path: Path) -> None:
    node = start_node(tmp_path, extra_config=DEMO)
    try:
        await some_calls(node, 5)
        node.cli("users", "add", "ed", "--roles=editor", local=True)
        ident = tmp_path / "ed.id"
        node.cli("auth", "sign", "--user=ed", f"--out={ident}", local=True)
        home = tmp_path / "remote-home"
        ways: list[dict[str, Any]] = [{"local": True}, {"home": home}]
        for way in ways:
            extra = () if way.get("local") else ("-i", str(ident))

            def cli(*args: str, way: dict[str, Any] = way, extra: tuple[str, ...] = extra) -> str:
                return node.cli(*args, *extra, **way).stdout

            calls = json.loads(cli("audit", "search", "--format=json", "--tool=bastion_user_info"))
            assert len(calls) == 5 and all(e["tool"] == "bastion_user_info" for e in calls)
            assert json.loads(cli("audit", "search", "--format=json", "--outcome=failure", "--tool=x")) == []
            every = [json.loads(line) for line in cli("audit", "search", "--all").splitlines()]
            assert len(every) > 5 and every[0]["time"] >= every[-1]["time"]  # newest first
            tail = [json.loads(line) for line in cli("audit", "tail", "-n", "3").splitlines()]
            assert len(tail) == 3
        # -f follows what comes next, until interrupted.
        env_config = {"BASTION_CONFIG": str(node.config), "BASTION_HOME": str(tmp_path / "home")}
        follower = await asyncio.create_subprocess_exec(
            *bastion_cmd("audit", "tail", "-f", "-n", "0"),
            stdout=asyncio.subprocess.PIPE,
            env={**_clean_env(), **env_config},
        )
        try:
            await some_calls(node, 3, add_user=False)
            assert follower.stdout is not None
            seen: list[dict[str, Any]] = []
            async with asyncio.timeout(30):
                while sum(1 for e in seen if e.get("tool") == "bastion_user_info") < 3:
                    seen.append(json.loads(await follower.stdout.readline()))
        finally:
            follower.send_signal(signal.SIGINT)
            async with asyncio.timeout(10):
                assert await follower.wait() == 130
    finally:
        stop_node(node)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
