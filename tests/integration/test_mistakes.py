"""Mistakes refused at start and at create, not at call time (issue 15, item 3).

- a static stdio app the host cannot run: `bastion start` exits 2 naming the key, before
  anything is created or listens;
- an app resource named like a static app: `bastion create` exits 1 and says so;
- a dynamic stdio app whose host user or command the host lacks: refused by the app service
  that would run it (`bastion get app_servers`), never a 502 when called.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Node, bastion_cmd, start_node, stop_node

IS_ROOT = os.geteuid() == 0
DEADLINE = 10.0
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"},
    },
}


def _start_with_app(root: Path, mcp: str) -> subprocess.CompletedProcess[str]:
    root.mkdir(parents=True, exist_ok=True)
    config = root / "bastion.yaml"
    config.write_text(
        "version: v1\n"
        f"bastion: {{data_dir: {root / 'data'}, cluster_name: mistakes}}\n"
        "auth_service: {listen_addr: 127.0.0.1:0}\n"
        "proxy_service: {listen_addr: 127.0.0.1:0}\n"
        "app_service:\n"
        "  apps:\n"
        "  - name: fine\n"
        "    uri: mcp+http://127.0.0.1:9/mcp\n"
        "  - name: files\n"
        f"    mcp: {mcp}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env["NO_COLOR"] = "1"
    env["COLUMNS"] = "200"
    return subprocess.run(
        bastion_cmd("start", "--config", str(config)), capture_output=True, text=True, env=env, timeout=60
    )


@pytest.mark.parametrize(
    ("mcp", "key", "why"),
    [
        pytest.param(
            "{command: /bin/cat}",
            "mcp.run_as_host_user",
            "required when bastion runs as root: name the host user the server runs as "
            "(write root only if you mean it)",
            marks=pytest.mark.skipif(not IS_ROOT, reason="the rule is for a gateway running as root"),
            id="root-without-run-as",
        ),
        pytest.param(
            "{command: /bin/cat, run_as_host_user: bastion-no-such-user}",
            "mcp.run_as_host_user",
            "'bastion-no-such-user' is not a user on this host",
            id="unknown-user",
        ),
        pytest.param(
            "{command: bastion-no-such-command, run_as_host_user: root, env: {PATH: /usr/bin:/bin}}",
            "mcp.command",
            "'bastion-no-such-command' is not found on PATH ('/usr/bin:/bin')",
            marks=pytest.mark.skipif(not IS_ROOT, reason="runs as root"),
            id="not-on-path",
        ),
    ],
)
def test_start_refuses_a_static_stdio_app_the_host_cannot_run(
    tmp_path: Path, mcp: str, key: str, why: str
) -> None:
    res = _start_with_app(tmp_path, mcp)
    assert res.returncode == 2, res.stderr
    config = tmp_path / "bastion.yaml"
    assert res.stderr == f"error: invalid configuration {config}:\napp_service.apps[1].{key}: {why}\n"
    assert not (tmp_path / "data").exists()  # nothing was created, nothing listened


def test_start_refuses_a_command_that_is_not_executable(tmp_path: Path) -> None:
    script = tmp_path / "server.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    me = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    res = _start_with_app(tmp_path / "node", f"{{command: {script}, run_as_host_user: {me}}}")
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines()[1] == f"app_service.apps[1].mcp.command: '{script}' is not executable"


# ----------------------------------------------------------------- at create

APP = """\
kind: app
version: v3
metadata: {{name: {name}, labels: {{env: dev}}}}
spec: {spec}
"""


def _app_file(tmp_path: Path, name: str, spec: str) -> Path:
    f = tmp_path / f"{name}.yaml"
    f.write_text(APP.format(name=name, spec=spec))
    return f


def _app_servers(node: Node) -> list[dict[str, Any]]:
    out = node.cli("get", "app_servers", "--format=json", local=True).stdout
    servers = json.loads(out)
    assert isinstance(servers, list)
    return servers


def _wait_for(what: str, check: Any) -> Any:
    end = time.monotonic() + DEADLINE
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    extra = (
        "app_service:\n"
        "  demo_server: true\n"
        "  resources: [{labels: {'*': '*'}}]\n"
        "  apps:\n"
        "  - name: static-one\n"
        "    uri: mcp+http://127.0.0.1:9/mcp\n"
        "  dynamic_apps:\n"
        "    commands: [/bin/cat, /bin/bastion-no-such-server]\n"
        "    run_as: [bastion-no-such-user, root, nobody]\n"
    )
    n = start_node(tmp_path_factory.mktemp("mistakes"), extra_config=extra)
    try:
        n.cli("users", "add", "alice", "--roles=mcp-user,editor", local=True)
        yield n
    finally:
        stop_node(n)


def _host_id(node: Node) -> str:
    servers = _wait_for("the app service's heartbeat", lambda: _app_servers(node))
    assert len(servers) == 1
    assert {"static-one", "bastion-demo"} <= set(servers[0]["spec"]["static"])
    return str(servers[0]["metadata"]["name"])


@pytest.mark.parametrize("name", ["static-one", "bastion-demo"])
def test_create_refuses_a_static_apps_name(node: Node, tmp_path: Path, name: str) -> None:
    host_id = _host_id(node)
    f = _app_file(tmp_path, name, "{uri: 'mcp+https://mcp.example.com/mcp'}")
    ident = tmp_path / "alice.id"
    node.cli("auth", "sign", "--user=alice", f"--out={ident}", local=True)
    expected = (
        f'error: app "{name}" is defined in the configuration file of app service {host_id}; an app '
        "resource of that name would never be served there (the file wins, decision 8): choose "
        "another name\n"
    )
    for args in (
        ("create", str(f)),
        ("create", "-f", str(f)),
    ):
        local = node.cli(*args, local=True, check=False)
        assert (local.returncode, local.stderr) == (1, expected)
        remote = node.cli(*args, "-i", str(ident), "--proxy", node.addr, check=False)
        assert (remote.returncode, remote.stderr) == (1, expected)
    missing = node.cli("get", f"app/{name}", local=True, check=False)
    assert missing.returncode == 1  # nothing was created


@pytest.mark.parametrize(
    ("name", "spec", "why"),
    [
        (
            "dyn-ghost",
            "{mcp: {command: /bin/cat, run_as_host_user: bastion-no-such-user}}",
            "mcp.run_as_host_user: 'bastion-no-such-user' is not a user on this host",
        ),
        (
            "dyn-missing",
            "{mcp: {command: /bin/bastion-no-such-server, run_as_host_user: nobody}}",
            "mcp.command: '/bin/bastion-no-such-server' does not exist",
        ),
        pytest.param(
            "dyn-root",
            "{mcp: {command: /bin/cat}}",
            "mcp.run_as_host_user: required when bastion runs as root: name the host user the "
            "server runs as (write root only if you mean it)",
            marks=pytest.mark.skipif(not IS_ROOT, reason="the rule is for a gateway running as root"),
        ),
    ],
)
def test_a_dynamic_app_the_host_cannot_run_is_refused_not_a_502(
    node: Node, tmp_path: Path, name: str, spec: str, why: str
) -> None:
    node.cli("create", str(_app_file(tmp_path, name, spec)), local=True)

    def refusal() -> str | None:
        for s in _app_servers(node):
            reason = s["spec"].get("refused", {}).get(name)
            if reason:
                return str(reason)
        return None

    assert _wait_for(f"{name} to be refused", refusal) == why
    ca = tmp_path / "ca.pem"
    ca.write_text(node.cli("auth", "export", local=True).stdout)
    token = node.cli("auth", "sign", "--user=alice", "--format=token", local=True).stdout.strip()
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"}
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), headers=headers, timeout=30) as c:
        r = c.post(f"https://{node.addr}/mcp/apps/{name}", json=INIT)
    assert r.status_code == 404  # not served here: never started, never a 502
    node.cli("rm", f"app/{name}", local=True)


# ------------------------------------------------------------- at call time


def test_a_host_that_changed_after_start_is_a_gateway_fault_not_an_upstream_one(tmp_path: Path) -> None:
    server = tmp_path / "server.sh"
    server.write_text("#!/bin/sh\nexec cat\n")
    server.chmod(0o755)
    me = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    extra = f"app_service:\n  apps:\n  - name: gone\n    mcp: {{command: {server}, run_as_host_user: {me}}}\n"
    n = start_node(tmp_path / "node", extra_config=extra)
    try:
        n.cli("users", "add", "alice", "--roles=mcp-user", local=True)
        server.unlink()  # the program the file names is removed while bastion runs
        ca = tmp_path / "ca.pem"
        ca.write_text(n.cli("auth", "export", local=True).stdout)
        token = n.cli("auth", "sign", "--user=alice", "--format=token", local=True).stdout.strip()
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"}
        with httpx.Client(
            verify=ssl.create_default_context(cafile=str(ca)), headers=headers, timeout=30
        ) as c:
            r = c.post(f"https://{n.addr}/mcp/apps/gone", json=INIT)
    finally:
        stop_node(n)
    assert r.status_code == 500
    assert r.headers["x-bastion-error-origin"] == "gateway"
    assert (
        r.json()["error"]["message"] == f'app gone: cannot start stdio server "{server}": command not found'
    )


def test_configure_warns_about_a_stdio_app_this_host_cannot_run(tmp_path: Path) -> None:
    out = tmp_path / "bastion.yaml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env |= {"NO_COLOR": "1", "COLUMNS": "200", "PATH": "/usr/bin:/bin"}
    res = subprocess.run(
        bastion_cmd(
            "configure", "-o", str(out), "--data-dir", str(tmp_path / "data"), "--app", "x=nosuch -v"
        ),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert res.returncode == 0 and out.exists()  # the file may be meant for another host
    why = (
        "app_service.apps[0].mcp.run_as_host_user: required when bastion runs as root: name the host "
        "user the server runs as (write root only if you mean it)"
        if IS_ROOT
        else "app_service.apps[0].mcp.command: 'nosuch' is not found on PATH ('/usr/bin:/bin')"
    )
    assert res.stderr == f"warning: bastion start on this host would refuse it: {why}\n"
