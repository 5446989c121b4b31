"""The web UI in a real browser: Debian's Chromium, driven by Playwright, against `bastion start`.

One cluster for the session and one browser per module (each test gets its own browser
context, so its own cookies; a module that changes a user's roles makes that user itself).  Chromium is
Debian's package (`make test` installs it); Playwright's own browser download is neither used
nor needed.  Where no Chromium can be found, the tests skip, saying so (and fail under CI).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.conftest import Node, start_node, stop_node

CHROMIUM = os.environ.get("BASTION_TEST_CHROMIUM", "/usr/bin/chromium")
PW = "correct horse battery staple"

DEMO_ONLY = """\
kind: role
version: v1
metadata: {name: user-info-only}
spec:
  allow:
    app_labels: {env: demo}
    mcp: {tools: [bastion_user_info]}
"""


@dataclass
class Web:
    """A running cluster with users whose passwords are set, and where each user's CLI lives."""

    node: Node
    homes: dict[str, Path] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"https://{self.node.addr}"

    def add_user(self, name: str, roles: str, *, login: bool = False) -> str:
        """Create ``name`` with a password (through the invite, as the CLI sets it); the invite text."""
        invite = self.node.cli("users", "add", name, f"--roles={roles}", local=True).stdout
        code = re.search(r"--invite=(\S+)", invite)
        fp = re.search(r"--ca-fingerprint=(\S+)", invite)
        assert code and fp, invite
        home = self.node.root / "homes" / name
        self.homes[name] = home
        self.node.cli(
            "users", "set-password", f"--proxy={self.node.addr}", f"--ca-fingerprint={fp.group(1)}",
            f"--invite={code.group(1)}", "--password-stdin", input=PW + "\n", home=home,
        )  # fmt: skip
        if login:
            self.node.cli(
                "login", f"--proxy={self.node.addr}", f"--user={name}", "--password-stdin",
                input=PW + "\n", home=home,
            )  # fmt: skip
        return invite


@contextlib.contextmanager
def running_web(root: Path) -> Iterator[Web]:
    """A cluster serving the demo app, with alice (mcp-user, editor) and bob (one tool), both
    logged in on the command line too."""
    node = start_node(root, extra_config="app_service:\n  demo_server: true\n")
    try:
        role = node.root / "user-info-only.yaml"
        role.write_text(DEMO_ONLY)
        node.cli("create", str(role), local=True)
        w = Web(node)
        w.add_user("alice", "mcp-user,editor", login=True)
        w.add_user("bob", "user-info-only", login=True)
        yield w
    finally:
        stop_node(node)


@pytest.fixture(scope="session")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    """One cluster for the browser tests (modules that change a user make their own users)."""
    with running_web(tmp_path_factory.mktemp("web")) as w:
        yield w


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """One browser per module: Playwright's sync API keeps an event loop running in this thread
    while it is open, which async tests of later modules could not share."""
    if not os.access(CHROMIUM, os.X_OK):
        why = f"no Chromium at {CHROMIUM} (`make test` installs Debian's chromium package)"
        if os.environ.get("CI"):
            pytest.fail(why)  # CI must run the browser tests, not skip them
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield b
        finally:
            b.close()
