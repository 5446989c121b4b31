"""Audit events about identities, not sessions: logins, logouts, joins, refused host apps.

Pure builders (no I/O): the proxy's web API and tunnel listener record what
these return.  Every free-text field is bounded, since most of it is client
input (a user name typed at a login prompt, a host's own app definitions).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from bastion.audit import events as ev
from bastion.audit.events import AuditEvent

_MAX_FIELD = 256


def _cut(text: str, limit: int = _MAX_FIELD) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _event(
    type_: str,
    success: bool,
    now: datetime,
    cluster: str,
    *,
    user: str = "",
    app: str = "",
    error: str = "",
    remote_addr: str = "",
    extra: dict[str, Any] | None = None,
) -> AuditEvent:
    return AuditEvent(
        id=uuid.uuid4().hex,
        type=type_,
        time=now,
        success=success,
        cluster_name=cluster,
        user=_cut(user, 128),
        app=_cut(app, 128),
        session_id="",
        error=_cut(error),
        remote_addr=_cut(remote_addr, 64),
        extra={k: _cut(str(v)) for k, v in (extra or {}).items()},
    )


def login(
    now: datetime,
    cluster: str,
    user: str,
    remote_addr: str,
    *,
    error: str = "",
    reason: str = "",
    locked_now: bool = False,
) -> AuditEvent:
    """A login: ``error`` empty = success; ``reason`` says why it was refused; ``locked_now``
    when this failure locked the (address, user) pair."""
    extra: dict[str, Any] = {"reason": reason} if reason else {}
    if locked_now:
        extra["locked"] = "address+user"
    return _event(
        ev.USER_LOGIN, not error, now, cluster, user=user, error=error, remote_addr=remote_addr, extra=extra
    )


def logout(now: datetime, cluster: str, user: str, remote_addr: str, credential_id: str) -> AuditEvent:
    return _event(
        ev.USER_LOGOUT,
        True,
        now,
        cluster,
        user=user,
        remote_addr=remote_addr,
        extra={"credential_id": credential_id},
    )


def join(
    now: datetime, cluster: str, hostname: str, remote_addr: str, *, host_id: str = "", error: str = ""
) -> AuditEvent:
    extra = {"hostname": hostname, "host_id": host_id} if host_id else {"hostname": hostname}
    return _event(ev.HOST_JOIN, not error, now, cluster, error=error, remote_addr=remote_addr, extra=extra)


def app_refused(
    now: datetime, cluster: str, app: str, reason: str, *, host_id: str, hostname: str, remote_addr: str
) -> AuditEvent:
    return _event(
        ev.HOST_APP_REFUSED,
        False,
        now,
        cluster,
        app=app,
        error=reason,
        remote_addr=remote_addr,
        extra={"host_id": host_id, "hostname": hostname},
    )
