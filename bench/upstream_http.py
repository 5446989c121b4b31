"""A minimal streamable-HTTP MCP server for the benchmarks: raw asyncio + httptools (+ uvloop).

Answers ``initialize`` (with an ``Mcp-Session-Id``), ``tools/list``, ``tools/call`` (an echo),
``ping`` and notifications (202) on any path; ``DELETE`` is 200, ``GET`` 405 (no server stream).
Every answer is ``application/json``.  It keeps no per-session state, so it costs a few µs per
request and is never the bottleneck.  Prints its port on stdout, then serves until killed.

    python bench/upstream_http.py [--port 0]
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

import httptools
import orjson

TOOLS = orjson.dumps(
    {
        "tools": [
            {
                "name": "echo",
                "description": "Echoes its message back.",
                "inputSchema": {
                    "type": "object",
                    "properties": {"message": {"type": "string"}},
                    "required": ["message"],
                },
            }
        ]
    }
)
SERVER_INFO = {"name": "bench-echo-http", "version": "1.0.0"}
_HEAD = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n"
_REASON = {200: b"OK", 202: b"Accepted", 400: b"Bad Request", 405: b"Method Not Allowed"}


def answer(msg: Any) -> tuple[int, bytes, bytes]:
    """(status, body, extra header lines) for one JSON-RPC message."""
    if not isinstance(msg, dict) or "method" not in msg:
        return 202, b"", b""  # a response or garbage: nothing to say
    if "id" not in msg:
        return 202, b"", b""  # a notification
    mid, method = msg["id"], msg["method"]
    if method == "tools/call":
        args = (msg.get("params") or {}).get("arguments") or {}
        text = str(args.get("message", ""))
        result: Any = {"content": [{"type": "text", "text": text}], "isError": False}
    elif method == "tools/list":
        return 200, b'{"jsonrpc":"2.0","id":' + orjson.dumps(mid) + b',"result":' + TOOLS + b"}", b""
    elif method == "initialize":
        version = (msg.get("params") or {}).get("protocolVersion") or "2025-06-18"
        result = {"protocolVersion": version, "capabilities": {"tools": {}}, "serverInfo": SERVER_INFO}
        body = orjson.dumps({"jsonrpc": "2.0", "id": mid, "result": result})
        return 200, body, b"mcp-session-id: " + os.urandom(16).hex().encode() + b"\r\n"
    elif method == "ping":
        result = {}
    else:
        err = {"code": -32601, "message": f"method not found: {method}"}
        return 200, orjson.dumps({"jsonrpc": "2.0", "id": mid, "error": err}), b""
    return 200, orjson.dumps({"jsonrpc": "2.0", "id": mid, "result": result}), b""


class EchoMCP(asyncio.Protocol):
    __slots__ = ("body", "parser", "transport")

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.body: list[bytes] = []
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        body = b"".join(self.body)
        self.body.clear()
        extra = b""
        if method == b"POST":
            try:
                status, out, extra = answer(orjson.loads(body))
            except orjson.JSONDecodeError:
                status, out = (
                    400,
                    b'{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"parse error"}}',
                )
        elif method == b"DELETE":
            status, out = 200, b""
        else:
            status, out = 405, b""
        self.transport.write(_HEAD % (status, _REASON[status], len(out), extra) + out)
        if not self.parser.should_keep_alive():
            self.transport.close()


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoMCP, "127.0.0.1", port, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.run(serve(args.port))
    except ImportError:
        asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
