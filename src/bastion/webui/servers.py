"""The MCP servers page: the apps the user may reach, their tools, how to connect.

The list is the registry filtered by the user's ``AccessChecker`` and shown as
``webapi.app_json`` shows it (what ``bastion mcp ls`` prints); live status is the number of
app services whose heartbeat lists the app.  Tools come from an MCP session through the proxy's
own front as the user (``MCPClient.list_tools``, what ``bastion mcp tools`` runs), so the
gateway's filtering and audit apply unchanged.  Paged on the server.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any
from urllib.parse import quote, urlencode

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bastion.apiclient import Trust
from bastion.auth.server import AuthServer
from bastion.client.mcp_client import MCPClient
from bastion.errors import BastionError
from bastion.proxy.front import ASGI
from bastion.proxy.webapi import app_json
from bastion.webui import connect
from bastion.webui.context import UI, Signed

PAGE_SIZE = 50
#: A page waits this long for an MCP server's tools (the CLI waits as long as the user does).
TOOLS_TIMEOUT = 10.0
#: The most tools a page lists (an upstream's ``tools/list`` pages may never end); each one's
#: description and input schema are cut to what a page can show.
MOST_TOOLS = 500
DESCRIPTION_MOST = 2000
SCHEMA_MOST = 20_000


def routes(ui: UI, front: ASGI) -> list[Route]:

    def reachable(s: Signed) -> list[Any]:
        checker = s.actor.checker
        if ui.registry is None or checker is None:
            return []  # (the built-in administrator never signs in on the web)
        return [a for a in ui.registry.all() if checker.can_access_app(a)]

    async def apps_page(request: Request, s: Signed) -> Response:
        params = request.query_params
        q, label = params.get("q", "").strip()[:100], params.get("label", "").strip()[:200]
        page = int(params["page"]) if params.get("page", "").isdigit() and len(params["page"]) < 7 else 1
        apps = reachable(s)
        labels = sorted({f"{k}={v}" for a in apps for k, v in a.metadata.labels.items()})[:300]
        shown = [a for a in apps if _matches(a, q, label)]
        pages = max(1, math.ceil(len(shown) / PAGE_SIZE))
        page = min(max(page, 1), pages)
        serving = await _serving(ui.auth)
        rows = []
        for a in shown[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]:
            row = app_json(a, s.actor.checker)
            row["serving"] = serving.get(a.metadata.name, 0)
            rows.append(row)

        def link(p: int) -> str:
            return "/web/apps?" + urlencode(
                [(k, v) for k, v in (("q", q), ("label", label), ("page", str(p))) if v]
            )

        ctx = {
            "title": "MCP servers",
            "apps": rows,
            "q": q,
            "label": label,
            "labels": labels,
            "total": len(apps),
            "matching": len(shown),
            "page": page,
            "pages": pages,
            "prev": link(page - 1) if page > 1 else "",
            "next": link(page + 1) if page < pages else "",
        }
        return ui.render(request, "apps.html", ctx, signed=s)

    def find(s: Signed, name: str) -> Any:
        app = ui.registry.get(name) if ui.registry is not None else None
        if app is None or s.actor.checker is None or not s.actor.checker.can_access_app(app):
            return None  # one the user may not reach is answered like a missing one
        return app

    async def missing(request: Request, s: Signed, name: str) -> Response:
        """An app the user may not reach, answered like a missing one — and audited as a
        refusal, as the MCP path audits a request for a hidden app."""
        message = f'no MCP server "{name[:100]}" that you may use (see the list of MCP servers)'
        await ui.refused(request, s.actor.name, message, tuple(r.metadata.name for r in s.actor.roles))
        return ui.error(request, "Not found", message, 404, s)

    async def tools_page(request: Request, s: Signed) -> Response:
        name = request.path_params["name"]
        app = find(s, name)
        if app is None:
            return await missing(request, s, name)
        error, tools = "", []
        # From the browser's address: the session's audit events and per-source bounds are
        # the user's, not the proxy's own loopback shared by every web user.
        transport = httpx.ASGITransport(app=front, client=(ui.source(request) or "?", 0))
        client = MCPClient(proxy=ui.public_addr, app=name, token=s.token, trust=Trust(), transport=transport)
        try:
            async with asyncio.timeout(TOOLS_TIMEOUT), client as c:
                tools = await c.list_tools(most=MOST_TOOLS + 1)
        except BastionError as e:
            # The gateway's own refusals already say whose fault they are (MCPClient keeps it).
            error = e.message if "fault:" in e.message else f"{e.message} (fault: {e.origin})"
        except TimeoutError:
            error = f"{name} did not list its tools within {TOOLS_TIMEOUT:.0f} s (fault: upstream)"
        ctx = {
            "title": f"Tools of {name}",
            "app": app_json(app, s.actor.checker),
            "tools": [_shown(t) for t in tools[:MOST_TOOLS]],
            "more": len(tools) > MOST_TOOLS,
            "most": MOST_TOOLS,
            "error": error,
        }
        part = bool(request.query_params.get("part"))
        return ui.render(request, "tools_part.html" if part else "tools.html", ctx, signed=s)

    async def connect_page(request: Request, s: Signed) -> Response:
        name = request.path_params["name"]
        app = find(s, name)
        if app is None:
            return await missing(request, s, name)
        ctx = {
            "title": f"Connect to {name}",
            "app": app_json(app, s.actor.checker),
            "snippets": connect.snippets(name),
            "endpoint": f"https://{ui.public_addr}/mcp/apps/{quote(name, safe='')}",
        }
        part = bool(request.query_params.get("part"))
        return ui.render(request, "connect_part.html" if part else "connect.html", ctx, signed=s)

    return [
        Route("/web/apps", ui.page(apps_page)),
        Route("/web/apps/{name}/tools", ui.page(tools_page)),
        Route("/web/apps/{name}/connect", ui.page(connect_page)),
    ]


def _cut(text: str, most: int) -> str:
    return text if len(text) <= most else text[:most] + f"... ({len(text) - most} more characters)"


def _shown(tool: dict[str, Any]) -> dict[str, str]:
    """A tool as the page shows it: name, description and pretty input schema, each cut."""
    schema = tool.get("inputSchema")
    return {
        "name": _cut(str(tool.get("name", "")), 200),
        "description": _cut(str(tool.get("description") or ""), DESCRIPTION_MOST),
        "schema": _cut(json.dumps(schema, indent=2, ensure_ascii=False), SCHEMA_MOST) if schema else "",
    }


def _matches(app: Any, q: str, label: str) -> bool:
    if label:
        k, _, v = label.partition("=")
        if app.metadata.labels.get(k) != v:
            return False
    if q:
        text = " ".join([app.metadata.name, app.metadata.description, *app.metadata.labels.values()]).lower()
        return all(word in text for word in q.lower().split())
    return True


async def _serving(auth: AuthServer) -> dict[str, int]:
    """How many live app services serve each app (their heartbeats)."""
    counts: dict[str, int] = {}
    for server in await auth.app_servers():
        for a in server.spec.apps:
            counts[a.metadata.name] = counts.get(a.metadata.name, 0) + 1
    return counts
