"""The proxy's web API: discovery, health, login, invites and resource management.

Routes (JSON in, JSON out; authenticated ones take ``Authorization: Bearer``):

    GET    /v1/webapi/find                  cluster name, server version (public)
    GET    /v1/webapi/ca                    the host CA certificate, PEM (public)
    POST   /v1/webapi/login                 user + password (+ otp) -> credential
    POST   /v1/webapi/invites/info          who an invite is for (code in the body:
                                            secrets never go in URLs, which get logged)
    POST   /v1/webapi/invites/accept        set a password with an invite
    GET    /healthz  /readyz
    GET    /v1/mcp/apps                     MCP apps the caller may reach, with tool permissions [auth]
    GET    /v1/audit/events?since=&until=&type=&user=&app=&session=&tool=&outcome=&limit=&order=
                                    &format=jsonl: streamed, one event per line [auth]
    GET    /v1/audit/feed?cursor=&limit=&hold_ms=&last=   events in commit order [auth]
    GET    /v1/audit/verify?since=          the log checked against its seals [auth]
    GET    /v1/whoami                       the caller, roles, expiry        [auth]
    GET    /v1/resources/{kind}[/{name}]                                    [auth]
    POST   /v1/resources?overwrite=1        create (or replace)              [auth]
    DELETE /v1/resources/{kind}/{name}                                      [auth]
    POST   /v1/users   PATCH /v1/users/{name}   POST /v1/users/{name}/reset [auth]
    GET    /v1/users/locks                  users locked out by failed logins [auth]
    POST   /v1/users/{name}/unlock          lift a user's login locks        [auth]
    POST   /v1/tokens                       new join token                  [auth]
    POST   /v1/auth/sign                    credential for a user           [auth]
    POST   /v1/auth/logout                  revoke the credential used      [auth]

Handlers parse and call ``AuthServer``; they decide nothing themselves.  ``AuthServer``
audits what they ask (decision 0033); a call its actor's roles refuse is audited here, once,
as ``access.denied`` (``authed``).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion import __version__
from bastion.audit import cluster_events
from bastion.audit import events as ev
from bastion.auth.ca import fingerprint
from bastion.auth.scope import parse_label_scope
from bastion.auth.server import Actor, AuthServer, JoinThrottledError, LoginRefusedError
from bastion.errors import AccessDeniedError, AuthenticationError, BastionError, ValidationError
from bastion.log import request_id
from bastion.proxy.errors import error_response

log = logging.getLogger("bastion.proxy")

MAX_BODY = 1 << 20


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


async def bounded_body(request: Request, most: int, what: str = "request body") -> bytes:
    """The body, read only as far as ``most`` bytes: a longer one (by its Content-Length, or
    once that many bytes came) is refused without reading — and holding — the rest."""
    too_large = ValidationError(f"{what} too large (at most {most // 1024} KiB)")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > most:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > most:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _body(request: Request) -> dict[str, Any]:
    raw = await bounded_body(request, MAX_BODY)
    try:
        data = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError as e:
        raise ValidationError(f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValidationError("request body must be a JSON object")
    return data


def _str(data: dict[str, Any], key: str, *, required: bool = True) -> str:
    v = data.get(key, "")
    if not isinstance(v, str) or (required and not v):
        raise ValidationError(f'"{key}" must be a non-empty string')
    return v


def _ttl(data: dict[str, Any], key: str = "ttl_seconds") -> timedelta | None:
    v = data.get(key)
    if v is None:
        return None
    if not isinstance(v, int | float) or v <= 0:
        raise ValidationError(f'"{key}" must be a positive number of seconds')
    return timedelta(seconds=v)


def identity_json(actor: Actor) -> dict[str, Any]:
    ident = actor.identity
    user = actor.user
    return {
        "user": actor.name,
        "cluster_name": ident.cluster_name if ident else "",
        "roles": list(user.spec.roles) if user else [],
        "traits": dict(user.spec.traits) if user else {},
        "expires": ident.expires.isoformat() if ident else None,
    }


Handler = Callable[[Request], Awaitable[Response]]


TRANSPORT_NAMES = {"stdio": "stdio", "sse": "SSE", "http": "Streamable HTTP"}


async def record_denied(
    auth: AuthServer,
    audit: Any,
    *,
    user: str,
    remote_addr: str,
    error: str,
    extra: dict[str, Any],
    roles: tuple[str, ...] = (),
) -> None:
    """Audit a refused request as ``access.denied`` (the web API's and the web UI's)."""
    # Bounded per source like other refusals; an authenticated flood is still a flood.
    if audit is None or not auth.refusal_limiter.admit(remote_addr or "?"):
        return
    event = cluster_events.event(
        ev.ACCESS_DENIED,
        auth.clock.now(),
        auth.cluster_name,
        success=False,
        user=user,
        remote_addr=remote_addr,
        roles=roles,
        error=error,
        extra=extra,
    )
    try:
        await audit.record(event)
    except BastionError as err:
        log.warning("cannot audit", extra={"event": event.type, "error": err.message})


def app_json(app: Any, checker: Any) -> dict[str, Any]:
    """An MCP app as ``bastion mcp ls`` shows it, with the caller's permissions: tools,
    resources, prompts and argument rules (decisions 0043, 0044)."""
    perms = checker.tool_permissions(app)
    spec = app.spec
    return {
        "name": app.metadata.name,
        "description": app.metadata.description,
        "labels": dict(app.metadata.labels),
        "type": TRANSPORT_NAMES.get(spec.transport, spec.transport),
        "uri": spec.uri,
        "command": spec.mcp.command if spec.mcp else "",
        "args": list(spec.mcp.args) if spec.mcp else [],
        "permissions": {
            "mcp": {
                "tools": {"allowed": list(perms.allowed), "denied": list(perms.denied)},
                **checker.content_permissions(app),
            }
        },
    }


def build_webapi(
    auth: AuthServer,
    *,
    public_addr: str,
    audit: Any = None,
    registry: Any = None,
    tunnel_addr: Callable[[], str] = lambda: "",
    not_ready: Callable[[], str] = lambda: "",
) -> Starlette:
    """``not_ready()``: why the proxy is not ready yet ("" when it is; ``proxy/hosts.py``)."""

    async def actor_of(request: Request) -> Actor:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError(
                "no credential: send `Authorization: Bearer <token>` (log in with `bastion login`)"
            )
        return await auth.authenticate(token.strip(), source=_source(request))

    def authed(handler: Callable[[Request, Actor], Awaitable[Response]]) -> Handler:
        """A handler for authenticated callers; a refusal by role rules is audited."""

        async def run(request: Request) -> Response:
            actor = await actor_of(request)
            try:
                return await handler(request, actor)
            except AccessDeniedError as e:
                await _audit_denied(request, actor, e)
                raise

        return run

    async def _audit_denied(request: Request, actor: Actor, e: AccessDeniedError) -> None:
        await record_denied(
            auth,
            audit,
            user=actor.name,
            remote_addr=actor.remote_addr,
            roles=tuple(r.metadata.name for r in actor.roles),
            error=e.message,
            extra={"http_method": request.method, "path": request.url.path},
        )

    async def find(request: Request) -> Response:
        return _json(
            {
                "cluster_name": auth.cluster_name,
                "server_version": __version__,
                "proxy": {"public_addr": public_addr, "tunnel_addr": tunnel_addr()},
                "auth": {"second_factor": auth.settings.second_factor},
            }
        )

    async def ca(request: Request) -> Response:
        return Response(auth.cas["host"].cert_pem, media_type="application/x-pem-file")

    async def healthz(request: Request) -> Response:
        return _json({"status": "ok"})

    async def readyz(request: Request) -> Response:
        await auth.backend.current_revision()
        why = not_ready()
        if why:
            body = orjson.dumps({"status": "not ready", "reason": why})
            return Response(body, 503, {"retry-after": "2"}, media_type="application/json")
        return _json({"status": "ok"})

    def _source(request: Request) -> str:
        return request.client.host if request.client else ""

    async def login(request: Request) -> Response:
        data = await _body(request)
        user, source = _str(data, "user"), _source(request)
        try:
            token, ident = await auth.login(
                user,
                _str(data, "password"),
                totp_code=_str(data, "otp", required=False),
                ttl=_ttl(data),
                source=source,
            )
        except LoginRefusedError as e:
            # Audited by the auth server (decision 0033), with the reason; logged here.
            if e.reason in ("password", "unknown_user", "second_factor", "second_factor_reused"):
                log.warning(
                    "login failed",
                    extra={
                        "user": user[:128],
                        "remote": source,
                        "reason": e.reason,
                        "locked_now": e.locked_now,
                    },
                )
            raise
        log.info("user logged in", extra={"user": ident.username, "expires": ident.expires.isoformat()})
        return _json(
            {
                "token": token,
                "user": ident.username,
                "roles": list(ident.roles),
                "expires": ident.expires.isoformat(),
                "cluster_name": ident.cluster_name,
            }
        )

    async def invite_info(request: Request) -> Response:
        info = await auth.invite_info(_str(await _body(request), "code"), source=_source(request))
        return _json(
            {
                "user": info.user,
                "expires": info.expires.isoformat(),
                "second_factor": info.second_factor,
            }
        )

    async def invite_accept(request: Request) -> Response:
        data = await _body(request)
        user = await auth.accept_invite(
            _str(data, "code"),
            _str(data, "password"),
            totp_secret=_str(data, "totp_secret", required=False),
            totp_code=_str(data, "otp", required=False),
            source=_source(request),
        )
        log.info("invite accepted", extra={"user": user})
        return _json({"user": user})

    async def whoami(request: Request, actor: Actor) -> Response:
        return _json(identity_json(actor))

    async def get_resources(request: Request, actor: Actor) -> Response:
        kind = request.path_params["kind"]
        name = request.path_params.get("name")
        if name:
            res = await auth.get_resource(actor, kind, name)
            return _json(res.model_dump(mode="json"))
        return _json([r.model_dump(mode="json") for r in await auth.list_resources(actor, kind)])

    async def create_resource(request: Request, actor: Actor) -> Response:
        overwrite = request.query_params.get("overwrite") in ("1", "true")
        res = await auth.create_resource(actor, await _body(request), overwrite=overwrite)
        log.info(
            "resource written",
            extra={"by": actor.name, "resource": f"{res.kind}/{res.metadata.name}"},
        )
        return _json(res.model_dump(mode="json"), 201)

    async def delete_resource(request: Request, actor: Actor) -> Response:
        kind, name = request.path_params["kind"], request.path_params["name"]
        await auth.delete_resource(actor, kind, name)
        log.info("resource deleted", extra={"by": actor.name, "resource": f"{kind}/{name}"})
        return _json({"deleted": f"{kind}/{name}"})

    def _invite_json(invite: Any) -> dict[str, Any]:
        return {"user": invite.user, "code": invite.code, "expires": invite.expires.isoformat()}

    async def add_user(request: Request, actor: Actor) -> Response:
        data = await _body(request)
        invite = await auth.add_user(
            actor, _str(data, "name"), _strlist(data, "roles"), _traitmap(data, "traits")
        )
        return _json(_invite_json(invite), 201)

    async def update_user(request: Request, actor: Actor) -> Response:
        data = await _body(request)
        user = await auth.update_user(
            actor,
            request.path_params["name"],
            roles=_strlist(data, "roles") if "roles" in data else None,
            traits=_traitmap(data, "traits") if "traits" in data else None,
        )
        return _json(user.model_dump(mode="json"))

    async def reset_user(request: Request, actor: Actor) -> Response:
        return _json(_invite_json(await auth.reset_user(actor, request.path_params["name"])))

    async def add_token(request: Request, actor: Actor) -> Response:
        data = await _body(request)
        labels = data.get("labels", {})
        if isinstance(labels, str):
            try:
                labels = parse_label_scope(labels)
            except ValueError as e:
                raise ValidationError(f'"labels": {e}') from None
        secret, token = await auth.add_token(
            actor,
            _strlist(data, "roles"),
            _ttl(data),
            apps=_strlist(data, "apps"),
            labels=_traitmap({"labels": labels}, "labels"),
        )
        return _json(
            {
                "token": secret,
                "resource": token.model_dump(mode="json"),
                "ca_pin": fingerprint(auth.cas["host"].cert_pem),
                "proxy_addr": public_addr,
            },
            201,
        )

    async def host_join(request: Request) -> Response:
        data = await _body(request)
        role = _str(data, "role")
        if role != "app":
            raise ValidationError(f'only app services join (role "app"), not "{role}"')
        hostname = _str(data, "hostname", required=False)[:64] or "unknown"
        try:
            host_id, cert = await auth.join(
                _str(data, "token"),
                role,
                public_key_pem=_str(data, "public_key").encode(),
                hostname=hostname,
                source=_source(request),
            )
        except JoinThrottledError:
            raise  # the refusals that led here were audited; a flood of these is not
        except AuthenticationError as e:
            # Audited by the auth server (decision 0033); logged here.
            log.warning(
                "host join refused",
                extra={"hostname": hostname, "remote": _source(request), "error": e.message},
            )
            raise
        log.info("host joined", extra={"host_id": host_id, "role": role})
        return _json(
            {
                "host_id": host_id,
                "cert": cert.decode(),
                "cluster_name": auth.cluster_name,
                "tunnel_addr": tunnel_addr(),
            }
        )

    async def sign(request: Request, actor: Actor) -> Response:
        data = await _body(request)
        ttl = _ttl(data) or timedelta(hours=1)
        token, ident = await auth.sign(actor, _str(data, "user"), ttl)
        log.info("credential signed", extra={"by": actor.name, "for": ident.username})
        return _json({"token": token, "user": ident.username, "expires": ident.expires.isoformat()})

    async def logout(request: Request, actor: Actor) -> Response:
        expires = await auth.revoke_credential(actor)
        token_id = actor.identity.token_id if actor.identity else ""
        log.info("credential revoked", extra={"user": actor.name, "credential_id": token_id})
        return _json({"revoked": token_id, "expires": expires.isoformat()})

    async def user_locks(request: Request, actor: Actor) -> Response:
        return _json({name: locks.to_dict() for name, locks in (await auth.user_locks(actor)).items()})

    async def unlock_user(request: Request, actor: Actor) -> Response:
        locks = await auth.unlock_user(actor, request.path_params["name"])
        log.info("user unlocked", extra={"by": actor.name, "user": request.path_params["name"][:128]})
        return _json({"user": request.path_params["name"], "was": locks.to_dict()})

    async def audit_events(request: Request, actor: Actor) -> Response:
        actor.require("event", "list", "read")
        if audit is None:
            raise ValidationError("this proxy keeps no audit log (no app service runs here)")
        from bastion.audit.query import query_from_params

        query = query_from_params(request.query_params)
        if request.query_params.get("format") == "jsonl":
            # Streamed as read (decision 0035): constant memory however many match.
            return StreamingResponse(_jsonl(audit.search_pages(query)), media_type="application/x-ndjson")
        events = await audit.search(query)
        return _json(events)

    async def audit_feed(request: Request, actor: Actor) -> Response:
        """Events in commit order after ``cursor`` (decision 0034): ``bastion audit tail`` polls it."""
        actor.require("event", "list", "read")
        if audit is None:
            raise ValidationError("this proxy keeps no audit log (no app service runs here)")
        params = request.query_params
        limit, hold_ms = _count(params, "limit", 500, 2000), _count(params, "hold_ms", 0, 60_000)
        cursor = params.get("cursor") or ""
        if "last" in params and not cursor:
            cursor = await audit.feed_start(_count(params, "last", 0, 100_000))
        if limit == 0:
            return _json({"events": [], "cursor": cursor})
        page = await audit.feed(cursor, limit, hold_ms * 1000)
        return _json({"events": page.events, "cursor": page.cursor})

    async def audit_verify(request: Request, actor: Actor) -> Response:
        actor.require("event", "list", "read")
        if audit is None:
            raise ValidationError("this proxy keeps no audit log (no app service runs here)")
        from bastion.audit.chain import checker_of
        from bastion.audit.query import parse_when

        since = request.query_params.get("since")
        report = await audit.verify(
            checker_of(auth.cas["jwt"].public_key_pem), parse_when(since) if since else None
        )
        return _json(report.to_dict())

    async def mcp_apps(request: Request, actor: Actor) -> Response:
        if registry is None or actor.checker is None:
            return _json([])
        apps = [a for a in registry.all() if actor.checker.can_access_app(a)]
        return _json([app_json(a, actor.checker) for a in apps])

    def _pin_tools(body: dict[str, Any]) -> list[str] | None:
        """``{"all": true}`` or ``{"tools": [...]}``: which tools an approve or reset is about."""
        if body.get("all") is True:
            return None
        tools = body.get("tools")
        if not isinstance(tools, list) or not tools or not all(isinstance(t, str) for t in tools):
            raise ValidationError('name the tools: {"tools": ["NAME", ...]} or {"all": true}')
        return [str(t) for t in tools]

    async def mcp_pins(request: Request, actor: Actor) -> Response:
        return _json(await auth.mcp_pins(actor, request.path_params["app"]))

    async def mcp_pins_approve(request: Request, actor: Actor) -> Response:
        app = request.path_params["app"]
        done = await auth.approve_mcp_pins(actor, app, _pin_tools(await _body(request)))
        return _json({"app": app, "approved": done})

    async def mcp_pins_reset(request: Request, actor: Actor) -> Response:
        app = request.path_params["app"]
        done = await auth.reset_mcp_pins(actor, app, _pin_tools(await _body(request)))
        return _json({"app": app, "reset": done})

    routes = [
        Route("/v1/webapi/find", find),
        Route("/webapi/find", find),
        Route("/v1/webapi/ca", ca),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/v1/webapi/login", login, methods=["POST"]),
        Route("/v1/webapi/invites/accept", invite_accept, methods=["POST"]),
        Route("/v1/webapi/invites/info", invite_info, methods=["POST"]),
        Route("/v1/whoami", authed(whoami)),
        Route("/v1/resources", authed(create_resource), methods=["POST"]),
        Route("/v1/resources/{kind}", authed(get_resources)),
        Route("/v1/resources/{kind}/{name}", authed(get_resources), methods=["GET"]),
        Route("/v1/resources/{kind}/{name}", authed(delete_resource), methods=["DELETE"]),
        Route("/v1/users", authed(add_user), methods=["POST"]),
        Route("/v1/users/locks", authed(user_locks)),
        Route("/v1/users/{name}", authed(update_user), methods=["PATCH"]),
        Route("/v1/users/{name}/unlock", authed(unlock_user), methods=["POST"]),
        Route("/v1/users/{name}/reset", authed(reset_user), methods=["POST"]),
        Route("/v1/tokens", authed(add_token), methods=["POST"]),
        Route("/v1/auth/sign", authed(sign), methods=["POST"]),
        Route("/v1/auth/logout", authed(logout), methods=["POST"]),
        Route("/v1/webapi/host/join", host_join, methods=["POST"]),
        Route("/v1/audit/events", authed(audit_events)),
        Route("/v1/audit/verify", authed(audit_verify)),
        Route("/v1/audit/feed", authed(audit_feed)),
        Route("/v1/mcp/apps", authed(mcp_apps)),
        Route("/v1/mcp/pins/{app}", authed(mcp_pins)),
        Route("/v1/mcp/pins/{app}/approve", authed(mcp_pins_approve), methods=["POST"]),
        Route("/v1/mcp/pins/{app}/reset", authed(mcp_pins_reset), methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={BastionError: _handle, Exception: _handle},
    )
    return app


async def _jsonl(pages: AsyncIterator[list[dict[str, Any]]]) -> AsyncIterator[bytes]:
    async for page in pages:
        yield b"".join(orjson.dumps(e) + b"\n" for e in page)


def _count(params: Any, key: str, default: int, most: int) -> int:
    text = params.get(key) or str(default)
    if not text.isdigit() or int(text) > most:
        raise ValidationError(f"{key} must be a whole number from 0 to {most}")
    return int(text)


async def _handle(request: Request, exc: Exception) -> Response:
    return error_response(exc)


def _strlist(data: dict[str, Any], key: str) -> list[str]:
    v = data.get(key, [])
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValidationError(f'"{key}" must be a list of strings')
    return v


def _traitmap(data: dict[str, Any], key: str) -> dict[str, list[str]]:
    v = data.get(key, {})
    if not isinstance(v, dict) or not all(
        isinstance(k, str) and isinstance(x, list) and all(isinstance(s, str) for s in x)
        for k, x in v.items()
    ):
        raise ValidationError(f'"{key}" must map names to lists of strings')
    return v


INVITE_PAGE = "/web/invite/"


def _logged_path(path: str) -> str:
    """The path as the access log writes it: an invite link's one-time code left out (ADR 41)."""
    return INVITE_PAGE + "..." if path.startswith(INVITE_PAGE) else path


class RequestContext:
    """ASGI middleware: a request id per request, and one access-log line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = uuid.uuid4().hex[:16]
        token = request_id.set(rid)
        start = time.perf_counter()
        status = 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            # Starlette re-raises after its error handler answered (and we
            # logged the traceback there); answer here only if nobody did.
            if status == 0:
                response = error_response(exc)
                await response(scope, receive, send_wrapper)
        finally:
            log.info(
                "request",
                extra={
                    "method": scope.get("method"),
                    "path": _logged_path(str(scope.get("path", ""))),
                    "status": status,
                    "duration_ms": round((time.perf_counter() - start) * 1000, 2),
                    "remote": (scope.get("client") or ("", 0))[0],
                },
            )
            request_id.reset(token)
