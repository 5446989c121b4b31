"""Whether this host can run a stdio app as written: checked against a made-up host (no I/O)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from bastion.appservice.hostcheck import Host, check_static_apps, stdio_problem
from bastion.appservice.hostpolicy import HostPolicy
from bastion.config import AppService, DynamicAppsPolicy, StdioLimits
from bastion.errors import ConfigError
from bastion.resources import App, MCPCommand

EXE = stat.S_IFREG | 0o755
USERS = {"root": 0, "mcp": 1001, "bastion": 999}
FILES = {"/usr/bin/srv": EXE, "/usr/local/bin/tool": EXE, "/opt/plain": stat.S_IFREG | 0o644}
FILES |= {"/opt": stat.S_IFDIR | 0o755, "/bin/noexec-first": stat.S_IFREG | 0o644, "/usr/bin/tool": EXE}


def host(euid: int = 0, path: str = "/usr/local/bin:/usr/bin") -> Host:
    return Host(
        euid=euid,
        path=path,
        uid_of=USERS.get,
        name_of=lambda uid: {v: k for k, v in USERS.items()}.get(uid, str(uid)),
        mode_of=FILES.get,
    )


def cmd(command: str = "/usr/bin/srv", user: str = "mcp", env: dict[str, str] | None = None) -> MCPCommand:
    return MCPCommand(command=command, run_as_host_user=user, env=env or {})


def test_a_runnable_app_has_no_problem() -> None:
    assert stdio_problem(cmd(), host()) is None
    assert stdio_problem(cmd("tool"), host()) is None  # found on PATH
    assert stdio_problem(cmd(user="root"), host()) is None  # root, written
    assert stdio_problem(cmd(user=""), host(euid=999)) is None  # not root: runs as itself
    assert stdio_problem(cmd(user="bastion"), host(euid=999)) is None


def test_root_without_run_as_host_user() -> None:
    assert stdio_problem(cmd(user=""), host(euid=0)) == (
        "mcp.run_as_host_user",
        "required when bastion runs as root: name the host user the server runs as "
        "(write root only if you mean it)",
    )


def test_unknown_host_user() -> None:
    assert stdio_problem(cmd(user="ghost"), host()) == (
        "mcp.run_as_host_user",
        "'ghost' is not a user on this host",
    )


def test_another_user_without_root() -> None:
    assert stdio_problem(cmd(user="mcp"), host(euid=999)) == (
        "mcp.run_as_host_user",
        "cannot run the server as 'mcp': bastion runs as 'bastion' and only root can switch users",
    )


@pytest.mark.parametrize(
    ("command", "why"),
    [
        ("no-such-tool", "'no-such-tool' is not found on PATH ('/usr/local/bin:/usr/bin')"),
        ("/usr/bin/nope", "'/usr/bin/nope' does not exist"),
        ("/opt/plain", "'/opt/plain' is not executable"),
        ("/opt", "'/opt' is not a file"),
        ("noexec-first", "'/bin/noexec-first' is not executable"),
    ],
)
def test_commands_the_host_cannot_run(command: str, why: str) -> None:
    h = host(path="/bin:/usr/bin")
    if command == "no-such-tool":
        h = host()
    assert stdio_problem(cmd(command), h) == ("mcp.command", why)


def test_the_path_the_server_gets_is_searched() -> None:
    assert stdio_problem(cmd("srv", env={"PATH": "/usr/bin"}), host(path="/nowhere")) is None
    assert stdio_problem(cmd("srv"), host(path="/nowhere")) == (
        "mcp.command",
        "'srv' is not found on PATH ('/nowhere')",
    )


def _apps(*mcps: dict[str, object]) -> AppService:
    return AppService.model_validate(
        {"apps": [{"name": "ok", "uri": "mcp+http://127.0.0.1:9/mcp"}]
         + [{"name": f"s{i}", "mcp": m} for i, m in enumerate(mcps)]}
    )  # fmt: skip


def test_static_apps_name_the_key_at_fault() -> None:
    apps = _apps({"command": "/usr/bin/srv", "run_as_host_user": "mcp"}, {"command": "/usr/bin/srv"})
    with pytest.raises(ConfigError) as e:
        check_static_apps(apps, host(euid=0))
    assert e.value.path == "app_service.apps[2].mcp.run_as_host_user"
    assert e.value.message == (
        "app_service.apps[2].mcp.run_as_host_user: required when bastion runs as root: "
        "name the host user the server runs as (write root only if you mean it)"
    )


def test_static_apps_every_problem_one_line_each() -> None:
    apps = _apps(
        {"command": "nope", "run_as_host_user": "mcp"}, {"command": "/usr/bin/srv", "run_as_host_user": "x"}
    )
    with pytest.raises(ConfigError) as e:
        check_static_apps(apps, host())
    assert e.value.message == (
        "app_service.apps[1].mcp.command: 'nope' is not found on PATH ('/usr/local/bin:/usr/bin')\n"
        "app_service.apps[2].mcp.run_as_host_user: 'x' is not a user on this host"
    )
    check_static_apps(_apps({"command": "srv", "run_as_host_user": "root"}), host())  # fine


def test_the_real_host(tmp_path: Path) -> None:
    me = Host.this()
    myself = me.name_of(me.euid)
    assert stdio_problem(MCPCommand(command="sh", run_as_host_user=myself), me) is None
    script = tmp_path / "s.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    assert stdio_problem(MCPCommand(command=str(script), run_as_host_user=myself), me) == (
        "mcp.command",
        f"{str(script)!r} is not executable",
    )


def _dynamic(command: str, user: str) -> App:
    mcp = {"command": command, "run_as_host_user": user}
    return App.model_validate({"metadata": {"name": "dyn"}, "spec": {"mcp": mcp}})


def test_a_dynamic_app_the_host_cannot_run_is_refused_with_the_key() -> None:
    p = HostPolicy(
        DynamicAppsPolicy(commands=["/usr/bin/srv", "/usr/bin/gone"], run_as=["mcp", "ghost", "root"]),
        StdioLimits(),
        trusted=lambda _: False,
        gateway_user="root",
        host=host(euid=0),
    )
    assert p.refusal(_dynamic("/usr/bin/srv", "mcp")) is None
    assert p.refusal(_dynamic("/usr/bin/srv", "ghost")) == (
        "mcp.run_as_host_user: 'ghost' is not a user on this host"
    )
    assert p.refusal(_dynamic("/usr/bin/gone", "mcp")) == "mcp.command: '/usr/bin/gone' does not exist"
    # root is listed, but an empty run_as_host_user on a root gateway is not "root written".
    assert p.refusal(_dynamic("/usr/bin/srv", "")) == (
        "mcp.run_as_host_user: required when bastion runs as root: name the host user the server "
        "runs as (write root only if you mean it)"
    )
    # The host's rules come first: what the host does not allow is said as such.
    assert "not in app_service.dynamic_apps.commands" in (p.refusal(_dynamic("/usr/bin/x", "mcp")) or "")
