"""Sign-in, invite links and sign-out (ADR 42).

Sign-in is ``AuthServer.login`` — the method behind ``bastion login`` — so throttling, lockouts,
the second factor and the audit events are the CLI's; its credential goes in the session
cookie.  Sign-out revokes that credential (``AuthServer.revoke_credential``).  The forms before
sign-in carry a CSRF token keyed by a random pre-session cookie.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pyotp
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from bastion.auth.server import InviteInfo
from bastion.errors import AuthenticationError, BastionError, SecondFactorRequiredError
from bastion.webui import guard
from bastion.webui.context import UI, NotSignedIn, log

#: A browser session's credential lives at most this long (less when the user's roles cap it).
WEB_SESSION_TTL = timedelta(hours=8)
PRESESSION_SECONDS = 3600
_TOTP_SECRET = re.compile(r"[A-Z2-7]{16,64}")


def _with_presession(request: Request, ui: UI, template: str, ctx: dict[str, Any], status: int) -> Response:
    pre = request.cookies.get(guard.PRESESSION_COOKIE, "") or guard.new_presession()
    resp = ui.render(request, template, ctx, status=status, csrf=guard.csrf_for(pre))
    resp.headers.append("set-cookie", guard.cookie(guard.PRESESSION_COOKIE, pre, max_age=PRESESSION_SECONDS))
    return resp


def routes(ui: UI) -> list[Route]:
    auth = ui.auth

    async def root(request: Request) -> Response:
        return RedirectResponse("/web/", 302)

    async def home(request: Request) -> Response:
        try:
            await ui.signed_in(request)
        except NotSignedIn:
            return RedirectResponse("/web/login", 302)
        return RedirectResponse("/web/apps", 302)

    def login_page(
        request: Request, *, error: str = "", user: str = "", status: int = 200, note: str = ""
    ) -> Response:
        ctx = {
            "title": "Sign in",
            "error": error,
            "note": note,
            "login_user": user,
            "cluster": auth.cluster_name,
            "second_factor": auth.settings.second_factor,
        }
        return _with_presession(request, ui, "login.html", ctx, status)

    async def login_get(request: Request) -> Response:
        try:
            await ui.signed_in(request)
            return RedirectResponse("/web/apps", 302)
        except NotSignedIn as e:
            note = "Your session ended: " + e.reason if e.reason else ""
            note = note or ("Password set: sign in." if request.query_params.get("set") else "")
            return login_page(request, note=note)

    async def login_post(request: Request) -> Response:
        data = await ui.checked(request, secret=request.cookies.get(guard.PRESESSION_COOKIE, ""), user="")
        if isinstance(data, Response):
            return data
        user = data.get("user", "").strip()[:128]
        if not user or not data.get("password"):
            return login_page(request, error="Enter your user name and password.", user=user, status=400)
        try:
            token, ident = await auth.login(
                user,
                data.get("password", ""),
                totp_code=data.get("otp", "").strip(),
                ttl=min(WEB_SESSION_TTL, auth.settings.default_session_ttl),
                source=ui.source(request),
            )
        except SecondFactorRequiredError:
            error = "Enter the one-time code from your authenticator app."
            return login_page(request, error=error, user=user, status=401)
        except AuthenticationError as e:
            # Audited by the auth server (decision 0033); logged here, as the web API does.
            extra = {"user": user, "remote": ui.source(request), "error": e.message}
            log.warning("web sign-in refused", extra=extra)
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
            s = await ui.signed_in(request)
        except NotSignedIn:
            resp = RedirectResponse("/web/login", 303)
            resp.headers.append("set-cookie", guard.cleared(guard.SESSION_COOKIE))
            return resp
        data = await ui.checked(request, secret=s.token, user=s.actor.name)
        if isinstance(data, Response):
            return data
        await auth.revoke_credential(s.actor)
        log.info("user signed out on the web", extra={"user": s.actor.name})
        resp = RedirectResponse("/web/login", 303)
        resp.headers.append("set-cookie", guard.cleared(guard.SESSION_COOKIE))
        return resp

    def invite_page(
        request: Request, code: str, info: InviteInfo, *, error: str = "", status: int = 200, secret: str = ""
    ) -> Response:
        factor = auth.settings.second_factor
        # Shown again after a mistake, the secret stays the one the authenticator app took.
        if not _TOTP_SECRET.fullmatch(secret):
            secret = pyotp.random_base32() if factor != "off" else ""
        issuer = f"bastion {auth.cluster_name}"
        ctx = {
            "title": "Set your password",
            "code": code,
            "invited": info.user,
            "expires": info.expires.strftime("%Y-%m-%d %H:%M UTC"),
            "error": error,
            "second_factor": factor,
            "totp_secret": secret,
            "totp_uri": pyotp.TOTP(secret).provisioning_uri(name=info.user, issuer_name=issuer)
            if secret
            else "",
        }
        return _with_presession(request, ui, "invite.html", ctx, status)

    async def invite_get(request: Request) -> Response:
        code = request.path_params["code"][:256]
        try:
            info = await auth.invite_info(code, source=ui.source(request))
        except BastionError as e:
            return ui.error(request, "Invite not valid", e.message, 404)
        return invite_page(request, code, info)

    async def invite_post(request: Request) -> Response:
        data = await ui.checked(request, secret=request.cookies.get(guard.PRESESSION_COOKIE, ""), user="")
        if isinstance(data, Response):
            return data
        code, password = data.get("code", "")[:256], data.get("password", "")
        try:
            info = await auth.invite_info(code, source=ui.source(request))
        except BastionError as e:
            return ui.error(request, "Invite not valid", e.message, 404)
        secret = data.get("totp_secret", "")
        if password != data.get("password2", ""):
            return invite_page(
                request, code, info, error="The two passwords differ.", status=400, secret=secret
            )
        otp = data.get("otp", "").strip()
        try:
            await auth.accept_invite(
                code,
                password,
                totp_secret=secret if otp else "",
                totp_code=otp,
                source=ui.source(request),
            )
        except BastionError as e:
            return invite_page(request, code, info, error=e.message, status=e.http_status, secret=secret)
        log.info("invite accepted on the web", extra={"user": info.user})
        return RedirectResponse("/web/login?set=1", 303)

    return [
        Route("/", root),
        Route("/web", root),
        Route("/web/", home),
        Route("/web/login", login_get, methods=["GET"]),
        Route("/web/login", login_post, methods=["POST"]),
        Route("/web/logout", logout, methods=["POST"]),
        Route("/web/invite/{code}", invite_get, methods=["GET"]),
        Route("/web/invite", invite_post, methods=["POST"]),
    ]
