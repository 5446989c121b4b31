"""A lean HTTP/1.1 server hosting our ASGI apps: an asyncio protocol on httptools (llhttp, in C).

Why: uvicorn cost the proxy ~60 µs of CPU per request (a wrapper coroutine and a
``RequestResponseCycle`` per request, an ``asyncio.Event`` per wait, regular
expressions over every response header, and the header block written apart from
the body: two TLS records and two ``send`` calls per response).  This server does
the same job for the subset of ASGI 3 our apps use (``proxy/front.Front``, plain
ASGI, and the Starlette web API behind it); see docs/decisions/0011-lean-http-server.md.

Contract
--------
``server = await serve(sock, app, ssl_ctx=ctx)`` serves ``app`` on the listening
socket ``sock`` (TLS when ``ssl_ctx`` is given; ALPN is the context's business) until
``server.close()``; ``await server.wait_closed()`` returns once it has stopped.
Closing is graceful: no new connections; idle connections are closed at once; a
connection busy with a request is closed once that response is complete; after
``shutdown_timeout`` seconds whatever is left is aborted and the apps' tasks cancelled.

ASGI (``spec_version`` 2.3, HTTP only — no WebSocket, no lifespan):

- scope: ``type``, ``asgi``, ``http_version`` ("1.1" / "1.0"), ``method``, ``scheme``,
  ``path`` (percent-decoded, as uvicorn does), ``raw_path`` and ``query_string`` (bytes),
  ``root_path`` "", ``headers`` (names lower-cased, in order), ``client``, ``server``.
  No ``state``: Starlette adds it when a request asks for it.
- ``receive()``: ``http.request`` messages with the body as it arrives (Content-Length
  or chunked; llhttp decodes the chunking), then ``http.disconnect`` once the client has
  gone or the response is complete.  ``Expect: 100-continue`` is answered on the first
  ``receive()``.  Reading stops while more than 64 KiB of body waits for the app.
- ``send()``: ``http.response.start`` writes nothing by itself: the header block goes
  out in the same ``write`` as the first body bytes (one TLS record for a whole small
  response).  A streamed response whose first body is not sent in the same loop
  iteration gets its headers at the end of it, so an SSE stream's headers are never held
  back.  A response with ``content-length`` is sent as is (its length is enforced); one
  without is sent with that length when its whole body comes in one message, else
  chunked (close-delimited to an HTTP/1.0 client).  While the transport's buffer is
  over its high-water mark, ``send()`` waits for it to drain.  After the client has
  gone, ``send()`` drops what it is given (as uvicorn does).  No ``Date`` or ``Server``
  header is added.

HTTP/1.1: keep-alive (HTTP/1.0 clients get one request per connection); pipelined
requests are answered in order — the next is parsed and queued, and reading stops,
until the current response is complete; ``Connection: close`` from either side is
honoured.  Limits: request head (line and headers) ``max_head_bytes`` and
``max_headers`` → 431; unparsable request → 400; both close the connection after the
responses already under way.  An app that raises before its response began gets a
500 written for it, otherwise the connection is closed; either way the exception is
logged on ``bastion.proxy``.  Timeouts (checked by one timer per server, not a timer
per request, so they fire up to min(1 s, a quarter of the timeout) late): ``keepalive_timeout``
for an idle connection, ``header_timeout`` from the first byte of a request to the end
of its headers.  Upgrades (WebSocket, h2c) are not supported: the request is answered by
the app like any other and the connection is closed; ``CONNECT`` gets 400.

Cost: see docs/decisions/0011-lean-http-server.md for the figures.  What keeps it
cheap: one task per request running the app's own coroutine (no wrapper coroutine;
completion and failures are handled in a done callback), one small object per request
holding the state (its bound ``receive``/``send``), ``send`` is a plain function that
returns an already-completed future (no coroutine per call), pre-encoded status lines,
one ``write`` per response in the common case, and no timer per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from typing import Any, Final, cast
from urllib.parse import unquote

import httptools

__all__ = ["ASGI", "Server", "serve"]

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
#: An ASGI 3 application whose ``__call__`` is a coroutine function (ours all are).
ASGI = Callable[[MutableMapping[str, Any], Receive, Send], Coroutine[Any, Any, None]]

log = logging.getLogger("bastion.proxy")

#: Request body bytes waiting for the app beyond which the connection stops reading.
HIGH_WATER: Final = 64 * 1024


def _status_line(code: int) -> bytes:
    try:
        phrase = http.HTTPStatus(code).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {code} {phrase}\r\n".encode("latin-1")


_STATUS: Final = {code: _status_line(code) for code in range(100, 600)}
_ASGI_VERSION: Final = {"version": "3.0", "spec_version": "2.3"}
_METHODS: Final = {m.encode(): m for m in ("GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS")}
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_CHUNK_END: Final = b"0\r\n\r\n"
_END: Final = b"\r\n"
_END_CLOSE: Final = b"connection: close\r\n\r\n"
_END_CHUNKED: Final = b"transfer-encoding: chunked\r\n\r\n"
_END_CHUNKED_CLOSE: Final = b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n"

# How a response body is framed (decided by http.response.start, or by the first body).
_UNDECIDED: Final = 0  # no content-length: by the first body (length if it is all, else chunked)
_LENGTH: Final = 1  # content-length, enforced
_CHUNKED: Final = 2  # transfer-encoding: chunked
_RAW: Final = 3  # close-delimited (an HTTP/1.0 client)
_NONE: Final = 4  # no body at all (HEAD, 1xx, 204, 304)


def _plain(status: int, text: str) -> bytes:
    body = text.encode()
    return b"".join(
        (
            _STATUS[status],
            b"content-type: text/plain; charset=utf-8\r\ncontent-length: ",
            str(len(body)).encode(),
            b"\r\nconnection: close\r\n\r\n",
            body,
        )
    )


_REPLIES: Final = {
    400: _plain(400, "Invalid HTTP request"),
    431: _plain(431, "Request header fields too large"),
    500: _plain(500, "Internal Server Error"),
}


class _Reject(Exception):
    """Raised from a parser callback: answer ``status`` and close."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


# ------------------------------------------------------------------------ server


class Server:
    """A running server (see the module's contract); made by :func:`serve`."""

    def __init__(
        self,
        app: ASGI,
        loop: asyncio.AbstractEventLoop,
        *,
        scheme: str,
        keepalive_timeout: float,
        header_timeout: float,
        shutdown_timeout: float,
        max_head_bytes: int,
        max_headers: int,
    ) -> None:
        self.app = app
        self.loop = loop
        self.scheme = scheme
        self.keepalive_timeout = keepalive_timeout
        self.header_timeout = header_timeout
        self.shutdown_timeout = shutdown_timeout
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self.conns: set[_Conn] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.closing = False
        #: What ``send()`` returns when it has nothing to wait for: awaiting a completed
        #: future returns at once, without a coroutine object per call.
        self.ready: asyncio.Future[None] = loop.create_future()
        self.ready.set_result(None)
        self._closed: asyncio.Future[None] = loop.create_future()
        self._drained: asyncio.Future[None] | None = None
        self._aserver: asyncio.AbstractServer | None = None
        self._closer: asyncio.Task[None] | None = None
        self._tick = max(0.01, min(1.0, header_timeout / 4, keepalive_timeout / 4))
        self._sweeper: asyncio.TimerHandle | None = None

    def _protocol(self) -> _Conn:
        return _Conn(self)

    def close(self) -> None:
        """Stop accepting; finish in-flight requests (up to ``shutdown_timeout``), then stop."""
        if self.closing:
            return
        self.closing = True
        if self._aserver is not None:
            self._aserver.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self.conns):
            conn.shutdown()
        self._closer = self.loop.create_task(self._shut_down(), name="h1-shutdown")

    async def wait_closed(self) -> None:
        """Return once the server has been closed and has stopped."""
        await asyncio.shield(self._closed)

    async def _shut_down(self) -> None:
        try:
            if self.conns or self.tasks:
                self._drained = self.loop.create_future()
                self._check_drained()
                await asyncio.wait({self._drained}, timeout=self.shutdown_timeout)
            for conn in list(self.conns):
                conn.abort()
            tasks = list(self.tasks)
            if tasks:
                log.warning("cancelling %d request(s) still running after the shutdown timeout", len(tasks))
                for task in tasks:
                    task.cancel()
                await asyncio.wait(tasks, timeout=self.shutdown_timeout)
        finally:
            if not self._closed.done():
                self._closed.set_result(None)

    def _check_drained(self) -> None:
        d = self._drained
        if d is not None and not d.done() and not self.conns and not self.tasks:
            d.set_result(None)

    def _sweep(self) -> None:
        """Close connections idle too long or too slow to send a request's headers."""
        now = self.loop.time()
        late: list[_Conn] = []
        for conn in self.conns:
            if conn.active is not None or conn.pipeline:
                continue
            if conn.in_head:
                if now - conn.head_t > self.header_timeout:
                    late.append(conn)
            elif now - conn.idle_t > self.keepalive_timeout:
                late.append(conn)
        for conn in late:
            conn.close()
        self._sweeper = self.loop.call_later(self._tick, self._sweep)


async def serve(
    sock: socket.socket,
    app: ASGI,
    *,
    ssl_ctx: ssl.SSLContext | None,
    keepalive_timeout: float = 75.0,
    header_timeout: float = 30.0,
    shutdown_timeout: float = 5.0,
    handshake_timeout: float = 10.0,
    max_head_bytes: int = 64 * 1024,
    max_headers: int = 100,
    backlog: int = 2048,
) -> Server:
    """Serve ``app`` on the listening socket ``sock``; return once it accepts connections."""
    loop = asyncio.get_running_loop()
    server = Server(
        app,
        loop,
        scheme="https" if ssl_ctx is not None else "http",
        keepalive_timeout=keepalive_timeout,
        header_timeout=header_timeout,
        shutdown_timeout=shutdown_timeout,
        max_head_bytes=max_head_bytes,
        max_headers=max_headers,
    )
    server._aserver = await loop.create_server(
        server._protocol,
        sock=sock,
        ssl=ssl_ctx,
        ssl_handshake_timeout=handshake_timeout if ssl_ctx is not None else None,
        backlog=backlog,
    )
    server._sweeper = loop.call_later(server._tick, server._sweep)
    return server


# -------------------------------------------------------------------- connection


def _addr(value: object) -> tuple[str, int] | None:
    if isinstance(value, tuple) and len(value) >= 2:
        return (str(value[0]), int(value[1]))
    return None


class _Conn(asyncio.Protocol):
    """One client connection: parses requests, runs them one at a time, in order."""

    __slots__ = (
        "active",
        "client",
        "closing",
        "drain_waiter",
        "expect",
        "head_bytes",
        "head_size",
        "head_t",
        "headers",
        "idle_t",
        "in_head",
        "lost",
        "parser",
        "parsing",
        "pipeline",
        "read_paused",
        "reject_reply",
        "rejected",
        "server",
        "sockname",
        "transport",
        "url",
        "write_paused",
    )

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client: tuple[str, int] | None = None
        self.sockname: tuple[str, int] | None = None
        self.active: _Request | None = None  # the request whose app runs / response is written
        self.parsing: _Request | None = None  # the request whose body the parser is reading
        self.pipeline: deque[_Request] = deque()  # parsed, waiting for `active` to finish
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0  # request line and headers of the request being parsed
        self.expect = False
        self.in_head = False  # between a request's first byte and the end of its headers
        self.head_size = 0  # bytes received since the last request's head or body ended
        self.head_t = 0.0
        self.idle_t = 0.0
        self.read_paused = False
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.reject_reply: bytes | None = None  # written once the responses under way are done
        self.rejected = False  # nothing more is parsed
        self.closing = False  # close once the current response is complete
        self.lost = False

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, hence the cast.
        self.transport = cast(asyncio.Transport, transport)
        server = self.server
        if server.closing:
            transport.close()
            return
        server.conns.add(self)
        self.client = _addr(transport.get_extra_info("peername"))
        self.sockname = _addr(transport.get_extra_info("sockname"))
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # A small response must never wait for Nagle + delayed ACK (40 ms).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.idle_t = server.loop.time()

    def data_received(self, data: bytes) -> None:
        if self.rejected:
            return
        self.head_size += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, _Reject):
                self._reject(cause.status)
            else:
                log.error("HTTP request parsing failed", exc_info=cause)
                self._reject(400)
            return
        except httptools.HttpParserUpgrade:
            # Upgrade (WebSocket, h2c): the request was handed to the app like
            # any other; what follows it on the connection is not HTTP/1.1, so stop here.
            req = self.parsing
            if req is not None:
                self.parsing = None
                req.complete = True
                req.wake()
            last = self.pipeline[-1] if self.pipeline else self.active
            if last is not None:
                last.keep_alive = False  # its answer says `connection: close`
            self._reject_after(b"")
            return
        except httptools.HttpParserError:
            self._reject(400)
            return
        if self.in_head and self.head_size > self.server.max_head_bytes:
            self._reject(431)

    def eof_received(self) -> bool | None:
        # The client closed its end.  It may be a half-close, but a FIN looks the same as a
        # client that has gone, and a stream (SSE) must learn that its client has gone:
        # close (as uvicorn does), so the apps see http.disconnect.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        server = self.server
        server.conns.discard(self)
        self._disconnect_all()
        self.parsing = None
        d = self.drain_waiter
        if d is not None:
            self.drain_waiter = None
            if not d.done():
                d.set_result(None)
        if server.closing:
            server._check_drained()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        d = self.drain_waiter
        if d is not None:
            self.drain_waiter = None
            if not d.done():
                d.set_result(None)

    # -- httptools callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_head = True
        self.head_t = self.server.loop.time()
        self.url = b""
        self.headers = []
        self.head_bytes = 0
        self.expect = False

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            return  # a chunked body's trailer: dropped (the app has the headers already)
        name = name.lower()
        headers = self.headers
        headers.append((name, value))
        # A whole head arriving in one read is parsed before data_received can count it.
        size = self.head_bytes + len(name) + len(value) + 4
        self.head_bytes = size
        if size > self.server.max_head_bytes or len(headers) > self.server.max_headers:
            raise _Reject(431)
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect = True

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_size = 0
        parser = self.parser
        url = self.url
        if url[:1] == b"/":
            raw_path, _, query = url.partition(b"?")
        else:  # absolute-form ("http://host/path"); authority-form (CONNECT) is refused
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                raise _Reject(400) from None
            raw_path = parsed.path or b"/"
            query = parsed.query or b""
        try:
            path = raw_path.decode("ascii")
        except UnicodeDecodeError:
            raise _Reject(400) from None
        if "%" in path:
            path = unquote(path)
        m = parser.get_method()
        method = _METHODS.get(m) or m.decode("ascii")
        version = parser.get_http_version()
        server = self.server
        scope = {
            "type": "http",
            "asgi": _ASGI_VERSION,
            "http_version": version,
            "server": self.sockname,
            "client": self.client,
            "scheme": server.scheme,
            "method": method,
            "root_path": "",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "headers": self.headers,
        }
        http11 = version == "1.1"
        req = _Request(self, scope, http11 and parser.should_keep_alive(), method == "HEAD", http11)
        req.expect_100 = self.expect
        self.parsing = req
        if self.active is None:
            self._start(req)
        else:
            self.pipeline.append(req)
            if not self.read_paused:
                self._pause_reading()

    def on_body(self, body: bytes) -> None:
        req = self.parsing
        if req is None or req.finished or req.disconnected:
            return  # the response is complete: what is left of the body is dropped
        req.chunks.append(body)
        req.buffered += len(body)
        req.expect_100 = False  # the body is coming: no 100 Continue needed
        if req.waiter is not None:
            req.wake()
        if req.buffered > HIGH_WATER and not self.read_paused:
            self._pause_reading()

    def on_message_complete(self) -> None:
        req = self.parsing
        self.parsing = None
        self.head_size = 0
        if req is not None:
            req.complete = True
            if req.waiter is not None:
                req.wake()

    # -- requests ----------------------------------------------------------------------

    def _start(self, req: _Request) -> None:
        self.active = req
        server = self.server
        task = server.loop.create_task(server.app(req.scope, req.receive, req.send))
        server.tasks.add(task)
        task.add_done_callback(req.task_done)

    def response_done(self, req: _Request) -> None:
        """``req``'s response is complete: start the next request, or wait for one."""
        if self.active is not req:
            return
        self.active = None
        if not req.keep_alive or self.closing:
            self.close()
            return
        if self.parsing is req:
            # The app answered without reading the whole body: drop what is buffered; the
            # rest is dropped as it arrives, and the connection stays usable.
            req.chunks.clear()
            req.buffered = 0
        if self.pipeline:
            self._start(self.pipeline.popleft())
        elif self.reject_reply is not None:
            self._write_close(self.reject_reply)
            return
        else:
            self.idle_t = self.server.loop.time()
        if self.read_paused:
            self.maybe_resume()

    def shutdown(self) -> None:
        """The server is closing: close now if idle, else after the current response."""
        if self.active is None:
            self.close()
        else:
            self.closing = True

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self._disconnect_all()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._disconnect_all()

    def _disconnect_all(self) -> None:
        req = self.active
        if req is not None:
            req.disconnected = True
            req.wake()
        for req in self.pipeline:
            req.disconnected = True
            req.wake()
        self.pipeline.clear()

    def _write_close(self, data: bytes) -> None:
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)
        self.close()

    def _reject(self, status: int) -> None:
        """An invalid request: answer ``status`` after the responses under way, then close."""
        req = self.parsing
        self.parsing = None
        if req is not None and not req.finished:
            if req is self.active:
                self.rejected = True
                if req.head_sent:  # the app is answering a request we cannot finish reading
                    self.close()
                    return
                # The app has not begun its answer: answer for it (what it sends later is dropped).
                req.finished = req.disconnected = True
                req.wake()
                self.active = None
            elif self.pipeline and self.pipeline[-1] is req:
                self.pipeline.pop()
                req.disconnected = True
        self._reject_after(_REPLIES[status])

    def _reject_after(self, reply: bytes) -> None:
        self.rejected = True
        if not self.read_paused:
            self._pause_reading()
        if self.active is None:
            self._write_close(reply)
        else:
            self.reject_reply = reply

    def _pause_reading(self) -> None:
        self.read_paused = True
        if self.transport is not None and not self.lost:
            self.transport.pause_reading()

    def maybe_resume(self) -> None:
        if self.rejected or self.pipeline or self.lost:
            return
        req = self.parsing
        if req is not None and req.buffered > HIGH_WATER:
            return
        self.read_paused = False
        if self.transport is not None:
            self.transport.resume_reading()

    def drain(self) -> asyncio.Future[None]:
        d = self.drain_waiter
        if d is None or d.done():
            d = self.drain_waiter = self.server.loop.create_future()
        return d


# ----------------------------------------------------------------------- request


class _Request:
    """One request: its scope, its body as it arrives, and its response's state."""

    __slots__ = (
        "buffered",
        "chunks",
        "close_header",
        "complete",
        "conn",
        "disconnected",
        "expect_100",
        "finished",
        "framing",
        "head",
        "head_sent",
        "http11",
        "is_head",
        "keep_alive",
        "last_sent",
        "length",
        "scope",
        "waiter",
        "waiters",
    )

    def __init__(
        self, conn: _Conn, scope: dict[str, Any], keep_alive: bool, is_head: bool, http11: bool
    ) -> None:
        self.conn = conn
        self.scope = scope
        self.keep_alive = keep_alive
        self.is_head = is_head
        self.http11 = http11
        self.expect_100 = False
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.complete = False  # the whole request body has been parsed
        self.last_sent = False  # the app has been given the last http.request
        self.disconnected = False
        self.finished = False  # the response is complete
        self.head: bytes | None = None  # status line and the app's headers, once started
        self.head_sent = False
        self.close_header = False  # the app sent `connection: close` itself
        self.framing = _UNDECIDED
        self.length = 0  # body bytes still due under content-length
        self.waiter: asyncio.Future[None] | None = None
        self.waiters: list[asyncio.Future[None]] | None = None  # more than one receive() waiting

    # -- receive -----------------------------------------------------------------------

    async def receive(self) -> Message:
        while True:
            if self.chunks:
                chunks = self.chunks
                body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self.buffered = 0
                more = not self.complete
                self.last_sent = not more
                conn = self.conn
                if conn.read_paused:
                    conn.maybe_resume()
                return {"type": "http.request", "body": body, "more_body": more}
            if self.complete and not self.last_sent:
                self.last_sent = True
                return {"type": "http.request", "body": b"", "more_body": False}
            if self.disconnected or self.finished:
                return {"type": "http.disconnect"}
            if self.expect_100:
                self.expect_100 = False
                if not self.complete and not self.head_sent:
                    self._write(_CONTINUE)
            await self._wait()

    def _wait(self) -> asyncio.Future[None]:
        fut = self.conn.server.loop.create_future()
        w = self.waiter
        if w is None or w.done():
            self.waiter = fut
        elif self.waiters is None:
            self.waiters = [fut]
        else:
            self.waiters.append(fut)
        return fut

    def wake(self) -> None:
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)
        more = self.waiters
        if more is not None:
            self.waiters = None
            for w in more:
                if not w.done():
                    w.set_result(None)

    # -- send --------------------------------------------------------------------------

    def send(self, message: Message) -> Awaitable[None]:
        conn = self.conn
        if self.disconnected:
            return conn.server.ready
        kind = message["type"]
        if kind == "http.response.body":
            if self.head is None:
                raise RuntimeError("http.response.body before http.response.start")
            if self.finished:
                raise RuntimeError("http.response.body after the response was complete")
            body = message.get("body", b"")
            more = message.get("more_body", False)
            if not self.head_sent:
                data = self._first(body, more)
            else:
                framing = self.framing
                if framing == _CHUNKED:
                    if body:
                        data = b"".join((b"%x\r\n" % len(body), body, _END, b"" if more else _CHUNK_END))
                    else:
                        data = b"" if more else _CHUNK_END
                elif framing == _LENGTH:
                    left = self.length - len(body)
                    if left < 0 or (left and not more):
                        raise RuntimeError("response body does not match its content-length")
                    self.length = left
                    data = body
                elif framing == _RAW:
                    data = body
                else:
                    data = b""
            if data:
                self._write(data)
            if not more:
                self.finished = True
                self.wake()
                conn.response_done(self)
            elif conn.write_paused:
                return conn.drain()
            return conn.server.ready
        if kind == "http.response.start":
            if self.head is not None:
                raise RuntimeError("http.response.start sent twice")
            self._start_response(message)
            return conn.server.ready
        raise RuntimeError(f"unsupported ASGI message type {kind!r}")

    def _start_response(self, message: Message) -> None:
        status = message["status"]
        line = _STATUS.get(status)
        if line is None:
            raise RuntimeError(f"invalid HTTP status {status!r}")
        parts = [line]
        framing = _UNDECIDED
        n = 0
        for name, value in message.get("headers") or ():
            parts += (name, b": ", value, b"\r\n")
            n += 1
            size = len(name)
            if size == 14 or size == 17 or size == 10:
                lname = name.lower()
                if lname == b"content-length":
                    try:
                        self.length = int(value)
                    except ValueError:
                        raise RuntimeError(f"invalid content-length {value!r}") from None
                    if framing == _UNDECIDED:
                        framing = _LENGTH
                elif lname == b"transfer-encoding":
                    if b"chunked" in value.lower():
                        framing = _CHUNKED
                elif lname == b"connection" and b"close" in value.lower():
                    self.keep_alive = False
                    self.close_header = True
        head = b"".join(parts)
        # One scan of the block instead of a check per header: a CR or LF inside a name or
        # a value (a response-splitting attempt) makes more line ends than lines.
        if head.count(b"\n") != n + 1 or head.count(b"\r") != n + 1:
            raise RuntimeError("invalid character in a response header")
        if self.is_head or status < 200 or status == 204 or status == 304:
            framing = _NONE
        self.head = head
        self.framing = framing
        if framing in (_UNDECIDED, _CHUNKED):
            # A stream: if its first body is not sent in this loop iteration, the headers
            # go out at its end, alone (an SSE stream's client must see them at once).
            self.conn.server.loop.call_soon(self._flush_head)

    def _end_of_head(self, chunked: bool) -> bytes:
        """The framing and connection headers, and the blank line."""
        conn = self.conn
        if self.expect_100 and not self.complete:
            # We never asked for the body (100 Continue): the client may not send it.
            self.keep_alive = False
        if conn.closing:
            self.keep_alive = False
        close = not self.keep_alive and not self.close_header
        if chunked:
            return _END_CHUNKED_CLOSE if close else _END_CHUNKED
        return _END_CLOSE if close else _END

    def _first(self, body: bytes, more: bool) -> bytes:
        """The first body of the response, with the header block in front of it."""
        head = self.head
        assert head is not None
        self.head_sent = True
        framing = self.framing
        if framing == _UNDECIDED:
            if not more:
                self.framing = _LENGTH
                self.length = 0
                return b"".join((head, b"content-length: %d\r\n" % len(body), self._end_of_head(False), body))
            if self.http11:
                framing = self.framing = _CHUNKED
            else:
                framing = self.framing = _RAW
                self.keep_alive = False
        if framing == _LENGTH:
            left = self.length - len(body)
            if left < 0 or (left and not more):
                self.head_sent = False
                raise RuntimeError("response body does not match its content-length")
            self.length = left
            return b"".join((head, self._end_of_head(False), body))
        if framing == _CHUNKED:
            end = self._end_of_head(True)
            if not body:
                return b"".join((head, end, b"" if more else _CHUNK_END))
            return b"".join((head, end, b"%x\r\n" % len(body), body, _END, b"" if more else _CHUNK_END))
        if framing == _RAW:
            return b"".join((head, self._end_of_head(False), body))
        return b"".join((head, self._end_of_head(False)))  # _NONE: HEAD, 204, 304

    def _flush_head(self) -> None:
        if self.head_sent or self.finished or self.disconnected:
            return
        self._write(self._first(b"", True))

    def _write(self, data: bytes) -> None:
        transport = self.conn.transport
        try:
            if transport is not None:
                transport.write(data)
        except (RuntimeError, OSError):  # uvloop raises on a transport closed under us
            self.disconnected = True

    # -- the app's task ----------------------------------------------------------------

    def task_done(self, task: asyncio.Task[None]) -> None:
        conn = self.conn
        server = conn.server
        server.tasks.discard(task)
        if server.closing:
            server._check_drained()
        if task.cancelled():
            pass
        elif (exc := task.exception()) is not None:
            log.error(
                "exception in ASGI application",
                exc_info=exc,
                extra={"method": self.scope["method"], "path": self.scope["path"]},
            )
        elif not (self.finished or self.disconnected):
            log.error(
                "ASGI application returned without completing its response",
                extra={"method": self.scope["method"], "path": self.scope["path"]},
            )
        if self.finished or self.disconnected:
            return
        self.finished = True
        if self.head_sent:
            conn.close()  # the answer began and cannot be completed
        else:
            self.head_sent = True
            conn._write_close(_REPLIES[500])
