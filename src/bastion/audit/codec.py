"""Audit events and completions as JSON-ready values, both ways (for the spool and the tunnel)."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

from bastion.audit.events import AuditEvent
from bastion.audit.store import Completion

_EVENT_FIELDS = tuple(f.name for f in dataclasses.fields(AuditEvent))


def event_to_wire(ev: AuditEvent) -> dict[str, Any]:
    out = {name: getattr(ev, name) for name in _EVENT_FIELDS}
    out["time"] = ev.time.isoformat()
    out["roles"] = list(ev.roles)
    return out


def event_from_wire(doc: dict[str, Any]) -> AuditEvent:
    kw = {k: v for k, v in doc.items() if k in _EVENT_FIELDS}
    kw["time"] = datetime.fromisoformat(doc["time"])
    kw["roles"] = tuple(doc.get("roles", ()))
    return AuditEvent(**kw)


def completion_to_wire(c: Completion) -> list[Any]:
    return [c.event_id, c.success, c.error, c.duration_ms]


def completion_from_wire(doc: list[Any]) -> Completion:
    event_id, success, error, duration_ms = doc
    return Completion(str(event_id), bool(success), str(error), duration_ms)
