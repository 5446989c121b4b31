"""MCP 2026-07-28 clients: sessionless requests served over the gateway's sessions (decision 0046).

A 2026 client sends self-contained POSTs: no ``initialize``, no ``Mcp-Session-Id``; its
version, capabilities and name travel in each request's ``params._meta``.  The upstreams here
speak the handshake versions, so the gateway *holds* a session on the client's behalf: one per
user, app and client self-description (the envelope), opened with ``initialize`` carrying the
client's name and capabilities, reused by every request with the same envelope, and ended like
any session (idle reaper, revocation, app redefined, upstream gone).  Each request then goes
through that session's engine exactly as a session message does (RBAC, sanitisation, audit:
the rules do not fork by version), under an id of the gateway's (clients' ids collide across
instances), and the answer is written back the 2026 way (:func:`bastion.protocol.modern.modern_result`).

``server/discover`` is answered here from the held session's ``initialize`` result.  Nothing
of this runs for a session request: ``MCPHandler._post`` comes here only for a
``MCP-Protocol-Version`` it does not otherwise speak.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from starlette.types import Receive, Scope, Send

from bastion._tasks import stop_tasks
from bastion.answers import JSON, Answer, Headers, send_body
from bastion.appservice.executor import Collected
from bastion.appservice.sessions import GatewaySession, Refused, SessionGone, session_headers
from bastion.appservice.upstream import ClientPost
from bastion.auth.server import Actor
from bastion.errors import BastionError, LimitExceededError, UpstreamError
from bastion.protocol import jsonrpc
from bastion.protocol import modern as wire
from bastion.protocol.sse import SSEParser, encode_event
from bastion.resources import App
from bastion.session.engine import CLIENT_NOTIFICATIONS

if TYPE_CHECKING:
    from bastion.appservice.mcp_http import MCPHandler

log = logging.getLogger("bastion.app")

#: How long a 2026 client may cache a list the gateway filtered for it.  Roles reach a live
#: conversation within the proxy's actor cache (2 s) anyway, so a cached list is stale by at most
#: about as long as the gateway itself takes to see a role change.
CACHE_TTL_MS = 2_000
#: The notification types a listen stream may ask for, and the method each stands for.
_LISTEN_TYPES = {
    "toolsListChanged": "notifications/tools/list_changed",
    "promptsListChanged": "notifications/prompts/list_changed",
    "resourcesListChanged": "notifications/resources/list_changed",
}
#: Methods the gateway answers itself for a 2026 client.
_GATEWAY_METHODS = frozenset({"server/discover"})
_AUDIT_DOWN = (
    "the audit log is unavailable, so the gateway refuses to forward calls it cannot record; "
    "try again shortly"
)


class Held:
    """What the gateway keeps of a session it holds for 2026 clients."""

    __slots__ = ("capabilities", "ids", "instructions", "key", "server_info", "version")

    def __init__(self, key: tuple[str, str, bytes]) -> None:
        self.key = key
        #: The upstream's answer to initialize (for server/discover), and the version it chose.
        self.capabilities: dict[str, Any] = {}
        self.instructions: Any = None
        self.server_info: Any = None
        self.version = wire.LATEST_HANDSHAKE
        #: Ids of the requests sent upstream in this session (the clients' own may collide).
        self.ids = itertools.count(1)


class ModernFront:
    """Serves 2026-07-28 requests for one MCP handler (its sessions, executor and limits)."""

    def __init__(self, handler: MCPHandler) -> None:
        self.h = handler
        #: Held sessions: (user, app, envelope) -> session id; and what each holds.
        self._by_key: dict[tuple[str, str, bytes], str] = {}
        self._held: dict[str, Held] = {}
        #: Held sessions being opened: later requests with the same key wait for the first.
        self._opening: dict[tuple[str, str, bytes], asyncio.Future[GatewaySession]] = {}
        #: Requests under way whose client is not watched yet, with when they began; the sweep
        #: that starts watchers for those older than WATCH_AFTER (one timer, not one per call).
        self._unwatched: dict[_Watch, float] = {}
        self._sweep: asyncio.TimerHandle | None = None

    def _watch_later(self, watch: _Watch) -> None:
        loop = asyncio.get_running_loop()
        self._unwatched[watch] = loop.time()
        if self._sweep is None:
            self._sweep = loop.call_later(WATCH_AFTER, self._start_watches)

    def _start_watches(self) -> None:
        """Every WATCH_AFTER while requests are under way: watch the clients of those begun at
        least WATCH_AFTER ago (so a request is watched within 2 x WATCH_AFTER of its start)."""
        self._sweep = None
        loop = asyncio.get_running_loop()
        due = loop.time() - WATCH_AFTER
        for watch in [w for w, began in self._unwatched.items() if began <= due]:
            del self._unwatched[watch]
            watch.start()
        if self._unwatched:
            self._sweep = loop.call_later(WATCH_AFTER, self._start_watches)

    def forget(self, sid: str) -> None:
        """The session ``sid`` ended: a held one is no longer offered to its clients."""
        held = self._held.pop(sid, None)
        if held is not None and self._by_key.get(held.key) == sid:
            del self._by_key[held.key]

    # ------------------------------------------------------------------ POST

    async def post(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        actor: Actor,
        app: App,
        headers: dict[bytes, bytes],
        target: str,
        body: bytes,
    ) -> None:
        try:
            msg = jsonrpc.parse_message(body)
        except jsonrpc.ProtocolError as e:
            raise Refused(400, e.message, rpc_code=e.rpc_code, mid=e.id) from None
        if msg.kind != "request":
            if msg.kind == "notification" and msg.method in CLIENT_NOTIFICATIONS:
                # 2026-07-28 has no client notifications over HTTP (closing a response stream
                # cancels); clients in the field still send them: acknowledged, not forwarded.
                await send_body(send, 202, [], b"")
                return
            raise Refused(
                400,
                "a 2026-07-28 POST carries one request (a request needs an id; "
                "responses are not sent to the gateway)",
                mid=msg.id,
            )
        dup = wire.duplicated_routing_header(scope.get("headers") or ())
        if dup:
            raise Refused(
                400, f"{dup} header appears more than once", rpc_code=jsonrpc.HEADER_MISMATCH, mid=msg.id
            )
        method = msg.method or ""
        env = wire.check_request(method, msg.params, headers)
        if isinstance(env, wire.Rejection):
            raise Refused(env.status, env.message, rpc_code=env.code, mid=msg.id, data=env.data)
        if method in wire.REMOVED_METHODS:
            raise Refused(
                404,
                f"method {method!r} is not part of MCP 2026-07-28",
                rpc_code=jsonrpc.METHOD_NOT_FOUND,
                mid=msg.id,
            )
        s, held = await self._session(actor, app, env, scope, headers, target, msg.id)
        if method in _GATEWAY_METHODS:
            result = wire.discover_result(
                held.capabilities, held.instructions, held.server_info, CACHE_TTL_MS
            )
            await Answer(send).json(200, jsonrpc.result_response(msg.id, result))
            return
        if method == "subscriptions/listen":
            await self._listen(s, held, msg, receive, send, headers)
            return
        await self._forward(s, held, msg, receive, send, headers, target)

    async def _forward(
        self,
        s: GatewaySession,
        held: Held,
        msg: jsonrpc.Message,
        receive: Receive,
        send: Send,
        headers: dict[bytes, bytes],
        target: str,
    ) -> None:
        method = msg.method or ""
        uid = f"bastion-{next(held.ids)}"
        params = wire.without_envelope(msg.params) if msg.params is not None else None
        doc: dict[str, Any] = {"jsonrpc": "2.0", "id": uid, "method": method}
        if params is not None:
            doc["params"] = params
        raw = orjson.dumps(doc)
        sent = jsonrpc.Message(raw, "request", uid, method, params, doc)
        up_headers = self._upstream_headers(headers, held)
        engine = s.engine
        s.last_active = time.monotonic()
        cmds = engine.client_sent(raw, session_headers(s, up_headers)[0], parsed=sent)
        s.m.client(engine.last_method)
        got = Collected()
        up_target = target

        async def refuse(asked: Any) -> None:
            await self._refuse_question(s, asked, headers, held, up_target)

        answer = ModernAnswer(send, msg.id, uid, method, refuse)
        if not await self.h.executor.run(s, cmds, got):
            await answer.error(503, _AUDIT_DOWN, "gateway", code=jsonrpc.INTERNAL_ERROR)
            return
        if got.replies:  # the gateway answered itself (denied, invalid, too many in flight)
            await answer.json(200, got.replies[0].raw)
            return
        if got.fwd is None or s.dead:
            await answer.error(
                503,
                "the gateway's session with the upstream ended; send the request again",
                "upstream",
                code=jsonrpc.INTERNAL_ERROR,
            )
            return
        # 2026-07-28: a client closing its response stream cancels the request.  The exchange
        # runs in this task; a watcher, started only if it takes longer than WATCH_AFTER (most
        # calls are over by then: no task, no timer for them: one sweep for all), cancels it
        # when the client goes.
        watch = _Watch(receive, answer)
        self._watch_later(watch)
        try:
            await s.upstream.exchange(s, got.fwd, answer, ClientPost(up_headers, target, False))
        except asyncio.CancelledError:
            if not watch.gone or watch.me.uncancel() > 0:
                raise  # not (only) the client's going: the gateway's own cancellation
            await self._cancel_upstream(s, uid, headers, held, target)
        finally:
            self._unwatched.pop(watch, None)
            if watch.task is not None:
                await watch.stop()

    async def _listen(
        self,
        s: GatewaySession,
        held: Held,
        msg: jsonrpc.Message,
        receive: Receive,
        send: Send,
        headers: dict[bytes, bytes],
    ) -> None:
        """``subscriptions/listen``: the held session's server-to-client stream (what a GET of its
        upstream carries, the gateway's own ``tools/list_changed`` when roles change on stdio
        apps), filtered to the notification types asked for, after the acknowledgement.  Ends
        when the client closes it (or the upstream ends it: then with its result)."""
        params = msg.params or {}
        asked = params.get("notifications")
        asked = asked if isinstance(asked, dict) else {}
        honoured = {k: True for k in _LISTEN_TYPES if asked.get(k) is True}
        wanted = frozenset(_LISTEN_TYPES[k] for k in honoured)
        answer = ListenAnswer(send, msg.id, wanted, honoured)
        s.last_active = time.monotonic()
        # Acknowledged at once: an upstream may send its GET stream's headers only with its
        # first event (server-everything does).
        await answer.start_sse()
        gone = asyncio.Event()

        async def client_gone() -> dict[str, Any]:
            await gone.wait()
            return {"type": "http.disconnect"}

        up = self._upstream_headers(headers, held)
        relay = asyncio.create_task(s.upstream.listen(s, answer, client_gone, up), name=f"listen-{s.id[:8]}")
        closed = asyncio.create_task(_disconnected(receive), name=f"listen-watch-{s.id[:8]}")
        try:
            await asyncio.wait({relay, closed}, return_when=asyncio.FIRST_COMPLETED)
            if relay.done() and not closed.done() and (answer.refused or not answer.finished):
                # The upstream has no such stream (a 2026 server answers its GET 405; one GET
                # per session elsewhere): the acknowledged stream stays open until the client
                # closes it.
                await closed
        finally:
            gone.set()  # the relay ends (closing the client's stream is cancelling it: 2026-07-28)
            await stop_tasks(relay, closed)

    async def _refuse_question(
        self, s: GatewaySession, asked: Any, headers: dict[bytes, bytes], held: Held, target: str
    ) -> None:
        """The upstream asked the client something (sampling, elicitation, roots) while serving a
        2026 request: the client cannot be asked on this path, so the gateway answers for it
        (through the engine, which forwards only answers to questions the upstream asked)."""
        text = (
            "the client speaks MCP 2026-07-28 through the gateway and cannot be sent requests "
            "(sampling, elicitation, roots)"
        )
        got = Collected()
        reply = jsonrpc.error_response(asked, jsonrpc.METHOD_NOT_FOUND, text)
        if not await self.h.executor.run(s, s.engine.client_sent(reply), got) or got.fwd is None or s.dead:
            return
        up = self._upstream_headers(headers, held)
        with contextlib.suppress(BastionError):
            await s.upstream.exchange(s, got.fwd, Capture(), ClientPost(up, target, False))

    async def _cancel_upstream(
        self, s: GatewaySession, uid: str, headers: dict[bytes, bytes], held: Held, target: str
    ) -> None:
        """Tell the upstream the request was cancelled (through the engine: audited)."""
        note = jsonrpc.notification(
            "notifications/cancelled", {"requestId": uid, "reason": "the client closed its response stream"}
        )
        got = Collected()
        if not await self.h.executor.run(s, s.engine.client_sent(note), got) or got.fwd is None or s.dead:
            return
        up = self._upstream_headers(headers, held)
        with contextlib.suppress(BastionError):
            await s.upstream.exchange(s, got.fwd, Capture(), ClientPost(up, target, False))

    @staticmethod
    def _upstream_headers(headers: dict[bytes, bytes], held: Held) -> dict[bytes, bytes]:
        """The client's headers for the older upstream session: the 2026 routing headers are
        the client's word to the gateway (checked against the body); upstream, the session's
        negotiated version is the one that applies."""
        out = {k: v for k, v in headers.items() if not k.startswith(b"mcp-")}
        out[b"mcp-protocol-version"] = held.version.encode()
        return out

    # --------------------------------------------------------- held sessions

    async def _evict_one(self, user: str) -> bool:
        """End the user's held session idle the longest (not one at work); False if none."""
        idle = [
            s
            for sid in self._held
            if (s := self.h.sessions.get(sid)) is not None and s.user == user and not s.upstream.busy
        ]
        if not idle:
            return False
        oldest = min(idle, key=lambda s: s.last_active)
        await self.h._end(oldest, "idle, ended to make room for another 2026 client's session")
        return True

    async def _session(
        self,
        actor: Actor,
        app: App,
        env: wire.Envelope,
        scope: Scope,
        headers: dict[bytes, bytes],
        target: str,
        mid: Any,
    ) -> tuple[GatewaySession, Held]:
        key = (actor.name, app.metadata.name, env.key())
        sid = self._by_key.get(key)
        if sid is not None:
            try:
                s = await self.h._session(sid, actor, app)  # roles changed, app redefined...
            except SessionGone:
                self.forget(sid)
            else:
                return s, self._held[sid]
        opening = self._opening.get(key)
        if opening is not None:
            s = await asyncio.shield(opening)
            return s, self._held[s.id]
        fut: asyncio.Future[GatewaySession] = asyncio.get_running_loop().create_future()
        self._opening[key] = fut
        try:
            s = await self._open(actor, app, env, scope, headers, target, key, mid)
        except BaseException as e:
            fut.set_exception(e if isinstance(e, Exception) else SessionGone("the gateway is shutting down"))
            fut.exception()  # retrieved: no waiter may be left to read it
            raise
        finally:
            del self._opening[key]
        fut.set_result(s)
        return s, self._held[s.id]

    async def _open(
        self,
        actor: Actor,
        app: App,
        env: wire.Envelope,
        scope: Scope,
        headers: dict[bytes, bytes],
        target: str,
        key: tuple[str, str, bytes],
        mid: Any,
    ) -> GatewaySession:
        """Open a session upstream for 2026 clients with this envelope: ``initialize`` with the
        client's name and capabilities, then ``notifications/initialized``, both through the
        engine (so the session's start and its initialize are audited like any other)."""
        h = self.h
        transport = f"http(2026)->{app.spec.transport}"
        try:
            s = await h._new_session(actor, app, scope, transport=transport)
        except LimitExceededError:
            # The user's sessions are all taken: a held one idle longest makes room (a session
            # of the user's own 2025 clients is never ended for this); else the limit stands.
            if not await self._evict_one(actor.name):
                raise
            s = await h._new_session(actor, app, scope, transport=transport)
        if s.dead:
            raise SessionGone(
                "the session could not be opened (access changed meanwhile); send the request again"
            )
        held = Held(key)
        self._held[s.id] = held
        up = {k: v for k, v in headers.items() if not k.startswith(b"mcp-")}
        init = jsonrpc.parse_message(
            orjson.dumps(
                {
                    "jsonrpc": "2.0",
                    "id": "bastion-init",
                    "method": "initialize",
                    "params": wire.initialize_params(env),
                }
            )
        )
        cap = Capture()
        got = Collected()
        ok = await h.executor.run(
            s, s.engine.client_sent(init.raw, session_headers(s, up)[0], parsed=init), got
        )
        if ok and got.fwd is not None and not s.dead:
            await s.upstream.exchange(s, got.fwd, cap, ClientPost(up, target, True))
        result = cap.result()
        if result is None:
            refused = Capture()
            refused.messages += [r.raw for r in got.replies]
            own = refused.error_text()
            why = own or cap.error_text() or "the upstream MCP server did not answer initialize"
            await h._end(s, f"initialize failed: {why}")
            self.forget(s.id)
            if own:  # the gateway's own refusal (the app is denied to the user): audited already
                raise Refused(403, own, rpc_code=jsonrpc.ACCESS_DENIED, mid=mid)
            if not ok:
                raise BastionError(_AUDIT_DOWN)
            raise UpstreamError(f"the upstream MCP server refused the session the gateway opened: {why}")
        caps = result.get("capabilities")
        held.capabilities = caps if isinstance(caps, dict) else {}
        held.instructions = result.get("instructions")
        held.server_info = result.get("serverInfo")
        version = result.get("protocolVersion")
        if isinstance(version, str) and version in wire.HANDSHAKE_VERSIONS:
            held.version = version
        note = jsonrpc.parse_message(b'{"jsonrpc":"2.0","method":"notifications/initialized"}')
        got = Collected()
        up[b"mcp-protocol-version"] = held.version.encode()
        if await h.executor.run(s, s.engine.client_sent(note.raw, parsed=note), got) and got.fwd is not None:
            await s.upstream.exchange(s, got.fwd, Capture(), ClientPost(up, target, False))
        self._by_key[key] = s.id
        log.info(
            "session held for 2026-07-28 clients",
            extra={"session_id": s.id, "app": app.metadata.name, "upstream_version": held.version},
        )
        return s


#: How long a 2026 request runs before the gateway watches its client's connection (a task per
#: request watched; a sweep every WATCH_AFTER starts them): most calls are over long before,
#: and a client that closes its stream earlier has its request cancelled within 2 x WATCH_AFTER
#: of its start.  Not shorter: under load (64 calls in flight on one core) calls take tens of
#: ms, and a timer and a watcher for each were much of what a 2026 call cost more than a
#: session's (docs/benchmarks.md).
WATCH_AFTER = 0.25


class _Watch:
    """Cancels the task that made it when its client goes (started late: see ``_forward``)."""

    def __init__(self, receive: Receive, answer: ModernAnswer) -> None:
        self.receive = receive
        self.answer = answer
        me = asyncio.current_task()
        assert me is not None
        self.me = me
        self.task: asyncio.Task[None] | None = None
        self.gone = False

    def start(self) -> None:
        self.task = asyncio.create_task(self._watch(), name="mcp2026-watch")

    async def _watch(self) -> None:
        await _disconnected(self.receive)
        if not self.answer.done:  # else: the answer is complete, which also reads as "gone"
            self.gone = True
            self.me.cancel()

    async def stop(self) -> None:
        await stop_tasks(self.task)


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (its response stream closed)."""
    while (await receive())["type"] != "http.disconnect":
        pass


# -------------------------------------------------------------- answers


class Capture(Answer):
    """An answer nobody reads on the wire: the messages are kept (the gateway's own requests)."""

    def __init__(self) -> None:
        super().__init__(_nowhere)
        self.status = 0
        self.messages: list[bytes] = []

    def result(self) -> dict[str, Any] | None:
        for raw in self.messages:
            with contextlib.suppress(orjson.JSONDecodeError):
                doc = orjson.loads(raw)
                result = doc.get("result") if isinstance(doc, dict) else None
                if isinstance(result, dict):
                    return result
        return None

    def last(self) -> dict[str, Any] | None:
        """The last JSON-RPC response collected (result or error), parsed."""
        for raw in reversed(self.messages):
            with contextlib.suppress(orjson.JSONDecodeError):
                doc = orjson.loads(raw)
                if isinstance(doc, dict) and ("result" in doc or "error" in doc):
                    return doc
        return None

    def error_text(self) -> str:
        for raw in self.messages:
            with contextlib.suppress(orjson.JSONDecodeError):
                doc = orjson.loads(raw)
                if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
                    return str(doc["error"].get("message", ""))[:200]
        return f"HTTP {self.status}" if self.status >= 400 else ""

    async def json(self, status: int, body: bytes) -> None:
        self.status = status
        self.messages.append(body)

    async def empty(self, status: int) -> None:
        self.status = status

    async def whole(self, status: int, headers: Headers, body: bytes) -> None:
        self.status = status
        self.messages.append(body)

    async def failed(self, status: int, body: bytes, origin: str) -> None:
        self.status = status
        self.messages.append(body)

    async def error(
        self, status: int, message: str, origin: str, *, code: int | None = None, mid: Any = None
    ) -> None:
        self.status = status
        self.messages.append(jsonrpc.error_response(mid, code or jsonrpc.INTERNAL_ERROR, message))

    async def start_sse(self) -> None:
        self.status = 200

    async def event(self, raw: bytes, *, id: str | None = None, event: str | None = "message") -> None:
        self.messages.append(raw)

    async def chunk(self, body: bytes) -> None:
        return None

    async def finish(self, body: bytes = b"") -> None:
        self.messages.extend(ev.data for ev in SSEParser().feed(body) if ev.data)


async def _nowhere(message: Any) -> None:
    return None


class ModernAnswer(Answer):
    """The answer to a 2026 client's request, written as 2026-07-28 writes it: its own id back,
    ``resultType`` and the caching hints on the result (``modern_result``); server-to-client
    requests (which a 2026 client cannot be sent) are not passed on: ``refuse`` answers the
    upstream for the client, so that the upstream goes on instead of waiting."""

    def __init__(
        self,
        send: Send,
        client_id: Any,
        upstream_id: str,
        method: str,
        refuse: Callable[[Any], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(self._send)
        self._out = send
        #: The answer's last bytes were handed to the server (nothing more is to come).
        self.done = False
        self.client_id = client_id
        self.upstream_id = upstream_id
        self.method = method
        self.refuse = refuse
        #: The id of a request of the upstream to the client seen by the last ``rewrite``.
        self.asked: Any = None
        #: The last ``rewrite`` was of the response; an SSE answer not begun yet; answered whole.
        self.final = False
        #: How the upstream's response to a non-cacheable method most often begins (the fast
        #: path of ``rewrite``: no parse, no re-serialisation).
        self._head = (
            None
            if method in wire.CACHEABLE
            else b'{"jsonrpc":"2.0","id":' + orjson.dumps(upstream_id) + b',"result":{'
        )
        self.deferred = False
        self.answered = False

    async def _send(self, message: Any) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            self.done = True
        await self._out(message)

    def rewrite(self, raw: bytes) -> bytes | None:
        head = self._head
        if (
            head is not None
            and raw.startswith(head)
            and raw[len(head) : len(head) + 1] == b'"'  # a non-empty result
            and b'"resultType"' not in raw
        ):
            # The common answer (SDK servers write this order): its id and ``resultType``
            # spliced in; the same JSON as the parse below makes, without parsing the result.
            self.final = True
            return b"".join(
                (
                    b'{"jsonrpc":"2.0","id":',
                    orjson.dumps(self.client_id),
                    b',"result":{"resultType":"complete",',
                    raw[len(head) :],
                )
            )
        self.final = False
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return raw
        if not isinstance(doc, dict):
            return raw
        if "method" in doc:
            if "id" in doc:  # a request to the client: it cannot be asked
                self.asked = doc["id"]
                return None
            return raw
        if doc.get("id") not in (self.upstream_id, None):
            return None
        self.final = True
        doc["id"] = self.client_id
        result = doc.get("result")
        if isinstance(result, dict):
            doc["result"] = wire.modern_result(self.method, result, CACHE_TTL_MS)
        return orjson.dumps(doc)

    async def json(self, status: int, body: bytes) -> None:
        out = self.rewrite(body)
        if out is None:
            await super().json(status, body)
        else:
            await self._json(status, out)

    async def _json(self, status: int, body: bytes) -> None:
        """A whole JSON answer; 2026-07-28: an error's HTTP status follows its code."""
        self.answered = True
        if status == 200 and b'"error"' in body:
            with contextlib.suppress(orjson.JSONDecodeError):
                error = orjson.loads(body).get("error")
                if isinstance(error, dict) and type(error.get("code")) is int:
                    status = wire.ERROR_STATUS.get(error["code"], 200)
        await super().json(status, body)

    async def failed(self, status: int, body: bytes, origin: str) -> None:
        out = self.rewrite(body)
        await super().failed(status, out if out is not None else body, origin)

    async def error(
        self, status: int, message: str, origin: str, *, code: int | None = None, mid: Any = None
    ) -> None:
        await super().error(status, message, origin, code=code, mid=self.client_id)

    async def whole(self, status: int, headers: Headers, body: bytes) -> None:
        if any(k == b"content-type" and v.split(b";")[0].strip() == JSON for k, v in headers):
            out = self.rewrite(body)
            body = out if out is not None else body
        await super().whole(status, headers, body)

    # An SSE answer is begun only with its first message that is not the response: a response
    # alone goes as JSON, with the status its error code calls for (as 2026 servers answer).

    async def start_sse(self) -> None:
        self.deferred = True

    async def _begin(self) -> None:
        if self.deferred:
            self.deferred = False
            await super().start_sse()

    async def event(self, raw: bytes, *, id: str | None = None, event: str | None = "message") -> None:
        if self.answered:
            return
        out = self.rewrite(raw)
        if out is not None:
            if self.deferred and self.final:
                await self._json(200, out)
                return
            await self._begin()
            await super().event(out, event=event)
        elif self.asked is not None:
            asked, self.asked = self.asked, None
            if self.refuse is not None:
                await self.refuse(asked)

    async def chunk(self, body: bytes) -> None:
        return None  # priming events and ids: 2026-07-28 streams are not resumed

    async def finish(self, body: bytes = b"") -> None:
        if self.answered:
            return
        parts = [self.rewrite(ev.data) for ev in SSEParser().feed(body) if ev.data] if body else []
        kept = [p for p in parts if p is not None]
        if self.deferred and len(kept) == 1 and self.final:
            await self._json(200, kept[0])
            return
        await self._begin()
        await super().finish(b"".join(encode_event(p, event="message") for p in kept))


class ListenAnswer(Answer):
    """A ``subscriptions/listen`` stream: the acknowledgement first, then only the notifications
    asked for (server-to-client requests and everything else dropped); the listen's result
    (with its subscription id) when the stream is ended from the upstream's side."""

    def __init__(self, send: Send, listen_id: Any, wanted: frozenset[str], honoured: dict[str, bool]) -> None:
        super().__init__(send)
        self.listen_id = listen_id
        self.wanted = wanted
        self.honoured = honoured
        self.tag = {"io.modelcontextprotocol/subscriptionId": listen_id}
        self.started = False
        self.finished = False
        #: The upstream answered the stream's request with something else than a stream.
        self.refused = False

    async def start_sse(self) -> None:
        if self.started:
            return
        self.started = True
        await super().start_sse()
        params = {"notifications": self.honoured, "_meta": self.tag}
        await super().event(jsonrpc.notification("notifications/subscriptions/acknowledged", params))

    async def event(self, raw: bytes, *, id: str | None = None, event: str | None = "message") -> None:
        with contextlib.suppress(orjson.JSONDecodeError):
            doc = orjson.loads(raw)
            if isinstance(doc, dict) and "id" not in doc and doc.get("method") in self.wanted:
                # Every frame of a listen stream names its subscription (the listen's id).
                params = doc.get("params")
                params = dict(params) if isinstance(params, dict) else {}
                meta = params.get("_meta")
                params["_meta"] = {**(meta if isinstance(meta, dict) else {}), **self.tag}
                doc["params"] = params
                await super().event(orjson.dumps(doc))

    async def chunk(self, body: bytes) -> None:
        return None

    async def finish(self, body: bytes = b"") -> None:
        if self.finished or not self.started:
            return
        self.finished = True
        meta = {"io.modelcontextprotocol/subscriptionId": self.listen_id}
        end = jsonrpc.result_response(self.listen_id, {"_meta": meta, "resultType": "complete"})
        await super().finish(encode_event(end, event="message"))

    # Not a stream (the upstream refused the GET): nothing is written; the caller holds the
    # acknowledged stream open itself.
    async def json(self, status: int, body: bytes) -> None:
        self.refused = True

    async def whole(self, status: int, headers: Headers, body: bytes) -> None:
        self.refused = True

    async def failed(self, status: int, body: bytes, origin: str) -> None:
        self.refused = True

    async def error(
        self, status: int, message: str, origin: str, *, code: int | None = None, mid: Any = None
    ) -> None:
        self.refused = True

    async def empty(self, status: int) -> None:
        self.refused = True
