"""The proxy's front door: one ASGI app routing MCP traffic, JWKS and the web API.

``/mcp/apps/<app>[/<path>]`` is the hot path, so it is plain ASGI with no
framework: check ``Origin``, authenticate the bearer credential (verified
identities are cached for a few seconds, so a role change reaches live
sessions within that time), normalise the path after the app name once, from
the raw target (``protocol/paths.py``: encoded slashes, control characters and
dot segments above the root are refused), resolve the app — an app the
caller's labels do not match is answered exactly like a missing one — and
hand over to the app service.  Every refusal is audited.  ``/`` and ``/web/...`` go to the web
UI when there is one (``ui``, set by the proxy service: decision 0041); everything else goes to
the Starlette web API.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import orjson
from starlette.types import Receive, Scope, Send

from bastion.audit.bound import MAX_QUOTE, clip
from bastion.audit.refusals import Refusals
from bastion.auth import appjwt
from bastion.auth.server import Actor, AuthServer
from bastion.errors import BackendError, BastionError
from bastion.protocol import paths
from bastion.proxy.routing import Router, no_such_app, refuse

ASGI = Callable[[Scope, Receive, Send], Awaitable[None]]

MCP_PREFIX = "/mcp/apps/"
_RAW_PREFIX = MCP_PREFIX.encode()
ACTOR_TTL = 2.0
_CACHE_MAX = 10_000


class Front:
    def __init__(
        self,
        *,
        auth: AuthServer,
        webapi: ASGI,
        router: Router | None,
        allowed_origins: frozenset[str],
    ) -> None:
        self.auth = auth
        self.webapi = webapi
        self.router = router
        self.allowed_origins = allowed_origins
        #: The web UI (``bastion.webui``), handed in by whoever runs the proxy; None = no UI.
        self.ui: ASGI | None = None
        self._actors: dict[str, tuple[float, Actor]] = {}
        self._jwks = orjson.dumps(appjwt.jwks(auth.cas["jwt"]))
        #: Refused MCP requests are audited through the router's (the process's) recorder.
        self.refusals: Refusals | None = router.refusals if router is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith(MCP_PREFIX) and self.router is not None:
            await self._mcp(scope, receive, send)
        elif scope["type"] == "http" and path == "/.well-known/jwks.json":
            await _reply(send, 200, self._jwks, b"application/json", [(b"cache-control", b"max-age=300")])
        elif self.ui is not None and (path == "/" or path == "/web" or path.startswith("/web/")):
            await self.ui(scope, receive, send)
        else:
            await self.webapi(scope, receive, send)

    def _cached_actor(self, token: str) -> Actor | None:
        hit = self._actors.get(token)
        if hit is not None and time.monotonic() - hit[0] < ACTOR_TTL:
            ident = hit[1].identity
            if ident is not None and ident.expires > self.auth.clock.now():
                return hit[1]
        return None

    async def actor(self, token: str) -> Actor:
        now = time.monotonic()
        hit = self._actors.get(token)
        if hit is not None and now - hit[0] < ACTOR_TTL:
            ident = hit[1].identity
            if ident is not None and ident.expires > self.auth.clock.now():
                return hit[1]
        try:
            actor = await self.auth.authenticate(token)
        except BackendError:
            # The backend is away (a database restart): a user we already know keeps
            # working with the policy we last saw (its signature was verified when it
            # was cached) until their credential expires; new users wait for the backend.
            if (
                hit is not None
                and hit[1].identity is not None
                and hit[1].identity.expires > self.auth.clock.now()
            ):
                return hit[1]
            raise
        if len(self._actors) >= _CACHE_MAX:
            self._actors.clear()
        self._actors[token] = (now, actor)
        return actor

    def _mcp(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """What answers an MCP request, to be awaited.  Not a coroutine itself: with a cached
        actor, what is awaited is the app service's own coroutine (one frame less per request).

        Every refusal here is audited (``audit/refusals.py``, rate-limited per source)."""
        # The raw target, not the decoded ``path``: "%2F" must not become a "/" before we decide.
        raw = scope.get("raw_path") or scope["path"].encode("utf-8")
        name, raw_sub = paths.split_app(raw[len(MCP_PREFIX) :])
        # ASGI servers give header names in lower case; one dict serves everything after.
        headers: dict[bytes, bytes] = dict(scope["headers"])
        origin = headers.get(b"origin", b"")
        auth_header = headers.get(b"authorization", b"")
        if origin and origin.decode("latin-1") not in self.allowed_origins:
            shown = clip(origin.decode("latin-1"), MAX_QUOTE)
            return self._refuse(scope, send, 403, f"origin {shown!r} is not allowed", app=name)
        scheme, _, token = auth_header.decode("latin-1").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return self._refuse(
                scope,
                send,
                401,
                "no credential: send `Authorization: Bearer <token>` "
                "(get one with `bastion login` or `bastion auth sign --format=token`)",
                app=name,
            )
        # The path is judged once the caller is known, so that its refusal names them.
        sub = raw_sub if raw.startswith(_RAW_PREFIX) else None  # "/mcp/%61pps/x": ours only decoded
        actor = self._cached_actor(token)
        if actor is None:
            return self._authenticate_and_route(scope, receive, send, token, name, sub, headers)
        return self._route(scope, receive, send, actor, name, sub, headers)

    async def _authenticate_and_route(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        token: str,
        name: str,
        sub: bytes | None,
        headers: dict[bytes, bytes],
    ) -> None:
        try:
            actor = await self.actor(token)
        except BastionError as e:
            await self._refuse(scope, send, e.http_status, e.message, app=name, origin=e.origin)
            return
        await self._route(scope, receive, send, actor, name, sub, headers)

    def _route(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        actor: Actor,
        name: str,
        raw_sub: bytes | None,
        headers: dict[bytes, bytes],
    ) -> Awaitable[None]:
        assert self.router is not None
        try:
            if raw_sub is None:
                raise paths.PathError("percent-encoded characters in the /mcp/apps/ prefix; send it as it is")
            sub = paths.normalise(raw_sub)
        except paths.PathError as e:
            return self._refuse(scope, send, 400, e.message, app=name, user=actor.name)
        job = None
        if actor.checker is not None:
            job = self.router.route(scope, receive, send, actor, name, sub, headers)
        if job is None:
            gone = self.router.removed(name)
            if gone is not None and actor.checker is not None and actor.checker.can_access_app(gone):
                # Only to a user who could reach it: to anyone else it never existed.
                return self._refuse(
                    scope,
                    send,
                    404,
                    f"app {clip(name, MAX_QUOTE)!r} was removed by the cluster; its sessions ended "
                    "(see `bastion mcp ls`)",
                    app=name,
                    user=actor.name,
                    origin="gateway",
                )
            return self._refuse(scope, send, 404, no_such_app(name), app=name, user=actor.name)
        return job

    def _refuse(
        self,
        scope: Scope,
        send: Send,
        status: int,
        message: str,
        *,
        app: str,
        user: str = "",
        origin: str = "client",
    ) -> Awaitable[None]:
        return refuse(
            self.refusals,
            scope,
            send,
            status,
            message,
            app=app,
            user=user,
            sid=_session_id(scope),
            origin=origin,
            path=_raw_path(scope),
        )


def _raw_path(scope: Scope) -> str:
    raw = scope.get("raw_path")
    return raw.decode("latin-1") if raw else str(scope.get("path", ""))


def _session_id(scope: Scope) -> str:
    for k, v in scope["headers"]:
        if k == b"mcp-session-id":
            return str(v.decode("latin-1"))
    return ""


async def _reply(
    send: Send, status: int, body: bytes, ctype: bytes, extra: list[tuple[bytes, bytes]]
) -> None:
    headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
