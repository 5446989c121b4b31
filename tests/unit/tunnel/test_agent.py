"""The agent's heartbeat loop over a real tunnel (two ``Mux`` ends on loopback).

The proxy's end is scripted: it answers heartbeats when the test lets it, so the
interleaving that used to lose a wake-up is forced, not hoped for.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from bastion.appservice.registry import AppRegistry
from bastion.resources import App
from bastion.tunnel import agent as agent_mod
from bastion.tunnel import wire
from bastion.tunnel.agent import Agent, HostCreds
from bastion.tunnel.mux import Stream
from tests.unit.tunnel.test_mux import mux_pair, read_all


def _app(name: str) -> App:
    return App.model_validate({"metadata": {"name": name}, "spec": {"uri": "mcp+http://10.0.0.1/mcp"}})


def _agent(tmp_path: Path, registry: AppRegistry) -> Agent:
    creds = HostCreds("host-1", "c", "h", b"", b"", b"", datetime.now(UTC))
    return Agent(creds, tmp_path, "127.0.0.1:1", registry)


class ScriptedProxy:
    """The proxy's end: records each heartbeat's apps; answers only when ``release`` is set."""

    def __init__(self) -> None:
        self.beats: list[list[str]] = []
        self.release = asyncio.Event()
        self.got = asyncio.Condition()

    async def __call__(self, stream: Stream) -> None:
        assert stream.header == {"kind": "rpc", "method": "heartbeat"}
        doc: dict[str, Any] = orjson.loads(await read_all(stream))
        async with self.got:
            self.beats.append(sorted(wire.app_from_wire(d).metadata.name for d in doc["apps"]))
            self.got.notify_all()
        await self.release.wait()
        await stream.send(orjson.dumps({"result": {"proxies": [], "refused": []}}))
        await stream.end()

    async def wait_beats(self, n: int) -> list[list[str]]:
        async with asyncio.timeout(10), self.got:
            await self.got.wait_for(lambda: len(self.beats) >= n)
        return self.beats


async def test_a_change_while_a_heartbeat_is_in_flight_is_told_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """apps_changed() between building a heartbeat and its answer: the next beat follows at
    once with the new apps.  The periodic beat is pushed out of reach, so only the wake-up can
    bring it (before the fix, ``clear()`` after the answer dropped it)."""
    monkeypatch.setattr(agent_mod, "HEARTBEAT_EVERY", 3600.0)
    registry = AppRegistry([_app("old")])
    agent = _agent(tmp_path, registry)
    proxy = ScriptedProxy()
    async with mux_pair(server_handler=proxy) as (client, _server):
        loop = asyncio.create_task(agent._heartbeat_loop(client), name="heartbeat-under-test")
        try:
            # Beat 1 is built from the old list and is now in flight, unanswered.
            assert await proxy.wait_beats(1) == [["old"]]
            registry.set_dynamic(_app("new"))
            agent.apps_changed()
            proxy.release.set()  # beat 1 answered only now, after the change
            beats = await proxy.wait_beats(2)
            assert beats[1] == ["new", "old"], "the change made during beat 1 was not told"
            assert agent.connected.is_set()
        finally:
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)


async def test_changes_without_a_beat_in_flight_are_told_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ordinary case still works: a change while the loop waits wakes it."""
    monkeypatch.setattr(agent_mod, "HEARTBEAT_EVERY", 3600.0)
    registry = AppRegistry([_app("old")])
    agent = _agent(tmp_path, registry)
    proxy = ScriptedProxy()
    proxy.release.set()
    async with mux_pair(server_handler=proxy) as (client, _server):
        loop = asyncio.create_task(agent._heartbeat_loop(client), name="heartbeat-under-test")
        try:
            await proxy.wait_beats(1)
            async with asyncio.timeout(10):
                await agent.connected.wait()  # beat 1 answered: the loop is waiting now
            registry.set_dynamic(_app("new"))
            agent.apps_changed()
            assert (await proxy.wait_beats(2))[1] == ["new", "old"]
        finally:
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)
