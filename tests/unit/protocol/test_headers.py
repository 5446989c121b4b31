"""Mirrored MCP headers must agree with the body."""

from __future__ import annotations

import base64

import pytest

from bastion.protocol.headers import decode_header_value, mismatch


def test_absent_headers_agree() -> None:
    assert mismatch(None, None, "tools/call", {"name": "echo"}) == ""


@pytest.mark.parametrize(
    ("mh", "nh", "method", "params", "bad"),
    [
        (b"tools/call", b"echo", "tools/call", {"name": "echo"}, False),
        (b"tools/list", None, "tools/call", {"name": "echo"}, True),
        (b"tools/call", b"echo", "tools/call", {"name": "delete_all"}, True),
        (None, b"file:///a", "resources/read", {"uri": "file:///a"}, False),
        (None, b"file:///b", "resources/read", {"uri": "file:///a"}, True),
        (None, b"x", "ping", {}, True),
        (b"=?base64?" + base64.b64encode(b"tools/call") + b"?=", None, "tools/call", {}, False),
        (
            None,
            b"=?base64?" + base64.b64encode("émoji-tool".encode()) + b"?=",
            "tools/call",
            {"name": "émoji-tool"},
            False,
        ),
        (None, b"=?base64?!!!?=", "tools/call", {"name": "x"}, True),
    ],
)
def test_mismatch(mh: bytes | None, nh: bytes | None, method: str, params: dict, bad: bool) -> None:  # type: ignore[type-arg]
    assert bool(mismatch(mh, nh, method, params)) is bad


def test_plain_values_are_stripped() -> None:
    assert decode_header_value(b" tools/call ") == "tools/call"
