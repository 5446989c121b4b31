"""What a reconnection of ``bastion mcp connect`` replays and checks: the client's handshake.

:class:`InitCache` keeps the client's ``initialize`` request, its ``initialized``
notification and the server's identity (the ``serverInfo`` name and version of the
result); a replayed ``initialize`` whose server is not the same is refused with
:func:`server_changed_message`.  Pure: no I/O.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from bastion.protocol import jsonrpc

__all__ = ["InitCache", "ServerIdentity", "protocol_version_of", "server_changed_message", "server_identity"]


class ServerIdentity(NamedTuple):
    """What ``serverInfo`` says the server is; compared across reconnections."""

    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name or '(unnamed)'} {self.version or '(no version)'}"


def server_identity(result: Any) -> ServerIdentity | None:
    """The ``serverInfo`` name and version of an ``initialize`` result (``None`` if it has none)."""
    if not isinstance(result, dict):
        return None
    info = result.get("serverInfo")
    if not isinstance(info, dict):
        return None
    name, version = info.get("name"), info.get("version")
    return ServerIdentity(name if isinstance(name, str) else "", version if isinstance(version, str) else "")


def server_changed_message(app: str, old: ServerIdentity | None, new: ServerIdentity | None) -> str:
    return (
        f"the MCP server behind {app} changed (was {old or 'unknown'}, now {new or 'unknown'}); "
        "restart your MCP client"
    )


class InitCache:
    """What a reconnection replays and checks: the client's handshake and the server's identity."""

    __slots__ = ("initialized", "protocol_version", "request", "server")

    def __init__(self) -> None:
        self.request: jsonrpc.Message | None = None
        self.initialized: bytes | None = None
        self.server: ServerIdentity | None = None
        self.protocol_version = ""

    def start(self, request: jsonrpc.Message) -> None:
        """The client sent ``initialize``: a new handshake replaces whatever was cached."""
        self.reset()
        self.request = request

    def reset(self) -> None:
        self.request = None
        self.initialized = None
        self.server = None
        self.protocol_version = ""

    def accepted(self, result: Any) -> None:
        """The server's ``initialize`` result for the client's own request."""
        self.server = server_identity(result)
        self.protocol_version = protocol_version_of(result)

    def changed(self, app: str, result: Any) -> str | None:
        """For a replayed ``initialize``: the refusal message if the server is not the same, else None."""
        new = server_identity(result)
        if new != self.server:
            return server_changed_message(app, self.server, new)
        return None


def protocol_version_of(result: Any) -> str:
    if isinstance(result, dict) and isinstance(result.get("protocolVersion"), str):
        return str(result["protocolVersion"])
    return ""
