"""Audit event types: what happened in an MCP session, as plain data.

Events are built by the pure session engine (``bastion.session``) and written
by the emitter (``bastion.audit.emitter``).  Secrets are redacted *before* an
event exists (``bastion.audit.redact``): an ``AuditEvent`` never holds a
credential, so it can be logged, stored and shown as it is.

Types and codes (ours; the set follows Teleport's MCP session events)::

    mcp.session.start            BMCP001I   a client session with an app began
    mcp.session.end              BMCP002I / BMCP002E
    mcp.session.request          BMCP003I / BMCP003E   (E: denied, or failed upstream)
    mcp.session.notification     BMCP004I / BMCP004E
    mcp.session.listen_stream    BMCP005I / BMCP005E   (GET stream of streamable HTTP)
    mcp.session.invalid_request  BMCP006E              (not understood; refused)
    mcp.session.rejected         BMCP007E              refused before any session engine saw it
                                                       (bad Origin, app not found or hidden,
                                                       unknown session, bad path or body, limits)
    auth.failed                  BAUTH001E             missing or bad credential on an MCP request
    audit.suppressed             BAUD001E              refusals from one source past its rate,
                                                       counted instead of recorded one by one

This module must not do I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

SESSION_START = "mcp.session.start"
SESSION_END = "mcp.session.end"
REQUEST = "mcp.session.request"
NOTIFICATION = "mcp.session.notification"
LISTEN_STREAM = "mcp.session.listen_stream"
INVALID_REQUEST = "mcp.session.invalid_request"
SESSION_REJECTED = "mcp.session.rejected"
AUTH_FAILED = "auth.failed"
SUPPRESSED = "audit.suppressed"

_CODES = {
    SESSION_START: "BMCP001",
    SESSION_END: "BMCP002",
    REQUEST: "BMCP003",
    NOTIFICATION: "BMCP004",
    LISTEN_STREAM: "BMCP005",
    INVALID_REQUEST: "BMCP006",
    SESSION_REJECTED: "BMCP007",
    AUTH_FAILED: "BAUTH001",
    SUPPRESSED: "BAUD001",
}

EVENT_TYPES = tuple(_CODES)


def code_for(event_type: str, success: bool) -> str:
    return _CODES[event_type] + ("I" if success else "E")


@dataclass(frozen=True)
class AuditEvent:
    """One audit record.  ``id`` is unique (uuid4 hex); ``time`` is UTC."""

    id: str
    type: str
    time: datetime
    success: bool
    cluster_name: str
    user: str
    app: str
    #: Our session id (one per client session with one app).
    session_id: str
    roles: tuple[str, ...] = ()
    app_uri: str = ""
    #: The upstream's own session id (``Mcp-Session-Id`` or the SSE session), if any.
    upstream_session_id: str = ""
    #: JSON-RPC method, id and tool name, when the event is about a message.
    method: str = ""
    request_id: Any = None
    tool: str = ""
    #: Redacted request params (tool arguments included).
    params: Any = None
    error: str = ""
    duration_ms: float | None = None
    #: ``name/version`` of the client and of the server (from ``initialize``).
    client_info: str = ""
    server_info: str = ""
    protocol_version: str = ""
    transport: str = ""
    remote_addr: str = ""
    #: Redacted request headers (HTTP transports).
    headers: dict[str, str] = field(default_factory=dict)
    #: Anything else worth keeping (e.g. ``path`` and ``http_method`` of an invalid request).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def code(self) -> str:
        return code_for(self.type, self.success)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: empty fields omitted, ``code`` added, time as RFC 3339."""
        out: dict[str, Any] = {"event": self.type, "code": self.code}
        for k, v in self.__dict__.items():
            if k == "type":
                continue
            if isinstance(v, datetime):
                v = v.isoformat()
            elif isinstance(v, tuple):
                v = list(v)
            if v in (None, "", [], {}) and k not in ("success",):
                continue
            out[k] = v
        return out
