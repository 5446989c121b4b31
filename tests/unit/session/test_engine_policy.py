"""The engine with resource, prompt and argument rules (decisions 0043, 0044): playbooks, no sockets."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from bastion.audit import events as ev
from bastion.policy import AccessChecker
from bastion.protocol.jsonrpc import INTERNAL_ERROR, INVALID_PARAMS
from bastion.resources import Role
from bastion.session.engine import RecordAudit, SendToClient
from tests.unit.session.test_engine import call, error_of, forwarded, fwd, initialized, req, res

DOCS = "demo://resource/static/document/"
TEXT = "demo://resource/dynamic/text/{resourceId}"
BLOB = "demo://resource/dynamic/blob/{resourceId}"


def role(mcp: dict[str, Any], deny: dict[str, Any] | None = None) -> Role:
    return Role.model_validate(
        {
            "metadata": {"name": "mcp-dev"},
            "spec": {
                "allow": {"app_labels": {"env": "dev"}, "mcp": {"tools": ["*"], **mcp}},
                "deny": {"mcp": deny or {}},
            },
        }
    )


READER = AccessChecker([role({"resources": [f"{DOCS}s*", TEXT], "prompts": ["simple-prompt"]})], {})
OPEN = AccessChecker([role({})], {})
SECRET = 'has(arguments.message) && arguments.message.contains("secret")'
GUARDED = AccessChecker(
    [role({}, {"tool_rules": [{"name": "no-secrets", "tools": ["echo"], "when": SECRET}]})], {}
)


def result_of(cmd: Any) -> Any:
    assert isinstance(cmd, SendToClient)
    return orjson.loads(cmd.raw)["result"]


class TestLists:
    RESOURCES = {
        "resources": [{"uri": f"{DOCS}{n}", "name": n} for n in ("architecture.md", "startup.md")],
        "nextCursor": "c",
    }

    def test_resources_list_filtered(self) -> None:
        h = initialized(READER)
        h.s.client_sent(req(1, "resources/list"))
        (out,) = h.s.upstream_sent(res(1, self.RESOURCES))
        assert result_of(out) == {"resources": [self.RESOURCES["resources"][1]], "nextCursor": "c"}

    def test_templates_and_prompts_filtered(self) -> None:
        h = initialized(READER)
        h.s.client_sent(req(1, "resources/templates/list"))
        (out,) = h.s.upstream_sent(
            res(1, {"resourceTemplates": [{"uriTemplate": TEXT}, {"uriTemplate": BLOB}]})
        )
        assert result_of(out) == {"resourceTemplates": [{"uriTemplate": TEXT}]}
        h.s.client_sent(req(2, "prompts/list"))
        (out,) = h.s.upstream_sent(res(2, {"prompts": [{"name": "simple-prompt"}, {"name": "args-prompt"}]}))
        assert result_of(out) == {"prompts": [{"name": "simple-prompt"}]}

    def test_nothing_restricted_passes_the_parsed_bytes(self) -> None:
        h = initialized(OPEN)
        h.s.client_sent(req(1, "resources/list"))
        raw = res(1, self.RESOURCES)
        (out,) = h.s.upstream_sent(raw)
        assert isinstance(out, SendToClient) and orjson.loads(out.raw) == orjson.loads(raw)

    def test_a_list_that_cannot_be_filtered_is_an_error(self) -> None:
        h = initialized(READER)
        h.s.client_sent(req(1, "prompts/list"))
        cmds = h.s.upstream_sent(res(1, {"prompts": None}))
        assert isinstance(cmds[0], RecordAudit) and not cmds[0].event.success
        assert error_of(cmds[-1])["code"] == INTERNAL_ERROR

    def test_case_variant_keys_are_dropped(self) -> None:
        h = initialized(READER)
        h.s.client_sent(req(1, "prompts/list"))
        entries = [{"name": "simple-prompt", "Name": "args-prompt"}, {"name": "simple-prompt"}]
        (out,) = h.s.upstream_sent(res(1, {"prompts": entries, "PROMPTS": [{"name": "args-prompt"}]}))
        assert result_of(out) == {"prompts": [{"name": "simple-prompt"}]}


class TestRefusals:
    @pytest.mark.parametrize(
        ("method", "params", "denied", "reason"),
        [
            (
                "resources/read",
                {"uri": f"{DOCS}features.md"},
                "resource",
                f'no role allows resource "{DOCS}features.md"',
            ),
            ("resources/subscribe", {"uri": f"{DOCS}features.md"}, "resource", "no role allows resource"),
            (
                "resources/read",
                {"uri": "demo://resource/dynamic/blob/1"},
                "resource",
                "no role allows resource",
            ),
            ("resources/read", {"uri": f"{DOCS}s/../features.md"}, "resource", "'..' segment"),
            ("prompts/get", {"name": "args-prompt"}, "prompt", 'no role allows prompt "args-prompt"'),
            (
                "completion/complete",
                {
                    "ref": {"type": "ref/prompt", "name": "completable-prompt"},
                    "argument": {"name": "department", "value": ""},
                },
                "prompt",
                "no role allows prompt",
            ),
            (
                "completion/complete",
                {
                    "ref": {"type": "ref/resource", "uri": BLOB},
                    "argument": {"name": "resourceId", "value": ""},
                },
                "resource",
                "no role allows resource template",
            ),
        ],
    )
    def test_refused_audited_never_forwarded(
        self, method: str, params: Any, denied: str, reason: str
    ) -> None:
        h = initialized(READER)
        cmds = h.s.client_sent(req(5, method, params))
        assert forwarded(cmds) == []
        audit = cmds[0]
        assert isinstance(audit, RecordAudit) and audit.denied == denied
        assert audit.event.type == ev.REQUEST and not audit.event.success and audit.event.method == method
        assert reason in audit.event.error
        error = error_of(cmds[1])
        assert error["code"] == INVALID_PARAMS
        assert error["message"].startswith(f'{method} refused for user "alice" on app "everything": ')
        assert reason in error["message"]

    @pytest.mark.parametrize(
        ("method", "params"),
        [
            ("resources/read", {"uri": f"{DOCS}startup.md"}),
            ("resources/read", {"uri": "demo://resource/dynamic/text/3"}),
            ("prompts/get", {"name": "simple-prompt"}),
            (
                "completion/complete",
                {
                    "ref": {"type": "ref/resource", "uri": TEXT},
                    "argument": {"name": "resourceId", "value": ""},
                },
            ),
        ],
    )
    def test_allowed_are_forwarded(self, method: str, params: Any) -> None:
        h = initialized(READER)
        raw = req(5, method, params)
        assert h.s.client_sent(raw)[-1] == fwd(raw)

    @pytest.mark.parametrize(
        ("method", "params"),
        [
            ("resources/read", None),
            ("resources/read", {"uri": 5}),
            ("prompts/get", {}),
            ("completion/complete", {"ref": "x"}),
            ("completion/complete", {"ref": {"type": "ref/other"}}),
        ],
    )
    def test_unjudgeable_is_refused(self, method: str, params: Any) -> None:
        for checker in (READER, OPEN):
            h = initialized(checker)
            cmds = h.s.client_sent(req(5, method, params))
            assert forwarded(cmds) == []
            assert error_of(cmds[1])["code"] == INVALID_PARAMS


class TestArgumentRules:
    def test_refused_with_the_rule_name(self) -> None:
        h = initialized(GUARDED)
        cmds = h.s.client_sent(call(4, "echo", {"message": "a secret"}))
        assert forwarded(cmds) == []
        audit = cmds[0]
        assert isinstance(audit, RecordAudit) and audit.denied == "arguments"
        assert audit.event.tool == "echo"
        assert audit.event.error == 'access denied: the call is denied by rule "no-secrets" of role "mcp-dev"'
        assert error_of(cmds[1]) == {
            "code": INVALID_PARAMS,
            "message": 'tool "echo" may not be called with these arguments by user "alice" '
            'on app "everything": the call is denied by rule "no-secrets" of role "mcp-dev"',
        }

    def test_allowed_otherwise(self) -> None:
        h = initialized(GUARDED)
        raw = call(4, "echo", {"message": "hello"})
        assert h.s.client_sent(raw)[-1] == fwd(raw)
        raw = call(5, "get-sum", {"a": 1, "b": 2})  # the rule is about echo only
        assert h.s.client_sent(raw)[-1] == fwd(raw)


class TestListen:
    """2026-07-28 moves resource subscriptions into ``subscriptions/listen``."""

    def listen(self, notifications: Any) -> list[Any]:
        h = initialized(READER)
        return h.s.client_sent(req(7, "subscriptions/listen", {"notifications": notifications}))

    def test_allowed_uris_and_no_uris_are_forwarded(self) -> None:
        for notifications in ({"toolsListChanged": True}, {"resourceSubscriptions": [f"{DOCS}startup.md"]}):
            assert forwarded(self.listen(notifications)), notifications

    @pytest.mark.parametrize(
        "notifications",
        [
            {"resourceSubscriptions": [f"{DOCS}startup.md", f"{DOCS}features.md"]},
            {"resourceSubscriptions": f"{DOCS}features.md"},
            {"resourceSubscriptions": [f"{DOCS}startup.md"], "ResourceSubscriptions": [f"{DOCS}features.md"]},
            "all",
        ],
    )
    def test_refused(self, notifications: Any) -> None:
        cmds = self.listen(notifications)
        assert forwarded(cmds) == []
        assert error_of(cmds[-1])["code"] == INVALID_PARAMS


def test_a_role_change_tells_a_client_that_listed_resources_and_prompts_to_list_again() -> None:
    h = initialized(READER)
    assert [orjson.loads(c.raw)["method"] for c in h.s.policy_changed(OPEN)] == [
        "notifications/tools/list_changed"
    ]
    h.s.client_sent(req(1, "resources/list"))
    h.s.client_sent(req(2, "prompts/list"))
    methods = [orjson.loads(c.raw)["method"] for c in h.s.policy_changed(READER)]
    assert methods == [
        "notifications/tools/list_changed",
        "notifications/resources/list_changed",
        "notifications/prompts/list_changed",
    ]
