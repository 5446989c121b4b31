"""The stdio upstream against real child processes: framing, environment, users, exit, shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pwd
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from bastion.errors import HostConfigError, UpstreamError
from bastion.resources import MCPCommand
from bastion.transport import UpstreamClosedError, stdio
from bastion.transport.stdio import StdioUpstream, spawn_stdio

IS_ROOT = os.geteuid() == 0
#: What the gateway under test must say to be allowed to run a server (see the root policy).
RUN_AS = "root" if IS_ROOT else ""
DEADLINE = 10.0

# A tiny MCP-ish server: answers every request line with a result; a few methods script its behaviour.
SERVER = r"""
import json, os, signal, subprocess, sys, time

mode = sys.argv[1] if len(sys.argv) > 1 else "echo"
if mode == "ignore-sigint":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
elif mode == "exit-on-sigint":
    signal.signal(signal.SIGINT, lambda *_: os._exit(7))
print("echo server ready", file=sys.stderr, flush=True)

def reply(msg, result):
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": msg.get("id"), "result": result}) + "\n")
    sys.stdout.flush()

for line in sys.stdin:
    msg = json.loads(line)
    method = msg.get("method")
    if method == "env":
        reply(msg, {k: os.environ.get(k) for k in msg["params"]["names"]} | {"cwd": os.getcwd()})
    elif method == "exit":
        print("exiting as asked", file=sys.stderr, flush=True)
        sys.exit(msg["params"]["code"])
    elif method == "garbage":
        sys.stdout.write("x" * msg["params"]["size"] + "\n")
        sys.stdout.flush()
    elif method == "spawn":
        child = subprocess.Popen(["sleep", "600"])
        reply(msg, {"pid": child.pid})
    elif method == "burst":
        for i in range(msg["params"]["count"]):
            reply({"id": i}, {"n": i})
        sys.exit(0)
    elif method == "orphan-then-exit":
        child = subprocess.Popen(["sleep", "600"], start_new_session=True)  # keeps our stdout open
        reply(msg, {"pid": child.pid})
        sys.exit(5)
    elif method == "noise":
        sys.stdout.write("\n\n   \n")
        reply(msg, {"after": "blank lines"})
    else:
        reply(msg, {})

if mode in ("ignore-sigint", "exit-on-sigint"):
    while True:  # outlive stdin's EOF so that only the signal (or SIGKILL) ends us
        time.sleep(1)
"""


@pytest.fixture
def server(tmp_path: Path) -> Path:
    path = tmp_path / "server.py"
    path.write_text(SERVER)
    return path


def _cmd(server: Path, *args: str, env: dict[str, str] | None = None) -> MCPCommand:
    return MCPCommand(
        command=sys.executable, args=[str(server), *args], run_as_host_user=RUN_AS, env=env or {}
    )


def _request(method: str, id: int = 1, **params: object) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).encode()


async def _call(up: StdioUpstream, method: str, id: int = 1, **params: object) -> dict[str, object]:
    await up.send(_request(method, id, **params))
    async with asyncio.timeout(DEADLINE):
        reply = json.loads(await up.receive())
    assert reply["id"] == id
    result: dict[str, object] = reply["result"]
    return result


async def _eventually(pred: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    """Wait for ``pred`` to hold, checking it between short yields, up to ``deadline``."""
    end = time.monotonic() + deadline
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)  # polling a condition, bounded by the deadline


def _state(pid: int) -> str | None:
    """The process state letter from /proc (``Z`` for a zombie), or None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


@pytest.fixture
async def upstreams() -> AsyncIterator[list[StdioUpstream]]:
    """Upstreams to close whatever the test did (aclose is idempotent)."""
    started: list[StdioUpstream] = []
    try:
        yield started
    finally:
        for up in started:
            await up.aclose()


async def _spawn(
    upstreams: list[StdioUpstream], cmd: MCPCommand, *, grace: float = 5.0, max_message: int = 1 << 20
) -> StdioUpstream:
    up = await spawn_stdio(cmd, name="echo", grace=grace, max_message=max_message)
    upstreams.append(up)
    return up


async def test_round_trip(server: Path, upstreams: list[StdioUpstream]) -> None:
    up = await _spawn(upstreams, _cmd(server))
    assert up.upstream_session_id == ""
    for i in range(1, 20):
        assert await _call(up, "ping", id=i) == {}
    # Blank lines between messages are skipped, not handed on.
    assert await _call(up, "noise", id=99) == {"after": "blank lines"}


async def test_environment_is_minimal_plus_app_env(
    server: Path, upstreams: list[StdioUpstream], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BASTION_TEST_SECRET", "do-not-leak")
    up = await _spawn(upstreams, _cmd(server, env={"APP_VAR": "hello", "LANG": "C"}))
    env = await _call(up, "env", names=["APP_VAR", "BASTION_TEST_SECRET", "PATH", "HOME", "LANG", "USER"])
    assert env["APP_VAR"] == "hello"
    assert env["BASTION_TEST_SECRET"] is None
    assert env["PATH"] == os.environ["PATH"]
    assert env["LANG"] == "C"  # the app's env wins over the base
    me = pwd.getpwuid(os.geteuid())
    assert env["HOME"] == me.pw_dir
    assert env["USER"] == me.pw_name


async def test_stderr_is_logged(
    server: Path, upstreams: list[StdioUpstream], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bastion.upstream.stdio")
    up = await _spawn(upstreams, _cmd(server))

    def logged() -> bool:
        return any(
            r.getMessage() == "stderr: echo server ready" and getattr(r, "app", None) == "echo"
            for r in caplog.records
        )

    await _eventually(logged, "the stderr line in the log")
    rec = next(r for r in caplog.records if r.getMessage() == "stderr: echo server ready")
    assert rec.levelno == logging.INFO
    assert getattr(rec, "pid", None) == up.pid


async def test_exit_is_reported_with_code(server: Path, upstreams: list[StdioUpstream]) -> None:
    up = await _spawn(upstreams, _cmd(server))
    await up.send(_request("exit", code=3))
    with pytest.raises(UpstreamClosedError, match="exited with code 3; see the gateway log"):
        async with asyncio.timeout(DEADLINE):
            await up.receive()
    assert up.exit_code == 3
    # The end is sticky, and sending to a dead server says so.
    with pytest.raises(UpstreamClosedError, match="code 3"):
        await up.receive()
    with pytest.raises(UpstreamClosedError, match="code 3"):
        await up.send(_request("ping"))


async def test_backlog_is_delivered_after_exit(
    server: Path, upstreams: list[StdioUpstream], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stdio, "_PIPE_DRAIN", 0.05)
    up = await _spawn(upstreams, _cmd(server))
    await up.send(_request("burst", count=2000))  # far more than the inbox and the pipe hold
    await _eventually(lambda: up.exit_code is not None, "the server to exit")
    await asyncio.sleep(0.5)  # a slow consumer: ten idle-check intervals pass before it reads
    async with asyncio.timeout(DEADLINE):
        for i in range(2000):
            assert json.loads(await up.receive())["id"] == i
        with pytest.raises(UpstreamClosedError, match="code 0"):
            await up.receive()


async def test_exit_is_reported_while_an_orphan_holds_stdout(
    server: Path, upstreams: list[StdioUpstream], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stdio, "_PIPE_DRAIN", 0.05)
    up = await _spawn(upstreams, _cmd(server))
    orphan = await _call(up, "orphan-then-exit")
    pid = orphan["pid"]
    assert isinstance(pid, int)
    try:
        with pytest.raises(UpstreamClosedError, match="exited with code 5"):
            async with asyncio.timeout(DEADLINE):
                await up.receive()
    finally:
        os.kill(pid, signal.SIGKILL)  # it left our process group on purpose: not aclose's to stop


async def test_oversized_line_is_an_upstream_error(server: Path, upstreams: list[StdioUpstream]) -> None:
    up = await _spawn(upstreams, _cmd(server), max_message=1024)
    assert await _call(up, "ping") == {}
    await up.send(_request("garbage", size=100_000))
    with pytest.raises(UpstreamError, match="larger than 1024 bytes") as exc:
        async with asyncio.timeout(DEADLINE):
            await up.receive()
    assert not isinstance(exc.value, UpstreamClosedError)
    assert exc.value.origin == "upstream"
    await up.aclose()
    with pytest.raises(UpstreamClosedError, match="closed by the gateway"):
        await up.receive()


async def test_line_at_the_limit_passes(server: Path, upstreams: list[StdioUpstream]) -> None:
    up = await _spawn(upstreams, _cmd(server), max_message=4096)
    await up.send(_request("garbage", size=4096))
    async with asyncio.timeout(DEADLINE):
        assert await up.receive() == b"x" * 4096


async def test_command_not_found() -> None:
    cmd = MCPCommand(command="bastion-no-such-command-xyz", run_as_host_user=RUN_AS)
    with pytest.raises(HostConfigError, match=r'"bastion-no-such-command-xyz": command not found'):
        await spawn_stdio(cmd, name="missing")


async def test_command_not_executable(tmp_path: Path) -> None:
    script = tmp_path / "not-executable.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    cmd = MCPCommand(command=str(script), run_as_host_user=RUN_AS)
    with pytest.raises(HostConfigError, match="not executable") as exc:
        await spawn_stdio(cmd, name="noexec")
    assert str(script) in str(exc.value)


async def test_unknown_user() -> None:
    cmd = MCPCommand(command="true", run_as_host_user="bastion-no-such-user")
    with pytest.raises(HostConfigError, match='"bastion-no-such-user" is not a user on this host'):
        await spawn_stdio(cmd, name="who")


async def test_aclose_kills_a_server_that_ignores_sigint(
    server: Path, upstreams: list[StdioUpstream]
) -> None:
    up = await _spawn(upstreams, _cmd(server, "ignore-sigint"), grace=0.5)
    assert await _call(up, "ping") == {}  # its SIGINT handler is installed by now
    started = time.monotonic()
    await up.aclose()
    elapsed = time.monotonic() - started
    assert up.exit_code == -9
    assert 0.5 <= elapsed < 5
    assert _state(up.pid) is None  # reaped: no zombie left
    with pytest.raises(ChildProcessError):
        os.waitpid(up.pid, os.WNOHANG)  # noqa: ASYNC222 (WNOHANG: never blocks)
    with pytest.raises(UpstreamClosedError, match="closed by the gateway"):
        await up.receive()
    with pytest.raises(UpstreamClosedError):
        await up.send(_request("ping"))
    await up.aclose()  # idempotent


async def test_aclose_stops_a_server_on_sigint(server: Path, upstreams: list[StdioUpstream]) -> None:
    up = await _spawn(upstreams, _cmd(server, "exit-on-sigint"), grace=10)
    assert await _call(up, "ping") == {}
    started = time.monotonic()
    await asyncio.gather(up.aclose(), up.aclose())  # concurrent closes share one shutdown
    assert time.monotonic() - started < 5  # well inside the grace: SIGINT did it
    assert up.exit_code == 7
    assert _state(up.pid) is None


async def test_aclose_wakes_a_pending_receive(server: Path, upstreams: list[StdioUpstream]) -> None:
    up = await _spawn(upstreams, _cmd(server))
    pending = asyncio.create_task(up.receive(), name="pending-receive")
    await asyncio.sleep(0)  # let it start waiting
    await up.aclose()
    with pytest.raises(UpstreamClosedError):
        async with asyncio.timeout(DEADLINE):
            await pending


async def test_aclose_stops_the_whole_process_group(server: Path, upstreams: list[StdioUpstream]) -> None:
    up = await _spawn(upstreams, _cmd(server, "ignore-sigint"), grace=0.5)
    grandchild = await _call(up, "spawn")
    pid = grandchild["pid"]
    assert isinstance(pid, int)
    assert _state(pid) not in (None, "Z")
    await up.aclose()
    # Orphaned, it is reaped by whatever adopts it; gone or a zombie both mean it is dead.
    await _eventually(lambda: _state(pid) in (None, "Z"), "the grandchild to die")


@pytest.mark.skipif(not IS_ROOT, reason="the root policy applies only to a gateway running as root")
async def test_root_without_run_as_host_user_is_refused(server: Path) -> None:
    cmd = MCPCommand(command=sys.executable, args=[str(server)])
    with pytest.raises(
        HostConfigError,
        match=re.escape("app echo: refusing to run a stdio server as root; set mcp.run_as_host_user"),
    ):
        await spawn_stdio(cmd, name="echo")


@pytest.mark.skipif(not IS_ROOT, reason="switching users needs root")
async def test_run_as_host_user(upstreams: list[StdioUpstream]) -> None:
    nobody = pwd.getpwnam("nobody")
    # /bin/sh, not this test's Python: the interpreter and tmp_path may be unreadable to nobody.
    script = (
        "read line; "
        "printf '"
        '{"jsonrpc":"2.0","id":1,"result":{"uid":%s,"gid":%s,"home":"%s","user":"%s","cwd":"%s"}}'
        "\\n' "
        '"$(id -u)" "$(id -g)" "$HOME" "$USER" "$(pwd)"; '
        "read line"
    )
    up = await _spawn(
        upstreams, MCPCommand(command="/bin/sh", args=["-c", script], run_as_host_user="nobody")
    )
    result = await _call(up, "whoami")
    assert result["uid"] == nobody.pw_uid
    assert result["gid"] == nobody.pw_gid
    assert result["home"] == nobody.pw_dir
    assert result["user"] == "nobody"
    assert result["cwd"] == (nobody.pw_dir if os.path.isdir(nobody.pw_dir) else "/")


# ------------------------------------------------------------------ uvloop (what `bastion start` runs on)


def test_under_uvloop(server: Path) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        up = await spawn_stdio(_cmd(server, "ignore-sigint"), name="echo", grace=0.3)
        try:
            assert await _call(up, "ping") == {}
            await up.aclose()
            assert up.exit_code == -9
            assert _state(up.pid) is None
        finally:
            await up.aclose()
        up = await spawn_stdio(_cmd(server), name="echo")
        try:
            await up.send(_request("exit", code=4))
            with pytest.raises(UpstreamClosedError, match="code 4"):
                async with asyncio.timeout(DEADLINE):
                    await up.receive()
        finally:
            await up.aclose()
        if IS_ROOT:  # uvloop's own subprocess support cannot switch users; ours must
            script = 'read line; echo "{\\"uid\\":$(id -u)}"; read line'
            up = await spawn_stdio(
                MCPCommand(command="/bin/sh", args=["-c", script], run_as_host_user="nobody"), name="sh"
            )
            try:
                await up.send(_request("whoami"))
                async with asyncio.timeout(DEADLINE):
                    assert json.loads(await up.receive()) == {"uid": pwd.getpwnam("nobody").pw_uid}
            finally:
                await up.aclose()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
