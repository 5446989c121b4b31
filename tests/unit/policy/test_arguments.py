"""Argument rules (decision 0044): allow/deny semantics over roles, fail-closed deny, naming."""

from __future__ import annotations

from typing import Any

from bastion.policy import AccessChecker
from bastion.resources import App, Role

APP = App.model_validate({"metadata": {"name": "db"}, "spec": {"uri": "mcp+http://h:1/mcp"}})
SECRET = 'has(arguments.message) && arguments.message.contains("secret")'


def role(
    name: str, tools: list[str], allow_rules: Any = (), deny_rules: Any = (), deny_tools: Any = ()
) -> Role:
    return Role.model_validate(
        {
            "metadata": {"name": name},
            "spec": {
                "allow": {"app_labels": {"*": "*"}, "mcp": {"tools": tools, "tool_rules": list(allow_rules)}},
                "deny": {"mcp": {"tools": list(deny_tools), "tool_rules": list(deny_rules)}},
            },
        }
    )


def call(c: AccessChecker, tool: str, arguments: Any, user: str = "alice") -> tuple[bool, str]:
    d = c.check_tool(APP, tool)
    if d.allowed and d.check_arguments is not None:
        d = d.check_arguments(arguments, user)
    return d.allowed, d.reason


def test_no_rules_no_per_call_check() -> None:
    c = AccessChecker([role("r", ["*"])], {})
    assert c.check_tool(APP, "echo").check_arguments is None


def test_a_rule_for_another_tool_adds_no_check() -> None:
    c = AccessChecker([role("r", ["*"], deny_rules=[{"tools": ["query"], "when": "true"}])], {})
    assert c.check_tool(APP, "echo").check_arguments is None
    assert c.check_tool(APP, "query").check_arguments is not None


def test_deny_rule_refuses_with_its_name() -> None:
    c = AccessChecker(
        [role("r", ["*"], deny_rules=[{"name": "no-secrets", "tools": ["echo"], "when": SECRET}])], {}
    )
    assert call(c, "echo", {"message": "hello"}) == (True, 'tool "echo" is allowed; no deny rule applies')
    allowed, reason = call(c, "echo", {"message": "my secret"})
    assert not allowed and reason == 'the call is denied by rule "no-secrets" of role "r"'


def test_unnamed_rule_is_named_by_role_and_index() -> None:
    rules = [{"tools": ["other"], "when": "true"}, {"tools": ["echo"], "when": SECRET}]
    c = AccessChecker([role("r", ["*"], deny_rules=rules)], {})
    assert call(c, "echo", {"message": "secret"})[1] == (
        'the call is denied by rule "deny.mcp.tool_rules[1]" of role "r"'
    )


def test_deny_rule_that_cannot_be_evaluated_refuses() -> None:
    c = AccessChecker(
        [role("r", ["*"], deny_rules=[{"tools": ["echo"], "when": 'arguments.message.contains("x")'}])], {}
    )
    allowed, reason = call(c, "echo", {})
    assert not allowed and "could not be evaluated" in reason
    allowed, reason = call(c, "echo", {"message": 3})
    assert not allowed and "could not be evaluated" in reason
    assert call(c, "echo", None)[0] is False  # no arguments at all: {}


def test_non_bool_result_is_an_error() -> None:
    c = AccessChecker([role("r", ["*"], deny_rules=[{"tools": ["echo"], "when": "arguments"}])], {})
    allowed, reason = call(c, "echo", {"a": 1})
    assert not allowed and "not a bool" in reason


def test_allow_rule_limits_that_role() -> None:
    rule = {"name": "selects-only", "tools": ["query"], "when": 'arguments.sql.startsWith("SELECT ")'}
    c = AccessChecker([role("analyst", ["query", "echo"], allow_rules=[rule])], {})
    assert call(c, "query", {"sql": "SELECT 1"}) == (
        True,
        'the call is allowed by rule "selects-only" of role "analyst"',
    )
    allowed, reason = call(c, "query", {"sql": "DROP TABLE t"})
    assert not allowed and 'rule "selects-only" of role "analyst"' in reason
    assert call(c, "echo", {"x": 1})[0]  # the rule is about query only
    allowed, reason = call(c, "query", {})  # cannot be evaluated: not true
    assert not allowed and "could not be evaluated" in reason


def test_another_role_allowing_the_tool_unconditionally_wins_over_allow_rules() -> None:
    rule = {"tools": ["query"], "when": "false"}
    c = AccessChecker([role("limited", ["query"], allow_rules=[rule]), role("admin", ["*"])], {})
    assert c.check_tool(APP, "query").check_arguments is None
    assert call(c, "query", {})[0]


def test_deny_rules_are_greedy() -> None:
    deny = role(
        "guard",
        [],
        deny_rules=[{"tools": ["*"], "when": 'has(arguments.path) && arguments.path.startsWith("/etc")'}],
    )
    c = AccessChecker([role("admin", ["*"]), deny], {})
    assert not call(c, "read_file", {"path": "/etc/shadow"})[0]
    assert call(c, "read_file", {"path": "/srv/x"})[0]


def test_user_name_and_traits() -> None:
    rule = {
        "tools": ["read"],
        "when": 'arguments.path.startsWith("/srv/" + user.name + "/") && "eng" in user.traits.teams',
    }
    c = AccessChecker([role("home", ["read"], allow_rules=[rule])], {"teams": ["eng"]})
    assert call(c, "read", {"path": "/srv/alice/a"}, "alice")[0]
    assert not call(c, "read", {"path": "/srv/bob/a"}, "alice")[0]
    other = AccessChecker([role("home", ["read"], allow_rules=[rule])], {"teams": ["ops"]})
    assert not call(other, "read", {"path": "/srv/alice/a"}, "alice")[0]


def test_deny_by_name_still_wins() -> None:
    c = AccessChecker(
        [role("r", ["*"], allow_rules=[{"tools": ["echo"], "when": "true"}], deny_tools=["echo"])], {}
    )
    assert not c.check_tool(APP, "echo").allowed


def test_case_variant_members_are_refused_where_rules_apply() -> None:
    rule = {"name": "no-secrets", "tools": ["echo"], "when": SECRET}
    c = AccessChecker([role("r", ["*"], deny_rules=[rule])], {})
    allowed, reason = call(c, "echo", {"message": "hi", "Message": "secret"})
    assert not allowed and '"message" and "Message"' in reason
    assert not call(c, "echo", {"message": "hi", "deep": [{"a": {"k": 1, "\u212a": 2}}]})[0]  # Kelvin sign
    assert call(c, "echo", {"message": "hi", "other": {"a": 1, "b": 2}})[0]
