"""Gateway sessions: what one MCP session through this app service holds, and the request's headers.

A session is bound to its user, its app (and that app's definition) and its upstream; its
id is minted here (``new_session_id``).  The client's headers are turned, once per change,
into what its audit events record (redacted) and what may pass upstream (``session_headers``).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bastion.appservice.upstreams import UpstreamIdentity, is_identity_header
from bastion.audit.redact import redact_headers
from bastion.errors import BastionError
from bastion.metrics import AppMetrics
from bastion.resources import App
from bastion.session.engine import Session

if TYPE_CHECKING:
    from bastion.appservice.upstream import Upstream

#: Client headers never passed upstream: hop-by-hop, credentials, and what the gateway sets.
_HOP = frozenset(
    {
        b"host",
        b"connection",
        b"content-length",
        b"transfer-encoding",
        b"authorization",
        b"cookie",
        b"mcp-session-id",
        b"keep-alive",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authorization",
        b"origin",
        b"bastion-jwt-assertion",
        b"x-forwarded-for",
    }
)
_NOT_AUDITED = frozenset({b"content-length", b"connection", b"host", b"accept-encoding"})


@dataclass(frozen=True)
class Limits:
    max_body: int = 4 << 20
    sessions_per_user: int = 64
    idle_timeout: float = 30 * 60.0
    response_timeout: float = 300.0


@dataclass(eq=False)
class GatewaySession:
    id: str
    user: str
    app: App
    engine: Session
    ident: UpstreamIdentity
    m: AppMetrics  # this app's metrics, children bound in advance
    upstream: Upstream
    upstream_session_id: str = ""
    last_active: float = field(default_factory=time.monotonic)
    #: Why the session ended ("" while it lives): set once, before its end event is written.
    dead: str = ""
    policy_key: tuple[int, ...] = ()
    #: Client header names never passed upstream for this app (its rewrite headers and the
    #: identity headers): computed once per app, checked only when the client's headers change.
    strip: frozenset[bytes] = frozenset()
    #: The client's headers as last seen (without content-length), and what was derived
    #: from them: clients send the same headers on every request of a session.
    hdr_key: dict[bytes, bytes] | None = None
    hdr_seen: dict[bytes, bytes] | None = None  # the last request's headers, as they came
    audit_hdrs: dict[str, str] = field(default_factory=dict)
    pass_hdrs: list[tuple[bytes, bytes]] = field(default_factory=list)


class SessionGone(BastionError):
    origin = "client"
    http_status = 404
    code = "session_not_found"


class Refused(BastionError):
    """A request refused before (or without) a session engine: answered and audited by the handler."""

    origin = "client"
    code = "refused"

    def __init__(
        self,
        status: int,
        message: str,
        *,
        rpc_code: int = -32600,
        mid: Any = None,
        allow: bytes = b"",
        data: Any = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.rpc_code = rpc_code
        self.mid = mid
        self.allow = allow
        #: The JSON-RPC error's ``data`` (-32022 lists the supported versions).
        self.data = data


def new_session_id() -> str:
    """A session id: 48 bits of time (so the audit index appends in order) + 128 random bits.

    Unguessable (the random part alone is 128 bits) and visible ASCII, as the
    spec asks of ``Mcp-Session-Id``.
    """
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(16)}"


def session_headers(
    s: GatewaySession, headers: dict[bytes, bytes]
) -> tuple[dict[str, str], list[tuple[bytes, bytes]]]:
    """(redacted headers for audit events, headers passed upstream), recomputed only on change.

    The pass list is a new object whenever it is recomputed (``HTTPUpstream`` relies on it).
    """
    if headers is not s.hdr_seen and headers != s.hdr_seen:  # else: as last time, content-length too
        h = dict(headers)
        h.pop(b"content-length", None)
        if h != s.hdr_key:
            s.hdr_key = h
            s.audit_hdrs = _audit_headers(headers)
            strip = s.strip
            s.pass_hdrs = [(k, v) for k, v in headers.items() if not _dropped(k, strip)]
        s.hdr_seen = headers
    return s.audit_hdrs, s.pass_hdrs


def _dropped(name: bytes, strip: frozenset[bytes]) -> bool:
    """Whether a client header (lower-case ``name``) is kept from the upstream.

    Compared with ``_`` read as ``-``: CGI, WSGI and Rack servers store both spellings under
    one key (``HTTP_X_FORWARDED_USER``), so ``X_Forwarded_User`` would reach such an upstream
    as the identity header it names, beside or before the gateway's own value; an ``Mcp_*``
    spelling of a header the gateway checks against the body (``Mcp-Name``...) is dropped too.
    """
    if b"_" in name:
        name = name.replace(b"_", b"-")
        if name.startswith(b"mcp-"):
            return True  # Mcp_Name, Mcp_Method...: the gateway checks the "-" spellings only
    return (
        name in _HOP
        or name in strip
        or name.startswith(b"x-bastion")
        or is_identity_header(name)
        or name in (b"accept", b"content-type")
    )


def _audit_headers(headers: dict[bytes, bytes]) -> dict[str, str]:
    """The request's headers for its audit events: credentials and secrets redacted."""
    return redact_headers(
        {k.decode("latin-1"): v.decode("latin-1") for k, v in headers.items() if k not in _NOT_AUDITED}
    )
