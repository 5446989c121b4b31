"""bastion.proxy.h1, the lean HTTP/1.1 server, over real loopback sockets.

Raw sockets (asyncio streams) where the bytes on the wire matter (pipelining, chunked
framing, 100-continue, limits, garbage), httpx where a real client is the point (TLS,
Starlette).  Apps coordinate with the test through asyncio.Events; nothing waits on a clock.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from bastion._listen import bind_tcp
from bastion.proxy import h1
from bastion.proxy.h1 import ASGI, Message, Receive, Send

Scope = dict[str, Any]
DEADLINE = 5.0  # per wait: a broken server fails the test instead of hanging it


# ------------------------------------------------------------------ helpers


@asynccontextmanager
async def serving(
    app: ASGI, ssl_ctx: ssl.SSLContext | None = None, **kw: Any
) -> AsyncIterator[tuple[h1.Server, int]]:
    sock = bind_tcp("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = await h1.serve(sock, app, ssl_ctx=ssl_ctx, **kw)
    try:
        yield server, port
    finally:
        server.close()
        async with asyncio.timeout(DEADLINE):
            await server.wait_closed()


@asynccontextmanager
async def connect(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()


@dataclass
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes]]:
    async with asyncio.timeout(DEADLINE):
        head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b": ")
        assert name.lower() not in headers, f"duplicate header {name!r}"
        headers[name.lower()] = value
    return status, headers


async def read_chunk(reader: asyncio.StreamReader) -> bytes:
    """One chunk of a chunked body; b"" for the last (with its CRLF consumed)."""
    async with asyncio.timeout(DEADLINE):
        size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
        data = await reader.readexactly(size + 2)
    assert data[-2:] == b"\r\n"
    return data[:-2]


async def read_response(reader: asyncio.StreamReader, *, head_request: bool = False) -> Response:
    status, headers = await read_head(reader)
    if head_request or status in (204, 304):
        return Response(status, headers, b"")
    async with asyncio.timeout(DEADLINE):
        if b"content-length" in headers:
            body = await reader.readexactly(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding") == b"chunked":
            parts = []
            while chunk := await read_chunk(reader):
                parts.append(chunk)
            body = b"".join(parts)
        else:
            body = await reader.read()  # close-delimited
    return Response(status, headers, body)


async def at_eof(reader: asyncio.StreamReader) -> bool:
    """True once the server has closed the connection (reads nothing more)."""
    async with asyncio.timeout(DEADLINE):
        try:
            return await reader.read(1) == b""
        except ConnectionResetError:
            return True


async def read_body(receive: Receive) -> tuple[bytes, list[Message]]:
    messages: list[Message] = []
    while True:
        msg = await receive()
        messages.append(msg)
        assert msg["type"] == "http.request"
        if not msg.get("more_body"):
            return b"".join(m.get("body", b"") for m in messages), messages


async def reply(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    hs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": hs + (headers or [])})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def echo(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers with what it was given, as JSON."""
    body, messages = await read_body(receive)
    doc = {
        "type": scope["type"],
        "asgi": scope["asgi"],
        "http_version": scope["http_version"],
        "method": scope["method"],
        "scheme": scope["scheme"],
        "path": scope["path"],
        "raw_path": scope["raw_path"].decode(),
        "query_string": scope["query_string"].decode(),
        "root_path": scope["root_path"],
        "headers": [[k.decode(), v.decode()] for k, v in scope["headers"]],
        "client": list(scope["client"]),
        "server": list(scope["server"]),
        "body": body.decode(),
        "messages": len(messages),
    }
    await reply(send, 200, orjson.dumps(doc))


def request(method: str, target: str, body: bytes = b"", headers: str = "") -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if body or method == "POST" else ""
    return f"{method} {target} HTTP/1.1\r\nHost: test\r\n{headers}{length}\r\n".encode() + body


# ------------------------------------------------------------------ requests and scope


async def test_get_and_post_with_content_length_and_the_scope() -> None:
    async with serving(echo) as (_, port), connect(port) as (reader, writer):
        writer.write(request("GET", "/a%20b/c?x=1&y=%20", headers="X-Thing: One\r\nx-thing: two\r\n"))
        resp = await read_response(reader)
        assert resp.status == 200
        assert resp.headers[b"content-type"] == b"application/json"
        assert b"date" not in resp.headers
        assert b"server" not in resp.headers
        doc = orjson.loads(resp.body)
        assert doc["type"] == "http"
        assert doc["asgi"] == {"version": "3.0", "spec_version": "2.3"}
        assert doc["http_version"] == "1.1"
        assert doc["method"] == "GET"
        assert doc["scheme"] == "http"
        assert doc["path"] == "/a b/c"  # percent-decoded
        assert doc["raw_path"] == "/a%20b/c"
        assert doc["query_string"] == "x=1&y=%20"
        assert doc["root_path"] == ""
        assert doc["headers"] == [["host", "test"], ["x-thing", "One"], ["x-thing", "two"]]
        local = writer.get_extra_info("sockname")
        assert doc["client"] == [local[0], local[1]]
        assert doc["server"] == ["127.0.0.1", port]
        assert doc["body"] == ""

        writer.write(request("POST", "/p", b'{"hello": "world"}'))
        resp = await read_response(reader)
        doc = orjson.loads(resp.body)
        assert (doc["method"], doc["body"], doc["messages"]) == ("POST", '{"hello": "world"}', 1)


async def test_chunked_request_body_arrives_as_it_is_sent() -> None:
    got: list[Message] = []
    first = asyncio.Event()
    header_lists: list[list[tuple[bytes, bytes]]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        header_lists.append(scope["headers"])
        while True:
            msg = await receive()
            got.append(msg)
            first.set()
            if not msg.get("more_body"):
                break
        await reply(send, 200, b"".join(m["body"] for m in got))

    async with serving(app) as (_, port), connect(port) as (reader, writer):
        writer.write(b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        async with asyncio.timeout(DEADLINE):
            await first.wait()  # the first chunk reached the app before the rest was sent
        assert got == [{"type": "http.request", "body": b"hello", "more_body": True}]
        writer.write(b"1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: dropped\r\n\r\n")
        resp = await read_response(reader)
        assert resp.body == b"hello world"
        assert got[-1]["more_body"] is False
        assert header_lists == [[(b"host", b"t"), (b"transfer-encoding", b"chunked")]]


async def test_streamed_response_is_chunked_and_flushed_event_by_event() -> None:
    second = asyncio.Event()
    finished = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        sse = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": sse})
        await send({"type": "http.response.body", "body": b"data: one\n\n", "more_body": True})
        await second.wait()
        await send({"type": "http.response.body", "body": b"data: two\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        finished.set()

    async with serving(app) as (_, port), connect(port) as (reader, writer):
        writer.write(request("GET", "/sse"))
        status, headers = await read_head(reader)
        assert status == 200
        assert headers[b"transfer-encoding"] == b"chunked"
        assert b"content-length" not in headers
        assert await read_chunk(reader) == b"data: one\n\n"  # before the app sent the second
        assert not finished.is_set()
        second.set()
        assert await read_chunk(reader) == b"data: two\n\n"
        assert await read_chunk(reader) == b""
        # The connection is still good for another request.
        writer.write(request("GET", "/again"))
        second.set()
        assert (await read_response(reader)).body == b"data: one\n\ndata: two\n\n"


async def test_stream_headers_are_sent_before_the_first_event() -> None:
    """An SSE stream whose first event is late still gets its headers at once."""
    go = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await go.wait()
        await send({"type": "http.response.body", "body": b"late", "more_body": False})

    async with serving(app) as (_, port), connect(port) as (reader, writer):
        writer.write(request("GET", "/"))
        status, headers = await read_head(reader)
        assert (status, headers[b"transfer-encoding"]) == (200, b"chunked")
        go.set()
        assert await read_chunk(reader) == b"late"
        assert await read_chunk(reader) == b""


async def test_a_whole_body_without_content_length_gets_one() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 201, "headers": [(b"x-a", b"1")]})
        await send({"type": "http.response.body", "body": b"all of it"})

    async with serving(app) as (_, port), connect(port) as (reader, writer):
        writer.write(request("GET", "/"))
        resp = await read_response(reader)
        assert (resp.status, resp.headers[b"content-length"], resp.body) == (201, b"9", b"all of it")
        assert resp.headers[b"x-a"] == b"1"


async def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    clients: list[tuple[str, int]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        body, _ = await read_body(receive)
        clients.append(scope["client"])
        await reply(send, 200, scope["path"].encode() + body)

    async with serving(app) as (_, port), connect(port) as (reader, writer):
        for i in range(5):
            writer.write(request("POST", f"/{i}", b"x" * i))
            resp = await read_response(reader)
            assert resp.body == f"/{i}".encode() + b"x" * i
            assert b"connection" not in resp.headers
    assert len(set(clients)) == 1


async def test_connection_close_is_honoured() -> None:
    async with serving(echo) as (_, port), connect(port) as (reader, writer):
        writer.write(request("GET", "/", headers="Connection: close\r\n"))
        resp = await read_response(reader)
        assert resp.status == 200
        assert resp.headers[b"connection"] == b"close"
        assert await at_eof(reader)


async def test_pipelined_requests_are_answered_in_order_one_at_a_time() -> None:
    started: list[str] = []
    b_seen_while_a_ran: list[bool] = []
    release_a = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        body, _ = await read_body(receive)
        started.append(scope["path"])
        if scope["path"] == "/a":
            b_seen_while_a_ran.append("/b" in started)
            await release_a.wait()
        await reply(send, 200, scope["path"].encode() + b":" + body)

    async with serving(app) as (_, port), connect(port) as (reader, writer):
        writer.write(request("POST", "/a", b"first") + request("POST", "/b", b"second"))
        async with asyncio.timeout(DEADLINE):
            while not started:  # noqa: ASYNC110 - no clock: the app runs within a few loop turns
                await asyncio.sleep(0)
        release_a.set()
        assert (await read_response(reader)).body == b"/a:first"
        assert (await read_response(reader)).body == b"/b:second"
    assert started == ["/a", "/b"]
    assert b_seen_while_a_ran == [False]


async def test_many_pipelined_requests_and_a_request_cut_into_single_bytes() -> None:
    async with serving(echo) as (_, port), connect(port) as (reader, writer):
        writer.write(b"".join(request("POST", f"/p{i}?n={i}", b"x" * i) for i in range(50)))
        for i in range(50):
            doc = orjson.loads((await read_response(reader)).body)
            assert (doc["path"], doc["query_string"], doc["body"]) == (f"/p{i}", f"n={i}", "x" * i)
        for byte in request("POST", "/slow%2Fly?q=1", b"body", headers="X-Long: " + "v" * 300 + "\r\n"):
            writer.write(bytes([byte]))
            await writer.drain()
        doc = orjson.loads((await read_response(reader)).body)
        assert (doc["path"], doc["raw_path"], doc["body"]) == ("/slow/ly", "/slow%2Fly", "body")
        assert ["x-long", "v" * 300] in doc["headers"]


async def test_expect_100_continue() -> None:
    async with serving(echo) as (_, port), connect(port) as (reader, writer):
        writer.write(b"POST /e HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
        async with asyncio.timeout(DEADLINE):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"body")
        resp = await read_response(reader)
        assert orjson.loads(resp.body)["body"] == "body"
        assert b"connection" not in resp.headers  # kept alive: the body was read


async def test_expect_100_continue_refused_without_reading_closes() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await reply(send, 413, b"too big")

    async with serving(app) as (_, port), connect(port) as (reader, writer):
        writer.write(b"POST /e HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 99999\r\n\r\n")
        resp = await read_response(reader)
        assert (resp.status, resp.headers[b"connection"]) == (413, b"close")
        assert await at_eof(reader)


async def test_unread_body_is_dropped_and_the_connection_kept() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await reply(send, 401, b"no")  # never reads the body

    async with serving(app) as (_, port), connect(port) as (reader, writer):
        writer.write(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n01234")
        assert (await read_response(reader)).status == 401
        writer.write(b"56789" + request("GET", "/next"))
        assert (await read_response(reader)).status == 401


async def test_head_gets_headers_and_no_body() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await reply(send, 200, b"twelve bytes")

    async with serving(app) as (_, port), connect(port) as (reader, writer):
        writer.write(request("HEAD", "/"))
        resp = await read_response(reader, head_request=True)
        assert (resp.status, resp.headers[b"content-length"]) == (200, b"12")
        writer.write(request("GET", "/"))  # nothing stray was left on the connection
        assert (await read_response(reader)).body == b"twelve bytes"


async def test_http_1_0_gets_one_request_and_a_close_delimited_stream() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["http_version"] == "1.0"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part1 ", "more_body": True})
        await send({"type": "http.response.body", "body": b"part2", "more_body": False})

    async with serving(app) as (_, port), connect(port) as (reader, writer):
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        resp = await read_response(reader)
        assert resp.headers[b"connection"] == b"close"
        assert b"transfer-encoding" not in resp.headers
        assert resp.body == b"part1 part2"


# ------------------------------------------------------------------ disconnects and flow control


async def test_client_disconnect_mid_stream_reaches_the_app() -> None:
    seen: list[Message] = []
    done = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        seen.append(await receive())  # waits until the client goes away
        # Writing to a gone client is dropped, not an error.
        await send({"type": "http.response.body", "body": b"data: 2\n\n", "more_body": True})
        done.set()

    async with serving(app) as (_, port):
        async with connect(port) as (reader, writer):
            writer.write(request("GET", "/stream"))
            await read_head(reader)
            assert await read_chunk(reader) == b"data: 1\n\n"
        async with asyncio.timeout(DEADLINE):
            await done.wait()
    assert seen == [{"type": "http.disconnect"}]


async def test_receive_after_the_response_says_disconnect() -> None:
    after: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        await reply(send, 200, b"ok")
        after.append(await receive())

    async with serving(app) as (_, port), connect(port) as (reader, writer):
        writer.write(request("GET", "/"))
        await read_response(reader)
    assert after == [{"type": "http.disconnect"}]


async def test_slow_app_stops_the_reading_of_a_large_body() -> None:
    size = 8 * 1024 * 1024
    payload = bytes(range(256)) * (size // 256)
    first_message: list[int] = []
    go = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await go.wait()
        msg = await receive()
        first_message.append(len(msg["body"]))
        rest, _ = await read_body(receive) if msg["more_body"] else (b"", [])
        await reply(send, 200, str(len(msg["body"]) + len(rest)).encode())

    async with serving(app) as (server, port), connect(port) as (reader, writer):
        writer.write(b"POST /big HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size + payload)
        for _ in range(200):  # loop turns (no clock): the server reads all it is allowed to
            await asyncio.sleep(0)
        (conn,) = server.conns
        assert conn.read_paused
        buffered = conn.parsing.buffered if conn.parsing else 0
        assert h1.HIGH_WATER < buffered <= h1.HIGH_WATER + 512 * 1024
        go.set()
        resp = await read_response(reader)
        assert resp.body == str(size).encode()
        assert first_message[0] == buffered


async def test_send_waits_while_the_client_does_not_read() -> None:
    chunk = b"x" * 65536
    total = 512  # 32 MiB: more than the kernel buffers on both ends
    sent = [0]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(total):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            sent[0] += 1
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async with serving(app) as (server, port), connect(port) as (reader, writer):
        writer.transport.pause_reading()
        writer.write(request("GET", "/"))
        for _ in range(300):  # loop turns (no clock)
            await asyncio.sleep(0)
        (conn,) = server.conns
        assert conn.write_paused
        assert sent[0] < total
        writer.transport.resume_reading()
        assert (await read_head(reader))[0] == 200
        received = 0
        while data := await read_chunk(reader):
            received += len(data)
        assert received == total * len(chunk)


# ------------------------------------------------------------------ errors and limits


async def test_oversized_header_block_is_431() -> None:
    async with serving(echo, max_head_bytes=8192) as (_, port), connect(port) as (reader, writer):
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        resp = await read_response(reader)
        assert (resp.status, resp.headers[b"connection"]) == (431, b"close")
        assert await at_eof(reader)


async def test_too_many_headers_is_431() -> None:
    many = "".join(f"X-H{i}: {i}\r\n" for i in range(101))
    async with serving(echo) as (_, port), connect(port) as (reader, writer):
        writer.write(request("GET", "/", headers=many))
        assert (await read_response(reader)).status == 431
        assert await at_eof(reader)


async def test_garbage_is_400_and_closed() -> None:
    async with serving(echo) as (_, port), connect(port) as (reader, writer):
        writer.write(b"\x16\x03\x01 this is not HTTP\r\n\r\n")
        resp = await read_response(reader)
        assert (resp.status, resp.headers[b"connection"]) == (400, b"close")
        assert await at_eof(reader)


async def test_garbage_after_a_pipelined_request_answers_that_request_first() -> None:
    async with serving(echo) as (_, port), connect(port) as (reader, writer):
        writer.write(request("GET", "/ok") + b"BROKEN\x00\r\n\r\n")
        assert (await read_response(reader)).status == 200
        assert (await read_response(reader)).status == 400
        assert await at_eof(reader)


async def test_upgrade_is_answered_as_plain_http_and_closed() -> None:
    """No WebSocket: the app answers the request like any other; the bytes after it are not parsed."""
    async with serving(echo) as (_, port), connect(port) as (reader, writer):
        upgrade = "Connection: Upgrade\r\nUpgrade: websocket\r\n"
        writer.write(request("GET", "/ws", headers=upgrade) + b"\x81\x05hello")
        resp = await read_response(reader)
        assert (resp.status, resp.headers[b"connection"]) == (200, b"close")
        assert orjson.loads(resp.body)["path"] == "/ws"
        assert await at_eof(reader)


async def test_connect_is_400() -> None:
    async with serving(echo) as (_, port), connect(port) as (reader, writer):
        writer.write(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        assert (await read_response(reader)).status == 400
        assert await at_eof(reader)


async def test_app_exception_before_the_answer_is_500(caplog: pytest.LogCaptureFixture) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise ValueError("boom")

    async with serving(app) as (_, port), connect(port) as (reader, writer):
        writer.write(request("GET", "/boom"))
        resp = await read_response(reader)
        assert (resp.status, resp.body) == (500, b"Internal Server Error")
        assert await at_eof(reader)
    records = [r for r in caplog.records if r.name == "bastion.proxy" and r.levelno == logging.ERROR]
    assert records
    assert records[0].exc_info is not None
    assert isinstance(records[0].exc_info[1], ValueError)


async def test_app_exception_mid_response_closes_the_connection(caplog: pytest.LogCaptureFixture) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise RuntimeError("mid-stream")

    async with serving(app) as (_, port), connect(port) as (reader, writer):
        writer.write(request("GET", "/"))
        status, _ = await read_head(reader)
        assert status == 200
        assert await read_chunk(reader) == b"partial"
        assert await at_eof(reader)  # no terminating chunk: the client sees the failure
    assert any(r.name == "bastion.proxy" and r.exc_info for r in caplog.records)


async def test_response_splitting_header_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await reply(send, 200, b"x", [(b"x-evil", b"a\r\nset-cookie: pwned=1")])

    async with serving(app) as (_, port), connect(port) as (reader, writer):
        writer.write(request("GET", "/"))
        resp = await read_response(reader)
        assert resp.status == 500
        assert b"set-cookie" not in resp.headers


async def test_idle_keep_alive_connection_is_closed() -> None:
    async with serving(echo, keepalive_timeout=0.05) as (_, port), connect(port) as (reader, writer):
        writer.write(request("GET", "/"))
        assert (await read_response(reader)).status == 200
        assert await at_eof(reader)


async def test_slow_request_headers_are_cut_off() -> None:
    async with serving(echo, header_timeout=0.05) as (_, port), connect(port) as (reader, writer):
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n")  # never finished
        assert await at_eof(reader)


# ------------------------------------------------------------------ shutdown


async def test_close_lets_in_flight_requests_finish_and_refuses_new_ones() -> None:
    release = asyncio.Event()
    running = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        running.set()
        await release.wait()
        await reply(send, 200, b"finished")

    sock = bind_tcp("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = await h1.serve(sock, app, ssl_ctx=None)
    async with connect(port) as (reader, writer), connect(port) as (idle_reader, _):
        writer.write(request("GET", "/"))
        async with asyncio.timeout(DEADLINE):
            await running.wait()
        server.close()
        assert await at_eof(idle_reader)  # an idle connection is closed at once
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
        release.set()
        resp = await read_response(reader)
        assert (resp.status, resp.body, resp.headers[b"connection"]) == (200, b"finished", b"close")
        async with asyncio.timeout(DEADLINE):
            await server.wait_closed()


async def test_close_cancels_what_outlives_the_shutdown_timeout() -> None:
    cancelled = asyncio.Event()
    running = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        running.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    sock = bind_tcp("127.0.0.1", 0)
    server = await h1.serve(sock, app, ssl_ctx=None, shutdown_timeout=0.05)
    async with connect(sock.getsockname()[1]) as (reader, writer):
        writer.write(request("GET", "/"))
        async with asyncio.timeout(DEADLINE):
            await running.wait()
        server.close()
        async with asyncio.timeout(DEADLINE):
            await server.wait_closed()
        assert cancelled.is_set()
        assert await at_eof(reader)


# ------------------------------------------------------------------ TLS and Starlette, with httpx


def self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp / "tls.crt", tmp / "tls.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


async def test_tls_with_httpx(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(cert), str(key))
    server_ctx.set_alpn_protocols(["http/1.1"])
    client_ctx = ssl.create_default_context(cafile=str(cert))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        body, _ = await read_body(receive)
        if scope["path"] == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for i in range(3):
                await send({"type": "http.response.body", "body": b"event %d\n" % i, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        await reply(send, 200, orjson.dumps({"scheme": scope["scheme"], "body": body.decode()}))

    async with (
        serving(app, ssl_ctx=server_ctx) as (_, port),
        httpx.AsyncClient(verify=client_ctx, base_url=f"https://127.0.0.1:{port}") as client,
    ):
        r = await client.post("/p", content=b"over tls")
        assert r.json() == {"scheme": "https", "body": "over tls"}
        r = await client.get("/again")  # same connection, kept alive
        assert r.status_code == 200
        async with client.stream("GET", "/stream") as r:
            assert r.headers["transfer-encoding"] == "chunked"
            assert [line async for line in r.aiter_lines()] == ["event 0", "event 1", "event 2"]


async def test_starlette_app() -> None:
    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse(f"hello {request.query_params.get('name', '')} from {request.url.path}")

    async def post(request: Request) -> JSONResponse:
        doc = {"got": await request.json(), "state": hasattr(request.state, "x")}
        return JSONResponse(doc, status_code=201)

    async def stream(request: Request) -> StreamingResponse:
        async def parts() -> AsyncIterator[bytes]:
            for i in range(3):
                yield b"part %d\n" % i

        return StreamingResponse(parts(), media_type="text/plain")

    app = Starlette(
        routes=[
            Route("/v1/hello", hello),
            Route("/v1/things", post, methods=["POST"]),
            Route("/v1/stream", stream),
        ]
    )
    async with (
        serving(app) as (_, port),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client,
    ):
        r = await client.get("/v1/hello", params={"name": "bob"})
        assert (r.status_code, r.text) == (200, "hello bob from /v1/hello")
        r = await client.post("/v1/things", json={"a": 1})
        assert (r.status_code, r.json()) == (201, {"got": {"a": 1}, "state": False})
        r = await client.get("/nope")
        assert r.status_code == 404
        r = await client.get("/v1/things")
        assert r.status_code == 405
        async with client.stream("GET", "/v1/stream") as r:
            assert [line async for line in r.aiter_lines()] == ["part 0", "part 1", "part 2"]
