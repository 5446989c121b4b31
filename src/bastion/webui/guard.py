"""The browser session's cookie, its CSRF token and the headers every UI answer carries (ADR 42).

Pure: no I/O.  The session cookie holds the user's credential, the same one `bastion login`
gets (``AuthServer.login``), so its lifetime, revocation and the user's current roles are
checked on every request exactly as for a bearer token.  The CSRF token is derived from that
credential with HMAC (a "signed double submit"): only a page that could read the cookie's value
— our own — can compute it, it dies with the session, and any proxy of the cluster can check it
without shared state.  Before sign-in (the sign-in and invite forms) a random pre-session
cookie plays the same part.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from datetime import datetime

#: ``__Host-``: the browser keeps it only if Secure, Path=/ and without Domain (no subdomain
#: can set or shadow it).
SESSION_COOKIE = "__Host-bastion-session"
PRESESSION_COOKIE = "__Host-bastion-pre"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'"
)
HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}

_CSRF_CONTEXT = b"bastion web csrf v1"


def csrf_for(secret: str) -> str:
    """The CSRF token of a session whose cookie holds ``secret`` (or of a pre-session)."""
    mac = hmac.new(secret.encode(), _CSRF_CONTEXT, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode().rstrip("=")


def csrf_ok(secret: str, given: str) -> bool:
    """Whether ``given`` is the CSRF token of ``secret`` (constant time)."""
    if not secret or not given or len(given) > 128:
        return False
    return hmac.compare_digest(csrf_for(secret), given)


def new_presession() -> str:
    return secrets.token_urlsafe(24)


def cookie(name: str, value: str, *, expires: datetime | None = None, max_age: int | None = None) -> str:
    """A ``Set-Cookie`` value: HttpOnly, Secure, SameSite=Strict, Path=/ — always."""
    parts = [f"{name}={value}", "Path=/", "Secure", "HttpOnly", "SameSite=Strict"]
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    if expires is not None:
        parts.append("Expires=" + expires.strftime("%a, %d %b %Y %H:%M:%S GMT"))
    return "; ".join(parts)


def cleared(name: str) -> str:
    return cookie(name, "", max_age=0)


def _host_port(authority: str) -> tuple[str, int]:
    """``host[:port]`` (IPv6 in brackets) as (lower-case host, port; 443 when left out)."""
    host, port = authority.strip().lower(), 443
    if host.startswith("["):
        end = host.find("]")
        rest, host = host[end + 1 :], host[1:end]
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif host.count(":") == 1:
        host, _, p = host.partition(":")
        port = int(p) if p.isdigit() else -1
    return host, port


def same_origin(origin: str, public_addr: str, host: str) -> bool:
    """A state-changing request's ``Origin`` (when the browser sends one) must be this proxy:
    ``https`` and the public address or the ``Host`` asked for (browsers leave port 443 out)."""
    if not origin:
        return True  # older browsers omit it on same-origin posts; the CSRF token still decides
    scheme, sep, authority = origin.partition("://")
    if scheme.lower() != "https" or not sep or not authority or "/" in authority:
        return False
    return _host_port(authority) in {_host_port(a) for a in (public_addr, host) if a}
