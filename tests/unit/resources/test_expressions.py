"""CEL expressions in roles: refused with a position at validation, compiled once."""

from __future__ import annotations

import pydantic
import pytest

from bastion.resources import Role
from bastion.resources.codec import format_pydantic_error
from bastion.resources.expressions import MAX_EXPRESSION, ExpressionError, compile_expression


def test_syntax_error_has_a_position() -> None:
    with pytest.raises(ExpressionError) as e:
        compile_expression('arguments.message.contains("secret"')
    assert (e.value.line, e.value.column) == (1, 36)
    assert str(e.value).startswith("invalid CEL expression at line 1, column 36: Syntax error")


def test_position_on_a_later_line() -> None:
    with pytest.raises(ExpressionError) as e:
        compile_expression("arguments.a ==\n  )")
    assert (e.value.line, e.value.column) == (2, 3)


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("", "empty"),
        ("argument.message == 'x'", 'unknown variable "argument"'),
        ("x" * (MAX_EXPRESSION + 1), "at most"),
    ],
)
def test_refused(source: str, problem: str) -> None:
    with pytest.raises(ExpressionError, match=problem):
        compile_expression(source)


def test_macro_variables_are_not_unknown() -> None:
    p = compile_expression('user.traits.teams.exists(t, t == "eng")')
    assert p.uses_user and not p.uses_arguments


def test_compiled_once() -> None:
    assert compile_expression("arguments.a == 1") is compile_expression("arguments.a == 1")


def test_role_validation_names_the_rule_and_position() -> None:
    doc = {
        "metadata": {"name": "r"},
        "spec": {"deny": {"mcp": {"tool_rules": [{"tools": ["echo"], "when": "arguments.a ==="}]}}},
    }
    with pytest.raises(pydantic.ValidationError) as e:
        Role.model_validate(doc)
    text = format_pydantic_error(e.value)
    assert "spec.deny.mcp.tool_rules[0].when" in text
    assert "line 1, column" in text


def test_a_literal_regex_that_does_not_compile_is_refused_with_its_position() -> None:
    with pytest.raises(ExpressionError) as e:
        compile_expression('has(arguments.q) &&\n  arguments.q.matches("(drop")')
    assert (e.value.line, e.value.column) == (2, 23)
    assert "invalid regular expression" in str(e.value) and "unclosed group" in str(e.value)
    compile_expression('arguments.q.matches("(?i)\\\\b(drop|delete)\\\\b")')
    compile_expression("arguments.q.matches(arguments.pattern)")  # not a literal: judged per call
