"""Streamable HTTP for MCP clients (``/mcp/apps/<app>``): sessions, and the bridge to upstreams.

The proxy authenticates the caller, resolves the app and checks that the
caller may reach it; then it hands the request here with the ``Actor`` and
the ``App`` in ``scope["bastion"]``.  This module owns gateway sessions: ids
we mint (cryptographically random, bound to the user: another user's id, or
an unknown one, is 404), one sans-IO ``Session`` engine each, and one upstream
each — a message stream (stdio process, legacy SSE, demo) or the shared
keep-alive pool of a streamable-HTTP upstream.

For every message the engine decides; this module only carries out its
commands, in order: an audit record is *committed* before the request that
follows it is forwarded, so a crash never leaves an un-audited call.

Routing for message-stream upstreams: a response goes to the POST waiting for
its id; server notifications and server-to-client requests go to the most
recently opened POST stream still waiting (that is where progress and logging
of a running call belong), else to the session's server-to-client log, which
the open GET stream (or the next one) delivers.  Every SSE event written for
such upstreams has an id and is kept, bounded, so a client can resume a
dropped stream with ``Last-Event-ID`` (``appservice/resume.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from bastion._time import Clock
from bastion.appservice.demo import DEMO_APP_NAME
from bastion.appservice.hostpolicy import HostPolicy
from bastion.appservice.registry import AppRegistry
from bastion.appservice.resume import EventLog, EventLogs
from bastion.appservice.upstreams import (
    OFFERED_JWT,
    JWTCache,
    Pools,
    UpstreamIdentity,
    is_identity_header,
    open_stream,
    origin_and_path,
    stripped_headers,
    upstream_target,
)
from bastion.audit.bound import MAX_QUOTE, clip
from bastion.audit.emitter import AuditLog
from bastion.audit.redact import redact_headers
from bastion.audit.refusals import Refusals
from bastion.auth.ca import CertAuthority
from bastion.auth.server import Actor
from bastion.errors import BastionError, LimitExceededError, UpstreamError
from bastion.metrics import AppMetrics, app_metrics, maybe_tracer, upstream_error_kind
from bastion.protocol import jsonrpc, paths
from bastion.protocol.headers import mismatch
from bastion.protocol.sse import SSEParser, encode_event
from bastion.resources import App
from bastion.session.engine import (
    CloseSession,
    CompleteAudit,
    EventIds,
    ForwardToUpstream,
    Log,
    RecordAudit,
    SendToClient,
    Session,
    ToolPolicy,
)
from bastion.transport.http import HTTPUpstreamPool, PreparedHeaders

log = logging.getLogger("bastion.app")
_LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


SUPPORTED_VERSIONS = frozenset({"2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"})
ORIGIN_HEADER = b"x-bastion-error-origin"
_JSON = b"application/json"
_SSE = b"text/event-stream"
_DEFAULT_ACCEPT = b"application/json, text/event-stream"
_NO_EXTRA: list[tuple[bytes, bytes]] = []  # never changed
_HOP = frozenset(
    {
        b"host",
        b"connection",
        b"content-length",
        b"transfer-encoding",
        b"authorization",
        b"cookie",
        b"mcp-session-id",
        b"keep-alive",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authorization",
        b"origin",
        b"bastion-jwt-assertion",
        b"x-forwarded-for",
    }
)


@dataclass(frozen=True)
class Limits:
    max_body: int = 4 << 20
    sessions_per_user: int = 64
    idle_timeout: float = 30 * 60.0
    response_timeout: float = 300.0


@dataclass
class GatewaySession:
    id: str
    user: str
    app: App
    engine: Session
    ident: UpstreamIdentity
    m: AppMetrics  # this app's metrics, children bound in advance
    stream: Any = None  # message stream upstream, or None for streamable HTTP
    upstream_session_id: str = ""
    protocol_version: str = ""
    last_active: float = field(default_factory=time.monotonic)
    pending: dict[Any, asyncio.Queue[bytes | None]] = field(default_factory=dict)
    order: list[Any] = field(default_factory=list)
    logs: EventLogs = field(default_factory=EventLogs)
    #: The server-to-client stream (what a GET receives), and how far GETs have read it.
    get_log: EventLog | None = None
    get_sent: int = 0
    get_owner: object | None = None
    reader: asyncio.Task[None] | None = None
    dead: str = ""
    policy_key: tuple[int, ...] = ()
    #: Client header names never passed upstream for this app (its rewrite headers and the
    #: identity headers): computed once per app, checked only when the client's headers change.
    strip: frozenset[bytes] = frozenset()
    #: The client's headers as last seen (without content-length), and what was derived
    #: from them: clients send the same headers on every request of a session.
    hdr_key: dict[bytes, bytes] | None = None
    hdr_seen: dict[bytes, bytes] | None = None  # the last request's headers, as they came
    audit_hdrs: dict[str, str] = field(default_factory=dict)
    pass_hdrs: list[tuple[bytes, bytes]] = field(default_factory=list)
    #: Streamable HTTP: the pool and target for "/", found once; the headers of a POST
    #: upstream, validated and encoded, rebuilt only when what they are made of changes.
    pool: HTTPUpstreamPool | None = None
    target: str = ""
    post_hdrs: PreparedHeaders | None = None
    post_key: tuple[Any, ...] = ()


class SessionGone(BastionError):
    origin = "client"
    http_status = 404
    code = "session_not_found"

    def __init__(self, message: str, *, ended: GatewaySession | None = None, why: str = "") -> None:
        super().__init__(message)
        #: A session to end before answering (its app was redefined, or access to it revoked).
        self.ended = ended
        #: Why it ends, for its end event ("" = its app was redefined).
        self.why = why


class Refused(BastionError):
    """A request refused before (or without) a session engine: answered and audited in ``__call__``."""

    origin = "client"
    code = "refused"

    def __init__(
        self, status: int, message: str, *, rpc_code: int = -32600, mid: Any = None, allow: bytes = b""
    ) -> None:
        super().__init__(message)
        self.status = status
        self.rpc_code = rpc_code
        self.mid = mid
        self.allow = allow


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
        #: Upstream JWTs by user and app, shared by that user's sessions (see UpstreamIdentity).
        self._jwts: JWTCache = {}
        #: Audit event ids for every session here (one random draw, not one per session).
        self._event_ids = EventIds()
        self._reaper: asyncio.Task[None] | None = None
        #: An OpenTelemetry tracer only when enabled (BASTION_OTEL=1): else one None check per POST.
        self._tracer = maybe_tracer()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap(), name="mcp-session-reaper")
        if self._own_refusals:
            self.refusals.start()

    async def aclose(self) -> None:
        if self._reaper:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for s in list(self.sessions.values()):
            await self._end(s, "gateway shutting down")
        await self.pools.aclose()
        if self._own_refusals:
            await self.refusals.aclose()

    async def end_app_sessions(self, app_name: str) -> None:
        """End every live session of an app that is no longer served (each with its end event)."""
        for s in [s for s in self.sessions.values() if s.app.metadata.name == app_name]:
            await self._end(s, f'app "{app_name}" is no longer served')

    async def end_redefined_sessions(self, app_name: str) -> None:
        """End the live sessions of ``app_name`` made with another definition than the served one:
        a session is bound to its app's definition (labels, upstream, rewrite), not only its name."""
        current = self.registry.get(app_name)
        for s in [s for s in self.sessions.values() if s.app.metadata.name == app_name]:
            if current is None or (s.app is not current and s.app != current):
                await self._end(s, f'app "{app_name}" was redefined')

    async def end_unauthorised_sessions(self, access: Callable[[str], Awaitable[ToolPolicy | None]]) -> None:
        """End every live session whose user may no longer use its app (each with its end event).

        ``access(user)`` is the user's current policy, None if the user no longer exists. Called
        when users or roles change (``revocation.py``): a session whose app is still allowed
        keeps going and takes the new roles on its next request (``_session``)."""
        by_user: dict[str, list[GatewaySession]] = {}
        for s in self.sessions.values():
            by_user.setdefault(s.user, []).append(s)
        for user, sessions in by_user.items():
            checker = await access(user)
            for s in sessions:
                if s.dead or self.sessions.get(s.id) is not s:
                    continue
                name = s.app.metadata.name
                if checker is None:
                    why = f'access to app {name!r} was revoked: user "{user}" no longer exists'
                elif checker.app_decision(s.app).allowed:
                    continue
                else:  # the engine words it, as when a request finds the roles changed
                    cmds = s.engine.policy_changed(checker)
                    why = next(
                        (c.reason for c in cmds if isinstance(c, CloseSession)),
                        f"access to app {name!r} was revoked",
                    )
                log.info(
                    "session ended: access revoked", extra={"session_id": s.id, "app": name, "reason": why}
                )
                await self._end(s, why)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(min(60.0, self.limits.idle_timeout / 4))
            cutoff = time.monotonic() - self.limits.idle_timeout
            for s in [s for s in self.sessions.values() if s.last_active < cutoff and not s.pending]:
                log.info("idle session reaped", extra={"session_id": s.id, "app": s.app.metadata.name})
                await self._end(s, "idle timeout")

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = scope["bastion"]
        actor: Actor = ctx["actor"]
        app: App = ctx["app"]
        jwt = ctx.get("jwt")
        if jwt:
            OFFERED_JWT.set((jwt[0], datetime.fromisoformat(jwt[1])))
        headers = ctx.get("headers") or {k.lower(): v for k, v in scope["headers"]}
        method = scope["method"]
        try:
            sub = ctx.get("subpath", "/")
            if sub != "/" and sub:
                # Only the app's own paths go upstream (decision 0016).  ``sub`` was normalised by
                # the proxy; normalised again here (a no-op then), because this app service decides.
                sub = paths.normalise(paths.encode_target(sub).encode("ascii"))
                target = upstream_target(app, sub)
                if target is None:
                    raise Refused(
                        404,
                        f"path {clip(sub, MAX_QUOTE)!r} is not served by app {app.metadata.name!r}: "
                        "only its MCP endpoint, /.well-known/oauth-* and the app's extra_paths are",
                    )
                ctx["target"] = target
            if method == "POST":
                if self._tracer is None:
                    await self._post(scope, receive, send, actor, app, headers)
                else:
                    with self._tracer.start_as_current_span(
                        "mcp.post", attributes={"bastion.app": app.metadata.name}
                    ):
                        await self._post(scope, receive, send, actor, app, headers)
            elif method == "GET":
                await self._get(send, receive, actor, app, headers)
            elif method == "DELETE":
                await self._delete(send, actor, app, headers)
            else:
                raise Refused(405, "method not allowed: use POST, GET or DELETE", allow=b"GET, POST, DELETE")
        except Refused as e:
            self._refused(scope, actor, app, headers, e.status, e.message)
            extra = [(b"allow", e.allow)] if e.allow else None
            await _jsonrpc_error(send, e.status, e.mid, e.rpc_code, e.message, "client", extra)
        except SessionGone as e:
            if e.ended is not None:
                await self._end(e.ended, e.why or f'app "{app.metadata.name}" was redefined')
            self._refused(scope, actor, app, headers, 404, e.message)
            await _jsonrpc_error(send, 404, None, -32001, e.message, "client")
        except BastionError as e:
            if e.origin == "client":
                self._refused(scope, actor, app, headers, e.http_status, e.message)
            await _jsonrpc_error(
                send, e.http_status, None, -32603 if e.origin != "client" else -32600, e.message, e.origin
            )
        except Exception:
            # A gateway bug, not the client's input (that is refused above, with its reason).
            log.exception("MCP request failed", extra={"app": app.metadata.name, "method": method})
            with contextlib.suppress(Exception):  # the answer may have begun already
                await _jsonrpc_error(send, 500, None, -32603, "internal gateway error", "gateway")

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
        self, scope: Scope, receive: Receive, send: Send, actor: Actor, app: App, headers: dict[bytes, bytes]
    ) -> None:
        body = await _read_body(receive, self.limits.max_body)
        if body is None:
            raise Refused(413, f"request body larger than {self.limits.max_body} bytes")
        version = headers.get(b"mcp-protocol-version", b"").decode("latin-1")
        if version and version not in SUPPORTED_VERSIONS:
            raise Refused(
                400,
                f"unsupported MCP-Protocol-Version {clip(version, MAX_QUOTE)!r} "
                f"(supported: {', '.join(sorted(SUPPORTED_VERSIONS))})",
                rpc_code=jsonrpc.UNSUPPORTED_PROTOCOL_VERSION,
            )
        m_method, m_name = headers.get(b"mcp-method"), headers.get(b"mcp-name")
        if m_method is not None or m_name is not None:
            try:
                mirrored = jsonrpc.parse_message(body)
                why = mismatch(m_method, m_name, mirrored.method, mirrored.params)
            except jsonrpc.ProtocolError:
                why = ""  # the body's own error is reported below
            if why:
                raise Refused(400, why, rpc_code=jsonrpc.HEADER_MISMATCH)
        sid = headers.get(b"mcp-session-id", b"").decode("latin-1")
        if sid:
            s = self._session(sid, actor, app)
        else:
            try:
                msg = jsonrpc.parse_message(body)
            except jsonrpc.ProtocolError as e:
                raise Refused(400, e.message, rpc_code=e.rpc_code, mid=e.id) from None
            if msg.method != "initialize" or msg.kind != "request":
                what = (
                    "server/discover (MCP 2026-07-28) is not supported by this gateway yet; use initialize"
                    if msg.method == "server/discover"
                    else "missing Mcp-Session-Id header: start a session with an initialize request"
                )
                raise Refused(
                    400, what, rpc_code=-32600 if msg.method != "server/discover" else -32601, mid=msg.id
                )
            s = await self._new_session(actor, app, scope)
        s.last_active = time.monotonic()
        if s.stream is None:
            await self._post_http(s, scope, send, body, headers, new=not sid)
        else:
            await self._post_stream(s, send, body, headers, new=not sid)

    def _session(self, sid: str, actor: Actor, app: App) -> GatewaySession:
        s = self.sessions.get(sid)
        # Another user's session id, or one of another app, is as unknown as a made-up one.
        if s is None or s.user != actor.name or s.dead or s.app.metadata.name != app.metadata.name:
            raise SessionGone(
                "session not found (it ended or never existed): start a new one with initialize"
            )
        if s.app is not app and s.app != app:
            # The app was redefined since the session began (labels, upstream, rewrite): the
            # session was decided on the old definition, so it ends; access is checked anew.
            raise SessionGone(
                "the app was redefined since this session began: start a new one with initialize", ended=s
            )
        if actor.policy_key != s.policy_key and actor.checker is not None:
            # The user's roles changed: live sessions follow within the actor-cache TTL,
            # and the client is told to list tools again.
            s.policy_key = actor.policy_key
            for cmd in s.engine.policy_changed(actor.checker):
                if isinstance(cmd, SendToClient):
                    self._route(s, cmd.raw, None)
                elif isinstance(cmd, CloseSession):  # access to the app was revoked: it ends now
                    raise SessionGone(
                        "session not found (it ended or never existed): start a new one with initialize",
                        ended=s,
                        why=cmd.reason,
                    )
        return s

    async def _new_session(self, actor: Actor, app: App, scope: Scope) -> GatewaySession:
        user = actor.user
        assert user is not None and actor.checker is not None
        mine = sum(1 for s in self.sessions.values() if s.user == actor.name)
        if mine >= self.limits.sessions_per_user:
            raise LimitExceededError(
                f"too many open MCP sessions for user {actor.name!r} "
                f"(limit {self.limits.sessions_per_user}); "
                "end some with DELETE or wait for idle ones to expire"
            )
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
            transport=f"http->{app.spec.transport}",
            clock=self.clock,
            redact=self.redact,
            remote_addr=(scope.get("client") or ("", 0))[0],
            new_id=self._event_ids.next,
        )
        # is_demo builds the demo App (pydantic) to compare with: only when the name matches.
        is_demo = app.metadata.name == DEMO_APP_NAME and self.registry.is_demo(app)
        m = app_metrics(app.metadata.name, "demo" if is_demo else app.spec.transport)
        s = GatewaySession(
            id=sid,
            user=actor.name,
            app=app,
            engine=engine,
            ident=ident,
            m=m,
            policy_key=actor.policy_key,
            strip=stripped_headers(app),
        )
        if app.spec.transport != "http" or is_demo:
            try:
                s.stream = await open_stream(
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
            s.upstream_session_id = getattr(s.stream, "upstream_session_id", "")
            if s.upstream_session_id:
                await self._run(s, engine.upstream_session_known(s.upstream_session_id))
            s.reader = asyncio.create_task(self._read_upstream(s), name=f"upstream-reader-{sid[:8]}")
        self.sessions[sid] = s
        m.session_started()
        return s

    async def _run(
        self,
        s: GatewaySession,
        commands: Iterable[Any],
        *,
        replies: list[bytes] | None = None,
    ) -> bool:
        """Carry out engine commands in order; False if a durable audit record failed (nothing forwarded).

        ``replies``: while handling a client message, the gateway's own answers are
        collected there instead of being routed.
        """
        for cmd in commands:
            if isinstance(cmd, RecordAudit):
                try:
                    await self.audit.record(cmd.event)
                except BastionError as e:
                    _audit_failed(e)
                    return False
                if cmd.denied:
                    s.m.denied(cmd.denied)
            elif isinstance(cmd, CompleteAudit):
                self.audit.complete(cmd.event_id, cmd.success, cmd.error, cmd.duration_ms)
            elif isinstance(cmd, ForwardToUpstream):
                if s.stream is not None:
                    await s.stream.send(cmd.raw)
            elif isinstance(cmd, SendToClient):
                if replies is not None:  # while handling a client message: the gateway's own answer
                    replies.append(cmd.raw)
                else:
                    self._route(s, cmd.raw, cmd.related_request_id)
            elif isinstance(cmd, CloseSession):
                s.dead = cmd.reason
            elif isinstance(cmd, Log):
                log.log(
                    _LOG_LEVELS.get(cmd.level, logging.WARNING),
                    cmd.message,
                    extra={"session_id": s.id, **cmd.fields},
                )
        return True

    def _route(self, s: GatewaySession, raw: bytes, related: Any) -> None:
        if related is not None and related in s.pending:
            s.pending[related].put_nowait(raw)
            return
        for rid in reversed(s.order):
            q = s.pending.get(rid)
            if q is not None:
                q.put_nowait(raw)
                return
        if s.get_log is None:
            s.get_log = s.logs.new("g")
        s.get_log.append(raw)  # delivered by the current or the next GET (bounded log)

    async def _post_stream(
        self, s: GatewaySession, send: Send, body: bytes, headers: dict[bytes, bytes], *, new: bool
    ) -> None:
        try:
            msg = jsonrpc.parse_message(body)
        except jsonrpc.ProtocolError:
            msg = None
        waiter: asyncio.Queue[bytes | None] | None = None
        if msg is not None and msg.kind == "request" and msg.id is not None and msg.id not in s.pending:
            waiter = asyncio.Queue()
            s.pending[msg.id] = waiter
            s.order.append(msg.id)
        immediate: list[bytes] = []
        try:
            cmds = s.engine.client_sent(body, _session_headers(s, headers)[0])
            s.m.client(s.engine.last_method)
            ok = await self._run(s, cmds, replies=immediate)
            sent_at = time.perf_counter()
            extra = [(b"mcp-session-id", s.id.encode())] if new else []
            if not ok:
                await _jsonrpc_error(
                    send,
                    503,
                    msg.id if msg else None,
                    -32603,
                    "the audit log is unavailable, so the gateway refuses to forward "
                    "calls it cannot record; try again shortly",
                    "gateway",
                    extra=extra,
                )
                return
            if immediate:  # the gateway answered itself (denied, invalid, too many in flight)
                if waiter is not None:
                    waiter = None
                request = msg is not None and msg.kind == "request"
                await _send_json(send, 200 if request else 400, immediate[0], extra)
                return
            if waiter is None:
                await _send(send, 202, [], b"", extra)
                return
            await self._answer_from_queue(s, send, waiter, extra, msg.id if msg else None, sent_at)
        except UpstreamError as e:
            await self._upstream_died(s, str(e))
            await _jsonrpc_error(send, e.http_status, msg.id if msg else None, -32603, e.message, "upstream")
        finally:
            if msg is not None and msg.id is not None and s.pending.get(msg.id) is not None:
                s.pending.pop(msg.id, None)
                with contextlib.suppress(ValueError):
                    s.order.remove(msg.id)

    async def _answer_from_queue(
        self,
        s: GatewaySession,
        send: Send,
        waiter: asyncio.Queue[bytes | None],
        extra: list[tuple[bytes, bytes]],
        request_id: Any,
        sent_at: float,
    ) -> None:
        deadline = self.limits.response_timeout
        try:
            # asyncio.timeout, not wait_for: no task per wait (this is every stdio call).
            async with asyncio.timeout(deadline):
                first = await waiter.get()
        except TimeoutError:
            s.m.upstream_error("timeout")
            body = await self._fail_request(
                s, request_id, f"the upstream MCP server did not answer within {deadline:.0f}s"
            )
            await _send(send, 504, [(b"content-type", _JSON), (ORIGIN_HEADER, b"upstream")], body, extra)
            return
        if first is None:
            await _jsonrpc_error(
                send, 502, None, -32603, f"the upstream MCP server ended: {s.dead}", "upstream", extra
            )
            return
        if _is_response(first):
            s.m.latency.observe(time.perf_counter() - sent_at)
            await _send_json(send, 200, first, extra)
            return
        # Every event is logged first, so a client that lost the connection can
        # resume this stream with Last-Event-ID; writes to a gone client are dropped.
        log = s.logs.new("p")
        try:
            await _start_sse(send, extra)
            await self._prime(s, send, log)
            await _sse_write(send, first, log.event_id(log.append(first)))
            while True:
                try:
                    async with asyncio.timeout(deadline):
                        item = await waiter.get()
                except TimeoutError:
                    item = None
                if item is None:
                    break
                await _sse_write(send, item, log.event_id(log.append(item)))
                if _is_response(item):
                    s.m.latency.observe(time.perf_counter() - sent_at)
                    break
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            log.finish()

    async def _fail_request(self, s: GatewaySession, request_id: Any, message: str) -> bytes:
        """Answer a forwarded request with an upstream error *through the engine*.

        The engine then completes the request's audit record as failed and frees
        its in-flight slot, exactly as if the upstream had answered with the error;
        a late real answer is dropped as unknown.
        """
        raw = jsonrpc.error_response(request_id, jsonrpc.INTERNAL_ERROR, message)
        out = raw
        for cmd in s.engine.upstream_sent(raw):
            if isinstance(cmd, SendToClient):
                out = cmd.raw
            else:
                await self._run(s, [cmd])
        return out

    async def _read_upstream(self, s: GatewaySession) -> None:
        try:
            while True:
                raw = await s.stream.receive()
                s.last_active = time.monotonic()
                cmds = s.engine.upstream_sent(raw)
                s.m.upstream(s.engine.last_method)
                await self._run(s, cmds)
        except asyncio.CancelledError:
            raise
        except UpstreamError as e:
            await self._upstream_died(s, e.message)
        except Exception as e:  # a bug must not leave clients waiting forever
            log.exception("upstream reader failed", extra={"session_id": s.id})
            await self._upstream_died(s, f"gateway error: {e}")

    async def _upstream_died(self, s: GatewaySession, reason: str) -> None:
        if s.dead:
            return
        s.dead = reason or "upstream closed"
        s.m.upstream_error("unreachable")  # the message stream broke: the upstream is gone
        log.warning(
            "upstream ended", extra={"session_id": s.id, "app": s.app.metadata.name, "reason": s.dead}
        )
        for q in list(s.pending.values()):
            q.put_nowait(None)
        if s.get_log is not None:
            s.get_log.finish()
        await self._run(s, s.engine.ended(error=s.dead))
        if self.sessions.pop(s.id, None) is not None:
            s.m.session_ended()
        if s.stream is not None:
            with contextlib.suppress(Exception):
                await s.stream.aclose()

    async def _end(self, s: GatewaySession, reason: str = "") -> None:
        if s.reader is not None:
            s.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await s.reader
        for q in list(s.pending.values()):
            q.put_nowait(None)
        if s.get_log is not None:
            s.get_log.finish()
        if not s.dead:
            s.dead = reason or "ended"
            await self._run(
                s, s.engine.ended(error="" if reason in ("", "client ended the session") else reason)
            )
        if self.sessions.pop(s.id, None) is not None:
            s.m.session_ended()
        if s.stream is not None:
            with contextlib.suppress(Exception):
                await s.stream.aclose()
        elif s.upstream_session_id and reason not in ("client ended the session", "upstream session expired"):
            # Reaped or shut down: end the upstream's session too (best effort).
            with contextlib.suppress(Exception):
                resp = await asyncio.wait_for(
                    self.pools.for_app(s.app).request(
                        "DELETE", origin_and_path(s.app)[1], self._upstream_headers(s, {}, accept=_JSON)
                    ),
                    5.0,
                )
                await resp.aclose()

    # ------------------------------------------------------- streamable HTTP

    def _upstream_headers(
        self, s: GatewaySession, headers: dict[bytes, bytes], *, accept: bytes
    ) -> list[tuple[bytes, bytes]]:
        out = list(_session_headers(s, headers)[1]) if headers else []
        out.append((b"accept", accept))
        if s.upstream_session_id:
            out.append((b"mcp-session-id", s.upstream_session_id.encode()))
        out += s.ident.encoded_headers(self.clock.now())
        return out

    def _post_headers(self, s: GatewaySession, headers: dict[bytes, bytes]) -> PreparedHeaders:
        """The headers of a POST upstream: ``_upstream_headers`` plus the content type,
        validated and encoded once and reused while their parts are the same objects."""
        passed = _session_headers(s, headers)[1]
        ident = s.ident.encoded_headers(self.clock.now())
        accept = headers.get(b"accept", _DEFAULT_ACCEPT)
        key = s.post_key
        prepared = s.post_hdrs
        if (
            prepared is None
            or key[0] is not passed
            or key[1] is not ident
            or key[2] != accept
            or key[3] != s.upstream_session_id
        ):
            out = list(passed)
            out.append((b"accept", accept))
            if s.upstream_session_id:
                out.append((b"mcp-session-id", s.upstream_session_id.encode()))
            out += ident
            out.append((b"content-type", _JSON))
            prepared = s.post_hdrs = PreparedHeaders(out)
            s.post_key = (passed, ident, accept, s.upstream_session_id)
        return prepared

    def _pool(self, s: GatewaySession) -> HTTPUpstreamPool:
        pool = s.pool
        if pool is None:
            pool = s.pool = self.pools.for_app(s.app)
            s.target = origin_and_path(s.app)[1]
        return pool

    async def _post_http(
        self,
        s: GatewaySession,
        scope: Scope,
        send: Send,
        body: bytes,
        headers: dict[bytes, bytes],
        *,
        new: bool,
    ) -> None:
        extra = [(b"mcp-session-id", s.id.encode())] if new else _NO_EXTRA
        engine = s.engine
        cmds = engine.client_sent(body, _session_headers(s, headers)[0])
        s.m.client(engine.last_method)
        # The engine's commands, in order; the forward (there is at most one, and it comes
        # last) is carried out below, once every audit record before it is committed.
        fwd: ForwardToUpstream | None = None
        answer: bytes | None = None
        status = 200  # 400 when the gateway's answer is not to a request (invalid, or no id)
        for cmd in cmds:
            if isinstance(cmd, RecordAudit):
                try:
                    await self.audit.record(cmd.event)
                except BastionError as e:
                    _audit_failed(e)
                    await _jsonrpc_error(
                        send,
                        503,
                        None,
                        -32603,
                        "the audit log is unavailable, so the gateway refuses "
                        "to forward calls it cannot record; try again shortly",
                        "gateway",
                        extra,
                    )
                    return
                if cmd.denied:
                    s.m.denied(cmd.denied)
            elif isinstance(cmd, ForwardToUpstream):
                if fwd is None:
                    fwd = cmd
            elif isinstance(cmd, SendToClient):
                if answer is None:
                    answer = cmd.raw
                    if cmd.related_request_id is None:
                        status = 400
            else:
                await self._run(s, (cmd,))
        if answer is not None:
            await _send_json(send, status, answer, extra)
            return
        if fwd is None:
            await _send(send, 202, [], b"", extra)
            return
        pool = s.pool or self._pool(s)
        # Set by __call__ for an allowed sub-path (already normalised and re-encoded).
        target = scope["bastion"].get("target") or s.target
        request_id = fwd.message.id
        sent_at = time.perf_counter()
        try:
            up_headers = self._post_headers(s, headers)
            resp = await pool.request("POST", target, up_headers, fwd.raw)
        except ValueError as e:
            # The request could not be written (a header or target the pool refuses): our fault,
            # since client input is checked before; the call is still completed in the audit log.
            log.error("upstream request not built", extra={"session_id": s.id, "error": str(e)[:200]})
            body = await self._fail_request(s, request_id, "the gateway could not build the upstream request")
            await _send(send, 500, [(b"content-type", _JSON), (ORIGIN_HEADER, b"gateway")], body, extra)
            return
        except UpstreamError as e:
            s.m.upstream_error(upstream_error_kind(e))
            body = await self._fail_request(s, request_id, e.message)
            await _send(
                send, e.http_status, [(b"content-type", _JSON), (ORIGIN_HEADER, b"upstream")], body, extra
            )
            return
        if fwd.message.kind == "request":  # as for message streams: requests only, not notifications
            s.m.latency.observe(time.perf_counter() - sent_at)
        streaming = False  # the SSE answer began: an error can no longer be a status code
        try:
            usid = resp.header(b"mcp-session-id")
            if usid and not s.upstream_session_id:
                s.upstream_session_id = usid.decode("latin-1")
                await self._run(s, engine.upstream_session_known(s.upstream_session_id))
            ctype = (resp.header(b"content-type") or b"").split(b";")[0].strip().lower()
            status = resp.status
            if status == 200 and ctype == _JSON:
                data = await resp.read()
                up_cmds = engine.upstream_sent(data)
                s.m.upstream(engine.last_method)
                answer = None
                for c in up_cmds:
                    if isinstance(c, SendToClient):
                        if answer is None:
                            answer = c.raw
                    elif isinstance(c, CompleteAudit):
                        self.audit.complete(c.event_id, c.success, c.error, c.duration_ms)
                    else:
                        await self._run(s, (c,))
                if answer is not None:
                    await _send_json(send, 200, answer, extra)
                else:
                    await _unexpected_answer(send, extra)
                return
            if status == 404 and s.upstream_session_id and not new:
                await resp.aclose()
                await self._end(s, "upstream session expired")
                await _jsonrpc_error(
                    send,
                    404,
                    None,
                    -32001,
                    "the upstream session ended; start a new one with initialize",
                    "upstream",
                )
                return
            if status == 202:
                await resp.aclose()
                await _send(send, 202, [], b"", extra)
                return
            if status >= 400 or ctype not in (_JSON, _SSE):
                data = await resp.read()
                if ctype == _JSON and data:
                    up_cmds = engine.upstream_sent(data)
                    s.m.upstream(engine.last_method)
                    await self._run(s, up_cmds)
                await _send(
                    send,
                    status,
                    [(b"content-type", ctype or b"text/plain"), (ORIGIN_HEADER, b"upstream")],
                    data,
                    extra,
                )
                return
            if ctype == _JSON:  # another 2xx or 3xx with a JSON body: as a 200
                data = await resp.read()
                up_cmds = engine.upstream_sent(data)
                s.m.upstream(engine.last_method)
                out: list[bytes] = []
                for c in up_cmds:
                    if isinstance(c, SendToClient):
                        out.append(c.raw)
                    else:
                        await self._run(s, [c])
                if out:
                    await _send_json(send, 200, out[0], extra)
                else:
                    await _unexpected_answer(send, extra)
                return
            streaming = True  # _relay_sse starts the answer before anything else
            await self._relay_sse(s, send, resp, extra, request_id=request_id)
        except UpstreamError as e:
            # The upstream broke off mid-answer: fail the call through the engine
            # (audit completed as failed), and tell the client whose fault it was.
            s.m.upstream_error(upstream_error_kind(e))
            body = await self._fail_request(s, request_id, e.message)
            if not streaming:
                await _send(
                    send, e.http_status, [(b"content-type", _JSON), (ORIGIN_HEADER, b"upstream")], body, extra
                )
            else:
                await send(
                    {
                        "type": "http.response.body",
                        "body": encode_event(body, event="message"),
                        "more_body": False,
                    }
                )
        finally:
            resp.close()

    async def _relay_sse(
        self,
        s: GatewaySession,
        send: Send,
        resp: Any,
        extra: list[tuple[bytes, bytes]],
        request_id: Any = None,
    ) -> None:
        """Upstream SSE → client SSE, event by event, each message through the engine.

        Never buffered whole: each event is written as soon as it is parsed.
        """
        await _start_sse(send, extra)
        parser = SSEParser()
        async for chunk in resp.iter_chunks():
            for ev in parser.feed(chunk):
                if not ev.data:
                    await send(
                        {
                            "type": "http.response.body",
                            "body": encode_event(b"", id=ev.id, retry=ev.retry),
                            "more_body": True,
                        }
                    )
                    continue
                up_cmds = s.engine.upstream_sent(ev.data)
                s.m.upstream(s.engine.last_method)
                for c in up_cmds:
                    if isinstance(c, SendToClient):
                        await send(
                            {
                                "type": "http.response.body",
                                "body": encode_event(c.raw, id=ev.id, event=ev.event or None),
                                "more_body": True,
                            }
                        )
                    else:
                        await self._run(s, [c])
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    # ------------------------------------------------------------------- GET

    async def _prime(self, s: GatewaySession, send: Send, log: EventLog) -> None:
        """2025-11-25: an event with an id and no data first, so even an empty stream can resume."""
        if s.engine.protocol_version >= "2025-11-25":
            await send(
                {
                    "type": "http.response.body",
                    "body": encode_event(b"", id=log.event_id(log.last)),
                    "more_body": True,
                }
            )

    async def _follow(
        self,
        s: GatewaySession,
        send: Send,
        receive: Receive,
        log: EventLog,
        pos: int,
        *,
        owner: object | None,
    ) -> None:
        """Write ``log``'s events after ``pos`` as they come, until it is done, the client
        goes away, or (for the GET stream) a newer GET takes over."""
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            while True:
                changed = log.changed()
                for n, raw in log.after(pos):
                    await _sse_write(send, raw, log.event_id(n))
                    pos = n
                    if owner is not None:
                        s.get_sent = max(s.get_sent, n)
                if log.done or (owner is not None and s.get_owner is not owner):
                    break
                await asyncio.wait({changed, gone}, return_when=asyncio.FIRST_COMPLETED)
                if gone.done():
                    return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            gone.cancel()

    async def _get(
        self, send: Send, receive: Receive, actor: Actor, app: App, headers: dict[bytes, bytes]
    ) -> None:
        sid = headers.get(b"mcp-session-id", b"").decode("latin-1")
        if not sid:
            raise Refused(400, "missing Mcp-Session-Id header")
        s = self._session(sid, actor, app)
        s.last_active = time.monotonic()
        if s.stream is None:
            pool = self.pools.for_app(s.app)
            up = self._upstream_headers(s, headers, accept=b"text/event-stream")
            resp = await pool.request("GET", origin_and_path(s.app)[1], up)
            try:
                ctype = (resp.header(b"content-type") or b"").split(b";")[0].strip().lower()
                if resp.status != 200 or ctype != _SSE:
                    data = await resp.read()
                    await _send(
                        send,
                        resp.status,
                        [(b"content-type", ctype or b"text/plain"), (ORIGIN_HEADER, b"upstream")],
                        data,
                    )
                    return
                await self._relay_sse(s, send, resp, [])
            finally:
                await resp.aclose()
            return
        last = headers.get(b"last-event-id", b"").decode("latin-1")
        found = s.logs.find(last) if last else None
        if s.get_log is None:
            s.get_log = s.logs.new("g")
        if found is not None and found[0] is not s.get_log:
            # Resuming a POST stream: the rest of that stream only, up to its response.
            log, pos = found
            await _start_sse(send, [])
            await self._follow(s, send, receive, log, pos, owner=None)
            return
        log = s.get_log
        pos = found[1] if found is not None else s.get_sent
        owner = object()
        s.get_owner = owner  # one GET stream at a time: a new one takes over
        await _start_sse(send, [])
        await self._prime(s, send, log)
        await self._follow(s, send, receive, log, pos, owner=owner)

    # ---------------------------------------------------------------- DELETE

    async def _delete(self, send: Send, actor: Actor, app: App, headers: dict[bytes, bytes]) -> None:
        sid = headers.get(b"mcp-session-id", b"").decode("latin-1")
        if not sid:
            raise Refused(400, "missing Mcp-Session-Id header")
        s = self._session(sid, actor, app)
        if s.stream is None and s.upstream_session_id:
            pool = self.pools.for_app(s.app)
            with contextlib.suppress(UpstreamError):
                resp = await pool.request(
                    "DELETE",
                    origin_and_path(s.app)[1],
                    self._upstream_headers(s, headers, accept=b"application/json"),
                )
                await resp.aclose()
        await self._end(s, "client ended the session")
        await _send(send, 200, [], b"")


# ------------------------------------------------------------------ helpers


def new_session_id() -> str:
    """A session id: 48 bits of time (so the audit index appends in order) + 128 random bits.

    Unguessable (the random part alone is 128 bits) and visible ASCII, as the
    spec asks of ``Mcp-Session-Id``.
    """
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(16)}"


_NOT_AUDITED = frozenset({b"content-length", b"connection", b"host", b"accept-encoding"})


def _session_headers(
    s: GatewaySession, headers: dict[bytes, bytes]
) -> tuple[dict[str, str], list[tuple[bytes, bytes]]]:
    """(redacted headers for audit events, headers passed upstream), recomputed only on change.

    The pass list is a new object whenever it is recomputed (``_post_headers`` relies on it).
    """
    if headers is not s.hdr_seen and headers != s.hdr_seen:  # else: as last time, content-length too
        h = dict(headers)
        h.pop(b"content-length", None)
        if h != s.hdr_key:
            s.hdr_key = h
            s.audit_hdrs = _audit_headers(headers)
            strip = s.strip
            s.pass_hdrs = [(k, v) for k, v in headers.items() if not _dropped(k, strip)]
        s.hdr_seen = headers
    return s.audit_hdrs, s.pass_hdrs


def _dropped(name: bytes, strip: frozenset[bytes]) -> bool:
    """Whether a client header (lower-case ``name``) is kept from the upstream.

    Compared with ``_`` read as ``-``: CGI, WSGI and Rack servers store both spellings under
    one key (``HTTP_X_FORWARDED_USER``), so ``X_Forwarded_User`` would reach such an upstream
    as the identity header it names, beside or before the gateway's own value; an ``Mcp_*``
    spelling of a header the gateway checks against the body (``Mcp-Name``...) is dropped too.
    """
    if b"_" in name:
        name = name.replace(b"_", b"-")
        if name.startswith(b"mcp-"):
            return True  # Mcp_Name, Mcp_Method...: the gateway checks the "-" spellings only
    return (
        name in _HOP
        or name in strip
        or name.startswith(b"x-bastion")
        or is_identity_header(name)
        or name in (b"accept", b"content-type")
    )


def _audit_headers(headers: dict[bytes, bytes]) -> dict[str, str]:
    """The request's headers for its audit events: credentials and secrets redacted."""
    return redact_headers(
        {k.decode("latin-1"): v.decode("latin-1") for k, v in headers.items() if k not in _NOT_AUDITED}
    )


def _is_response(raw: bytes) -> bool:
    # Cheap: responses carry "result" or "error" and no "method".  The engine
    # already validated the message; this only picks JSON vs SSE framing.
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    return isinstance(obj, dict) and "method" not in obj and ("result" in obj or "error" in obj)


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


def _audit_failed(e: BastionError) -> None:
    log.error("audit unavailable; refusing the request", extra={"error": e.message})


async def _send(
    send: Send,
    status: int,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    if extra:
        hs = [*headers, *extra, (b"content-length", b"%d" % len(body))]
    else:
        hs = [*headers, (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": hs})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_json(
    send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    if extra:
        hs = [(b"content-type", _JSON), *extra, (b"content-length", b"%d" % len(body))]
    else:
        hs = [(b"content-type", _JSON), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": hs})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _jsonrpc_error(
    send: Send,
    status: int,
    mid: Any,
    code: int,
    message: str,
    origin: str,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = jsonrpc.error_response(mid, code, message)
    await _send(send, status, [(b"content-type", _JSON), (ORIGIN_HEADER, origin.encode())], body, extra)


async def _unexpected_answer(send: Send, extra: list[tuple[bytes, bytes]]) -> None:
    """A JSON answer from the upstream that answers nothing the client asked (502)."""
    await _jsonrpc_error(
        send, 502, None, -32603, "the upstream answered with an unexpected message", "upstream", extra
    )


async def _start_sse(send: Send, extra: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", _SSE),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),
                *extra,
            ],
        }
    )


async def _sse_write(send: Send, raw: bytes, event_id: str | None = None) -> None:
    await send(
        {
            "type": "http.response.body",
            "body": encode_event(raw, id=event_id, event="message"),
            "more_body": True,
        }
    )


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (the request body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass
