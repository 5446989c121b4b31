"""Resources, templates and prompts in roles (decision 0043): defaults, deny wins, canonical URIs."""

from __future__ import annotations

from typing import Any

import pytest

from bastion.policy import AccessChecker, preset_roles
from bastion.policy.uris import ResourcePattern, compile_resource_patterns, uri_problem
from bastion.resources import App, Role

APP = App.model_validate({"metadata": {"name": "everything"}, "spec": {"uri": "mcp+http://h:1/mcp"}})
DOCS = "demo://resource/static/document/"
TEXT_TEMPLATE = "demo://resource/dynamic/text/{resourceId}"
BLOB_TEMPLATE = "demo://resource/dynamic/blob/{resourceId}"


def role(name: str, allow: dict[str, Any] | None = None, deny: dict[str, Any] | None = None) -> Role:
    mcp: dict[str, Any] = {"tools": ["*"], **(allow or {})}
    return Role.model_validate(
        {
            "metadata": {"name": name},
            "spec": {"allow": {"app_labels": {"*": "*"}, "mcp": mcp}, "deny": {"mcp": deny or {}}},
        }
    )


READER = role("reader", {"resources": [f"{DOCS}s*", TEXT_TEMPLATE], "prompts": ["simple-prompt"]})


def one(pattern: str) -> ResourcePattern:
    (compiled,) = compile_resource_patterns([pattern], {})
    return compiled


class TestDefault:
    def test_a_role_that_says_nothing_allows_every_resource_and_prompt(self) -> None:
        c = AccessChecker([role("plain")], {})
        assert c.check_resource(APP, "anything://at/all/../x").allowed  # nothing restricts: not checked
        assert c.check_resource_template(APP, BLOB_TEMPLATE).allowed
        assert c.check_prompt(APP, "whatever").allowed
        assert c.filter_listed(APP, "resources/list", [{"uri": "x://y"}]) is None  # passed on whole

    def test_an_empty_list_allows_none(self) -> None:
        c = AccessChecker([role("none", {"resources": [], "prompts": []})], {})
        assert not c.check_resource(APP, f"{DOCS}startup.md").allowed
        assert not c.check_prompt(APP, "simple-prompt").allowed

    def test_presets_say_all_explicitly(self) -> None:
        for preset in preset_roles():
            mcp = preset.spec.allow.mcp
            if preset.metadata.name == "editor":
                continue
            assert mcp.resources == ["*"] and mcp.prompts == ["*"], preset.metadata.name

    def test_a_role_that_says_nothing_widens_a_restricted_one(self) -> None:
        # Roles add up: one granting role without resource rules allows them all.
        c = AccessChecker([READER, role("plain")], {})
        assert c.check_resource(APP, f"{DOCS}features.md").allowed


class TestRestricted:
    c = AccessChecker([READER], {})

    def test_uri_glob(self) -> None:
        assert self.c.check_resource(APP, f"{DOCS}startup.md").allowed
        assert self.c.check_resource(APP, f"{DOCS}structure.md").allowed
        denied = self.c.check_resource(APP, f"{DOCS}features.md")
        assert not denied.allowed and "no role allows resource" in denied.reason

    def test_template_allows_its_expansions_and_itself(self) -> None:
        assert self.c.check_resource(APP, "demo://resource/dynamic/text/7").allowed
        assert self.c.check_resource_template(APP, TEXT_TEMPLATE).allowed
        assert not self.c.check_resource(APP, "demo://resource/dynamic/blob/7").allowed
        assert not self.c.check_resource_template(APP, BLOB_TEMPLATE).allowed
        # A simple expansion holds no "/": a template does not stretch over path segments.
        assert not self.c.check_resource(APP, "demo://resource/dynamic/text/7/more").allowed

    def test_prompts(self) -> None:
        assert self.c.check_prompt(APP, "simple-prompt").allowed
        denied = self.c.check_prompt(APP, "args-prompt")
        assert not denied.allowed and "mcp.prompts" in denied.reason

    def test_filter_lists(self) -> None:
        listed = [{"uri": f"{DOCS}{n}"} for n in ("architecture.md", "startup.md", "structure.md")]
        assert self.c.filter_listed(APP, "resources/list", [*listed, "junk", {"uri": 3}]) == listed[1:]
        templates = [{"uriTemplate": TEXT_TEMPLATE}, {"uriTemplate": BLOB_TEMPLATE}]
        assert self.c.filter_listed(APP, "resources/templates/list", templates) == templates[:1]
        prompts = [{"name": "simple-prompt"}, {"name": "args-prompt"}]
        assert self.c.filter_listed(APP, "prompts/list", prompts) == prompts[:1]

    def test_deny_wins_and_names_the_rule(self) -> None:
        c = AccessChecker(
            [
                READER,
                role("no-structure", deny={"resources": [f"{DOCS}structure*"], "prompts": ["simple-*"]}),
            ],
            {},
        )
        d = c.check_resource(APP, f"{DOCS}structure.md")
        assert not d.allowed
        assert d.reason == (
            f'resource "{DOCS}structure.md" is denied by role "no-structure" '
            f'(deny.mcp.resources "{DOCS}structure*")'
        )
        assert not c.check_prompt(APP, "simple-prompt").allowed
        assert c.check_resource(APP, f"{DOCS}startup.md").allowed

    def test_deny_is_greedy_over_roles_that_say_nothing(self) -> None:
        c = AccessChecker([role("plain"), role("d", deny={"prompts": ["secret*"]})], {})
        assert not c.check_prompt(APP, "secret-prompt").allowed
        assert c.check_prompt(APP, "other").allowed

    def test_trait_templates(self) -> None:
        r = role("mine", {"resources": ["file:///home/{{internal.logins}}/*"]})
        c = AccessChecker([r], {"logins": ["alice"]})
        assert c.check_resource(APP, "file:///home/alice/notes.txt").allowed
        assert not c.check_resource(APP, "file:///home/bob/notes.txt").allowed

    def test_regex(self) -> None:
        c = AccessChecker([role("rx", {"resources": ["^demo://resource/static/document/[a-f].*$"]})], {})
        assert c.check_resource(APP, f"{DOCS}features.md").allowed
        assert not c.check_resource(APP, f"{DOCS}startup.md").allowed


class TestCanonicalForm:
    @pytest.mark.parametrize(
        "uri",
        [
            f"{DOCS}%73tartup.md",  # an encoded letter
            f"{DOCS}s/../../secret",
            f"{DOCS}s%2F..%2Fsecret",
            f"{DOCS}s%2e%2e/x",
            f"{DOCS}./startup.md",
            f"{DOCS}s\\..\\x",
            f"{DOCS}s x",
            f"{DOCS}s\nx",
            "DEMO://resource/static/document/startup.md",
            "demo://RESOURCE/static/document/startup.md",
            "no-scheme",
        ],
    )
    def test_refused_where_rules_restrict(self, uri: str) -> None:
        assert uri_problem(uri) is not None
        d = AccessChecker([READER], {}).check_resource(APP, uri)
        assert not d.allowed and "is refused" in d.reason

    @pytest.mark.parametrize(
        "uri", [f"{DOCS}startup.md", "file:///srv/a%20b/c", "demo://x/a?b=%2F", "https://h/a..b/.c"]
    )
    def test_canonical(self, uri: str) -> None:
        assert uri_problem(uri) is None


class TestPatterns:
    def test_operators(self) -> None:
        p = one("file:///{+path}")
        assert p.matches_uri("file:///a/b/c") and not p.matches_uri("file:///a?x")
        q = one("search://q{?query,limit}")
        assert q.matches_uri("search://q") and q.matches_uri("search://q?query=a&limit=2")

    def test_glob_in_template_literal_parts(self) -> None:
        p = one("demo://*/text/{id}")
        assert p.matches_uri("demo://resource/dynamic/text/1")
        assert p.matches_template("demo://*/text/{id}")

    def test_broken_regex_after_interpolation(self) -> None:
        assert compile_resource_patterns(["{{internal.rx}}"], {"rx": ["^([$"]}) == ()
        (star,) = compile_resource_patterns(["{{internal.rx}}"], {"rx": ["^([$"]}, fail_closed=True)
        assert star.pattern == "*"


def test_content_permissions_for_display() -> None:
    deny = role(
        "d", deny={"resources": [f"{DOCS}secret*"], "tool_rules": [{"tools": ["echo"], "when": "true"}]}
    )
    c = AccessChecker([READER, role("plain"), deny], {})
    shown = c.content_permissions(APP)
    assert shown["resources"] == {"allowed": [f"{DOCS}s*", TEXT_TEMPLATE, "*"], "denied": [f"{DOCS}secret*"]}
    assert shown["prompts"] == {"allowed": ["simple-prompt", "*"], "denied": []}
    assert shown["tool_rules"] == [
        {"role": "d", "name": "deny.mcp.tool_rules[0]", "effect": "deny", "tools": ["echo"], "when": "true"}
    ]


def test_a_completion_may_name_a_uri_rather_than_a_template() -> None:
    c = AccessChecker([READER], {})
    assert c.check_resource_template(APP, "demo://resource/dynamic/text/3").allowed
    assert not c.check_resource_template(APP, "demo://resource/dynamic/blob/3").allowed


def test_trait_and_uri_templates_in_one_pattern_are_refused_at_create() -> None:
    with pytest.raises(ValueError, match="both a trait template and a URI template"):
        role("bad", {"resources": ["file:///home/{{internal.logins}}/{file}"]})
    role("ok", {"resources": ["file:///home/{{internal.logins}}/*", "demo://rows/{id}"]})
