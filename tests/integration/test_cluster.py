"""Issue 2's acceptance, as a new user runs it: start, invite, login, status, roles, identity files."""

from __future__ import annotations

import re
import socket
import ssl
import stat
import subprocess
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pyotp
import pytest

from bastion.auth import credentials
from bastion.auth.ca import generate_ca
from tests.integration.conftest import Node, bastion_cmd

PW = "correct horse battery staple"


def _invite(node: Node, name: str, roles: str, *extra: str) -> tuple[str, str]:
    res = node.cli("users", "add", name, f"--roles={roles}", *extra, local=True)
    code = re.search(r"--invite=(\S+)", res.stdout)
    fp = re.search(r"--ca-fingerprint=(\S+)", res.stdout)
    assert code and fp, res.stdout
    return code.group(1), fp.group(1)


def _user(node: Node, name: str, roles: str, home: Path) -> None:
    code, fp = _invite(node, name, roles)
    set_password(node, code, fp, PW, home)
    log_in(node, name, PW, home)


def set_password(node: Node, code: str, fp: str, password: str, home: Path) -> None:
    """Use an invite as its user would (`bastion users set-password`)."""
    node.cli(
        "users",
        "set-password",
        f"--proxy={node.addr}",
        f"--ca-fingerprint={fp}",
        f"--invite={code}",
        "--password-stdin",
        input=password + "\n",
        home=home,
    )


def log_in(node: Node, user: str, password: str, home: Path) -> None:
    node.cli(
        "login",
        f"--proxy={node.addr}",
        f"--user={user}",
        "--password-stdin",
        input=password + "\n",
        home=home,
    )


def _ca(node: Node) -> ssl.SSLContext:
    pem = node.cli("auth", "export", "--type=tls", local=True).stdout
    return ssl.create_default_context(cadata=pem)


def test_find_and_health(node: Node) -> None:
    with httpx.Client(verify=_ca(node)) as c:
        find = c.get(f"https://{node.addr}/v1/webapi/find").json()
        assert find["cluster_name"] == "itest"
        assert find["server_version"]
        assert c.get(f"https://{node.addr}/healthz").status_code == 200
        assert c.get(f"https://{node.addr}/readyz").status_code == 200


def _handshake(node: Node, version: ssl.TLSVersion) -> str | None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ctx.maximum_version = version
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    host, port = node.addr.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=host) as tls:
                return tls.version()
        except ssl.SSLError:
            return None


def test_tls_below_1_2_is_refused(node: Node) -> None:
    assert _handshake(node, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    assert _handshake(node, ssl.TLSVersion.TLSv1_1) is None


def test_invite_login_status(node: Node, tmp_path: Path) -> None:
    home = tmp_path / "alice"
    code, fp = _invite(node, "alice", "mcp-user")
    set_pw = [
        f"--proxy={node.addr}",
        f"--ca-fingerprint={fp}",
        f"--invite={code}",
        "--password-stdin",
    ]
    node.cli("users", "set-password", *set_pw, input=PW + "\n", home=home)
    again = node.cli("users", "set-password", *set_pw, input=PW + "\n", home=home, check=False)
    assert again.returncode == 1
    assert "already used or expired" in again.stderr

    login = node.cli(
        "login",
        f"--proxy={node.addr}",
        "--user=alice",
        "--password-stdin",
        input=PW + "\n",
        home=home,
    )
    assert "Logged in as: alice" in login.stdout
    status = node.cli("status", home=home).stdout
    assert "Logged in as: alice" in status
    assert "Roles:        mcp-user" in status
    m = re.search(r"valid for (\d+)h", status)
    assert m and 11 <= int(m.group(1)) <= 12, status
    profile = next((home / "profiles").iterdir())
    assert stat.S_IMODE(profile.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert PW not in profile.read_text()
    assert PW not in node.log.read_text()


def test_user_without_rules_is_refused(node: Node, tmp_path: Path) -> None:
    home = tmp_path / "nora"
    _user(node, "nora", "mcp-user", home)
    before = node.cli("get", "roles", "--format=json", local=True).stdout
    res = node.cli("get", "roles", home=home, check=False)
    assert res.returncode == 1
    assert 'user "nora" may not list role resources' in res.stderr
    role = tmp_path / "r.yaml"
    role.write_text(
        "kind: role\nversion: v1\nmetadata: {name: sneaky}\n"
        "spec: {allow: {rules: [{resources: ['*'], verbs: ['*']}]}}\n"
    )
    res = node.cli("create", str(role), home=home, check=False)
    assert res.returncode == 1
    assert "may not create role" in res.stderr
    assert node.cli("get", "roles", "--format=json", local=True).stdout == before


def test_editor_manages_roles(node: Node, tmp_path: Path) -> None:
    home = tmp_path / "bob"
    _user(node, "bob", "editor", home)
    role = tmp_path / "role.yaml"
    role.write_text(
        "kind: role\nversion: v1\nmetadata:\n  name: echo-only\nspec:\n  allow:\n"
        "    app_labels: {env: dev}\n    mcp:\n      tools: [echo]\n"
    )
    assert 'role "echo-only" has been created' in node.cli("create", str(role), home=home).stdout
    dup = node.cli("create", str(role), home=home, check=False)
    assert dup.returncode == 1
    assert "already exists" in dup.stderr
    assert "-f" in dup.stderr
    role.write_text(role.read_text().replace("[echo]", "[echo, get-sum]"))
    assert "has been written" in node.cli("create", "-f", str(role), home=home).stdout
    text = node.cli("get", "roles", "--format=text", home=home).stdout
    assert re.search(r"echo-only\s+env=dev\s+echo,get-sum", text), text
    assert "mcp-user" in text
    assert "editor" in text
    assert "access" in text
    shown = node.cli("get", "role/echo-only", home=home).stdout
    assert "get-sum" in shown
    assert "kind: role" in shown
    node.cli("rm", "role/echo-only", home=home)
    gone = node.cli("get", "role/echo-only", home=home, check=False)
    assert gone.returncode == 1
    assert 'role "echo-only" not found' in gone.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kind: role\nmetadata: {name: x\n", "line 3"),
        ("kind: widget\nmetadata: {name: x}\n", 'unknown kind "widget"'),
        (
            "kind: role\nmetadata: {name: x}\nspec: {allow: {colour: red}}\n",
            "spec.allow.colour: unknown field",
        ),
        (
            "kind: role\nmetadata: {name: x}\nspec: {allow: {app_labels: {env: '^(dev$'}}}\n",
            "invalid regular expression",
        ),
        ("kind: role\nkind: user\nmetadata: {name: x}\n", 'duplicate key "kind"'),
        (
            "kind: app\nmetadata: {name: x}\nspec: {uri: 'mcp+ftp://h:1/'}\n",
            'spec.uri: unknown scheme "mcp+ftp"',
        ),
    ],
)
def test_bad_input_changes_nothing(node: Node, tmp_path: Path, text: str, message: str) -> None:
    before = node.cli("get", "roles", "--format=json", local=True).stdout
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    res = node.cli("create", str(f), local=True, check=False)
    assert res.returncode == 1
    assert message in res.stderr, res.stderr
    assert node.cli("get", "roles", "--format=json", local=True).stdout == before


def test_identity_file(node: Node, tmp_path: Path) -> None:
    node.cli("users", "add", "robot", "--roles=editor", local=True)
    ident = tmp_path / "robot.id"
    node.cli("auth", "sign", "--user=robot", "--ttl=1h", f"--out={ident}", local=True)
    assert stat.S_IMODE(ident.stat().st_mode) == 0o600
    status = node.cli("status", "-i", str(ident), "--proxy", node.addr, home=tmp_path / "empty").stdout
    assert "Logged in as: robot" in status
    assert "editor" in status
    roles = node.cli("get", "roles", "-i", str(ident), "--proxy", node.addr, home=tmp_path / "empty").stdout
    assert "name: editor" in roles


def test_bearer_tokens(node: Node) -> None:
    token = node.cli("auth", "sign", "--user=alice", "--format=token", local=True).stdout.strip()
    url = f"https://{node.addr}/v1/whoami"
    with httpx.Client(verify=_ca(node)) as c:
        ok = c.get(url, headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200
        assert ok.json()["user"] == "alice"
        head, body, sig = token.split(".")
        flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
        now = datetime.now(UTC)
        foreign, _ = credentials.issue(
            generate_ca("user", "itest", now),
            username="alice",
            roles=["editor"],
            traits={},
            ttl=timedelta(hours=1),
            now=now,
        )
        for bad in (f"{head}.{body}.{flipped}", foreign, "not-a-token"):
            r = c.get(url, headers={"Authorization": f"Bearer {bad}"})
            assert r.status_code == 401, bad
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert r.headers["x-bastion-error-origin"] == "client"
            assert "log in" in r.json()["error"]["message"] or "no credential" in r.json()["error"]["message"]
        assert c.get(url).status_code == 401


def test_wrong_password_same_answer_as_unknown_user(node: Node, tmp_path: Path) -> None:
    home = tmp_path / "h"
    _user(node, "carol", "mcp-user", home)
    answers = []
    for user in ("carol", "nobody-here"):
        res = node.cli(
            "login",
            f"--proxy={node.addr}",
            f"--user={user}",
            "--password-stdin",
            input="not the password!\n",
            home=home,
            check=False,
        )
        assert res.returncode == 1
        answers.append(res.stderr)
    assert answers[0] == answers[1]
    assert "invalid user name or password" in answers[0]


def test_first_contact_needs_the_fingerprint(node: Node, tmp_path: Path) -> None:
    home = tmp_path / "fresh"
    res = node.cli(
        "login",
        f"--proxy={node.addr}",
        "--user=alice",
        "--password-stdin",
        input=PW + "\n",
        home=home,
        check=False,
    )
    assert res.returncode == 1
    assert "not pinned yet" in res.stderr
    assert "SHA256:" in res.stderr
    res = node.cli(
        "login",
        f"--proxy={node.addr}",
        "--user=alice",
        "--password-stdin",
        "--ca-fingerprint=SHA256:AAAA",
        input=PW + "\n",
        home=home,
        check=False,
    )
    assert res.returncode == 1
    assert "refusing to connect" in res.stderr
    assert not (home / "profiles").exists()


def test_join_tokens(node: Node) -> None:
    secret = node.cli("tokens", "add", "--type=app", "--format=text", local=True).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", secret), secret
    guide = node.cli("tokens", "add", "--type=app", local=True).stdout
    assert re.search(r"^The join token: [0-9a-f]{32}$", guide, re.M), guide
    assert re.search(r'ca_pin: "SHA256:[A-Za-z0-9+/]{43}"', guide), guide
    assert f'proxy_server: "{node.addr}"' in guide, guide
    listed = node.cli("tokens", "ls", local=True).stdout
    ids = re.findall(r"^([0-9a-f]{16})\s+app\s", listed, re.M)
    assert ids, listed
    assert secret not in listed
    for i in ids:
        node.cli("tokens", "rm", i, local=True)
    assert not re.findall(r"^[0-9a-f]{16}\s+app", node.cli("tokens", "ls", local=True).stdout, re.M)
    bad = node.cli("tokens", "add", "--type=db", local=True, check=False)
    assert bad.returncode == 1
    assert 'unknown join type "db"' in bad.stderr


def test_totp_second_factor(node: Node, tmp_path: Path) -> None:
    home = tmp_path / "t"
    code, fp = _invite(node, "tina", "mcp-user")
    secret = pyotp.random_base32()
    node.cli(
        "users",
        "set-password",
        f"--proxy={node.addr}",
        f"--ca-fingerprint={fp}",
        f"--invite={code}",
        "--password-stdin",
        f"--totp-secret={secret}",
        f"--otp={pyotp.TOTP(secret).now()}",
        input=PW + "\n",
        home=home,
    )
    login = ["login", f"--proxy={node.addr}", "--user=tina", "--password-stdin"]
    res = node.cli(*login, input=PW + "\n", home=home, check=False)
    assert res.returncode == 1
    assert "one-time code is required" in res.stderr
    ok = node.cli(*login, f"--otp={pyotp.TOTP(secret).now()}", input=PW + "\n", home=home)
    assert "Logged in as: tina" in ok.stdout


def test_invalid_config_stops_startup_before_listening(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        f"version: v1\nbastion: {{data_dir: {tmp_path / 'd'}}}\n"
        f"proxy_service: {{listen_addr: '127.0.0.1:{port}'}}\n"
        "app_service:\n  apps:\n  - name: x\n    uri: mcp+ftp://example.com/\n"
    )
    res = subprocess.run(
        bastion_cmd("start", "--config", str(cfg)), capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2
    assert 'app_service.apps[0].uri: unknown scheme "mcp+ftp"' in res.stderr
    assert not (tmp_path / "d").exists()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
