"""The host's policy for dynamic apps (pure), the stdio caps, and the config keys behind them."""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import pytest

from bastion.appservice.hostpolicy import HostPolicy, StdioSlots
from bastion.config import AppService, DynamicAppsPolicy, StdioLimits, default_config, refused_env
from bastion.errors import ConfigError, LimitExceededError
from bastion.resources import App


def stdio_app(command: str = "/usr/bin/srv", user: str = "mcp", env: dict[str, str] | None = None) -> App:
    mcp = {"command": command, "args": ["-c", "x"], "run_as_host_user": user, "env": env or {}}
    return App.model_validate({"metadata": {"name": "dyn"}, "spec": {"mcp": mcp}})


def http_app(uri: str) -> App:
    return App.model_validate({"metadata": {"name": "dyn"}, "spec": {"uri": uri}})


def policy(gateway_user: str = "bastion", **dynamic: Any) -> HostPolicy:
    return HostPolicy(
        DynamicAppsPolicy.model_validate(dynamic),
        StdioLimits(),
        trusted=lambda name: name == "static",
        gateway_user=gateway_user,
    )


def test_the_default_host_serves_no_dynamic_stdio_or_http_app() -> None:
    p = HostPolicy.defaults(trusted=lambda _: False)
    assert "commands is empty" in (p.refusal(stdio_app()) or "")
    assert "upstream_networks is empty" in (p.refusal(http_app("mcp+https://mcp.example.com/mcp")) or "")


def test_the_attack_root_shell_with_ld_preload_is_refused_on_every_count() -> None:
    attack = stdio_app("/bin/sh", "root", {"LD_PRELOAD": "/tmp/x.so"})
    assert policy().refusal(attack) is not None
    # Even with the shell allowed, root is not unless written; LD_PRELOAD never is.
    p = policy(commands=["/bin/sh"], run_as=["nobody"])
    assert "'root' is not in app_service.dynamic_apps.run_as" in (p.refusal(attack) or "")
    p = policy(commands=["/bin/sh"], run_as=["root"], env=["API_KEY"])
    assert "may never be set" in (p.refusal(attack) or "")
    assert p.refusal(stdio_app("/bin/sh", "root")) is None


@pytest.mark.parametrize(
    ("command", "allowed"),
    [
        ("/usr/bin/srv", True),
        ("/opt/launchers/files", True),
        ("/opt/launchers/sub/x", False),  # a directory allows its direct children only
        ("/opt/launchers/../../bin/sh", False),
        ("/opt/launchers/./files", False),
        ("srv", False),  # no PATH lookup for dynamic apps
        ("/usr/bin/srv2", False),
    ],
)
def test_commands_exact_paths_and_launcher_directories(command: str, allowed: bool) -> None:
    p = policy(commands=["/usr/bin/srv", "/opt/launchers/"], run_as=["mcp"])
    assert (p.refusal(stdio_app(command)) is None) is allowed


def test_an_empty_run_as_means_the_gateways_own_user_which_must_be_listed() -> None:
    p = policy(commands=["/usr/bin/srv"], run_as=["mcp"])
    why = p.refusal(stdio_app(user=""))
    assert why is not None and "'bastion'" in why and "gateway's own user" in why
    assert policy(commands=["/usr/bin/srv"], run_as=["bastion"]).refusal(stdio_app(user="")) is None


@pytest.mark.parametrize(
    "name", ["LD_PRELOAD", "ld_library_path", "PYTHONPATH", "NODE_OPTIONS", "npm_config_node_options",
             "DYLD_INSERT_LIBRARIES", "PERL5OPT", "RUBYOPT", "BASH_ENV", "ENV", "PATH", "HOME",
             "BASH_FUNC_x%%", "GLIBC_TUNABLES", "JAVA_TOOL_OPTIONS"],
)  # fmt: skip
def test_loader_and_interpreter_variables_are_refused_always(name: str) -> None:
    assert refused_env(name)
    p = policy(commands=["/usr/bin/srv"], run_as=["mcp"], env=["API_KEY", "MYAPP_*"])
    assert "may never be set" in (p.refusal(stdio_app(env={name: "x"})) or "")


def test_env_names_and_prefixes_the_host_allows() -> None:
    p = policy(commands=["/usr/bin/srv"], run_as=["mcp"], env=["API_KEY", "MYAPP_*"])
    assert p.refusal(stdio_app(env={"API_KEY": "k", "MYAPP_MODE": "ro"})) is None
    assert "not in app_service.dynamic_apps.env" in (p.refusal(stdio_app(env={"OTHER": "1"})) or "")


@pytest.mark.parametrize("entry", ["LD_PRELOAD", "L*", "NODE_*", "*", "P*", "path", "PYTHONSTARTUP"])
def test_the_config_refuses_to_allow_loader_variables(entry: str) -> None:
    with pytest.raises(Exception, match=r"never allowed|not a variable name"):
        DynamicAppsPolicy(env=[entry])


@pytest.mark.parametrize("entry", ["node", "/a/../b", "/a//b", "/", "./x"])
def test_the_config_wants_clean_absolute_commands(entry: str) -> None:
    with pytest.raises(Exception, match=r"absolute path|without|name a directory"):
        DynamicAppsPolicy(commands=[entry])


def test_config_keys_and_defaults() -> None:
    a = AppService()
    assert a.dynamic_apps == DynamicAppsPolicy()
    assert (a.dynamic_apps.commands, a.dynamic_apps.run_as, a.dynamic_apps.upstream_networks) == ([], [], [])
    limits = a.stdio_limits
    assert (limits.per_user, limits.per_app, limits.open_files) == (16, 64, 1024)
    assert limits.memory == 4 << 30 and limits.address_space == 0 and limits.cpu_time.total_seconds() == 3600
    s = AppService.model_validate(
        {"stdio_limits": {"memory": "512MiB", "cpu_time": "off", "address_space": "16G"}}
    )
    assert s.stdio_limits.memory == 512 << 20 and s.stdio_limits.cpu_time.total_seconds() == 0
    assert s.stdio_limits.address_space == 16 << 30
    with pytest.raises(ConfigError, match="upstream_networks"):
        default_config(
            Path("/tmp/x"), overrides={"app_service": {"dynamic_apps": {"upstream_networks": ["a b"]}}}
        )


def test_rlimits_from_the_config() -> None:
    p = HostPolicy(
        DynamicAppsPolicy(),
        StdioLimits.model_validate({"memory": "1GiB", "open_files": 256, "cpu_time": 0, "processes": 50}),
        trusted=lambda _: False,
    )
    assert dict(p.rlimits) == {
        resource.RLIMIT_DATA: 1 << 30,
        resource.RLIMIT_NOFILE: 256,
        resource.RLIMIT_NPROC: 50,
    }


@pytest.mark.parametrize(
    ("uri", "allowed"),
    [
        ("mcp+http://127.0.0.1:3434/metrics", False),
        ("mcp+http://169.254.169.254/latest/meta-data/", False),
        ("mcp+sse+http://[::1]:8080/sse", False),
        ("mcp+https://10.1.2.3/mcp", True),
        ("mcp+https://192.168.1.1/mcp", False),
        ("mcp+https://mcp.example.com/mcp", True),  # a name: judged again when dialled
    ],
)
def test_dynamic_http_addresses_judged_before_serving(uri: str, allowed: bool) -> None:
    p = policy(upstream_networks=["10.0.0.0/8"])
    assert (p.refusal(http_app(uri)) is None) is allowed


def test_a_name_with_only_names_allowed() -> None:
    p = policy(upstream_networks=["*.example.com"])
    assert p.refusal(http_app("mcp+https://mcp.example.com/mcp")) is None
    assert "not in app_service.dynamic_apps.upstream_networks" in (
        p.refusal(http_app("mcp+https://internal.corp/mcp")) or ""
    )


def test_static_apps_are_trusted_dynamic_ones_guarded() -> None:
    p = policy(upstream_networks=["10.0.0.0/8"])
    static = App.model_validate({"metadata": {"name": "static"}, "spec": {"uri": "mcp+http://127.0.0.1:1/"}})
    assert p.guard_for(static) is None
    assert p.guard_for(http_app("mcp+http://10.0.0.1/")) is p.guard


def test_stdio_slots_per_user_and_per_app_with_idempotent_release() -> None:
    slots = StdioSlots(per_user=2, per_app=3)
    a1 = slots.take("alice", "x")
    slots.take("alice", "y")
    with pytest.raises(LimitExceededError, match=r"user 'alice'.*limit 2.*per_user.*DELETE") as e:
        slots.take("alice", "x")
    assert e.value.http_status == 429 and e.value.origin == "client"
    slots.take("bob", "x")
    slots.take("carol", "x")
    with pytest.raises(LimitExceededError, match=r"app 'x'.*limit 3.*per_app"):
        slots.take("dave", "x")
    a1()
    a1()  # released once only
    assert slots.running(user="alice") == 1 and slots.running(app="x") == 2
    slots.take("dave", "x")
