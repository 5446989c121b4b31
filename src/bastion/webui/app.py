"""The web UI: server-rendered pages under ``/web`` on the proxy's listener (ADR 41, 42).

Routes (pages unless noted; every POST needs the CSRF token):

    GET  /                              -> /web/
    GET  /web/                          -> /web/apps, or /web/login
    GET  /web/login   POST /web/login   sign in: password (+ one-time code) -> session cookie
    GET  /web/invite/{code}  POST /web/invite   set a password with an invite
    POST /web/logout                    revoke the session's credential, clear the cookie
    GET  /web/apps?q=&label=k=v&page=   the MCP servers the user may reach
    GET  /web/apps/{name}/tools         their tools, as ``bastion mcp tools`` lists them
    GET  /web/apps/{name}/connect       how to connect (``?part=1``: the dialog's body)
    GET  /web/static/{file}             app.css, app.js

The pages decide nothing: who the user is comes from ``AuthServer.authenticate`` on every
request (a revoked, locked-out-by-deletion or changed user is seen at once), what they may
reach from their ``AccessChecker`` (``webapi.app_json``), their tools from an MCP session
through the gateway as them (``MCPClient.list_tools``, sent in process to the front).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from importlib import resources
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import jinja2
import markupsafe
import pyotp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from bastion.apiclient import Trust
from bastion.auth.server import Actor, AuthServer
from bastion.client.mcp_client import MCPClient
from bastion.errors import AuthenticationError, BastionError, SecondFactorRequiredError, ValidationError
from bastion.proxy.front import ASGI
from bastion.proxy.webapi import app_json, record_denied
from bastion.webui import connect, guard

log = logging.getLogger("bastion.webui")

#: A browser session's credential lives at most this long (less when the user's roles cap it).
WEB_SESSION_TTL = timedelta(hours=8)
PAGE_SIZE = 50
MAX_FORM = 64 * 1024
_STATIC = {"app.css": "text/css; charset=utf-8", "app.js": "text/javascript; charset=utf-8"}


@dataclass(frozen=True)
class Signed:
    """A signed-in request: who, and the credential their cookie holds."""

    actor: Actor
    token: str

    @property
    def csrf(self) -> str:
        return guard.csrf_for(self.token)


class NotSignedIn(Exception):
    """No session, or one the auth server no longer accepts (``reason`` says why)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("bastion.webui", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["tojson_pretty"] = _pretty
    return env


def _pretty(value: Any) -> str:
    import json

    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False)


def _static_files() -> dict[str, bytes]:
    root = resources.files("bastion.webui") / "static"
    return {name: (root / name).read_bytes() for name in _STATIC}


def build_webui(
    auth: AuthServer,
    *,
    public_addr: str,
    front: ASGI,
    registry: Any = None,
    audit: Any = None,
) -> Starlette:
    """The UI's ASGI app.  ``front``: the proxy's front door, which the UI's own MCP requests
    (tools lists) go through as the signed-in user; ``registry``: the apps (the router)."""
    env = _env()
    static = _static_files()
    mcp_transport = httpx.ASGITransport(app=front, client=("127.0.0.1", 0))

    def source(request: Request) -> str:
        return request.client.host if request.client else ""

    def render(
        request: Request,
        template: str,
        ctx: dict[str, Any],
        *,
        status: int = 200,
        signed: Signed | None = None,
    ) -> Response:
        nav = _nav(signed.actor) if signed else []
        body = env.get_template(template).render(
            user=signed.actor.name if signed else "",
            csrf=signed.csrf if signed else ctx.pop("csrf", ""),
            nav=nav,
            path=request.url.path,
            public_addr=public_addr,
            **ctx,
        )
        return _html(body, status)

    async def signed_in(request: Request) -> Signed:
        token = request.cookies.get(guard.SESSION_COOKIE, "")
        if not token:
            raise NotSignedIn("")
        try:
            actor = await auth.authenticate(token, source=source(request))
        except AuthenticationError as e:
            raise NotSignedIn(e.message) from None
        return Signed(actor, token)

    async def audit_refusal(request: Request, user: str, reason: str) -> None:
        """A refused state-changing request is audited (bounded per source, like the API's)."""
        await record_denied(
            auth,
            audit,
            user=user,
            remote_addr=source(request),
            error=reason,
            extra={"http_method": request.method, "path": request.url.path[:200], "via": "web"},
        )

    async def form(request: Request) -> dict[str, str]:
        raw = await request.body()
        if len(raw) > MAX_FORM:
            raise ValidationError("form too large")
        from urllib.parse import parse_qsl

        return dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))

    async def checked(request: Request, *, secret: str, user: str) -> dict[str, str] | Response:
        """The form of a state-changing request, or the refusal (CSRF token or Origin wrong)."""
        data = await form(request)
        origin = request.headers.get("origin", "")
        given = data.get(guard.CSRF_FIELD) or request.headers.get(guard.CSRF_HEADER, "")
        why = ""
        if not guard.same_origin(origin, public_addr, request.headers.get("host", "")):
            why = "cross-site request refused: its Origin is not this proxy"
        elif not guard.csrf_ok(secret, given):
            why = "missing or wrong CSRF token: reload the page and try again"
        if why:
            await audit_refusal(request, user, why)
            return render(request, "error.html", {"title": "Refused", "message": why}, status=403)
        return data

    # ------------------------------------------------------------------ pages

    async def root(request: Request) -> Response:
        return RedirectResponse("/web/", 302)

    async def home(request: Request) -> Response:
        try:
            await signed_in(request)
        except NotSignedIn:
            return RedirectResponse("/web/login", 302)
        return RedirectResponse("/web/apps", 302)

    def login_page(
        request: Request, *, error: str = "", user: str = "", status: int = 200, note: str = ""
    ) -> Response:
        pre = request.cookies.get(guard.PRESESSION_COOKIE, "") or guard.new_presession()
        resp = render(
            request,
            "login.html",
            {
                "title": "Sign in",
                "error": error,
                "note": note,
                "login_user": user,
                "cluster": auth.cluster_name,
                "csrf": guard.csrf_for(pre),
                "second_factor": auth.settings.second_factor,
            },
            status=status,
        )
        resp.headers.append("set-cookie", guard.cookie(guard.PRESESSION_COOKIE, pre, max_age=3600))
        return resp

    async def login_get(request: Request) -> Response:
        try:
            await signed_in(request)
            return RedirectResponse("/web/apps", 302)
        except NotSignedIn as e:
            note = "Your session ended: " + e.reason if e.reason else ""
            note = note or ("Password set: sign in." if request.query_params.get("set") else "")
            return login_page(request, note=note)

    async def login_post(request: Request) -> Response:
        pre = request.cookies.get(guard.PRESESSION_COOKIE, "")
        data = await checked(request, secret=pre, user="")
        if isinstance(data, Response):
            return data
        user = data.get("user", "").strip()[:128]
        if not user or not data.get("password"):
            return login_page(request, error="Enter your user name and password.", user=user, status=400)
        ttl = min(WEB_SESSION_TTL, auth.settings.default_session_ttl)
        try:
            token, ident = await auth.login(
                user,
                data.get("password", ""),
                totp_code=data.get("otp", "").strip(),
                ttl=ttl,
                source=source(request),
            )
        except SecondFactorRequiredError:
            return login_page(
                request, error="Enter the one-time code from your authenticator app.", user=user, status=401
            )
        except AuthenticationError as e:
            log.warning(
                "web sign-in refused", extra={"user": user, "remote": source(request), "error": e.message}
            )
            return login_page(request, error=e.message, user=user, status=401)
        log.info(
            "user signed in on the web", extra={"user": ident.username, "expires": ident.expires.isoformat()}
        )
        resp = RedirectResponse("/web/apps", 303)
        max_age = max(1, int((ident.expires - auth.clock.now()).total_seconds()))
        resp.headers.append("set-cookie", guard.cookie(guard.SESSION_COOKIE, token, max_age=max_age))
        resp.headers.append("set-cookie", guard.cleared(guard.PRESESSION_COOKIE))
        return resp

    async def logout(request: Request) -> Response:
        try:
            s = await signed_in(request)
        except NotSignedIn:
            resp = RedirectResponse("/web/login", 303)
            resp.headers.append("set-cookie", guard.cleared(guard.SESSION_COOKIE))
            return resp
        data = await checked(request, secret=s.token, user=s.actor.name)
        if isinstance(data, Response):
            return data
        await auth.revoke_credential(s.actor)
        log.info("user signed out on the web", extra={"user": s.actor.name})
        resp = RedirectResponse("/web/login", 303)
        resp.headers.append("set-cookie", guard.cleared(guard.SESSION_COOKIE))
        return resp

    def invite_page(
        request: Request, code: str, info: Any, *, error: str = "", status: int = 200
    ) -> Response:
        pre = request.cookies.get(guard.PRESESSION_COOKIE, "") or guard.new_presession()
        totp_secret = pyotp.random_base32() if auth.settings.second_factor != "off" else ""
        resp = render(
            request,
            "invite.html",
            {
                "title": "Set your password",
                "code": code,
                "invited": info.user if info else "",
                "expires": info.expires.strftime("%Y-%m-%d %H:%M UTC") if info else "",
                "error": error,
                "csrf": guard.csrf_for(pre),
                "second_factor": auth.settings.second_factor,
                "totp_secret": totp_secret,
                "totp_uri": pyotp.TOTP(totp_secret).provisioning_uri(
                    name=info.user if info else "", issuer_name=f"bastion {auth.cluster_name}"
                )
                if totp_secret
                else "",
            },
            status=status,
        )
        resp.headers.append("set-cookie", guard.cookie(guard.PRESESSION_COOKIE, pre, max_age=3600))
        return resp

    async def invite_get(request: Request) -> Response:
        code = request.path_params["code"][:256]
        try:
            info = await auth.invite_info(code)
        except BastionError as e:
            return render(
                request, "error.html", {"title": "Invite not valid", "message": e.message}, status=404
            )
        return invite_page(request, code, info)

    async def invite_post(request: Request) -> Response:
        pre = request.cookies.get(guard.PRESESSION_COOKIE, "")
        data = await checked(request, secret=pre, user="")
        if isinstance(data, Response):
            return data
        code = data.get("code", "")[:256]
        password = data.get("password", "")
        try:
            info = await auth.invite_info(code)
        except BastionError as e:
            return render(
                request, "error.html", {"title": "Invite not valid", "message": e.message}, status=404
            )
        if password != data.get("password2", ""):
            return invite_page(request, code, info, error="The two passwords differ.", status=400)
        otp = data.get("otp", "").strip()
        try:
            await auth.accept_invite(
                code,
                password,
                totp_secret=data.get("totp_secret", "") if otp else "",
                totp_code=otp,
                source=source(request),
            )
        except BastionError as e:
            return invite_page(request, code, info, error=e.message, status=e.http_status)
        log.info("invite accepted on the web", extra={"user": info.user})
        return RedirectResponse("/web/login?set=1", 303)

    def signed_page(
        handler: Callable[[Request, Signed], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            try:
                s = await signed_in(request)
            except NotSignedIn as e:
                if request.query_params.get("part"):
                    return _html(
                        f"<p class=error>Not signed in: {_esc(e.reason or 'sign in again')}</p>", 401
                    )
                resp = RedirectResponse("/web/login", 302)
                if e.reason:
                    resp.headers.append("set-cookie", guard.cleared(guard.SESSION_COOKIE))
                return resp
            return await handler(request, s)

        return run

    def reachable(actor: Actor) -> list[Any]:
        if registry is None or actor.checker is None:
            return []  # (the built-in administrator never signs in on the web)
        return [a for a in registry.all() if actor.checker.can_access_app(a)]

    async def apps_page(request: Request, s: Signed) -> Response:
        q = request.query_params.get("q", "").strip()[:100]
        label = request.query_params.get("label", "").strip()[:200]
        try:
            page = max(1, int(request.query_params.get("page", "1")))
        except ValueError:
            page = 1
        apps = reachable(s.actor)
        labels = sorted({f"{k}={v}" for a in apps for k, v in a.metadata.labels.items()})[:300]
        shown = [a for a in apps if _matches(a, q, label)]
        pages = max(1, math.ceil(len(shown) / PAGE_SIZE))
        page = min(page, pages)
        window = shown[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
        serving = await _serving(auth)
        rows = []
        for a in window:
            j = app_json(a, s.actor.checker)
            j["serving"] = serving.get(a.metadata.name, 0)
            rows.append(j)

        def link(p: int) -> str:
            return "/web/apps?" + urlencode(
                {k: v for k, v in (("q", q), ("label", label), ("page", str(p))) if v}
            )

        return render(
            request,
            "apps.html",
            {
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
            },
            signed=s,
        )

    def find_app(s: Signed, name: str) -> Any:
        app = registry.get(name) if registry is not None else None
        if app is None or s.actor.checker is None or not s.actor.checker.can_access_app(app):
            return None  # one not allowed is answered like a missing one
        return app

    async def tools_page(request: Request, s: Signed) -> Response:
        name = request.path_params["name"]
        part = bool(request.query_params.get("part"))
        app = find_app(s, name)
        if app is None:
            return _not_found(request, render, s, name, part)
        error, tools = "", []
        try:
            client = MCPClient(
                proxy=public_addr, app=name, token=s.token, trust=Trust(), transport=mcp_transport
            )
            async with client as c:
                tools = await c.list_tools()
        except BastionError as e:
            error = f"{e.message} (fault: {e.origin})"
        ctx = {
            "title": f"Tools of {name}",
            "app": app_json(app, s.actor.checker),
            "tools": tools,
            "error": error,
        }
        return render(request, "tools_part.html" if part else "tools.html", ctx, signed=s)

    async def connect_page(request: Request, s: Signed) -> Response:
        name = request.path_params["name"]
        part = bool(request.query_params.get("part"))
        app = find_app(s, name)
        if app is None:
            return _not_found(request, render, s, name, part)
        ctx = {
            "title": f"Connect to {name}",
            "app": app_json(app, s.actor.checker),
            "snippets": connect.snippets(name),
            "endpoint": f"https://{public_addr}/mcp/apps/{quote(name, safe='')}",
        }
        return render(request, "connect_part.html" if part else "connect.html", ctx, signed=s)

    async def static_file(request: Request) -> Response:
        name = request.path_params["name"]
        body = static.get(name)
        if body is None:
            return Response(b"not found", 404, headers=dict(guard.HEADERS), media_type="text/plain")
        return Response(
            body,
            headers={**guard.HEADERS, "cache-control": "public, max-age=300"},
            media_type=_STATIC[name],
        )

    async def handle(request: Request, exc: Exception) -> Response:
        if isinstance(exc, BastionError):
            return render(
                request, "error.html", {"title": "Error", "message": exc.message}, status=exc.http_status
            )
        log.error("unexpected error in the web UI", exc_info=exc)
        return render(
            request,
            "error.html",
            {"title": "Error", "message": "internal error in the gateway (see its logs)"},
            status=500,
        )

    routes = [
        Route("/", root),
        Route("/web", root),
        Route("/web/", home),
        Route("/web/login", login_get, methods=["GET"]),
        Route("/web/login", login_post, methods=["POST"]),
        Route("/web/logout", logout, methods=["POST"]),
        Route("/web/invite/{code}", invite_get, methods=["GET"]),
        Route("/web/invite", invite_post, methods=["POST"]),
        Route("/web/apps", signed_page(apps_page)),
        Route("/web/apps/{name}/tools", signed_page(tools_page)),
        Route("/web/apps/{name}/connect", signed_page(connect_page)),
        Route("/web/static/{name}", static_file),
    ]
    return Starlette(routes=routes, exception_handlers={Exception: handle})


def _html(body: str, status: int = 200) -> Response:
    headers = {**guard.HEADERS, "cache-control": "no-store"}
    return Response(body, status, headers=headers, media_type="text/html; charset=utf-8")


def _esc(text: str) -> str:
    return str(markupsafe.escape(text))


def _not_found(
    request: Request, render: Callable[..., Response], s: Signed, name: str, part: bool
) -> Response:
    message = f'no MCP server "{name[:100]}" that you may use (see the list of MCP servers)'
    if part:
        return _html(f"<p class=error>{_esc(message)}</p>", 404)
    return render(request, "error.html", {"title": "Not found", "message": message}, status=404, signed=s)


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


def _nav(actor: Actor) -> list[tuple[str, str]]:
    items = [("/web/apps", "MCP servers")]
    checker = actor.checker
    if checker is not None and checker.check_rule("event", "list") and checker.check_rule("event", "read"):
        items.append(("/web/audit", "Audit log"))
    return items
