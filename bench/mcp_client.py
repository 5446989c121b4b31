"""Small MCP-over-HTTP clients for the benchmarks: lean on purpose, so the client is not what is measured.

- ``Target``: where to send (URL, bearer token, TLS context).
- ``BlockingConn``: one keep-alive HTTP/1.1 connection on a blocking socket (TLS optional), with
  httptools parsing the responses.  Used to open the session wrk loads, to check answers, and to
  measure latency at concurrency 1 (one request at a time, timed with ``perf_counter_ns``).
- ``AsyncConn``: the same on asyncio protocols (uvloop when available), for the concurrent
  session set-up and idle-session measurements.

Responses may be JSON or a one-event SSE stream (the SDK-based peers answer that way); ``rpc_body``
returns the JSON-RPC message either way.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httptools
import orjson

PROTOCOL_VERSION = "2025-06-18"
#: MCP 2026-07-28: no session; every request carries its envelope in ``_meta`` and routing headers.
MODERN_VERSION = "2026-07-28"
MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": MODERN_VERSION,
    "io.modelcontextprotocol/clientCapabilities": {},
    "io.modelcontextprotocol/clientInfo": {"name": "bastion-bench", "version": "1"},
}
ACCEPT = b"application/json, text/event-stream"


@dataclass
class Target:
    url: str  # http(s)://host:port/path
    token: str = ""
    ssl_ctx: ssl.SSLContext | None = None
    #: Speak 2026-07-28 (sessionless ``tools/call``s; ``sid`` is ignored).
    modern: bool = False
    host: str = field(init=False)
    port: int = field(init=False)
    path: str = field(init=False)

    def __post_init__(self) -> None:
        u = urlsplit(self.url)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.path = u.path or "/"
        if u.scheme == "https" and self.ssl_ctx is None:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            self.ssl_ctx = ctx

    def headers(self, sid: str = "", version: str = PROTOCOL_VERSION) -> list[tuple[bytes, bytes]]:
        h = [(b"content-type", b"application/json"), (b"accept", ACCEPT)]
        if self.token:
            h.append((b"authorization", b"Bearer " + self.token.encode()))
        if self.modern:
            h += [
                (b"mcp-protocol-version", MODERN_VERSION.encode()),
                (b"mcp-method", b"tools/call"),
                (b"mcp-name", b"echo"),
            ]
        elif sid:
            h.append((b"mcp-session-id", sid.encode()))
            h.append((b"mcp-protocol-version", version.encode()))
        return h


@dataclass
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def header(self, name: bytes) -> str:
        return self.headers.get(name, b"").decode("latin-1")


def rpc_body(resp: Response) -> Any:
    """The JSON-RPC message of a JSON or single-event SSE response (None if there is none)."""
    body = resp.body
    if resp.headers.get(b"content-type", b"").startswith(b"text/event-stream"):
        data = [line[5:].strip() for line in body.split(b"\n") if line.startswith(b"data:")]
        body = data[-1] if data else b""
    return orjson.loads(body) if body else None


def request_bytes(
    target: Target, method: str, headers: Sequence[tuple[bytes, bytes]], body: bytes = b""
) -> bytes:
    lines = [f"{method} {target.path} HTTP/1.1\r\nhost: {target.host}:{target.port}\r\n".encode()]
    lines += [k + b": " + v + b"\r\n" for k, v in headers]
    lines.append(b"content-length: %d\r\n\r\n" % len(body))
    return b"".join(lines) + body


def initialize_body(rid: int = 1) -> bytes:
    return orjson.dumps(
        {
            "jsonrpc": "2.0",
            "id": rid,
            "method": "initialize",
            "params": {
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "bastion-bench", "version": "1"},
            },
        }
    )


INITIALIZED = b'{"jsonrpc":"2.0","method":"notifications/initialized"}'


def call_body(rid: int, message: str = "hello", modern: bool = False) -> bytes:
    params: dict[str, Any] = {"name": "echo", "arguments": {"message": message}}
    if modern:
        params["_meta"] = MODERN_META
    return orjson.dumps({"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": params})


def list_body(rid: int) -> bytes:
    return b'{"jsonrpc":"2.0","id":%d,"method":"tools/list"}' % rid


class _Collector:
    """httptools callbacks gathering one response at a time."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.done: list[Response] = []

    def on_message_begin(self) -> None:
        self.headers = {}
        self.body = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.done.append(Response(self.parser.get_status_code(), self.headers, b"".join(self.body)))


class BlockingConn:
    def __init__(self, target: Target, timeout: float = 30.0) -> None:
        self.target = target
        sock = socket.create_connection((target.host, target.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if target.ssl_ctx is not None:
            sock = target.ssl_ctx.wrap_socket(sock, server_hostname=target.host)
        self.sock = sock
        self.c = _Collector()

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> Response:
        self.sock.sendall(data)
        c = self.c
        while not c.done:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("server closed the connection")
            c.parser.feed_data(chunk)
        return c.done.pop(0)

    def request(self, method: str, headers: Sequence[tuple[bytes, bytes]], body: bytes = b"") -> Response:
        return self.send_raw(request_bytes(self.target, method, headers, body))

    def open_session(self) -> tuple[str, str]:
        """initialize + notifications/initialized; returns (session id, protocol version)."""
        r = self.request("POST", self.target.headers(), initialize_body())
        sid = r.header(b"mcp-session-id")
        msg = rpc_body(r)
        if r.status != 200 or not sid or not msg or "result" not in msg:
            raise RuntimeError(f"initialize failed: {r.status} {r.body[:300]!r}")
        version = msg["result"].get("protocolVersion", PROTOCOL_VERSION)
        r = self.request("POST", self.target.headers(sid, version), INITIALIZED)
        if r.status not in (200, 202):
            raise RuntimeError(f"notifications/initialized failed: {r.status} {r.body[:300]!r}")
        return sid, version

    def call(self, sid: str, rid: int, message: str = "hello") -> Any:
        r = self.request("POST", self.target.headers(sid), call_body(rid, message, self.target.modern))
        if r.status != 200:
            raise RuntimeError(f"tools/call failed: {r.status} {r.body[:300]!r}")
        return rpc_body(r)

    def delete(self, sid: str) -> int:
        return self.request("DELETE", self.target.headers(sid)).status


def latency_run(target: Target, sid: str, duration: float, id_base: int) -> dict[str, float]:
    """tools/call one at a time on one connection for ``duration`` s; per-call latency percentiles."""
    conn = BlockingConn(target)
    try:
        headers = target.headers(sid)
        modern = target.modern
        msgs = [
            request_bytes(target, "POST", headers, call_body(id_base + i, modern=modern))
            for i in range(1, 50)
        ]
        for m in msgs[:20]:  # warm-up
            conn.send_raw(m)
        lat: list[int] = []
        n = 0
        bad = 0
        start = time.perf_counter()
        end = start + duration
        pc = time.perf_counter_ns
        while True:
            n += 1
            data = request_bytes(target, "POST", headers, call_body(id_base + 100 + n, modern=modern))
            t0 = pc()
            r = conn.send_raw(data)
            lat.append(pc() - t0)
            if r.status != 200 or b'"result"' not in r.body:
                bad += 1
            if n % 64 == 0 and time.perf_counter() > end:
                break
        wall = time.perf_counter() - start
    finally:
        conn.close()
    lat.sort()
    k = len(lat)
    return {
        "calls": k,
        "calls_per_s": k / wall,
        "p50_us": lat[k // 2] / 1000,
        "p90_us": lat[int(k * 0.9)] / 1000,
        "p99_us": lat[min(k - 1, int(k * 0.99))] / 1000,
        "mean_us": sum(lat) / k / 1000,
        "bad": bad,
    }


# ------------------------------------------------------------------- asyncio


class AsyncConn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.c = _Collector()
        self.transport: Any = None
        self.waiter: asyncio.Future[Response] | None = None

    @classmethod
    async def open(cls, target: Target) -> AsyncConn:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(
            lambda: cls(target),
            target.host,
            target.port,
            ssl=target.ssl_ctx,
            server_hostname=target.host if target.ssl_ctx else None,
        )
        return proto

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self.c.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(e)
            return
        if self.c.done and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(self.c.done.pop(0))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("connection closed"))

    def _fail(self, exc: BaseException) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def request(
        self, method: str, headers: Sequence[tuple[bytes, bytes]], body: bytes = b""
    ) -> Response:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request_bytes(self.target, method, headers, body))
        return await self.waiter

    async def open_session(self, rid: int = 1) -> tuple[str, str]:
        r = await self.request("POST", self.target.headers(), initialize_body(rid))
        sid = r.header(b"mcp-session-id")
        msg = rpc_body(r)
        if r.status != 200 or not sid or not msg or "result" not in msg:
            raise RuntimeError(f"initialize failed: {r.status} {r.body[:300]!r}")
        version = msg["result"].get("protocolVersion", PROTOCOL_VERSION)
        r = await self.request("POST", self.target.headers(sid, version), INITIALIZED)
        if r.status not in (200, 202):
            raise RuntimeError(f"notifications/initialized failed: {r.status} {r.body[:300]!r}")
        return sid, version


def run_async(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


async def _setup_cycles(target: Target, concurrency: int, duration: float) -> dict[str, Any]:
    """initialize + initialized + tools/list + DELETE, as many as possible in ``duration`` s."""
    done = 0
    errors: list[str] = []
    end = time.perf_counter() + duration

    async def worker() -> None:
        nonlocal done
        conn = await AsyncConn.open(target)
        try:
            rid = 1
            while time.perf_counter() < end:
                try:
                    sid, version = await conn.open_session(rid)
                    r = await conn.request("POST", target.headers(sid, version), list_body(rid + 1))
                    msg = rpc_body(r)
                    if r.status != 200 or not msg or not msg.get("result", {}).get("tools"):
                        raise RuntimeError(f"tools/list failed: {r.status} {r.body[:200]!r}")
                    r = await conn.request("DELETE", target.headers(sid, version))
                    if r.status not in (200, 202, 204):
                        raise RuntimeError(f"DELETE failed: {r.status} {r.body[:200]!r}")
                    done += 1
                except (RuntimeError, ConnectionError, OSError) as e:
                    errors.append(str(e)[:300])
                    if len(errors) > 50:
                        return
                    conn.close()
                    conn = await AsyncConn.open(target)
                rid += 2
        finally:
            conn.close()

    start = time.perf_counter()
    cpu0 = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return {
        "sessions": done,
        "sessions_per_s": done / wall,
        "wall_s": wall,
        "client_cpu_s": time.process_time() - cpu0,
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
    }


def setup_rate(target: Target, concurrency: int, duration: float) -> dict[str, Any]:
    result: dict[str, Any] = run_async(_setup_cycles(target, concurrency, duration))
    return result


async def _open_idle(target: Target, n: int, concurrency: int) -> list[str]:
    sids: list[str] = []
    left = n

    async def worker() -> None:
        nonlocal left
        conn = await AsyncConn.open(target)
        try:
            while left > 0:
                left -= 1
                sid, _ = await conn.open_session()
                sids.append(sid)
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sids


async def _close_all(target: Target, sids: list[str], concurrency: int) -> int:
    todo = list(sids)
    ok = 0

    async def worker() -> None:
        nonlocal ok
        conn = await AsyncConn.open(target)
        try:
            while todo:
                r = await conn.request("DELETE", target.headers(todo.pop()))
                ok += r.status in (200, 202, 204)
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok


def open_idle_sessions(target: Target, n: int, concurrency: int = 8) -> list[str]:
    sids: list[str] = run_async(_open_idle(target, n, concurrency))
    return sids


def close_sessions(target: Target, sids: list[str], concurrency: int = 8) -> int:
    ok: int = run_async(_close_all(target, sids, concurrency))
    return ok
