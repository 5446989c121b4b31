"""The MCP servers page with 500 apps (and one that fails): paged, searched and filtered on
the server, fast.

No browser needed: what matters is what the proxy sends (50 rows a page, the count, the
links) and how long it takes.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.conftest import start_node, stop_node
from tests.web.conftest import PW, Web

N = 500


def _apps() -> str:
    lines = [
        "app_service:",
        "  apps:",
        "  - name: broken",
        "    mcp: {command: /bin/false, run_as_host_user: root}",
    ]
    for i in range(N):
        env = "dev" if i % 2 else "prod"
        lines += [
            f"  - name: app-{i:04d}",
            f"    description: App number {i}",
            f"    labels: {{env: {env}, team: t{i % 7}}}",
            "    mcp: {command: /bin/cat, run_as_host_user: root}",
        ]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def signed_in(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    node = start_node(tmp_path_factory.mktemp("scale"), extra_config=_apps())
    try:
        Web(node).add_user("alice", "mcp-user")
        with httpx.Client(base_url=f"https://{node.addr}", verify=False) as c:
            page = c.get("/web/login")
            csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
            assert csrf
            r = c.post("/web/login", data={"csrf": csrf.group(1), "user": "alice", "password": PW})
            assert r.status_code == 303
            yield c
    finally:
        with contextlib.suppress(Exception):
            stop_node(node)


def rows(html: str) -> list[str]:
    return re.findall(r'<li class="app" data-app="([^"]+)">', html)


def test_500_apps_paged_on_the_server(signed_in: httpx.Client) -> None:
    start = time.perf_counter()
    r = signed_in.get("/web/apps")
    took = time.perf_counter() - start
    assert r.status_code == 200
    assert rows(r.text) == [f"app-{i:04d}" for i in range(50)]
    assert "501 of 501 MCP servers you may use · page 1 of 11" in r.text
    assert len(r.content) < 200_000, len(r.content)
    assert took < 2.0, f"{took:.2f} s for the first page of 500 apps"
    last = signed_in.get("/web/apps?page=10")
    assert rows(last.text)[-1] == "app-0499"
    assert rows(signed_in.get("/web/apps?page=11").text) == ["broken"]
    assert rows(signed_in.get("/web/apps?page=99").text) == ["broken"]  # past the end: the last


def test_search_and_label_filter(signed_in: httpx.Client) -> None:
    assert rows(signed_in.get("/web/apps", params={"q": "app-0421"}).text) == ["app-0421"]
    words = rows(signed_in.get("/web/apps", params={"q": "Number 42"}).text)  # every word, any case
    assert "app-0042" in words and all("42" in n for n in words)
    dev = signed_in.get("/web/apps", params={"label": "env=dev"})
    assert "250 of 501" in dev.text and all(int(n[4:]) % 2 for n in rows(dev.text))
    both = signed_in.get("/web/apps", params={"label": "team=t3", "q": "dev"})
    assert rows(both.text) and all(int(n[4:]) % 7 == 3 and int(n[4:]) % 2 for n in rows(both.text))
    second = signed_in.get("/web/apps", params={"label": "env=dev", "page": "2"})
    assert rows(second.text)[0] == "app-0101"


def test_a_server_that_fails_is_an_error_on_the_page(signed_in: httpx.Client) -> None:
    r = signed_in.get("/web/apps/broken/tools", params={"part": "1"})
    assert r.status_code == 200 and 'class="error"' in r.text, r.text
    # Which message depends on when the process exits (during initialize, or just after it);
    # either way the page answers at once, with the reason, saying whose fault once.
    assert r.text.count("fault:") == 1, r.text
