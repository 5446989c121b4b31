"""Issue 19: the official conformance suite (0.2, which has the 2026-07-28 scenarios) through the
gateway: every check that passes against the fixture directly passes through the gateway, with
the fixture behind it over streamable HTTP and over stdio, for ``--requirements 2026-07-28``
(every scenario that revision requires, the 2026 ones listed below included, in one run) and
``--spec-version 2025-11-25`` (the active suite).  The six runs go at once.

Needs ``@modelcontextprotocol/conformance`` 0.2.0-alpha.12 or newer installed under
``tests/node/node_modules/conformance-v2`` (``"conformance-v2":
"npm:@modelcontextprotocol/conformance@0.2.0-alpha.12"`` in tests/node/package.json); skipped
without it (``CONFORMANCE_V2_JS`` may name its ``dist/index.js`` elsewhere).  Figures:
docs/mcp-2026.md.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.integration.conftest import Node, start_node, stop_node
from tests.integration.test_data_path import local_proxy
from tests.peers import NODE_MODULES, ROOT, node22_bin, node_env, requires_node_peers, run_conformance_fixture

CONFORMANCE_V2 = Path(
    os.environ.get("CONFORMANCE_V2_JS") or NODE_MODULES / "conformance-v2" / "dist" / "index.js"
)
SCENARIOS_2026 = [
    "server-stateless",
    "http-header-validation",
    "http-custom-header-server-validation",
    "caching",
    "sep-2164-resource-not-found",
]
SPECS = ["2026-07-28", "2025-11-25"]

pytestmark = [
    requires_node_peers,
    pytest.mark.slow,
    pytest.mark.skipif(
        not CONFORMANCE_V2.exists(), reason=f"conformance 0.2 not installed ({CONFORMANCE_V2})"
    ),
]


def start_suite(url: str, out: Path, spec: str) -> subprocess.Popen[bytes]:
    """Start the suite on ``url``: for 2026-07-28 what that revision requires (``--requirements``:
    its scenarios as frozen at its release, the 2026 ones named above included, in one run); for
    2025-11-25 the active suite (``--spec-version``: its ``--requirements`` adds
    ``server-sse-polling``, which a stdio app cannot pass through the gateway — docs/mcp-2026.md)."""
    flag = "--requirements" if spec == "2026-07-28" else "--spec-version"
    cmd = [str(node22_bin()), str(CONFORMANCE_V2), "server", "--url", url, flag, spec, "-o", str(out)]
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=node_env(), cwd=out.parent
    )


def passed_checks(out: Path) -> dict[str, set[str]]:
    """The ids of the checks that passed in a finished run, by scenario (INFO and SKIPPED count as
    passed: "SSE is optional", "no listChanged declared": not failures)."""
    got: dict[str, set[str]] = {}
    for checks in out.rglob("checks.json"):
        m = re.match(r"server-(.+?)-\d{4}-\d\d-\d\dT", checks.parent.name)
        name = m.group(1) if m else checks.parent.name
        got.setdefault(name, set()).update(
            c["id"] for c in json.loads(checks.read_text()) if c["status"] in _OK
        )
    return got


_OK = frozenset({"SUCCESS", "INFO", "SKIPPED"})


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Node, str]]:
    root = tmp_path_factory.mktemp("conf2026")
    fixture_cmd = [sys.executable, "-m", "tests.fixtures.conformance_server", "--transport", "stdio"]
    with ExitStack() as stack:
        conf_url = stack.enter_context(run_conformance_fixture("http"))
        apps = f"""\
app_service:
  stdio_limits: {{per_user: 64}}
  apps:
  - name: conformance-http
    uri: mcp+{conf_url}
    labels: {{env: test}}
  - name: conformance-stdio
    labels: {{env: test}}
    mcp:
      command: {fixture_cmd[0]}
      args: {json.dumps(fixture_cmd[1:])}
      run_as_host_user: root
      env: {{PYTHONPATH: "{ROOT}"}}
"""
        node = start_node(root, extra_config=apps)
        try:
            node.cli("users", "add", "alice", "--roles=mcp-user", local=True)
            yield node, conf_url
        finally:
            stop_node(node)


APPS = ["conformance-http", "conformance-stdio"]


@pytest.fixture(scope="module")
def results(
    setup: tuple[Node, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, str], dict[str, set[str]]]:
    """Every run at once — against the fixture itself (``direct``) and through the gateway for
    each app, per revision — as they mostly wait (each stdio session is a new fixture process):
    the passed checks by (target, spec)."""
    node, url = setup
    root = tmp_path_factory.mktemp("runs")
    with ExitStack() as stack:
        urls = {"direct": url}
        for app in APPS:
            (root / app).mkdir()
            addr = stack.enter_context(local_proxy(node, app, "alice", root / app))
            urls[app] = f"http://{addr}/mcp"
        runs = {
            (target, spec): start_suite(u, root / f"{target}-{spec}" / "out", spec)
            for target, u in urls.items()
            for spec in SPECS
        }
        for proc in runs.values():
            proc.wait(timeout=600)
    got = {key: passed_checks(root / f"{key[0]}-{key[1]}" / "out") for key in runs}
    for spec in SPECS:
        assert got["direct", spec], f"the suite ran nothing against the fixture ({spec})"
    assert set(SCENARIOS_2026) <= set(got["direct", "2026-07-28"]), sorted(got["direct", "2026-07-28"])
    return got


@pytest.mark.timeout(900)
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("app", APPS)
def test_what_passes_directly_passes_through_the_gateway(
    results: dict[tuple[str, str], dict[str, set[str]]], app: str, spec: str
) -> None:
    direct, through = results["direct", spec], results[app, spec]
    lost = {
        s: sorted(ids - through.get(s, set())) for s, ids in direct.items() if ids - through.get(s, set())
    }
    assert not lost, f"passes directly, not through the gateway ({app}, {spec}): {lost}"
