"""Upstreams that speak only MCP 2026-07-28, behind ordinary gateway sessions (decision 0047).

A gateway session is a handshake-era conversation (its client's, or the one the gateway holds
for 2026 clients, ``modern.py``).  When the app's server speaks only 2026-07-28,
:class:`ModernUpstream` wraps the session's upstream (streamable HTTP or a stdio process) and
turns each message the engine forwards into what that server understands:

- ``initialize`` becomes ``server/discover`` (same id, so the engine matches and audits it as
  the initialize it is); its result is answered to the client as an ``initialize`` result (the
  version the client asked for if the gateway speaks it, the server's capabilities, name and
  instructions);  the session's client name and capabilities are kept for every later request;
- every other request goes as a self-contained request: the envelope (2026-07-28, the
  session's client name and capabilities) in ``params._meta``, and over HTTP the
  ``MCP-Protocol-Version``/``Mcp-Method``/``Mcp-Name`` headers the gateway makes from the very
  body it forwards;
- what 2026 removed is answered by the gateway: ``ping`` and ``logging/setLevel`` with ``{}``
  (the level then travels as each request's log-level opt-in), resource subscriptions with
  -32601; client notifications are acknowledged and not sent (2026 has none);
  ``notifications/cancelled`` stops the cancelled request's exchange (closing its stream is
  how 2026 cancels).

Which servers speak what is decided per app (``app.spec.protocol``): ``auto`` probes a
streamable-HTTP server once per app definition (:class:`Eras`); stdio servers are
handshake-era unless pinned to ``2026-07-28``.  The wrapping happens once, when a session
opens: sessions on handshake-era upstreams never pass through here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
from starlette.types import Receive

from bastion.answers import Answer
from bastion.appservice.executor import Collected, Executor
from bastion.appservice.modern import Capture
from bastion.appservice.stream_upstream import StreamUpstream
from bastion.appservice.upstream import ClientPost, Upstream
from bastion.errors import UpstreamError
from bastion.protocol import jsonrpc
from bastion.protocol import modern as wire
from bastion.protocol.headers import NAME_PARAM, encode_header_value
from bastion.resources import App
from bastion.session.engine import ForwardToUpstream, SendToClient
from bastion.transport.http import HTTPUpstreamPool

if TYPE_CHECKING:
    from bastion.appservice.sessions import GatewaySession

log = logging.getLogger("bastion.app")

MODERN = "2026-07-28"
HANDSHAKE = "handshake"
#: How long the probe of an upstream's era may take before the gateway assumes the handshake.
PROBE_TIMEOUT = 5.0
#: How long a failed probe's answer (the handshake) stands before the app is probed again.
PROBE_RETRY = 300.0
_LOG_LEVEL_KEY = "io.modelcontextprotocol/logLevel"


class Eras:
    """Which era each app's upstream speaks, probed once per app definition (``auto``)."""

    def __init__(self) -> None:
        #: app name -> (the app probed, its era, until when the answer stands: monotonic)
        self._known: dict[str, tuple[App, str, float]] = {}

    def pinned(self, app: App) -> str | None:
        """The era without asking the server: pinned in the app, stdio, or probed already."""
        pin = app.spec.protocol
        if pin != "auto":
            return MODERN if pin == MODERN else HANDSHAKE
        if app.spec.transport != "http":
            return HANDSHAKE  # a stdio or SSE server is not sent what it may not understand
        known = self._known.get(app.metadata.name)
        if known is not None and (known[0] is app or known[0] == app) and time.monotonic() < known[2]:
            return known[1]
        return None

    async def era(
        self, app: App, pool: HTTPUpstreamPool, path: str, headers: list[tuple[bytes, bytes]]
    ) -> str:
        """The era of a streamable-HTTP app's server: 2026-07-28 only when it answers
        ``server/discover`` *and* refuses a handshake-era request with -32022 naming no
        handshake version (servers that speak both are served in the handshake era: nothing
        is lost in translation there)."""
        era = self.pinned(app)
        if era is None:
            until = float("inf")
            try:
                era = await asyncio.wait_for(_probe(pool, path, headers), PROBE_TIMEOUT)
            except (TimeoutError, UpstreamError, ValueError) as e:
                # Not known: the handshake, as before this gateway spoke 2026; asked again later
                # (not on every session: a server that hangs would delay each by the timeout).
                log.info(
                    "era probe failed; assuming the handshake",
                    extra={"app": app.metadata.name, "error": str(e)},
                )
                era, until = HANDSHAKE, time.monotonic() + PROBE_RETRY
            self._known[app.metadata.name] = (app, era, until)
            log.info("upstream era", extra={"app": app.metadata.name, "era": era})
        return era


async def _probe(pool: HTTPUpstreamPool, path: str, headers: list[tuple[bytes, bytes]]) -> str:
    meta = {wire.META_VERSION: MODERN, wire.META_CAPABILITIES: {}, wire.META_CLIENT_INFO: _PROBE_CLIENT}
    discover = orjson.dumps(
        {"jsonrpc": "2.0", "id": "bastion-probe", "method": "server/discover", "params": {"_meta": meta}}
    )
    base = [
        *headers,
        (b"content-type", b"application/json"),
        (b"accept", b"application/json, text/event-stream"),
    ]
    doc = await _exchange(
        pool,
        path,
        [*base, (b"mcp-protocol-version", MODERN.encode()), (b"mcp-method", b"server/discover")],
        discover,
    )
    result = doc.get("result") if doc else None
    if not isinstance(result, dict) or MODERN not in (result.get("supportedVersions") or ()):
        return HANDSHAKE
    if any(v in wire.HANDSHAKE_VERSIONS for v in result.get("supportedVersions") or ()):
        return HANDSHAKE
    # Speaks 2026; does it refuse the handshake?  A request of that era without a session:
    # a server that speaks both answers or asks for a session, a 2026-only one says -32022.
    older = orjson.dumps({"jsonrpc": "2.0", "id": "bastion-probe", "method": "tools/list"})
    doc = await _exchange(
        pool, path, [*base, (b"mcp-protocol-version", wire.LATEST_HANDSHAKE.encode())], older
    )
    error = doc.get("error") if doc else None
    if isinstance(error, dict) and error.get("code") == jsonrpc.UNSUPPORTED_PROTOCOL_VERSION:
        data = error.get("data")
        supported = data.get("supported") if isinstance(data, dict) else None
        if not isinstance(supported, list) or not any(v in wire.HANDSHAKE_VERSIONS for v in supported):
            return MODERN
    return HANDSHAKE


_PROBE_CLIENT = {"name": "bastion-gateway", "version": "probe"}


async def _exchange(
    pool: HTTPUpstreamPool, path: str, headers: list[tuple[bytes, bytes]], body: bytes
) -> dict[str, Any] | None:
    """One probe POST: its JSON-RPC answer (JSON or the last SSE message), or None."""
    resp = await pool.request("POST", path, headers, body)
    try:
        data = await resp.read()
    finally:
        resp.close()
    text = data
    if data[:6] == b"event:" or data[:5] in (b"data:", b"id: ", b"id:") or b"\ndata:" in data[:200]:
        lines = [ln[5:].strip() for ln in data.splitlines() if ln.startswith(b"data:")]
        text = lines[-1] if lines else b""
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


class ModernUpstream:
    """The upstream of one session whose server speaks only 2026-07-28 (see the module docstring)."""

    def __init__(self, inner: Upstream, ex: Executor) -> None:
        self.inner = inner
        self.ex = ex
        #: The session's client, as its initialize said (sent with every request).
        self.client_info: dict[str, Any] = {"name": "mcp-client", "version": "0"}
        self.capabilities: dict[str, Any] = {}
        self.log_level: str | None = None
        #: Requests being exchanged, by the engine's id: a cancel stops one.
        self.running: dict[Any, asyncio.Task[None]] = {}
        #: The ``Mcp-Param-*`` annotations of the tools this session listed, by tool name.
        self.params: dict[str, dict[tuple[str, ...], str]] = {}
        #: As the inner upstream (a stream's reader hands messages over with their commit).
        self.defers: bool = inner.defers

    # -------------------------------------------------------- delegated

    @property
    def busy(self) -> bool:
        return self.inner.busy

    async def start(self, s: GatewaySession) -> None:
        await self.inner.start(s)

    async def listen(
        self, s: GatewaySession, answer: Answer, receive: Receive, headers: dict[bytes, bytes]
    ) -> None:
        await self.inner.listen(s, answer, receive, self._headers(headers, "", None))

    async def client_ended(self, s: GatewaySession, headers: dict[bytes, bytes]) -> None:
        return None  # no session upstream to end

    def to_client(self, cmd: SendToClient) -> None:
        self.inner.to_client(cmd)

    def to_client_after(self, barrier: asyncio.Future[None], cmd: SendToClient) -> None:
        self.inner.to_client_after(barrier, cmd)

    def forward(self, cmd: ForwardToUpstream) -> None:
        self.inner.forward(cmd)

    async def stop(self, s: GatewaySession) -> None:
        await self.inner.stop(s)

    async def release(self, s: GatewaySession, reason: str) -> None:
        await self.inner.release(s, reason)

    # ------------------------------------------------------------ exchange

    async def exchange(
        self, s: GatewaySession, fwd: ForwardToUpstream, answer: Answer, post: ClientPost
    ) -> None:
        msg = fwd.message
        method = msg.method or ""
        if msg.kind != "request":
            if method == "notifications/cancelled" and msg.params is not None:
                task = self.running.get(msg.params.get("requestId"))
                if task is not None:
                    task.cancel()  # over HTTP, closing the request's stream is the cancel
                if isinstance(self.inner, StreamUpstream):  # over stdio, the notification is
                    await self.inner.exchange(s, fwd, answer, post)
                    return
            await answer.empty(202)  # 2026-07-28 has no other client notifications, nor responses
            return
        params = msg.params or {}
        if method == "initialize":
            await self._initialize(s, msg, params, answer, post)
            return
        if method in ("ping", "logging/setLevel"):
            if method == "logging/setLevel" and isinstance(params.get("level"), str):
                self.log_level = params["level"]
            await self._answer(s, answer, jsonrpc.result_response(msg.id, {}))
            return
        if method in ("resources/subscribe", "resources/unsubscribe"):
            text = f"{method} is not offered by this app's MCP server (it speaks only MCP 2026-07-28)"
            await self._answer(s, answer, jsonrpc.error_response(msg.id, jsonrpc.METHOD_NOT_FOUND, text))
            return
        sent = self._modern(msg, method, params)
        up = self._post(post, method, params)
        if method == "tools/list":
            answer = _ToolSchemas(answer, self.params)
        elif method == "tools/call":
            name = params.get("name")
            known = self.params.get(name) if isinstance(name, str) else None
            if known:
                up.headers.update(wire.param_headers(known, params.get("arguments")))
        task = asyncio.create_task(
            self.inner.exchange(s, sent, answer, up),
            name=f"mcp2026-up-{s.id[:8]}",
        )
        self.running[msg.id] = task
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.cancelled():  # this POST itself was cancelled: so is its exchange
                task.cancel()
                raise
            # Cancelled by the client's notifications/cancelled: its audit row is completed
            # already; the POST is told, though its client SHOULD NOT wait for it.
            with contextlib.suppress(Exception):
                await answer.error(200, "request cancelled by the client", "client", mid=msg.id)
        finally:
            if self.running.get(msg.id) is task:
                del self.running[msg.id]

    async def _initialize(
        self,
        s: GatewaySession,
        msg: jsonrpc.Message,
        params: dict[str, Any],
        answer: Answer,
        post: ClientPost,
    ) -> None:
        info, caps = params.get("clientInfo"), params.get("capabilities")
        if isinstance(info, dict):
            self.client_info = info
        if isinstance(caps, dict):
            self.capabilities = {k: v for k, v in caps.items() if k not in wire.UNBRIDGED_CAPABILITIES}
        asked = params.get("protocolVersion")
        version = (
            asked if isinstance(asked, str) and asked in wire.HANDSHAKE_VERSIONS else wire.LATEST_HANDSHAKE
        )
        discover = self._modern(msg, "server/discover", {})
        got = Capture()
        await self.inner.exchange(s, discover, got, self._post(post, "server/discover", {}))
        doc = got.last()
        result = doc.get("result") if doc is not None else None
        if not isinstance(result, dict):
            body = orjson.dumps(doc) if doc is not None else None
            if body is None:
                body = jsonrpc.error_response(
                    msg.id, jsonrpc.INTERNAL_ERROR, "the upstream MCP server did not answer server/discover"
                )
            await answer.failed(got.status if got.status >= 400 else 502, body, "upstream")
            return
        meta = result.get("_meta")
        server = meta.get("io.modelcontextprotocol/serverInfo") if isinstance(meta, dict) else None
        init: dict[str, Any] = {
            "protocolVersion": version,
            "capabilities": result.get("capabilities")
            if isinstance(result.get("capabilities"), dict)
            else {},
            "serverInfo": server
            if isinstance(server, dict)
            else {"name": s.app.metadata.name, "version": ""},
        }
        if isinstance(result.get("instructions"), str):
            init["instructions"] = result["instructions"]
        await answer.json(200, jsonrpc.result_response(msg.id, init))

    async def _answer(self, s: GatewaySession, answer: Answer, raw: bytes) -> None:
        """Answer a request the gateway answers for the server, through the engine (audited)."""
        got = Collected()
        await self.ex.upstream_sent(s, raw, got)
        if got.replies:
            await answer.json(200, got.replies[0].raw)
        else:
            await answer.empty(202)

    def _modern(self, msg: jsonrpc.Message, method: str, params: dict[str, Any]) -> ForwardToUpstream:
        """``msg`` as a self-contained 2026 request: the session's envelope in ``_meta``."""
        out = dict(params)
        meta = out.get("_meta")
        meta = dict(meta) if isinstance(meta, dict) else {}
        meta[wire.META_VERSION] = MODERN
        meta[wire.META_CLIENT_INFO] = self.client_info
        meta[wire.META_CAPABILITIES] = self.capabilities
        if self.log_level is not None and _LOG_LEVEL_KEY not in meta:
            meta[_LOG_LEVEL_KEY] = self.log_level
        out["_meta"] = meta
        body = {"jsonrpc": "2.0", "id": msg.id, "method": method, "params": out}
        raw = orjson.dumps(body)
        return ForwardToUpstream(raw, jsonrpc.Message(raw, "request", msg.id, method, out, body))

    @staticmethod
    def _post(post: ClientPost, method: str, params: dict[str, Any]) -> ClientPost:
        return ClientPost(ModernUpstream._headers(post.headers, method, params), post.target, False)

    @staticmethod
    def _headers(
        headers: dict[bytes, bytes], method: str, params: dict[str, Any] | None
    ) -> dict[bytes, bytes]:
        """The client's headers for a 2026 server: the mirrored ones made from the body sent."""
        out = {k: v for k, v in headers.items() if not k.startswith(b"mcp-")}
        out[b"mcp-protocol-version"] = MODERN.encode()
        if method:
            out[b"mcp-method"] = encode_header_value(method).encode()
            key = NAME_PARAM.get(method)
            value = params.get(key) if key and params is not None else None
            if isinstance(value, str):
                out[b"mcp-name"] = encode_header_value(value).encode()
        return out


class _ToolSchemas(Answer):
    """Passes a ``tools/list`` answer on unchanged, noting each tool's ``x-mcp-header``
    annotations (bounded), so that calls carry the ``Mcp-Param-*`` headers the server expects."""

    _MAX_TOOLS = 4096

    def __init__(self, inner: Answer, params: dict[str, dict[tuple[str, ...], str]]) -> None:
        super().__init__(inner.send, inner.extra)
        self.inner = inner
        self.params = params

    def _note(self, raw: bytes) -> None:
        with contextlib.suppress(orjson.JSONDecodeError):
            doc = orjson.loads(raw)
            result = doc.get("result") if isinstance(doc, dict) else None
            tools = result.get("tools") if isinstance(result, dict) else None
            for tool in tools if isinstance(tools, list) else ():
                name = tool.get("name") if isinstance(tool, dict) else None
                if isinstance(name, str) and (name in self.params or len(self.params) < self._MAX_TOOLS):
                    self.params[name] = wire.param_header_map(tool.get("inputSchema"))

    async def json(self, status: int, body: bytes) -> None:
        self._note(body)
        await self.inner.json(status, body)

    async def event(self, raw: bytes, *, id: str | None = None, event: str | None = "message") -> None:
        self._note(raw)
        await self.inner.event(raw, id=id, event=event)

    async def empty(self, status: int) -> None:
        await self.inner.empty(status)

    async def whole(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        await self.inner.whole(status, headers, body)

    async def failed(self, status: int, body: bytes, origin: str) -> None:
        await self.inner.failed(status, body, origin)

    async def error(
        self, status: int, message: str, origin: str, *, code: int | None = None, mid: Any = None
    ) -> None:
        await self.inner.error(status, message, origin, code=code, mid=mid)

    async def start_sse(self) -> None:
        await self.inner.start_sse()

    async def chunk(self, body: bytes) -> None:
        await self.inner.chunk(body)

    async def finish(self, body: bytes = b"") -> None:
        await self.inner.finish(body)
