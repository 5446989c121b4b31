"""The host's limits at the transports: rlimits and slot release of stdio children, guarded dials."""

from __future__ import annotations

import asyncio
import os
import pwd

import pytest

from bastion.errors import HostConfigError, UpstreamError
from bastion.resources import MCPCommand
from bastion.transport.guard import AddressGuard, ForbiddenAddressError
from bastion.transport.http import HTTPUpstreamPool
from bastion.transport.sse import connect_sse
from bastion.transport.stdio import spawn_stdio

LIMITS = "grep -E '^Max (open files|data size|cpu time|core file size)' /proc/self/limits; sleep 30"


def _me() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


async def test_stdio_child_gets_rlimits_and_releases_its_slot_once() -> None:
    import resource

    released: list[int] = []
    cmd = MCPCommand(command="/bin/sh", args=["-c", LIMITS], run_as_host_user=_me())
    up = await spawn_stdio(
        cmd,
        name="limits",
        grace=0.5,
        rlimits=[(resource.RLIMIT_NOFILE, 100), (resource.RLIMIT_DATA, 1 << 30), (resource.RLIMIT_CPU, 60)],
        on_close=lambda: released.append(1),
    )
    try:
        lines = [(await asyncio.wait_for(up.receive(), 10)).decode() for _ in range(4)]
    finally:
        await up.aclose()
        await up.aclose()
    got = {line[:26].strip(): line[26:47].strip() for line in lines}
    assert got == {
        "Max cpu time": "60",
        "Max core file size": "0",
        "Max open files": "100",
        "Max data size": str(1 << 30),
    }
    assert released == [1]


async def test_stdio_slot_released_when_the_server_cannot_start() -> None:
    released: list[int] = []
    cmd = MCPCommand(command="/nonexistent/server", run_as_host_user=_me())
    with pytest.raises(HostConfigError, match="command not found"):
        await spawn_stdio(cmd, name="missing", on_close=lambda: released.append(1))
    assert released == [1]


async def _listener() -> tuple[asyncio.Server, int, list[int]]:
    accepted: list[int] = []

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.append(1)
        w.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], accepted


async def test_http_pool_with_a_guard_never_connects_to_a_refused_address() -> None:
    server, port, accepted = await _listener()
    async with server:
        pool = HTTPUpstreamPool(f"http://localhost:{port}", guard=AddressGuard.from_entries(["10.0.0.0/8"]))
        try:
            with pytest.raises(ForbiddenAddressError, match="loopback"):
                await pool.request("POST", "/mcp", [], b"{}")
        finally:
            await pool.aclose()
    assert accepted == []


async def test_sse_with_a_guard_never_connects_to_a_refused_address() -> None:
    server, port, accepted = await _listener()
    guard = AddressGuard.from_entries(["127.0.0.1/32"])
    guard.add_listener("127.0.0.1", port)  # as if it were the gateway's own listener
    async with server:
        with pytest.raises(ForbiddenAddressError, match="own listeners"):
            await connect_sse(f"http://localhost:{port}/sse", headers={}, verify=True, guard=guard)
    assert accepted == []


async def test_sse_with_a_guard_dials_an_allowed_address() -> None:
    server, port, accepted = await _listener()
    async with server:
        with pytest.raises(UpstreamError) as e:  # the listener hangs up: but it was reached
            await connect_sse(
                f"http://127.0.0.1:{port}/sse",
                headers={},
                verify=True,
                guard=AddressGuard.from_entries(["127.0.0.1/32"]),
            )
        assert not isinstance(e.value, ForbiddenAddressError)
    assert accepted == [1]
