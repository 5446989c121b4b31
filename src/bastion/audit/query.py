"""Turn search parameters (web API query strings, CLI flags) into an ``AuditQuery``."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from bastion._time import parse_duration
from bastion.audit.events import EVENT_TYPES, AuditEvent
from bastion.audit.store import ORDERS, OUTCOMES, AuditQuery
from bastion.errors import ValidationError


def parse_when(text: str, *, now: datetime | None = None) -> datetime:
    """An RFC 3339 time, or a duration meaning "that long ago" (``1h``, ``30m``)."""
    text = text.strip()
    try:
        return (now or datetime.now(UTC)) - parse_duration(text)
    except ValueError:
        pass
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValidationError(
            f'invalid time "{text}" (use RFC 3339, e.g. 2026-11-22T10:00:00Z, or 1h for an hour ago)'
        ) from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def query_from_params(params: Mapping[str, str]) -> AuditQuery:
    """The query the parameters ask for: the newest ``limit`` events, newest first, unless
    ``order=asc`` (then the oldest ``limit``, oldest first)."""
    types = tuple(t for t in (params.get("type") or "").split(",") if t)
    for t in types:
        if t not in EVENT_TYPES:
            raise ValidationError(f'unknown event type "{t[:80]}" (known: {", ".join(EVENT_TYPES)})')
    order = params.get("order") or "desc"
    if order not in ORDERS:
        raise ValidationError(f'order must be asc or desc, not "{order[:40]}"')
    limit_text = params.get("limit") or "1000"
    if not limit_text.isdigit() or len(limit_text) > 12:
        raise ValidationError("limit must be a whole number (0: no limit)")
    outcome = params.get("outcome") or None
    if outcome is not None and outcome not in OUTCOMES:
        raise ValidationError(f'outcome must be success or failure, not "{outcome[:40]}"')
    return AuditQuery(
        since=parse_when(params["since"]) if params.get("since") else None,
        until=parse_when(params["until"]) if params.get("until") else None,
        types=types,
        user=params.get("user") or None,
        app=params.get("app") or None,
        session_id=params.get("session") or None,
        tool=params.get("tool") or None,
        outcome=outcome,
        limit=int(limit_text),
        order=order,
    )


def matches(query: AuditQuery, event: AuditEvent) -> bool:
    """Whether ``event`` is one ``query`` asks for (for events not in a store yet)."""
    return (
        (query.since is None or event.time >= query.since)
        and (query.until is None or event.time <= query.until)
        and (not query.types or event.type in query.types)
        and (query.user is None or event.user == query.user)
        and (query.app is None or event.app == query.app)
        and (query.session_id is None or event.session_id == query.session_id)
        and (query.tool is None or event.tool == query.tool)
        and (query.outcome is None or bool(event.success) == (query.outcome == "success"))
    )
