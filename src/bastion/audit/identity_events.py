"""Audit events about identities, not sessions: logins, logouts, joins, refused host apps.

Pure builders (no I/O): the proxy's web API and tunnel listener record what
these return.  Every free-text field is clipped (``audit.bound``), since most
of it is client input (a user name typed at a login prompt, a host's own app
definitions).  How many there can be is bounded where they arise: login and
join failures by ``auth.throttle`` (per source), refused host apps once per
host, app and definition.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from bastion.audit import events as ev
from bastion.audit.bound import MAX_ERROR, MAX_NAME, clip
from bastion.audit.events import AuditEvent

_MAX_ADDR = 64


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
        user=clip(user, MAX_NAME),
        app=clip(app, MAX_NAME),
        session_id="",
        error=clip(error, MAX_ERROR),
        remote_addr=clip(remote_addr, _MAX_ADDR),
        extra={k: clip(str(v), MAX_NAME) for k, v in (extra or {}).items()},
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
