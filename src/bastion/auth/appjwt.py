"""Short-lived JWTs that tell an upstream MCP server who is calling.

Signed with the cluster's ``jwt`` CA (ES256), verifiable with the keys at the
proxy's ``/.well-known/jwks.json``.  Claims: ``iss`` = cluster name, ``sub``
and ``username`` = the user, ``aud`` = the app URI, ``roles`` / ``traits`` per
the app's ``rewrite.jwt_claims``, ``iat``/``nbf``/``exp`` (at most 10 minutes).
These tokens are deliberately useless as gateway credentials (another CA,
another audience, no ``bst`` claim).  Pure: no I/O.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from bastion.auth.ca import CertAuthority

MAX_TTL = timedelta(minutes=10)


def sign(
    ca: CertAuthority,
    *,
    username: str,
    roles: Sequence[str],
    traits: Mapping[str, Sequence[str]],
    audience: str,
    now: datetime,
    claims_mode: str = "roles-and-traits",
    ttl: timedelta = MAX_TTL,
) -> tuple[str, datetime]:
    """A JWT for ``username`` valid for ``min(ttl, 10 min)``; returns it and its expiry."""
    exp = now + min(ttl, MAX_TTL)
    claims: dict[str, Any] = {
        "iss": ca.cluster_name,
        "sub": username,
        "username": username,
        "aud": [audience],
        "iat": int(now.timestamp()),
        "nbf": int(now.timestamp()) - 30,
        "exp": int(exp.timestamp()),
        "jti": secrets.token_hex(8),
    }
    if claims_mode in ("roles-and-traits", "roles"):
        claims["roles"] = list(roles)
    if claims_mode in ("roles-and-traits", "traits"):
        claims["traits"] = {k: list(v) for k, v in traits.items()}
    token = jwt.encode(claims, ca.private_key(), algorithm="ES256", headers={"kid": ca.key_id})
    return token, exp


def _b64(n: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes(32, "big")).decode().rstrip("=")


def jwks(ca: CertAuthority) -> dict[str, Any]:
    """The JSON Web Key Set with the public half of the ``jwt`` CA."""
    pub = load_pem_public_key(ca.public_key_pem)
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        raise TypeError("the jwt CA must hold an EC key")
    nums = pub.public_numbers()
    return {
        "keys": [
            {
                "kty": "EC",
                "crv": "P-256",
                "x": _b64(nums.x),
                "y": _b64(nums.y),
                "kid": ca.key_id,
                "alg": "ES256",
                "use": "sig",
            }
        ]
    }
