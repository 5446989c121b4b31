"""The audit log pages: search with filters, one session's events, live tail, JSON-lines export.

For users whose roles allow ``list`` and ``read`` on ``event`` (``Actor.require``, as
``GET /v1/audit/*`` asks).  The same query parameters as the web API and ``bastion audit
search`` (``audit.query.query_from_params``) and the same one-line details
(``client.auditread.details``).  Paged on the server, newest first (``page_of``).  The
live tail reads the feed in commit order (decision 0034), as ``bastion audit tail -f`` does.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from bastion.audit.events import EVENT_TYPES
from bastion.audit.query import parse_when, query_from_params
from bastion.client.auditread import details
from bastion.errors import ValidationError
from bastion.webui import guard
from bastion.webui.context import UI, Signed

PAGE_SIZE = 100
FILTERS = ("since", "until", "user", "app", "tool", "type", "outcome", "session")
SESSION_MOST = 1000
#: The most characters of one event's arguments the session page shows (an event may store
#: 64 KiB of them: a session of such calls was a page of hundreds of MB); the export has all.
PARAMS_SHOWN = 4096
#: As ``bastion audit tail -f``: a call is shown once it has its outcome, or after 2 s without.
HOLD_MS = 2000
FEED_PAGE = 200
#: The most events of one time a page skips (ties shown on earlier pages; a page reads them).
MOST_SKIPPED = 1000


def row(e: dict[str, Any]) -> dict[str, Any]:
    """An event as a table row shows it."""
    return {
        "time": str(e.get("time", ""))[:23].replace("T", " "),
        "event": e.get("event", ""),
        "code": e.get("code", ""),
        "user": e.get("user", ""),
        "app": e.get("app", ""),
        "method": e.get("method", ""),
        "tool": e.get("tool", ""),
        "ok": bool(e.get("success")),
        "session": e.get("session_id", ""),
        "details": details(e)[:500],
    }


async def page_of(
    store: Any, filters: dict[str, str], before: str = "", skip: int = 0, size: int = PAGE_SIZE
) -> tuple[list[dict[str, Any]], dict[str, str] | None]:
    """One page of the newest events matching ``filters``: those up to ``before`` (an event
    time) less the first ``skip``; and the parameters of the next page (None after the last).

    Keyset paging: the next page asks for events up to the last time shown, skipping those of
    that time already shown — the stores order equal times by their write sequence, so the
    same query lists them in the same order.  A page costs its size plus the ties skipped,
    however deep it is.
    """
    # The stores search ``since <= time < until``: one microsecond past ``before`` takes it in.
    bound = {"until": (parse_when(before) + timedelta(microseconds=1)).isoformat()} if before else {}
    query = query_from_params({**filters, **bound, "limit": str(size + skip)})
    events = (await store.search(query))[skip:]
    if len(events) < size:
        return events, None
    last = events[-1]["time"]
    same = sum(1 for e in events if e["time"] == last)
    if before == last:
        same += skip  # the ties shown on earlier pages
    return events, {**filters, "before": last, "skip": str(same)}


def routes(ui: UI) -> list[Route]:
    def store() -> Any:
        if ui.audit is None:
            raise ValidationError("this proxy keeps no audit log (no app service runs here)")
        return ui.audit

    async def search_page(request: Request, s: Signed) -> Response:
        s.actor.require("event", "list", "read")
        params = {k: request.query_params.get(k, "").strip()[:200] for k in FILTERS}
        if not any(params.values()):
            params["since"] = "24h"
        raw_skip = request.query_params.get("skip", "0")
        skip = int(raw_skip) if raw_skip.isdigit() and len(raw_skip) < 6 else 0
        filters = {k: v for k, v in params.items() if v}
        error, after = "", None
        events: list[dict[str, Any]] = []
        try:
            if skip > MOST_SKIPPED:
                # A page reads the events it skips: skip=99999 read 100,000 events, params and all.
                raise ValidationError(
                    f"more than {MOST_SKIPPED} events share one time: export the filtered list instead"
                )
            before = request.query_params.get("before", "")[:64]
            events, after = await page_of(store(), filters, before, skip)
        except ValidationError as e:
            error = e.message
        more = "/web/audit?" + urlencode(after) if after else ""
        ctx = {
            "title": "Audit log",
            "f": params,
            "types": EVENT_TYPES,
            "events": [row(e) for e in events],
            "error": error,
            "more": more,
            "first": "/web/audit?" + urlencode(filters),
            "export": "/web/audit/export.jsonl?" + urlencode(filters),
            "paged": "before" in request.query_params,
        }
        return ui.render(request, "audit.html", ctx, signed=s)

    async def session_page(request: Request, s: Signed) -> Response:
        s.actor.require("event", "list", "read")
        sid = request.path_params["sid"][:200]
        query = query_from_params({"session": sid, "order": "asc", "limit": str(SESSION_MOST)})
        events = await store().search(query)
        ctx = {
            "title": f"Session {sid}",
            "sid": sid,
            "events": [
                {**row(e), "params": _params_shown(e.get("params")), "error": str(e.get("error", ""))[:4096]}
                for e in events
            ],
            "truncated": len(events) == SESSION_MOST,
            "most": SESSION_MOST,
        }
        return ui.render(request, "audit_session.html", ctx, signed=s)

    async def export(request: Request, s: Signed) -> Response:
        s.actor.require("event", "list", "read")
        params = {k: request.query_params.get(k, "").strip()[:200] for k in FILTERS}
        query = query_from_params({**params, "limit": "0"})
        headers = {
            **guard.HEADERS,
            "content-disposition": 'attachment; filename="bastion-audit.jsonl"',
            "cache-control": "no-store",
        }
        return StreamingResponse(
            _jsonl(store().search_pages(query)), headers=headers, media_type="application/x-ndjson"
        )

    async def feed(request: Request, s: Signed) -> Response:
        """Events committed after ``cursor`` (``""``: from now), as ``bastion audit tail -f``
        reads them; ``more``: a full page, so ask again at once (else the page waits a second)."""
        s.actor.require("event", "list", "read")
        cursor = request.query_params.get("cursor", "")[:400]
        if not cursor:
            return _json({"events": [], "cursor": await store().feed_start(0), "more": False})
        page = await store().feed(cursor, FEED_PAGE, HOLD_MS * 1000)
        events = [row(e) for e in page.events]
        return _json({"events": events, "cursor": page.cursor, "more": len(events) == FEED_PAGE})

    return [
        Route("/web/audit", ui.page(search_page)),
        Route("/web/audit/session/{sid}", ui.page(session_page)),
        Route("/web/audit/export.jsonl", ui.page(export)),
        Route("/web/audit/feed", ui.page(feed)),
    ]


def _params_shown(params: Any) -> str:
    """An event's arguments, pretty-printed and cut to ``PARAMS_SHOWN`` characters."""
    if not params:
        return ""
    text = json.dumps(params, indent=2, ensure_ascii=False)
    if len(text) <= PARAMS_SHOWN:
        return text
    return (
        text[:PARAMS_SHOWN]
        + f"\n... ({len(text) - PARAMS_SHOWN} more characters: export the session for all)"
    )


def _json(data: Any) -> Response:
    return Response(
        orjson.dumps(data),
        headers={**guard.HEADERS, "cache-control": "no-store"},
        media_type="application/json",
    )


async def _jsonl(pages: AsyncIterator[list[dict[str, Any]]]) -> AsyncIterator[bytes]:
    async for page in pages:
        yield b"".join(orjson.dumps(e) + b"\n" for e in page)
