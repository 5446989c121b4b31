"""One app's streamable-HTTP endpoint on the proxy, as ``bastion mcp connect`` uses it.

:class:`AppEndpoint` POSTs one client message to ``/mcp/apps/<app>`` with the bearer
credential and the session's headers, and passes the answer on as it comes (a JSON
body, or Server-Sent Events event by event).  An answer stream that ends or breaks
before the answer, after events with ids, is resumed with a GET carrying
``Last-Event-ID``; a request whose answer is lost midway is never sent twice.  What
cannot be carried is raised as a :class:`~bastion.client.rpc_errors.Failure` for the
bridge to answer with (a ``SessionLost`` when a new session may help, a
``CredentialRenewed`` when a new login replaced a refused credential).

Also here: the HTTP seam (:class:`Response`, :class:`Pool`, and :class:`PoolCache`,
which builds the real pool for the proxy the credential names, with the profile's
``Trust``: a refused certificate is told as it tells it), the gateway
:class:`Session` the headers name, and :func:`parse_header` for the ``-H`` headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Protocol
from urllib.parse import quote

import orjson

from bastion.client.api import Trust
from bastion.client.credentials import CredentialExpiredError, Credentials, TokenSource
from bastion.client.rpc_errors import (
    EXPIRED_MESSAGE,
    LOGIN_REQUIRED,
    PROXY_UNREACHABLE,
    CredentialRenewed,
    Failure,
    SessionLost,
    body_says_expired,
    error_text,
    http_error,
    network_message,
)
from bastion.errors import BastionError, UpstreamError
from bastion.protocol import jsonrpc
from bastion.protocol.sse import EventTooLargeError, SSEParser
from bastion.transport.http import HTTPUpstreamPool, UpstreamCertificateError, UpstreamTimeoutError

__all__ = [
    "DELETE_TIMEOUT",
    "MIN_RETRY",
    "RESUME_ATTEMPTS",
    "SSE",
    "AppEndpoint",
    "Closing",
    "Emit",
    "EmitMessage",
    "Pool",
    "PoolCache",
    "Response",
    "Session",
    "StreamPos",
    "is_answer_to",
    "one_line",
    "parse_header",
]

log = logging.getLogger("bastion.mcp.connect")

_ACCEPT_BOTH: Final = b"application/json, text/event-stream"
SSE: Final = "text/event-stream"
_JSON: Final = "application/json"
_ORIGIN_HEADER: Final = b"x-bastion-error-origin"
#: Error bodies are read for their message only.
_MAX_ERROR_BODY: Final = 64 * 1024
#: How long the best-effort DELETE of a session may take.
DELETE_TIMEOUT: Final = 2.0
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


def is_answer_to(obj: dict[str, Any], rid: jsonrpc.RequestId) -> bool:
    return (
        rid is not None and "method" not in obj and obj.get("id") == rid and type(obj.get("id")) is type(rid)
    )


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


def _unreachable(app: str, proxy: str, e: BastionError) -> str:
    return network_message(app, proxy, e.message, temporary=not isinstance(e, UpstreamCertificateError))


class TrustedPool:
    """An ``HTTPUpstreamPool`` to the proxy whose refused certificate is told as ``trust`` tells it."""

    def __init__(self, pool: HTTPUpstreamPool, trust: Trust, proxy: str) -> None:
        self.pool = pool
        self.trust = trust
        self.proxy = proxy

    async def request(
        self, method: str, target: str, headers: Sequence[tuple[bytes, bytes]], body: bytes = b""
    ) -> Any:
        try:
            return await self.pool.request(method, target, headers, body)
        except UpstreamCertificateError as e:
            msg = self.trust.refusal(self.proxy, e.verify_message)
            raise UpstreamCertificateError(msg, e.verify_message) from None

    async def aclose(self) -> None:
        await self.pool.aclose()


class Closing:
    """``async with Closing(resp)``: the response is closed however the block ends."""

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
        self._pool: TrustedPool | None = None
        self._old: list[TrustedPool] = []

    def current(self) -> TrustedPool:
        prof = self.creds.profile
        key = (prof.proxy, prof.ca_pem, not (self.insecure or prof.insecure))
        if self._pool is None or key != self._key:
            if self._pool is not None:
                self._old.append(self._pool)
            self._key = key
            trust = prof.trust(insecure=self.insecure)
            pool = HTTPUpstreamPool(
                f"https://{prof.proxy}",
                ssl_context=trust.context(),
                # Longer than the gateway's own upstream timeout, so it answers first.
                response_timeout=600.0,
            )
            self._pool = TrustedPool(pool, trust, prof.proxy)
        return self._pool

    async def aclose(self) -> None:
        for pool in [*self._old, *([self._pool] if self._pool else [])]:
            with contextlib.suppress(Exception):
                await pool.aclose()


@dataclass
class StreamPos:
    """Where an SSE answer stream got to: its last event id, and the server's ``retry`` (seconds)."""

    last_id: str = ""
    retry: float | None = None


@dataclass(eq=False)
class Session:
    id: str
    protocol_version: str
    generation: int
    gone: str = ""  # why it can no longer be used; "" while it can
    listener: asyncio.Task[None] | None = None


#: Writes one message (no newline) to the client.
Emit = Callable[[bytes], Awaitable[None]]
#: Passes one server message on to the client; True if it is the answer to the request id given.
EmitMessage = Callable[[bytes, jsonrpc.RequestId], Awaitable[bool]]


class AppEndpoint:
    """Carries messages to ``/mcp/apps/<app>`` through the proxy; see the module docstring.

    ``creds`` gives the bearer token; ``pool`` returns the HTTP pool to use for the next
    request; ``headers`` are the extra ``-H`` headers.  Answers go to the client through
    ``emit`` (a message already one line) and ``emit_message`` (a server message as sent).
    """

    def __init__(
        self,
        app: str,
        creds: TokenSource,
        pool: Callable[[], Pool],
        *,
        emit: Emit,
        emit_message: EmitMessage,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.app = app
        self.target = "/mcp/apps/" + quote(app, safe="")
        self.creds = creds
        self._pool = pool
        self._emit = emit
        self._emit_message = emit_message
        self._extra = [(k.lower().encode("ascii"), v.encode("ascii")) for k, v in headers]

    async def request(self, method: str, headers: Sequence[tuple[bytes, bytes]], body: bytes = b"") -> Any:
        """One request to the app's endpoint, on the pool of the moment."""
        return await self._pool().request(method, self.target, headers, body)

    # ------------------------------------------------------------- sessions

    async def open(self, init: jsonrpc.Message, *, relay: bool) -> tuple[tuple[bytes, dict[str, Any]], str]:
        """POST ``initialize`` without a session: (its answer, the new session id)."""
        renewed = False
        while True:
            token = self.token()
            headers = self.headers(token, None)
            try:
                resp = await self.request("POST", headers, init.raw)
            except UpstreamError as e:
                raise Failure(PROXY_UNREACHABLE, _unreachable(self.app, self.creds.proxy, e)) from None
            async with Closing(resp):
                if resp.status == 401:
                    exc = await self.auth_failure(resp, token)
                    if isinstance(exc, CredentialRenewed) and not renewed:
                        renewed = True
                        continue
                    raise exc if isinstance(exc, Failure) else Failure(LOGIN_REQUIRED, EXPIRED_MESSAGE)
                if resp.status != 200:
                    raise Failure(*await self.http_error(resp))
                sid = (resp.header(b"mcp-session-id") or b"").decode("latin-1")
                answer: tuple[bytes, dict[str, Any]] | None = None
                try:
                    if resp.content_type == _JSON:
                        answer = one_line(await resp.read())
                    elif resp.content_type == SSE:
                        parser = SSEParser()
                        async for chunk in resp.iter_chunks():
                            for ev in parser.feed(chunk):
                                parsed = one_line(ev.data) if ev.data else None
                                if parsed is None:
                                    continue
                                if is_answer_to(parsed[1], init.id):
                                    answer = parsed
                                    break
                                if relay:
                                    await self._emit(parsed[0])
                            if answer is not None:
                                break
                    else:
                        raise Failure(
                            jsonrpc.INTERNAL_ERROR,
                            "the bastion proxy answered initialize with "
                            + (resp.content_type or "no content type"),
                        )
                except (UpstreamError, EventTooLargeError) as e:
                    raise Failure(PROXY_UNREACHABLE, _unreachable(self.app, self.creds.proxy, e)) from None
                if answer is None:
                    raise Failure(
                        jsonrpc.INTERNAL_ERROR,
                        "the bastion proxy ended the initialize answer without a result",
                    )
                return answer, sid

    # ------------------------------------------------------------ forwarding

    async def exchange(
        self,
        raw: bytes,
        rid: jsonrpc.RequestId,
        sess: Session | None,
        routing: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        """One POST of ``raw``; answers go to the client.  Raises what the caller must handle.
        ``routing``: more headers (a 2026-07-28 request's ``Mcp-Method``/``Mcp-Name``)."""
        token = self.token()
        headers = self.headers(token, sess)
        headers.extend(routing)
        try:
            resp = await self.request("POST", headers, raw)
        except UpstreamTimeoutError as e:
            raise Failure(
                jsonrpc.INTERNAL_ERROR, f"the bastion proxy did not answer in time: {e.message}"
            ) from None
        except UpstreamError as e:
            # Nothing came back: the proxy restarted or is unreachable.  A new session is tried.
            raise SessionLost(PROXY_UNREACHABLE, _unreachable(self.app, self.creds.proxy, e)) from None
        async with Closing(resp):
            status = resp.status
            if status == 202:
                if rid is None:
                    return
                raise Failure(
                    jsonrpc.INTERNAL_ERROR, "the bastion proxy accepted the request but sent no answer (202)"
                )
            if status == 404 and sess is not None and sess.id:
                text = error_text(await self.read_error(resp))
                raise SessionLost(
                    jsonrpc.INTERNAL_ERROR, f"the gateway ended the session with {self.app} ({text})"
                )
            if status == 401:
                raise await self.auth_failure(resp, token)
            if status != 200:
                raise Failure(*await self.http_error(resp))
            pos = StreamPos()
            try:
                if resp.content_type == _JSON:
                    data = await resp.read()
                    if await self._emit_message(data, rid) or rid is None:
                        return
                    raise Failure(
                        jsonrpc.INTERNAL_ERROR, "the bastion proxy answered with an unrelated message"
                    )
                if resp.content_type != SSE:
                    raise Failure(
                        jsonrpc.INTERNAL_ERROR,
                        f"the bastion proxy answered with {resp.content_type or 'no content type'}",
                    )
                if await self._relay_events(resp, rid, pos) or rid is None:
                    return
                unresumed = Failure(
                    jsonrpc.INTERNAL_ERROR,
                    f"the answer stream from {self.app} ended before the answer arrived",
                )
            except (UpstreamError, EventTooLargeError) as e:
                unresumed = Failure(
                    PROXY_UNREACHABLE,
                    f"lost the answer from {self.app} midway ({e.message}); the request may or may not "
                    "have been carried out",
                )
                if rid is None or not pos.last_id or isinstance(e, EventTooLargeError):
                    raise unresumed from None
                log.info("the answer to request %s broke off (%s); resuming it", rid, e.message)
        await self._resume(rid, sess, pos, unresumed)

    async def _relay_events(self, resp: Response, rid: jsonrpc.RequestId, pos: StreamPos) -> bool:
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
        self, rid: jsonrpc.RequestId, sess: Session | None, pos: StreamPos, unresumed: Failure
    ) -> None:
        """The stream ended or broke before the answer: resume it with ``Last-Event-ID`` (spec:
        always with GET), honouring the server's ``retry``; raise ``unresumed`` if that fails."""
        attempts = 0
        while pos.last_id and attempts < RESUME_ATTEMPTS:
            attempts += 1
            await asyncio.sleep(pos.retry if pos.retry is not None else 1.0)
            token = self.token()
            before = pos.last_id
            try:
                resp = await self.request(
                    "GET",
                    self.headers(token, sess, accept=b"text/event-stream", last_id=pos.last_id),
                )
                async with Closing(resp):
                    if resp.status != 200 or resp.content_type != SSE:
                        break  # the server cannot resume it (or the session is gone)
                    if await self._relay_events(resp, rid, pos):
                        return
            except (UpstreamError, EventTooLargeError) as e:
                log.debug("resuming the answer to %s failed: %s", rid, e.message)
            if pos.last_id != before:
                attempts = 0  # progress: keep following
        raise unresumed

    # ---------------------------------------------------------------- errors

    def token(self) -> str:
        try:
            return self.creds.token()
        except CredentialExpiredError:
            raise Failure(LOGIN_REQUIRED, EXPIRED_MESSAGE) from None
        except BastionError as e:
            raise Failure(
                LOGIN_REQUIRED, f"{e.message} (there is no need to restart your MCP client)"
            ) from None

    async def read_error(self, resp: Response) -> bytes:
        try:
            return await resp.read(_MAX_ERROR_BODY)
        except UpstreamError:
            return b""

    async def http_error(self, resp: Response) -> tuple[int, str]:
        origin = (resp.header(_ORIGIN_HEADER) or b"").decode("latin-1").strip().lower()
        return http_error(self.app, resp.status, origin, await self.read_error(resp))

    async def auth_failure(self, resp: Response, sent: str) -> Exception:
        body = await self.read_error(resp)
        if self.creds.renewed(sent):
            return CredentialRenewed()
        if body_says_expired(body) or self.creds.expired():
            return Failure(LOGIN_REQUIRED, EXPIRED_MESSAGE)
        return Failure(
            LOGIN_REQUIRED,
            f"the bastion proxy refused your credential ({error_text(body) or 'HTTP 401'}): run "
            "`bastion login` in a terminal; there is no need to restart your MCP client",
        )

    # ---------------------------------------------------------------- misc

    def headers(
        self, token: str, sess: Session | None, *, accept: bytes = _ACCEPT_BOTH, last_id: str = ""
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

    async def delete(self, sess: Session) -> None:
        """End a session on the gateway: best effort, bounded."""
        if not sess.id:
            return
        try:
            async with asyncio.timeout(DELETE_TIMEOUT):
                token = self.creds.token()
                resp = await self.request("DELETE", self.headers(token, sess, accept=b"application/json"))
                await resp.aclose()
        except (TimeoutError, BastionError) as e:
            log.debug("could not end session: %s", e)
