"""One MCP session over plain HTTPS, each request sent through whichever node the test names.

For cluster tests where one session's requests go through different proxies: ``where`` is a
node (anything with ``.addr``) or a ``host:port``; subclasses may map other values.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any

import httpx

VERSION = "2025-06-18"


class McpOverHttps:
    def __init__(self, ca: Path, token: str, app: str = "everything") -> None:
        self.app = app
        self.sid = ""
        self.n = 0
        self.http = httpx.Client(
            verify=ssl.create_default_context(cafile=str(ca)),
            timeout=30,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"},
        )

    def close(self) -> None:
        self.http.close()

    def addr_of(self, where: Any) -> str:
        return str(getattr(where, "addr", where))

    def url(self, where: Any) -> str:
        return f"https://{self.addr_of(where)}/mcp/apps/{self.app}"

    def post(self, where: Any, body: dict[str, Any]) -> httpx.Response:
        headers = {"Mcp-Session-Id": self.sid, "MCP-Protocol-Version": VERSION} if self.sid else {}
        return self.http.post(self.url(where), json=body, headers=headers)

    def rpc(self, where: Any, method: str, params: dict[str, Any] | None = None) -> Any:
        """A request, answered 200 (JSON or SSE); its response message."""
        self.n += 1
        body: dict[str, Any] = {"jsonrpc": "2.0", "id": self.n, "method": method}
        if params is not None:
            body["params"] = params
        r = self.post(where, body)
        assert r.status_code == 200, (r.status_code, r.text)
        if not self.sid:
            self.sid = r.headers["mcp-session-id"]
        if r.headers["content-type"].startswith("text/event-stream"):
            for line in r.text.splitlines():
                if line.startswith("data:"):
                    msg = json.loads(line[5:])
                    if msg.get("id") == self.n:
                        return msg
            raise AssertionError(f"no answer in the stream: {r.text[:500]}")
        return r.json()

    def notify(self, where: Any, method: str) -> None:
        r = self.post(where, {"jsonrpc": "2.0", "method": method})
        assert r.status_code == 202, (r.status_code, r.text)

    def start(self, where: Any, then: Any = None) -> None:
        """initialize through ``where``; notifications/initialized through ``then`` (or the same)."""
        init = self.rpc(
            where,
            "initialize",
            {
                "protocolVersion": VERSION,
                "capabilities": {},
                "clientInfo": {"name": "cluster", "version": "1"},
            },
        )
        assert init["result"]["serverInfo"], init
        self.notify(where if then is None else then, "notifications/initialized")

    def echo(self, where: Any, text: str) -> None:
        got = self.rpc(where, "tools/call", {"name": "echo", "arguments": {"message": text}})
        assert got["result"]["content"][0]["text"] == f"Echo: {text}", got
