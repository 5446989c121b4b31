"""Streamable HTTP for MCP clients (``/mcp/apps/<app>``): the ASGI front and the session table.

The proxy authenticates the caller, resolves the app and checks that the caller may reach
it; then it hands the request here with a :class:`~bastion.handoff.Handoff` in
``scope["bastion"]``.  This module owns gateway sessions: ids we mint (cryptographically
random, bound to the user: another user's id, or an unknown one, is 404), one sans-IO
``Session`` engine each, and one upstream each (``upstream.Upstream``: a message stream, or
the shared pool of a streamable-HTTP server).

For every client message: the body is parsed once (``jsonrpc.parse_message``), the engine
decides, and the executor (``executor.py``) carries out its commands, in order: an audit
record is *committed* before the request that follows it is forwarded, so a crash never
leaves an un-audited call.  The one forward the engine may order is then carried out by the
session's upstream, which answers the client's POST.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import Receive, Scope, Send

from bastion._tasks import stop_tasks
from bastion._time import Clock
from bastion.answers import NO_HEADERS, Answer, send_jsonrpc_error
from bastion.appservice.bridge import MODERN as MODERN_ERA
from bastion.appservice.bridge import Eras, ModernUpstream
from bastion.appservice.demo import DEMO_APP_NAME
from bastion.appservice.executor import Collected, Executor, RateCounter
from bastion.appservice.hostpolicy import HostPolicy
from bastion.appservice.http_upstream import HTTPUpstream
from bastion.appservice.modern import ModernFront
from bastion.appservice.pins import PinBook
from bastion.appservice.registry import AppRegistry
from bastion.appservice.sessions import (
    GatewaySession,
    Limits,
    Refused,
    SessionGone,
    new_session_id,
    session_headers,
)
from bastion.appservice.stream_upstream import StreamUpstream
from bastion.appservice.upstream import ClientPost, Upstream
from bastion.appservice.upstreams import (
    OFFERED_JWT,
    JWTCache,
    Pools,
    UpstreamIdentity,
    open_stream,
    origin_and_path,
    stripped_headers,
    upstream_target,
)
from bastion.audit.bound import MAX_QUOTE, clip
from bastion.audit.emitter import AuditLog
from bastion.audit.refusals import Refusals
from bastion.auth.ca import CertAuthority
from bastion.auth.server import Actor
from bastion.errors import BastionError, HostConfigError, LimitExceededError, UpstreamError
from bastion.handoff import Handoff, handoff_of
from bastion.metrics import app_metrics, maybe_tracer
from bastion.protocol import jsonrpc, paths
from bastion.protocol import modern as wire
from bastion.protocol.headers import mismatch
from bastion.resources import App
from bastion.session.engine import EventIds, Session, ToolPolicy

__all__ = ["SUPPORTED_VERSIONS", "Limits", "MCPHandler"]

log = logging.getLogger("bastion.app")

SUPPORTED_VERSIONS = frozenset({"2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"})
_GONE = "session not found (it ended or never existed): start a new one with initialize"
#: Abnormally ended sessions whose reason is kept for their clients' next request.
_ENDED_KEPT = 4096
_AUDIT_DOWN = (
    "the audit log is unavailable, so the gateway refuses to forward calls it cannot record; "
    "try again shortly"
)


class MCPHandler:
    """The ASGI app for ``/mcp/apps/<app>[/...]``; the proxy calls it after authentication."""

    def __init__(
        self,
        *,
        cluster_name: str,
        clock: Clock,
        jwt_ca: CertAuthority | None,
        registry: AppRegistry,
        audit: AuditLog,
        redact: Callable[[Any], Any],
        limits: Limits | None = None,
        session_tag: str = "",
        refusals: Refusals | None = None,
        host: HostPolicy | None = None,
        pins: PinBook | None = None,
        rates: RateCounter | None = None,
    ) -> None:
        #: ``jwt_ca`` signs upstream JWTs in-process; without it (a joined app
        #: service holds no cluster keys) the proxy sends one with each request.
        self.cluster_name = cluster_name
        self.clock = clock
        self.jwt_ca = jwt_ca
        #: Prefix of the session ids minted here: the proxy routes a session by it.
        self.session_prefix = f"{session_tag}." if session_tag else ""
        self.registry = registry
        self.audit = audit
        #: Refused requests are audited here (rate-limited per source); our own unless shared.
        self._own_refusals = refusals is None
        self.refusals = refusals or Refusals(audit, cluster_name=cluster_name, clock=clock)
        self.redact = redact
        self.limits = limits or Limits()
        #: What the host lets apps do (address guard, stdio caps and rlimits); hostpolicy.py.
        self.host = host if host is not None else HostPolicy.defaults(registry.is_static)
        self.pools = Pools(response_timeout=self.limits.response_timeout, host=self.host)
        self.sessions: dict[str, GatewaySession] = {}
        #: Sessions that ended abnormally, newest last (bounded): (user, app, why), so that
        #: their owner's next request hears why, not only "not found".
        self._ended: dict[str, tuple[str, str, str]] = {}
        #: Sessions being opened, by user (counted against the user's limit until stored).
        self._opening: dict[str, int] = {}
        #: The revocation watch's last ``access`` and how many checks it asked for.
        self._access: Callable[[str], Awaitable[ToolPolicy | None]] | None = None
        self._access_checks = 0
        #: Upstream JWTs by user and app, shared by that user's sessions (see UpstreamIdentity).
        self._jwts: JWTCache = {}
        #: Audit event ids for every session here (one random draw, not one per session).
        self._event_ids = EventIds()
        self._reaper: asyncio.Task[None] | None = None
        #: Carries out every engine command of every session here.
        #: The cluster's pinned tool definitions (decision 0045); None: no app here may pin.
        self.pins = pins
        self.executor = Executor(
            audit, end=self._end, upstream_failed=self._upstream_failed, pins=pins, rates=rates
        )
        #: An OpenTelemetry tracer only when enabled (BASTION_OTEL=1): else one None check per POST.
        self._tracer = maybe_tracer()
        #: Counts clean-up passes over the sessions (apps removed or redefined, shutdown), so a
        #: session whose upstream was starting meanwhile is checked once stored.
        self._sweeps = 0
        self._closing = False
        #: MCP 2026-07-28 clients: sessionless requests over sessions held for them (ADR 46).
        self.modern = ModernFront(self)
        #: Which era each app's server speaks (decision 0047).
        self.eras = Eras()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap(), name="mcp-session-reaper")
        if self._own_refusals:
            self.refusals.start()

    async def aclose(self) -> None:
        self._closing = True
        self._sweeps += 1
        if self._reaper:
            await stop_tasks(self._reaper)
        for s in list(self.sessions.values()):
            await self._end(s, "gateway shutting down")
        await self.pools.aclose()
        if self._own_refusals:
            await self.refusals.aclose()

    async def end_app_sessions(self, app_name: str) -> None:
        """End every live session of an app that is no longer served (each with its end event)."""
        self._sweeps += 1
        for s in [s for s in self.sessions.values() if s.app.metadata.name == app_name]:
            await self._end(s, f'app "{app_name}" is no longer served')

    async def end_redefined_sessions(self, app_name: str) -> None:
        """End the live sessions of ``app_name`` made with another definition than the served one:
        a session is bound to its app's definition (labels, upstream, rewrite), not only its name."""
        self._sweeps += 1
        for s in [s for s in self.sessions.values() if s.app.metadata.name == app_name]:
            await self._end_if_redefined(s)

    async def _end_if_redefined(self, s: GatewaySession) -> None:
        name = s.app.metadata.name
        current = self.registry.get(name)
        if current is None:
            await self._end(s, f'app "{name}" is no longer served')
        elif s.app is not current and s.app != current:
            await self._end(s, f'app "{name}" was redefined')

    async def end_unauthorised_sessions(self, access: Callable[[str], Awaitable[ToolPolicy | None]]) -> None:
        """End every live session whose user may no longer use its app (each with its end event).

        ``access(user)`` is the user's current policy, None if the user no longer exists, and
        raises LookupError for a user it cannot tell about (their sessions are left alone). Called
        when users or roles change (``revocation.py``; a joined app service when a proxy says so):
        a session whose app is still allowed keeps going and takes the new roles on its next
        request (``_session``).  A session still opening is checked once it is stored
        (``_new_session``)."""
        self._access, self._access_checks = access, self._access_checks + 1
        by_user: dict[str, list[GatewaySession]] = {}
        for s in self.sessions.values():
            by_user.setdefault(s.user, []).append(s)
        for user, sessions in by_user.items():
            try:
                checker = await access(user)
            except LookupError:
                continue
            for s in sessions:
                await self._end_if_unauthorised(s, checker)

    async def _end_if_unauthorised(self, s: GatewaySession, checker: ToolPolicy | None) -> None:
        if s.dead or self.sessions.get(s.id) is not s:
            return
        name = s.app.metadata.name
        if checker is None:
            why = f'access to app {name!r} was revoked: user "{s.user}" no longer exists'
            log.info(
                "session ended: access revoked",
                extra={"session_id": s.id, "app": name, "reason": why},
            )
            await self._end(s, why)
        elif not checker.app_decision(s.app).allowed:
            # The engine words it and closes the session, as when a request finds the
            # roles changed; the executor ends it, with its end event.
            await self.executor.run(s, s.engine.policy_changed(checker))

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(min(60.0, self.limits.idle_timeout / 4))
            cutoff = time.monotonic() - self.limits.idle_timeout
            for s in [s for s in self.sessions.values() if s.last_active < cutoff and not s.upstream.busy]:
                log.info("idle session reaped", extra={"session_id": s.id, "app": s.app.metadata.name})
                await self._end(s, "idle timeout")

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        h = handoff_of(scope)
        actor, app = h.actor, h.app
        if h.jwt is not None:
            OFFERED_JWT.set(h.jwt)
        headers = h.headers if h.headers is not None else {k.lower(): v for k, v in scope["headers"]}
        method = scope["method"]
        try:
            target = self._target(h)
            if method == "POST":
                if self._tracer is None:
                    await self._post(scope, receive, send, actor, app, headers, target)
                else:
                    with self._tracer.start_as_current_span(
                        "mcp.post", attributes={"bastion.app": app.metadata.name}
                    ):
                        await self._post(scope, receive, send, actor, app, headers, target)
            elif method in ("GET", "DELETE") and headers.get(b"mcp-protocol-version") in _MODERN:
                raise Refused(
                    405, "MCP 2026-07-28 has no GET stream nor sessions to DELETE: use POST", allow=b"POST"
                )
            elif method == "GET":
                await self._get(send, receive, actor, app, headers)
            elif method == "DELETE":
                await self._delete(send, actor, app, headers)
            else:
                raise Refused(405, "method not allowed: use POST, GET or DELETE", allow=b"GET, POST, DELETE")
        except Refused as e:
            if e.origin == "client":
                self._refused(scope, actor, app, headers, e.status, e.message)
            extra = [(b"allow", e.allow)] if e.allow else NO_HEADERS
            await send_jsonrpc_error(
                send, e.status, e.message, e.origin, code=e.rpc_code, mid=e.mid, extra=extra, data=e.data
            )
        except SessionGone as e:
            self._refused(scope, actor, app, headers, 404, e.message)
            await send_jsonrpc_error(send, 404, e.message, "client", code=-32001)
        except BastionError as e:
            if e.origin == "client":
                self._refused(scope, actor, app, headers, e.http_status, e.message)
            await send_jsonrpc_error(
                send, e.http_status, e.message, e.origin, code=-32603 if e.origin != "client" else -32600
            )
        except Exception:
            # A gateway bug, not the client's input (that is refused above, with its reason).
            log.exception("MCP request failed", extra={"app": app.metadata.name, "method": method})
            with contextlib.suppress(Exception):  # the answer may have begun already
                await send_jsonrpc_error(send, 500, "internal gateway error", "gateway")

    @staticmethod
    def _target(h: Handoff) -> str:
        """The upstream target of an allowed sub-path ("" for the app's MCP endpoint)."""
        sub = h.subpath
        if sub == "/" or not sub:
            return ""
        # Only the app's own paths go upstream (decision 0016).  ``sub`` was normalised by
        # the proxy; normalised again here (a no-op then), because this app service decides.
        sub = paths.normalise(paths.encode_target(sub).encode("ascii"))
        target = upstream_target(h.app, sub)
        if target is None:
            raise Refused(
                404,
                f"path {clip(sub, MAX_QUOTE)!r} is not served by app {h.app.metadata.name!r}: "
                "only its MCP endpoint, /.well-known/oauth-* and the app's extra_paths are",
            )
        return target

    def _refused(
        self, scope: Scope, actor: Actor, app: App, headers: dict[bytes, bytes], status: int, why: str
    ) -> None:
        raw = scope.get("raw_path")
        self.refusals.refused(
            status=status,
            reason=why,
            remote_addr=(scope.get("client") or ("", 0))[0],
            user=actor.name,
            app=app.metadata.name,
            session_id=headers.get(b"mcp-session-id", b"").decode("latin-1"),
            http_method=scope.get("method", ""),
            path=raw.decode("latin-1") if raw else str(scope.get("path", "")),
        )

    # ------------------------------------------------------------------ POST

    async def _post(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        actor: Actor,
        app: App,
        headers: dict[bytes, bytes],
        target: str,
    ) -> None:
        body = await _read_body(receive, self.limits.max_body)
        if body is None:
            raise Refused(413, f"request body larger than {self.limits.max_body} bytes")
        version = headers.get(b"mcp-protocol-version", b"").decode("latin-1")
        if version and version not in SUPPORTED_VERSIONS:
            if version in wire.MODERN_VERSIONS:  # sessionless: never a session request's cost
                await self.modern.post(scope, receive, send, actor, app, headers, target, body)
                return
            no = wire.unsupported_version(version)
            raise Refused(400, no.message, rpc_code=no.code, data=no.data, mid=_request_id(body))
        # Parsed once: the engine decides on this value, and forwards its serialisation.
        msg: jsonrpc.Message | jsonrpc.ProtocolError
        try:
            msg = jsonrpc.parse_message(body)
        except jsonrpc.ProtocolError as e:
            msg = e
        m_method, m_name = headers.get(b"mcp-method"), headers.get(b"mcp-name")
        if (m_method is not None or m_name is not None) and isinstance(msg, jsonrpc.Message):
            why = mismatch(m_method, m_name, msg.method, msg.params)  # the body's own error comes later
            if why:
                raise Refused(400, why, rpc_code=jsonrpc.HEADER_MISMATCH)
        sid = headers.get(b"mcp-session-id", b"").decode("latin-1")
        if sid:
            s = await self._session(sid, actor, app)
        else:
            if isinstance(msg, jsonrpc.ProtocolError):
                raise Refused(400, msg.message, rpc_code=msg.rpc_code, mid=msg.id)
            if msg.method != "initialize" or msg.kind != "request":
                if _meta_version(msg.params) is not None or msg.method == "server/discover":
                    # A 2026-07-28 request must say its version in the header too.
                    raise Refused(
                        400,
                        "MCP-Protocol-Version header missing: a 2026-07-28 request carries it, "
                        "equal to params._meta's version",
                        rpc_code=jsonrpc.HEADER_MISMATCH,
                        mid=msg.id,
                    )
                raise Refused(
                    400,
                    "missing Mcp-Session-Id header: start a session with an initialize request",
                    mid=msg.id,
                )
            s = await self._new_session(actor, app, scope)
            if s.dead:  # access was revoked while it opened
                raise SessionGone(_GONE)
        s.last_active = time.monotonic()
        answer = Answer(send, [(b"mcp-session-id", s.id.encode())] if not sid else NO_HEADERS)
        engine = s.engine
        cmds = engine.client_sent(body, session_headers(s, headers)[0], parsed=msg)
        s.m.client(engine.last_method)
        got = Collected()
        if not await self.executor.run(s, cmds, got):
            await answer.error(503, _AUDIT_DOWN, "gateway", code=-32603, mid=_id_of(msg))
            return
        if got.replies:  # the gateway answered itself (denied, invalid, too many in flight)
            # 400 when the answer is not to a valid request (invalid, or no id to answer)
            request = isinstance(msg, jsonrpc.Message) and msg.kind == "request"
            await answer.json(200 if request else 400, got.replies[0].raw)
            return
        if got.fwd is None:
            await answer.empty(202)
            return
        if s.dead:
            # It ended while the audit record was committed (its end event failed this call):
            # nothing more reaches its upstream, and no waiter is left that nothing will wake.
            await answer.error(404, _GONE, "client", code=-32001, mid=_id_of(msg))
            return
        await s.upstream.exchange(s, got.fwd, answer, ClientPost(headers, target, not sid))

    async def _session(self, sid: str, actor: Actor, app: App) -> GatewaySession:
        s = self.sessions.get(sid)
        # Another user's session id, or one of another app, is as unknown as a made-up one.
        if s is None or s.user != actor.name or s.dead or s.app.metadata.name != app.metadata.name:
            ended = self._ended.get(sid)
            if ended is not None and ended[:2] == (actor.name, app.metadata.name):
                # Its owner is told why (an upstream that died or forgot it, revocation...).
                raise SessionGone(f"this session ended ({ended[2]}): start a new one with initialize")
            raise SessionGone(_GONE)
        if s.app is not app and s.app != app:
            # The app was redefined since the session began (labels, upstream, rewrite): the
            # session was decided on the old definition, so it ends; access is checked anew.
            await self._end(s, f'app "{app.metadata.name}" was redefined')
            raise SessionGone(
                "the app was redefined since this session began: start a new one with initialize"
            )
        if actor.policy_key != s.policy_key and actor.checker is not None:
            # The user's roles changed: live sessions follow within the actor-cache TTL, and
            # the client is told to list tools again; if access to the app was revoked, the
            # engine closes the session (the executor ends it, with its end event).
            s.policy_key = actor.policy_key
            await self.executor.run(s, s.engine.policy_changed(actor.checker))
            if s.dead:
                raise SessionGone(_GONE)
        return s

    async def _new_session(
        self, actor: Actor, app: App, scope: Scope, *, transport: str = ""
    ) -> GatewaySession:
        # Counted as the user's from the check until stored (starting the upstream takes a while):
        # else initializes sent together all pass the limit, each with its own stdio process.
        name = actor.name
        self._opening[name] = self._opening.get(name, 0) + 1
        checks, sweeps = self._access_checks, self._sweeps
        try:
            s = await self._open_session(actor, app, scope, transport or f"http->{app.spec.transport}")
        finally:
            left = self._opening[name] - 1
            if left:
                self._opening[name] = left
            else:
                del self._opening[name]
        if self._sweeps != sweeps:
            # Sessions were swept while the upstream started, without this one: now.
            if self._closing:
                await self._end(s, "gateway shutting down")
                return s
            await self._end_if_redefined(s)
            if s.dead:
                return s
        if self._access_checks != checks and self._access is not None:
            # Access was re-checked while the upstream started, without this session: now.
            try:
                checker = await self._access(name)
            except LookupError:  # the re-check could not tell about this user: nor can we
                return s
            await self._end_if_unauthorised(s, checker)
        return s

    async def _open_session(self, actor: Actor, app: App, scope: Scope, transport: str) -> GatewaySession:
        user = actor.user
        assert user is not None and actor.checker is not None
        mine = sum(1 for s in self.sessions.values() if s.user == actor.name)
        if mine + self._opening[actor.name] - 1 >= self.limits.sessions_per_user:
            raise LimitExceededError(
                f"too many open MCP sessions for user {actor.name!r} "
                f"(limit {self.limits.sessions_per_user}); "
                "end some with DELETE or wait for idle ones to expire"
            )
        pins = None
        if app.spec.pinning != "off":
            if self.pins is None:
                raise HostConfigError(
                    f"app {app.metadata.name!r} pins its tool definitions (pinning: {app.spec.pinning}), "
                    "but this app service cannot reach the cluster's pins; it serves no session of it"
                )
            pins = await self.pins.view(app)
        sid = self.session_prefix + new_session_id()
        ident = UpstreamIdentity(
            self.jwt_ca, app, actor.name, user.spec.roles, user.spec.traits, cache=self._jwts
        )
        engine = Session(
            app=app,
            checker=actor.checker,
            identity=actor.identity,  # type: ignore[arg-type]
            session_id=sid,
            cluster_name=self.cluster_name,
            transport=transport,
            clock=self.clock,
            redact=self.redact,
            remote_addr=(scope.get("client") or ("", 0))[0],
            new_id=self._event_ids.next,
            pins=pins,
        )
        # is_demo builds the demo App (pydantic) to compare with: only when the name matches.
        is_demo = app.metadata.name == DEMO_APP_NAME and self.registry.is_demo(app)
        m = app_metrics(app.metadata.name, "demo" if is_demo else app.spec.transport)
        upstream: Upstream
        if app.spec.transport != "http" or is_demo:
            try:
                stream = await open_stream(
                    app,
                    ident=ident,
                    session_id=sid,
                    cluster_name=self.cluster_name,
                    is_demo=is_demo,
                    host=self.host,
                    now=self.clock.now(),
                )
            except UpstreamError:
                m.upstream_error("unreachable")
                raise
            upstream = StreamUpstream(stream, self.executor, response_timeout=self.limits.response_timeout)
        else:
            upstream = HTTPUpstream(
                self.pools.for_app(app), origin_and_path(app)[1], self.executor, self.clock
            )
        if not is_demo:
            # The era of the app's server (decision 0047): pinned, known, or probed once.
            era = self.eras.pinned(app)
            if era is None:
                path = origin_and_path(app)[1]
                era = await self.eras.era(
                    app, self.pools.for_app(app), path, ident.encoded_headers(self.clock.now())
                )
            if era == MODERN_ERA:
                upstream = ModernUpstream(upstream, self.executor)
        s = GatewaySession(
            id=sid,
            user=actor.name,
            app=app,
            engine=engine,
            ident=ident,
            m=m,
            upstream=upstream,
            policy_key=actor.policy_key,
            strip=stripped_headers(app),
        )
        await upstream.start(s)
        self.sessions[sid] = s
        m.session_started()
        return s

    # ------------------------------------------------------------------- end

    async def _end(self, s: GatewaySession, reason: str = "") -> None:
        """End a session: its upstream stops, its end event is written, its upstream is released."""
        await self._finish(s, reason, failed=False)

    async def _upstream_failed(self, s: GatewaySession, reason: str) -> None:
        """The session's upstream broke (stream closed, process gone): the session ends with it."""
        await self._finish(s, reason, failed=True)

    async def _finish(self, s: GatewaySession, reason: str, *, failed: bool) -> None:
        first = not s.dead
        if failed:
            if not first:
                return
            s.m.upstream_error("unreachable")  # the message stream broke: the upstream is gone
            log.warning(
                "upstream ended",
                extra={"session_id": s.id, "app": s.app.metadata.name, "reason": reason or "upstream closed"},
            )
        if first:
            # Set before the waiting POSTs wake: they tell their clients why.
            s.dead = reason or ("upstream closed" if failed else "ended")
        await s.upstream.stop(s)
        if first:
            error = s.dead if failed or reason not in ("", "client ended the session") else ""
            if error:
                self._ended[s.id] = (s.user, s.app.metadata.name, error)
                if len(self._ended) > _ENDED_KEPT:
                    del self._ended[next(iter(self._ended))]
            await self.executor.run(s, s.engine.ended(error=error))
        if self.sessions.pop(s.id, None) is not None:
            s.m.session_ended()
            self.modern.forget(s.id)
        await s.upstream.release(s, reason)

    # ------------------------------------------------------------------- GET

    async def _get(
        self, send: Send, receive: Receive, actor: Actor, app: App, headers: dict[bytes, bytes]
    ) -> None:
        sid = headers.get(b"mcp-session-id", b"").decode("latin-1")
        if not sid:
            raise Refused(400, "missing Mcp-Session-Id header")
        s = await self._session(sid, actor, app)
        s.last_active = time.monotonic()
        await s.upstream.listen(s, Answer(send), receive, headers)

    # ---------------------------------------------------------------- DELETE

    async def _delete(self, send: Send, actor: Actor, app: App, headers: dict[bytes, bytes]) -> None:
        sid = headers.get(b"mcp-session-id", b"").decode("latin-1")
        if not sid:
            raise Refused(400, "missing Mcp-Session-Id header")
        s = await self._session(sid, actor, app)
        await s.upstream.client_ended(s, headers)
        await self._end(s, "client ended the session")
        await Answer(send).empty(200)


# ------------------------------------------------------------------ helpers


def _id_of(msg: jsonrpc.Message | jsonrpc.ProtocolError) -> Any:
    return msg.id


_MODERN = frozenset(v.encode() for v in wire.MODERN_VERSIONS)


def _request_id(body: bytes) -> Any:
    """The id of a request refused before it was parsed (an error answer carries it)."""
    try:
        return jsonrpc.parse_message(body).id
    except jsonrpc.ProtocolError as e:
        return e.id


def _meta_version(params: dict[str, Any] | None) -> Any:
    meta = params.get("_meta") if params is not None else None
    return meta.get(wire.META_VERSION) if isinstance(meta, dict) else None


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise BastionError("client disconnected")
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not msg.get("more_body"):
            return b"".join(chunks)
