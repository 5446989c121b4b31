"""The web UI driven in headless Chromium: sign in, MCP servers and tools, connect, sign out.

What a person does, with the real browser against a real cluster: the invite link sets a
password; alice (mcp-user) sees the demo app and its tools; the Cursor snippet copied from
the connect dialog, written to a file, starts a working `bastion mcp connect`; bob (one tool
only) sees only that tool; signing out ends access; the first page is small; a 320 px
screen needs no sideways scrolling.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from tests.web.conftest import PW, Web

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
#: ``BASTION_SCREENSHOTS=1``: write the pages' screenshots into docs/screenshots/.
WRITE_SHOTS = os.environ.get("BASTION_SCREENSHOTS") == "1"


@pytest.fixture
def context(browser: Browser, web: Web) -> Iterator[BrowserContext]:
    ctx = browser.new_context(
        base_url=web.url,
        ignore_https_errors=True,
        permissions=["clipboard-read", "clipboard-write"],
        viewport={"width": 1100, "height": 800},
    )
    ctx.set_default_timeout(15_000)
    try:
        yield ctx
    finally:
        ctx.close()


def sign_in(page: Page, user: str, password: str = PW) -> None:
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/web/login$"))
    page.get_by_label("User name").fill(user)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(r"/web/apps$"))


def shot(page: Page, name: str) -> None:
    if WRITE_SHOTS:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def open_invite(page: Page, web: Web, user: str) -> str:
    """Add ``user`` as `bastion users add` does and open the link it prints; the link."""
    invite = web.node.cli("users", "add", user, "--roles=mcp-user", local=True).stdout
    link = re.search(r"(https://\S+/web/invite/\S+)", invite)
    assert link, invite
    page.goto(link.group(1))
    expect(page.get_by_role("heading", name="Set your password")).to_be_visible()
    expect(page.get_by_text(user)).to_be_visible()
    return link.group(1)


def set_password(page: Page, otp: str = "") -> None:
    page.get_by_label("New password").fill(PW)
    page.get_by_label("The same password again").fill(PW)
    if otp:
        page.get_by_label("One-time code").fill(otp)
    page.get_by_role("button", name="Set password").click()
    expect(page.get_by_role("status")).to_contain_text("Password set")


def test_invite_link_sets_a_password_then_sign_in(context: BrowserContext, web: Web) -> None:
    page = context.new_page()
    link = open_invite(page, web, "carol")
    set_password(page)
    sign_in(page, "carol")
    expect(page.locator(".app h2", has_text="bastion-demo")).to_be_visible()
    # The invite is used up.
    page.goto(link)
    expect(page.get_by_role("alert")).to_be_visible()
    assert "/web/invite/..." in web.node.log.read_text()
    assert link.rsplit("/", 1)[1] not in web.node.log.read_text()


def test_invite_with_an_authenticator_then_sign_in_needs_the_code(context: BrowserContext, web: Web) -> None:
    page = context.new_page()
    open_invite(page, web, "dora")
    secret = page.locator("code.secret").inner_text()
    set_password(page, otp=pyotp.TOTP(secret).now())
    # The password alone is not enough any more; with the code it is.
    page.get_by_label("User name").fill("dora")
    page.get_by_label("Password").fill(PW)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("one-time code")
    page.get_by_label("Password").fill(PW)
    page.get_by_label("One-time code").fill(pyotp.TOTP(secret).now())
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(r"/web/apps$"))


def test_signed_in_user_sees_the_demo_app_and_its_tools(context: BrowserContext) -> None:
    page = context.new_page()
    sign_in(page, "alice")
    app = page.locator("li.app", has=page.locator("h2", has_text="bastion-demo"))
    expect(app).to_contain_text("stdio")
    expect(app).to_contain_text("env=demo")
    expect(app.locator(".status")).to_contain_text("serving (1)")
    shot(page, "mcp-servers")
    app.get_by_role("link", name="Tools").click()
    tools = app.locator(".tools")
    for name in ("bastion_user_info", "bastion_session_info", "bastion_demo_info"):
        expect(tools.locator("h3", has_text=name)).to_be_visible()
    expect(tools).to_contain_text("Show who you are to the gateway")
    tools.locator("summary").first.click()
    expect(tools.locator("pre").first).to_contain_text('"type": "object"')
    shot(page, "tools")


def _run_entry(entry: dict[str, Any], home: Path) -> list[dict[str, Any]]:
    """Start what a client would start for ``entry`` (``bastion`` = this checkout's CLI), send
    initialize and tools/list, return the answers."""
    assert entry["command"] == "bastion"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env.update(entry.get("env") or {}, BASTION_HOME=str(home))
    errors = home / "connect.stderr"
    answers = []
    with (
        errors.open("wb") as stderr,
        subprocess.Popen(
            [sys.executable, "-m", "bastion.cli.main", *entry["args"]],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
        ) as proc,
    ):
        assert proc.stdin is not None and proc.stdout is not None
        try:
            for msg in (
                {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                    "protocolVersion": "2025-06-18", "capabilities": {},
                    "clientInfo": {"name": "cursor-test", "version": "1"}}},
                {"jsonrpc": "2.0", "method": "notifications/initialized"},
                {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
            ):  # fmt: skip
                proc.stdin.write(json.dumps(msg).encode() + b"\n")
                proc.stdin.flush()
                if "id" in msg:
                    line = proc.stdout.readline()
                    assert line, errors.read_text()
                    answers.append(json.loads(line))
        finally:
            proc.stdin.close()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    return answers


def test_connect_dialog_cursor_snippet_works_with_mcp_connect(
    context: BrowserContext, web: Web, tmp_path: Path
) -> None:
    page = context.new_page()
    sign_in(page, "alice")
    page.locator("li.app", has=page.locator("h2", has_text="bastion-demo")).get_by_role(
        "link", name="Connect"
    ).click()
    dialog = page.locator("dialog#connect")
    expect(dialog).to_be_visible()
    for client in ("Claude Desktop", "Claude Code", "Cursor", "VS Code", "Windsurf"):
        expect(dialog.get_by_role("tab", name=client)).to_be_visible()
    dialog.get_by_role("tab", name="Cursor").click()
    pane = dialog.locator("#pane-cursor")
    expect(pane).to_be_visible()
    add = pane.get_by_role("link", name="Add to Cursor")
    assert (add.get_attribute("href") or "").startswith("cursor://anysphere.cursor-deeplink/mcp/install?")
    expect(dialog.locator("#pane-vscode")).to_be_hidden()
    expect(dialog).to_contain_text(f"https://{web.node.addr}/mcp/apps/bastion-demo")
    shot(page, "connect")
    pane.get_by_role("button", name="Copy the Cursor snippet").click()
    expect(pane.get_by_role("button", name="Copy the Cursor snippet")).to_have_text("Copied")
    copied = page.evaluate("navigator.clipboard.readText()")
    # What a user does with it: paste it into Cursor's mcp.json.
    cursor_file = tmp_path / ".cursor" / "mcp.json"
    cursor_file.parent.mkdir()
    cursor_file.write_text(copied)
    entry = json.loads(cursor_file.read_text())["mcpServers"]["bastion-bastion-demo"]
    assert entry["args"] == ["mcp", "connect", "bastion-demo"]
    answers = _run_entry(entry, web.homes["alice"])
    assert answers[0]["result"]["serverInfo"], answers
    names = {t["name"] for t in answers[1]["result"]["tools"]}
    assert names == {"bastion_user_info", "bastion_session_info", "bastion_demo_info"}
    # The dialog closes with Escape and keyboard focus goes back to the page.
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()


def test_limited_user_sees_only_their_tools(context: BrowserContext) -> None:
    page = context.new_page()
    sign_in(page, "bob")
    app = page.locator("li.app", has=page.locator("h2", has_text="bastion-demo"))
    expect(app.locator(".perm")).to_contain_text("bastion_user_info")
    app.get_by_role("link", name="Tools").click()
    expect(app.locator(".tools h3")).to_have_count(1)
    expect(app.locator(".tools h3")).to_have_text("bastion_user_info")


def test_sign_out_ends_access(context: BrowserContext, web: Web) -> None:
    page = context.new_page()
    sign_in(page, "alice")
    cookie = next(c for c in context.cookies() if c["name"] == "__Host-bastion-session")
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile(r"/web/login$"))
    page.goto("/web/apps")
    expect(page).to_have_url(re.compile(r"/web/login$"))
    # The credential itself is revoked, not only the cookie dropped: replayed, it is refused.
    with httpx.Client(verify=False) as c:
        r = c.get(f"{web.url}/web/apps", headers={"Cookie": f"{cookie['name']}={cookie['value']}"})
        assert r.status_code == 302 and r.headers["location"] == "/web/login"
        r = c.get(f"{web.url}/v1/whoami", headers={"Authorization": f"Bearer {cookie['value']}"})
        assert r.status_code == 401, r.text


def test_wrong_password_is_refused_and_counted(context: BrowserContext) -> None:
    page = context.new_page()
    page.goto("/web/login")
    page.get_by_label("User name").fill("alice")
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("invalid")
    expect(page).to_have_url(re.compile(r"/web/login$"))


def test_first_page_load_is_small_and_local(context: BrowserContext, web: Web) -> None:
    page = context.new_page()
    sizes: dict[str, int] = {}

    def seen(response: Any) -> None:
        sizes[response.url] = len(response.body()) if response.status < 300 else 0

    page.on("response", seen)
    page.goto("/", wait_until="load")
    assert sizes, "no responses seen"
    assert all(u.startswith(web.url) for u in sizes), sizes  # no third-party request
    assert sum(sizes.values()) < 200_000, sizes
    shot(page, "sign-in")


def test_readable_at_320px_in_dark_mode(browser: Browser, web: Web) -> None:
    ctx = browser.new_context(
        base_url=web.url,
        ignore_https_errors=True,
        viewport={"width": 320, "height": 640},
        color_scheme="dark",
    )
    ctx.set_default_timeout(15_000)
    try:
        page = ctx.new_page()
        sign_in(page, "alice")
        # Keyboard: Tab reaches the skip link first.
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.textContent") == "Skip to content"
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(17, 20, 24)", background  # the dark palette
        for path in ("/web/apps", "/web/apps/bastion-demo/connect", "/web/audit", "/web/admin/users"):
            page.goto(path)
            width = page.evaluate("document.documentElement.scrollWidth")
            wide = page.evaluate(
                "Array.from(document.querySelectorAll('body *'))"
                ".filter(e => e.getBoundingClientRect().right > 321)"
                ".map(e => e.tagName + '.' + e.className).slice(0, 5)"
            )
            assert width <= 320, f"{path} is {width}px wide at a 320px screen: {wide}"
        page.goto("/web/apps")
        shot(page, "mcp-servers-320-dark")
    finally:
        ctx.close()
