"""Short-lived user credentials: signed by the cluster's user CA, presented as bearer tokens.

A credential is a compact JWT (EdDSA / Ed25519) with::

    iss  = cluster name          aud = "bastion:<cluster name>"   (bound to this cluster)
    sub  = user name             roles, traits (as issued; informational)
    iat, nbf, exp                jti (unique id: audit, and revocation by ``bastion logout``)
    bst  = "user"                (credential kind, so other JWTs of ours never pass as one)
    uid  = the user record's id  (a user deleted and re-created under the same name has
                                  another id, so the old user's credentials do not pass)

Authorisation always uses the user's *current* roles from the backend, so a
role removed from a user takes effect at once; the claims only say who the
bearer is and until when.  Verification is pure and cached: a token verified
once is not verified again until it expires (the cache holds only tokens
that verified).

This module must not do I/O.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

import jwt
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from bastion.auth.ca import CertAuthority
from bastion.errors import AuthenticationError
from bastion.identity import Identity as Identity  # re-exported: its old home

CREDENTIAL_KIND = "user"
_RELOGIN = "log in again with `bastion login`"


def audience_for(cluster_name: str) -> str:
    return f"bastion:{cluster_name}"


def issue(
    ca: CertAuthority,
    *,
    username: str,
    roles: Sequence[str],
    traits: Mapping[str, Sequence[str]],
    ttl: timedelta,
    now: datetime,
    user_uid: str = "",
) -> tuple[str, Identity]:
    """Sign a credential for ``username`` (record ``user_uid``) valid for ``ttl`` from ``now``."""
    exp = now + ttl
    jti = secrets.token_hex(16)
    claims = {
        "iss": ca.cluster_name,
        "aud": audience_for(ca.cluster_name),
        "sub": username,
        "roles": list(roles),
        "traits": {k: list(v) for k, v in traits.items()},
        "iat": int(now.timestamp()),
        "nbf": int(now.timestamp()) - 60,
        "exp": int(exp.timestamp()),
        "jti": jti,
        "bst": CREDENTIAL_KIND,
    }
    if user_uid:
        claims["uid"] = user_uid
    token = jwt.encode(claims, ca.private_key(), algorithm="EdDSA", headers={"kid": ca.key_id})
    ident = Identity(
        username=username,
        cluster_name=ca.cluster_name,
        roles=tuple(roles),
        traits={k: tuple(v) for k, v in traits.items()},
        expires=datetime.fromtimestamp(int(exp.timestamp()), UTC),
        issued_at=datetime.fromtimestamp(int(now.timestamp()), UTC),
        token_id=jti,
        user_uid=user_uid,
    )
    return token, ident


class Verifier:
    """Verifies credentials against one user CA; remembers tokens that verified."""

    def __init__(self, ca: CertAuthority, *, cache_size: int = 4096) -> None:
        key = load_pem_public_key(ca.public_key_pem)
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise TypeError("the user CA must hold an Ed25519 key")
        self._key = key
        self._ca = ca
        self._cache: OrderedDict[str, Identity] = OrderedDict()
        self._cache_size = cache_size

    def verify(self, token: str, now: datetime) -> Identity:
        """The identity in ``token``; ``AuthenticationError`` if it is not a valid, live credential."""
        ident = self._cache.get(token)
        if ident is not None:
            if ident.expires <= now:
                del self._cache[token]
                raise AuthenticationError(f"your credential expired; {_RELOGIN}")
            return ident
        ident = self._verify_uncached(token, now)
        self._cache[token] = ident
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return ident

    def _verify_uncached(self, token: str, now: datetime) -> Identity:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthenticationError(f"the credential is malformed; {_RELOGIN}") from None
        if header.get("kid") != self._ca.key_id or header.get("alg") != "EdDSA":
            raise AuthenticationError(
                f"the credential was not issued by cluster {self._ca.cluster_name!r}; {_RELOGIN}"
            )
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=["EdDSA"],
                audience=audience_for(self._ca.cluster_name),
                issuer=self._ca.cluster_name,
                # Time claims are checked below against the injected clock, not
                # PyJWT's wall clock, so tests and skewed hosts behave the same.
                options={
                    "require": ["exp", "iat", "sub", "aud", "iss"],
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.InvalidAudienceError:
            raise AuthenticationError(f"the credential is for another cluster; {_RELOGIN}") from None
        except jwt.PyJWTError:
            raise AuthenticationError(f"the credential is invalid; {_RELOGIN}") from None
        if claims.get("bst") != CREDENTIAL_KIND:
            raise AuthenticationError(f"this is not a user credential; {_RELOGIN}")
        expires = datetime.fromtimestamp(int(claims["exp"]), UTC)
        if expires <= now:
            raise AuthenticationError(f"your credential expired; {_RELOGIN}")
        if datetime.fromtimestamp(int(claims.get("nbf", 0)), UTC) > now:
            raise AuthenticationError(
                f"the credential is not valid yet (is this host's clock right?); {_RELOGIN}"
            )
        traits = claims.get("traits") or {}
        return Identity(
            username=str(claims["sub"]),
            cluster_name=self._ca.cluster_name,
            roles=tuple(str(r) for r in claims.get("roles") or ()),
            traits={str(k): tuple(str(x) for x in v) for k, v in traits.items()},
            expires=expires,
            issued_at=datetime.fromtimestamp(int(claims["iat"]), UTC),
            token_id=str(claims.get("jti", "")),
            user_uid=str(claims.get("uid", "")),
        )
