"""Credentials and logins against a real node: logout revokes, a re-created user inherits nothing,
strangers cannot lock a user out, and `bastion proxy mcp` serves only its own origin."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.integration.conftest import Node, start_node, stop_node
from tests.integration.test_cluster import PW, _ca, _user
from tests.integration.test_data_path import local_proxy
from tests.security.conftest import INIT

MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = start_node(
        tmp_path_factory.mktemp("identity"),
        extra_config="app_service:\n  enabled: true\n  demo_server: true\n",
    )
    try:
        yield n
    finally:
        stop_node(n)


def _client(node: Node, **kw: Any) -> httpx.Client:
    return httpx.Client(base_url=f"https://{node.addr}", verify=_ca(node), timeout=30, **kw)


def _status(node: Node, token: str) -> tuple[int, int]:
    """(whoami, MCP initialize) status codes for a bearer token."""
    auth = {"Authorization": f"Bearer {token}"}
    with _client(node) as c:
        who = c.get("/v1/whoami", headers=auth).status_code
        mcp = c.post("/mcp/apps/bastion-demo", json=INIT, headers={**auth, **MCP_HEADERS}).status_code
    return who, mcp


def _until(what: str, check: Callable[[], bool], deadline: float = 10.0) -> None:
    """Poll ``check`` until it holds (the proxy caches actors ~2 s)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if check():
            return
    raise AssertionError(f"{what}: not within {deadline}s")


def _profile_token(home: Path) -> str:
    profile = next((home / "profiles").iterdir())
    return str(yaml.safe_load(profile.read_text())["token"])


def _audit(node: Node, event_type: str) -> list[dict[str, Any]]:
    out = node.cli("audit", "search", f"--type={event_type}", "--format=json", local=True).stdout
    return list(json.loads(out))


def test_logout_revokes_the_credential(node: Node, tmp_path: Path) -> None:
    home, other = tmp_path / "dave", tmp_path / "dave-laptop"
    _user(node, "dave", "mcp-user", home)
    fp = node.cli("auth", "export", "--type=tls", "--fingerprint", local=True).stdout.strip()
    login = ["login", f"--proxy={node.addr}", "--user=dave", "--password-stdin", f"--ca-fingerprint={fp}"]
    node.cli(*login, input=PW + "\n", home=other)
    old, kept = _profile_token(home), _profile_token(other)
    assert _status(node, old) == (200, 200)
    out = node.cli("logout", home=home).stdout
    assert "Logged out dave" in out
    _until("the logged-out credential is refused", lambda: _status(node, old) == (401, 401))
    with _client(node) as c:
        r = c.get("/v1/whoami", headers={"Authorization": f"Bearer {old}"})
    assert "revoked" in r.json()["error"]["message"]
    assert _status(node, kept) == (200, 200)  # another login of the same user is untouched
    assert any(e["user"] == "dave" for e in _audit(node, "user.logout"))


def test_a_recreated_user_does_not_inherit_credentials(node: Node) -> None:
    node.cli("users", "add", "erin", "--roles=mcp-user", local=True)
    old = node.cli("auth", "sign", "--user=erin", "--format=token", local=True).stdout.strip()
    assert _status(node, old) == (200, 200)
    node.cli("users", "rm", "erin", local=True)
    node.cli("users", "add", "erin", "--roles=mcp-user", local=True)
    _until("the old user's credential is refused", lambda: _status(node, old) == (401, 401))
    with _client(node) as c:
        r = c.get("/v1/whoami", headers={"Authorization": f"Bearer {old}"})
    assert "earlier user" in r.json()["error"]["message"]
    new = node.cli("auth", "sign", "--user=erin", "--format=token", local=True).stdout.strip()
    assert _status(node, new) == (200, 200)


def test_a_strangers_bad_passwords_do_not_lock_the_user(node: Node, tmp_path: Path) -> None:
    home = tmp_path / "frank"
    _user(node, "frank", "mcp-user", home)
    # The stranger comes from another loopback address (Linux routes all of 127/8 to lo).
    stranger = httpx.HTTPTransport(local_address="127.0.0.2", verify=_ca(node))
    with _client(node, transport=stranger) as c:
        for _ in range(5):
            r = c.post("/v1/webapi/login", json={"user": "frank", "password": "not the password!"})
            assert r.status_code == 401
            assert "invalid user name or password" in r.json()["error"]["message"]
        r = c.post("/v1/webapi/login", json={"user": "frank", "password": PW})
        assert r.status_code == 401  # the stranger is locked out, even with the right password
        message = r.json()["error"]["message"]
        assert "from your address" in message and "try again in 20 minutes" in message
    login = node.cli(
        "login", f"--proxy={node.addr}", "--user=frank", "--password-stdin", input=PW + "\n", home=home
    )
    assert "Logged in as: frank" in login.stdout
    failures = [e for e in _audit(node, "user.login") if not e["success"] and e["user"] == "frank"]
    assert {e["remote_addr"] for e in failures} == {"127.0.0.2"}
    # Five bad passwords (the fifth locked the pair), then the right one refused while locked.
    assert sorted(e["extra"]["reason"] for e in failures) == ["locked"] + ["password"] * 5
    assert sum(e.get("extra", {}).get("locked") == "address+user" for e in failures) == 1
    (locked,) = _audit(node, "user.locked")
    assert locked["user"] == "frank" and locked["remote_addr"] == "127.0.0.2"
    ok = [e for e in _audit(node, "user.login") if e["success"] and e["user"] == "frank"]
    assert ok and {e["remote_addr"] for e in ok} == {"127.0.0.1"}
    # Each login issued one credential, audited with its TTL and roles.
    certs = [e for e in _audit(node, "cert.create") if e["extra"]["for"] == "frank"]
    assert len(certs) == len(ok)
    assert all(c["roles"] == ["mcp-user"] and c["extra"]["ttl_s"] > 0 for c in certs)


def test_proxy_mcp_refuses_a_foreign_origin_or_host(node: Node, tmp_path: Path) -> None:
    node.cli("users", "add", "gina", "--roles=mcp-user", local=True)
    with local_proxy(node, "bastion-demo", "gina", tmp_path) as addr, httpx.Client(timeout=30) as c:
        port = addr.rpartition(":")[2]
        url = f"http://{addr}/mcp"
        for foreign in (
            f"http://localhost:{int(port) + 1}",
            "http://localhost:8080",
            "http://evil.example",
            "null",
        ):
            r = c.post(url, json=INIT, headers={**MCP_HEADERS, "Origin": foreign})
            assert r.status_code == 403, (foreign, r.text)
        # DNS rebinding without an Origin: a foreign Host name is refused too.
        for host in (f"evil.example:{port}", f"localhost:{int(port) + 1}"):
            r = c.post(url, json=INIT, headers={**MCP_HEADERS, "Host": host})
            assert r.status_code == 403, (host, r.text)
        for own in (f"http://localhost:{port}", f"http://127.0.0.1:{port}", None):
            headers = {**MCP_HEADERS, **({"Origin": own} if own else {})}
            r = c.post(url, json=INIT, headers=headers)
            assert r.status_code == 200, (own, r.text)


def test_a_user_without_rights_can_neither_see_nor_lift_locks(node: Node, tmp_path: Path) -> None:
    """Locks guard against password guessing: a narrow-rights user must not lift them (for
    themselves or another), nor learn who is locked; each refusal is audited."""
    home = tmp_path / "ivy"
    _user(node, "ivy", "mcp-user", home)
    node.cli("users", "add", "jack", "--roles=mcp-user", local=True)
    stranger = httpx.HTTPTransport(local_address="127.0.0.3", verify=_ca(node))
    with _client(node, transport=stranger) as c:
        for _ in range(5):
            c.post("/v1/webapi/login", json={"user": "jack", "password": "guessing again!"})
    auth = {"Authorization": f"Bearer {_profile_token(home)}"}
    with _client(node) as c:
        for method, path in (("GET", "/v1/users/locks"), ("POST", "/v1/users/jack/unlock")):
            r = c.request(method, path, headers=auth, json={} if method == "POST" else None)
            assert r.status_code == 403, (path, r.text)
            assert "may not" in r.json()["error"]["message"]
    assert re.search(r"jack .*locked from 1 address", node.cli("users", "ls", local=True).stdout)
    denied = [e for e in _audit(node, "access.denied") if e["user"] == "ivy"]
    assert sorted(e["extra"]["path"] for e in denied) == ["/v1/users/jack/unlock", "/v1/users/locks"]
