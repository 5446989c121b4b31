"""A minimal stdio MCP server for the benchmarks: newline-delimited JSON-RPC, blocking I/O, no asyncio.

Same answers as ``upstream_http.py`` (``initialize``, ``tools/list``, ``tools/call`` echo,
``ping``; notifications get nothing back).  It reads whatever is on the pipe, answers every
complete line and writes the answers in one go, so pipelined requests cost a few µs each.
Uses orjson when it is importable (the project venv), the stdlib ``json`` otherwise.

    python bench/upstream_stdio.py
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

try:
    import orjson

    loads = orjson.loads

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

except ImportError:  # pragma: no cover - outside the project venv
    import json

    loads = json.loads

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()


TOOLS = {
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
SERVER_INFO = {"name": "bench-echo-stdio", "version": "1.0.0"}


def answer(msg: Any) -> bytes | None:
    if not isinstance(msg, dict) or "method" not in msg or "id" not in msg:
        return None  # notifications and responses get no answer
    mid, method = msg["id"], msg["method"]
    if method == "tools/call":
        args = (msg.get("params") or {}).get("arguments") or {}
        result: Any = {"content": [{"type": "text", "text": str(args.get("message", ""))}], "isError": False}
    elif method == "tools/list":
        result = TOOLS
    elif method == "initialize":
        version = (msg.get("params") or {}).get("protocolVersion") or "2025-06-18"
        result = {"protocolVersion": version, "capabilities": {"tools": {}}, "serverInfo": SERVER_INFO}
    elif method == "ping":
        result = {}
    else:
        err = {"code": -32601, "message": f"method not found: {method}"}
        return dumps({"jsonrpc": "2.0", "id": mid, "error": err})
    return dumps({"jsonrpc": "2.0", "id": mid, "result": result})


def main() -> None:
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    pending = b""
    while True:
        data = os.read(stdin, 1 << 16)
        if not data:
            return
        *lines, pending = (pending + data).split(b"\n")
        out = []
        for line in lines:
            if not line.strip():
                continue
            try:
                reply = answer(loads(line))
            except ValueError:
                reply = b'{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"parse error"}}'
            if reply is not None:
                out.append(reply + b"\n")
        if out:
            view = memoryview(b"".join(out))
            while view:
                view = view[os.write(stdout, view) :]


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        main()
