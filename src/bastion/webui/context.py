"""What every page of the web UI shares: who is signed in, rendering, the CSRF check (ADR 42).

``UI`` holds the auth server and the proxy's address; the page modules (``pages``, ``audit``,
``admin``) take one and return their routes.  Nothing here decides what a user may do: that is
``AuthServer`` (with the user's ``Actor``), as for the CLI.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import jinja2
import markupsafe
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from bastion.auth.server import Actor, AuthServer
from bastion.errors import AccessDeniedError, AuthenticationError
from bastion.proxy.webapi import bounded_body, record_denied
from bastion.webui import guard

log = logging.getLogger("bastion.webui")

MAX_FORM = 256 * 1024


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


SignedHandler = Callable[[Request, Signed], Awaitable[Response]]
Handler = Callable[[Request], Awaitable[Response]]


class UI:
    def __init__(self, auth: AuthServer, *, public_addr: str, registry: Any, audit: Any) -> None:
        self.auth = auth
        self.public_addr = public_addr
        self.registry = registry
        self.audit = audit
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("bastion.webui", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )

    @staticmethod
    def source(request: Request) -> str:
        return request.client.host if request.client else ""

    def render(
        self,
        request: Request,
        template: str,
        ctx: dict[str, Any],
        *,
        status: int = 200,
        signed: Signed | None = None,
        csrf: str = "",
    ) -> Response:
        body = self.env.get_template(template).render(
            user=signed.actor.name if signed else "",
            csrf=signed.csrf if signed else csrf,
            nav=nav(signed.actor) if signed else [],
            path=request.url.path,
            public_addr=self.public_addr,
            **ctx,
        )
        return html(body, status)

    def error(
        self, request: Request, title: str, message: str, status: int, signed: Signed | None = None
    ) -> Response:
        if request.query_params.get("part"):
            return html(f"<p class=error role=alert>{markupsafe.escape(message)}</p>", status)
        return self.render(
            request, "error.html", {"title": title, "message": message}, status=status, signed=signed
        )

    async def signed_in(self, request: Request) -> Signed:
        token = request.cookies.get(guard.SESSION_COOKIE, "")
        if not token:
            raise NotSignedIn("")
        try:
            actor = await self.auth.authenticate(token, source=self.source(request))
        except AuthenticationError as e:
            raise NotSignedIn(e.message) from None
        return Signed(actor, token)

    async def refused(self, request: Request, user: str, reason: str, roles: tuple[str, ...] = ()) -> None:
        """Audit a refused request (bounded per source, like the web API's refusals)."""
        await record_denied(
            self.auth,
            self.audit,
            user=user,
            remote_addr=self.source(request),
            roles=roles,
            error=reason,
            extra={"http_method": request.method, "path": request.url.path[:200], "via": "web"},
        )

    @staticmethod
    async def form(request: Request) -> dict[str, str]:
        raw = await bounded_body(request, MAX_FORM, "form")
        return dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))

    async def checked(self, request: Request, *, secret: str, user: str) -> dict[str, str] | Response:
        """The form of a state-changing request, or the refusal (CSRF token or Origin wrong),
        audited."""
        data = await self.form(request)
        origin = request.headers.get("origin", "")
        given = data.get(guard.CSRF_FIELD) or request.headers.get(guard.CSRF_HEADER, "")
        why = ""
        if not guard.same_origin(origin, self.public_addr, request.headers.get("host", "")):
            why = "cross-site request refused: its Origin is not this proxy"
        elif not guard.csrf_ok(secret, given):
            why = "missing or wrong CSRF token: reload the page and try again"
        if why:
            await self.refused(request, user, why)
            return self.render(request, "error.html", {"title": "Refused", "message": why}, status=403)
        return data

    def page(self, handler: SignedHandler) -> Handler:
        """A page for signed-in users: others go to the sign-in page; a refusal by role rules
        is a 403 page, audited as the web API audits it."""

        async def run(request: Request) -> Response:
            try:
                s = await self.signed_in(request)
            except NotSignedIn as e:
                if request.query_params.get("part") or request.method != "GET":
                    return self.error(request, "Not signed in", e.reason or "sign in again", 401)
                resp = RedirectResponse("/web/login", 302)
                if e.reason:
                    resp.headers.append("set-cookie", guard.cleared(guard.SESSION_COOKIE))
                return resp
            try:
                return await handler(request, s)
            except AccessDeniedError as e:
                roles = tuple(r.metadata.name for r in s.actor.roles)
                await self.refused(request, s.actor.name, e.message, roles)
                return self.error(request, "Not allowed", e.message, 403, s)

        return run

    def action(self, handler: Callable[[Request, Signed, dict[str, str]], Awaitable[Response]]) -> Handler:
        """A state-changing request of a signed-in user: the CSRF token checked first."""

        async def with_form(request: Request, s: Signed) -> Response:
            data = await self.checked(request, secret=s.token, user=s.actor.name)
            if isinstance(data, Response):
                return data
            return await handler(request, s, data)

        return self.page(with_form)


def html(body: str, status: int = 200) -> Response:
    headers = {**guard.HEADERS, "cache-control": "no-store"}
    return Response(body, status, headers=headers, media_type="text/html; charset=utf-8")


def may(actor: Actor, resource: str, *verbs: str) -> bool:
    checker = actor.checker
    return checker is None or all(checker.check_rule(resource, v) for v in verbs)


def nav(actor: Actor) -> list[tuple[str, str]]:
    """The pages the user's role rules let them use (the others are refused anyway)."""
    items = [("/web/apps", "MCP servers")]
    if may(actor, "event", "list", "read"):
        items.append(("/web/audit", "Audit log"))
    for kind, href, text in (
        ("role", "/web/admin/roles", "Roles"),
        ("user", "/web/admin/users", "Users"),
        ("token", "/web/admin/tokens", "Join tokens"),
        ("app", "/web/admin/apps", "Apps"),
    ):
        if may(actor, kind, "list"):
            items.append((href, text))
    return items
