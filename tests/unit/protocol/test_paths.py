"""The request path normaliser: decoded once, dot segments resolved, ambiguous forms refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.protocol.paths import PathError, encode_target, normalise, split_app


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        (b"", "/"),
        (b"/", "/"),
        (b"/mcp", "/mcp"),
        (b"/a/./b", "/a/b"),
        (b"/a/b/../c", "/a/c"),
        (b"/a/b/..", "/a/"),
        (b"/a/%2e%2e/prod", "/prod"),  # encoded dots are dots, decided after decoding
        (b"/%20x", "/ x"),
        (b"/caf%C3%A9", "/caf\u00e9"),
        (b"/100%25", "/100%"),
        (b"/a;b", "/a;b"),
    ],
)
def test_normal_forms(raw: bytes, path: str) -> None:
    assert normalise(raw) == path


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"/..%2fprod", "encoded '/'"),
        (b"/%2Fadmin", "encoded '/'"),
        (b"/%3Fq=1", "encoded '?'"),
        (b"/x%23frag", "encoded '#'"),
        (b"/a%5cb", "encoded '\\\\'"),
        (b"/a\\b", "'\\\\'"),
        (b"/a%00b", "control character"),
        (b"/a%0d%0aX: y", "control character"),
        (b"/a%7f", "control character"),
        (b"/a%zz", "malformed percent-encoding"),
        (b"/a%2", "malformed percent-encoding"),
        (b"/%ff", "not UTF-8"),
        (b"/\xc3\xa9", "outside ASCII"),
        (b"/../prod", "climbs above"),
        (b"/a/../../prod", "climbs above"),
        (b"/api/..;/admin", "dot segment with parameters"),
    ],
)
def test_ambiguous_paths_are_refused_as_the_clients_fault(raw: bytes, why: str) -> None:
    with pytest.raises(PathError, match=why) as e:
        normalise(raw)
    assert e.value.origin == "client" and e.value.http_status == 400
    assert len(e.value.message) < 200  # never the whole input


def test_errors_never_echo_unbounded_input() -> None:
    with pytest.raises(PathError) as e:
        normalise(b"/%zz" + b"A" * 100_000)
    assert len(e.value.message) < 200


def test_split_app() -> None:
    assert split_app(b"logger") == ("logger", b"")
    assert split_app(b"logger/") == ("logger", b"/")
    assert split_app(b"logger/prod/x") == ("logger", b"/prod/x")
    assert split_app(b"log%67er/%2f") == ("logger", b"/%2f")


@given(st.text(max_size=40))
def test_decided_path_round_trips_through_the_target(text: str) -> None:
    """Whatever is accepted, the upstream decodes the forwarded target into exactly the decided path."""
    raw = encode_target("/" + text).encode("ascii")
    try:
        path = normalise(raw)
    except PathError:
        return
    target = encode_target(path)
    assert target.isascii() and " " not in target and "?" not in target and "#" not in target
    assert normalise(target.encode("ascii")) == path


def test_a_decoded_path_from_an_older_proxy_is_decided_the_same_way() -> None:
    """The app service re-normalises the (decoded) sub-path it is handed: dot segments that a
    proxy left in are resolved before the allow-list, not forwarded for the upstream to resolve."""
    assert normalise(encode_target("/.well-known/oauth-x/../../prod").encode()) == "/prod"
    assert normalise(encode_target("/v2/./a b").encode()) == "/v2/a b"
    with pytest.raises(PathError):
        normalise(encode_target("/../prod").encode())
