"""Issue 16's scripted day: every security-relevant action is audited once, with its actor and
address, and no secret used during the day is stored anywhere in the data dir or the logs.

One node (auth + proxy + app service with the demo app), a joined app service, and three people:
the built-in administrator on the server host, ``ops`` (role ``editor``, working remotely) and
``alice`` (role ``mcp-user``); a stranger at 127.0.0.2 guesses alice's password.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.integration.conftest import Node, start_node, stop_node
from tests.integration.mcp_https import McpOverHttps
from tests.integration.test_agents import _agent_config, _start_agent
from tests.integration.test_cluster import PW, _ca, _invite, _user, log_in, set_password
from tests.security.test_identity import _until

PW2 = "a new and even longer passphrase"
BAD = "not the password at all"
GUESS = "mallory tries this one"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = start_node(
        tmp_path_factory.mktemp("day"),
        extra_config="app_service:\n  enabled: true\n  demo_server: true\n",
    )
    try:
        yield n
    finally:
        stop_node(n)


def _events(node: Node, home: Path | None = None) -> list[dict[str, Any]]:
    """The audit log, oldest first: on the server host, or through the proxy as ``home``'s user."""
    args = ("audit", "search", "--format=json", "--limit=10000", "--order=asc")
    return list(json.loads(node.cli(*args, local=home is None, home=home).stdout))


def _token_of(home: Path) -> str:
    profile = next((home / "profiles").iterdir())
    return str(yaml.safe_load(profile.read_text())["token"])


def test_a_scripted_day_is_audited_once_each_with_no_secret_kept(node: Node, tmp_path: Path) -> None:
    secrets_used = [PW, PW2, BAD, GUESS]
    ops_home, alice_home = tmp_path / "ops", tmp_path / "alice"

    # The administrator on the server host creates two users; each sets a password and logs in.
    _user(node, "ops", "editor", ops_home)
    code, fp = _invite(node, "alice", "mcp-user")
    secrets_used.append(code)
    set_password(node, code, fp, PW, alice_home)
    log_in(node, "alice", PW, alice_home)
    secrets_used += [_token_of(ops_home), _token_of(alice_home)]

    # A stranger guesses alice's password from another address until locked, and once more;
    # and tries a user that does not exist.
    stranger = httpx.HTTPTransport(local_address="127.0.0.2", verify=_ca(node))
    with httpx.Client(base_url=f"https://{node.addr}", transport=stranger, timeout=30) as c:
        for _ in range(5):
            assert c.post("/v1/webapi/login", json={"user": "alice", "password": BAD}).status_code == 401
        r = c.post("/v1/webapi/login", json={"user": "alice", "password": PW})
        assert r.status_code == 401 and "try again in 20 minutes" in r.json()["error"]["message"]
        r = c.post("/v1/webapi/login", json={"user": "mallory", "password": GUESS})
        assert r.status_code == 401
        assert r.json()["error"]["message"] == "invalid user name or password"

    # The lock is visible, then lifted; alice logs in from that address.
    listed = node.cli("users", "ls", local=True).stdout
    assert re.search(r"alice .*locked from 1 address until", listed), listed
    assert "ops" in listed and not re.search(r"ops .*locked", listed)
    as_json = json.loads(node.cli("users", "ls", "--format=json", local=True).stdout)
    (alice_doc,) = [u for u in as_json if u["metadata"]["name"] == "alice"]
    assert alice_doc["status"]["login_lock"]["addresses"] == 1
    assert "unlocked" in node.cli("users", "unlock", "alice", local=True).stdout
    assert "was not locked" in node.cli("users", "unlock", "alice", local=True).stdout
    assert "locked" not in node.cli("users", "ls", local=True).stdout.split("alice", 1)[1].split("\n")[0]
    with httpx.Client(base_url=f"https://{node.addr}", transport=stranger, timeout=30) as c:
        r = c.post("/v1/webapi/login", json={"user": "alice", "password": PW})
        assert r.status_code == 200, r.text
        secrets_used.append(r.json()["token"])

    # A machine credential for alice, signed on the server host.
    signed = node.cli(
        "auth", "sign", "--user=alice", "--ttl=10m", "--format=token", local=True
    ).stdout.strip()
    secrets_used.append(signed)

    # ops (remotely) manages a role and a dynamic app; alice is refused the same.
    role = tmp_path / "role.yaml"
    role.write_text(
        "kind: role\nversion: v1\nmetadata: {name: day-role}\nspec: {allow: {mcp: {tools: [echo]}}}\n"
    )
    node.cli("create", str(role), home=ops_home)
    role.write_text(
        "kind: role\nversion: v1\nmetadata: {name: day-role}\nspec: {allow: {mcp: {tools: ['*']}}}\n"
    )
    node.cli("create", "-f", str(role), home=ops_home)
    node.cli("rm", "role/day-role", home=ops_home)
    app = tmp_path / "app.yaml"
    app.write_text(
        "kind: app\nversion: v1\nmetadata: {name: day-app, labels: {env: day}}\n"
        "spec: {uri: 'mcp+https://day-app.example.com/mcp'}\n"
    )
    node.cli("create", str(app), home=ops_home)
    node.cli("rm", "app/day-app", home=ops_home)
    denied = node.cli("get", "roles", home=alice_home, check=False)
    assert denied.returncode != 0 and "may not" in denied.stderr

    # ops makes a join token; an app service joins with it.
    tok = json.loads(node.cli("tokens", "add", "--type=app", "--format=json", home=ops_home).stdout)
    secrets_used.append(tok["token"])
    agent = _start_agent(
        tmp_path / "agent", _agent_config(tmp_path / "agent", node, tok["token"], tok["ca_pin"], "{env: day}")
    )
    try:
        _until(
            "the app service joined",
            lambda: any(e["event"] == "app_server.join" and e["success"] for e in _events(node)),
            deadline=30.0,
        )
    finally:
        agent.stop()
    key_pems = [
        p.read_text()
        for p in (tmp_path / "agent" / "data").rglob("*")
        if p.is_file() and "PRIVATE KEY" in p.read_text(errors="replace")
    ]
    assert key_pems, "the app service keeps its key in its data dir"

    # alice's password is reset; she sets a new one.
    reset = node.cli("users", "reset", "alice", local=True).stdout
    code2 = re.search(r"--invite=(\S+)", reset)
    assert code2
    secrets_used.append(code2.group(1))
    set_password(node, code2.group(1), fp, PW2, alice_home)
    log_in(node, "alice", PW2, alice_home)
    secrets_used.append(_token_of(alice_home))

    # alice calls a tool.
    ca = tmp_path / "ca.pem"
    ca.write_text(node.cli("auth", "export", "--type=tls", local=True).stdout)
    mcp = McpOverHttps(ca, _token_of(alice_home), app="bastion-demo")
    try:
        mcp.rpc(
            node,
            "initialize",
            {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "day", "version": "1"},
            },
        )
        result = mcp.rpc(node, "tools/call", {"name": "bastion_demo_info", "arguments": {}})
        assert "result" in result, result
    finally:
        mcp.close()

    # ---- what the audit log says: read through the proxy, so from the store itself (the
    # administrator's events went through the outbox and must have been delivered)
    events = _events(node, home=ops_home)

    def which(type_: str, **match: Any) -> list[dict[str, Any]]:
        def ok(e: dict[str, Any]) -> bool:
            return e["event"] == type_ and all(
                (e.get("extra", {}).get(k[6:]) if k.startswith("extra_") else e.get(k)) == v
                for k, v in match.items()
            )

        return [e for e in events if ok(e)]

    def once(type_: str, **match: Any) -> dict[str, Any]:
        found = which(type_, **match)
        assert len(found) == 1, (type_, match, found)
        return found[0]

    admin, local = "bastion-admin", "server host"
    for name in ("ops", "alice"):
        assert once("user.create", extra_name=name)["user"] == admin
        assert once("invite.create", extra_name=name, extra_purpose="new")["extra"]["via"] == local
        assert once("invite.use", user=name, extra_purpose="new")["success"]
    assert once("invite.create", extra_name="alice", extra_purpose="reset")["user"] == admin
    assert once("invite.use", user="alice", extra_purpose="reset")["success"]
    assert once("user.password_change", user="alice")["extra"]["how"] == "reset invite"

    failed = [e for e in which("user.login", user="alice") if not e["success"]]
    assert Counter(e["extra"]["reason"] for e in failed) == {"password": 5, "locked": 1}
    assert {e["remote_addr"] for e in failed} == {"127.0.0.2"}
    unknown = once("user.login", user="mallory")
    assert unknown["extra"]["reason"] == "unknown_user" and not unknown["success"]
    assert once("user.locked", user="alice")["remote_addr"] == "127.0.0.2"
    unlocked = which("user.unlocked", extra_name="alice")
    assert [u["extra"]["was_locked"] for u in unlocked] == [True, False]
    assert all(u["user"] == admin for u in unlocked)
    ok_logins = [e for e in which("user.login", user="alice") if e["success"]]
    assert sorted(e["remote_addr"] for e in ok_logins) == ["127.0.0.1", "127.0.0.1", "127.0.0.2"]
    certs = which("cert.create", extra_for="alice")
    assert Counter(c["extra"]["how"] for c in certs) == {"login": 3, "auth sign": 1}
    sign = once("cert.create", extra_for="alice", extra_how="auth sign")
    assert sign["user"] == admin and sign["roles"] == ["mcp-user"] and 0 < sign["extra"]["ttl_s"] <= 600

    for type_ in ("role.create", "role.update", "role.delete"):
        e = once(type_, extra_name="day-role")
        assert e["user"] == "ops" and e["remote_addr"] == "127.0.0.1" and e["roles"] == ["editor"]
    for type_ in ("app.create", "app.delete"):
        assert once(type_, extra_name="day-app")["user"] == "ops"
    assert not which("app.update", extra_name="day-app")
    refused = once("access.denied", user="alice")
    assert refused["extra"]["path"] == "/v1/resources/role" and not refused["success"]

    token = once("join_token.create", user="ops")
    assert token["extra"]["name"] == tok["id"]
    joined = once("app_server.join", success=True)
    assert joined["extra"]["token"] == token["extra"]["name"] and joined["remote_addr"] == "127.0.0.1"

    assert once("mcp.session.start", user="alice")["app"] == "bastion-demo"
    call = once("mcp.session.request", user="alice", method="tools/call")
    assert call["tool"] == "bastion_demo_info"

    # ---- no secret used today is kept anywhere the gateway writes
    places = [p for p in (node.root / "data").rglob("*") if p.is_file()] + [
        node.log,
        tmp_path / "agent" / "agent.log",
    ]
    blobs = {p: p.read_bytes() for p in places}
    for secret in secrets_used:
        for p, blob in blobs.items():
            assert secret.encode() not in blob, f"a secret of the day is in {p}"
    for pem in key_pems:
        body = "".join(pem.strip().splitlines()[1:-1])[:64]
        for p, blob in blobs.items():
            assert body.encode() not in blob, f"the app service's private key is in {p}"


def test_local_changes_made_while_the_gateway_is_down_reach_the_log_when_it_starts(tmp_path: Path) -> None:
    node = start_node(tmp_path / "n")
    stop_node(node)
    node.cli("users", "add", "bob", "--roles=mcp-user", local=True)
    # Not in the log yet (no gateway runs to write it), but a search on the server host shows it.
    pending = [e for e in _events(node) if e["event"] == "user.create"]
    assert [e["extra"]["name"] for e in pending] == ["bob"]
    node = start_node(tmp_path / "n")
    try:
        home = tmp_path / "ops"
        node.cli("users", "add", "ops2", "--roles=editor", local=True)
        _user(node, "carol", "editor", home)

        def delivered() -> bool:
            created = [e["extra"]["name"] for e in _events(node, home=home) if e["event"] == "user.create"]
            return sorted(created) == ["bob", "carol", "ops2"]

        _until("the outbox delivered", delivered, deadline=30.0)
        # Delivered once: the server host's view (store + outbox) agrees.
        local = [e["extra"]["name"] for e in _events(node) if e["event"] == "user.create"]
        assert sorted(local) == ["bob", "carol", "ops2"]
    finally:
        stop_node(node)
    report = json.loads(node.cli("audit", "verify", "--format=json", local=True).stdout)
    assert report["ok"], report
