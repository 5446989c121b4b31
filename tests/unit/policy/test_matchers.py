"""Patterns (literal, glob, ^regex$), trait interpolation and label selectors."""

from __future__ import annotations

import pytest

from bastion.policy.matchers import (
    LabelSelector,
    compile_pattern,
    compile_patterns,
    interpolate,
)


def matches(pattern: str, value: str) -> bool:
    return compile_pattern(pattern).matches(value)


# ------------------------------------------------------------------ patterns


class TestLiteral:
    def test_exact(self) -> None:
        assert matches("search-files", "search-files")

    @pytest.mark.parametrize("value", ["search-file", "search-files2", "Search-files", "", " search-files"])
    def test_anything_else(self, value: str) -> None:
        assert not matches("search-files", value)

    def test_kind(self) -> None:
        assert compile_pattern("read_file").kind == "literal"

    @pytest.mark.parametrize(
        ("pattern", "value"),
        [("a.c", "a.c"), ("a?c", "a?c"), ("[ab]", "[ab]"), ("a+", "a+"), ("a|b", "a|b")],
    )
    def test_no_magic_besides_star(self, pattern: str, value: str) -> None:
        assert matches(pattern, value)

    @pytest.mark.parametrize(
        ("pattern", "value"), [("a.c", "abc"), ("a?c", "abc"), ("[ab]", "a"), ("a|b", "a")]
    )
    def test_no_magic_characters(self, pattern: str, value: str) -> None:
        assert not matches(pattern, value)


class TestWildcard:
    @pytest.mark.parametrize("value", ["", "x", "anything at all", "multi\nline", "*"])
    def test_star_matches_everything(self, value: str) -> None:
        assert matches("*", value)

    def test_kind(self) -> None:
        assert compile_pattern("*").kind == "any"


class TestGlob:
    @pytest.mark.parametrize("value", ["slack_", "slack_post_message", "slack_*", "slack_a\nb"])
    def test_prefix(self, value: str) -> None:
        assert matches("slack_*", value)

    @pytest.mark.parametrize("value", ["slack", "Slack_post", "xslack_post", "github_slack_x"])
    def test_prefix_misses(self, value: str) -> None:
        assert not matches("slack_*", value)

    @pytest.mark.parametrize("value", ["_read", "file_read", "a_b_read"])
    def test_suffix(self, value: str) -> None:
        assert matches("*_read", value)

    @pytest.mark.parametrize("value", ["file_reader", "read", "file_READ"])
    def test_suffix_misses(self, value: str) -> None:
        assert not matches("*_read", value)

    @pytest.mark.parametrize("value", ["abc", "axbyc", "abbc", "a_b_c", "aXXbYYc"])
    def test_several_stars(self, value: str) -> None:
        assert matches("a*b*c", value)

    @pytest.mark.parametrize("value", ["ab", "acb", "xabc", "abcx", "bac"])
    def test_several_stars_misses(self, value: str) -> None:
        assert not matches("a*b*c", value)

    def test_regex_characters_are_literal(self) -> None:
        assert matches("get.*", "get.anything")
        assert not matches("get.*", "getX")
        assert matches("(a)*", "(a)zzz")
        assert not matches("(a)*", "a")

    def test_kind(self) -> None:
        assert compile_pattern("slack_*").kind == "glob"


class TestRegex:
    @pytest.mark.parametrize("value", ["get", "get_user", "list_files", "readme"])
    def test_alternation(self, value: str) -> None:
        assert matches("^(get|list|read).*$", value)

    @pytest.mark.parametrize("value", ["write_file", "forget", "Get_user", "xget"])
    def test_alternation_misses(self, value: str) -> None:
        assert not matches("^(get|list|read).*$", value)

    def test_full_match_required(self) -> None:
        assert matches("^get$", "get")
        assert not matches("^get$", "get_user")
        assert not matches("^get$", "forget")

    def test_trailing_newline_does_not_match(self) -> None:
        # Python's "$" also matches before a final newline; fullmatch must not.
        assert not matches("^get$", "get\n")

    def test_case_sensitive(self) -> None:
        assert not matches("^get$", "GET")

    def test_empty_regex(self) -> None:
        assert matches("^$", "")
        assert not matches("^$", "x")

    def test_kind(self) -> None:
        assert compile_pattern("^a.*$").kind == "regex"

    def test_invalid_regex_raises(self) -> None:
        with pytest.raises(ValueError, match="invalid regular expression"):
            compile_pattern("^(unclosed$")


class TestHalfAnchored:
    """``^`` without ``$`` (or the reverse) is not a regex: it is a glob/literal."""

    def test_caret_only_is_glob(self) -> None:
        m = compile_pattern("^get.*")
        assert m.kind == "glob"
        assert m.matches("^get.anything")
        assert not m.matches("get_user")
        assert not m.matches("get.x")

    def test_dollar_only_is_literal(self) -> None:
        m = compile_pattern("get_user$")
        assert m.kind == "literal"
        assert m.matches("get_user$")
        assert not m.matches("get_user")

    def test_lone_anchors(self) -> None:
        assert compile_pattern("^").kind == "literal"
        assert compile_pattern("$").kind == "literal"
        assert matches("^", "^")
        assert not matches("^", "")


def test_compiled_patterns_are_cached() -> None:
    assert compile_pattern("cached_*") is compile_pattern("cached_*")


# ------------------------------------------------------------- interpolation

TRAITS = {"mcp_tools": ["read_file", "slack_*"], "env": ["dev"], "empty": [], "blank": [""]}


class TestInterpolate:
    def test_no_template(self) -> None:
        assert interpolate("read_file", TRAITS) == ["read_file"]
        assert interpolate("*", TRAITS) == ["*"]
        assert interpolate("a{b}c", TRAITS) == ["a{b}c"]  # single braces are not templates

    def test_internal(self) -> None:
        assert interpolate("{{internal.mcp_tools}}", TRAITS) == ["read_file", "slack_*"]

    def test_external_reads_the_same_traits(self) -> None:
        assert interpolate("{{external.mcp_tools}}", TRAITS) == ["read_file", "slack_*"]

    @pytest.mark.parametrize(
        "pattern",
        ["{{ internal.mcp_tools }}", "{{internal.mcp_tools }}", "{{\tinternal.mcp_tools}}"],
    )
    def test_whitespace_inside_braces(self, pattern: str) -> None:
        assert interpolate(pattern, TRAITS) == ["read_file", "slack_*"]

    def test_prefix_and_suffix(self) -> None:
        assert interpolate("pre-{{internal.mcp_tools}}", TRAITS) == ["pre-read_file", "pre-slack_*"]
        assert interpolate("{{internal.env}}-suf", TRAITS) == ["dev-suf"]
        assert interpolate("a-{{ external.env }}-b", TRAITS) == ["a-dev-b"]

    def test_bracket_form(self) -> None:
        traits = {"http://schemas.example.com/groups": ["ops"]}
        assert interpolate('{{external["http://schemas.example.com/groups"]}}', traits) == ["ops"]

    @pytest.mark.parametrize("name", ["missing", "empty", "blank"])
    def test_missing_or_empty_trait_expands_to_nothing(self, name: str) -> None:
        assert interpolate(f"{{{{internal.{name}}}}}", TRAITS) == []
        assert interpolate(f"prefix-{{{{internal.{name}}}}}", TRAITS) == []

    def test_duplicates_removed_order_kept(self) -> None:
        assert interpolate("{{internal.t}}", {"t": ["b", "a", "b"]}) == ["b", "a"]

    def test_bare_string_trait_is_one_value(self) -> None:
        assert interpolate("{{internal.t}}", {"t": "abc"}) == ["abc"]

    @pytest.mark.parametrize(
        "pattern",
        [
            "{{foo}}",
            "{{internal}}",
            "{{internal.}}",
            "{{other.mcp_tools}}",
            "{{internal.mcp_tools",
            "internal.mcp_tools}}",
            "{{internal.env}}{{internal.env}}",
            "{a}-{{internal.env}}",
            "{{internal.env}}-}",
            "{{internal.a.b}}",
            "{{ }}",
        ],
    )
    def test_malformed_expands_to_nothing(self, pattern: str) -> None:
        assert interpolate(pattern, TRAITS) == []

    def test_values_are_inserted_verbatim(self) -> None:
        # A trait value is itself a pattern: "*" grants everything.
        assert interpolate("{{internal.t}}", {"t": ["*", "^get.*$"]}) == ["*", "^get.*$"]


class TestCompilePatterns:
    def test_interpolates_and_dedups(self) -> None:
        ms = compile_patterns(["read_file", "{{internal.mcp_tools}}"], TRAITS)
        assert [m.pattern for m in ms] == ["read_file", "slack_*"]

    def test_invalid_regex_dropped_by_default(self) -> None:
        ms = compile_patterns(["{{internal.t}}", "ok"], {"t": ["^(bad$"]})
        assert [m.pattern for m in ms] == ["ok"]

    def test_invalid_regex_is_wildcard_when_fail_closed(self) -> None:
        ms = compile_patterns(["{{internal.t}}"], {"t": ["^(bad$"]}, fail_closed=True)
        assert [m.pattern for m in ms] == ["*"]

    def test_missing_trait_gives_nothing(self) -> None:
        assert compile_patterns(["{{internal.nope}}"], TRAITS) == ()


# ----------------------------------------------------------------- selectors


def selector_matches(
    selector: dict[str, list[str] | str],
    labels: dict[str, str],
    traits: dict[str, list[str]] | None = None,
) -> bool:
    return LabelSelector.compile(selector, traits or {}).matches(labels)


class TestLabelSelector:
    def test_empty_selector_matches_nothing(self) -> None:
        assert not selector_matches({}, {"env": "dev"})
        assert not selector_matches({}, {})

    def test_exact(self) -> None:
        assert selector_matches({"env": "dev"}, {"env": "dev", "team": "a"})
        assert not selector_matches({"env": "dev"}, {"env": "prod"})

    def test_missing_key(self) -> None:
        assert not selector_matches({"env": "dev"}, {"team": "a"})
        assert not selector_matches({"env": "*"}, {"team": "a"})

    def test_value_wildcard_needs_the_key(self) -> None:
        assert selector_matches({"env": "*"}, {"env": "anything"})
        assert selector_matches({"env": "*"}, {"env": ""})

    def test_star_star_matches_anything(self) -> None:
        assert selector_matches({"*": "*"}, {})
        assert selector_matches({"*": ["*"]}, {"env": "dev"})

    def test_star_key_with_other_value_matches_nothing(self) -> None:
        assert not selector_matches({"*": "dev"}, {"*": "dev", "env": "dev"})

    def test_all_keys_must_match(self) -> None:
        sel: dict[str, list[str] | str] = {"env": "dev", "team": "a"}
        assert selector_matches(sel, {"env": "dev", "team": "a"})
        assert not selector_matches(sel, {"env": "dev", "team": "b"})
        assert not selector_matches(sel, {"env": "dev"})

    def test_star_star_and_another_key(self) -> None:
        sel: dict[str, list[str] | str] = {"*": "*", "env": "dev"}
        assert selector_matches(sel, {"env": "dev"})
        assert not selector_matches(sel, {"env": "prod"})

    def test_list_is_any_of(self) -> None:
        sel: dict[str, list[str] | str] = {"env": ["dev", "staging"]}
        assert selector_matches(sel, {"env": "dev"})
        assert selector_matches(sel, {"env": "staging"})
        assert not selector_matches(sel, {"env": "prod"})

    def test_glob_and_regex_values(self) -> None:
        assert selector_matches({"env": "dev-*"}, {"env": "dev-eu"})
        assert not selector_matches({"env": "dev-*"}, {"env": "prod-eu"})
        assert selector_matches({"env": "^(dev|staging)$"}, {"env": "staging"})
        assert not selector_matches({"env": "^(dev|staging)$"}, {"env": "staging2"})

    def test_trait_values(self) -> None:
        traits = {"envs": ["dev", "qa"]}
        assert selector_matches({"env": "{{internal.envs}}"}, {"env": "qa"}, traits)
        assert not selector_matches({"env": "{{internal.envs}}"}, {"env": "prod"}, traits)

    def test_missing_trait_value_matches_nothing(self) -> None:
        assert not selector_matches({"env": "{{internal.nope}}"}, {"env": "dev"})
        assert not selector_matches({"env": ["{{internal.nope}}"], "*": "*"}, {"env": "dev"})

    def test_trait_key(self) -> None:
        assert selector_matches({"{{internal.k}}": "dev"}, {"env": "dev"}, {"k": ["env"]})

    def test_key_that_does_not_expand_to_one_key_matches_nothing(self) -> None:
        sel: dict[str, list[str] | str] = {"{{internal.k}}": "dev", "team": "a"}
        labels = {"env": "dev", "other": "dev", "team": "a"}
        assert not selector_matches(sel, labels, {})
        assert not selector_matches(sel, labels, {"k": ["env", "other"]})

    def test_case_sensitive(self) -> None:
        assert not selector_matches({"env": "dev"}, {"env": "Dev"})
        assert not selector_matches({"Env": "dev"}, {"env": "dev"})
