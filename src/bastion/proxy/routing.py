"""Which app service carries a request: the in-process one or a joined one over its tunnel.

A new session (no ``Mcp-Session-Id``) goes to one of the live app services
serving the app, in turn (round robin), skipping one whose tunnel fails
before it answers.  A session's later requests go where the session lives:
its id starts with that app service's route tag (``<tag>.<id>``).  When no
tunnel of that tag is up here, ``proxy/hosts.py`` says whether its app service
is gone (the client is told to start a new session: 404, as the spec asks) or
believed alive (the request waits briefly for its tunnel, then 503 with
``Retry-After``: a live session is never thrown away because this proxy just
started).  Routing needs no shared state: any proxy the app service is
connected to can carry any request of the session.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from bastion.answers import send_jsonrpc_error
from bastion.appservice.registry import AppRegistry
from bastion.audit.bound import MAX_QUOTE, clip
from bastion.audit.refusals import Refusals
from bastion.auth import appjwt
from bastion.auth.server import Actor, AuthServer
from bastion.handoff import SCOPE_KEY, Handoff
from bastion.proxy.hosts import HOLD, RETRY_AFTER, Fate, Hosts
from bastion.resources import App
from bastion.tunnel import wire
from bastion.tunnel.http import NotStarted, forward
from bastion.tunnel.mux import TunnelClosed
from bastion.tunnel.server import AgentConn, TunnelServer

log = logging.getLogger("bastion.proxy")

ASGI = Callable[[Scope, Receive, Send], Any]
_MAX_BODY = 64 << 20
_JWT_RENEW_BEFORE = timedelta(minutes=2)
_SESSION_GONE = (
    "session not found (it ended, or the app service that held it is gone): start a new one with initialize"
)


def no_such_app(name: str) -> str:
    """The answer for an app that does not exist or that the caller may not see (the same)."""
    return f"no MCP app named {clip(name, MAX_QUOTE)!r} (see `bastion mcp ls`)"


@dataclass
class _Target:
    app: App
    conn: AgentConn | None  # None = the in-process app service


class Router:
    """Routes ``/mcp/apps/<name>`` requests; also the proxy's view of live apps."""

    def __init__(
        self,
        auth: AuthServer,
        *,
        local: ASGI | None,
        local_registry: AppRegistry | None,
        local_tag: str,
        tunnels: TunnelServer | None,
        refusals: Refusals | None = None,
        hosts: Hosts | None = None,
    ) -> None:
        self.auth = auth
        #: Whether an app service without a tunnel here is gone or coming (and readiness).
        self.hosts = hosts
        #: Where refused requests are audited (shared with the front and the local app service).
        self.refusals = refusals
        self.local = local
        self.local_registry = local_registry
        self.local_tag = local_tag
        self.tunnels = tunnels
        self._turn = itertools.count()
        self._actor_docs: dict[tuple[str, tuple[int, ...], str], bytes] = {}
        self._jwts: dict[tuple[str, str, str], tuple[str, datetime]] = {}

    # ------------------------------------------------------- registry view

    def get(self, name: str) -> App | None:
        if self.local_registry is not None:
            app = self.local_registry.get(name)
            if app is not None:
                return app
        if self.tunnels is not None:
            for c in self.tunnels.candidates(name):
                return c.apps[name]
        return None

    def all(self) -> list[App]:
        seen: dict[str, App] = {}
        if self.local_registry is not None:
            for a in self.local_registry.all():
                seen[a.metadata.name] = a
        if self.tunnels is not None:
            for c in sorted(self.tunnels.conns.values(), key=lambda c: c.host.host_id):
                for name, a in c.apps.items():
                    seen.setdefault(name, a)
        return sorted(seen.values(), key=lambda a: a.metadata.name)

    def removed(self, name: str) -> App | None:
        """The definition of an app the cluster removed lately (served here or by a joined host)."""
        if self.local_registry is not None:
            app = self.local_registry.removed.get(name)
            if app is not None:
                return app
        return self.tunnels.removed.get(name) if self.tunnels is not None else None

    def _targets(self, name: str) -> list[_Target]:
        out: list[_Target] = []
        if self.local_registry is not None and self.local is not None:
            app = self.local_registry.get(name)
            if app is not None:
                out.append(_Target(app, None))
        if self.tunnels is not None:
            out.extend(_Target(c.apps[name], c) for c in self.tunnels.candidates(name))
        return out

    def _by_session(self, sid: str, name: str) -> _Target | None:
        tag = _tag(sid)
        if tag == self.local_tag or not tag:
            if self.local_registry is not None and self.local is not None:
                app = self.local_registry.get(name)
                if app is not None:
                    return _Target(app, None)
            return None
        if self.tunnels is None:
            return None
        conn = self.tunnels.by_tag(tag)
        if conn is None or name not in conn.apps:
            return None
        return _Target(conn.apps[name], conn)

    # --------------------------------------------------------------- route

    def route(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        actor: Actor,
        name: str,
        sub: str,
        headers: dict[bytes, bytes],
    ) -> Awaitable[None] | None:
        """What carries the request, to be awaited; None when the app is unknown to (or hidden
        from) this actor.  For the in-process app service that is the app's own coroutine
        (no frame of ours in between: this is the path of every MCP request)."""
        assert actor.checker is not None
        sid = headers.get(b"mcp-session-id", b"").decode("latin-1")
        if sid:
            t = self._by_session(sid, name)
            if t is None:
                tag = _tag(sid)
                if self.hosts is not None and tag and tag != self.local_tag:
                    return self._session_elsewhere(scope, receive, send, actor, name, sub, headers, sid, tag)
                if not any(actor.checker.can_access_app(x.app) for x in self._targets(name)):
                    return None
                return self._refuse(scope, send, 404, _SESSION_GONE, actor, name, sid)
            if not actor.checker.can_access_app(t.app):
                return None
            targets = [t]
        else:
            targets = [t for t in self._targets(name) if actor.checker.can_access_app(t.app)]
            if not targets:
                if self.hosts is not None and not self.hosts.ready:
                    # The app services that serve it may not have connected yet.
                    return _starting(send, self.hosts.reason)
                return None
            if len(targets) > 1:
                k = next(self._turn) % len(targets)
                targets = targets[k:] + targets[:k]
        first = targets[0]
        if first.conn is None:
            assert self.local is not None
            # The scope is this request's own (the server makes one per request): no copy.
            scope[SCOPE_KEY] = Handoff(actor, first.app, sub, headers)
            job: Awaitable[None] = self.local(scope, receive, send)
            return job
        return self._carry(scope, receive, send, actor, name, sub, headers, sid, targets)

    async def _session_elsewhere(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        actor: Actor,
        name: str,
        sub: str,
        headers: dict[bytes, bytes],
        sid: str,
        tag: str,
    ) -> None:
        """A session of an app service with no ready tunnel here (``proxy/hosts.py``): carried
        if its tunnel comes within ``HOLD`` seconds, 503 + ``Retry-After`` while it is believed
        alive, 404 once it is gone."""
        assert self.hosts is not None and self.tunnels is not None
        checker = actor.checker
        assert checker is not None
        fate, apps = await self.hosts.fate(tag)
        if fate is Fate.COMING:
            app = apps.get(name)
            if app is not None and not checker.can_access_app(app):
                await self._refuse(scope, send, 404, no_such_app(name), actor, name, sid)
                return
            if apps and app is None:
                fate = Fate.GONE  # its last heartbeat did not serve this app: nor does it now
            elif await self.tunnels.wait_tag(tag, HOLD) is None:
                await _error(
                    send,
                    503,
                    -32603,
                    "the app service holding this session is believed alive but has no tunnel to "
                    f"this proxy yet (it is reconnecting, or this proxy just started): retry in "
                    f"{RETRY_AFTER} s",
                    "gateway",
                    [(b"retry-after", b"%d" % RETRY_AFTER)],
                )
                return
        t = self._by_session(sid, name) if fate is not Fate.GONE else None
        if t is None:
            if any(checker.can_access_app(x.app) for x in self._targets(name)) or (
                name in apps and checker.can_access_app(apps[name])
            ):
                await self._refuse(scope, send, 404, _SESSION_GONE, actor, name, sid)
            else:
                await self._refuse(scope, send, 404, no_such_app(name), actor, name, sid)
            return
        if not checker.can_access_app(t.app):
            await self._refuse(scope, send, 404, no_such_app(name), actor, name, sid)
            return
        await self._carry(scope, receive, send, actor, name, sub, headers, sid, [t])

    def _refuse(
        self, scope: Scope, send: Send, status: int, why: str, actor: Actor, name: str, sid: str
    ) -> Awaitable[None]:
        return refuse(
            self.refusals, scope, send, status, why, app=name, user=actor.name, sid=sid, code=-32001
        )

    async def _carry(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        actor: Actor,
        name: str,
        sub: str,
        headers: dict[bytes, bytes],
        sid: str,
        targets: list[_Target],
    ) -> None:
        """Try ``targets`` in order (the first one is an app service over a tunnel)."""
        body: bytes | None = None
        for t in targets:
            if t.conn is None:
                assert self.local is not None
                scope = dict(scope)
                scope[SCOPE_KEY] = Handoff(actor, t.app, sub, headers)
                if body is not None:
                    await self.local(scope, _replay(body, receive), send)
                else:
                    await self.local(scope, receive, send)
                return
            if body is None:
                body = await _read_body(receive)
                if body is None:
                    await _error(send, 413, -32600, f"request body larger than {_MAX_BODY} bytes", "client")
                    return
            t.conn.carried(actor.name)
            try:
                stream = await t.conn.mux.open(self._header(scope, actor, t.app, sub))
                await forward(stream, body, send, receive)
                return
            except (NotStarted, TunnelClosed) as e:
                log.warning(
                    "app service did not take the request",
                    extra={"app": name, "host_id": t.conn.host.host_id, "error": str(e)},
                )
                if sid:
                    break
        await _error(
            send,
            502 if sid else 503,
            -32603,
            f'the app service serving "{name}" went away before it answered'
            + ("; start a new session with initialize" if sid else "; try again"),
            "gateway",
        )

    def _header(self, scope: Scope, actor: Actor, app: App, sub: str) -> dict[str, Any]:
        return {
            "kind": "http",
            "app": app.metadata.name,
            "method": scope["method"],
            "subpath": sub,
            "query": scope.get("query_string", b"").decode("latin-1"),
            "headers": [
                (k.decode("latin-1"), v.decode("latin-1"))
                for k, v in scope["headers"]
                if k.lower() != b"authorization"  # the user's credential stops here
            ],
            "client": list(scope.get("client") or ("", 0)),
            "actor": self._actor_doc(actor),
            "jwt": self._jwt(actor, app),
        }

    def _actor_doc(self, actor: Actor) -> Any:
        ident = actor.identity
        key = (actor.name, actor.policy_key, (ident.token_id + str(ident.expires)) if ident else "")
        doc = self._actor_docs.get(key)
        if doc is None:
            if len(self._actor_docs) > 10_000:
                self._actor_docs.clear()
            doc = self._actor_docs[key] = orjson.dumps(wire.actor_to_wire(actor))
        return orjson.Fragment(doc)

    def _jwt(self, actor: Actor, app: App) -> list[str]:
        now = self.auth.clock.now()
        key = (actor.name, app.spec.uri, app.spec.rewrite.jwt_claims + repr(actor.policy_key))
        hit = self._jwts.get(key)
        if hit is None or hit[1] - now < _JWT_RENEW_BEFORE:
            user = actor.user
            assert user is not None
            hit = appjwt.sign(
                self.auth.cas["jwt"],
                username=actor.name,
                roles=user.spec.roles,
                traits=user.spec.traits,
                audience=app.spec.uri,
                now=now,
                claims_mode=app.spec.rewrite.jwt_claims,
            )
            if len(self._jwts) > 10_000:
                self._jwts.clear()
            self._jwts[key] = hit
        return [hit[0], hit[1].isoformat()]


async def _read_body(receive: Receive) -> bytes | None:
    parts: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return b"".join(parts)
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > _MAX_BODY:
            return None
        parts.append(chunk)
        if not msg.get("more_body", False):
            return b"".join(parts)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def again() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return dict(await receive())

    return again


def refuse(
    refusals: Refusals | None,
    scope: Scope,
    send: Send,
    status: int,
    message: str,
    *,
    app: str,
    user: str = "",
    sid: str = "",
    origin: str = "client",
    code: int | None = None,
    path: str = "",
) -> Awaitable[None]:
    """Answer a refused MCP request with ``message`` (which quotes nothing unbounded), and audit
    it (rate-limited per source): the front's refusals and the router's."""
    if refusals is not None:
        refusals.refused(
            status=status,
            reason=message,
            remote_addr=(scope.get("client") or ("", 0))[0],
            user=user,
            app=app,
            session_id=sid,
            http_method=scope.get("method", ""),
            path=path,
            auth=status == 401,
        )
    return send_jsonrpc_error(send, status, message, origin, code=code)


def _tag(sid: str) -> str:
    """The route tag a session id starts with ("" for an id without one)."""
    tag, dot, _ = sid.partition(".")
    return tag if dot else ""


async def _starting(send: Send, reason: str) -> None:
    await _error(
        send,
        503,
        -32603,
        f"this proxy is {reason}: retry in {RETRY_AFTER} s",
        "gateway",
        [(b"retry-after", b"%d" % RETRY_AFTER)],
    )


async def _error(
    send: Send,
    status: int,
    code: int,
    message: str,
    origin: str,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    await send_jsonrpc_error(send, status, message, origin, code=code, extra=extra or [])
