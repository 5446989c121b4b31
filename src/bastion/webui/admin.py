"""Administration pages: roles and dynamic apps as YAML, users, join tokens, app services.

Shown to users whose role rules allow them (``context.nav``), and refused to others by the
same ``Actor.require`` the web API runs: every action is the ``AuthServer`` method the CLI's
web-API call reaches (``create_resource``, ``delete_resource``, ``add_user``, ``update_user``,
``reset_user``, ``unlock_user``, ``add_token``), so rules, guards (a role in use cannot be
deleted), messages and audit events are the CLI's.  YAML is decoded by ``load_documents``, as
``bastion create`` decodes a file, and each problem is shown next to its line.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import yaml
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from bastion._time import parse_duration
from bastion.auth.ca import fingerprint
from bastion.auth.scope import parse_label_scope
from bastion.errors import AccessDeniedError, BastionError, ValidationError
from bastion.resources.codec import DecodeError, load_documents
from bastion.tunnel.server import HEARTBEAT_TTL
from bastion.webui import yamllines
from bastion.webui.context import UI, Signed, log

#: Kinds edited as YAML: kind -> (list path, title).
EDITED = {"role": ("/web/admin/roles", "Roles"), "app": ("/web/admin/apps", "Apps")}
TEMPLATES = {
    "role": """kind: role
version: v1
metadata:
  name: NAME
  description: ""
spec:
  allow:
    app_labels: {env: dev}
    mcp:
      tools: ["*"]
""",
    "app": """kind: app
version: v1
metadata:
  name: NAME
  description: ""
  labels: {env: dev}
spec:
  uri: mcp+https://mcp.example.com/mcp
""",
}
MAX_YAML = 64 * 1024


def as_yaml(doc: dict[str, Any]) -> str:
    """A resource as ``bastion get KIND/NAME`` shows it (revision and empty fields left out)."""
    meta = {
        k: v for k, v in doc.get("metadata", {}).items() if v not in (None, "", {}, []) and k != "revision"
    }
    return yaml.safe_dump({**doc, "metadata": meta}, sort_keys=False)


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _traits(text: str) -> dict[str, list[str]]:
    """``k=v,k=v2`` (a key repeated for several values), as ``bastion users add --traits``."""
    out: dict[str, list[str]] = {}
    for part in _list(text):
        k, sep, v = part.partition("=")
        if not sep or not k.strip():
            raise ValidationError(f'traits: "{part[:80]}" is not key=value')
        out.setdefault(k.strip(), []).append(v.strip())
    return out


def _server_row(server: Any) -> dict[str, Any]:
    """An app service as the list shows it; its last heartbeat is its record's expiry less the TTL."""
    d: dict[str, Any] = server.model_dump(mode="json")
    expires = server.metadata.expires
    d["last_seen"] = (expires - HEARTBEAT_TTL).strftime("%Y-%m-%d %H:%M:%S UTC") if expires else ""
    return d


def routes(ui: UI) -> list[Route]:
    auth = ui.auth

    def invite_url(code: str) -> str:
        return f"https://{ui.public_addr}/web/invite/{code}"

    # ------------------------------------------------------------ roles and apps (YAML)

    async def kind_list(request: Request, s: Signed, kind: str) -> Response:
        items = [r.model_dump(mode="json") for r in await auth.list_resources(s.actor, kind)]
        ctx: dict[str, Any] = {
            "title": EDITED[kind][1],
            "kind": kind,
            "items": items,
            "base": EDITED[kind][0],
        }
        # What else the list shows needs more rights; without them it is left out, not refused.
        if kind == "role":
            try:
                users = [u.model_dump(mode="json") for u in await auth.list_resources(s.actor, "user")]
            except AccessDeniedError:
                users = []
            ctx["used"] = {
                i["metadata"]["name"]: [
                    u["metadata"]["name"] for u in users if i["metadata"]["name"] in u["spec"]["roles"]
                ]
                for i in items
            }
        else:
            try:
                servers = await auth.list_resources(s.actor, "app_server")
            except AccessDeniedError:
                servers = []
            ctx["servers"] = [_server_row(a) for a in servers]
        return ui.render(request, "admin_kind.html", ctx, signed=s)

    def editor(
        request: Request,
        s: Signed,
        kind: str,
        text: str,
        *,
        name: str = "",
        found: list[yamllines.Problem] | None = None,
        status: int = 200,
    ) -> Response:
        at: dict[int, list[str]] = {}
        last = max(1, len(text.splitlines()))
        for p in found or []:
            # Past the end ("expected '}', but got the end"): shown at the last line.
            at.setdefault(min(p.line, last), []).append(p.message)
        ctx = {
            "title": f"{'Edit' if name else 'New'} {kind}",
            "kind": kind,
            "name": name,
            "text": text,
            "lines": text.splitlines(),
            "at": at,
            "general": at.get(0, []),
            "base": EDITED[kind][0],
        }
        return ui.render(request, "admin_editor.html", ctx, status=status, signed=s)

    async def kind_new(request: Request, s: Signed, kind: str) -> Response:
        s.actor.require(kind, "create")
        return editor(request, s, kind, TEMPLATES[kind])

    async def kind_edit(request: Request, s: Signed, kind: str) -> Response:
        name = request.path_params["name"]
        res = await auth.get_resource(s.actor, kind, name)
        return editor(request, s, kind, as_yaml(res.model_dump(mode="json")), name=name)

    async def kind_save(request: Request, s: Signed, data: dict[str, str], kind: str) -> Response:
        text, name = data.get("yaml", ""), data.get("name", "")[:200]
        # Refused before the text is read (``create_resource`` asks the same again).
        s.actor.require(kind, *(("create", "update") if name else ("create",)))
        if len(text) > MAX_YAML:
            # Refused, never cut: the first 64 KiB of a role can be a valid role that lacks
            # the deny rules written after them.
            why = f"the text is {len(text) // 1024} KiB; a {kind} may be at most {MAX_YAML // 1024} KiB"
            found = [yamllines.Problem(0, why)]
            return editor(request, s, kind, text, name=name, found=found, status=413)
        try:
            docs = load_documents(text, source=kind)
            if len(docs) != 1:
                raise ValidationError(f"one {kind} per page: the text holds {len(docs)} documents")
            doc = docs[0]
            if doc.get("kind", kind) != kind:
                raise ValidationError(f'kind: this page edits {kind}s, not "{str(doc.get("kind"))[:40]}"')
            doc.setdefault("kind", kind)
            new_name = str((doc.get("metadata") or {}).get("name", ""))
            if name and new_name != name:
                raise ValidationError(
                    f'metadata.name: this page edits "{name}"; create a new {kind} to rename it'
                )
            res = await auth.create_resource(s.actor, doc, overwrite=bool(name))
        except DecodeError as e:
            found = [yamllines.Problem(e.line, e.location)]
            return editor(request, s, kind, text, name=name, found=found, status=400)
        except ValidationError as e:
            found = yamllines.problems(text, e.message)
            return editor(request, s, kind, text, name=name, found=found, status=400)
        log.info(
            "resource written on the web",
            extra={"by": s.actor.name, "resource": f"{kind}/{res.metadata.name}"},
        )
        return RedirectResponse(f"{EDITED[kind][0]}?saved={quote(res.metadata.name)}", 303)

    async def kind_delete(request: Request, s: Signed, data: dict[str, str], kind: str) -> Response:
        name = request.path_params["name"]
        try:
            await auth.delete_resource(s.actor, kind, name)
        except ValidationError as e:
            return ui.error(request, f"Cannot delete {kind} {name[:100]}", e.message, 400, s)
        return RedirectResponse(f"{EDITED[kind][0]}?deleted={quote(name)}", 303)

    # ------------------------------------------------------------ users

    async def users_page(request: Request, s: Signed, *, invite: Any = None, error: str = "") -> Response:
        users = [u.model_dump(mode="json") for u in await auth.list_resources(s.actor, "user")]
        try:
            locks = {n: lk.to_dict() for n, lk in (await auth.user_locks(s.actor)).items()}
        except BastionError:
            locks = {}
        try:
            roles = [r.metadata.name for r in await auth.list_resources(s.actor, "role")]
        except AccessDeniedError:
            roles = []  # only the placeholder of the roles field uses them
        ctx = {
            "title": "Users",
            "users": users,
            "locks": locks,
            "invite": invite,
            "invite_url": invite_url(invite.code) if invite else "",
            "error": error,
            "roles": roles,
        }
        return ui.render(request, "admin_users.html", ctx, status=400 if error else 200, signed=s)

    async def users_get(request: Request, s: Signed) -> Response:
        return await users_page(request, s)

    async def user_add(request: Request, s: Signed, data: dict[str, str]) -> Response:
        try:
            invite = await auth.add_user(
                s.actor,
                data.get("name", "").strip()[:128],
                _list(data.get("roles", "")),
                _traits(data.get("traits", "")),
            )
        except ValidationError as e:
            return await users_page(request, s, error=e.message)
        return await users_page(request, s, invite=invite)

    async def user_update(request: Request, s: Signed, data: dict[str, str]) -> Response:
        name = request.path_params["name"]
        try:
            await auth.update_user(
                s.actor,
                name,
                roles=_list(data.get("roles", "")),
                traits=_traits(data.get("traits", "")) if "traits" in data else None,
            )
        except ValidationError as e:
            return await users_page(request, s, error=e.message)
        return RedirectResponse("/web/admin/users", 303)

    async def user_reset(request: Request, s: Signed, data: dict[str, str]) -> Response:
        invite = await auth.reset_user(s.actor, request.path_params["name"])
        return await users_page(request, s, invite=invite)

    async def user_unlock(request: Request, s: Signed, data: dict[str, str]) -> Response:
        await auth.unlock_user(s.actor, request.path_params["name"])
        return RedirectResponse("/web/admin/users", 303)

    async def user_delete(request: Request, s: Signed, data: dict[str, str]) -> Response:
        await auth.delete_resource(s.actor, "user", request.path_params["name"])
        return RedirectResponse("/web/admin/users", 303)

    # ------------------------------------------------------------ join tokens

    async def tokens_page(request: Request, s: Signed, *, made: Any = None, error: str = "") -> Response:
        tokens = [t.model_dump(mode="json") for t in await auth.list_resources(s.actor, "token")]
        ctx = {"title": "Join tokens", "tokens": tokens, "made": made, "error": error}
        return ui.render(request, "admin_tokens.html", ctx, status=400 if error else 200, signed=s)

    async def tokens_get(request: Request, s: Signed) -> Response:
        return await tokens_page(request, s)

    async def token_add(request: Request, s: Signed, data: dict[str, str]) -> Response:
        try:
            ttl = parse_duration(data.get("ttl", "30m").strip() or "30m")
        except ValueError as e:
            return await tokens_page(request, s, error=f"ttl: {e}")
        try:
            labels = parse_label_scope(data.get("labels", ""))
        except ValueError as e:
            return await tokens_page(request, s, error=f"labels: {e}")
        try:
            secret, token = await auth.add_token(
                s.actor, ["app"], ttl, apps=_list(data.get("apps", "")), labels=labels
            )
        except ValidationError as e:
            return await tokens_page(request, s, error=e.message)
        made = {
            "token": secret,
            "id": token.metadata.name,
            "expires": token.metadata.expires.isoformat() if token.metadata.expires else "",
            "ca_pin": fingerprint(auth.cas["host"].cert_pem),
            "proxy": ui.public_addr,
        }
        return await tokens_page(request, s, made=made)

    async def token_delete(request: Request, s: Signed, data: dict[str, str]) -> Response:
        await auth.delete_resource(s.actor, "token", request.path_params["name"])
        return RedirectResponse("/web/admin/tokens", 303)

    def for_kind(handler: Any, kind: str) -> Any:
        async def run(request: Request, s: Signed, *rest: Any) -> Response:
            return await handler(request, s, *rest, kind)  # type: ignore[no-any-return]

        return run

    out: list[Route] = []
    for kind, (base, _) in EDITED.items():
        out += [
            Route(base, ui.page(for_kind(kind_list, kind))),
            Route(f"{base}/new", ui.page(for_kind(kind_new, kind))),
            Route(f"{base}/save", ui.action(for_kind(kind_save, kind)), methods=["POST"]),
            Route(base + "/{name}", ui.page(for_kind(kind_edit, kind))),
            Route(base + "/{name}/delete", ui.action(for_kind(kind_delete, kind)), methods=["POST"]),
        ]
    out += [
        Route("/web/admin/users", ui.page(users_get)),
        Route("/web/admin/users", ui.action(user_add), methods=["POST"]),
        Route("/web/admin/users/{name}/update", ui.action(user_update), methods=["POST"]),
        Route("/web/admin/users/{name}/reset", ui.action(user_reset), methods=["POST"]),
        Route("/web/admin/users/{name}/unlock", ui.action(user_unlock), methods=["POST"]),
        Route("/web/admin/users/{name}/delete", ui.action(user_delete), methods=["POST"]),
        Route("/web/admin/tokens", ui.page(tokens_get)),
        Route("/web/admin/tokens", ui.action(token_add), methods=["POST"]),
        Route("/web/admin/tokens/{name}/delete", ui.action(token_delete), methods=["POST"]),
    ]
    return out
