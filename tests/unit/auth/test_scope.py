"""What a joined host may serve: the scope of its join token."""

from __future__ import annotations

import pytest

from bastion.auth.scope import HostScope, parse_label_scope
from bastion.resources import App


def _app(name: str, **labels: str) -> App:
    return App.model_validate(
        {"metadata": {"name": name, "labels": labels}, "spec": {"uri": "mcp+http://10.0.0.1/mcp"}}
    )


def test_empty_scope_allows_anything() -> None:
    assert HostScope().unrestricted
    assert HostScope().refusal(_app("x", env="prod")) == ""


def test_names_and_labels_must_both_hold() -> None:
    scope = HostScope.of(["a", "b"], {"env": ["dev"]})
    assert scope.refusal(_app("a", env="dev")) == ""
    assert "not among the apps" in scope.refusal(_app("c", env="dev"))
    assert "labels" in scope.refusal(_app("a", env="prod"))
    assert "labels" in scope.refusal(_app("a"))  # a missing label never matches


def test_a_label_the_scope_does_not_name_is_refused() -> None:
    # A host scoped to env=dev may not offer its app to roles selecting other labels.
    scope = HostScope.of(labels={"env": ["dev"]})
    why = scope.refusal(_app("x", env="dev", team="admins"))
    assert "does not name (team)" in why and "env=dev" in why
    assert HostScope.of(["x"]).refusal(_app("x", env="dev", team="admins")) == ""  # names only: any labels


def test_label_values_are_alternatives_and_globs() -> None:
    scope = HostScope.of(labels=parse_label_scope("env=dev|test,team=a*"))
    assert scope.refusal(_app("x", env="test", team="alpha")) == ""
    assert scope.refusal(_app("x", env="prod", team="alpha"))


def test_json_round_trip_and_malformed_documents() -> None:
    scope = HostScope.of(["a"], {"env": ["dev"]})
    assert HostScope.from_json(scope.to_json()) == scope
    with pytest.raises(ValueError, match="apps must be a list"):
        HostScope.from_json(b'{"apps": "a"}')


def test_parse_label_scope_refuses_malformed_text() -> None:
    with pytest.raises(ValueError, match="expected key=value"):
        parse_label_scope("env")
