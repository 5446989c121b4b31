"""The JSON-RPC errors ``bastion mcp connect`` answers with, and how the proxy's refusals become them.

The bridge's own codes (:data:`LOGIN_REQUIRED`, :data:`SERVER_CHANGED`,
:data:`PROXY_UNREACHABLE`) and their messages; :func:`http_error`, which turns an HTTP
refusal into a JSON-RPC error keeping the gateway's words and saying whose fault it is
(``X-Bastion-Error-Origin``); and :class:`Failure` and its kin, which the bridge's parts
raise when a message could not be carried.  Pure: no I/O.
"""

from __future__ import annotations

import contextlib
from typing import Final

import orjson

from bastion.protocol import jsonrpc

__all__ = [
    "EXPIRED_MESSAGE",
    "LOGIN_REQUIRED",
    "PROXY_UNREACHABLE",
    "SERVER_CHANGED",
    "CredentialRenewed",
    "Failure",
    "SessionLost",
    "body_says_expired",
    "error_text",
    "http_error",
    "internal_message",
    "network_message",
]

# JSON-RPC codes of the bridge's own answers.  -32001 is the SDKs' RequestTimeout
# (and the gateway's "session not found"); -32050..-32052 are the gateway's (see
# bastion.protocol.jsonrpc), so the bridge continues from -32053.

#: The bastion credential expired (or there is none): run ``bastion login``; no restart needed.
LOGIN_REQUIRED: Final = -32053
#: The MCP server behind the app changed identity across a reconnection: restart the client.
SERVER_CHANGED: Final = -32054
#: The bastion proxy could not be reached (or the connection broke mid-answer).
PROXY_UNREACHABLE: Final = -32055

EXPIRED_MESSAGE: Final = (
    "your bastion credential expired: run `bastion login` in a terminal; "
    "there is no need to restart your MCP client"
)


def body_says_expired(body: bytes) -> bool:
    """True if an error body (JSON or text) says the credential expired."""
    return "expired" in error_text(body).lower()


def error_text(body: bytes) -> str:
    """The human message in an error body: JSON-RPC or ``{"error": {...}}`` JSON, else the text."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace").strip()[:500]
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if isinstance(obj.get("message"), str):
            return str(obj["message"])
    return body.decode("utf-8", "replace").strip()[:500]


def _fault(origin: str, app: str) -> str:
    if origin == "client":
        return "the request or your access rights (client side)"
    if origin == "gateway":
        return "the bastion gateway"
    if origin == "upstream":
        return f"the MCP server behind {app}"
    return "unknown"


def http_error(app: str, status: int, origin: str, body: bytes) -> tuple[int, str]:
    """The JSON-RPC (code, message) answering a request the gateway refused with HTTP ``status``.

    The message keeps the gateway's own words and says whose fault it is
    (``X-Bastion-Error-Origin``).  The code is the one in a JSON-RPC error body,
    else -32600 for the client's faults and -32603 for the others.
    """
    code: int | None = None
    with contextlib.suppress(orjson.JSONDecodeError):
        obj = orjson.loads(body)
        if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
            c = obj["error"].get("code")
            if type(c) is int:
                code = c
    text = error_text(body) or f"HTTP {status}"
    if code is None:
        code = jsonrpc.INVALID_REQUEST if origin == "client" else jsonrpc.INTERNAL_ERROR
    return code, f"{text} (HTTP {status} from the bastion proxy; at fault: {_fault(origin, app)})"


def network_message(app: str, proxy: str, reason: str, *, temporary: bool = True) -> str:
    """``temporary=False``: the proxy's certificate was refused (``reason`` says what to do)."""
    if not temporary:
        return f"cannot reach the bastion proxy at {proxy} for {app}: {reason}"
    return (
        f"cannot reach the bastion proxy at {proxy} for {app}: {reason}; this is usually temporary: "
        "try again (`bastion mcp connect` reconnects by itself)"
    )


class Failure(Exception):
    """A message could not be carried: the JSON-RPC error to answer it with."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class SessionLost(Failure):
    """The session is gone (404, or the proxy unreachable): reconnect, then send again once."""


class CredentialRenewed(Exception):
    """401, but a new login replaced the credential meanwhile: send again once."""


def internal_message(e: Exception) -> str:
    return f"internal error in `bastion mcp connect` ({type(e).__name__}: {e}); its log (stderr) has details"
