"""``bastion users``, ``bastion tokens``, ``bastion create|get|rm``."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
import yaml
from rich.table import Table

from bastion._time import format_duration, parse_duration, utcnow
from bastion.auth.ca import fingerprint
from bastion.auth.scope import parse_label_scope
from bastion.cli._common import (
    Admin,
    ConfigOpt,
    FormatOpt,
    IdentityOpt,
    InsecureOpt,
    ProxyOpt,
    err,
    fail,
    out,
    run,
    table,
    with_admin,
)
from bastion.errors import ValidationError
from bastion.resources import KIND_ALIASES
from bastion.resources.codec import load_documents

users_app = typer.Typer(help="Manage users.", no_args_is_help=True)
tokens_app = typer.Typer(help="Manage join tokens for app services.", no_args_is_help=True)


def parse_list(text: str | None) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def parse_traits(text: str | None) -> dict[str, list[str]]:
    """``k=v,k=v2,k2=`` -> ``{k: [v, v2], k2: []}`` (an empty value clears the trait)."""
    traits: dict[str, list[str]] = {}
    for part in parse_list(text):
        k, sep, v = part.partition("=")
        if not sep or not k.strip():
            raise typer.BadParameter(f'"{part}" is not NAME=VALUE', param_hint="--traits")
        values = traits.setdefault(k.strip(), [])
        if v.strip():
            values.append(v.strip())
    return traits


def _when(iso: str | None) -> str:
    if not iso:
        return "never"
    at = datetime.fromisoformat(iso)
    left = at - utcnow()
    return (
        f"{at:%Y-%m-%d %H:%M:%S} UTC (in {format_duration(left)})" if left.total_seconds() > 0 else "expired"
    )


def print_invite(invite: dict[str, Any], *, proxy_addr: str, ca_pem: str, created: bool) -> None:
    """How the new user sets a password; the CA fingerprint spares them a trust prompt."""
    what = "has been created but requires a password" if created else "must set a new password"
    out.print(f'User "{invite["user"]}" {what}. Share this one-time invite with them;')
    out.print(f"it expires {_when(invite['expires'])}. They run:\n")
    fp = fingerprint(ca_pem.encode())
    out.print(
        f"  bastion users set-password --proxy={proxy_addr} --ca-fingerprint={fp} --invite={invite['code']}\n"
    )
    out.print(f"and then: bastion login --proxy={proxy_addr} --user={invite['user']}")
    out.print(f"\nor they open this link in a browser: https://{proxy_addr}/web/invite/{invite['code']}")


@users_app.command("add")
def users_add(
    name: str,
    roles: Annotated[str, typer.Option("--roles", help="Comma-separated role names.")],
    traits: Annotated[
        str | None, typer.Option("--traits", help="k=v,k=v2 (repeat a key for several values).")
    ] = None,
    config: ConfigOpt = None,
    identity: IdentityOpt = None,
    proxy: ProxyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Create a user and print a one-time invite to set their password."""
    role_list = parse_list(roles)
    if not role_list:
        raise typer.BadParameter("at least one role is required", param_hint="--roles")
    trait_map = parse_traits(traits)

    async def go(admin: Admin) -> None:
        invite = await admin.add_user(name, role_list, trait_map)
        print_invite(invite, proxy_addr=admin.proxy_addr, ca_pem=await admin.ca_pem(), created=True)

    run(with_admin(go, config=config, identity=identity, proxy=proxy, insecure=insecure))


@users_app.command("ls")
def users_ls(
    fmt: FormatOpt = "text",
    config: ConfigOpt = None,
    identity: IdentityOpt = None,
    proxy: ProxyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """List users, and who failed logins lock out now (and until when)."""

    async def go(admin: Admin) -> None:
        users, locks = await admin.ls("user"), await admin.user_locks()
        for u in users:
            lock = locks.get(u["metadata"]["name"])
            if lock:
                u.setdefault("status", {})["login_lock"] = lock
        render(users, fmt, "user")

    run(with_admin(go, config=config, identity=identity, proxy=proxy, insecure=insecure))


@users_app.command("unlock")
def users_unlock(
    name: str,
    config: ConfigOpt = None,
    identity: IdentityOpt = None,
    proxy: ProxyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Lift the login locks failed attempts put on a user (their password is unchanged)."""

    async def go(admin: Admin) -> None:
        was = (await admin.unlock_user(name))["was"]
        if was["locked"]:
            out.print(f'User "{name}" unlocked: they may log in again from every address.')
        else:
            out.print(f'User "{name}" was not locked; nothing to do.')

    run(with_admin(go, config=config, identity=identity, proxy=proxy, insecure=insecure))


@users_app.command("update")
def users_update(
    name: str,
    roles: Annotated[str | None, typer.Option("--roles", help="Replace the user's roles.")] = None,
    traits: Annotated[
        str | None,
        typer.Option("--set-traits", "--traits", help="Set traits: k=v,k2=v2 (k= clears)."),
    ] = None,
    mcp_tools: Annotated[
        str | None,
        typer.Option("--set-mcp-tools", help="Set the mcp_tools trait (comma-separated)."),
    ] = None,
    config: ConfigOpt = None,
    identity: IdentityOpt = None,
    proxy: ProxyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Change a user's roles or traits."""
    trait_map = parse_traits(traits) if traits is not None else None
    if mcp_tools is not None:
        trait_map = {**(trait_map or {}), "mcp_tools": parse_list(mcp_tools)}
    if roles is None and trait_map is None:
        raise typer.BadParameter("nothing to change: pass --roles, --set-traits or --set-mcp-tools")

    async def go(admin: Admin) -> None:
        user = await admin.update_user(
            name, roles=parse_list(roles) if roles is not None else None, traits=trait_map
        )
        out.print(f'User "{name}" updated: roles {", ".join(user["spec"]["roles"]) or "(none)"}.')

    run(with_admin(go, config=config, identity=identity, proxy=proxy, insecure=insecure))


@users_app.command("reset")
def users_reset(
    name: str,
    config: ConfigOpt = None,
    identity: IdentityOpt = None,
    proxy: ProxyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Remove a user's password and second factor and print a new invite."""

    async def go(admin: Admin) -> None:
        invite = await admin.reset_user(name)
        print_invite(invite, proxy_addr=admin.proxy_addr, ca_pem=await admin.ca_pem(), created=False)

    run(with_admin(go, config=config, identity=identity, proxy=proxy, insecure=insecure))


@users_app.command("rm")
def users_rm(
    name: str,
    config: ConfigOpt = None,
    identity: IdentityOpt = None,
    proxy: ProxyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Delete a user."""

    async def go(admin: Admin) -> None:
        await admin.delete("user", name)
        out.print(f'User "{name}" has been deleted.')

    run(with_admin(go, config=config, identity=identity, proxy=proxy, insecure=insecure))


@tokens_app.command("add")
def tokens_add(
    type_: Annotated[str, typer.Option("--type", help="What the token joins as: app.")],
    ttl: Annotated[str, typer.Option("--ttl", help="How long the token is valid (e.g. 30m, 1h).")] = "30m",
    apps: Annotated[
        str | None,
        typer.Option("--apps", help="Only these apps (comma-separated names) may be served by the host."),
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option(
            "--labels",
            help="Only apps whose labels match may be served by the host (env=dev,team=a|b).",
        ),
    ] = None,
    fmt: Annotated[
        str,
        typer.Option("--format", help="guide (how to join, the default), text (the token alone) or json."),
    ] = "guide",
    config: ConfigOpt = None,
    identity: IdentityOpt = None,
    proxy: ProxyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Create a single-use join token."""
    try:
        ttl_d = parse_duration(ttl)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--ttl") from None
    if fmt not in ("guide", "text", "json"):
        raise typer.BadParameter("use guide, text or json", param_hint="--format")
    try:
        label_scope = parse_label_scope(labels or "")
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--labels") from None

    async def go(admin: Admin) -> None:
        res = await admin.add_token(parse_list(type_), ttl_d, apps=parse_list(apps), labels=label_scope)
        if fmt == "json":
            meta = res["resource"]["metadata"]
            out.print_json(
                orjson.dumps(
                    {
                        "token": res["token"],
                        "id": meta["name"],
                        "roles": res["resource"]["spec"]["roles"],
                        "apps": res["resource"]["spec"].get("apps", []),
                        "labels": res["resource"]["spec"].get("labels", {}),
                        "expires": meta["expires"],
                        "ca_pin": res.get("ca_pin", ""),
                    }
                ).decode()
            )
        elif fmt == "text":
            print(res["token"])
        else:
            meta = res["resource"]["metadata"]
            print(
                f"""The join token: {res["token"]}
It is single-use and expires at {meta["expires"]}.{_scope_note(res["resource"]["spec"])}

Start an app service on another host with this configuration (bastion start --config app.yaml):

version: v1
bastion:
  data_dir: /var/lib/bastion
  proxy_server: "{res.get("proxy_addr") or "PROXY_HOST:3080"}"
  ca_pin: "{res.get("ca_pin", "")}"
  join_params:
    token_name: "/tmp/token"   # a file holding the token (or the token itself)
auth_service: {{enabled: false}}
proxy_service: {{enabled: false}}
app_service:
  enabled: true
  resources:
  - labels: {{"*": "*"}}

The ca_pin lets the new host check it is joining this cluster, not an impostor."""
            )

    run(with_admin(go, config=config, identity=identity, proxy=proxy, insecure=insecure))


def _scope_note(spec: dict[str, Any]) -> str:
    apps, labels = spec.get("apps") or [], spec.get("labels") or {}
    if not apps and not labels:
        return ""
    parts = [f"apps {', '.join(apps)}"] if apps else []
    if labels:
        parts.append("labels " + ", ".join(f"{k}={'|'.join(v)}" for k, v in labels.items()))
    return "\nThe host may serve only " + " with ".join(parts) + "; the proxy refuses any other app."


@tokens_app.command("ls")
def tokens_ls(
    fmt: FormatOpt = "text",
    config: ConfigOpt = None,
    identity: IdentityOpt = None,
    proxy: ProxyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """List live join tokens (their ids; the secrets are not stored)."""

    async def go(admin: Admin) -> None:
        render(await admin.ls("token"), fmt, "token")

    run(with_admin(go, config=config, identity=identity, proxy=proxy, insecure=insecure))


@tokens_app.command("rm")
def tokens_rm(
    token_id: Annotated[str, typer.Argument(metavar="ID", help="The token id shown by `tokens ls`.")],
    config: ConfigOpt = None,
    identity: IdentityOpt = None,
    proxy: ProxyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Delete a join token."""

    async def go(admin: Admin) -> None:
        await admin.delete("token", token_id)
        out.print(f'Token "{token_id}" has been deleted.')

    run(with_admin(go, config=config, identity=identity, proxy=proxy, insecure=insecure))


def create(
    file: Annotated[Path, typer.Argument(help="YAML or JSON file with one or more resources.")],
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite resources that exist.")] = False,
    config: ConfigOpt = None,
    identity: IdentityOpt = None,
    proxy: ProxyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Create (or with -f, create or replace) resources from a file."""
    try:
        text = file.read_text()
    except OSError as e:
        raise fail(f"cannot read {file}: {e.strerror}") from None

    async def go(admin: Admin) -> None:
        docs = load_documents(text, source=str(file))
        if not docs:
            raise ValidationError(f"{file}: no resources in the file")
        for doc in docs:
            res = await admin.create(doc, overwrite=force)
            verb = "has been written" if force else "has been created"
            out.print(f'{res["kind"]} "{res["metadata"]["name"]}" {verb}.')

    run(with_admin(go, config=config, identity=identity, proxy=proxy, insecure=insecure))


def _kind_name(ref: str) -> tuple[str, str]:
    kind, _, name = ref.partition("/")
    canonical = KIND_ALIASES.get(kind.lower())
    if canonical is None:
        raise fail(f'unknown kind "{kind}" (known: role, user, token, app)')
    return canonical, name


def get(
    ref: Annotated[str, typer.Argument(metavar="KIND[/NAME]", help="e.g. roles, role/editor, users, apps.")],
    fmt: FormatOpt = "yaml",
    config: ConfigOpt = None,
    identity: IdentityOpt = None,
    proxy: ProxyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Show resources."""
    kind, name = _kind_name(ref)

    async def go(admin: Admin) -> None:
        items = [await admin.get(kind, name)] if name else await admin.ls(kind)
        render(items, fmt, kind)

    run(with_admin(go, config=config, identity=identity, proxy=proxy, insecure=insecure))


def rm(
    ref: Annotated[str, typer.Argument(metavar="KIND/NAME", help="e.g. role/auditor, app/everything.")],
    config: ConfigOpt = None,
    identity: IdentityOpt = None,
    proxy: ProxyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Delete a resource."""
    kind, name = _kind_name(ref)
    if not name:
        raise fail("name the resource as KIND/NAME, e.g. role/auditor")

    async def go(admin: Admin) -> None:
        await admin.delete(kind, name)
        out.print(f'{kind} "{name}" has been deleted.')

    run(with_admin(go, config=config, identity=identity, proxy=proxy, insecure=insecure))


def _strip(doc: dict[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in doc.get("metadata", {}).items() if v not in (None, "", {}, [])}
    spec = doc.get("spec", {})
    if doc.get("kind") == "token":
        spec = {k: v for k, v in spec.items() if k != "secret_sha256"}
    return {**doc, "metadata": meta, "spec": spec}


def render(items: list[dict[str, Any]], fmt: str, kind: str) -> None:
    items = [_strip(i) for i in items]
    if fmt == "json":
        print(orjson.dumps(items, option=orjson.OPT_INDENT_2).decode())
    elif fmt == "yaml":
        print("---\n".join(yaml.safe_dump(i, sort_keys=False) for i in items), end="")
    elif fmt == "text":
        out.print(_table(items, kind))
    else:
        raise fail(f'unknown format "{fmt}" (use text, yaml or json)', 2)


def _lock(lock: dict[str, Any] | None) -> str:
    """ "locked from 2 addresses until 18:42:05 UTC (in 19m)", or "" when not locked."""
    if not lock:
        return ""
    parts = []
    if lock.get("addresses"):
        n = lock["addresses"]
        parts.append(f"locked from {n} address{'es' if n > 1 else ''} until {_when(lock.get('until'))}")
    if lock.get("throttled_until"):
        parts.append(f"known addresses only until {_when(lock['throttled_until'])}")
    return "; ".join(parts)


def _labels(d: dict[str, Any]) -> str:
    return ",".join(f"{k}={'|'.join(v) if isinstance(v, list) else v}" for k, v in d.items())


def _table(items: list[dict[str, Any]], kind: str) -> Table:
    if kind == "user":
        t = table("Name", "Roles", "Traits", "Login lock")
        for i in items:
            t.add_row(
                i["metadata"]["name"],
                ",".join(i["spec"].get("roles", [])),
                _labels(i["spec"].get("traits", {})),
                _lock(i.get("status", {}).get("login_lock")),
            )
    elif kind == "token":
        t = table("ID", "Type", "Expires", "Scope")
        for i in items:
            spec = i["spec"]
            scope = " ".join(
                x
                for x in (
                    "apps=" + ",".join(spec["apps"]) if spec.get("apps") else "",
                    "labels=" + _labels(spec["labels"]) if spec.get("labels") else "",
                )
                if x
            )
            t.add_row(
                i["metadata"]["name"],
                ",".join(spec["roles"]),
                _when(i["metadata"].get("expires")),
                scope or "any app",
            )
    elif kind == "role":
        t = table("Name", "Allowed app labels", "Allowed tools", "Rules", "Denied tools")
        for i in items:
            allow, deny = i["spec"].get("allow", {}), i["spec"].get("deny", {})
            rules = "; ".join(
                f"{','.join(r['resources'])}:{','.join(r['verbs'])}" for r in allow.get("rules", [])
            )
            t.add_row(
                i["metadata"]["name"],
                _labels(allow.get("app_labels", {})),
                ",".join(allow.get("mcp", {}).get("tools", [])),
                rules,
                ",".join(deny.get("mcp", {}).get("tools", [])),
            )
    elif kind == "app_server":
        t = table("Host ID", "Hostname", "Via", "Apps", "Refused", "Proxies", "Version", "Expires")
        for i in items:
            spec = i["spec"]
            t.add_row(
                i["metadata"]["name"],
                spec.get("hostname", ""),
                spec.get("via", ""),
                ",".join(a["metadata"]["name"] for a in spec.get("apps", [])),
                ",".join(spec.get("refused", {})),
                ",".join(spec.get("proxies", [])),
                spec.get("version", ""),
                _when(i["metadata"].get("expires")),
            )
    else:
        t = table("Name", "Description", "URI / command", "Labels")
        for i in items:
            spec = i["spec"]
            target = spec.get("uri") or " ".join(
                [spec.get("mcp", {}).get("command", ""), *spec.get("mcp", {}).get("args", [])]
            )
            t.add_row(
                i["metadata"]["name"],
                i["metadata"].get("description", ""),
                target,
                _labels(i["metadata"].get("labels", {})),
            )
    return t


__all__ = ["create", "err", "get", "rm", "tokens_app", "users_app"]
