"""Attacks on the web UI (issue 17) by a signed-in user, over raw HTTPS against `bastion start`.

Each test reproduces a hole found in the adversarial review of the web UI and asserts the safe
behaviour (docs/security.md, section 7): the role editor's YAML is bounded before it is built
(aliases, nesting, problems listed, size), and a user who may not write roles costs nothing.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import ssl
import sys
import time
from collections.abc import Iterator

import httpx
import pyotp
import pytest

from tests.fixtures.hostile_server import HOSTILE
from tests.integration.conftest import start_node, stop_node
from tests.peers import ROOT
from tests.web.conftest import PW, Web

#: Generous on a loaded 2-core machine; each attack took minutes (or gigabytes) before its fix.
QUICK = 8.0


HOSTILE_CMD = [sys.executable, "-m", "tests.fixtures.hostile_server", "--page", "200", "--pad", "5000"]
#: The hostile app: its upstream lists markup as tools, in pages that never end; its labels and
#: description (written by an administrator who pasted them) are markup too.
APPS = f"""\
app_service:
  demo_server: true
  apps:
  - name: hostile
    description: {json.dumps(HOSTILE[1])}
    labels: {{env: hostile, note: {json.dumps(HOSTILE[0])}}}
    mcp:
      command: {HOSTILE_CMD[0]}
      args: {json.dumps(HOSTILE_CMD[1:])}
      run_as_host_user: root
      env: {{PYTHONPATH: "{ROOT}"}}
"""
HOSTILE_USER = """\
kind: role
version: v1
metadata: {name: hostile-user}
spec:
  allow:
    app_labels: {env: hostile}
    mcp: {tools: ["*"]}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    """alice (every rule), mallory (MCP servers, no rules) and eve (the hostile app only)."""
    root = tmp_path_factory.mktemp("webattack")
    node = start_node(root, extra_config=APPS)
    try:
        (root / "hostile-user.yaml").write_text(HOSTILE_USER)
        node.cli("create", str(root / "hostile-user.yaml"), local=True)
        web = Web(node)
        web.add_user("alice", "mcp-user,editor")
        web.add_user("mallory", "mcp-user")
        web.add_user("eve", "hostile-user")
        yield web
    finally:
        stop_node(node)


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, html[:500]
    return m.group(1)


@contextlib.contextmanager
def signed_in(web: Web, user: str) -> Iterator[tuple[httpx.Client, str]]:
    """A browser-like client signed in as ``user``, and its CSRF token."""
    with httpx.Client(base_url=web.url, verify=False, follow_redirects=False, timeout=120) as c:
        page = c.get("/web/login")
        r = c.post("/web/login", data={"csrf": csrf_of(page.text), "user": user, "password": PW})
        assert r.status_code == 303, r.text
        yield c, csrf_of(c.get("/web/apps").text)


@contextlib.contextmanager
def hostile_session(web: Web, token: str, client_info: dict[str, str]) -> Iterator[tuple[httpx.Client, str]]:
    """An MCP session on the hostile app with ``token`` as the bearer: the client (its posts
    carry the session) and the session id."""
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"}
    with httpx.Client(base_url=web.url, verify=False, headers=headers, timeout=60) as mcp:
        params = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": client_info}
        r = mcp.post(
            "/mcp/apps/hostile", json={"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": params}
        )
        assert r.status_code == 200, r.text
        sid = r.headers["mcp-session-id"]
        mcp.headers["Mcp-Session-Id"] = sid
        mcp.post("/mcp/apps/hostile", json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        yield mcp, sid


def laughs(levels: int) -> str:
    """A role whose ``tools`` is 9**levels strings once its aliases are expanded (~50 bytes a
    level)."""
    anchors = ["    a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        anchors.append(f"    a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return (
        "kind: role\nversion: v1\nmetadata:\n  name: laughs\n  labels:\n"
        + "\n".join(anchors)
        + f"\nspec:\n  allow:\n    mcp: {{tools: *a{levels - 1}}}\n"
    )


def save_role(c: httpx.Client, csrf: str, text: str) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    r = c.post("/web/admin/roles/save", data={"csrf": csrf, "name": "", "yaml": text})
    return r, time.monotonic() - start


def test_alias_bomb_in_the_role_editor_is_refused_before_it_is_built(cluster: Web) -> None:
    """500 bytes of anchors and aliases were 43 million strings for pydantic: 14 s and 500 MB
    with 8 levels, minutes and gigabytes with 9, the proxy's event loop blocked meanwhile."""
    with signed_in(cluster, "alice") as (c, csrf):
        text = laughs(8)
        assert len(text) < 600
        r, took = save_role(c, csrf, text)
        assert r.status_code == 400, r.text[:500]
        assert "once its aliases are expanded" in r.text
        assert took < QUICK, took
        # A few aliases are still YAML: a small document that uses them is saved.
        ok = "kind: role\nversion: v1\nmetadata: {name: aliased}\nspec:\n  allow:\n"
        ok += "    app_labels: &l {env: demo}\n    mcp: {tools: [bastion_user_info]}\n  deny:\n"
        ok += "    app_labels: *l\n    mcp: {tools: [nothing_here]}\n"
        r, _ = save_role(c, csrf, ok)
        assert r.status_code == 303, r.text[:800]


def test_deep_nesting_is_the_writer_s_error_not_a_500(cluster: Web) -> None:
    """30,000 ``[`` made PyYAML recurse past Python's limit: a 500 and a traceback in the log."""
    with signed_in(cluster, "alice") as (c, csrf):
        text = "kind: role\nversion: v1\nmetadata: {name: deep}\nspec:\n  allow:\n    mcp: {tools: "
        text += "[" * 30000 + "]" * 30000 + "}\n"
        r, took = save_role(c, csrf, text)
        assert r.status_code == 400, r.text[:500]
        assert "levels deep" in r.text and took < QUICK


def test_thousands_of_problems_are_listed_bounded_and_found_in_one_pass(cluster: Web) -> None:
    """Each of 5,500 wrong items re-parsed the whole text to find its line (quadratic: about
    an hour for 64 KiB, the event loop blocked) and all 5,500 were echoed back."""
    with signed_in(cluster, "alice") as (c, csrf):
        text = "kind: role\nversion: v1\nmetadata: {name: many}\nspec:\n  allow:\n    mcp:\n      tools:\n"
        text += "      - []\n" * 5500
        r, took = save_role(c, csrf, text)
        assert r.status_code == 400, r.text[:500]
        assert took < QUICK, took
        shown = re.findall(r'class="error line-error"', r.text)
        assert 0 < len(shown) <= 60, len(shown)
        assert "more problems" in r.text
        # The page is the text (numbered lines, and the editor) and 50 problems, nothing more
        # (the 5,500 problems alone were ~330 KB more).
        assert len(r.content) < 450 * 1024, len(r.content)


def test_a_role_longer_than_the_editor_takes_is_refused_not_cut(cluster: Web) -> None:
    """The text was cut to 64 KiB and saved: the deny rules written after the cut were lost,
    and the role that was saved allowed more than the one the administrator wrote."""
    with signed_in(cluster, "alice") as (c, csrf):
        text = "kind: role\nversion: v1\nmetadata:\n  name: cut\n  description: >-\n"
        text += "    padding padding padding\n" * 2600  # ~68 KiB of description
        text += "spec:\n  allow:\n    app_labels: {env: demo}\n    mcp: {tools: ['*']}\n"
        text += "  deny:\n    mcp: {tools: [bastion_user_info]}\n"
        assert len(text) > 64 * 1024
        r, _ = save_role(c, csrf, text)
        assert r.status_code == 413, r.text[:500]
        assert "at most 64 KiB" in r.text
    assert "cut" not in cluster.node.cli("get", "roles", local=True).stdout.split()


def test_a_user_who_may_not_write_roles_is_refused_before_the_yaml_is_read(cluster: Web) -> None:
    """Validation ran before the rule check: anyone signed in could make the proxy build their
    document (the bomb above included)."""
    with signed_in(cluster, "mallory") as (c, csrf):
        for text in (laughs(8), "x: " + "[" * 30000):
            r, took = save_role(c, csrf, text)
            assert r.status_code == 403, r.text[:500]
            assert took < QUICK, took
        # The web API's create answers the same refusal, before the document is validated.
        token = c.cookies["__Host-bastion-session"]
    r = httpx.post(
        f"{cluster.url}/v1/resources",
        json={"kind": "role", "version": "v1", "metadata": {"name": "m"}, "spec": {"allow": {"x": 1}}},
        headers={"Authorization": f"Bearer {token}"},
        verify=False,
    )
    assert r.status_code == 403, r.text
    found = cluster.node.cli(
        "audit", "search", "--type=access.denied", "--user=mallory", "--format=json", local=True
    )
    paths = [e["extra"].get("path") for e in json.loads(found.stdout) if e["extra"].get("via") == "web"]
    assert "/web/admin/roles/save" in paths, paths


def _no_live_markup(html: str) -> None:
    """None of the hostile payloads is live markup in ``html`` (each may appear escaped)."""
    for bad in ("<script>alert", "<img src=x", "<iframe", 'href="javascript:'):
        assert bad not in html, bad


def test_a_hostile_upstream_s_tools_are_bounded_and_shown_as_text(cluster: Web) -> None:
    """The tools page asked for ``tools/list`` pages for as long as the upstream named a next
    one: one click held the proxy 10 s and grew it by 550 MB (then showed a timeout)."""
    with signed_in(cluster, "eve") as (c, _):
        apps = c.get("/web/apps")
        assert apps.status_code == 200
        _no_live_markup(apps.text)
        assert "&lt;script&gt;" in apps.text  # the label, shown as text
        for path in ("/web/apps/hostile/tools", "/web/apps/hostile/tools?part=1"):
            start = time.monotonic()
            r = c.get(path)
            took = time.monotonic() - start
            assert r.status_code == 200, r.text[:500]
            assert took < QUICK, took
            assert len(re.findall(r'<li class="tool">', r.text)) == 500
            assert "The first 500 tools only" in r.text
            assert len(r.content) < 2 * 1024 * 1024, len(r.content)
            _no_live_markup(r.text)
            assert "t0&lt;script&gt;alert(&#39;tool&#39;)&lt;/script&gt;" in r.text
            assert "<code>t4{{ 7*7 }}</code>" in r.text  # shown, never rendered as a template
        connect = c.get("/web/apps/hostile/connect")
        assert connect.status_code == 200
        _no_live_markup(connect.text)
        hrefs = re.findall(r'href="([^"]*)"', connect.text)
        assert all(h.startswith(("/", "#", "cursor://", "vscode:")) for h in hrefs), hrefs
        # A call of a tool named with markup: the audit pages show the name as text.
        token = c.cookies["__Host-bastion-session"]
    with hostile_session(cluster, token, {"name": HOSTILE[3], "version": HOSTILE[1]}) as (mcp, sid):
        call = {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "t1" + HOSTILE[1], "arguments": {HOSTILE[0]: HOSTILE[3]}},
        }
        assert mcp.post("/mcp/apps/hostile", json=call).status_code == 200
    with signed_in(cluster, "alice") as (c, _):
        page = c.get("/web/audit?user=eve")
        assert page.status_code == 200 and "eve" in page.text
        _no_live_markup(page.text)
        session = c.get(f"/web/audit/session/{sid}")
        assert session.status_code == 200 and "tools/call" in session.text, session.text[:300]
        _no_live_markup(session.text)


def test_a_one_time_code_signs_in_once(cluster: Web) -> None:
    """A code seen once (over a shoulder, by a phishing page relaying it) signed in again with
    the password for as long as it was valid (up to 90 s): RFC 6238 says a verifier must not
    accept it twice."""
    out = cluster.node.cli("users", "add", "tina", "--roles=mcp-user", local=True).stdout
    code = re.search(r"--invite=(\S+)", out)
    assert code, out
    secret = pyotp.random_base32()
    with httpx.Client(base_url=cluster.url, verify=False, follow_redirects=False) as c:
        page = c.get(f"/web/invite/{code.group(1)}")
        form = {"csrf": csrf_of(page.text), "code": code.group(1), "password": PW, "password2": PW}
        form |= {"totp_secret": secret, "otp": pyotp.TOTP(secret).now()}
        r = c.post("/web/invite", data=form)
        assert r.status_code == 303, r.text[:500]
    otp = pyotp.TOTP(secret).now()

    def sign_in() -> httpx.Response:
        with httpx.Client(base_url=cluster.url, verify=False, follow_redirects=False) as c:
            page = c.get("/web/login")
            return c.post(
                "/web/login", data={"csrf": csrf_of(page.text), "user": "tina", "password": PW, "otp": otp}
            )

    assert sign_in().status_code == 303
    again = sign_in()
    assert again.status_code == 401 and "used already" in again.text, again.text[:500]
    # The web API's login (what `bastion login` calls) refuses it as well, audited.
    r = httpx.post(
        f"{cluster.url}/v1/webapi/login", json={"user": "tina", "password": PW, "otp": otp}, verify=False
    )
    assert r.status_code == 401, r.text
    found = cluster.node.cli(
        "audit", "search", "--type=user.login", "--user=tina", "--format=json", local=True
    )
    reasons = [(e.get("extra") or {}).get("reason") for e in json.loads(found.stdout)]
    assert reasons.count("second_factor_reused") >= 2, reasons


def test_a_session_of_large_arguments_does_not_make_a_huge_audit_page(cluster: Web) -> None:
    """A user with one tool filled a session with calls of 60 KiB arguments (each stored, as
    the audit bound allows): the session page rendered every argument whole for up to 5,000
    events — hundreds of MB built in the proxy for whoever opened it, and a session nobody
    could review."""
    calls, size = 200, 60 * 1024
    with signed_in(cluster, "eve") as (c, _):
        token = c.cookies["__Host-bastion-session"]
    with hostile_session(cluster, token, {"name": "e", "version": "1"}) as (mcp, sid):
        for i in range(1, calls + 1):
            params = {"name": "t0", "arguments": {"a": f"{i:06d}" + "x" * size}}
            r = mcp.post(
                "/mcp/apps/hostile",
                json={"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": params},
            )
            assert r.status_code == 200, r.text
    with signed_in(cluster, "alice") as (c, _):
        deadline = time.monotonic() + 30
        while True:  # the audit log is written behind the calls
            page = c.get(f"/web/audit/session/{sid}")
            assert page.status_code == 200
            if page.text.count("tools/call") >= calls or time.monotonic() > deadline:
                break
        assert page.text.count("tools/call") >= calls
        assert len(page.content) < 3 * 1024 * 1024, len(page.content)  # was ~12 MB for 200 calls
        assert "more characters" in page.text  # each argument cut, saying so
        export = c.get(f"/web/audit/export.jsonl?session={sid}")  # the whole record stays there
        assert export.status_code == 200 and len(export.content) > calls * size


def test_an_audit_page_does_not_read_what_it_skips_without_bound(cluster: Web) -> None:
    """``skip`` (the ties shown on earlier pages) came from the URL up to 99,999, and a page
    reads the events it skips: one URL read 100,000 events, arguments and all, into the proxy."""
    with signed_in(cluster, "alice") as (c, _):
        now = c.get("/web/audit")
        assert now.status_code == 200
        r = c.get(
            "/web/audit", params={"since": "24h", "before": "2100-01-01T00:00:00+00:00", "skip": "99999"}
        )
        assert r.status_code == 200
        assert "share one time: export the filtered list instead" in r.text
        r = c.get("/web/audit", params={"since": "24h", "before": "2100-01-01T00:00:00+00:00", "skip": "3"})
        assert "share one time" not in r.text


def test_the_tools_page_s_mcp_session_is_audited_from_the_browser_s_address(cluster: Web) -> None:
    """The tools page's MCP session came from the proxy's own loopback address: its audit
    events did not say where the user was, and every web user shared one per-source bound."""
    transport = httpx.HTTPTransport(local_address="127.0.0.2", verify=False)
    with httpx.Client(base_url=cluster.url, transport=transport, follow_redirects=False, timeout=60) as c:
        page = c.get("/web/login")
        r = c.post("/web/login", data={"csrf": csrf_of(page.text), "user": "mallory", "password": PW})
        assert r.status_code == 303, r.text
        assert c.get("/web/apps/bastion-demo/tools?part=1").status_code == 200
    found = cluster.node.cli(
        "audit", "search", "--type=mcp.session.start", "--user=mallory", "--format=json", local=True
    )
    addrs = {e.get("remote_addr") for e in json.loads(found.stdout)}
    assert addrs == {"127.0.0.2"}, addrs


def test_every_ui_answer_carries_the_security_headers(cluster: Web) -> None:
    """Starlette's own 404 and 405 under /web, and the redirects (the sign-in's carries the
    session cookie), had no CSP, no frame-ancestors, no nosniff and no ``no-store``."""
    with httpx.Client(base_url=cluster.url, verify=False, follow_redirects=False) as c:
        page = c.get("/web/login")
        answers = {
            "unknown page": c.get("/web/no-such-page"),
            "wrong method": c.get("/web/logout"),
            "redirect": c.get("/"),
            "sign-in": c.post(
                "/web/login", data={"csrf": csrf_of(page.text), "user": "alice", "password": PW}
            ),
        }
    assert answers["unknown page"].status_code == 404 and answers["wrong method"].status_code == 405
    assert answers["sign-in"].status_code == 303
    for what, r in answers.items():
        assert "frame-ancestors 'none'" in r.headers.get("content-security-policy", ""), what
        assert r.headers.get("x-content-type-options") == "nosniff", what
        assert r.headers.get("cache-control") == "no-store", what


def test_guessed_invite_links_are_audited(cluster: Web) -> None:
    """A wrong code on the invite page (and the web API's invite info) was refused without a
    trace: a scan of invite links left none. (Codes are 192 random bits: not guessable, but
    the attempt is a refusal, and refusals are audited.)"""
    transport = httpx.HTTPTransport(local_address="127.0.0.3", verify=False)
    with httpx.Client(base_url=cluster.url, transport=transport) as c:
        for i in range(3):
            assert c.get(f"/web/invite/guess-{i}").status_code == 404
        assert c.post("/v1/webapi/invites/info", json={"code": "guess-api"}).status_code in (401, 404)
    found = cluster.node.cli("audit", "search", "--type=invite.use", "--format=json", local=True)
    refused = [
        e for e in json.loads(found.stdout) if not e["success"] and e.get("remote_addr") == "127.0.0.3"
    ]
    assert len(refused) == 4, refused
    assert all((e.get("extra") or {}).get("step") == "info" for e in refused)


def _answer_before_the_body(web: Web, path: str, *, declared: int = 0, chunked: int = 0) -> bytes:
    """Send a POST declaring ``declared`` bytes of body and sending none, or sending ``chunked``
    bytes in chunks and never the last chunk; then read: the proxy must answer without waiting
    for (and holding) the rest."""
    host, port = web.node.addr.rsplit(":", 1)
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    framing = f"Content-Length: {declared}" if declared else "Transfer-Encoding: chunked"
    with socket.create_connection((host, int(port)), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {web.node.addr}\r\n"
            f"Content-Type: application/x-www-form-urlencoded\r\n{framing}\r\n\r\n"
        )
        tls.sendall(head.encode())
        chunk = b"10000\r\n" + b"a" * 65536 + b"\r\n"
        for _ in range(chunked // 65536):
            tls.sendall(chunk)
        tls.settimeout(10)
        try:
            return tls.recv(4096)
        except TimeoutError:
            return b""


def test_a_huge_body_is_refused_without_reading_it(cluster: Web) -> None:
    """The sign-in form (no session needed) and the web API read the whole body before
    checking its size: anyone could make the proxy hold any number of gigabytes."""
    for path, most in (("/web/login", 256 * 1024), ("/v1/webapi/login", 1024 * 1024)):
        # Said up front: refused at once.
        answer = _answer_before_the_body(cluster, path, declared=1 << 30)
        assert answer.startswith(b"HTTP/1.1 400"), (path, answer[:200])
        # Not said (chunks): refused once the limit is passed, before the body ends.
        answer = _answer_before_the_body(cluster, path, chunked=2 * most)
        assert answer.startswith(b"HTTP/1.1 400"), (path, answer[:200])


def test_asking_for_an_app_one_may_not_reach_is_audited(cluster: Web) -> None:
    """The tools and connect pages answered an app the user may not reach like a missing one
    (right) but left no trace (the MCP path audits the same request as a refusal)."""
    with signed_in(cluster, "eve") as (c, _):  # eve reaches the hostile app only
        for path in ("/web/apps/bastion-demo/tools", "/web/apps/bastion-demo/connect?part=1"):
            r = c.get(path)
            assert r.status_code == 404 and "that you may use" in r.text, r.text[:300]
            assert "stdio" not in r.text  # nothing of the hidden app is shown
    found = cluster.node.cli(
        "audit", "search", "--type=access.denied", "--user=eve", "--format=json", local=True
    )
    paths = {(e.get("extra") or {}).get("path") for e in json.loads(found.stdout)}
    assert {"/web/apps/bastion-demo/tools", "/web/apps/bastion-demo/connect"} <= paths, paths
