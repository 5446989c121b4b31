"""Upstream headers: the JWT shared by a user's sessions with an app, and their encoded form."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import jwt
import pytest
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from bastion.appservice.upstreams import (
    JWT_HEADER,
    JWTCache,
    UpstreamIdentity,
    is_identity_header,
    origin_and_path,
    stripped_headers,
    upstream_target,
)
from bastion.auth.ca import CertAuthority, generate_ca
from bastion.resources import App

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def ca() -> CertAuthority:
    return generate_ca("jwt", "c1", NOW)


def app(uri: str = "mcp+http://up.example:8080/mcp?x=1", name: str = "a") -> App:
    return App.model_validate({"metadata": {"name": name}, "spec": {"uri": uri}})


def claims(ca: CertAuthority, token: str, audience: str) -> dict[str, object]:
    key = load_pem_public_key(ca.public_key_pem)
    out: dict[str, object] = jwt.decode(
        token,
        key,
        algorithms=["ES256"],
        audience=audience,
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )
    return out


def ident(ca: CertAuthority, a: App, cache: JWTCache | None, *, user: str = "alice") -> UpstreamIdentity:
    return UpstreamIdentity(ca, a, user, ("dev",), {"team": ("x",)}, cache=cache)


def test_origin_and_path_and_target() -> None:
    a = app()
    assert origin_and_path(a) == ("http://up.example:8080", "/mcp?x=1")
    assert upstream_target(a, "/") == "/mcp?x=1"
    assert upstream_target(a, "") == "/mcp?x=1"
    # Only the app's own paths go upstream (decision 0016), re-encoded from the decided path.
    assert upstream_target(a, "/other") is None
    assert upstream_target(a, "/mcp") == "/mcp"
    assert upstream_target(a, "/.well-known/oauth-protected-resource/mcp") == (
        "/.well-known/oauth-protected-resource/mcp"
    )
    assert upstream_target(a, "/.well-known/openid-configuration") is None


def test_extra_paths_are_prefixes_on_segment_boundaries() -> None:
    a = App.model_validate(
        {"metadata": {"name": "a"}, "spec": {"uri": "mcp+http://up:1/mcp", "extra_paths": ["/files"]}}
    )
    assert upstream_target(a, "/files") == "/files"
    assert upstream_target(a, "/files/a b") == "/files/a%20b"
    assert upstream_target(a, "/files/100%") == "/files/100%25"  # decoded once, never twice
    assert upstream_target(a, "/filesystem") is None
    assert upstream_target(a, "/prod") is None


@pytest.mark.parametrize("bad", ["files", "/a/../b", "/a/./b", "/a%2fb", "/a?x", "/a\\b", "/a\x00"])
def test_extra_paths_must_be_in_normal_form(bad: str) -> None:
    with pytest.raises(ValueError, match="extra path"):
        App.model_validate(
            {"metadata": {"name": "a"}, "spec": {"uri": "mcp+http://up:1/", "extra_paths": [bad]}}
        )


def test_identity_and_rewrite_headers_are_stripped_by_name() -> None:
    a = App.model_validate(
        {
            "metadata": {"name": "a"},
            "spec": {
                "uri": "mcp+http://up:1/mcp",
                "rewrite": {"headers": ["X-Upstream-Identity: {{internal.jwt}}"]},
            },
        }
    )
    strip = stripped_headers(a)
    assert {b"x-upstream-identity", b"forwarded", b"x-real-ip", JWT_HEADER.lower().encode()} <= strip
    assert stripped_headers(a) is strip  # computed once per definition
    for name in (b"x-forwarded-user", b"x-forwarded-for", b"teleport-jwt-assertion"):
        assert is_identity_header(name)
    assert not is_identity_header(b"x-request-id")


def test_sessions_of_one_user_and_app_share_a_token(ca: CertAuthority) -> None:
    cache: JWTCache = {}
    a = app()
    first = ident(ca, a, cache).jwt(NOW)
    second = ident(ca, a, cache).jwt(NOW + timedelta(minutes=1))
    assert first == second
    c = claims(ca, first, a.spec.uri)
    assert c["sub"] == "alice" and c["aud"] == [a.spec.uri] and c["roles"] == ["dev"]


def test_no_sharing_across_users_apps_or_claims(ca: CertAuthority) -> None:
    cache: JWTCache = {}
    a, b = app(), app("mcp+http://other.example/mcp", name="b")
    base = ident(ca, a, cache).jwt(NOW)
    assert ident(ca, a, cache, user="bob").jwt(NOW) != base
    other_app = ident(ca, b, cache).jwt(NOW)
    assert other_app != base
    assert claims(ca, other_app, b.spec.uri)["aud"] == [b.spec.uri]
    roles = UpstreamIdentity(ca, a, "alice", ("ops",), {"team": ("x",)}, cache=cache).jwt(NOW)
    assert roles != base and claims(ca, roles, a.spec.uri)["roles"] == ["ops"]
    traits = UpstreamIdentity(ca, a, "alice", ("dev",), {"team": ("y",)}, cache=cache).jwt(NOW)
    assert traits != base and claims(ca, traits, a.spec.uri)["traits"] == {"team": ["y"]}


def test_a_shared_token_is_renewed_before_it_expires(ca: CertAuthority) -> None:
    cache: JWTCache = {}
    a = app()
    first = ident(ca, a, cache).jwt(NOW)
    exp = claims(ca, first, a.spec.uri)["exp"]
    # A new session 9 minutes later: the cached token has 1 minute left, under the 2-minute margin.
    later = NOW + timedelta(minutes=9)
    renewed = ident(ca, a, cache).jwt(later)
    assert renewed != first
    assert claims(ca, renewed, a.spec.uri)["exp"] == int((later + timedelta(minutes=10)).timestamp())
    assert exp == int((NOW + timedelta(minutes=10)).timestamp())


def test_a_token_from_the_future_is_not_reused(ca: CertAuthority) -> None:
    cache: JWTCache = {}
    a = app()
    first = ident(ca, a, cache).jwt(NOW)
    earlier = NOW - timedelta(hours=1)  # the clock stepped back: the cached expiry is too far off
    assert ident(ca, a, cache).jwt(earlier) != first


def test_a_session_renews_its_own_token(ca: CertAuthority) -> None:
    i = ident(ca, app(), None)
    first = i.jwt(NOW)
    assert i.jwt(NOW + timedelta(minutes=7)) == first
    assert i.jwt(NOW + timedelta(minutes=8, seconds=1)) != first


def test_encoded_headers_follow_the_token(ca: CertAuthority) -> None:
    a = App.model_validate(
        {
            "metadata": {"name": "a"},
            "spec": {
                "uri": "mcp+http://up.example/mcp",
                "rewrite": {"headers": [{"name": "Authorization", "value": "Bearer {{internal.jwt}}"}]},
            },
        }
    )
    i = ident(ca, a, None)
    enc = i.encoded_headers(NOW)
    token = i.jwt(NOW)
    assert enc == [(JWT_HEADER.encode(), token.encode()), (b"Authorization", b"Bearer " + token.encode())]
    assert i.encoded_headers(NOW + timedelta(minutes=1)) is enc  # unchanged while the token stands
    renewed = i.encoded_headers(NOW + timedelta(minutes=9))
    assert renewed is not enc and renewed[0][1] != enc[0][1]
