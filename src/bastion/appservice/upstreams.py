"""Opening upstream connections for an app: stdio processes, legacy SSE, streamable HTTP pools.

``open_stream`` returns a message stream (stdio, SSE, or the built-in demo);
streamable-HTTP apps use one shared keep-alive ``HTTPUpstreamPool`` per
origin instead (built once; TLS contexts too).  Headers sent upstream are
built here: the cluster-signed JWT (one per user and app, shared by that user's
sessions and renewed shortly before it expires) and the app's
``rewrite.headers`` templates.  The user's own credential is never among them.

The host's policy (``hostpolicy.HostPolicy``) applies here: a dynamic app's
HTTP/SSE upstream is dialled through the address guard, and every stdio server
takes a slot (per user, per app) and gets the host's rlimits.
"""

from __future__ import annotations

import contextvars
import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import unquote, urlsplit

from bastion.appservice.demo import DemoServer
from bastion.appservice.hostpolicy import HostPolicy
from bastion.auth import appjwt
from bastion.auth.ca import CertAuthority
from bastion.errors import HostConfigError, UpstreamError
from bastion.protocol.paths import encode_target
from bastion.resources import App
from bastion.transport import MessageStream
from bastion.transport.http import HTTPUpstreamPool

JWT_HEADER = "Bastion-Jwt-Assertion"
_TEMPLATE = re.compile(r"\{\{\s*(internal|external)\.([A-Za-z0-9_.-]+)\s*\}\}")
_JWT_RENEW_BEFORE = timedelta(minutes=2)

#: ``(jwt, expires)`` the proxy signed for the request being handled (joined app services).
OFFERED_JWT: contextvars.ContextVar[tuple[str, datetime] | None] = contextvars.ContextVar(
    "bastion_offered_jwt", default=None
)


def http_url(app: App) -> str:
    """The app URI with the ``mcp+`` / ``mcp+sse+`` prefix removed."""
    uri = app.spec.uri
    for prefix in ("mcp+sse+", "mcp+"):
        if uri.startswith(prefix):
            return uri[len(prefix) :]
    return uri


def origin_and_path(app: App) -> tuple[str, str]:
    return _origin_and_path(http_url(app))


@functools.lru_cache(maxsize=1024)
def _origin_and_path(url: str) -> tuple[str, str]:
    # Per request (pool and target): urlsplit is worth a cache; app URIs are few.
    parts = urlsplit(url)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return f"{parts.scheme}://{parts.netloc}", path


#: Discovery documents a client needs to authenticate to an upstream (RFC 8414, RFC 9728):
#: forwarded for every streamable-HTTP app.
OAUTH_DISCOVERY = "/.well-known/oauth-"


def upstream_target(app: App, path: str) -> str | None:
    """The upstream request target for a client's normalised sub-path, or None: not forwarded.

    ``/`` (or nothing) goes to the URI's path, as in Teleport.  Unlike Teleport, which
    forwards any other path as it is, only these are (decision 0016): the URI's own path,
    ``/.well-known/oauth-*``, and the prefixes in the app's ``extra_paths``.  ``path``
    comes from ``bastion.protocol.paths.normalise``; the target is its re-encoding.
    """
    if path in ("", "/"):
        return origin_and_path(app)[1]
    if path == _uri_path(app.spec.uri) or path.startswith(OAUTH_DISCOVERY):
        return encode_target(path)
    for prefix in app.spec.extra_paths:
        if path == prefix or path.startswith(prefix if prefix.endswith("/") else prefix + "/"):
            return encode_target(path)
    return None


@functools.lru_cache(maxsize=1024)
def _uri_path(uri: str) -> str:
    for prefix in ("mcp+sse+", "mcp+"):
        if uri.startswith(prefix):
            uri = uri[len(prefix) :]
            break
    return unquote(urlsplit(uri).path) or "/"


#: Client headers never passed upstream, whatever the app: they claim an identity, and only
#: the gateway states identities (``X-Forwarded-*`` and ``*-Jwt-Assertion`` by pattern too).
IDENTITY_HEADERS = frozenset(
    {
        b"forwarded",
        b"x-real-ip",
        b"x-forwarded",
        b"true-client-ip",
        b"x-client-ip",
        b"cf-connecting-ip",
        b"remote-user",
        b"x-remote-user",
        b"x-auth-request-user",
        b"x-auth-request-email",
        b"x-original-url",
        b"x-rewrite-url",
        b"x-original-uri",
        JWT_HEADER.lower().encode(),
    }
)


def stripped_headers(app: App) -> frozenset[bytes]:
    """Client header names (lower case) this app's upstream must not receive from the client:
    :data:`IDENTITY_HEADERS` and the app's rewrite headers, which the gateway sets itself."""
    return _stripped(tuple(h.name for h in app.spec.rewrite.headers))


@functools.lru_cache(maxsize=1024)
def _stripped(names: tuple[str, ...]) -> frozenset[bytes]:
    return IDENTITY_HEADERS | {n.lower().encode("latin-1") for n in names}


def is_identity_header(name: bytes) -> bool:
    """``X-Forwarded-*`` or ``*-Jwt-Assertion`` (``name`` in lower case); see :data:`IDENTITY_HEADERS`."""
    return name.startswith(b"x-forwarded-") or name.endswith(b"-jwt-assertion")


#: Signed upstream JWTs shared by the sessions of one user with one app: ``key -> (jwt, expires)``.
JWTCache = dict[tuple[Any, ...], tuple[str, datetime]]
_JWT_CACHE_MAX = 10_000


@dataclass
class UpstreamIdentity:
    """Per-session upstream headers: the JWT (renewed when near expiry) plus rewrite headers.

    With ``cache`` (shared by the sessions of one gateway), a JWT signed for a user and
    an app serves every session of that user with that app until shortly before it
    expires, instead of one signature per session.  The key holds everything the claims
    are made of (user, roles, traits, audience, claims mode, signing key).
    """

    #: The cluster's JWT CA; ``None`` in a joined app service, which uses the
    #: JWT the proxy signed and sent with the request (``OFFERED_JWT``).
    ca: CertAuthority | None
    app: App
    username: str
    roles: Sequence[str]
    traits: Mapping[str, Sequence[str]]
    cache: JWTCache | None = None
    _jwt: str = ""
    _expires: datetime | None = None
    _renew_at: datetime | None = None
    _encoded: list[tuple[bytes, bytes]] | None = None
    _encoded_for: str = ""

    def jwt(self, now: datetime) -> str:
        if self.ca is None:
            offered = OFFERED_JWT.get()
            if offered is not None and (self._expires is None or offered[1] > self._expires):
                self._jwt, self._expires = offered
            if not self._jwt or self._expires is None or self._expires <= now:
                raise UpstreamError("no valid upstream JWT: the proxy sent none with this request")
            return self._jwt
        renew_at = self._renew_at
        if renew_at is None or now > renew_at or not self._jwt:
            self._jwt, self._expires = self._sign(self.ca, now)
            self._renew_at = self._expires - _JWT_RENEW_BEFORE
        return self._jwt

    def _sign(self, ca: CertAuthority, now: datetime) -> tuple[str, datetime]:
        cache = self.cache
        key: tuple[Any, ...] = ()
        if cache is not None:
            spec = self.app.spec
            key = (
                ca.cluster_name,
                ca.key_id,
                self.username,
                tuple(self.roles),
                tuple(sorted((k, tuple(v)) for k, v in self.traits.items())),
                spec.uri,
                spec.rewrite.jwt_claims,
            )
            hit = cache.get(key)
            # Renewed at the same margin as a session's own token.  A hit signed "later"
            # than now (a clock that stepped back) is not trusted either.
            if hit is not None and hit[1] - now >= _JWT_RENEW_BEFORE and hit[1] - now <= appjwt.MAX_TTL:
                return hit
        signed = appjwt.sign(
            ca,
            username=self.username,
            roles=self.roles,
            traits=self.traits,
            audience=self.app.spec.uri,
            now=now,
            claims_mode=self.app.spec.rewrite.jwt_claims,
        )
        if cache is not None:
            if len(cache) >= _JWT_CACHE_MAX:
                cache.clear()
            cache[key] = signed
        return signed

    def headers(self, now: datetime) -> list[tuple[str, str]]:
        token = self.jwt(now)
        out = [(JWT_HEADER, token)]
        for h in self.app.spec.rewrite.headers:
            out.append((h.name, self._expand(h.value, token)))
        return out

    def encoded_headers(self, now: datetime) -> list[tuple[bytes, bytes]]:
        """:meth:`headers`, encoded; the same list object for as long as the JWT stands
        (callers may cache what they build from it by identity; they must not change it)."""
        token = self.jwt(now)
        out = self._encoded
        if out is None or self._encoded_for != token:
            out = self._encoded = [(n.encode(), v.encode()) for n, v in self.headers(now)]
            self._encoded_for = token
        return out

    def _expand(self, value: str, token: str) -> str:
        def sub(m: re.Match[str]) -> str:
            ns, name = m.group(1), m.group(2)
            if ns == "internal" and name == "jwt":
                return token
            return ",".join(self.traits.get(name, ()))

        return _TEMPLATE.sub(sub, value)


class Pools:
    """One keep-alive pool per upstream origin, created on first use."""

    def __init__(self, *, response_timeout: float = 300.0, host: HostPolicy | None = None) -> None:
        self._pools: dict[tuple[str, bool, bool], HTTPUpstreamPool] = {}
        self._response_timeout = response_timeout
        self._host = host

    def for_app(self, app: App) -> HTTPUpstreamPool:
        origin, _ = origin_and_path(app)
        verify = not app.spec.insecure_skip_verify
        guard = None if self._host is None else self._host.guard_for(app)
        # A trusted (config file) app and a dynamic one never share a pool: the
        # dynamic one's connections are all made through the guard.
        key = (origin, verify, guard is not None)
        pool = self._pools.get(key)
        if pool is None:
            pool = HTTPUpstreamPool(
                origin, verify=verify, response_timeout=self._response_timeout, guard=guard
            )
            self._pools[key] = pool
        return pool

    async def aclose(self) -> None:
        for pool in self._pools.values():
            await pool.aclose()
        self._pools.clear()


async def open_stream(
    app: App,
    *,
    ident: UpstreamIdentity,
    session_id: str,
    cluster_name: str,
    is_demo: bool,
    now: datetime,
    host: HostPolicy | None = None,
) -> MessageStream:
    """A message stream to the app's upstream (stdio process, SSE session, or the demo).

    With ``host``: a dynamic app the policy refuses is not started (``HostConfigError``,
    a second check behind the one that kept it out of the registry), a stdio server
    over a cap is ``LimitExceededError`` (429), and SSE connects go through the guard.
    """
    transport = app.spec.transport
    if is_demo:
        return DemoServer(
            user=ident.username,
            roles=ident.roles,
            traits=ident.traits,
            session_id=session_id,
            transport="stdio",
            cluster_name=cluster_name,
        )
    if transport == "stdio":
        from bastion.transport.stdio import spawn_stdio

        if app.spec.mcp is None:
            raise HostConfigError(f'app "{app.metadata.name}" has no command to run')
        if host is None:
            return await spawn_stdio(app.spec.mcp, name=app.metadata.name)
        _check_dynamic(host, app)
        release = host.slots.take(ident.username, app.metadata.name)
        return await spawn_stdio(app.spec.mcp, name=app.metadata.name, rlimits=host.rlimits, on_close=release)
    if transport == "sse":
        from bastion.transport.sse import connect_sse

        if host is not None:
            _check_dynamic(host, app)
        return await connect_sse(
            http_url(app),
            headers=dict(ident.headers(now)),
            verify=not app.spec.insecure_skip_verify,
            guard=None if host is None else host.guard_for(app),
        )
    raise UpstreamError(f'app "{app.metadata.name}": transport {transport!r} is not a message stream')


def _check_dynamic(host: HostPolicy, app: App) -> None:
    if host.trusted(app.metadata.name):
        return
    why = host.refusal(app)
    if why is not None:
        raise HostConfigError(f'app "{app.metadata.name}" is not served by this host: {why}')
