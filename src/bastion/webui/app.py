"""The web UI: server-rendered pages under ``/web`` on the proxy's listener (ADR 41, 42).

Routes (pages unless noted; every POST needs the CSRF token):

    GET  /                              -> /web/
    GET  /web/login   POST /web/login   sign in (``session.py``)
    GET  /web/invite/{code}  POST /web/invite   set a password with an invite
    POST /web/logout                    revoke the session's credential
    GET  /web/apps[/{name}/tools|connect]   MCP servers, tools, connect (``servers.py``)
    GET  /web/audit[...]                the audit log (``audit.py``)
    GET  /web/admin/...  POST ...       roles, users, join tokens, apps (``admin.py``)
    GET  /web/static/{file}             app.css, app.js

The pages decide nothing: who the user is comes from ``AuthServer.authenticate`` on every
request, what they may do from ``AuthServer`` called with their ``Actor`` — the methods the web
API and so the CLI call.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from bastion.auth.server import AuthServer
from bastion.errors import BastionError
from bastion.proxy.front import ASGI
from bastion.webui import admin, audit, guard, servers, session
from bastion.webui.context import UI, log

_STATIC = {"app.css": "text/css; charset=utf-8", "app.js": "text/javascript; charset=utf-8"}


def build_webui(
    auth: AuthServer,
    *,
    public_addr: str,
    front: ASGI,
    registry: Any = None,
    audit_log: Any = None,
) -> ASGI:
    """The UI's ASGI app.  ``front``: the proxy's front door, which the UI's own MCP requests
    (tools lists) go through as the signed-in user; ``registry``: the apps (the router);
    ``audit_log``: the process's audit log (None: no audit pages)."""
    ui = UI(auth, public_addr=public_addr, registry=registry, audit=audit_log)
    root = resources.files("bastion.webui") / "static"
    static = {name: (root / name).read_bytes() for name in _STATIC}

    async def static_file(request: Request) -> Response:
        name = request.path_params["name"]
        body = static.get(name)
        if body is None:
            return Response(b"not found", 404, headers=dict(guard.HEADERS), media_type="text/plain")
        headers = {**guard.HEADERS, "cache-control": "public, max-age=300"}
        return Response(body, headers=headers, media_type=_STATIC[name])

    async def handle(request: Request, exc: Exception) -> Response:
        if isinstance(exc, BastionError):
            return ui.error(request, "Error", exc.message, exc.http_status)
        log.error("unexpected error in the web UI", exc_info=exc)
        return ui.error(request, "Error", "internal error in the gateway (see its logs)", 500)

    routes = [
        *session.routes(ui),
        *servers.routes(ui, front),
        *audit.routes(ui),
        *admin.routes(ui),
        Route("/web/static/{name}", static_file),
    ]
    return with_headers(Starlette(routes=routes, exception_handlers={Exception: handle}))


def with_headers(app: ASGI) -> ASGI:
    """Every answer of the UI carries ``guard.HEADERS`` and, unless it says otherwise,
    ``Cache-Control: no-store``: the pages set them, and so now do Starlette's own 404 and 405,
    and the redirects (the sign-in's carries the session cookie)."""
    defaults = [(k.encode(), v.encode()) for k, v in {**guard.HEADERS, "cache-control": "no-store"}.items()]

    async def run(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in defaults if k not in present]
                message = {**message, "headers": headers}
            await send(message)

        await app(scope, receive, send_with_headers)

    return run
