"""The web UI's guards, over raw HTTPS (no browser: the bytes an attacker would send).

The session cookie's flags and lifetime (capped by the user's roles); CSRF tokens on every
state-changing request (missing, another session's, or from another origin: refused with 403
and audited as ``access.denied``); the Content-Security-Policy on every page and no inline
script or style anywhere; a user without rules gets no admin page and no admin API answer;
a deleted user's cookie stops working at once; invite codes stay out of the access log.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator

import httpx
import pytest

from bastion.webui import guard
from tests.web.conftest import PW, Web, running_web

SHORT = """\
kind: role
version: v1
metadata: {name: short-sessions}
spec:
  options: {max_session_ttl: 10m}
  allow:
    app_labels: {env: demo}
    mcp: {tools: [bastion_user_info]}
"""
PAGES = (
    "/web/apps",
    "/web/apps/bastion-demo/tools",
    "/web/apps/bastion-demo/connect",
    "/web/audit",
    "/web/admin/roles",
    "/web/admin/roles/new",
    "/web/admin/users",
    "/web/admin/tokens",
    "/web/admin/apps",
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    with running_web(tmp_path_factory.mktemp("webguard")) as web:
        role = web.node.root / "short.yaml"
        role.write_text(SHORT)
        web.node.cli("create", str(role), local=True)
        web.add_user("shorty", "short-sessions")
        web.add_user("mallory", "mcp-user")  # may use MCP servers; no rules at all
        yield web


def browser(web: Web) -> httpx.Client:
    return httpx.Client(base_url=web.url, verify=False, follow_redirects=False)


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, html[:500]
    return m.group(1)


def sign_in(web: Web, user: str) -> tuple[httpx.Client, httpx.Response]:
    c = browser(web)
    page = c.get("/web/login")
    r = c.post("/web/login", data={"csrf": csrf_of(page.text), "user": user, "password": PW})
    assert r.status_code == 303, r.text
    return c, r


@pytest.fixture
def alice(cluster: Web) -> Iterator[httpx.Client]:
    c, _ = sign_in(cluster, "alice")
    with contextlib.closing(c):
        yield c


def denied_events(web: Web, alice: httpx.Client) -> list[dict[str, object]]:
    token = alice.cookies[guard.SESSION_COOKIE]
    r = httpx.get(
        f"{web.url}/v1/audit/events?type=access.denied&since=1h",
        headers={"Authorization": f"Bearer {token}"},
        verify=False,
    )
    assert r.status_code == 200, r.text
    return [e for e in r.json() if (e.get("extra") or {}).get("via") == "web"]


def test_session_cookie_flags(cluster: Web) -> None:
    c, r = sign_in(cluster, "alice")
    with contextlib.closing(c):
        cookies = r.headers.get_list("set-cookie")
    session = next(v for v in cookies if v.startswith(guard.SESSION_COOKIE + "="))
    attrs = {a.strip().split("=")[0].lower(): a for a in session.split(";")[1:]}
    assert {"httponly", "secure", "samesite", "path", "max-age"} <= set(attrs), session
    assert attrs["samesite"].strip() == "SameSite=Strict" and attrs["path"].strip() == "Path=/"
    assert "domain" not in attrs  # __Host-: no sibling host can set or read it
    assert 0 < int(attrs["max-age"].split("=")[1]) <= 8 * 3600


def test_session_lifetime_is_capped_by_the_roles(cluster: Web) -> None:
    c, r = sign_in(cluster, "shorty")
    c.close()
    session = next(v for v in r.headers.get_list("set-cookie") if v.startswith(guard.SESSION_COOKIE))
    max_age = int(re.search(r"Max-Age=(\d+)", session).group(1))  # type: ignore[union-attr]
    assert max_age <= 600, session


def test_state_changes_without_the_csrf_token_are_refused_and_audited(
    alice: httpx.Client, cluster: Web
) -> None:
    before = len(denied_events(cluster, alice))
    # No token: sign-out does not happen, no user is created.
    r = alice.post("/web/logout", data={})
    assert r.status_code == 403 and "CSRF" in r.text
    assert alice.get("/web/apps").status_code == 200
    r = alice.post("/web/admin/users", data={"name": "csrf-victim", "roles": "editor"})
    assert r.status_code == 403
    # Another session's token is no better.
    other, _ = sign_in(cluster, "alice")
    with contextlib.closing(other):
        foreign = csrf_of(other.get("/web/apps").text)
    r = alice.post("/web/admin/users", data={"csrf": foreign, "name": "csrf-victim", "roles": "editor"})
    assert r.status_code == 403
    # The right token from another origin: refused too.
    mine = csrf_of(alice.get("/web/apps").text)
    r = alice.post(
        "/web/admin/users",
        data={"csrf": mine, "name": "csrf-victim", "roles": "editor"},
        headers={"Origin": "https://evil.example"},
    )
    assert r.status_code == 403 and "Origin" in r.text
    assert "csrf-victim" not in alice.get("/web/admin/users").text
    # Sign-in needs its pre-session token as well.
    with browser(cluster) as fresh:
        r = fresh.post("/web/login", data={"user": "alice", "password": PW})
        assert r.status_code == 403 and guard.SESSION_COOKIE not in r.headers.get("set-cookie", "")
    events = denied_events(cluster, alice)
    assert len(events) >= before + 5, events
    assert {e["extra"]["path"] for e in events[: len(events) - before]} >= {"/web/logout", "/web/admin/users"}  # type: ignore[index]


def test_with_the_token_the_same_request_works(alice: httpx.Client) -> None:
    r = alice.post("/web/logout", data={"csrf": csrf_of(alice.get("/web/apps").text)})
    assert r.status_code == 303 and r.headers["location"] == "/web/login"
    assert alice.get("/web/apps").status_code == 302


def test_csp_forbids_inline_scripts_and_other_origins(alice: httpx.Client, cluster: Web) -> None:
    with browser(cluster) as anonymous:
        answers = [("/web/login", anonymous.get("/web/login"))]
    answers += [(path, alice.get(path)) for path in PAGES]
    for path, r in answers:
        assert r.status_code == 200, (path, r.status_code)
        csp = r.headers["content-security-policy"]
        directives = {d.split()[0]: d.split()[1:] for d in csp.split(";") if d.strip()}
        assert directives["default-src"] == ["'self'"]
        assert directives["script-src"] == ["'self'"]  # no 'unsafe-inline', no other origin
        assert directives["style-src"] == ["'self'"]
        assert directives["object-src"] == ["'none'"] and directives["frame-ancestors"] == ["'none'"]
        assert directives["base-uri"] == ["'none'"] and directives["form-action"] == ["'self'"]
        assert r.headers["x-content-type-options"] == "nosniff"
        html = r.text
        assert not re.search(r"<script(?![^>]*\bsrc=\"/web/static/)", html), path  # only our file
        assert not re.search(r"\son[a-z]+\s*=", html, re.I), path  # no inline handlers
        assert not re.search(r"<style|\sstyle\s*=", html, re.I), path  # no inline styles
        assert not re.search(r"(src|href)=\"(https?:)?//", html), path  # nothing from elsewhere


def test_user_without_rules_gets_no_admin_pages_or_api(cluster: Web) -> None:
    c, _ = sign_in(cluster, "mallory")
    with contextlib.closing(c):
        page = c.get("/web/apps")
        assert page.status_code == 200
        for label in ("Audit log", "Roles", "Users", "Join tokens"):
            assert f">{label}<" not in page.text
        for path in ("/web/audit", "/web/audit/export.jsonl", "/web/audit/feed", *PAGES[4:]):
            r = c.get(path)
            assert r.status_code == 403, (path, r.status_code)
        r = c.post(
            "/web/admin/users", data={"csrf": csrf_of(page.text), "name": "mallory2", "roles": "editor"}
        )
        assert r.status_code == 403
        token = c.cookies[guard.SESSION_COOKIE]
    bearer = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=cluster.url, verify=False, headers=bearer) as api:
        for path in ("/v1/resources/role", "/v1/resources/user", "/v1/audit/events", "/v1/users/locks"):
            assert api.get(path).status_code == 403, path
        assert api.post("/v1/users", json={"name": "mallory2", "roles": ["editor"]}).status_code == 403
    assert "mallory2" not in cluster.node.cli("users", "ls", local=True).stdout
    # Each refusal on a page is audited as the web API audits its own.
    found = cluster.node.cli(
        "audit", "search", "--type=access.denied", "--user=mallory", "--format=json", local=True
    )
    paths = {e["extra"]["path"] for e in json.loads(found.stdout) if e["extra"].get("via") == "web"}
    assert {"/web/audit", "/web/admin/roles", "/web/admin/users"} <= paths, paths


def test_a_deleted_user_loses_access_at_once(cluster: Web) -> None:
    cluster.add_user("gone", "mcp-user")
    c, _ = sign_in(cluster, "gone")
    with contextlib.closing(c):
        assert c.get("/web/apps").status_code == 200
        cluster.node.cli("users", "rm", "gone", local=True)
        r = c.get("/web/apps")
        assert r.status_code == 302 and r.headers["location"] == "/web/login"
        r = c.get("/web/apps/bastion-demo/tools?part=1")
        assert r.status_code == 401


def test_unknown_apps_and_foreign_apps_look_the_same(alice: httpx.Client) -> None:
    a = alice.get("/web/apps/no-such-app/tools")
    assert a.status_code == 404
    assert "no-such-app" in a.text and "<script>" not in alice.get("/web/apps/%3Cscript%3E/tools").text


def test_web_sign_in_is_throttled_like_the_cli_and_unlocked_from_the_users_page(
    cluster: Web, alice: httpx.Client
) -> None:
    cluster.add_user("locky", "mcp-user")
    with browser(cluster) as c:
        for _ in range(5):
            page = c.get("/web/login")
            r = c.post("/web/login", data={"csrf": csrf_of(page.text), "user": "locky", "password": "wrong"})
            assert r.status_code == 401
        page = c.get("/web/login")
        r = c.post("/web/login", data={"csrf": csrf_of(page.text), "user": "locky", "password": PW})
        assert (
            r.status_code == 401 and "too many failed login attempts" in r.text
        )  # the right password, but locked
        users = alice.get("/web/admin/users")
        assert 'aria-label="Unlock locky"' in users.text
        r = alice.post("/web/admin/users/locky/unlock", data={"csrf": csrf_of(users.text)})
        assert r.status_code == 303
        page = c.get("/web/login")
        r = c.post("/web/login", data={"csrf": csrf_of(page.text), "user": "locky", "password": PW})
        assert r.status_code == 303
    found = cluster.node.cli("audit", "search", "--user=locky", "--format=json", local=True)
    assert "user.locked" in [e["event"] for e in json.loads(found.stdout)]
    found = cluster.node.cli("audit", "search", "--type=user.unlocked", "--format=json", local=True)
    unlocked = json.loads(found.stdout)
    assert any(e["user"] == "alice" and "locky" in json.dumps(e) for e in unlocked), unlocked
