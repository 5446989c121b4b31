"""Administration and the audit log in the browser, as the issue's story goes.

alice (mcp-user + editor) writes a role in the editor — a YAML mistake is shown at its line —
and gives it to bea; bea's tool list grows without signing out; a tool bea may not call is
refused, and alice's audit page shows the change and the refusal, the session view, the
live tail and the export.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from tests.web.conftest import Web
from tests.web.test_ui import shot, sign_in

TWO_TOOLS = """\
kind: role
version: v1
metadata:
  name: two-tools
  description: user info and session info
spec:
  allow:
    app_labels: {env: demo}
    mcp:
      tools: 5
"""


def _context(browser: Browser, web: Web) -> BrowserContext:
    ctx = browser.new_context(
        base_url=web.url,
        ignore_https_errors=True,
        accept_downloads=True,
        viewport={"width": 1200, "height": 850},
    )
    ctx.set_default_timeout(15_000)
    return ctx


def _signed_in(browser: Browser, web: Web, user: str) -> Iterator[Page]:
    ctx = _context(browser, web)
    page = ctx.new_page()
    sign_in(page, user)
    yield page
    ctx.close()


@pytest.fixture
def alice(browser: Browser, web: Web) -> Iterator[Page]:
    yield from _signed_in(browser, web, "alice")


@pytest.fixture(scope="module")
def bea_user(web: Web) -> str:
    """A limited user of this module's own (its roles change here; bob's stay as they are)."""
    web.add_user("bea", "user-info-only", login=True)
    return "bea"


@pytest.fixture
def bea(browser: Browser, web: Web, bea_user: str) -> Iterator[Page]:
    yield from _signed_in(browser, web, bea_user)


def tool_names(page: Page) -> list[str]:
    page.goto("/web/apps/bastion-demo/tools")
    return page.locator(".tool h3").all_inner_texts()


def test_role_editor_assign_and_the_audit_log(alice: Page, bea: Page, web: Web) -> None:
    assert tool_names(bea) == ["bastion_user_info"]
    # A role with a mistake: the editor names it at its line, as `bastion create` words it.
    alice.get_by_role("link", name="Roles").click()
    alice.get_by_role("link", name="New role").click()
    alice.get_by_label("Role as YAML").fill(TWO_TOOLS)
    alice.get_by_role("button", name="Save").click()
    problem = alice.locator("li#line-10 .line-error")
    expect(problem).to_have_text("line 10: spec.allow.mcp.tools: expected a list, got an integer")
    expect(alice.get_by_label("Role as YAML")).to_have_value(TWO_TOOLS)
    shot(alice, "role-editor-error")
    alice.get_by_label("Role as YAML").fill(
        TWO_TOOLS.replace("tools: 5", "tools: [bastion_user_info, bastion_session_info]")
    )
    alice.get_by_role("button", name="Save").click()
    expect(alice).to_have_url(re.compile(r"/web/admin/roles\?saved=two-tools$"))
    expect(alice.get_by_role("link", name="two-tools")).to_be_visible()
    # Give it to bea.
    alice.get_by_role("link", name="Users").click()
    alice.get_by_label("Roles of bea", exact=True).fill("user-info-only,two-tools")
    alice.get_by_role("button", name="Save roles and traits of bea").click()
    expect(alice.get_by_label("Roles of bea", exact=True)).to_have_value("user-info-only,two-tools")
    shot(alice, "users")
    # bea's tools change while she stays signed in (the front caches actors for 2 s).
    deadline = time.monotonic() + 10
    while (names := tool_names(bea)) != ["bastion_user_info", "bastion_session_info"]:
        assert time.monotonic() < deadline, names
    # A tool bea may not call is refused by the gateway, and audited.
    res = web.node.cli("mcp", "call", "bastion-demo", "bastion_demo_info", home=web.homes["bea"], check=False)
    assert res.returncode != 0 and "bastion_demo_info" in res.stdout + res.stderr, res
    # alice's audit page shows the role change, the user change and the refusal.
    alice.get_by_role("link", name="Audit log").click()
    table = alice.get_by_role("table", name="Audit events")
    expect(table).to_contain_text("role.create")
    expect(table).to_contain_text("user.update")
    shot(alice, "audit")
    alice.get_by_label("User").fill("bea")
    alice.get_by_label("Outcome").select_option("failure")
    alice.get_by_role("button", name="Search").click()
    denied = table.locator("tr", has_text="bastion_demo_info").first
    expect(denied).to_contain_text("failure")
    # The session view: that session's events in order, arguments as stored.
    denied.get_by_role("link", name="session").click()
    expect(alice.get_by_role("heading", name=re.compile("^Session"))).to_be_visible()
    expect(alice.locator("ol.session")).to_contain_text("mcp.session.start")
    expect(alice.locator("ol.session")).to_contain_text("bastion_demo_info")
    # The export: the filtered list as JSON lines.
    alice.go_back()
    with alice.expect_download() as dl:
        alice.get_by_role("link", name="Export as JSON lines").click()
    lines = [json.loads(x) for x in dl.value.path().read_text().splitlines()]
    assert lines and all(e["user"] == "bea" and not e["success"] for e in lines), lines
    assert any(e.get("tool") == "bastion_demo_info" for e in lines)


def test_live_tail_shows_new_events(alice: Page, web: Web) -> None:
    alice.goto("/web/audit")
    alice.get_by_role("button", name="Live tail").click()
    expect(alice.get_by_role("button", name="Live tail (on)")).to_have_attribute("aria-pressed", "true")
    # Something happens in the cluster: a user is added from the command line.
    web.node.cli("users", "add", "tail-probe", "--roles=mcp-user", local=True)
    expect(alice.locator("#events tr.new", has_text="user.create").first).to_contain_text("tail-probe")


def test_limited_user_gets_no_admin_pages(bea: Page) -> None:
    nav = bea.get_by_role("navigation", name="Main")
    expect(nav.get_by_role("link")).to_have_count(1)  # MCP servers only
    for path in ("/web/admin/roles", "/web/admin/users", "/web/audit"):
        bea.goto(path)
        expect(bea.get_by_role("heading", name="Not allowed")).to_be_visible()


APP = """\
kind: app
version: v1
metadata:
  name: wiki
  description: The team wiki
  labels: {env: dev}
spec:
  uri: mcp+https://wiki.example.com/mcp
"""


def test_users_tokens_apps_and_app_services(alice: Page, web: Web) -> None:
    # A user: added (the invite link is shown), given a trait, reset, deleted.
    alice.goto("/web/admin/users")
    alice.get_by_label("Name", exact=True).fill("erin")
    alice.get_by_label("Roles", exact=True).fill("mcp-user")
    alice.get_by_role("button", name="Add user").click()
    link = alice.locator("#invite-url")
    expect(link).to_contain_text(f"https://{web.node.addr}/web/invite/")
    first_invite = link.inner_text()
    alice.get_by_label("Traits of erin", exact=True).fill("team=blue")
    alice.get_by_role("button", name="Save roles and traits of erin").click()
    expect(alice.get_by_label("Traits of erin", exact=True)).to_have_value("team=blue")
    alice.get_by_role("button", name="Reset erin").click()
    expect(alice.locator("#invite-url")).to_contain_text("/web/invite/")
    assert alice.locator("#invite-url").inner_text() != first_invite
    alice.get_by_role("button", name="Delete erin").click()
    expect(alice.get_by_label("Roles of erin", exact=True)).to_have_count(0)
    users = web.node.cli("users", "ls", local=True).stdout
    assert "erin" not in users
    # A join token: the token, the CA pin and the configuration; listed; deleted.
    alice.goto("/web/admin/tokens")
    alice.get_by_label("Valid for").fill("10m")
    alice.get_by_role("button", name="New app service token").click()
    expect(alice.locator("#join-token")).to_have_text(re.compile(r"^[0-9a-f]{32}$"))
    expect(alice.locator("#join-config")).to_contain_text('ca_pin: "SHA256:')
    shot(alice, "join-token")
    table = alice.get_by_role("table", name="Join tokens")
    expect(table.locator("tbody tr")).to_have_count(1)
    table.get_by_role("button", name=re.compile("^Delete token")).click()
    expect(alice.get_by_role("table", name="Join tokens").locator("tbody tr")).to_have_count(0)
    # A dynamic app as YAML, then the app services that serve apps, with their last heartbeat.
    alice.goto("/web/admin/apps/new")
    alice.get_by_label("App as YAML").fill(APP)
    alice.get_by_role("button", name="Save").click()
    expect(alice).to_have_url(re.compile(r"/web/admin/apps\?saved=wiki$"))
    expect(alice.get_by_role("table", name="Apps")).to_contain_text("The team wiki")
    services = alice.get_by_role("table", name="App services")
    expect(services).to_contain_text("bastion-demo")
    expect(services.locator("tbody tr").first.locator("td").last).to_contain_text("UTC")
    shot(alice, "apps")
    alice.get_by_role("button", name="Delete app wiki").click()
    expect(alice.get_by_role("table", name="Apps")).not_to_contain_text("wiki")
