"""Rewrite headers an app defines: what the gateway writes itself cannot be replaced."""

from __future__ import annotations

import pydantic
import pytest

from bastion.resources import App


def _app(*headers: str) -> App:
    return App.model_validate(
        {
            "metadata": {"name": "a"},
            "spec": {"uri": "mcp+http://10.0.0.1/mcp", "rewrite": {"headers": list(headers)}},
        }
    )


@pytest.mark.parametrize(
    "name",
    [
        "Host",
        "Content-Length",
        "transfer-encoding",
        "Connection",
        "Mcp-Session-Id",
        "Mcp_Name",
        "X-Bastion-x",
    ],
)
def test_headers_the_gateway_writes_are_refused(name: str) -> None:
    # Such a rewrite made every call a 500 blamed on the gateway (second review); now the
    # definition is refused where it is written, saying why.
    with pytest.raises(pydantic.ValidationError, match="set by the gateway itself"):
        _app(f"{name}: x")


def test_ordinary_and_authorization_headers_are_accepted() -> None:
    app = _app("Authorization: Bearer {{internal.jwt}}", "X-Upstream-Identity: {{internal.jwt}}")
    assert [h.name for h in app.spec.rewrite.headers] == ["Authorization", "X-Upstream-Identity"]
