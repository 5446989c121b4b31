"""Issue 20 (items 1 and 2) against server-everything from npm, through the real gateway.

server-everything (2026.8.31) serves seven static documents
(``demo://resource/static/document/*.md``), two templates (``demo://resource/dynamic/text/{resourceId}``
and ``.../blob/{resourceId}``) and four prompts (``simple-prompt``, ``args-prompt``,
``completable-prompt``, ``resource-prompt``).  User ``reader`` may see the documents starting with
"s", the text template and ``simple-prompt``; ``plain``'s role says nothing about resources or
prompts and keeps the default (all).  A deny argument rule refuses ``echo`` with "secret" in its
message, for both.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Node, start_node, stop_node
from tests.integration.test_data_path import ca_file, mcp_session, token
from tests.peers import everything_cmd, requires_node_peers

pytestmark = requires_node_peers

DOCS = "demo://resource/static/document/"
TEXT = "demo://resource/dynamic/text/{resourceId}"
BLOB = "demo://resource/dynamic/blob/{resourceId}"
NO_SECRETS = """\
  deny:
    mcp:
      tool_rules:
      - name: no-secrets
        tools: [echo]
        when: 'has(arguments.message) && arguments.message.contains("secret")'
"""
ROLES = f"""\
kind: role
version: v1
metadata: {{name: reader}}
spec:
  allow:
    app_labels: {{env: dev}}
    mcp:
      tools: ["*"]
      resources: ["{DOCS}s*", "{TEXT}"]
      prompts: [simple-prompt]
{NO_SECRETS}---
kind: role
version: v1
metadata: {{name: plain}}
spec:
  allow:
    app_labels: {{env: dev}}
    mcp: {{tools: ["*"]}}
{NO_SECRETS}"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    root = tmp_path_factory.mktemp("policy")
    with ExitStack() as stack:
        node_bin, *args = everything_cmd("stdio")
        apps = f"""\
app_service:
  apps:
  - name: everything
    labels: {{env: dev}}
    mcp:
      command: {node_bin}
      args: {json.dumps(args)}
      run_as_host_user: root
"""
        node = start_node(root, extra_config=apps)
        stack.callback(stop_node, node)
        (root / "roles.yaml").write_text(ROLES)
        node.cli("create", str(root / "roles.yaml"), local=True)
        for user, role in (("reader", "reader"), ("plain", "plain"), ("admin", "editor")):
            node.cli("users", "add", user, f"--roles={role}", local=True)
        yield node


async def _lists(node: Node, user: str) -> tuple[list[str], list[str], list[str]]:
    async with mcp_session(node, user, "everything") as s:
        resources = [str(r.uri) for r in (await s.list_resources()).resources]
        templates = [t.uri_template for t in (await s.list_resource_templates()).resource_templates]
        prompts = [p.name for p in (await s.list_prompts()).prompts]
    return resources, templates, prompts


async def test_reader_sees_only_what_its_role_allows(gateway: Node) -> None:
    resources, templates, prompts = await _lists(gateway, "reader")
    assert resources == [f"{DOCS}startup.md", f"{DOCS}structure.md"]
    assert templates == [TEXT]
    assert prompts == ["simple-prompt"]


async def test_a_role_without_resource_rules_keeps_the_default(gateway: Node) -> None:
    resources, templates, prompts = await _lists(gateway, "plain")
    assert len(resources) == 7 and f"{DOCS}features.md" in resources
    assert templates == [TEXT, BLOB]
    assert prompts == ["simple-prompt", "args-prompt", "completable-prompt", "resource-prompt"]
    async with mcp_session(gateway, "plain", "everything") as s:
        assert (await s.read_resource(f"{DOCS}features.md")).contents
        assert (await s.get_prompt("args-prompt", {"city": "Oslo", "state": "-"})).messages


async def test_reader_is_refused_the_rest(gateway: Node) -> None:
    from mcp.shared.exceptions import MCPError

    async with mcp_session(gateway, "reader", "everything") as s:
        assert (await s.read_resource(f"{DOCS}startup.md")).contents
        assert (await s.read_resource("demo://resource/dynamic/text/3")).contents
        assert (await s.get_prompt("simple-prompt")).messages

        refusals: list[tuple[Any, str]] = [
            (lambda: s.read_resource(f"{DOCS}features.md"), f'no role allows resource "{DOCS}features.md"'),
            (lambda: s.read_resource("demo://resource/dynamic/blob/3"), "no role allows resource"),
            (lambda: s.get_prompt("args-prompt", {"city": "Oslo"}), 'no role allows prompt "args-prompt"'),
        ]
        for call, reason in refusals:
            with pytest.raises(MCPError) as e:
                await call()
            assert reason in e.value.message, e.value.message
        from mcp.types import PromptReference, ResourceTemplateReference

        with pytest.raises(MCPError) as e:
            await s.complete(
                PromptReference(type="ref/prompt", name="completable-prompt"),
                {"name": "department", "value": "E"},
            )
        assert 'no role allows prompt "completable-prompt"' in e.value.message
        with pytest.raises(MCPError) as e:
            await s.complete(
                ResourceTemplateReference(type="ref/resource", uri=BLOB), {"name": "resourceId", "value": "1"}
            )
        assert "no role allows resource template" in e.value.message


async def test_an_argument_rule_refuses_echo_with_a_secret(gateway: Node) -> None:
    from mcp.shared.exceptions import MCPError

    for user in ("reader", "plain"):
        async with mcp_session(gateway, user, "everything") as s:
            ok = await s.call_tool("echo", {"message": "hello"})
            assert not ok.is_error and "hello" in ok.content[0].text  # type: ignore[union-attr]
            with pytest.raises(MCPError) as e:
                await s.call_tool("echo", {"message": "the secret plan"})
            assert f'denied by rule "no-secrets" of role "{user}"' in e.value.message
    events = json.loads(gateway.cli("audit", "search", "--format=json", "--user=plain", local=True).stdout)
    assert any('rule "no-secrets"' in (e.get("error") or "") and e.get("tool") == "echo" for e in events)


BAD_ROLE = """\
kind: role
version: v1
metadata: {name: broken}
spec:
  deny:
    mcp:
      tool_rules:
      - tools: [echo]
        when: 'arguments.message.contains("secret"'
"""


def test_a_malformed_expression_is_refused_at_create_with_its_position(gateway: Node) -> None:
    path = gateway.root / "broken.yaml"
    path.write_text(BAD_ROLE)
    res = gateway.cli("create", str(path), local=True, check=False)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "spec.deny.mcp.tool_rules[0].when: invalid CEL expression at line 1, column 36" in out, out
    assert "broken" not in gateway.cli("get", "roles", local=True, check=False).stdout


def test_a_malformed_expression_is_refused_by_the_api(gateway: Node) -> None:
    import yaml

    ctx = ssl.create_default_context(cafile=str(ca_file(gateway)))
    doc = yaml.safe_load(BAD_ROLE)
    with httpx.Client(verify=ctx, timeout=30) as c:
        r = c.post(
            f"https://{gateway.addr}/v1/resources",
            json=doc,
            headers={"Authorization": f"Bearer {token(gateway, 'admin')}"},
        )
    assert r.status_code == 400, r.text
    assert "invalid CEL expression at line 1, column 36" in r.text
