"""A proxy with the organisation's own certificate (issue 15, Trust; decision 0027).

A separate test CA (made here with ``cryptography``) issues the proxy a certificate for
127.0.0.1 and localhost; the CLI runs with that CA as its system trust (``SSL_CERT_FILE``).
Every client path works without a fingerprint prompt: login, ``status -i``, ``mcp
ls/tools/call/config``, ``mcp connect`` (the SDK's stdio client and the Inspector), ``proxy
mcp``, and an app service that joins and serves a dynamic app.  A second cluster, with its own
certificate, shows the pin: a stale one refused with the file it lives in,
``--ca-fingerprint`` re-pinning it, ``logout --proxy`` forgetting it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bastion.auth.ca import fingerprint, generate_ca
from tests.integration.conftest import Node, bastion_cmd, start_node, stop_node, wait_for_log
from tests.peers import (
    ROOT,
    everything_cmd,
    inspector_cmd,
    node_env,
    requires_node_peers,
    run_conformance_suite,
)
from tests.testca import OrgCA, make_org_ca

PW = "correct horse battery staple"


# ------------------------------------------------------------------ the organisation's CA


@pytest.fixture(scope="module")
def org_ca(tmp_path_factory: pytest.TempPathFactory) -> OrgCA:
    return make_org_ca(tmp_path_factory.mktemp("org-ca"))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, org_ca: OrgCA) -> Iterator[Node]:
    """auth + proxy (the organisation's certificate) + the demo app; users alice (profile)
    and bob (identity file)."""
    node = start_node(
        tmp_path_factory.mktemp("org-gw"),
        extra_config=(
            f"  tls:\n    cert_file: {org_ca.cert_file}\n    key_file: {org_ca.key_file}\n"
            "app_service:\n  demo_server: true\n"
            # The conformance suite's fixture, to run the suite through `proxy mcp` (it leaves
            # ~30 sessions open, a stdio server each; the default cap is 16).
            "  stdio_limits: {per_user: 64}\n"
            "  apps:\n  - name: conformance-stdio\n    labels: {env: test}\n    mcp:\n"
            f"      command: {sys.executable}\n"
            "      args: [-m, tests.fixtures.conformance_server, --transport, stdio]\n"
            "      run_as_host_user: root\n"
            f'      env: {{PYTHONPATH: "{ROOT}"}}\n'
        ),
    )
    node.env["SSL_CERT_FILE"] = str(org_ca.ca_file)
    try:
        node.cli("users", "add", "bob", "--roles=mcp-user", local=True)
        node.cli("auth", "sign", "--user=bob", f"--out={node.root / 'bob.id'}", local=True)
        yield node
    finally:
        stop_node(node)


def _set_password(node: Node, user: str, home: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    res = node.cli("users", "add", user, "--roles=mcp-user", local=True)
    code = re.search(r"--invite=(\S+)", res.stdout)
    assert code, res.stdout
    return node.cli(
        "users",
        "set-password",
        f"--proxy={node.addr}",
        f"--invite={code.group(1)}",
        "--password-stdin",
        *extra,
        input=PW + "\n",
        home=home,
    )


def _login(
    node: Node, user: str, home: Path, *extra: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return node.cli(
        "login",
        f"--proxy={node.addr}",
        f"--user={user}",
        "--password-stdin",
        *extra,
        input=PW + "\n",
        home=home,
        check=check,
    )


def _pin_file(home: Path, node: Node) -> Path:
    return home / "cas" / (node.addr.replace(":", "_") + ".pem")


def _cluster_ca(node: Node) -> str:
    return node.cli("auth", "export", "--type=tls", local=True).stdout


# ------------------------------------------------------------------ login and the web API


def test_login_needs_no_fingerprint_when_the_system_trusts_the_proxy(gateway: Node, tmp_path: Path) -> None:
    home = tmp_path / "alice"
    # No --ca-fingerprint and no terminal: only the system trust (SSL_CERT_FILE) vouches for it.
    _set_password(gateway, "alice", home)
    login = _login(gateway, "alice", home)
    assert "Logged in as: alice" in login.stdout
    assert login.stderr == ""  # no prompt, no notice
    # The cluster CA, fetched over the verified connection, is pinned silently (decision 0027).
    assert _pin_file(home, gateway).read_text() == _cluster_ca(gateway)
    assert "Logged in as: alice" in gateway.cli("status", home=home).stdout
    listed = json.loads(gateway.cli("mcp", "ls", "--format=json", home=home).stdout)
    assert [a["name"] for a in listed] == ["bastion-demo", "conformance-stdio"]


def test_without_the_system_trust_first_contact_asks_for_the_fingerprint(
    gateway: Node, tmp_path: Path
) -> None:
    env = gateway.env.pop("SSL_CERT_FILE")
    try:
        res = _login(gateway, "bob", tmp_path / "h", check=False)
    finally:
        gateway.env["SSL_CERT_FILE"] = env
    assert res.returncode == 1
    assert "not pinned yet" in res.stderr


def test_identity_file_status_and_mcp_commands(gateway: Node, tmp_path: Path) -> None:
    ident = gateway.root / "bob.id"
    i = ["-i", str(ident), "--proxy", gateway.addr]
    home = tmp_path / "home"
    status = gateway.cli("status", *i, home=home).stdout
    assert "Logged in as: bob" in status
    listed = json.loads(gateway.cli("mcp", "ls", "--format=json", *i, home=home).stdout)
    assert [a["name"] for a in listed] == ["bastion-demo", "conformance-stdio"]
    tools = gateway.cli("mcp", "tools", "bastion-demo", "--format=json", *i, home=home).stdout
    assert "bastion_user_info" in {t["name"] for t in json.loads(tools)}
    called = gateway.cli("mcp", "call", "bastion-demo", "bastion_user_info", *i, home=home).stdout
    assert '"bob"' in called or "bob" in called
    snippet = json.loads(gateway.cli("mcp", "config", "bastion-demo", *i, home=home).stdout)
    assert "bastion-bastion-demo" in json.dumps(snippet)


def test_untrusted_proxy_error_names_the_identity_file(gateway: Node, tmp_path: Path) -> None:
    ident = gateway.root / "bob.id"
    env = gateway.env.pop("SSL_CERT_FILE")
    try:
        res = gateway.cli("status", "-i", str(ident), "--proxy", gateway.addr, home=tmp_path, check=False)
    finally:
        gateway.env["SSL_CERT_FILE"] = env
    assert res.returncode == 1
    assert re.fullmatch(
        re.escape(
            f"error: the proxy {gateway.addr} presented a certificate that neither the system trust "
            f"store nor the cluster CA pinned for it in {ident} accepts ("
        )
        + r"[^)]+"
        + re.escape(
            "): someone may be intercepting the connection, or the cluster was re-created (then ask "
            "for a new identity file (`bastion auth sign`))\n"
        ),
        res.stderr,
    ), res.stderr


# ------------------------------------------------------------------ MCP clients


def _refusal(node: Node, ident: Path) -> str:
    """The message every client path gives when neither trust accepts the proxy (regex)."""
    return (
        re.escape(
            f"the proxy {node.addr} presented a certificate that neither the system trust "
            f"store nor the cluster CA pinned for it in {ident} accepts ("
        )
        + r"[^)]+"
        + re.escape(
            "): someone may be intercepting the connection, or the cluster was re-created (then ask "
            "for a new identity file (`bastion auth sign`))"
        )
    )


def test_untrusted_proxy_error_from_every_mcp_path(gateway: Node, tmp_path: Path) -> None:
    """Without the organisation's CA, `mcp call`, `mcp connect` and `proxy mcp` say the same."""
    ident = gateway.root / "bob.id"
    env = {k: v for k, v in _cli_env(gateway, tmp_path / "h").items() if k != "SSL_CERT_FILE"}
    i = ["-i", str(ident), "--proxy", gateway.addr]
    called = subprocess.run(
        bastion_cmd("mcp", "call", "bastion-demo", "bastion_user_info", *i),
        capture_output=True,
        text=True,
        env={**env, "COLUMNS": "400"},
        timeout=60,
    )
    assert called.returncode == 1
    assert re.fullmatch("error: " + _refusal(gateway, ident) + "\n", called.stderr), called.stderr

    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        },
    }
    bridged = subprocess.run(
        bastion_cmd("mcp", "connect", "bastion-demo", *i),
        input=json.dumps(init) + "\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    answer = json.loads(bridged.stdout.splitlines()[0])
    assert re.fullmatch(
        re.escape(f"cannot reach the bastion proxy at {gateway.addr} for bastion-demo: ")
        + _refusal(gateway, ident),
        answer["error"]["message"],
    ), answer

    # proxy mcp checks the app before it listens: the same refusal, at once.
    proxied = subprocess.run(
        bastion_cmd("proxy", "mcp", "bastion-demo", "-p", "0", *i),
        capture_output=True,
        text=True,
        env={**env, "COLUMNS": "400"},
        timeout=60,
    )
    assert proxied.returncode == 1, proxied.stderr
    assert proxied.stdout == ""
    assert re.fullmatch("error: " + _refusal(gateway, ident) + "\n", proxied.stderr), proxied.stderr


def _cli_env(node: Node, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env.update(node.env, BASTION_HOME=str(home))
    return env


async def _sdk_stdio(node: Node, home: Path, errlog: Path) -> str:
    from mcp import ClientSession, StdioServerParameters, stdio_client

    ident = node.root / "bob.id"
    params = StdioServerParameters(
        command=sys.executable,
        args=[
            "-m",
            "bastion.cli.main",
            "mcp",
            "connect",
            "bastion-demo",
            "-i",
            str(ident),
            "--proxy",
            node.addr,
        ],
        env=_cli_env(node, home),
    )
    with errlog.open("w") as err:
        async with (
            asyncio.timeout(60),
            stdio_client(params, errlog=err) as (r, w),
            ClientSession(r, w) as s,
        ):
            await s.initialize()
            assert "bastion_user_info" in {t.name for t in (await s.list_tools()).tools}
            res = await s.call_tool("bastion_user_info", {})
            return str(res.content[0].text)  # type: ignore[union-attr]


def test_mcp_connect(gateway: Node, tmp_path: Path) -> None:
    text = asyncio.run(_sdk_stdio(gateway, tmp_path / "home", tmp_path / "bridge.log"))
    assert "bob" in text


@requires_node_peers
def test_mcp_connect_under_the_inspector(gateway: Node, tmp_path: Path) -> None:
    ident = gateway.root / "bob.id"
    env = node_env(_cli_env(gateway, tmp_path / "home"))
    base = [
        *inspector_cmd(),
        "--cli",
        sys.executable,
        "-m",
        "bastion.cli.main",
        "mcp",
        "connect",
        "bastion-demo",
        "-i",
        str(ident),
        "--proxy",
        gateway.addr,
    ]
    listed = subprocess.run(
        [*base, "--method", "tools/list"], capture_output=True, text=True, env=env, timeout=120
    )
    assert listed.returncode == 0, listed.stderr
    assert "bastion_user_info" in {t["name"] for t in json.loads(listed.stdout)["tools"]}


async def _through_local_proxy(url: str) -> str:
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async with (
        asyncio.timeout(60),
        streamable_http_client(url) as (r, w),
        ClientSession(r, w) as s,
    ):
        await s.initialize()
        res = await s.call_tool("bastion_user_info", {})
        return str(res.content[0].text)  # type: ignore[union-attr]


def test_proxy_mcp(gateway: Node, tmp_path: Path) -> None:
    ident = gateway.root / "bob.id"
    cmd = bastion_cmd("proxy", "mcp", "bastion-demo", "-p", "0", "-i", str(ident), "--proxy", gateway.addr)
    with (
        (tmp_path / "proxy.log").open("w") as log,
        subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=_cli_env(gateway, tmp_path / "h")
        ) as proc,
    ):
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            m = re.search(r"on (127\.0\.0\.1:\d+)", line)
            assert m, line
            assert "bob" in asyncio.run(_through_local_proxy(f"http://{m.group(1)}/mcp"))
        finally:
            proc.terminate()
            proc.wait(timeout=15)


@requires_node_peers
@pytest.mark.timeout(600)
def test_the_conformance_suite_through_proxy_mcp(gateway: Node, tmp_path: Path) -> None:
    """The official conformance suite, through `bastion proxy mcp` to a proxy whose certificate
    only the organisation's CA (in SSL_CERT_FILE) vouches for."""
    ident = gateway.root / "bob.id"
    cmd = bastion_cmd(
        "proxy", "mcp", "conformance-stdio", "-p", "0", "-i", str(ident), "--proxy", gateway.addr
    )
    with (
        (tmp_path / "proxy.log").open("w") as log,
        subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=_cli_env(gateway, tmp_path / "h")
        ) as proc,
    ):
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            m = re.search(r"on (127\.0\.0\.1:\d+)", line)
            assert m, line
            code, summary = run_conformance_suite(f"http://{m.group(1)}/mcp", tmp_path)
        finally:
            proc.terminate()
            proc.wait(timeout=15)
    assert code == 0, summary
    got = re.search(r"(\d+) passed, (\d+) failed", summary)
    assert got and int(got.group(1)) > 0 and int(got.group(2)) == 0, summary


# ------------------------------------------------------------------ a joined app service

DYNAMIC_APP = """\
kind: app
version: v3
metadata:
  name: everything
  labels: {{env: org}}
spec:
  mcp:
    command: {command}
    args: {args}
    run_as_host_user: {user}
"""


@requires_node_peers
def test_app_service_joins_and_serves_a_dynamic_app(gateway: Node, tmp_path: Path) -> None:
    doc = json.loads(gateway.cli("tokens", "add", "--type=app", "--format=json", local=True).stdout)
    root = tmp_path / "agent"
    root.mkdir()
    (root / "token").write_text(doc["token"] + "\n")
    user = os.environ.get("USER") or "root"
    cfg = root / "app.yaml"
    cfg.write_text(
        "version: v1\n"
        "bastion:\n"
        f"  data_dir: {root / 'data'}\n"
        f"  proxy_server: {gateway.addr}\n"
        f"  ca_pin: {doc['ca_pin']}\n"
        f"  join_params: {{token_name: {root / 'token'}}}\n"
        "auth_service: {enabled: false}\n"
        "proxy_service: {enabled: false}\n"
        "app_service:\n"
        "  resources:\n"
        "  - labels: {env: org}\n"
        f"  dynamic_apps: {{commands: [{everything_cmd('stdio')[0]}], run_as: [root, {user}]}}\n"
    )
    log = root / "agent.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env["SSL_CERT_FILE"] = str(gateway.env["SSL_CERT_FILE"])
    with log.open("wb") as f:
        agent = subprocess.Popen(
            bastion_cmd("start", "--config", str(cfg)), stdout=f, stderr=subprocess.STDOUT, env=env
        )
    try:
        wait_for_log(log, r"tunnel connected", agent, 30.0)
        node_bin, *args = everything_cmd("stdio")
        app = tmp_path / "app.yaml"
        app.write_text(DYNAMIC_APP.format(command=node_bin, args=json.dumps(args), user=user))
        gateway.cli("create", str(app), local=True)
        i = ["-i", str(gateway.root / "bob.id"), "--proxy", gateway.addr]
        end = time.monotonic() + 30.0
        while "everything" not in {
            a["name"] for a in json.loads(gateway.cli("mcp", "ls", "--format=json", *i).stdout)
        }:
            assert time.monotonic() < end, f"the joined app service's app never appeared:\n{log.read_text()}"
        called = gateway.cli("mcp", "call", "everything", "echo", "--arg", "message=org", *i)
        assert called.stdout.strip() == "Echo: org"
    finally:
        agent.terminate()
        try:
            agent.wait(timeout=15)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()


# ------------------------------------------------------------------ the pin


@pytest.fixture(scope="module")
def own_cert_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A cluster with its own certificate (no system trust for it)."""
    node = start_node(tmp_path_factory.mktemp("own-gw"), cluster="pins")
    try:
        yield node
    finally:
        stop_node(node)


def test_stale_pin_is_named_repinned_and_forgotten(own_cert_node: Node, tmp_path: Path) -> None:
    node = own_cert_node
    # BASTION_HOME unset: the messages must name the real directory, $HOME/.bastion.
    fake_home = tmp_path / "user"
    fake_home.mkdir()
    bastion_home = fake_home / ".bastion"

    def cli(*args: str, input: str | None = PW + "\n") -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
        env.update(HOME=str(fake_home), NO_COLOR="1", COLUMNS="400")
        env.pop("SSL_CERT_FILE", None)
        return subprocess.run(
            bastion_cmd(*args), input=input, capture_output=True, text=True, env=env, timeout=60
        )

    fp = fingerprint(_cluster_ca(node).encode())
    res = node.cli("users", "add", "dora", "--roles=mcp-user", local=True)
    code = re.search(r"--invite=(\S+)", res.stdout)
    assert code
    ok = cli(
        "users",
        "set-password",
        f"--proxy={node.addr}",
        f"--invite={code.group(1)}",
        f"--ca-fingerprint={fp}",
        "--password-stdin",
    )
    assert ok.returncode == 0, ok.stderr
    pin = bastion_home / "cas" / (node.addr.replace(":", "_") + ".pem")
    assert pin.read_text() == _cluster_ca(node)

    # The address now holds a pin of another cluster (as after `make demo` on the same port).
    other = generate_ca("host", "another", datetime.now(UTC)).cert_pem.decode()
    pin.write_text(other)
    stale = cli("login", f"--proxy={node.addr}", "--user=dora", "--password-stdin")
    assert stale.returncode == 1
    assert re.fullmatch(
        re.escape(
            f"error: the proxy {node.addr} presented a certificate that neither the system trust "
            f"store nor the cluster CA pinned for it in {pin} accepts ("
        )
        + r"[^)]+"
        + re.escape(
            "): someone may be intercepting the connection, or the cluster was re-created (then "
            "check its CA fingerprint and log in again with --ca-fingerprint=SHA256:..., which "
            "re-pins it)\n"
        ),
        stale.stderr,
    ), stale.stderr

    # The right fingerprint, given explicitly, re-pins (one line on stderr) and logs in.
    repinned = cli(
        "login", f"--proxy={node.addr}", "--user=dora", "--password-stdin", f"--ca-fingerprint={fp}"
    )
    assert repinned.returncode == 0, repinned.stderr
    assert repinned.stderr == (
        f"Re-pinned the cluster CA for {node.addr}: {fp} replaces {fingerprint(other.encode())} in {pin}\n"
    )
    assert pin.read_text() == _cluster_ca(node)
    assert "Logged in as: dora" in cli("status", input=None).stdout
    again = cli("login", f"--proxy={node.addr}", "--user=dora", "--password-stdin", f"--ca-fingerprint={fp}")
    assert again.returncode == 0 and again.stderr == ""  # the same CA: nothing to say

    # A plain logout keeps the pin; `logout --proxy` forgets it.
    out = cli("logout", input=None)
    assert out.stdout == f"Logged out dora from {node.addr}.\n"
    assert pin.exists()
    cli("login", f"--proxy={node.addr}", "--user=dora", "--password-stdin")
    out = cli("logout", f"--proxy={node.addr}", input=None)
    assert out.returncode == 0, out.stderr
    assert out.stdout == (
        f"Logged out dora from {node.addr}.\nForgot the cluster CA pinned for {node.addr} ({pin}).\n"
    )
    assert not pin.exists()
    fresh = cli("login", f"--proxy={node.addr}", "--user=dora", "--password-stdin")
    assert fresh.returncode == 1
    assert "not pinned yet" in fresh.stderr
