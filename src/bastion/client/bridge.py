"""``bastion mcp connect``: a stdio MCP server that carries messages to one app through the proxy.

An MCP client (Claude Desktop, an IDE, the Inspector) starts ``bastion mcp connect
APP`` as its stdio server.  Every line the client writes on our stdin is one
JSON-RPC message; each becomes one POST to ``https://<proxy>/mcp/apps/<app>``
(streamable HTTP, whatever transport the app itself speaks), with the user's
bearer credential.  Answers -- a JSON body, or Server-Sent Events passed on event by
event as they arrive -- go back to the client, one message per line on stdout.
stdout carries nothing else: logs go to stderr.  Requests are concurrent (a slow
tool call does not hold up a ``ping``); notifications and responses are sent in
order before the next line is read, so ``notifications/initialized`` always
reaches the server before the requests that follow it.  Once the session is
initialised a GET stream carries the server's own messages (reopened with
backoff when it drops; a 405 means the server has none).  An answer stream that
ends or breaks before the answer, after events with ids, is resumed with a GET
carrying ``Last-Event-ID``, as the spec asks; a request whose answer is lost
midway is never sent twice (it may have run): it is answered with an error.

Staying up when the world changes
---------------------------------
The bridge caches the client's ``initialize`` request, its ``initialized``
notification and the ``serverInfo`` of the result.  When a message finds the
session gone -- the proxy was unreachable, answered 404 (session ended: the
gateway restarted, or the session idled out) -- it opens a new session by
replaying ``initialize`` (+ ``initialized``), and sends the message again, once
(only when no answer had started: the connection failed before any response, or the
gateway answered 404).
While the client's ``initialize`` goes unanswered for a while (a stdio server
starting), one line on stderr says so.
If the replayed ``serverInfo`` (name and version) differs, the server behind the
app is not the one the client negotiated with: the bridge refuses to go on and
answers every request with :data:`SERVER_CHANGED` until the client starts over.

The credential is re-checked before every request (the identity file or login
profile is re-read when it changed on disk), so a ``bastion login`` in a terminal
applies to a running bridge.  An expired credential is answered with
:data:`LOGIN_REQUIRED` and a message telling the user to log in -- the bridge
keeps running, and the next request after the login goes through (on a new
session, if the old one ended meanwhile).  A 401 after a new login renewed the
credential is retried once with the new one.

Errors the gateway reports (``X-Bastion-Error-Origin``) become JSON-RPC errors
naming the gateway's message and whose fault it is.  On stdin EOF, SIGINT or
SIGTERM the session is ended with a DELETE (best effort, short timeout) and the
process exits 0.

Layout: the :class:`Bridge` here (the client's messages, sessions, reconnection
and the GET stream, over an injected HTTP pool and credential source: testable
with fakes, no sockets) and :func:`run_stdio` (the stdio plumbing and signals).
Beside it: :mod:`~bastion.client.app_endpoint` (the POSTs, their answers and their
resumption; the HTTP seam), :mod:`~bastion.client.handshake` (:class:`InitCache`)
and :mod:`~bastion.client.rpc_errors` (the error answers), pure helpers with no
I/O; :mod:`~bastion.client.credentials` (the credential re-read from disk) and
:mod:`~bastion.client.stdio` (stdin and stdout).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Final

import orjson

from bastion.client.app_endpoint import (
    MIN_RETRY,
    SSE,
    AppEndpoint,
    Closing,
    Emit,
    Pool,
    PoolCache,
    Session,
    is_answer_to,
    one_line,
    parse_header,
)
from bastion.client.credentials import CredentialExpiredError, Credentials, TokenSource
from bastion.client.handshake import (
    InitCache,
    ServerIdentity,
    protocol_version_of,
    server_changed_message,
    server_identity,
)
from bastion.client.rpc_errors import (
    EXPIRED_MESSAGE,
    LOGIN_REQUIRED,
    PROXY_UNREACHABLE,
    SERVER_CHANGED,
    CredentialRenewed,
    Failure,
    SessionLost,
    body_says_expired,
    error_text,
    http_error,
    internal_message,
)
from bastion.client.slow import notice_if_slow, waiting_message
from bastion.client.stdio import MAX_LINE, Output, open_input, reserve_stdout
from bastion.errors import BastionError, UpstreamError
from bastion.protocol import jsonrpc
from bastion.protocol import modern as wire
from bastion.protocol.headers import NAME_PARAM, encode_header_value
from bastion.protocol.ndjson import LineSplitter
from bastion.protocol.sse import EventTooLargeError, SSEParser

__all__ = [
    "EXPIRED_MESSAGE",
    "LOGIN_REQUIRED",
    "MAX_LINE",
    "PROXY_UNREACHABLE",
    "SERVER_CHANGED",
    "Bridge",
    "CredentialExpiredError",
    "Credentials",
    "InitCache",
    "ServerIdentity",
    "body_says_expired",
    "http_error",
    "one_line",
    "parse_header",
    "reserve_stdout",
    "run_stdio",
    "server_changed_message",
    "server_identity",
]

log = logging.getLogger("bastion.mcp.connect")


def _modern_version(params: Any) -> str | None:
    """The 2026-07-28 (or later) version a request's ``params._meta`` names, else None."""
    meta = params.get("_meta") if isinstance(params, dict) else None
    version = meta.get(wire.META_VERSION) if isinstance(meta, dict) else None
    return version if isinstance(version, str) and version in wire.MODERN_VERSIONS else None


#: How long a notification or response from the client may take to be accepted.
NOTIFY_TIMEOUT: Final = 60.0
#: On stdin EOF, how long requests already sent may still finish.
EOF_GRACE: Final = 5.0
#: GET stream reopening: first delay, and the cap it doubles up to.
LISTEN_MIN_DELAY: Final = 0.5
LISTEN_MAX_DELAY: Final = 30.0


class Bridge:
    """Carries client messages to ``/mcp/apps/<app>`` and answers back; see the module docstring.

    ``emit`` writes one message (no newline) to the client; ``pool`` returns the
    HTTP pool to use for the next request; ``headers`` are the extra ``-H``
    headers.  Feed it client lines with :meth:`handle_line`; end with :meth:`aclose`.
    """

    def __init__(
        self,
        app: str,
        creds: TokenSource,
        pool: Callable[[], Pool],
        *,
        emit: Emit,
        headers: Sequence[tuple[str, str]] = (),
        on_output_closed: Callable[[], None] | None = None,
    ) -> None:
        self.app = app
        self.creds = creds
        self.endpoint = AppEndpoint(
            app, creds, pool, emit=self._emit, emit_message=self._emit_message, headers=headers
        )
        self._emit_raw = emit
        self._on_output_closed = on_output_closed
        self.cache = InitCache()
        self.session: Session | None = None
        #: Set when the server's identity changed: every request is refused with it.
        self.halted = ""
        self._lock = asyncio.Lock()
        self._generation = 0
        self._requests: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._closing = False
        #: ``--verbose`` has said that the client speaks 2026-07-28.
        self._told_modern = False

    # ---------------------------------------------------------------- input

    async def handle_line(self, line: bytes) -> None:
        """One message from the client.  Requests run concurrently; the rest in order."""
        try:
            msg = jsonrpc.parse_message(line)
        except jsonrpc.ProtocolError as e:
            log.warning("invalid message from the MCP client: %s", e.message)
            await self._emit(jsonrpc.error_response(e.id, e.rpc_code, e.message))
            return
        if msg.kind == jsonrpc.REQUEST:
            if msg.method == "initialize":
                await self._initialize(msg)
            elif _modern_version(msg.params) is not None:
                self._spawn(self._requests, self._modern(msg), f"mcp-connect-2026-{msg.id}")
            else:
                self._spawn(self._requests, self._request(msg), f"mcp-connect-request-{msg.id}")
            return
        if msg.method == "notifications/initialized":
            self.cache.initialized = msg.raw
        await self._deliver(msg)

    async def _request(self, msg: jsonrpc.Message) -> None:
        try:
            await self._forward(msg)
        except Failure as f:
            # A missing method is routine (the SDKs probe for server/discover first).
            level = logging.DEBUG if f.code == jsonrpc.METHOD_NOT_FOUND else logging.WARNING
            log.log(level, "request %s (%s) failed: %s", msg.id, msg.method, f.message)
            await self._emit(jsonrpc.error_response(msg.id, f.code, f.message))
        except Exception as e:  # a bug must not leave the client waiting forever
            log.exception("internal error while carrying request %s (%s)", msg.id, msg.method)
            await self._emit(jsonrpc.error_response(msg.id, jsonrpc.INTERNAL_ERROR, internal_message(e)))

    async def _modern(self, msg: jsonrpc.Message) -> None:
        """A self-contained request (MCP 2026-07-28: its envelope in ``params._meta``): sent on
        as one, with the version and routing headers made from its body; no session."""
        version = _modern_version(msg.params) or ""
        if not self._told_modern:
            self._told_modern = True
            log.info(
                "the MCP client speaks %s (no session); requests go to %s as such through %s",
                version,
                self.app,
                self.creds.proxy,
            )
        method = msg.method or ""
        routing = [(b"mcp-protocol-version", version.encode("latin-1")), (b"mcp-method", method.encode())]
        key = NAME_PARAM.get(method)
        name = msg.params.get(key) if key and isinstance(msg.params, dict) else None
        if isinstance(name, str):
            routing.append((b"mcp-name", encode_header_value(name).encode("latin-1")))
        renewed = False
        try:
            while True:
                try:
                    await self.endpoint.exchange(msg.raw, msg.id, None, routing)
                    return
                except CredentialRenewed:
                    if renewed:
                        raise Failure(LOGIN_REQUIRED, EXPIRED_MESSAGE) from None
                    renewed = True
                except SessionLost as e:
                    raise Failure(e.code, e.message) from None
        except Failure as f:
            log.warning("request %s (%s) failed: %s", msg.id, msg.method, f.message)
            await self._emit(jsonrpc.error_response(msg.id, f.code, f.message))
        except Exception as e:  # a bug must not leave the client waiting forever
            log.exception("internal error while carrying request %s (%s)", msg.id, msg.method)
            await self._emit(jsonrpc.error_response(msg.id, jsonrpc.INTERNAL_ERROR, internal_message(e)))

    async def _deliver(self, msg: jsonrpc.Message) -> None:
        what = f"notification {msg.method}" if msg.method else f"response to server request {msg.id}"
        try:
            async with asyncio.timeout(NOTIFY_TIMEOUT):
                await self._forward(msg)
        except Failure as f:
            log.warning("%s from the MCP client was not delivered: %s", what, f.message)
        except TimeoutError:
            log.warning("%s from the MCP client was not delivered: no answer in %gs", what, NOTIFY_TIMEOUT)
        except Exception:
            log.exception("internal error: %s from the MCP client was not delivered", what)
        else:
            if msg.method == "notifications/initialized" and self.session is not None:
                self._start_listener(self.session)

    # ---------------------------------------------------------------- output

    async def _emit(self, raw: bytes) -> None:
        try:
            await self._emit_raw(raw)
        except (OSError, RuntimeError) as e:  # the client closed our stdout
            log.info("the MCP client stopped reading: %s", e)
            if self._on_output_closed is not None:
                self._on_output_closed()

    async def _emit_message(self, data: bytes, want: jsonrpc.RequestId = None) -> bool:
        """Pass one server message on; True if it is the answer to request ``want``."""
        parsed = one_line(data)
        if parsed is None:
            log.warning("dropped a message from the server that is not a JSON object: %.200r", data)
            return False
        raw, obj = parsed
        await self._emit(raw)
        return is_answer_to(obj, want)

    # ------------------------------------------------------------- sessions

    async def _initialize(self, msg: jsonrpc.Message) -> None:
        async with self._lock:
            old = self.session
            if old is not None:
                self._lose(old, "the MCP client started a new session")
                self._spawn(self._background, self.endpoint.delete(old), "mcp-connect-delete")
            self.session = None
            self.halted = ""
            self.cache.start(msg)
            try:
                with notice_if_slow(lambda: log.info("%s", waiting_message(self.app))):
                    answer, sid = await self.endpoint.open(msg, relay=True)
            except Failure as f:
                self.cache.reset()
                log.error("cannot open a session with %s: %s", self.app, f.message)
                await self._emit(jsonrpc.error_response(msg.id, f.code, f.message))
                return
            except Exception as e:
                self.cache.reset()
                log.exception("internal error while opening a session with %s", self.app)
                await self._emit(jsonrpc.error_response(msg.id, jsonrpc.INTERNAL_ERROR, internal_message(e)))
                return
            raw, obj = answer
            result = obj.get("result")
            if isinstance(result, dict):
                self.cache.accepted(result)
                self._generation += 1
                self.session = Session(sid, self.cache.protocol_version, self._generation)
                log.info(
                    "connected to %s (server %s, protocol %s) through %s",
                    self.app,
                    self.cache.server or "unknown",
                    self.cache.protocol_version or "?",
                    self.creds.proxy,
                )
            else:
                self.cache.reset()
            await self._emit(raw)

    async def _usable_session(self) -> Session | None:
        sess = self.session
        if sess is None or not sess.gone:
            return sess
        async with self._lock:
            sess = self.session
            if sess is None or not sess.gone:
                return sess
            if self.halted:
                raise Failure(SERVER_CHANGED, self.halted)
            new = await self._replay(sess)
            self.session = new
            return new

    async def _replay(self, old: Session) -> Session:
        init = self.cache.request
        assert init is not None  # a session exists only after the client's initialize
        log.info("reconnecting: %s; replaying initialize", old.gone)
        (_, obj), sid = await self.endpoint.open(init, relay=False)
        result = obj.get("result")
        if not isinstance(result, dict):
            raise Failure(
                jsonrpc.INTERNAL_ERROR,
                f"could not reopen a session with {self.app}: the MCP server refused initialize: "
                f"{error_text(orjson.dumps(obj))}",
            )
        new = Session(sid, protocol_version_of(result) or old.protocol_version, self._generation + 1)
        changed = self.cache.changed(self.app, result)
        if changed:
            self.halted = changed
            log.error("%s", changed)
            self._spawn(self._background, self.endpoint.delete(new), "mcp-connect-delete")
            raise Failure(SERVER_CHANGED, changed)
        self._generation = new.generation
        if self.cache.initialized is not None:
            try:
                await self.endpoint.exchange(self.cache.initialized, None, new)
            except Failure as f:
                log.warning("replayed notifications/initialized was not accepted: %s", f.message)
            except CredentialRenewed:
                log.warning("replayed notifications/initialized was refused (401)")
        self._start_listener(new)
        log.info("reconnected to %s (server %s)", self.app, self.cache.server or "unknown")
        return new

    def _lose(self, sess: Session, reason: str) -> None:
        if sess.gone:
            return
        sess.gone = reason
        task = sess.listener
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    # ------------------------------------------------------------ forwarding

    async def _forward(self, msg: jsonrpc.Message) -> None:
        """Carry one message, reconnecting once and following one credential renewal."""
        reconnected = renewed = False
        while True:
            if self.halted:
                raise Failure(SERVER_CHANGED, self.halted)
            sess = await self._usable_session()
            try:
                await self.endpoint.exchange(msg.raw, msg.id if msg.kind == jsonrpc.REQUEST else None, sess)
                return
            except SessionLost as e:
                if sess is None or not sess.id or reconnected or self.cache.request is None:
                    raise Failure(e.code, e.message) from None
                reconnected = True
                self._lose(sess, e.message)
            except CredentialRenewed:
                if renewed:
                    raise Failure(LOGIN_REQUIRED, EXPIRED_MESSAGE) from None
                renewed = True
                log.info("credential renewed by a new login: sending again")

    # ----------------------------------------------------------- GET stream

    def _start_listener(self, sess: Session) -> None:
        if sess.listener is None and not sess.gone and not self._closing:
            sess.listener = self._spawn(
                self._background, self._listen(sess), f"mcp-connect-listen-{sess.generation}"
            )

    async def _listen(self, sess: Session) -> None:
        """The server→client stream of a session: relayed as it comes, reopened with backoff."""
        delay = LISTEN_MIN_DELAY
        last_id = ""
        while not (sess.gone or self._closing or self.halted):
            wait = delay
            delay = min(delay * 2, LISTEN_MAX_DELAY)
            try:
                token = self.endpoint.token()
                resp = await self.endpoint.request(
                    "GET",
                    self.endpoint.headers(token, sess, accept=b"text/event-stream", last_id=last_id),
                )
                async with Closing(resp):
                    if resp.status == 405:
                        log.info("%s offers no server-to-client stream (405); not listening", self.app)
                        return
                    if resp.status == 404 and sess.id:
                        self._lose(sess, f"the gateway ended the session with {self.app}")
                        return
                    if resp.status != 200 or resp.content_type != SSE:
                        _, text = await self.endpoint.http_error(resp)
                        log.warning("cannot open the server-to-client stream: %s", text)
                    else:
                        log.debug("server-to-client stream open")
                        delay = wait = LISTEN_MIN_DELAY
                        parser = SSEParser()
                        async for chunk in resp.iter_chunks():
                            for ev in parser.feed(chunk):
                                if ev.id is not None:
                                    last_id = ev.id
                                if ev.retry is not None:
                                    wait = max(ev.retry / 1000, MIN_RETRY)  # the server's reconnection delay
                                if ev.data:
                                    await self._emit_message(ev.data)
                        log.debug("server-to-client stream ended")
            except Failure as f:
                log.debug("server-to-client stream waits: %s", f.message)
                if f.code == LOGIN_REQUIRED:
                    wait = LISTEN_MAX_DELAY
            except (UpstreamError, EventTooLargeError) as e:
                log.debug("server-to-client stream dropped: %s", e.message)
            if sess.gone or self._closing or self.halted:
                return
            await asyncio.sleep(wait)  # backoff before reopening

    # ---------------------------------------------------------------- misc

    def _spawn(
        self, owner: set[asyncio.Task[None]], coro: Coroutine[Any, Any, None], name: str
    ) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        owner.add(task)
        task.add_done_callback(owner.discard)
        task.add_done_callback(_log_failure)
        return task

    async def wait_idle(self) -> None:
        """Return once no request is in flight (bound it with ``asyncio.timeout``)."""
        while self._requests:
            await asyncio.wait(set(self._requests))

    async def aclose(self, *, grace: float = 0.0) -> None:
        """Stop: let requests in flight finish for ``grace`` seconds, then end the session."""
        if grace > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self.wait_idle()
        self._closing = True
        sess = self.session
        tasks = {*self._requests, *self._background}  # the GET stream is in _background
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if sess is not None and not sess.gone:
            await self.endpoint.delete(sess)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("internal error in %s", task.get_name(), exc_info=task.exception())


# ------------------------------------------------------------------ stdio


async def _pump(reader: asyncio.StreamReader, bridge: Bridge) -> None:
    splitter = LineSplitter(MAX_LINE)
    while True:
        chunk = await reader.read(1 << 16)
        if not chunk:
            for line in splitter.finish():
                await bridge.handle_line(line)
            return
        for line in splitter.feed(chunk):
            await bridge.handle_line(line)


async def run_stdio(
    app: str,
    creds: Credentials,
    *,
    headers: Sequence[tuple[str, str]] = (),
    insecure: bool = False,
    in_fd: int = 0,
    out_fd: int = 1,
) -> int:
    """Serve the client on ``in_fd``/``out_fd`` until EOF or SIGINT/SIGTERM; the exit status."""
    loop = asyncio.get_running_loop()
    pools = PoolCache(creds, insecure=insecure)
    output = Output(out_fd)
    await output.open()
    reader = await open_input(in_fd)
    stop = asyncio.Event()
    bridge = Bridge(app, creds, pools.current, emit=output.write, headers=headers, on_output_closed=stop.set)
    signals: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            signals.append(sig)
    pump = asyncio.create_task(_pump(reader, bridge), name="mcp-connect-stdin")
    stopper = asyncio.create_task(stop.wait(), name="mcp-connect-stop")
    log.info("serving MCP app %s on stdio through %s", app, creds.proxy)
    rc = 0
    eof = False
    try:
        await asyncio.wait({pump, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if pump.done() and not pump.cancelled():
            exc = pump.exception()
            if exc is not None:
                log.error("stopping: %s", exc if isinstance(exc, BastionError) else repr(exc))
                rc = 1
            else:
                eof = True
                log.info("the MCP client closed stdin; ending the session")
        else:
            log.info("stopping on a signal; ending the session")
    finally:
        for t in (pump, stopper):
            t.cancel()
        await asyncio.gather(pump, stopper, return_exceptions=True)
        await bridge.aclose(grace=EOF_GRACE if eof else 0.0)
        await pools.aclose()
        output.close()
        for sig in signals:
            loop.remove_signal_handler(sig)
    return rc
