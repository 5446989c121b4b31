"""Issue 19: the official conformance suite (0.2, which has the 2026-07-28 scenarios) through the
gateway: every check that passes against the fixture directly passes through the gateway, with
the fixture behind it over streamable HTTP and over stdio, for ``--spec-version 2026-07-28``
(the active suite, then the 2026 scenarios one by one) and ``--spec-version 2025-11-25``.

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

pytestmark = [
    requires_node_peers,
    pytest.mark.slow,
    pytest.mark.skipif(
        not CONFORMANCE_V2.exists(), reason=f"conformance 0.2 not installed ({CONFORMANCE_V2})"
    ),
]


def passed_checks(url: str, out: Path, spec: str, scenario: str | None = None) -> dict[str, set[str]]:
    """Run the suite (or one scenario); the ids of the checks that passed, by scenario (INFO and
    SKIPPED count as passed: "SSE is optional", "no listChanged declared": not failures)."""
    cmd = [
        str(node22_bin()),
        str(CONFORMANCE_V2),
        "server",
        "--url",
        url,
        "--spec-version",
        spec,
        "-o",
        str(out),
    ]
    if scenario:
        cmd += ["--scenario", scenario]
    subprocess.run(cmd, capture_output=True, text=True, env=node_env(), timeout=600, cwd=out.parent)
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


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("spec", ["2026-07-28", "2025-11-25"])
@pytest.mark.parametrize("app", ["conformance-http", "conformance-stdio"])
def test_what_passes_directly_passes_through_the_gateway(
    setup: tuple[Node, str], app: str, spec: str, tmp_path: Path
) -> None:
    node, direct_url = setup
    runs: list[str | None] = [None, *(SCENARIOS_2026 if spec == "2026-07-28" else [])]
    with local_proxy(node, app, "alice", tmp_path) as addr:
        for i, scenario in enumerate(runs):
            direct = passed_checks(direct_url, tmp_path / f"direct-{i}", spec, scenario)
            through = passed_checks(f"http://{addr}/mcp", tmp_path / f"gw-{i}", spec, scenario)
            assert direct, f"the suite ran nothing against the fixture ({scenario or 'active suite'})"
            lost = {
                s: sorted(ids - through.get(s, set()))
                for s, ids in direct.items()
                if ids - through.get(s, set())
            }
            assert not lost, f"passes directly, not through the gateway ({app}, {spec}): {lost}"
