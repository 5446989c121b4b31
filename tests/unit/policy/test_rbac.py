"""AccessChecker: app access, tool decisions (deny wins, greedy deny), rules, presets."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

import bastion.policy as policy
from bastion.policy import (
    AccessChecker,
    Decision,
    ToolPermissions,
    app_labels,
    preset_roles,
)
from bastion.resources import RESOURCE_TYPE_LABEL, SUB_KIND_LABEL, App, Role

# ----------------------------------------------------------------- builders


def role(
    name: str,
    *,
    allow_labels: dict[str, Any] | None = None,
    allow_tools: list[str] | None = None,
    deny_labels: dict[str, Any] | None = None,
    deny_tools: list[str] | None = None,
    allow_rules: list[dict[str, list[str]]] | None = None,
    deny_rules: list[dict[str, list[str]]] | None = None,
    ttl: str | None = None,
) -> Role:
    spec: dict[str, Any] = {
        "allow": {
            "app_labels": allow_labels or {},
            "mcp": {"tools": allow_tools or []},
            "rules": allow_rules or [],
        },
        "deny": {
            "app_labels": deny_labels or {},
            "mcp": {"tools": deny_tools or []},
            "rules": deny_rules or [],
        },
    }
    if ttl is not None:
        spec["options"] = {"max_session_ttl": ttl}
    return Role.model_validate({"metadata": {"name": name}, "spec": spec})


def app(name: str = "everything", **labels: str) -> App:
    return App.model_validate(
        {
            "metadata": {"name": name, "labels": labels},
            "spec": {"uri": "mcp+http://localhost:12345/mcp"},
        }
    )


def checker(*roles: Role, **traits: list[str]) -> AccessChecker:
    return AccessChecker(list(roles), traits)


DEV = app("dev-server", env="dev")
PROD = app("prod-server", env="prod")


# --------------------------------------------------------------- public API


def test_public_names() -> None:
    assert set(policy.__all__) == {
        "ACCESS_ROLE",
        "DEFAULT_MAX_SESSION_TTL",
        "EDITOR_ROLE",
        "MCP_USER_ROLE",
        "AccessChecker",
        "Decision",
        "LabelSelector",
        "MatchKind",
        "Matcher",
        "ToolPermissions",
        "app_labels",
        "compile_pattern",
        "compile_patterns",
        "interpolate",
        "preset_roles",
    }
    for name in policy.__all__:
        assert hasattr(policy, name)


def test_decision_and_permissions_are_frozen() -> None:
    d = Decision(True, "ok")
    with pytest.raises(AttributeError):
        d.allowed = False  # type: ignore[misc]
    p = ToolPermissions(("a",), ())
    with pytest.raises(AttributeError):
        p.allowed = ()  # type: ignore[misc]


# --------------------------------------------------------------------- apps


class TestAppAccess:
    def test_label_match(self) -> None:
        c = checker(role("dev", allow_labels={"env": "dev"}))
        assert c.can_access_app(DEV)
        assert not c.can_access_app(PROD)

    def test_no_roles(self) -> None:
        assert not checker().can_access_app(DEV)

    def test_empty_allow_selector_matches_nothing(self) -> None:
        assert not checker(role("r", allow_tools=["*"])).can_access_app(DEV)

    def test_wildcard_selector(self) -> None:
        c = checker(role("all", allow_labels={"*": "*"}))
        assert c.can_access_app(DEV)
        assert c.can_access_app(app("bare"))

    def test_any_of_values(self) -> None:
        c = checker(role("r", allow_labels={"env": ["dev", "staging"]}))
        assert c.can_access_app(DEV)
        assert c.can_access_app(app("s", env="staging"))
        assert not c.can_access_app(PROD)

    def test_regex_value(self) -> None:
        c = checker(role("r", allow_labels={"env": "^(dev|qa)$"}))
        assert c.can_access_app(DEV)
        assert not c.can_access_app(app("x", env="devx"))

    def test_missing_key(self) -> None:
        c = checker(role("r", allow_labels={"team": "*"}))
        assert not c.can_access_app(DEV)

    def test_sub_kind_label_is_implied(self) -> None:
        c = checker(role("r", allow_labels={SUB_KIND_LABEL: "mcp"}))
        assert c.can_access_app(app("bare"))
        assert app_labels(app("bare")) == {SUB_KIND_LABEL: "mcp"}
        assert app_labels(DEV) == {"env": "dev", SUB_KIND_LABEL: "mcp"}

    def test_existing_sub_kind_label_is_kept(self) -> None:
        other = app("x", **{SUB_KIND_LABEL: "other"})
        assert app_labels(other)[SUB_KIND_LABEL] == "other"
        assert not checker(role("r", allow_labels={SUB_KIND_LABEL: "mcp"})).can_access_app(other)

    def test_deny_labels_win(self) -> None:
        c = checker(
            role("all", allow_labels={"*": "*"}, allow_tools=["*"]),
            role("no-prod", deny_labels={"env": "prod"}),
        )
        assert c.can_access_app(DEV)
        assert not c.can_access_app(PROD)
        d = c.check_tool(PROD, "read_file")
        assert not d.allowed
        assert 'app "prod-server" is not accessible' in d.reason
        assert 'role "no-prod"' in c.app_decision(PROD).reason

    def test_empty_deny_selector_matches_nothing(self) -> None:
        c = checker(role("all", allow_labels={"*": "*"}), role("d", deny_tools=["x"]))
        assert c.can_access_app(DEV)

    def test_deny_wildcard_denies_every_app(self) -> None:
        c = checker(role("all", allow_labels={"*": "*"}), role("d", deny_labels={"*": "*"}))
        assert not c.can_access_app(DEV)

    def test_trait_in_label_value(self) -> None:
        c = checker(role("r", allow_labels={"env": "{{internal.envs}}"}), envs=["dev"])
        assert c.can_access_app(DEV)
        assert not c.can_access_app(PROD)

    def test_missing_trait_in_label_value(self) -> None:
        c = checker(role("r", allow_labels={"env": "{{external.envs}}"}))
        assert not c.can_access_app(DEV)

    def test_app_decision_reason(self) -> None:
        c = checker(role("dev", allow_labels={"env": "dev"}))
        assert c.app_decision(DEV) == Decision(True, 'app "dev-server" is allowed by role "dev"')
        assert c.app_decision(PROD) == Decision(False, 'app "prod-server" is not accessible')


# -------------------------------------------------------------------- tools


class TestCheckTool:
    def test_allowed_literal(self) -> None:
        c = checker(role("r", allow_labels={"env": "dev"}, allow_tools=["read_file"]))
        d = c.check_tool(DEV, "read_file")
        assert d == Decision(True, 'tool "read_file" is allowed by role "r"')
        assert not c.check_tool(DEV, "write_file").allowed

    def test_no_tools_listed_means_all_denied(self) -> None:
        c = checker(role("r", allow_labels={"*": "*"}))
        assert c.can_access_app(DEV)
        d = c.check_tool(DEV, "read_file")
        assert d == Decision(False, 'no role allows tool "read_file" on app "dev-server"')

    def test_star_allows_everything(self) -> None:
        c = checker(role("r", allow_labels={"*": "*"}, allow_tools=["*"]))
        for tool in ["read_file", "", "weird name", "slack_post_message"]:
            assert c.check_tool(DEV, tool).allowed

    def test_globs_and_regex(self) -> None:
        c = checker(
            role(
                "r",
                allow_labels={"*": "*"},
                allow_tools=["slack_*", "*_read", "^(get|list)_.*$"],
            )
        )
        assert c.check_tool(DEV, "slack_post").allowed
        assert c.check_tool(DEV, "file_read").allowed
        assert c.check_tool(DEV, "get_user").allowed
        assert not c.check_tool(DEV, "delete_user").allowed
        assert not c.check_tool(DEV, "forget_user").allowed

    def test_app_not_accessible(self) -> None:
        c = checker(role("r", allow_labels={"env": "dev"}, allow_tools=["*"]))
        assert c.check_tool(PROD, "x") == Decision(False, 'app "prod-server" is not accessible')

    def test_tools_only_from_roles_that_match_the_app(self) -> None:
        c = checker(
            role("dev", allow_labels={"env": "dev"}, allow_tools=["read_file"]),
            role("prod", allow_labels={"env": "prod"}, allow_tools=["write_file"]),
        )
        assert c.check_tool(DEV, "read_file").allowed
        assert not c.check_tool(DEV, "write_file").allowed
        assert c.check_tool(PROD, "write_file").allowed
        assert not c.check_tool(PROD, "read_file").allowed

    def test_deny_wins_over_allow(self) -> None:
        c = checker(
            role("r", allow_labels={"*": "*"}, allow_tools=["*"], deny_tools=["slack_post_*"]),
        )
        assert c.check_tool(DEV, "slack_read").allowed
        d = c.check_tool(DEV, "slack_post_message")
        assert d == Decision(False, 'tool "slack_post_message" is denied by role "r"')

    def test_deny_is_greedy(self) -> None:
        # The deny comes from a role whose labels do not match the app at all.
        c = checker(
            role("all", allow_labels={"*": "*"}, allow_tools=["*"]),
            role("prod-only", allow_labels={"env": "prod"}, deny_tools=["delete_*"]),
            role("nothing", deny_labels={"env": "nowhere"}, deny_tools=["^drop_.*$"]),
        )
        assert c.check_tool(DEV, "read_file").allowed
        assert c.check_tool(DEV, "delete_repo").reason == ('tool "delete_repo" is denied by role "prod-only"')
        assert c.check_tool(DEV, "drop_table").reason == ('tool "drop_table" is denied by role "nothing"')

    def test_deny_from_trait(self) -> None:
        c = checker(
            role("r", allow_labels={"*": "*"}, allow_tools=["*"], deny_tools=["{{internal.bad}}"]),
            bad=["rm_rf"],
        )
        assert not c.check_tool(DEV, "rm_rf").allowed
        assert c.check_tool(DEV, "ls").allowed

    def test_deny_with_missing_trait_denies_nothing(self) -> None:
        c = checker(role("r", allow_labels={"*": "*"}, allow_tools=["*"], deny_tools=["{{internal.bad}}"]))
        assert c.check_tool(DEV, "rm_rf").allowed

    def test_deny_with_broken_regex_from_trait_fails_closed(self) -> None:
        c = checker(
            role("r", allow_labels={"*": "*"}, allow_tools=["*"], deny_tools=["{{internal.bad}}"]),
            bad=["^(unclosed$"],
        )
        assert not c.check_tool(DEV, "anything").allowed

    def test_allow_with_broken_regex_from_trait_allows_nothing(self) -> None:
        c = checker(
            role("r", allow_labels={"*": "*"}, allow_tools=["{{internal.ok}}"]),
            ok=["^(unclosed$"],
        )
        assert not c.check_tool(DEV, "^(unclosed$").allowed

    def test_tools_from_traits(self) -> None:
        c = checker(
            role(
                "r",
                allow_labels={"*": "*"},
                allow_tools=["{{external.tools}}", "gh-{{internal.gh}}"],
            ),
            tools=["read_file", "slack_*"],
            gh=["issues"],
        )
        assert c.check_tool(DEV, "read_file").allowed
        assert c.check_tool(DEV, "slack_x").allowed
        assert c.check_tool(DEV, "gh-issues").allowed
        assert not c.check_tool(DEV, "issues").allowed
        assert not c.check_tool(DEV, "write_file").allowed

    def test_case_sensitive(self) -> None:
        c = checker(role("r", allow_labels={"*": "*"}, allow_tools=["read_file"]))
        assert not c.check_tool(DEV, "READ_FILE").allowed

    def test_traits_are_copied(self) -> None:
        traits = {"tools": ["a"]}
        c = AccessChecker([role("r", allow_labels={"*": "*"}, allow_tools=["{{internal.tools}}"])], traits)
        traits["tools"].append("b")
        assert not c.check_tool(DEV, "b").allowed

    def test_bare_string_trait(self) -> None:
        c = AccessChecker(
            [role("r", allow_labels={"*": "*"}, allow_tools=["{{internal.tools}}"])],
            {"tools": "abc"},
        )
        assert c.check_tool(DEV, "abc").allowed
        assert not c.check_tool(DEV, "a").allowed


class TestDecisionCache:
    def test_repeat_is_cached(self) -> None:
        c = checker(role("r", allow_labels={"*": "*"}, allow_tools=["read_*"]))
        first = c.check_tool(DEV, "read_file")
        assert c.check_tool(DEV, "read_file") is first

    def test_does_not_leak_across_apps(self) -> None:
        c = checker(role("dev", allow_labels={"env": "dev"}, allow_tools=["*"]))
        assert c.check_tool(DEV, "read_file").allowed
        assert not c.check_tool(PROD, "read_file").allowed
        assert c.check_tool(DEV, "read_file").allowed
        # and in the other order
        c2 = checker(role("dev", allow_labels={"env": "dev"}, allow_tools=["*"]))
        assert not c2.check_tool(PROD, "read_file").allowed
        assert c2.check_tool(DEV, "read_file").allowed

    def test_relabelled_app_is_re_evaluated(self) -> None:
        c = checker(role("dev", allow_labels={"env": "dev"}, allow_tools=["*"]))
        assert c.check_tool(app("srv", env="dev"), "x").allowed
        assert not c.check_tool(app("srv", env="prod"), "x").allowed
        assert c.check_tool(app("srv", env="dev"), "x").allowed

    def test_bounded(self) -> None:
        from bastion.policy import rbac

        c = checker(role("r", allow_labels={"*": "*"}, allow_tools=["t*"]))
        for i in range(rbac._MAX_TOOLS_PER_APP + 10):
            assert c.check_tool(DEV, f"t{i}").allowed
        view = c._apps[DEV.metadata.name]
        assert len(view.decisions) == rbac._MAX_TOOLS_PER_APP
        for i in range(rbac._MAX_APPS + 10):
            c.check_tool(app(f"app{i}"), "t")
        assert len(c._apps) == rbac._MAX_APPS
        # Evicted entries are recomputed, not wrong.
        assert c.check_tool(DEV, "t0").allowed

    def test_long_names_are_decided_but_not_cached(self) -> None:
        c = checker(role("r", allow_labels={"*": "*"}, allow_tools=["*"]))
        name = "x" * 10_000
        assert c.check_tool(DEV, name).allowed
        assert name not in c._apps[DEV.metadata.name].decisions


# -------------------------------------------------------- tool permissions


class TestToolPermissions:
    def test_interpolated_deduplicated_in_order(self) -> None:
        c = checker(
            role("a", allow_labels={"env": "dev"}, allow_tools=["read_*", "{{internal.t}}"]),
            role("b", allow_labels={"*": "*"}, allow_tools=["read_*", "list"], deny_tools=["rm"]),
            role("c", allow_labels={"env": "prod"}, allow_tools=["prod_only"], deny_tools=["x", "rm"]),
            t=["get", "read_*"],
        )
        assert c.tool_permissions(DEV) == ToolPermissions(
            allowed=("read_*", "get", "list"), denied=("rm", "x")
        )
        assert c.tool_permissions(PROD) == ToolPermissions(
            allowed=("read_*", "list", "prod_only"), denied=("rm", "x")
        )

    def test_inaccessible_app_allows_nothing(self) -> None:
        c = checker(
            role("a", allow_labels={"*": "*"}, allow_tools=["*"]),
            role("d", deny_labels={"env": "prod"}, deny_tools=["rm"]),
        )
        assert c.tool_permissions(PROD) == ToolPermissions(allowed=(), denied=("rm",))

    def test_missing_trait_shows_nothing(self) -> None:
        c = checker(role("access", allow_labels={"*": "*"}, allow_tools=["{{internal.mcp_tools}}"]))
        assert c.tool_permissions(DEV) == ToolPermissions((), ())


# ------------------------------------------------------------- filter_tools


class TestFilterTools:
    def test_keeps_allowed_in_order(self) -> None:
        c = checker(
            role(
                "r",
                allow_labels={"*": "*"},
                allow_tools=["read_*", "list"],
                deny_tools=["read_secret"],
            )
        )
        tools: list[dict[str, Any]] = [
            {"name": "list", "description": "l"},
            {"name": "read_file", "inputSchema": {}},
            {"name": "read_secret"},
            {"name": "write_file"},
        ]
        assert c.filter_tools(DEV, tools) == [tools[0], tools[1]]

    def test_returns_empty_list_not_none(self) -> None:
        c = checker(role("r", allow_labels={"*": "*"}))
        result = c.filter_tools(DEV, [{"name": "read_file"}])
        assert result == []
        assert isinstance(result, list)
        assert checker().filter_tools(DEV, []) == []

    def test_inaccessible_app_keeps_nothing(self) -> None:
        c = checker(role("r", allow_labels={"env": "dev"}, allow_tools=["*"]))
        assert c.filter_tools(PROD, [{"name": "a"}]) == []

    def test_bad_entries_are_dropped(self) -> None:
        c = checker(role("r", allow_labels={"*": "*"}, allow_tools=["*"]))
        tools: list[Any] = [
            {"name": 3},
            {"description": "no name"},
            {"name": None},
            "str",
            None,
            {"name": "ok"},
        ]
        assert c.filter_tools(DEV, tools) == [{"name": "ok"}]


# -------------------------------------------------------------------- rules


class TestRules:
    def test_no_rules_denied(self) -> None:
        assert not checker(role("r")).check_rule("user", "read")
        assert not checker().check_rule("user", "read")

    def test_specific(self) -> None:
        c = checker(role("r", allow_rules=[{"resources": ["user", "role"], "verbs": ["list", "read"]}]))
        assert c.check_rule("user", "read")
        assert c.check_rule("role", "list")
        assert not c.check_rule("user", "delete")
        assert not c.check_rule("token", "read")

    def test_wildcards(self) -> None:
        c = checker(
            role(
                "r",
                allow_rules=[
                    {"resources": ["*"], "verbs": ["read"]},
                    {"resources": ["app"], "verbs": ["*"]},
                ],
            )
        )
        assert c.check_rule("token", "read")
        assert c.check_rule("app", "delete")
        assert not c.check_rule("token", "delete")

    def test_deny_wins(self) -> None:
        c = checker(
            role("editor", allow_rules=[{"resources": ["*"], "verbs": ["*"]}]),
            role("no-tokens", deny_rules=[{"resources": ["token"], "verbs": ["create", "delete"]}]),
        )
        assert c.check_rule("token", "read")
        assert not c.check_rule("token", "create")
        assert not c.check_rule("token", "delete")
        assert c.check_rule("user", "create")

    def test_deny_wildcard(self) -> None:
        c = checker(
            role("editor", allow_rules=[{"resources": ["*"], "verbs": ["*"]}]),
            role("ro", deny_rules=[{"resources": ["*"], "verbs": ["create", "update", "delete"]}]),
        )
        assert c.check_rule("role", "read")
        assert not c.check_rule("role", "update")


# ---------------------------------------------------------------------- ttl


class TestMaxSessionTTL:
    def test_default_without_roles(self) -> None:
        assert checker().max_session_ttl() == timedelta(hours=12)

    def test_role_default(self) -> None:
        assert checker(role("r")).max_session_ttl() == timedelta(hours=12)

    def test_minimum(self) -> None:
        c = checker(role("a", ttl="8h"), role("b", ttl="30m"), role("c"))
        assert c.max_session_ttl() == timedelta(minutes=30)

    def test_longer_than_default(self) -> None:
        assert checker(role("a", ttl="30h")).max_session_ttl() == timedelta(hours=30)


# ------------------------------------------------------------- preset roles


class TestPresetRoles:
    def presets(self) -> dict[str, Role]:
        return {r.metadata.name: r for r in preset_roles()}

    def test_names_and_labels(self) -> None:
        roles = preset_roles()
        assert [r.metadata.name for r in roles] == ["mcp-user", "access", "editor"]
        for r in roles:
            assert r.metadata.labels == {RESOURCE_TYPE_LABEL: "preset"}
        assert self.presets()["mcp-user"].metadata.description == (
            "Access to every MCP server and every tool"
        )

    def test_fresh_objects(self) -> None:
        assert preset_roles() == preset_roles()

    def test_valid_role_resources(self) -> None:
        for r in preset_roles():
            assert Role.model_validate(r.model_dump()) == r

    def test_mcp_user_allows_any_tool_on_any_app(self) -> None:
        c = AccessChecker([self.presets()["mcp-user"]], {})
        for a in (DEV, PROD, app("bare")):
            assert c.can_access_app(a)
            assert c.check_tool(a, "anything").allowed
        assert not c.check_rule("user", "read")

    def test_access_allows_only_trait_tools(self) -> None:
        access = self.presets()["access"]
        c = AccessChecker([access], {"mcp_tools": ["read_file", "slack_*"]})
        assert c.can_access_app(DEV)
        assert c.check_tool(DEV, "read_file").allowed
        assert c.check_tool(PROD, "slack_post").allowed
        assert not c.check_tool(DEV, "write_file").allowed
        assert c.tool_permissions(DEV).allowed == ("read_file", "slack_*")

    def test_access_without_trait_allows_no_tool(self) -> None:
        c = AccessChecker([self.presets()["access"]], {})
        assert c.can_access_app(DEV)
        assert not c.check_tool(DEV, "read_file").allowed

    def test_access_with_star_trait_allows_every_tool(self) -> None:
        c = AccessChecker([self.presets()["access"]], {"mcp_tools": ["*"]})
        assert c.check_tool(DEV, "anything").allowed

    def test_editor_manages_resources_but_no_tools(self) -> None:
        c = AccessChecker([self.presets()["editor"]], {"mcp_tools": ["*"]})
        for resource in ("user", "role", "token", "app"):
            for verb in ("list", "create", "read", "update", "delete"):
                assert c.check_rule(resource, verb)
        assert not c.can_access_app(DEV)
        assert not c.check_tool(DEV, "read_file").allowed

    def test_editor_plus_access(self) -> None:
        p = self.presets()
        c = AccessChecker([p["editor"], p["access"]], {"mcp_tools": ["read_*"]})
        assert c.check_rule("role", "update")
        assert c.check_tool(DEV, "read_file").allowed
        assert not c.check_tool(DEV, "write_file").allowed
