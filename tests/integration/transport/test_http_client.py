"""The lean upstream HTTP/1.1 client against real servers on loopback.

Two kinds of server, both on 127.0.0.1 port 0 and in the test's own event loop (so a
test can gate what the server sends with asyncio primitives):

* uvicorn (httptools) with a raw ASGI app — the kind of upstream the gateway talks to;
* a raw asyncio protocol server for edge cases uvicorn never produces (closing idle
  connections, resets, garbage, close-delimited bodies, back-pressure).

No sleeps wait for conditions: every wait is an event or future under asyncio.wait_for.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bastion.errors import UpstreamError
from bastion.transport import http as http_mod
from bastion.transport.http import (
    HTTPUpstreamPool,
    UpstreamTimeoutError,
    UpstreamUnreachableError,
)

DEADLINE = 10.0

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


# ------------------------------------------------------------------ uvicorn upstream


@dataclass
class Controls:
    """What the ASGI app did, and the gates the test opens."""

    requests: int = 0
    sse_sent: int = 0
    sse_permits: asyncio.Queue[None] = field(default_factory=asyncio.Queue)
    release_slow: asyncio.Event = field(default_factory=asyncio.Event)
    slow_entered: asyncio.Event = field(default_factory=asyncio.Event)


def make_app(ctl: Controls) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        ctl.requests += 1
        path, method = scope["path"], scope["method"]
        query = dict(p.split("=", 1) for p in scope["query_string"].decode().split("&") if p)
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break

        async def start(status: int, headers: list[tuple[bytes, bytes]]) -> None:
            await send({"type": "http.response.start", "status": status, "headers": headers})

        async def chunk(data: bytes, more: bool = True) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": more})

        if path == "/echo":
            req_headers = dict(scope["headers"])
            await start(
                200,
                [
                    (b"content-type", b"application/json; charset=utf-8"),
                    (b"content-length", b"%d" % len(body)),
                    (b"X-Echo-Method", method.encode()),
                    (b"x-echo-test", req_headers.get(b"x-test", b"")),
                    (b"x-echo-host", req_headers.get(b"host", b"")),
                ],
            )
            await chunk(body, more=False)
        elif path == "/sse":
            await start(200, [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")])
            for i in range(int(query.get("n", "3"))):
                if i:
                    await ctl.sse_permits.get()  # the test decides when the next event goes
                await chunk(b"data: %d\n\n" % i)
                ctl.sse_sent += 1
            await chunk(b"", more=False)
        elif path == "/chunked":
            await start(200, [(b"content-type", b"text/plain")])
            for part in (b"alpha-", b"beta-", b"gamma"):
                await chunk(part)
            await chunk(b"", more=False)
        elif path == "/large":
            size = int(query["size"])
            block = bytes(range(256)) * 4096  # 1 MiB
            headers = [(b"content-type", b"application/octet-stream")]
            if query.get("chunked") != "1":
                headers.append((b"content-length", b"%d" % size))
            await start(200, headers)
            sent = 0
            while sent < size:
                part = block[: min(len(block), size - sent)]
                sent += len(part)
                await chunk(part)
            await chunk(b"", more=False)
        elif path == "/close":
            await start(200, [(b"connection", b"close"), (b"content-length", b"3")])
            await chunk(b"bye", more=False)
        elif path == "/slow":
            ctl.slow_entered.set()
            await ctl.release_slow.wait()
            await start(200, [(b"content-length", b"4")])
            await chunk(b"late", more=False)
        elif path == "/nocontent":
            await start(204, [])
            await chunk(b"", more=False)
        else:
            await start(404, [(b"content-length", b"0")])
            await chunk(b"", more=False)

    return app


@asynccontextmanager
async def run_uvicorn(
    app: Callable[[Scope, Receive, Send], Awaitable[None]],
    *,
    certfile: Path | None = None,
    keyfile: Path | None = None,
) -> AsyncIterator[int]:
    """uvicorn on a socket we bound and listen on first: connections queue until it serves."""
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only when the listening
    # socket says it is TCP; without it every response waits 40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_config=None,
        access_log=False,
        http="httptools",
        ws="none",
        ssl_certfile=str(certfile) if certfile else None,
        ssl_keyfile=str(keyfile) if keyfile else None,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, DEADLINE)
        sock.close()


@pytest.fixture
def ctl() -> Controls:
    return Controls()


@pytest.fixture
async def uv_port(ctl: Controls) -> AsyncIterator[int]:
    async with run_uvicorn(make_app(ctl)) as port:
        yield port
        ctl.release_slow.set()  # let a parked /slow handler finish so uvicorn can stop


@asynccontextmanager
async def open_pool(url: str, **kw: Any) -> AsyncIterator[HTTPUpstreamPool]:
    pool = HTTPUpstreamPool(url, **kw)
    try:
        yield pool
    finally:
        await pool.aclose()


async def call(
    pool: HTTPUpstreamPool,
    method: str,
    target: str,
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
) -> tuple[int, bytes]:
    resp = await asyncio.wait_for(pool.request(method, target, headers or [], body), DEADLINE)
    return resp.status, await asyncio.wait_for(resp.read(), DEADLINE)


# ------------------------------------------------------------------ uvicorn tests


async def test_json_echo_headers_and_content_type(uv_port: int) -> None:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "x"}}).encode()
    async with open_pool(f"http://127.0.0.1:{uv_port}") as pool:
        resp = await asyncio.wait_for(
            pool.request("POST", "/echo", [(b"content-type", b"application/json"), (b"X-Test", b"v1")], body),
            DEADLINE,
        )
        assert resp.status == 200
        assert resp.content_type == "application/json"
        assert resp.header(b"x-echo-method") == b"POST"  # case-insensitive lookup
        assert resp.header(b"X-ECHO-TEST") == b"v1"
        assert resp.header(b"x-echo-host") == f"127.0.0.1:{uv_port}".encode()
        assert resp.header(b"x-missing") is None
        assert resp.headers[2:5] == [  # raw and in order (uvicorn sends lower-case names)
            (b"content-type", b"application/json; charset=utf-8"),
            (b"content-length", b"%d" % len(body)),
            (b"x-echo-method", b"POST"),
        ]
        assert await resp.read() == body


async def test_keep_alive_reuses_one_connection(uv_port: int) -> None:
    async with open_pool(f"http://127.0.0.1:{uv_port}") as pool:
        for i in range(100):
            body = b'{"i": %d}' % i
            assert await call(pool, "POST", "/echo", body=body) == (200, body)
        assert pool.stats.opened == 1
        assert pool.stats.reused == 99
        assert pool.stats.stale == pool.stats.retried == 0


async def test_concurrent_requests_respect_max_connections(uv_port: int) -> None:
    async with open_pool(f"http://127.0.0.1:{uv_port}", max_connections=8) as pool:
        bodies = [b'{"n": %d}' % i for i in range(50)]
        results = await asyncio.gather(*(call(pool, "POST", "/echo", body=b) for b in bodies))
        assert results == [(200, b) for b in bodies]
        assert 1 <= pool.stats.opened <= 8
        assert pool.open_connections <= 8
    async with open_pool(f"http://127.0.0.1:{uv_port}") as pool:
        results = await asyncio.gather(*(call(pool, "POST", "/echo", body=b) for b in bodies))
        assert results == [(200, b) for b in bodies]
        assert pool.stats.opened <= 50


async def test_sse_events_stream_without_buffering(uv_port: int, ctl: Controls) -> None:
    async with open_pool(f"http://127.0.0.1:{uv_port}") as pool:
        resp = await asyncio.wait_for(
            pool.request("GET", "/sse?n=3", [(b"accept", b"text/event-stream")]), DEADLINE
        )
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        chunks = resp.iter_chunks()
        assert await asyncio.wait_for(anext(chunks), DEADLINE) == b"data: 0\n\n"
        # The server is parked before its second event: the first came through unbuffered.
        assert ctl.sse_sent == 1
        ctl.sse_permits.put_nowait(None)
        assert await asyncio.wait_for(anext(chunks), DEADLINE) == b"data: 1\n\n"
        assert ctl.sse_sent == 2
        ctl.sse_permits.put_nowait(None)
        assert await asyncio.wait_for(anext(chunks), DEADLINE) == b"data: 2\n\n"
        assert await asyncio.wait_for(anext(chunks, None), DEADLINE) is None
        # The stream ended cleanly (chunked): the connection is reused.
        assert await call(pool, "POST", "/echo", body=b"{}") == (200, b"{}")
        assert pool.stats.opened == 1


async def test_chunked_response(uv_port: int) -> None:
    async with open_pool(f"http://127.0.0.1:{uv_port}") as pool:
        resp = await asyncio.wait_for(pool.request("GET", "/chunked", []), DEADLINE)
        assert resp.header(b"transfer-encoding") == b"chunked"
        assert await asyncio.wait_for(resp.read(), DEADLINE) == b"alpha-beta-gamma"
        assert await call(pool, "GET", "/chunked") == (200, b"alpha-beta-gamma")
        assert pool.stats.opened == 1


@pytest.mark.parametrize("chunked", ["0", "1"])
async def test_large_bodies(uv_port: int, chunked: str) -> None:
    size = 8 * 1024 * 1024 + 17
    expected = (bytes(range(256)) * 4096 * 9)[:size]
    async with open_pool(f"http://127.0.0.1:{uv_port}") as pool:
        status, body = await call(pool, "GET", f"/large?size={size}&chunked={chunked}")
        assert status == 200
        assert len(body) == size
        assert body == expected
        # A large request body goes out whole too.
        big = b"x" * (3 * 1024 * 1024)
        assert await call(pool, "POST", "/echo", body=big) == (200, big)
        assert pool.stats.opened == 1


async def test_body_over_max_size_closes_connection(uv_port: int) -> None:
    async with open_pool(f"http://127.0.0.1:{uv_port}") as pool:
        for chunked in ("0", "1"):
            resp = await asyncio.wait_for(
                pool.request("GET", f"/large?size=2000000&chunked={chunked}", []), DEADLINE
            )
            with pytest.raises(UpstreamError, match="larger than the limit of 100000 bytes"):
                await asyncio.wait_for(resp.read(max_size=100_000), DEADLINE)
        assert await call(pool, "POST", "/echo", body=b"ok") == (200, b"ok")
        assert pool.stats.opened == 3  # neither cut-off connection was reused


async def test_aclose_before_body_end_discards_connection(uv_port: int, ctl: Controls) -> None:
    async with open_pool(f"http://127.0.0.1:{uv_port}") as pool:
        async with await asyncio.wait_for(pool.request("GET", "/sse?n=2", []), DEADLINE) as resp:
            assert await asyncio.wait_for(anext(resp.iter_chunks()), DEADLINE) == b"data: 0\n\n"
        ctl.sse_permits.put_nowait(None)  # let the server's handler finish
        with pytest.raises(UpstreamError, match="closed before its body was read"):
            await resp.read()
        assert await call(pool, "POST", "/echo", body=b"1") == (200, b"1")
        assert pool.stats.opened == 2


async def test_server_closing_connection_is_not_reused(uv_port: int) -> None:
    async with open_pool(f"http://127.0.0.1:{uv_port}") as pool:
        resp = await asyncio.wait_for(pool.request("GET", "/close", []), DEADLINE)
        assert resp.header(b"connection") == b"close"
        assert await resp.read() == b"bye"
        assert await call(pool, "POST", "/echo", body=b"again") == (200, b"again")
        assert pool.stats.opened == 2
        assert pool.stats.retried == 0


async def test_response_timeout(uv_port: int, ctl: Controls) -> None:
    async with open_pool(f"http://127.0.0.1:{uv_port}", response_timeout=0.3) as pool:
        with pytest.raises(UpstreamTimeoutError) as info:
            await asyncio.wait_for(pool.request("GET", "/slow", []), DEADLINE)
        assert info.value.http_status == 504
        assert info.value.origin == "upstream"
        assert "upstream" in str(info.value) and "0.3 s" in str(info.value)
        ctl.release_slow.set()
        assert await call(pool, "POST", "/echo", body=b"after") == (200, b"after")
        assert pool.stats.opened == 2  # the timed-out connection was dropped


async def test_caller_cancellation_drops_the_connection(uv_port: int, ctl: Controls) -> None:
    async with open_pool(f"http://127.0.0.1:{uv_port}") as pool:
        task = asyncio.ensure_future(pool.request("GET", "/slow", []))
        await asyncio.wait_for(ctl.slow_entered.wait(), DEADLINE)  # the request is at the server
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        ctl.release_slow.set()  # its late answer must not reach the next request
        assert await call(pool, "POST", "/echo", body=b"next") == (200, b"next")
        assert pool.stats.opened == 2


async def test_no_content_and_head_have_no_body(uv_port: int) -> None:
    async with open_pool(f"http://127.0.0.1:{uv_port}") as pool:
        assert await call(pool, "GET", "/nocontent") == (204, b"")
        # HEAD: Content-Length announces a body that never comes; the parser must not wait.
        resp = await asyncio.wait_for(pool.request("HEAD", "/large?size=1000", []), DEADLINE)
        assert resp.status == 200
        assert resp.header(b"content-length") == b"1000"
        assert await asyncio.wait_for(resp.read(), DEADLINE) == b""
        assert await call(pool, "POST", "/echo", body=b"z") == (200, b"z")
        assert pool.stats.opened == 1


async def test_waiting_for_a_free_connection_times_out(uv_port: int, ctl: Controls) -> None:
    async with open_pool(f"http://127.0.0.1:{uv_port}", max_connections=1, response_timeout=0.3) as pool:
        # An SSE stream holds the only connection (headers in, body open: no timer runs).
        stream = await asyncio.wait_for(pool.request("GET", "/sse?n=2", []), DEADLINE)
        with pytest.raises(UpstreamTimeoutError, match=r"no connection to upstream .* became free"):
            await asyncio.wait_for(pool.request("POST", "/echo", [], b"x"), DEADLINE)
        ctl.sse_permits.put_nowait(None)
        assert await asyncio.wait_for(stream.read(), DEADLINE) == b"data: 0\n\ndata: 1\n\n"
        assert await call(pool, "POST", "/echo", body=b"y") == (200, b"y")
        assert pool.stats.opened == 1


async def first_n(futures: list[asyncio.Future[None]], n: int) -> None:
    pending: set[asyncio.Future[None]] = set(futures)
    while len(futures) - len(pending) < n:
        _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)


async def test_idle_timeout_and_max_idle() -> None:
    async with RawServer() as srv:
        async with open_pool(srv.url, idle_timeout=0.05) as pool:
            assert await call(pool, "POST", "/a", body=b"1") == (200, b"1")
            assert pool.idle_connections == 1
            # The pool's sweeper closes it; the server sees the connection go.
            await asyncio.wait_for(srv.conns[0].lost, DEADLINE)
            assert pool.idle_connections == 0
        async with open_pool(srv.url, max_idle=0) as pool:
            for i in range(3):
                assert await call(pool, "POST", "/a", body=b"%d" % i) == (200, b"%d" % i)
            assert pool.stats.opened == 3  # nothing may be kept idle
        before = len(srv.conns)
        async with open_pool(srv.url, max_idle=1, idle_timeout=2.0) as pool:  # trim after 0.5 s
            bodies = [b"%d" % i for i in range(3)]
            assert await asyncio.gather(*(call(pool, "POST", "/a", body=b) for b in bodies)) == [
                (200, b) for b in bodies
            ]
            assert pool.stats.opened == 3
            assert pool.idle_connections == 3  # a burst's connections stay for a moment ...
            await asyncio.wait_for(first_n([c.lost for c in srv.conns[before:]], 2), DEADLINE)
            assert pool.idle_connections == 1  # ... then the excess over max_idle is closed


async def test_pool_aclose_refuses_new_requests(uv_port: int) -> None:
    pool = HTTPUpstreamPool(f"http://127.0.0.1:{uv_port}")
    assert await call(pool, "POST", "/echo", body=b"a") == (200, b"a")
    assert pool.idle_connections == 1
    await pool.aclose()
    assert pool.idle_connections == 0
    assert pool.open_connections == 0
    with pytest.raises(UpstreamUnreachableError, match="closed"):
        await pool.request("GET", "/echo", [])


# ------------------------------------------------------------------ raw asyncio upstream


class RawConn(asyncio.Protocol):
    """Server side of one connection; ``server.handler`` scripts the answer to each request."""

    def __init__(self, server: RawServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.lost = asyncio.get_running_loop().create_future()
        self.write_blocked = asyncio.Event()
        self.firehose_done = asyncio.Event()
        self._paused = False
        self._remaining = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.server.conns.append(self)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, rest = self.buf.split(b"\r\n\r\n", 1)
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            body, self.buf = rest[:length], rest[length:]
            self.server.requests.append((head, body))
            self.server.handler(self, head, body)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def reset(self) -> None:
        """Close with RST (SO_LINGER 0), as a crashed or impatient server does."""
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    # A body far larger than every buffer, pumped one block per loop iteration so the client
    # gets to read in between; pause_writing tells us the client stopped reading.
    def firehose(self, total: int) -> None:
        self.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        self._remaining = total
        self._pump()

    def _pump(self) -> None:
        if self._paused or self.transport is None or self.transport.is_closing():
            return
        n = min(65536, self._remaining)
        self.transport.write(b"\xab" * n)
        self._remaining -= n
        if self._remaining:
            asyncio.get_running_loop().call_soon(self._pump)
        else:
            self.firehose_done.set()

    def pause_writing(self) -> None:
        self._paused = True
        self.write_blocked.set()

    def resume_writing(self) -> None:
        self._paused = False
        self._pump()


Handler = Callable[[RawConn, bytes, bytes], None]


def ok(conn: RawConn, head: bytes, body: bytes) -> None:
    conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


class RawServer:
    def __init__(self, handler: Handler = ok) -> None:
        self.handler = handler
        self.requests: list[tuple[bytes, bytes]] = []
        self.conns: list[RawConn] = []
        self.server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> RawServer:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: RawConn(self), "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for c in self.conns:
            if c.transport is not None:
                c.transport.abort()
        await asyncio.wait_for(asyncio.gather(*(c.lost for c in self.conns)), DEADLINE)
        await asyncio.wait_for(self.server.wait_closed(), DEADLINE)


async def call_now(pool: HTTPUpstreamPool, body: bytes) -> tuple[int, bytes]:
    """``call`` without wait_for's extra task: the request starts in this very loop step.

    After a server-side close, the test task wakes one step before the client protocol
    hears of it, so this reproduces "EOF is in the socket, not yet seen by the protocol".
    The deadline is the pool's response_timeout (DEADLINE).
    """
    resp = await pool.request("POST", "/a", [], body)
    return resp.status, await asyncio.wait_for(resp.read(), DEADLINE)


@pytest.mark.parametrize("eof_delivered", [False, True])
async def test_idle_connection_closed_by_server_is_discarded_before_writing(eof_delivered: bool) -> None:
    async with RawServer() as srv, open_pool(srv.url, response_timeout=DEADLINE) as pool:
        assert await call(pool, "POST", "/a", body=b"1") == (200, b"1")
        assert pool.idle_connections == 1
        first = srv.conns[0]
        assert first.transport is not None
        first.transport.close()  # the server drops the idle connection (its keep-alive timeout)
        await asyncio.wait_for(first.lost, DEADLINE)
        if eof_delivered:
            # wait_for's task runs after the client protocol saw EOF: it left the idle list.
            assert await call(pool, "POST", "/a", body=b"2") == (200, b"2")
            assert pool.stats.stale == 0
        else:
            # The FIN is only in the client's socket: the poll before writing sees it.
            assert await call_now(pool, b"2") == (200, b"2")
            assert pool.stats.stale == 1
        assert pool.stats.opened == 2
        assert pool.stats.retried == 0
        assert [b for _, b in srv.requests] == [b"1", b"2"]  # each request reached it once


async def test_write_refused_on_reused_connection_is_retried_once(monkeypatch: pytest.MonkeyPatch) -> None:
    async with RawServer() as srv, open_pool(srv.url, response_timeout=DEADLINE) as pool:
        assert await call(pool, "POST", "/a", body=b"1") == (200, b"1")
        # Simulate the race rule 1 cannot close: the reset arrives between check and write.
        monkeypatch.setattr(http_mod._Connection, "reusable", lambda self: True)
        srv.conns[0].reset()
        await asyncio.wait_for(srv.conns[0].lost, DEADLINE)
        # The RST is in the client's socket: the write fails on the spot (ECONNRESET).
        assert await call_now(pool, b"2") == (200, b"2")
        assert pool.stats.retried == 1
        assert pool.stats.opened == 2
        assert [b for _, b in srv.requests] == [b"1", b"2"]


async def test_request_lost_after_write_is_not_retried() -> None:
    def answer_once(conn: RawConn, head: bytes, body: bytes) -> None:
        if body == b"first":
            ok(conn, head, body)
        else:  # read the request, then drop the connection without a word
            assert conn.transport is not None
            conn.transport.close()

    async with RawServer(answer_once) as srv, open_pool(srv.url) as pool:
        assert await call(pool, "POST", "/a", body=b"first") == (200, b"first")
        with pytest.raises(UpstreamError, match="closed the connection before responding") as info:
            await call(pool, "POST", "/a", body=b"second")
        assert info.value.origin == "upstream"
        assert pool.stats.retried == 0
        assert [b for _, b in srv.requests] == [b"first", b"second"]  # POST sent exactly once


async def test_garbage_response_is_an_upstream_error() -> None:
    def garbage(conn: RawConn, head: bytes, body: bytes) -> None:
        conn.write(b"SMTP ready\r\n\r\n")

    async with RawServer(garbage) as srv, open_pool(srv.url) as pool:
        with pytest.raises(UpstreamError, match="invalid HTTP response") as info:
            await call(pool, "POST", "/a", body=b"x")
        assert type(info.value) is UpstreamError
        assert info.value.http_status == 502


async def test_oversized_response_head_is_refused() -> None:
    def huge_head(conn: RawConn, head: bytes, body: bytes) -> None:
        conn.write(b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * (http_mod.MAX_HEAD_BYTES + 10) + b"\r\n")

    async with RawServer(huge_head) as srv, open_pool(srv.url) as pool:
        with pytest.raises(UpstreamError, match="exceed"):
            await call(pool, "GET", "/a")


async def test_two_responses_to_one_request_are_refused() -> None:
    def twice(conn: RawConn, head: bytes, body: bytes) -> None:
        ok(conn, head, body)
        ok(conn, head, body)

    async with RawServer(twice) as srv, open_pool(srv.url) as pool:
        status, body = await call(pool, "POST", "/a", body=b"q")  # the first is fine ...
        assert (status, body) == (200, b"q")
        assert pool.idle_connections == 0  # ... but the connection cannot be trusted after
        assert await call(pool, "POST", "/a", body=b"r") == (200, b"r")
        assert pool.stats.opened == 2


async def test_connection_refused_is_unreachable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        async with open_pool(f"http://127.0.0.1:{port}") as pool:
            with pytest.raises(UpstreamUnreachableError) as info:
                await asyncio.wait_for(pool.request("GET", "/", []), DEADLINE)
    msg = str(info.value)
    assert f"127.0.0.1:{port}" in msg and "refused" in msg.lower() and "upstream" in msg
    assert info.value.http_status == 502
    assert pool.open_connections == 0  # the failed connect gave its slot back


async def test_close_delimited_body() -> None:
    def http10(conn: RawConn, head: bytes, body: bytes) -> None:
        assert conn.transport is not None
        conn.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\npart one, ")
        conn.write(b"part two")
        conn.transport.close()

    async with RawServer(http10) as srv, open_pool(srv.url) as pool:
        assert await call(pool, "GET", "/a") == (200, b"part one, part two")
        assert await call(pool, "GET", "/a") == (200, b"part one, part two")
        assert pool.stats.opened == 2


async def test_truncated_body_is_an_error() -> None:
    def short(conn: RawConn, head: bytes, body: bytes) -> None:
        assert conn.transport is not None
        conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        conn.transport.close()

    async with RawServer(short) as srv, open_pool(srv.url) as pool:
        resp = await asyncio.wait_for(pool.request("GET", "/a", []), DEADLINE)
        with pytest.raises(UpstreamError, match="mid-response"):
            await asyncio.wait_for(resp.read(), DEADLINE)


async def test_interim_response_is_skipped() -> None:
    def early_hints(conn: RawConn, head: bytes, body: bytes) -> None:
        conn.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n")
        ok(conn, head, body)

    async with RawServer(early_hints) as srv, open_pool(srv.url) as pool:
        resp = await asyncio.wait_for(pool.request("POST", "/a", [], b"hi"), DEADLINE)
        assert resp.status == 200 and resp.header(b"link") is None
        assert resp.headers == [(b"Content-Length", b"2")]  # as sent: original case
        assert await resp.read() == b"hi"


async def test_stray_bytes_on_idle_connection_discard_it() -> None:
    async with RawServer() as srv, open_pool(srv.url) as pool:
        assert await call(pool, "POST", "/a", body=b"1") == (200, b"1")
        srv.conns[0].write(b"HTTP/1.1 200 OK\r\n")  # unsolicited: framing is lost
        await asyncio.wait_for(srv.conns[0].lost, DEADLINE)  # the client closes it on sight
        assert await call(pool, "POST", "/a", body=b"2") == (200, b"2")
        assert pool.stats.opened == 2


async def test_streaming_back_pressure_bounds_the_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    total = 64 * 1024 * 1024  # far more than socket buffers plus the client's high-water mark
    max_buffered = 0
    feed = http_mod.UpstreamResponse._feed

    def tracking_feed(self: http_mod.UpstreamResponse, data: bytes) -> None:
        nonlocal max_buffered
        feed(self, data)
        max_buffered = max(max_buffered, self._buffered)

    monkeypatch.setattr(http_mod.UpstreamResponse, "_feed", tracking_feed)

    def firehose(conn: RawConn, head: bytes, body: bytes) -> None:
        conn.firehose(total)

    async with RawServer(firehose) as srv, open_pool(srv.url) as pool:
        resp = await asyncio.wait_for(pool.request("GET", "/stream", []), DEADLINE)
        server = srv.conns[0]
        # The consumer reads nothing: the client must stop reading, the kernel buffers
        # fill, and the server's transport reports it cannot write.
        await asyncio.wait_for(server.write_blocked.wait(), DEADLINE)
        assert not server.firehose_done.is_set()
        assert max_buffered <= http_mod._HIGH_WATER + 256 * 1024
        received = 0
        async for chunk in resp.iter_chunks():
            received += len(chunk)
        assert received == total
        assert server.firehose_done.is_set()
        assert max_buffered <= http_mod._HIGH_WATER + 256 * 1024
        assert pool.idle_connections == 1  # the body was read to its end: reusable


async def test_request_validation() -> None:
    pool = HTTPUpstreamPool("http://127.0.0.1:9")
    with pytest.raises(ValueError, match="CR or LF"):
        await pool.request("POST", "/", [(b"x-a", b"b\r\nInjected: 1")])
    with pytest.raises(ValueError, match="set by the pool"):
        await pool.request("POST", "/", [(b"Content-Length", b"5")])
    with pytest.raises(ValueError, match="invalid request target"):
        await pool.request("GET", "/a b", [])
    with pytest.raises(ValueError, match="invalid HTTP method"):
        await pool.request("GE T", "/", [])
    for bad in ("ftp://x", "http://u:p@h", "http://h/path", "http://h:99999"):
        with pytest.raises(ValueError, match="upstream URL"):
            HTTPUpstreamPool(bad)
    assert HTTPUpstreamPool("https://[::1]:8443/").origin == "https://[::1]:8443"
    assert HTTPUpstreamPool("http://example.com:80")._host_header == b"example.com"
    await pool.aclose()


# ------------------------------------------------------------------ TLS


def self_signed(tmp_path: Path) -> tuple[Path, Path, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bastion test upstream")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    certfile.write_bytes(cert_pem)
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return certfile, keyfile, cert_pem.decode()


async def test_tls_verification(tmp_path: Path, ctl: Controls) -> None:
    certfile, keyfile, ca_pem = self_signed(tmp_path)
    async with run_uvicorn(make_app(ctl), certfile=certfile, keyfile=keyfile) as port:
        url = f"https://127.0.0.1:{port}"
        async with open_pool(url) as pool:
            with pytest.raises(UpstreamUnreachableError) as info:
                await asyncio.wait_for(pool.request("GET", "/echo", []), DEADLINE)
            msg = str(info.value)
            assert "certificate" in msg and "upstream" in msg and f"127.0.0.1:{port}" in msg
            assert pool.open_connections == 0
        async with open_pool(url, ca_pem=ca_pem) as pool:
            for i in range(5):
                assert await call(pool, "POST", "/echo", body=b"%d" % i) == (200, b"%d" % i)
            assert pool.stats.opened == 1
            status, body = await call(pool, "GET", "/large?size=3000000&chunked=1")
            assert status == 200 and len(body) == 3_000_000
        async with open_pool(url, verify=False) as pool:
            assert await call(pool, "POST", "/echo", body=b"insecure") == (200, b"insecure")


# ------------------------------------------------------------------ uvloop


def test_under_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        async with RawServer() as srv, open_pool(srv.url) as pool:
            for i in range(20):
                assert await call(pool, "POST", "/a", body=b"%d" % i) == (200, b"%d" % i)
            assert pool.stats.opened == 1
            srv.conns[0].reset()
            await asyncio.wait_for(srv.conns[0].lost, DEADLINE)
            assert await call(pool, "POST", "/a", body=b"after") == (200, b"after")
            assert pool.stats.opened == 2
        ctl = Controls()
        async with run_uvicorn(make_app(ctl)) as port, open_pool(f"http://127.0.0.1:{port}") as pool:
            resp = await asyncio.wait_for(pool.request("GET", "/sse?n=2", []), DEADLINE)
            chunks = resp.iter_chunks()
            assert await asyncio.wait_for(anext(chunks), DEADLINE) == b"data: 0\n\n"
            assert ctl.sse_sent == 1
            ctl.sse_permits.put_nowait(None)
            assert await asyncio.wait_for(anext(chunks), DEADLINE) == b"data: 1\n\n"
            assert await asyncio.wait_for(anext(chunks, None), DEADLINE) is None

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
