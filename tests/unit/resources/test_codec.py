"""YAML/JSON decoding (strict: duplicate keys, mappings only), error formatting, dumping."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from bastion.errors import ValidationError
from bastion.resources import App, Role
from bastion.resources.codec import (
    DecodeError,
    dump_json,
    dump_yaml,
    format_loc,
    format_pydantic_error,
    load_documents,
    located_error,
    pydantic_problems,
)

# ------------------------------------------------------------------ loading


class TestLoadDocuments:
    def test_single_mapping(self) -> None:
        assert load_documents("a: 1\nb: [x, y]\n", source="f") == [{"a": 1, "b": ["x", "y"]}]

    def test_json_is_yaml(self) -> None:
        text = '{"kind": "role", "metadata": {"name": "r"}, "n": [1, 2], "x": null}'
        assert load_documents(text, source="f") == [
            {"kind": "role", "metadata": {"name": "r"}, "n": [1, 2], "x": None}
        ]

    def test_json_with_tab_indentation(self) -> None:
        # YAML forbids tabs as indentation; JSON allows them.
        text = '{\n\t"a": {\n\t\t"b": [1,\n\t\t\t2]\n\t}\n}\n'
        assert load_documents(text, source="f") == [{"a": {"b": [1, 2]}}]

    def test_multiple_documents_and_empty_ones_skipped(self) -> None:
        text = "---\na: 1\n---\n---\n# only a comment\n---\nb: 2\n...\n"
        assert load_documents(text, source="f") == [{"a": 1}, {"b": 2}]

    @pytest.mark.parametrize("text", ["", "\n\n", "# nothing\n", "---\n", "---\n---\n"])
    def test_empty_text(self, text: str) -> None:
        assert load_documents(text, source="f") == []

    def test_error_is_a_validation_error(self) -> None:
        with pytest.raises(ValidationError):
            load_documents("a: [1\n", source="f")

    def test_malformed_yaml_has_source_line_and_column(self) -> None:
        text = "a: 1\nb:\n  c: 2\n d: 3\n"
        with pytest.raises(DecodeError) as info:
            load_documents(text, source="conf.yaml")
        e = info.value
        assert str(e).startswith("conf.yaml: line 4, column 2: ")
        assert (e.source, e.line, e.column) == ("conf.yaml", 4, 2)
        assert e.location.startswith("line 4, column 2: ")

    def test_unclosed_flow_sequence(self) -> None:
        with pytest.raises(DecodeError, match=r"^f: line \d+, column \d+: expected ','"):
            load_documents("a: [1, 2\nb: 3\n", source="f")

    def test_control_character_position(self) -> None:
        with pytest.raises(DecodeError, match=r"^f: line 2, column 5: character 0x0007"):
            load_documents("a: 1\nb: x\x07y\n", source="f")

    def test_duplicate_key_rejected_with_key_and_line(self) -> None:
        text = "kind: role\nmetadata:\n  name: a\nkind: user\n"
        with pytest.raises(DecodeError) as info:
            load_documents(text, source="r.yaml")
        assert str(info.value) == ('r.yaml: line 4, column 1: duplicate key "kind" (first defined on line 1)')

    def test_nested_duplicate_key_rejected(self) -> None:
        text = "spec:\n  allow:\n    app_labels: {env: dev}\n    app_labels: {'*': '*'}\n"
        with pytest.raises(DecodeError, match=r'line 4, column 5: duplicate key "app_labels"'):
            load_documents(text, source="f")

    def test_duplicate_key_in_flow_mapping(self) -> None:
        with pytest.raises(DecodeError, match=r'line 1, column 10: duplicate key "a"'):
            load_documents('{"a": 1, "a": 2}', source="f")

    def test_keys_equal_after_construction_are_duplicates(self) -> None:
        # YAML 1.1: yes and true are both the boolean true, so they would collide in a dict.
        with pytest.raises(DecodeError, match="duplicate key"):
            load_documents("yes: 1\ntrue: 2\n", source="f")

    def test_keys_different_after_construction_are_not(self) -> None:
        assert load_documents("1: a\n'1': b\n", source="f") == [{1: "a", "1": "b"}]

    def test_duplicate_key_in_tab_indented_json(self) -> None:
        text = '{\n\t"a": 1,\n\t"b": {\n\t\t"x": 1,\n\t\t"x": 2\n\t}\n}'
        with pytest.raises(DecodeError, match=r'duplicate key "x" \(in the object starting on line 3'):
            load_documents(text, source="f")

    def test_same_key_in_different_mappings_is_fine(self) -> None:
        assert load_documents("a: {x: 1}\nb: {x: 2}\n", source="f") == [{"a": {"x": 1}, "b": {"x": 2}}]

    def test_merge_keys_may_be_overridden(self) -> None:
        text = "base: &b {x: 1, y: 2}\nderived:\n  <<: *b\n  y: 3\n"
        [doc] = load_documents(text, source="f")
        assert doc["derived"] == {"x": 1, "y": 3}

    @pytest.mark.parametrize(
        ("text", "kind"),
        [("- a\n- b\n", "a list"), ("just text\n", "a string"), ("42\n", "an integer")],
    )
    def test_document_must_be_a_mapping(self, text: str, kind: str) -> None:
        with pytest.raises(DecodeError, match=f"^f: line 1, column 1: document 1 is {kind}, expected"):
            load_documents(text, source="f")

    def test_second_document_not_a_mapping_is_named(self) -> None:
        with pytest.raises(DecodeError, match=r"line 3, column 1: document 2 is a list"):
            load_documents("a: 1\n---\n- x\n", source="f")

    def test_json_array_rejected(self) -> None:
        with pytest.raises(DecodeError, match="is a list, expected a mapping"):
            load_documents('[{"a": 1}]', source="f")

    def test_unsafe_tags_rejected(self) -> None:
        with pytest.raises(DecodeError, match="could not determine a constructor"):
            load_documents("a: !!python/object/apply:os.system ['true']\n", source="f")


# ------------------------------------------------------------------- errors


class _Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    count: int
    name: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v == "bad":
            raise ValueError('name "bad" is not allowed')
        return v


class _Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[_Inner] = []
    labels: dict[str, str] = {}
    section: _Inner | None = None

    @model_validator(mode="after")
    def _unique(self) -> _Outer:
        names = [i.name for i in self.items]
        for i, n in enumerate(names):
            if n and n in names[:i]:
                raise located_error(("items", i, "name"), f'duplicate name "{n}"')
        return self


def _error(data: Any) -> pydantic.ValidationError:
    with pytest.raises(pydantic.ValidationError) as info:
        _Outer.model_validate(data)
    return info.value


class TestFormatPydanticError:
    def test_value_error_prefix_removed_and_indices(self) -> None:
        err = _error({"items": [{"count": 1}, {"count": 2, "name": "bad"}]})
        assert format_pydantic_error(err) == 'items[1].name: name "bad" is not allowed'

    def test_unknown_field(self) -> None:
        assert format_pydantic_error(_error({"itemz": []})) == "itemz: unknown field"

    def test_missing_field(self) -> None:
        err = _error({"items": [{}]})
        assert format_pydantic_error(err) == "items[0].count: required field missing"

    def test_type_errors_name_what_was_found(self) -> None:
        err = _error({"items": {"count": 1}, "section": ["x"], "labels": {"a": ["x"]}})
        assert format_pydantic_error(err).splitlines() == [
            "items: expected a list, got a mapping",
            "labels.a: expected a string, got a list",
            "section: expected a mapping, got a list",
        ]

    def test_other_messages_kept(self) -> None:
        err = _error({"items": [{"count": "many"}]})
        assert format_pydantic_error(err).startswith("items[0].count: Input should be a valid int")

    def test_one_line_per_error(self) -> None:
        err = _error({"items": [{"count": "x", "extra": 1}], "nope": 1})
        lines = format_pydantic_error(err).splitlines()
        assert len(lines) == 3
        assert "items[0].extra: unknown field" in lines
        assert "nope: unknown field" in lines

    def test_prefix(self) -> None:
        err = _error({"items": [{"count": "x"}], "bogus": 1})
        lines = format_pydantic_error(err, prefix="spec").splitlines()
        assert lines[0].startswith("spec.items[0].count: ")
        assert lines[1] == "spec.bogus: unknown field"

    def test_located_error_extends_the_path(self) -> None:
        err = _error({"items": [{"count": 1, "name": "a"}, {"count": 2, "name": "a"}]})
        assert format_pydantic_error(err) == 'items[1].name: duplicate name "a"'
        assert pydantic_problems(err, "top") == [("top.items[1].name", 'duplicate name "a"')]

    def test_label_keys_that_are_not_words_are_quoted(self) -> None:
        err = _error({"labels": {"bastion.internal/x": 1}})
        assert format_pydantic_error(err).startswith('labels["bastion.internal/x"]: expected a ')

    def test_real_resource_errors(self) -> None:
        with pytest.raises(pydantic.ValidationError) as info:
            App.model_validate({"metadata": {"name": "x"}, "spec": {"uri": "mcp+ftp://h"}})
        assert format_pydantic_error(info.value).startswith('spec.uri: unknown scheme "mcp+ftp"')
        with pytest.raises(pydantic.ValidationError) as info:
            Role.model_validate(
                {"metadata": {"name": "r"}, "spec": {"allow": {"rules": [{"resources": ["x"]}]}}}
            )
        assert format_pydantic_error(info.value).splitlines() == [
            'spec.allow.rules[0].resources: unknown resource "x" (known: user, role, token, app, '
            'app_server, event, cert_authority, mcp_pin, or "*")',
            "spec.allow.rules[0].verbs: required field missing",
        ]

    def test_whole_document_error_has_no_path(self) -> None:
        with pytest.raises(pydantic.ValidationError) as info:
            App.model_validate({"metadata": {"name": "x"}, "spec": {}})
        assert format_pydantic_error(info.value) == (
            "spec: a stdio app needs mcp.command (or an mcp+http(s)/mcp+sse+http(s) uri)"
        )


@pytest.mark.parametrize(
    ("loc", "text"),
    [
        ((), ""),
        (("a",), "a"),
        (("a", 0, "b"), "a[0].b"),
        ((0, "b"), "[0].b"),
        (("labels", "*"), "labels.*"),
        (("labels", "a b"), 'labels["a b"]'),
        (("labels", 'q"x'), 'labels["q\\"x"]'),
    ],
)
def test_format_loc(loc: tuple[str | int, ...], text: str) -> None:
    assert format_loc(loc) == text


# ------------------------------------------------------------------ dumping


class TestDump:
    def test_yaml_keeps_order_and_unicode(self) -> None:
        data = {"z": 1, "a": {"name": "café"}, "list": [1, "two"]}
        text = dump_yaml(data)
        assert text == "z: 1\na:\n  name: café\nlist:\n- 1\n- two\n"
        assert load_documents(text, source="f") == [data]

    def test_json_indent_and_trailing_newline(self) -> None:
        text = dump_json({"b": [1], "a": "é"})
        assert text == '{\n  "b": [\n    1\n  ],\n  "a": "é"\n}\n'
        assert load_documents(text, source="f") == [{"b": [1], "a": "é"}]

    def test_resource_round_trip(self) -> None:
        app = App.model_validate(
            {"metadata": {"name": "x", "labels": {"env": "dev"}}, "spec": {"uri": "mcp+https://h/"}}
        )
        for text in (
            dump_yaml(app.model_dump(mode="json")),
            dump_json(app.model_dump(mode="json")),
        ):
            assert App.model_validate(load_documents(text, source="f")[0]) == app
