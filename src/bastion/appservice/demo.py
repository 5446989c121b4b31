"""The built-in demo MCP server (app ``bastion-demo``): tools that show the caller's identity.

It is an in-memory upstream with the same ``send``/``receive``/``aclose``
shape as the stdio and SSE upstreams, so it goes through the very same
session engine, RBAC and audit as any real server — only without a process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from bastion import __version__
from bastion.config import DEMO_APP_NAME
from bastion.resources import App, AppSpec, MCPCommand, Metadata

__all__ = ["DEMO_APP_NAME", "DemoServer", "demo_app"]
SUPPORTED_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")

_TOOLS = [
    {
        "name": "bastion_user_info",
        "description": "Show who you are to the gateway: user name, roles and traits.",
        "inputSchema": {"type": "object", "properties": {}},
    },
    {
        "name": "bastion_session_info",
        "description": "Show this MCP session: its id, the app, the transport and your client.",
        "inputSchema": {"type": "object", "properties": {}},
    },
    {
        "name": "bastion_demo_info",
        "description": "Explain what this demo server is and how mcp-bastion protects MCP servers.",
        "inputSchema": {"type": "object", "properties": {}},
    },
]


def demo_app() -> App:
    return App(
        metadata=Metadata(
            name=DEMO_APP_NAME,
            description="A demo MCP server that shows your identity and session as the gateway sees them",
            labels={"bastion.internal/resource-type": "demo", "env": "demo"},
        ),
        spec=AppSpec(uri="mcp+stdio://bastion-demo", mcp=MCPCommand(command="(built in)")),
    )


class DemoServer:
    """One demo session: answers initialize, ping, tools/list and tools/call."""

    upstream_session_id = ""

    def __init__(
        self,
        *,
        user: str,
        roles: Sequence[str],
        traits: Mapping[str, Sequence[str]],
        session_id: str,
        transport: str,
        cluster_name: str,
    ) -> None:
        self._out: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._info = {
            "user": user,
            "roles": list(roles),
            "traits": {k: list(v) for k, v in traits.items()},
            "cluster": cluster_name,
        }
        self._session = {"session_id": session_id, "app": DEMO_APP_NAME, "transport": transport}
        self._closed = False

    async def send(self, raw: bytes) -> None:
        from bastion.transport import UpstreamClosedError

        if self._closed:
            raise UpstreamClosedError("the demo server session is closed")
        msg = orjson.loads(raw)
        reply = self._handle(msg)
        if reply is not None:
            self._out.put_nowait(orjson.dumps(reply))

    async def receive(self) -> bytes:
        from bastion.transport import UpstreamClosedError

        item = await self._out.get()
        if item is None:
            raise UpstreamClosedError("the demo server session is closed")
        return item

    async def aclose(self) -> None:
        self._closed = True
        self._out.put_nowait(None)

    def _handle(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        method, mid = msg.get("method"), msg.get("id")
        if mid is None or method is None:
            return None  # notifications and client responses need no answer
        params = msg.get("params") or {}
        if method == "initialize":
            asked = params.get("protocolVersion")
            self._session["client"] = "{name}/{version}".format(
                **{"name": "", "version": "", **(params.get("clientInfo") or {})}
            )
            self._session["protocol_version"] = (
                asked if asked in SUPPORTED_VERSIONS else SUPPORTED_VERSIONS[0]
            )
            return _ok(
                mid,
                {
                    "protocolVersion": self._session["protocol_version"],
                    "capabilities": {"tools": {"listChanged": True}},
                    "serverInfo": {"name": DEMO_APP_NAME, "version": __version__},
                    "instructions": "A demo server of mcp-bastion. "
                    "Call bastion_user_info to see who you are.",
                },
            )
        if method == "ping":
            return _ok(mid, {})
        if method == "tools/list":
            return _ok(mid, {"tools": _TOOLS})
        if method == "tools/call":
            name = params.get("name")
            if name == "bastion_user_info":
                return _ok(mid, _text(self._info))
            if name == "bastion_session_info":
                return _ok(mid, _text(self._session))
            if name == "bastion_demo_info":
                return _ok(
                    mid,
                    _text(
                        "This is bastion-demo, built into mcp-bastion. Every message you send passes the "
                        "gateway: it authenticates you, filters the tools you may see, refuses calls your "
                        "roles do not allow, and writes an audit event before forwarding each call."
                    ),
                )
            return {
                "jsonrpc": "2.0",
                "id": mid,
                "error": {"code": -32602, "message": f"unknown tool {name!r}"},
            }
        return {
            "jsonrpc": "2.0",
            "id": mid,
            "error": {"code": -32601, "message": f"method {method!r} not found"},
        }


def _ok(mid: Any, result: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": mid, "result": result}


def _text(value: Any) -> dict[str, Any]:
    text = value if isinstance(value, str) else orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()
    return {"content": [{"type": "text", "text": text}], "isError": False}
