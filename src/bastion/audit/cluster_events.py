"""Cluster events: who did what to the cluster, not inside an MCP session (decision 0033).

Logins and their refusals, credentials issued, users, roles, apps and join tokens
created, changed or deleted, invites, lockouts, hosts joining, API calls refused
by role rules.  Pure builders (no I/O): ``AuthServer`` records what these return
(the tunnel listener records refused host apps).  Every free-text field is
clipped (``audit.bound``), since most of it is client input (a user name typed at
a login prompt, a host's own app definitions); no builder takes a secret.  How
many there can be is bounded where they arise: login and join failures by
``auth.throttle`` (per source), refusals nobody authenticated for by a
``RefusalLimiter`` per source, refused host apps once per host, app and definition.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import datetime
from typing import Any

from bastion.audit import events as ev
from bastion.audit.bound import MAX_ERROR, MAX_NAME, clip
from bastion.audit.events import AuditEvent

_MAX_ADDR = 64
#: A list in ``extra`` (roles, changed fields) keeps at most this many entries.
_MAX_LIST = 64


def _extra_value(v: Any) -> Any:
    if isinstance(v, list | tuple | set | frozenset):
        return [clip(str(x), MAX_NAME) for x in list(v)[:_MAX_LIST]]
    if isinstance(v, bool | int | float) or v is None:
        return v
    return clip(str(v), MAX_NAME)


def event(
    type_: str,
    now: datetime,
    cluster: str,
    *,
    success: bool = True,
    user: str = "",
    app: str = "",
    error: str = "",
    remote_addr: str = "",
    roles: tuple[str, ...] = (),
    extra: dict[str, Any] | None = None,
) -> AuditEvent:
    """A cluster event of ``type_`` (one of ``events.EVENT_TYPES``); ``user`` is the actor."""
    ev_ = _event(
        type_, success, now, cluster, user=user, app=app, error=error, remote_addr=remote_addr, extra=extra
    )
    if roles:
        ev_ = replace(ev_, roles=tuple(clip(r, MAX_NAME) for r in roles[:_MAX_LIST]))
    return ev_


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
        extra={k: _extra_value(v) for k, v in (extra or {}).items() if v not in (None, "", [], ())},
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
