"""Credentials: issue, verify, and every way a bad one is refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import jwt
import pytest

from bastion.auth import credentials
from bastion.auth.ca import generate_ca
from bastion.errors import AuthenticationError

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def _issue(ca, ttl=timedelta(hours=1), user="alice"):  # type: ignore[no-untyped-def]
    return credentials.issue(ca, username=user, roles=["mcp-user"], traits={"t": ["1"]}, ttl=ttl, now=NOW)


def test_round_trip() -> None:
    ca = generate_ca("user", "c1", NOW)
    token, ident = _issue(ca)
    got = credentials.Verifier(ca).verify(token, NOW + timedelta(minutes=5))
    assert got.username == "alice"
    assert got.roles == ("mcp-user",)
    assert got.traits == {"t": ("1",)}
    assert got.expires == ident.expires == NOW + timedelta(hours=1)
    assert got.cluster_name == "c1"


def test_expired_is_refused_even_from_cache() -> None:
    ca = generate_ca("user", "c1", NOW)
    token, _ = _issue(ca, ttl=timedelta(minutes=1))
    v = credentials.Verifier(ca)
    v.verify(token, NOW)  # now cached
    with pytest.raises(AuthenticationError, match="expired"):
        v.verify(token, NOW + timedelta(minutes=2))
    with pytest.raises(AuthenticationError, match="expired"):
        credentials.Verifier(ca).verify(token, NOW + timedelta(minutes=2))


def test_tampered_token_is_refused() -> None:
    ca = generate_ca("user", "c1", NOW)
    token, _ = _issue(ca)
    header, payload, sig = token.split(".")
    forged_claims = jwt.utils.base64url_encode(
        jwt.utils.base64url_decode(payload).replace(b'"alice"', b'"admin"')
    ).decode()
    with pytest.raises(AuthenticationError, match="invalid"):
        credentials.Verifier(ca).verify(f"{header}.{forged_claims}.{sig}", NOW)


def test_foreign_ca_is_refused() -> None:
    ours, theirs = generate_ca("user", "c1", NOW), generate_ca("user", "c1", NOW)
    token, _ = _issue(theirs)
    with pytest.raises(AuthenticationError, match="not issued by cluster"):
        credentials.Verifier(ours).verify(token, NOW)


def test_other_cluster_audience_is_refused() -> None:
    ca = generate_ca("user", "c1", NOW)
    other = credentials.CertAuthority(**{**ca.__dict__, "cluster_name": "c2"})
    token, _ = _issue(other)
    with pytest.raises(AuthenticationError):
        credentials.Verifier(ca).verify(token, NOW)


@pytest.mark.parametrize("garbage", ["", "abc", "a.b.c", "Bearer x"])
def test_garbage_is_refused(garbage: str) -> None:
    ca = generate_ca("user", "c1", NOW)
    with pytest.raises(AuthenticationError):
        credentials.Verifier(ca).verify(garbage, NOW)


def test_a_non_user_jwt_signed_by_the_user_ca_is_refused() -> None:
    ca = generate_ca("user", "c1", NOW)
    claims = {"iss": "c1", "aud": "bastion:c1", "sub": "x", "iat": 0, "exp": 2**40, "bst": "host"}
    token = jwt.encode(claims, ca.private_key(), algorithm="EdDSA", headers={"kid": ca.key_id})
    with pytest.raises(AuthenticationError, match="not a user credential"):
        credentials.Verifier(ca).verify(token, NOW)
