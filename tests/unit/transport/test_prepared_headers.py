"""Request headers prepared once for the upstream pool: the same bytes and checks as a list."""

from __future__ import annotations

import pytest

from bastion.transport.http import HTTPUpstreamPool, PreparedHeaders

HEADERS = [(b"accept", b"application/json"), (b"mcp-session-id", b"abc"), (b"x-y", b"")]


@pytest.mark.parametrize(
    ("method", "body"), [("POST", b'{"a":1}'), ("POST", b""), ("GET", b""), ("DELETE", b"")]
)
def test_same_bytes_as_a_list(method: str, body: bytes) -> None:
    pool = HTTPUpstreamPool("http://up.example:8080")
    assert pool._encode(method, "/mcp?x=1", PreparedHeaders(HEADERS), body) == pool._encode(
        method, "/mcp?x=1", HEADERS, body
    )


@pytest.mark.parametrize("name", [b"Host", b"content-length", b"Transfer-Encoding", b"connection"])
def test_reserved_names_refused(name: bytes) -> None:
    with pytest.raises(ValueError, match="set by the pool"):
        PreparedHeaders([*HEADERS, (name, b"x")])


@pytest.mark.parametrize(
    "header", [(b"a", b"b\r\nhost: evil"), (b"a\nb", b"c"), (b"a", b"b\rc"), (b"a", b"\n")]
)
def test_cr_or_lf_refused(header: tuple[bytes, bytes]) -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        PreparedHeaders([*HEADERS, header])


@pytest.mark.parametrize("target", ["/a\r\nhost: evil", "/a\nb", "/a b", "a"])
def test_target_still_checked(target: str) -> None:
    pool = HTTPUpstreamPool("http://up.example")
    with pytest.raises(ValueError, match=r"target|CR or LF"):
        pool._encode("POST", target, PreparedHeaders(HEADERS), b"{}")
