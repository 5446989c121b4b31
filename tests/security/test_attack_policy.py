"""Attacks on resource, prompt and argument rules (issue 20; decisions 0043, 0044).

User ``reader`` may read ``demo://docs/public/*`` (but not ``demo://docs/public/secret*``), one
template ``demo://rows/{id}`` and the prompt ``greeting``; every tool, but ``echo`` is refused
when ``arguments.message`` contains "secret".  Each attack is sent as raw bytes to a recording
upstream, and the test asserts what reached it, not what the gateway says it did.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.conftest import start_node, stop_node
from tests.security.conftest import Gateway, RawSession, Recording, recording_stdio_apps

ROLES = """\
kind: role
version: v1
metadata: {name: reader}
spec:
  allow:
    app_labels: {env: dev}
    mcp:
      tools: ["*"]
      resources: ["demo://docs/public/*", "demo://rows/{id}"]
      prompts: [greeting]
  deny:
    mcp:
      resources: ["demo://docs/public/secret*"]
      tool_rules:
      - name: no-secrets
        tools: [echo]
        when: 'has(arguments.message) && arguments.message.contains("secret")'
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("secpol")
    rec = root / "stdio.jsonl"
    node = start_node(root, extra_config=recording_stdio_apps(rec))
    try:
        (root / "roles.yaml").write_text(ROLES)
        node.cli("create", str(root / "roles.yaml"), local=True)
        node.cli("users", "add", "reader", "--roles=reader", local=True)
        yield Gateway(node, {"rec-stdio": Recording(rec)})
    finally:
        stop_node(node)


@pytest.fixture(scope="module")
def session(gateway: Gateway) -> Iterator[RawSession]:
    """One session of ``reader`` for the module: a refusal leaves a session usable."""
    with gateway.session("reader", "rec-stdio") as s:
        yield s


def reached(gateway: Gateway) -> list[Any]:
    return gateway.recordings["rec-stdio"].messages()


def send(s: RawSession, body: bytes) -> dict[str, Any]:
    answer: dict[str, Any] = s.answer(s.post(body))
    s.sync()  # anything forwarded has reached the upstream by now
    return answer


CALL = b'{"jsonrpc":"2.0","id":8,"method":"tools/call","params":%s}'


def rpc(id_: int, method: str, params: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": id_, "method": method, "params": params}).encode()


@pytest.mark.parametrize(
    "uri",
    [
        "demo://docs/public/%73ecret.txt",  # an encoded letter: "secret" after decoding
        "demo://docs/public/../private/key",  # dot segments climb out of the allowed prefix
        "demo://docs/public/x/..%2F..%2Fprivate",
        "demo://docs/public/%2e%2e/private",
        "demo://docs/public\\..\\private",
        "DEMO://docs/public/secret.txt",  # a scheme in upper case the upstream may fold
        "demo://DOCS/public/secret.txt",
        "demo://docs/public/secret.txt\n",
        "demo://docs/private/key",  # plainly outside the rules
        "demo://docs/public/secret.txt",  # plainly denied
        "demo://rows/1/../../docs/private",
        "demo://rows/1/2",  # a simple template expansion holds no "/"
    ],
)
def test_resource_uri_tricks_never_reach_the_upstream(
    gateway: Gateway, session: RawSession, uri: str
) -> None:
    s = session
    for n, method in enumerate(("resources/read", "resources/subscribe")):
        answer = send(s, rpc(10 + n, method, {"uri": uri}))
        assert answer["error"]["code"] == -32602, answer
        assert answer["error"]["message"].startswith(f'{method} refused for user "reader"')
    assert not [m for m in reached(gateway) if isinstance(m, dict) and m.get("params", {}).get("uri") == uri]


def test_allowed_reads_do_reach_it(gateway: Gateway, session: RawSession) -> None:
    s = session
    for uri in ("demo://docs/public/readme.md", "demo://rows/42"):
        assert "result" in send(s, rpc(3, "resources/read", {"uri": uri}))
        assert any(isinstance(m, dict) and m.get("params") == {"uri": uri} for m in reached(gateway))


def test_case_variant_uri_key_is_refused_before_policy(gateway: Gateway, session: RawSession) -> None:
    # A decoder that folds keys could read "URI" where the gateway judged "uri".
    body = b'{"jsonrpc":"2.0","id":4,"method":"resources/read","params":{"uri":"demo://docs/public/a","URI":"demo://docs/private/key"}}'
    s = session
    assert "error" in send(s, body)
    assert not any("private" in json.dumps(m) for m in reached(gateway))


@pytest.mark.parametrize(
    "params",
    [
        {"ref": {"type": "ref/prompt", "name": "admin-prompt"}, "argument": {"name": "target", "value": ""}},
        {
            "ref": {"type": "ref/resource", "uri": "demo://docs/private/{file}"},
            "argument": {"name": "file", "value": ""},
        },
        {
            "ref": {"type": "ref/resource", "uri": "demo://docs/public/secret{n}"},
            "argument": {"name": "n", "value": ""},
        },
        {"ref": {"type": "ref/other", "name": "greeting"}, "argument": {"name": "x", "value": ""}},
        {"ref": "greeting", "argument": {"name": "x", "value": ""}},
    ],
)
def test_completion_does_not_leak_what_is_denied(
    gateway: Gateway, session: RawSession, params: dict[str, Any]
) -> None:
    s = session
    answer = send(s, rpc(5, "completion/complete", params))
    assert answer["error"]["code"] == -32602
    assert not [
        m
        for m in reached(gateway)
        if isinstance(m, dict) and m.get("method") == "completion/complete" and m.get("params") == params
    ]


def test_prompt_get_outside_the_rules(gateway: Gateway, session: RawSession) -> None:
    s = session
    answer = send(s, rpc(6, "prompts/get", {"name": "admin-prompt"}))
    assert 'no role allows prompt "admin-prompt"' in answer["error"]["message"]
    assert "result" in send(s, rpc(7, "prompts/get", {"name": "greeting"}))
    gets = [
        m["params"]["name"]
        for m in reached(gateway)
        if isinstance(m, dict) and m.get("method") == "prompts/get"
    ]
    assert "admin-prompt" not in gets and "greeting" in gets


@pytest.mark.parametrize(
    "body",
    [
        # JSON escapes: the rule sees the decoded string, as the upstream will.
        CALL % b'{"name":"echo","arguments":{"message":"my s\\u0065cret"}}',
        # A duplicate key: one reader takes the first, another the last.
        CALL % b'{"name":"echo","arguments":{"message":"hi","message":"secret"}}',
        # A case variant of "arguments" a folding decoder could read instead.
        CALL % b'{"name":"echo","arguments":{"message":"hi"},"Arguments":{"message":"secret"}}',
        # A case variant inside the arguments: a Go upstream reads the last, "Message".
        CALL % b'{"name":"echo","arguments":{"message":"hi","Message":"secret"}}',
        # A message that is not a string cannot be judged: refused (the deny rule fails closed).
        CALL % b'{"name":"echo","arguments":{"message":["secret"]}}',
    ],
)
def test_argument_rule_tricks(gateway: Gateway, session: RawSession, body: bytes) -> None:
    s = session
    answer = send(s, body)
    assert "error" in answer, answer
    assert not any(
        "secret" in json.dumps(m)
        for m in reached(gateway)
        if isinstance(m, dict) and m.get("method") == "tools/call"
    )


def test_refusals_are_audited_with_the_rule(gateway: Gateway, session: RawSession) -> None:
    s = session
    send(s, rpc(9, "tools/call", {"name": "echo", "arguments": {"message": "the secret"}}))
    send(s, rpc(10, "resources/read", {"uri": "demo://docs/public/secret.txt"}))
    events = gateway.audit("--user=reader")
    errors = [e.get("error", "") for e in events if e.get("success") is False]
    assert any('rule "no-secrets" of role "reader"' in e for e in errors), errors
    assert any('deny.mcp.resources "demo://docs/public/secret*"' in e for e in errors), errors
