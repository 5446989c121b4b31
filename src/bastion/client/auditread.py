"""Reading the audit log for ``bastion audit search`` and ``bastion audit tail``, on either path.

An ``AuditReader`` answers streaming searches (pages, read as they are
consumed: constant memory however many events match; decision 0035) and
reads the feed (events in commit order after a cursor; decision 0034).
``StoreReader`` reads a store on the server host (the data directory's files,
or PostgreSQL as a reader); ``RemoteReader`` reads through the proxy's web API
(``GET /v1/audit/events?format=jsonl``, ``GET /v1/audit/feed``), which needs a
role allowing list and read on ``event``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import orjson

from bastion.apiclient import ApiClient
from bastion.audit.query import query_from_params
from bastion.audit.store import AuditQuery, FeedPage, iter_search
from bastion.errors import BastionError

__all__ = ["AuditReader", "RemoteReader", "StoreReader"]

#: Lines of a streamed search collected into one page on the client.
PAGE = 500


class AuditReader(Protocol):
    def search_pages(self, params: dict[str, str]) -> AsyncIterator[list[dict[str, Any]]]: ...

    async def feed(self, cursor: str, limit: int, hold_ms: int) -> FeedPage: ...

    async def feed_start(self, last: int) -> str: ...


class StoreReader:
    """An ``AuditReader`` over a store (``sqlite_store.AuditFiles`` or a reader ``PostgresAuditStore``).

    ``pending(query)``: events matching ``query`` that are not in the store yet (local
    administration's outbox while no service runs); a few, so they are read whole and put at
    the newest end (they were made after what the store holds), never twice.
    """

    def __init__(
        self,
        store: Any,
        pending: Callable[[AuditQuery], Awaitable[list[dict[str, Any]]]] | None = None,
    ) -> None:
        self.store = store
        self.pending = pending

    async def search_pages(self, params: dict[str, str]) -> AsyncIterator[list[dict[str, Any]]]:
        query = query_from_params(params)
        waiting = await self.pending(query) if self.pending is not None else []
        desc = query.order == "desc"
        waiting.sort(key=lambda e: str(e.get("time", "")), reverse=desc)
        if waiting and desc:
            yield waiting
        ids = {e["id"] for e in waiting}
        async for page in iter_search(self.store, query):
            yield [e for e in page if e["id"] not in ids] if ids else page
        if waiting and not desc:
            yield waiting

    async def feed(self, cursor: str, limit: int, hold_ms: int) -> FeedPage:
        page: FeedPage = await self.store.feed(cursor, limit, hold_ms * 1000)
        return page

    async def feed_start(self, last: int) -> str:
        return str(await self.store.feed_start(last))


class RemoteReader:
    """An ``AuditReader`` through the proxy's web API."""

    def __init__(self, client: ApiClient) -> None:
        self.client = client

    async def search_pages(self, params: dict[str, str]) -> AsyncIterator[list[dict[str, Any]]]:
        page: list[dict[str, Any]] = []
        async for line in self.client.stream_lines("/v1/audit/events", params={**params, "format": "jsonl"}):
            page.append(orjson.loads(line))
            if len(page) >= PAGE:
                yield page
                page = []
        if page:
            yield page

    async def feed(self, cursor: str, limit: int, hold_ms: int) -> FeedPage:
        data = await self.client.request(
            "GET", "/v1/audit/feed", params={"cursor": cursor, "limit": str(limit), "hold_ms": str(hold_ms)}
        )
        return _page(data)

    async def feed_start(self, last: int) -> str:
        data = await self.client.request("GET", "/v1/audit/feed", params={"last": str(last), "limit": "0"})
        return _page(data).cursor


def _page(data: Any) -> FeedPage:
    if not isinstance(data, dict) or not isinstance(data.get("events"), list):
        raise BastionError("the proxy answered the audit feed with something else than a page of events")
    return FeedPage(list(data["events"]), str(data.get("cursor", "")))


#: Of a cluster event's ``extra``, what the table shows (the rest is in --format=json).
SHOWN_EXTRA = ("name", "for", "how", "reason", "purpose", "until", "hostname", "token", "path", "via")


def details(e: dict[str, Any]) -> str:
    """What a row of the table says beyond its columns: who or what it was about, why, whence."""
    extra = e.get("extra") or {}
    parts = [
        f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
        for k in SHOWN_EXTRA
        if (v := extra.get(k))
    ]
    if e.get("remote_addr") and not e.get("session_id"):
        parts.append(f"from {e['remote_addr']}")
    if e.get("error"):
        parts.append(str(e["error"]))
    elif e.get("params"):
        parts.append(orjson.dumps(e["params"]).decode())
    return " ".join(parts)
