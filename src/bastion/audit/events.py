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
    mcp.tool.definition_changed  BMCP008E              a tool's served definition differs from its pin
                                                       (decision 0045; hidden and refused until approved)
    auth.failed                  BAUTH001E             missing or bad credential on an MCP request

Cluster events (who did what to the cluster; decision 0033)::

    user.login                   BAUTH002I / BAUTH002E (E: reason unknown_user, password,
                                                       second_factor, second_factor_reused,
                                                       no_second_factor, locked,
                                                       source_locked or throttled)
    user.logout                  BAUTH003I             (a credential revoked)
    user.locked                  BAUTH004I             failures locked an (address, user) pair
    user.unlocked                BAUTH005I             an administrator lifted a user's locks
    cert.create                  BAUTH006I             a user credential issued (login, auth sign)
    user.create / update / delete  BUSR001I / BUSR002I / BUSR003I
    user.password_change         BUSR004I             a password set again through a reset invite
    invite.create / use          BINV001I / BINV002I / BINV002E
    role.create / update / delete  BROL001I / BROL002I / BROL003I
    app.create / update / delete   BAPP001I / BAPP002I / BAPP003I   (dynamic apps)
    join_token.create / delete   BTOK001I / BTOK002I
    app_server.join              BHOST001I / BHOST001E (an app service joined, or was refused)
    access.denied                BACC001E              an API call refused by role rules
    host.app_refused             BHOST002E             (a joined host advertised an app it may
                                                       not serve; see bastion.tunnel.admission)
    mcp_pin.approve / reset      BPIN001I / BPIN002I   an administrator approved or forgot pinned tool
                                                       definitions (decision 0045)
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
TOOL_DEFINITION_CHANGED = "mcp.tool.definition_changed"
PIN_APPROVE = "mcp_pin.approve"
PIN_RESET = "mcp_pin.reset"
AUTH_FAILED = "auth.failed"
SUPPRESSED = "audit.suppressed"
USER_LOGIN = "user.login"
USER_LOGOUT = "user.logout"
USER_LOCKED = "user.locked"
USER_UNLOCKED = "user.unlocked"
CERT_CREATE = "cert.create"
USER_CREATE = "user.create"
USER_UPDATE = "user.update"
USER_DELETE = "user.delete"
PASSWORD_CHANGE = "user.password_change"
INVITE_CREATE = "invite.create"
INVITE_USE = "invite.use"
ROLE_CREATE = "role.create"
ROLE_UPDATE = "role.update"
ROLE_DELETE = "role.delete"
APP_CREATE = "app.create"
APP_UPDATE = "app.update"
APP_DELETE = "app.delete"
JOIN_TOKEN_CREATE = "join_token.create"
JOIN_TOKEN_DELETE = "join_token.delete"
HOST_JOIN = "app_server.join"
HOST_APP_REFUSED = "host.app_refused"
ACCESS_DENIED = "access.denied"

_CODES = {
    SESSION_START: "BMCP001",
    SESSION_END: "BMCP002",
    REQUEST: "BMCP003",
    NOTIFICATION: "BMCP004",
    LISTEN_STREAM: "BMCP005",
    INVALID_REQUEST: "BMCP006",
    SESSION_REJECTED: "BMCP007",
    TOOL_DEFINITION_CHANGED: "BMCP008",
    PIN_APPROVE: "BPIN001",
    PIN_RESET: "BPIN002",
    AUTH_FAILED: "BAUTH001",
    SUPPRESSED: "BAUD001",
    USER_LOGIN: "BAUTH002",
    USER_LOGOUT: "BAUTH003",
    USER_LOCKED: "BAUTH004",
    USER_UNLOCKED: "BAUTH005",
    CERT_CREATE: "BAUTH006",
    USER_CREATE: "BUSR001",
    USER_UPDATE: "BUSR002",
    USER_DELETE: "BUSR003",
    PASSWORD_CHANGE: "BUSR004",
    INVITE_CREATE: "BINV001",
    INVITE_USE: "BINV002",
    ROLE_CREATE: "BROL001",
    ROLE_UPDATE: "BROL002",
    ROLE_DELETE: "BROL003",
    APP_CREATE: "BAPP001",
    APP_UPDATE: "BAPP002",
    APP_DELETE: "BAPP003",
    JOIN_TOKEN_CREATE: "BTOK001",
    JOIN_TOKEN_DELETE: "BTOK002",
    HOST_JOIN: "BHOST001",
    HOST_APP_REFUSED: "BHOST002",
    ACCESS_DENIED: "BACC001",
}

#: Kinds whose create/update/delete are audited, and the event type of each change.
RESOURCE_EVENTS: dict[str, tuple[str, str, str]] = {
    "user": (USER_CREATE, USER_UPDATE, USER_DELETE),
    "role": (ROLE_CREATE, ROLE_UPDATE, ROLE_DELETE),
    "app": (APP_CREATE, APP_UPDATE, APP_DELETE),
    "token": (JOIN_TOKEN_CREATE, JOIN_TOKEN_CREATE, JOIN_TOKEN_DELETE),
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
