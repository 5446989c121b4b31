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

Layout: pure helpers and :class:`InitCache` (no I/O, unit-tested), the
:class:`Bridge` (message handling over an injected HTTP pool and credential
source: testable with fakes, no sockets), and :func:`run_stdio` (the stdio
plumbing and signals).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import stat
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NamedTuple, Protocol
from urllib.parse import quote

import orjson

from bastion._time import utcnow
from bastion.client import profile as profiles
from bastion.client.local_proxy import CredentialSource
from bastion.errors import AuthenticationError, BastionError, UpstreamError
from bastion.protocol import jsonrpc
from bastion.protocol.ndjson import LineSplitter
from bastion.protocol.sse import EventTooLargeError, SSEParser
from bastion.transport.http import HTTPUpstreamPool, UpstreamTimeoutError

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

# JSON-RPC codes of the bridge's own answers.  -32001 is the SDKs' RequestTimeout
# (and the gateway's "session not found"); -32050..-32052 are the gateway's (see
# bastion.protocol.jsonrpc), so the bridge continues from -32053.

#: The bastion credential expired (or there is none): run ``bastion login``; no restart needed.
LOGIN_REQUIRED: Final = -32053
#: The MCP server behind the app changed identity across a reconnection: restart the client.
SERVER_CHANGED: Final = -32054
#: The bastion proxy could not be reached (or the connection broke mid-answer).
PROXY_UNREACHABLE: Final = -32055

EXPIRED_MESSAGE: Final = (
    "your bastion credential expired: run `bastion login` in a terminal; "
    "there is no need to restart your MCP client"
)

#: Longest message accepted from the client (one line of stdin).
MAX_LINE: Final = 16 * 1024 * 1024

_ACCEPT_BOTH: Final = b"application/json, text/event-stream"
_SSE: Final = "text/event-stream"
_JSON: Final = "application/json"
_ORIGIN_HEADER: Final = b"x-bastion-error-origin"
#: Error bodies are read for their message only.
_MAX_ERROR_BODY: Final = 64 * 1024
#: How long a notification or response from the client may take to be accepted.
NOTIFY_TIMEOUT: Final = 60.0
#: How long the best-effort DELETE of a session may take.
DELETE_TIMEOUT: Final = 2.0
#: On stdin EOF, how long requests already sent may still finish.
EOF_GRACE: Final = 5.0
#: GET stream reopening: first delay, and the cap it doubles up to.
LISTEN_MIN_DELAY: Final = 0.5
LISTEN_MAX_DELAY: Final = 30.0
#: Resuming a POST's SSE stream with Last-Event-ID: attempts without progress.
RESUME_ATTEMPTS: Final = 3
#: The shortest reconnection delay honoured from an SSE ``retry`` field (no busy loops).
MIN_RETRY: Final = 0.1

# Headers the bridge sets itself: ``-H`` may not replace them.
_RESERVED_HEADERS: Final = frozenset(
    {
        "authorization",
        "accept",
        "content-type",
        "content-length",
        "transfer-encoding",
        "connection",
        "host",
        "mcp-session-id",
        "mcp-protocol-version",
        "last-event-id",
    }
)
_TOKEN_CHARS: Final = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


# ------------------------------------------------------------------ pure helpers


def parse_header(text: str) -> tuple[str, str]:
    """``"Name: value"`` → ``("Name", "value")``; ``ValueError`` saying why if malformed or reserved."""
    name, colon, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not colon or not name:
        raise ValueError(f'malformed header {text!r}: use "Name: value"')
    if not set(name) <= _TOKEN_CHARS:
        raise ValueError(f"malformed header {text!r}: {name!r} is not a valid header name")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value) or not value.isascii():
        raise ValueError(f"malformed header {text!r}: the value must be printable ASCII")
    if name.lower() in _RESERVED_HEADERS:
        raise ValueError(f"header {name!r} is set by `bastion mcp connect` itself and cannot be overridden")
    return name, value


class ServerIdentity(NamedTuple):
    """What ``serverInfo`` says the server is; compared across reconnections."""

    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name or '(unnamed)'} {self.version or '(no version)'}"


def server_identity(result: Any) -> ServerIdentity | None:
    """The ``serverInfo`` name and version of an ``initialize`` result (``None`` if it has none)."""
    if not isinstance(result, dict):
        return None
    info = result.get("serverInfo")
    if not isinstance(info, dict):
        return None
    name, version = info.get("name"), info.get("version")
    return ServerIdentity(name if isinstance(name, str) else "", version if isinstance(version, str) else "")


def server_changed_message(app: str, old: ServerIdentity | None, new: ServerIdentity | None) -> str:
    return (
        f"the MCP server behind {app} changed (was {old or 'unknown'}, now {new or 'unknown'}); "
        "restart your MCP client"
    )


def body_says_expired(body: bytes) -> bool:
    """True if an error body (JSON or text) says the credential expired."""
    return "expired" in _error_text(body).lower()


def _error_text(body: bytes) -> str:
    """The human message in an error body: JSON-RPC or ``{"error": {...}}`` JSON, else the text."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace").strip()[:500]
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if isinstance(obj.get("message"), str):
            return str(obj["message"])
    return body.decode("utf-8", "replace").strip()[:500]


def _fault(origin: str, app: str) -> str:
    if origin == "client":
        return "the request or your access rights (client side)"
    if origin == "gateway":
        return "the bastion gateway"
    if origin == "upstream":
        return f"the MCP server behind {app}"
    return "unknown"


def http_error(app: str, status: int, origin: str, body: bytes) -> tuple[int, str]:
    """The JSON-RPC (code, message) answering a request the gateway refused with HTTP ``status``.

    The message keeps the gateway's own words and says whose fault it is
    (``X-Bastion-Error-Origin``).  The code is the one in a JSON-RPC error body,
    else -32600 for the client's faults and -32603 for the others.
    """
    code: int | None = None
    with contextlib.suppress(orjson.JSONDecodeError):
        obj = orjson.loads(body)
        if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
            c = obj["error"].get("code")
            if type(c) is int:
                code = c
    text = _error_text(body) or f"HTTP {status}"
    if code is None:
        code = jsonrpc.INVALID_REQUEST if origin == "client" else jsonrpc.INTERNAL_ERROR
    return code, f"{text} (HTTP {status} from the bastion proxy; at fault: {_fault(origin, app)})"


def network_message(app: str, proxy: str, reason: str) -> str:
    return (
        f"cannot reach the bastion proxy at {proxy} for {app}: {reason}; this is usually temporary: "
        "try again (`bastion mcp connect` reconnects by itself)"
    )


def one_line(data: bytes) -> tuple[bytes, dict[str, Any]] | None:
    """A message as one stdout line and its parsed object; ``None`` if it is not a JSON object.

    Compact JSON is passed on byte for byte; a message with line breaks in it
    (pretty-printed) is re-encoded, since a stdio message must be one line.
    """
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    if b"\n" in data or b"\r" in data:
        data = orjson.dumps(obj)
    return data, obj


def _is_answer_to(obj: dict[str, Any], rid: jsonrpc.RequestId) -> bool:
    return (
        rid is not None and "method" not in obj and obj.get("id") == rid and type(obj.get("id")) is type(rid)
    )


class InitCache:
    """What a reconnection replays and checks: the client's handshake and the server's identity."""

    __slots__ = ("initialized", "protocol_version", "request", "server")

    def __init__(self) -> None:
        self.request: jsonrpc.Message | None = None
        self.initialized: bytes | None = None
        self.server: ServerIdentity | None = None
        self.protocol_version = ""

    def start(self, request: jsonrpc.Message) -> None:
        """The client sent ``initialize``: a new handshake replaces whatever was cached."""
        self.reset()
        self.request = request

    def reset(self) -> None:
        self.request = None
        self.initialized = None
        self.server = None
        self.protocol_version = ""

    def accepted(self, result: Any) -> None:
        """The server's ``initialize`` result for the client's own request."""
        self.server = server_identity(result)
        self.protocol_version = _protocol_version(result)

    def changed(self, app: str, result: Any) -> str | None:
        """For a replayed ``initialize``: the refusal message if the server is not the same, else None."""
        new = server_identity(result)
        if new != self.server:
            return server_changed_message(app, self.server, new)
        return None


def _protocol_version(result: Any) -> str:
    if isinstance(result, dict) and isinstance(result.get("protocolVersion"), str):
        return str(result["protocolVersion"])
    return ""


# ------------------------------------------------------------------ credentials


class CredentialExpiredError(AuthenticationError):
    """The credential's expiry passed (and no newer one is on disk)."""

    code = "credential_expired"


class TokenSource(Protocol):
    def token(self) -> str:
        """The bearer token; ``CredentialExpiredError`` or another ``BastionError`` if there is none."""
        ...

    def renewed(self, sent: str) -> bool:
        """Re-read the credential now: True if it is valid and not the ``sent`` one."""
        ...

    def expired(self) -> bool: ...

    @property
    def proxy(self) -> str: ...


class Credentials:
    """A :class:`CredentialSource`, re-read whenever its file changes on disk.

    The file (identity file, or the profile directory and ``current-profile``) is
    ``stat``-ed on every request: a changed inode, size or mtime means a new
    ``bastion login`` or ``bastion auth sign``, and the profile is reloaded.
    """

    def __init__(self, source: CredentialSource) -> None:
        self.source = source
        self._stamp: tuple[Any, ...] | None = self._stat()

    @property
    def proxy(self) -> str:
        return self.source.profile.proxy

    @property
    def profile(self) -> profiles.Profile:
        return self.source.profile

    def _paths(self) -> list[Path]:
        if self.source.identity is not None:
            return [self.source.identity]
        root = profiles.home()
        # The directory changes when a login renames a new profile in; the file, if edited in place.
        return [root / "current-profile", root / "profiles", profiles._profile_path(self.proxy)]

    def _stat(self) -> tuple[Any, ...]:
        out: list[Any] = []
        for p in self._paths():
            try:
                st = p.stat()
            except OSError:
                out.append(None)
            else:
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(out)

    def _refresh(self) -> None:
        stamp = self._stat()
        if stamp == self._stamp:
            return
        try:
            self.source.reload()
        except BastionError as e:
            log.warning("cannot reload the credential: %s", e.message)
            self._stamp = None  # look again next time
        else:
            self._stamp = stamp
            log.info("credential reloaded (user %s)", self.source.profile.user)

    def token(self) -> str:
        self._refresh()
        try:
            return self.source.token()
        except AuthenticationError:
            if self.expired():
                raise CredentialExpiredError(EXPIRED_MESSAGE) from None
            raise

    def expired(self) -> bool:
        return self.source.profile.is_expired(utcnow())

    def renewed(self, sent: str) -> bool:
        try:
            prof = self.source.reload()
        except BastionError:
            return False
        self._stamp = self._stat()
        return prof.token != sent and not prof.is_expired(utcnow())


# ------------------------------------------------------------------ HTTP seam


class Response(Protocol):
    """What the bridge needs of a response (``bastion.transport.http.UpstreamResponse``)."""

    status: int

    def header(self, name: bytes) -> bytes | None: ...

    @property
    def content_type(self) -> str: ...

    async def read(self, max_size: int = ...) -> bytes: ...

    def iter_chunks(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class Pool(Protocol):
    """What the bridge needs of a connection pool (``HTTPUpstreamPool``)."""

    async def request(
        self, method: str, target: str, headers: Sequence[tuple[bytes, bytes]], body: bytes = b""
    ) -> Any: ...


class _Closing:
    """``async with _Closing(resp)``: the response is closed however the block ends."""

    __slots__ = ("resp",)

    def __init__(self, resp: Response) -> None:
        self.resp = resp

    async def __aenter__(self) -> Response:
        return self.resp

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.resp.aclose()


class PoolCache:
    """One ``HTTPUpstreamPool`` for the proxy the credential names; a new one if a login changes it."""

    def __init__(self, creds: Credentials, *, insecure: bool = False) -> None:
        self.creds = creds
        self.insecure = insecure
        self._key: tuple[str, str, bool] | None = None
        self._pool: HTTPUpstreamPool | None = None
        self._old: list[HTTPUpstreamPool] = []

    def current(self) -> HTTPUpstreamPool:
        prof = self.creds.profile
        key = (prof.proxy, prof.ca_pem, not (self.insecure or prof.insecure))
        if self._pool is None or key != self._key:
            if self._pool is not None:
                self._old.append(self._pool)
            self._key = key
            self._pool = HTTPUpstreamPool(
                f"https://{prof.proxy}",
                verify=key[2],
                ca_pem=prof.ca_pem or None,
                # Longer than the gateway's own upstream timeout, so it answers first.
                response_timeout=600.0,
            )
        return self._pool

    async def aclose(self) -> None:
        for pool in [*self._old, *([self._pool] if self._pool else [])]:
            with contextlib.suppress(Exception):
                await pool.aclose()


# ------------------------------------------------------------------ the bridge


class _Failure(Exception):
    """A message could not be carried: the JSON-RPC error to answer it with."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _SessionLost(_Failure):
    """The session is gone (404, or the proxy unreachable): reconnect, then send again once."""


class _CredentialRenewed(Exception):
    """401, but a new login replaced the credential meanwhile: send again once."""


@dataclass
class _StreamPos:
    """Where an SSE answer stream got to: its last event id, and the server's ``retry`` (seconds)."""

    last_id: str = ""
    retry: float | None = None


@dataclass(eq=False)
class _Session:
    id: str
    protocol_version: str
    generation: int
    gone: str = ""  # why it can no longer be used; "" while it can
    listener: asyncio.Task[None] | None = None


Emit = Callable[[bytes], Awaitable[None]]


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
        self.target = "/mcp/apps/" + quote(app, safe="")
        self.creds = creds
        self._pool = pool
        self._emit_raw = emit
        self._on_output_closed = on_output_closed
        self._extra = [(k.lower().encode("ascii"), v.encode("ascii")) for k, v in headers]
        self.cache = InitCache()
        self.session: _Session | None = None
        #: Set when the server's identity changed: every request is refused with it.
        self.halted = ""
        self._lock = asyncio.Lock()
        self._generation = 0
        self._requests: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._closing = False

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
            else:
                self._spawn(self._requests, self._request(msg), f"mcp-connect-request-{msg.id}")
            return
        if msg.method == "notifications/initialized":
            self.cache.initialized = msg.raw
        await self._deliver(msg)

    async def _request(self, msg: jsonrpc.Message) -> None:
        try:
            await self._forward(msg)
        except _Failure as f:
            # A missing method is routine (the SDKs probe for server/discover first).
            level = logging.DEBUG if f.code == jsonrpc.METHOD_NOT_FOUND else logging.WARNING
            log.log(level, "request %s (%s) failed: %s", msg.id, msg.method, f.message)
            await self._emit(jsonrpc.error_response(msg.id, f.code, f.message))
        except Exception as e:  # a bug must not leave the client waiting forever
            log.exception("internal error while carrying request %s (%s)", msg.id, msg.method)
            await self._emit(jsonrpc.error_response(msg.id, jsonrpc.INTERNAL_ERROR, _internal(e)))

    async def _deliver(self, msg: jsonrpc.Message) -> None:
        what = f"notification {msg.method}" if msg.method else f"response to server request {msg.id}"
        try:
            async with asyncio.timeout(NOTIFY_TIMEOUT):
                await self._forward(msg)
        except _Failure as f:
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
        return _is_answer_to(obj, want)

    # ------------------------------------------------------------- sessions

    async def _initialize(self, msg: jsonrpc.Message) -> None:
        async with self._lock:
            old = self.session
            if old is not None:
                self._lose(old, "the MCP client started a new session")
                self._spawn(self._background, self._delete(old), "mcp-connect-delete")
            self.session = None
            self.halted = ""
            self.cache.start(msg)
            try:
                answer, sid = await self._open(msg, relay=True)
            except _Failure as f:
                self.cache.reset()
                log.error("cannot open a session with %s: %s", self.app, f.message)
                await self._emit(jsonrpc.error_response(msg.id, f.code, f.message))
                return
            except Exception as e:
                self.cache.reset()
                log.exception("internal error while opening a session with %s", self.app)
                await self._emit(jsonrpc.error_response(msg.id, jsonrpc.INTERNAL_ERROR, _internal(e)))
                return
            raw, obj = answer
            result = obj.get("result")
            if isinstance(result, dict):
                self.cache.accepted(result)
                self._generation += 1
                self.session = _Session(sid, self.cache.protocol_version, self._generation)
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

    async def _usable_session(self) -> _Session | None:
        sess = self.session
        if sess is None or not sess.gone:
            return sess
        async with self._lock:
            sess = self.session
            if sess is None or not sess.gone:
                return sess
            if self.halted:
                raise _Failure(SERVER_CHANGED, self.halted)
            new = await self._replay(sess)
            self.session = new
            return new

    async def _replay(self, old: _Session) -> _Session:
        init = self.cache.request
        assert init is not None  # a session exists only after the client's initialize
        log.info("reconnecting: %s; replaying initialize", old.gone)
        (_, obj), sid = await self._open(init, relay=False)
        result = obj.get("result")
        if not isinstance(result, dict):
            raise _Failure(
                jsonrpc.INTERNAL_ERROR,
                f"could not reopen a session with {self.app}: the MCP server refused initialize: "
                f"{_error_text(orjson.dumps(obj))}",
            )
        new = _Session(sid, _protocol_version(result) or old.protocol_version, self._generation + 1)
        changed = self.cache.changed(self.app, result)
        if changed:
            self.halted = changed
            log.error("%s", changed)
            self._spawn(self._background, self._delete(new), "mcp-connect-delete")
            raise _Failure(SERVER_CHANGED, changed)
        self._generation = new.generation
        if self.cache.initialized is not None:
            try:
                await self._exchange_once(self.cache.initialized, None, new)
            except _Failure as f:
                log.warning("replayed notifications/initialized was not accepted: %s", f.message)
            except _CredentialRenewed:
                log.warning("replayed notifications/initialized was refused (401)")
        self._start_listener(new)
        log.info("reconnected to %s (server %s)", self.app, self.cache.server or "unknown")
        return new

    def _lose(self, sess: _Session, reason: str) -> None:
        if sess.gone:
            return
        sess.gone = reason
        task = sess.listener
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _open(self, init: jsonrpc.Message, *, relay: bool) -> tuple[tuple[bytes, dict[str, Any]], str]:
        """POST ``initialize`` without a session: (its answer, the new session id)."""
        renewed = False
        while True:
            token = self._token()
            headers = self._headers(token, None)
            try:
                resp = await self._pool().request("POST", self.target, headers, init.raw)
            except UpstreamError as e:
                raise _Failure(
                    PROXY_UNREACHABLE, network_message(self.app, self.creds.proxy, e.message)
                ) from None
            async with _Closing(resp):
                if resp.status == 401:
                    exc = await self._auth_failure(resp, token)
                    if isinstance(exc, _CredentialRenewed) and not renewed:
                        renewed = True
                        continue
                    raise exc if isinstance(exc, _Failure) else _Failure(LOGIN_REQUIRED, EXPIRED_MESSAGE)
                if resp.status != 200:
                    raise _Failure(*await self._http_error(resp))
                sid = (resp.header(b"mcp-session-id") or b"").decode("latin-1")
                answer: tuple[bytes, dict[str, Any]] | None = None
                try:
                    if resp.content_type == _JSON:
                        answer = one_line(await resp.read())
                    elif resp.content_type == _SSE:
                        parser = SSEParser()
                        async for chunk in resp.iter_chunks():
                            for ev in parser.feed(chunk):
                                parsed = one_line(ev.data) if ev.data else None
                                if parsed is None:
                                    continue
                                if _is_answer_to(parsed[1], init.id):
                                    answer = parsed
                                    break
                                if relay:
                                    await self._emit(parsed[0])
                            if answer is not None:
                                break
                    else:
                        raise _Failure(
                            jsonrpc.INTERNAL_ERROR,
                            "the bastion proxy answered initialize with "
                            + (resp.content_type or "no content type"),
                        )
                except (UpstreamError, EventTooLargeError) as e:
                    raise _Failure(
                        PROXY_UNREACHABLE, network_message(self.app, self.creds.proxy, e.message)
                    ) from None
                if answer is None:
                    raise _Failure(
                        jsonrpc.INTERNAL_ERROR,
                        "the bastion proxy ended the initialize answer without a result",
                    )
                return answer, sid

    # ------------------------------------------------------------ forwarding

    async def _forward(self, msg: jsonrpc.Message) -> None:
        """Carry one message, reconnecting once and following one credential renewal."""
        reconnected = renewed = False
        while True:
            if self.halted:
                raise _Failure(SERVER_CHANGED, self.halted)
            sess = await self._usable_session()
            try:
                await self._exchange_once(msg.raw, msg.id if msg.kind == jsonrpc.REQUEST else None, sess)
                return
            except _SessionLost as e:
                if sess is None or not sess.id or reconnected or self.cache.request is None:
                    raise _Failure(e.code, e.message) from None
                reconnected = True
                self._lose(sess, e.message)
            except _CredentialRenewed:
                if renewed:
                    raise _Failure(LOGIN_REQUIRED, EXPIRED_MESSAGE) from None
                renewed = True
                log.info("credential renewed by a new login: sending again")

    async def _exchange_once(self, raw: bytes, rid: jsonrpc.RequestId, sess: _Session | None) -> None:
        """One POST of ``raw``; answers go to the client.  Raises what the caller must handle."""
        token = self._token()
        headers = self._headers(token, sess)
        try:
            resp = await self._pool().request("POST", self.target, headers, raw)
        except UpstreamTimeoutError as e:
            raise _Failure(
                jsonrpc.INTERNAL_ERROR, f"the bastion proxy did not answer in time: {e.message}"
            ) from None
        except UpstreamError as e:
            # Nothing came back: the proxy restarted or is unreachable.  A new session is tried.
            raise _SessionLost(
                PROXY_UNREACHABLE, network_message(self.app, self.creds.proxy, e.message)
            ) from None
        async with _Closing(resp):
            status = resp.status
            if status == 202:
                if rid is None:
                    return
                raise _Failure(
                    jsonrpc.INTERNAL_ERROR, "the bastion proxy accepted the request but sent no answer (202)"
                )
            if status == 404 and sess is not None and sess.id:
                text = _error_text(await self._read_error(resp))
                raise _SessionLost(
                    jsonrpc.INTERNAL_ERROR, f"the gateway ended the session with {self.app} ({text})"
                )
            if status == 401:
                raise await self._auth_failure(resp, token)
            if status != 200:
                raise _Failure(*await self._http_error(resp))
            pos = _StreamPos()
            try:
                if resp.content_type == _JSON:
                    data = await resp.read()
                    if await self._emit_message(data, rid) or rid is None:
                        return
                    raise _Failure(
                        jsonrpc.INTERNAL_ERROR, "the bastion proxy answered with an unrelated message"
                    )
                if resp.content_type != _SSE:
                    raise _Failure(
                        jsonrpc.INTERNAL_ERROR,
                        f"the bastion proxy answered with {resp.content_type or 'no content type'}",
                    )
                if await self._relay_events(resp, rid, pos) or rid is None:
                    return
                unresumed = _Failure(
                    jsonrpc.INTERNAL_ERROR,
                    f"the answer stream from {self.app} ended before the answer arrived",
                )
            except (UpstreamError, EventTooLargeError) as e:
                unresumed = _Failure(
                    PROXY_UNREACHABLE,
                    f"lost the answer from {self.app} midway ({e.message}); the request may or may not "
                    "have been carried out",
                )
                if rid is None or not pos.last_id or isinstance(e, EventTooLargeError):
                    raise unresumed from None
                log.info("the answer to request %s broke off (%s); resuming it", rid, e.message)
        await self._resume(rid, sess, pos, unresumed)

    async def _relay_events(self, resp: Response, rid: jsonrpc.RequestId, pos: _StreamPos) -> bool:
        """Pass a POST's SSE events on as they arrive; True once the answer to ``rid`` passed.

        ``pos`` follows the last event id and ``retry``, for resuming the stream.
        """
        parser = SSEParser()
        async for chunk in resp.iter_chunks():
            for ev in parser.feed(chunk):
                if ev.id is not None:
                    pos.last_id = ev.id
                if ev.retry is not None:
                    pos.retry = max(ev.retry / 1000, MIN_RETRY)
                if ev.data and await self._emit_message(ev.data, rid):
                    return True
        return False

    async def _resume(
        self, rid: jsonrpc.RequestId, sess: _Session | None, pos: _StreamPos, unresumed: _Failure
    ) -> None:
        """The stream ended or broke before the answer: resume it with ``Last-Event-ID`` (spec:
        always with GET), honouring the server's ``retry``; raise ``unresumed`` if that fails."""
        attempts = 0
        while pos.last_id and attempts < RESUME_ATTEMPTS:
            attempts += 1
            await asyncio.sleep(pos.retry if pos.retry is not None else 1.0)
            token = self._token()
            before = pos.last_id
            try:
                resp = await self._pool().request(
                    "GET",
                    self.target,
                    self._headers(token, sess, accept=b"text/event-stream", last_id=pos.last_id),
                )
                async with _Closing(resp):
                    if resp.status != 200 or resp.content_type != _SSE:
                        break  # the server cannot resume it (or the session is gone)
                    if await self._relay_events(resp, rid, pos):
                        return
            except (UpstreamError, EventTooLargeError) as e:
                log.debug("resuming the answer to %s failed: %s", rid, e.message)
            if pos.last_id != before:
                attempts = 0  # progress: keep following
        raise unresumed

    # ---------------------------------------------------------------- errors

    def _token(self) -> str:
        try:
            return self.creds.token()
        except CredentialExpiredError:
            raise _Failure(LOGIN_REQUIRED, EXPIRED_MESSAGE) from None
        except BastionError as e:
            raise _Failure(
                LOGIN_REQUIRED, f"{e.message} (there is no need to restart your MCP client)"
            ) from None

    async def _read_error(self, resp: Response) -> bytes:
        try:
            return await resp.read(_MAX_ERROR_BODY)
        except UpstreamError:
            return b""

    async def _http_error(self, resp: Response) -> tuple[int, str]:
        origin = (resp.header(_ORIGIN_HEADER) or b"").decode("latin-1").strip().lower()
        return http_error(self.app, resp.status, origin, await self._read_error(resp))

    async def _auth_failure(self, resp: Response, sent: str) -> Exception:
        body = await self._read_error(resp)
        if self.creds.renewed(sent):
            return _CredentialRenewed()
        if body_says_expired(body) or self.creds.expired():
            return _Failure(LOGIN_REQUIRED, EXPIRED_MESSAGE)
        return _Failure(
            LOGIN_REQUIRED,
            f"the bastion proxy refused your credential ({_error_text(body) or 'HTTP 401'}): run "
            "`bastion login` in a terminal; there is no need to restart your MCP client",
        )

    # ----------------------------------------------------------- GET stream

    def _start_listener(self, sess: _Session) -> None:
        if sess.listener is None and not sess.gone and not self._closing:
            sess.listener = self._spawn(
                self._background, self._listen(sess), f"mcp-connect-listen-{sess.generation}"
            )

    async def _listen(self, sess: _Session) -> None:
        """The server→client stream of a session: relayed as it comes, reopened with backoff."""
        delay = LISTEN_MIN_DELAY
        last_id = ""
        while not (sess.gone or self._closing or self.halted):
            wait = delay
            delay = min(delay * 2, LISTEN_MAX_DELAY)
            try:
                token = self._token()
                resp = await self._pool().request(
                    "GET",
                    self.target,
                    self._headers(token, sess, accept=b"text/event-stream", last_id=last_id),
                )
                async with _Closing(resp):
                    if resp.status == 405:
                        log.info("%s offers no server-to-client stream (405); not listening", self.app)
                        return
                    if resp.status == 404 and sess.id:
                        self._lose(sess, f"the gateway ended the session with {self.app}")
                        return
                    if resp.status != 200 or resp.content_type != _SSE:
                        _, text = await self._http_error(resp)
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
            except _Failure as f:
                log.debug("server-to-client stream waits: %s", f.message)
                if f.code == LOGIN_REQUIRED:
                    wait = LISTEN_MAX_DELAY
            except (UpstreamError, EventTooLargeError) as e:
                log.debug("server-to-client stream dropped: %s", e.message)
            if sess.gone or self._closing or self.halted:
                return
            await asyncio.sleep(wait)  # backoff before reopening

    # ---------------------------------------------------------------- misc

    def _headers(
        self, token: str, sess: _Session | None, *, accept: bytes = _ACCEPT_BOTH, last_id: str = ""
    ) -> list[tuple[bytes, bytes]]:
        h = [(b"authorization", b"Bearer " + token.encode("latin-1")), (b"accept", accept)]
        if accept == _ACCEPT_BOTH:
            h.append((b"content-type", b"application/json"))
        if sess is not None:
            if sess.id:
                h.append((b"mcp-session-id", sess.id.encode("latin-1")))
            if sess.protocol_version:
                h.append((b"mcp-protocol-version", sess.protocol_version.encode("latin-1")))
        if last_id:
            h.append((b"last-event-id", last_id.encode("utf-8")))
        h.extend(self._extra)
        return h

    async def _delete(self, sess: _Session) -> None:
        """End a session on the gateway: best effort, bounded."""
        if not sess.id:
            return
        try:
            async with asyncio.timeout(DELETE_TIMEOUT):
                token = self.creds.token()
                resp = await self._pool().request(
                    "DELETE", self.target, self._headers(token, sess, accept=b"application/json")
                )
                await resp.aclose()
        except (TimeoutError, BastionError) as e:
            log.debug("could not end session: %s", e)

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
            await self._delete(sess)


def _internal(e: Exception) -> str:
    return f"internal error in `bastion mcp connect` ({type(e).__name__}: {e}); its log (stderr) has details"


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("internal error in %s", task.get_name(), exc_info=task.exception())


# ------------------------------------------------------------------ stdio


class _Output:
    """Writes messages to the client, one per line, flushed (drained) before returning."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        pipe = os.fdopen(self.fd, "wb", buffering=0, closefd=False)
        try:
            if not _is_pipe(self.fd):
                raise ValueError("not a pipe")
            transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, pipe)
        except (ValueError, OSError):
            pipe.close()
            return  # a file or a terminal: plain blocking writes (they do not block for long)
        self.writer = asyncio.StreamWriter(transport, protocol, None, loop)

    async def write(self, raw: bytes) -> None:
        if self.writer is not None:
            self.writer.write(raw + b"\n")
            await self.writer.drain()
            return
        data = memoryview(raw + b"\n")
        while data:
            n = os.write(self.fd, data)
            data = data[n:]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _is_pipe(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


async def _open_input(fd: int) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE)
    if _is_pipe(fd):
        pipe = os.fdopen(fd, "rb", buffering=0, closefd=False)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        return reader

    # A terminal or a file: a daemon thread reads (it cannot hold up the exit).
    def pump() -> None:
        try:
            while chunk := os.read(fd, 1 << 16):
                loop.call_soon_threadsafe(reader.feed_data, chunk)
        except OSError as e:
            log.debug("stdin: %s", e)
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(reader.feed_eof)

    threading.Thread(target=pump, name="mcp-connect-stdin", daemon=True).start()
    return reader


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


def reserve_stdout() -> int:
    """Keep stdout for MCP messages alone: a private copy of fd 1 is returned, and fd 1
    (``print``, stray library output, C code) is pointed at stderr."""
    sys.stdout.flush()
    fd = os.dup(1)
    os.dup2(2, 1)
    return fd


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
    output = _Output(out_fd)
    await output.open()
    reader = await _open_input(in_fd)
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
