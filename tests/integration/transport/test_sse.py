"""The legacy HTTP+SSE upstream against a real server on loopback, and its event-stream parser."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import pytest

from bastion.errors import UpstreamError
from bastion.transport import UpstreamClosedError
from bastion.transport.sse import SSEUpstream, _Event, _SSEParser, connect_sse

DEADLINE = 10.0
_CLOSE = b""  # queued to a stream: end it cleanly


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes = b""


@dataclass
class LegacySSEServer:
    """A 2024-11-05 HTTP+SSE MCP server written on raw asyncio streams, so tests control every byte.

    ``GET /sse`` answers a chunked ``text/event-stream`` whose first event is
    ``endpoint`` (``endpoint`` is formatted with ``origin``; ``None`` = never
    sent); each ``POST /message?sessionId=S`` is answered ``post_status`` and,
    when 2xx, echoed back on session S's stream as a ``message`` event.
    """

    endpoint: str | None = "/message?sessionId=abc"
    get_status: int = 200
    content_type: str = "text/event-stream"
    post_status: int = 202
    requests: list[Request] = field(default_factory=list)
    open_streams: int = 0
    origin: str = ""
    _sessions: dict[str, asyncio.Queue[bytes]] = field(default_factory=dict)
    _conns: set[asyncio.Task[object]] = field(default_factory=set)
    _server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.origin = f"http://127.0.0.1:{port}"
        return f"{self.origin}/sse"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.wait(self._conns, timeout=DEADLINE)
        if self._server is not None:
            await self._server.wait_closed()

    def end_streams(self) -> None:
        for q in self._sessions.values():
            q.put_nowait(_CLOSE)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                first, *lines = head.decode("latin-1").split("\r\n")
                method, target, _ = first.split(" ", 2)
                headers = {}
                for line in lines:
                    if line:
                        k, _, v = line.partition(":")
                        headers[k.strip().lower()] = v.strip()
                req = Request(method, target, headers)
                self.requests.append(req)
                if method == "GET":
                    await self._stream(reader, writer)
                    return
                req.body = await reader.readexactly(int(headers.get("content-length", "0")))
                await self._post(req, writer)
        finally:
            writer.close()
            self._conns.discard(task)

    async def _post(self, req: Request, writer: asyncio.StreamWriter) -> None:
        status = self.post_status
        if 200 <= status < 300:
            sid = parse_qs(urlsplit(req.target).query).get("sessionId", [""])[0]
            self._sessions[sid].put_nowait(req.body)
            body = b"Accepted"
        else:
            body = b"boom: the server failed"
        writer.write(f"HTTP/1.1 {status} Whatever\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()

    async def _stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.get_status != 200:
            body = b"no such stream"
            writer.write(
                f"HTTP/1.1 {self.get_status} Nope\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            return
        writer.write(
            f"HTTP/1.1 200 OK\r\nContent-Type: {self.content_type}\r\nCache-Control: no-cache\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )

        async def chunk(data: bytes) -> None:
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            await writer.drain()

        await chunk(b": hello from the test server\n\n")
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        if self.endpoint is not None:
            endpoint = self.endpoint.format(origin=self.origin)
            sid = parse_qs(urlsplit(endpoint).query).get("sessionId", [""])[0]
            self._sessions[sid] = queue
            await chunk(f"event: endpoint\r\ndata: {endpoint}\r\n\r\n".encode())
        self.open_streams += 1
        try:
            while True:
                get = asyncio.create_task(queue.get(), name="test-sse-queue")
                eof = asyncio.create_task(reader.read(1), name="test-sse-eof")
                done, pending = await asyncio.wait({get, eof}, return_when=asyncio.FIRST_COMPLETED)
                for t in pending:
                    t.cancel()
                await asyncio.wait(pending)
                if eof in done:
                    return  # the client went away
                msg = get.result()
                if msg == _CLOSE:
                    writer.write(b"0\r\n\r\n")  # the last chunk: a clean end of the stream
                    await writer.drain()
                    return
                # Split the event mid-field and mid-line, as a network may.
                await chunk(b"event: mess")
                await chunk(b"age\ndata: " + msg[:5])
                await chunk(msg[5:] + b"\n\n")
        finally:
            self.open_streams -= 1


@pytest.fixture
async def sse_server() -> AsyncIterator[Callable[..., Awaitable[tuple[LegacySSEServer, str]]]]:
    """A factory: ``await sse_server(**options)`` starts a server and returns it and its SSE URL."""
    servers: list[LegacySSEServer] = []

    async def start(**options: object) -> tuple[LegacySSEServer, str]:
        srv = LegacySSEServer(**options)  # type: ignore[arg-type]
        servers.append(srv)
        return srv, await srv.start()

    try:
        yield start
    finally:
        for srv in servers:
            await srv.stop()


@pytest.fixture
async def upstreams() -> AsyncIterator[list[SSEUpstream]]:
    opened: list[SSEUpstream] = []
    try:
        yield opened
    finally:
        for up in opened:
            await up.aclose()


HEADERS = {"Bastion-Jwt-Assertion": "jwt-1", "X-Team": "blue"}
Start = Callable[..., Awaitable[tuple[LegacySSEServer, str]]]


async def _connect(upstreams: list[SSEUpstream], url: str) -> SSEUpstream:
    up = await connect_sse(url, headers=HEADERS, verify=True)
    upstreams.append(up)
    return up


async def _eventually(pred: Callable[[], bool], what: str) -> None:
    end = time.monotonic() + DEADLINE
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)  # polling a condition, bounded by the deadline


def _msg(i: int, text: str = "x") -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": i, "method": "echo", "params": {"text": text}}).encode()


# ----------------------------------------------------------------------------- against a server


async def test_round_trip_and_session_id(sse_server: Start, upstreams: list[SSEUpstream]) -> None:
    srv, url = await sse_server()
    up = await _connect(upstreams, url)
    assert up.upstream_session_id == "abc"
    assert up.endpoint == f"{srv.origin}/message?sessionId=abc"
    big = "y" * 300_000  # spans many TCP segments and chunks
    for i, text in enumerate(["a", "ünïcode", big, "b"]):
        await up.send(_msg(i, text))
        async with asyncio.timeout(DEADLINE):
            assert await up.receive() == _msg(i, text)


async def test_headers_on_every_request_and_refreshed(
    sse_server: Start, upstreams: list[SSEUpstream]
) -> None:
    srv, url = await sse_server()
    up = await _connect(upstreams, url)
    await up.send(_msg(1))
    up.set_headers({"Bastion-Jwt-Assertion": "jwt-2", "X-Team": "blue"})
    await up.send(_msg(2))
    get, post1, post2 = srv.requests
    assert (get.method, get.target) == ("GET", "/sse")
    assert get.headers["accept"] == "text/event-stream"
    assert get.headers["bastion-jwt-assertion"] == "jwt-1"
    assert (post1.method, post1.target) == ("POST", "/message?sessionId=abc")
    assert post1.headers["content-type"] == "application/json"
    assert post1.body == _msg(1)
    assert [r.headers["bastion-jwt-assertion"] for r in (post1, post2)] == ["jwt-1", "jwt-2"]
    assert all(r.headers["x-team"] == "blue" for r in (get, post1, post2))


async def test_absolute_endpoint_on_same_origin(sse_server: Start, upstreams: list[SSEUpstream]) -> None:
    srv, url = await sse_server(endpoint="{origin}/rpc")
    up = await _connect(upstreams, url)
    assert up.upstream_session_id == ""
    assert up.endpoint == f"{srv.origin}/rpc"


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://evil.example/message?sessionId=abc",
        "https://127.0.0.1/message",  # same host, another scheme
        "//attacker.test/message",  # scheme-relative
    ],
)
async def test_endpoint_on_another_origin_is_refused(sse_server: Start, endpoint: str) -> None:
    srv, url = await sse_server(endpoint=endpoint)
    with pytest.raises(UpstreamError, match="endpoint on another origin"):
        await connect_sse(url, headers=HEADERS, verify=True)
    assert [r.method for r in srv.requests] == ["GET"]  # nothing was posted anywhere


async def test_endpoint_on_another_port_is_refused(sse_server: Start) -> None:
    other, _ = await sse_server()
    _, url = await sse_server(endpoint=f"{other.origin}/message?sessionId=abc")
    with pytest.raises(UpstreamError, match="endpoint on another origin"):
        await connect_sse(url, headers=HEADERS, verify=True)
    assert other.requests == []


async def test_no_endpoint_in_time(sse_server: Start) -> None:
    _, url = await sse_server(endpoint=None)
    started = time.monotonic()
    with pytest.raises(UpstreamError, match=r"sent no endpoint event within 0\.5s"):
        await connect_sse(url, headers=HEADERS, verify=True, endpoint_timeout=0.5)
    assert time.monotonic() - started < 5


async def test_server_ending_the_stream(sse_server: Start, upstreams: list[SSEUpstream]) -> None:
    srv, url = await sse_server()
    up = await _connect(upstreams, url)
    await up.send(_msg(1))
    srv.end_streams()
    async with asyncio.timeout(DEADLINE):
        assert await up.receive() == _msg(1)  # what came before the end is still delivered
        with pytest.raises(UpstreamClosedError, match="closed the event stream"):
            await up.receive()
    with pytest.raises(UpstreamClosedError):
        await up.receive()
    with pytest.raises(UpstreamClosedError):
        await up.send(_msg(2))


async def test_server_going_away(sse_server: Start, upstreams: list[SSEUpstream]) -> None:
    srv, url = await sse_server()
    up = await _connect(upstreams, url)
    await srv.stop()  # connections cut mid-stream, no last chunk
    with pytest.raises(UpstreamClosedError):
        async with asyncio.timeout(DEADLINE):
            await up.receive()


async def test_post_rejected(sse_server: Start, upstreams: list[SSEUpstream]) -> None:
    _, url = await sse_server(post_status=500)
    up = await _connect(upstreams, url)
    with pytest.raises(UpstreamError, match=r"rejected a message: .* HTTP 500: boom") as exc:
        await up.send(_msg(1))
    assert exc.value.origin == "upstream"


async def test_get_not_200(sse_server: Start) -> None:
    _, url = await sse_server(get_status=404)
    with pytest.raises(
        UpstreamError, match=r"answered GET http://127\.0\.0\.1:\d+/sse with HTTP 404: no such"
    ):
        await connect_sse(url, headers=HEADERS, verify=True)


async def test_wrong_content_type(sse_server: Start) -> None:
    _, url = await sse_server(content_type="text/html")
    with pytest.raises(UpstreamError, match='content type "text/html", not text/event-stream'):
        await connect_sse(url, headers=HEADERS, verify=True)


async def test_connection_refused() -> None:
    with socket.socket() as s:  # a port that was just free, now closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(
        UpstreamError, match=f"cannot connect to upstream SSE server http://127.0.0.1:{port}/sse"
    ):
        await connect_sse(f"http://127.0.0.1:{port}/sse", headers=HEADERS, verify=True, connect_timeout=2)


async def test_oversized_message(sse_server: Start, upstreams: list[SSEUpstream]) -> None:
    _, url = await sse_server()
    up = await connect_sse(url, headers=HEADERS, verify=True, max_message=1000)
    upstreams.append(up)
    await up.send(_msg(1, "z" * 5000))
    with pytest.raises(UpstreamError, match="larger than 1000 bytes") as exc:
        async with asyncio.timeout(DEADLINE):
            await up.receive()
    assert not isinstance(exc.value, UpstreamClosedError)


async def test_aclose(sse_server: Start, upstreams: list[SSEUpstream]) -> None:
    srv, url = await sse_server()
    up = await _connect(upstreams, url)
    assert srv.open_streams == 1
    pending = asyncio.create_task(up.receive(), name="pending-receive")
    await asyncio.sleep(0)  # let it start waiting
    await asyncio.gather(up.aclose(), up.aclose())
    with pytest.raises(UpstreamClosedError, match="closed by the gateway"):
        async with asyncio.timeout(DEADLINE):
            await pending
    with pytest.raises(UpstreamClosedError):
        await up.send(_msg(1))
    await _eventually(lambda: srv.open_streams == 0, "the server to see the stream closed")
    await up.aclose()


# ----------------------------------------------------------------------------- the parser


def _feed_all(chunks: list[bytes]) -> list[_Event]:
    p = _SSEParser(max_event=1 << 20)
    return [ev for c in chunks for ev in p.feed(c)]


STREAM = (
    b"\xef\xbb\xbf: a comment\r\n"
    b"event: endpoint\r\ndata: /message?sessionId=1\r\n\r\n"
    b"retry: 1000\nid: 7\nunknown: field\n"
    b"data: line one\rdata:line two\r\n\n"
    b"event: ping\n\n"  # no data: not dispatched
    b"data\n\n"  # a field with no colon: empty data line
    b'data: {"jsonrpc":"2.0"}\n\n'
)
EXPECTED = [
    _Event("endpoint", b"/message?sessionId=1", None),
    _Event("message", b"line one\nline two", "7"),
    _Event("message", b"", "7"),
    _Event("message", b'{"jsonrpc":"2.0"}', "7"),
]


def test_parser_whole_stream() -> None:
    assert _feed_all([STREAM]) == EXPECTED


def test_parser_byte_by_byte() -> None:
    assert _feed_all([STREAM[i : i + 1] for i in range(len(STREAM))]) == EXPECTED


def test_parser_every_split_point() -> None:
    for i in range(len(STREAM) + 1):
        assert _feed_all([STREAM[:i], STREAM[i:]]) == EXPECTED, f"split at {i}"


def test_parser_cr_lf_split_across_chunks() -> None:
    # "\r" ends one chunk, "\n" starts the next: one line end, not an empty line (which would dispatch).
    assert _feed_all([b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]) == [_Event("message", b"a\nb", None)]


def test_parser_limit() -> None:
    p = _SSEParser(max_event=10)
    assert p.feed(b"data: 0123456789\n\n") == [_Event("message", b"0123456789", None)]
    with pytest.raises(UpstreamError, match="larger than 10 bytes"):
        p.feed(b"data: 0123456789A")  # an unfinished line already too long
    q = _SSEParser(max_event=10)
    with pytest.raises(UpstreamError, match="larger than 10 bytes"):
        q.feed(b"data: 012345\ndata: 6789\n")  # lines fit, the event does not


# ----------------------------------------------------------------------------- uvloop


def test_under_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        srv = LegacySSEServer()
        url = await srv.start()
        try:
            up = await connect_sse(url, headers=HEADERS, verify=True)
            try:
                assert up.upstream_session_id == "abc"
                await up.send(_msg(1))
                async with asyncio.timeout(DEADLINE):
                    assert await up.receive() == _msg(1)
            finally:
                await up.aclose()
            await _eventually(lambda: srv.open_streams == 0, "the server to see the stream closed")
        finally:
            await srv.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
