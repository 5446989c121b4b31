"""The hand-off from the proxy to the MCP handler is a typed value, never a loose dict."""

from __future__ import annotations

import pytest

from bastion.handoff import SCOPE_KEY, Handoff, handoff_of
from bastion.resources import App

APP = App.model_validate({"metadata": {"name": "files"}, "spec": {"uri": "mcp+http://files.internal/mcp"}})


def test_the_handoff_is_found_in_the_scope() -> None:
    h = Handoff(actor=None, app=APP)  # type: ignore[arg-type]
    assert handoff_of({SCOPE_KEY: h}) is h
    assert h.subpath == "/" and h.headers is None and h.jwt is None


@pytest.mark.parametrize("value", [None, {"actor": "alice", "app": APP}])
def test_anything_else_is_a_wiring_error(value: object) -> None:
    with pytest.raises(TypeError, match="not a Handoff"):
        handoff_of({SCOPE_KEY: value})
