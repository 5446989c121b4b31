"""``bastion mcp config``: point an MCP client (Claude, Cursor, VS Code, ...) at MCP servers.

Without ``--client-config`` it prints a ``{"mcpServers": ...}`` snippet to
paste (the JSON alone on stdout, so it can be piped; the rest on stderr).
With it, it updates that client's own file in place through
``bastion.client.mcp_config``, which keeps everything else in the file.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from bastion.cli._common import IdentityOpt, InsecureOpt, ProxyOpt, err, fail, out, run
from bastion.cli.mcp import fetch_apps, match_labels, mcp_app, parse_labels
from bastion.client import mcp_config as mc
from bastion.errors import BastionError

NO_SELECTOR = "no MCP server selected: name one, or use --all or --labels"
TOO_MANY_SELECTORS = "choose one selector: a name, --all, or --labels"
USAGE = 2  # like Click's own usage errors


def _clients_text() -> str:
    return "|".join(mc.client_names())


@mcp_app.command("config")
def config(
    name: Annotated[str | None, typer.Argument(metavar="NAME", help="The MCP server to configure.")] = None,
    all_apps: Annotated[bool, typer.Option("--all", "-R", help="Every MCP server you may use.")] = False,
    labels: Annotated[
        str | None, typer.Option("--labels", help="The MCP servers with these labels: k=v,k2=v2.")
    ] = None,
    client_config: Annotated[
        str | None,
        typer.Option(
            "--client-config",
            envvar="BASTION_MCP_CLIENT_CONFIG",
            help=f"Update this client's configuration file ({_clients_text()}) or the file at a "
            "PATH, instead of printing the JSON.",
        ),
    ] = None,
    json_format: Annotated[
        str,
        typer.Option(
            "--json-format",
            envvar="BASTION_MCP_CONFIG_JSON_FORMAT",
            help="pretty, compact, or auto (keep the file's own layout; pretty for a new file).",
        ),
    ] = "auto",
    headers: Annotated[
        list[str] | None,
        typer.Option("--header", "-H", help='Header "Name: value" to send to the server (repeatable).'),
    ] = None,
    identity: IdentityOpt = None,
    proxy: ProxyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Configure an MCP client to reach MCP servers through bastion (entries "bastion-<app>")."""
    # Check everything the user typed before asking the proxy anything.
    name = name.strip() if name and name.strip() else None
    labels = labels if labels and labels.strip() else None
    chosen = sum((name is not None, all_apps, labels is not None))
    if chosen == 0:
        raise fail(NO_SELECTOR, USAGE)
    if chosen > 1:
        raise fail(TOO_MANY_SELECTORS, USAGE)
    selector = parse_labels(labels)
    fmt = json_format.strip().lower()
    if fmt not in mc.JSON_FORMATS:
        raise fail(f'unknown JSON format "{json_format}" (use {", ".join(mc.JSON_FORMATS)})', USAGE)
    try:
        header_args = [mc.parse_header(h) for h in headers or []]
        target = mc.resolve_target(client_config) if client_config and client_config.strip() else None
    except BastionError as e:
        raise fail(e.message, USAGE) from None

    all_reachable = run(fetch_apps(identity=identity, proxy=proxy, insecure=insecure))
    apps = _select(all_reachable, name=name, selector=selector)

    client = target.client if target else mc.GENERIC
    entries = mc.build_entries(
        [a["name"] for a in apps],
        client=client,
        command=mc.bastion_command(),
        headers=header_args,
        env=mc.bastion_env(),
    )
    if target is None:
        _print_snippet(apps, entries, fmt=fmt, identity_given=identity is not None)
        return
    try:
        result = mc.update_config(target, entries, json_format=fmt)
    except BastionError as e:
        raise fail(e.message) from None
    _print_result(result)


def _select(
    apps: list[dict[str, Any]], *, name: str | None, selector: dict[str, str]
) -> list[dict[str, Any]]:
    if name is not None:
        found = [a for a in apps if a["name"] == name]
        what = f' named "{name}"'
    elif selector:
        found = [a for a in apps if match_labels(a, selector)]
        what = " with labels " + ",".join(f"{k}={v}" for k, v in selector.items())
    else:
        found, what = apps, ""
    if not found:
        raise fail(
            f"no MCP servers found{what}: run `bastion mcp ls` to see the ones you may use "
            "(or ask for a role whose app_labels match them)"
        )
    return found


def _print_snippet(
    apps: list[dict[str, Any]], entries: dict[str, Any], *, fmt: str, identity_given: bool
) -> None:
    # Only the JSON goes to stdout, so `bastion mcp config --all > servers.json` or `| jq` work.
    err.print("Found MCP servers:", markup=False)
    for a in apps:
        err.print(f"  {a['name']}", markup=False)
    err.print(markup=False)
    print(mc.snippet(entries, json_format="compact" if fmt == "compact" else "pretty"), end="")
    err.print(markup=False)
    err.print("Tips:", markup=False)
    err.print(
        "  - Paste the entries into your MCP client's configuration, or let bastion update it:\n"
        f"    --client-config={_clients_text()}, or --client-config=PATH for another file.",
        markup=False,
    )
    err.print(
        '  - VS Code keeps them under "servers" with "type": "stdio" (--client-config=vscode writes that).',
        markup=False,
    )
    err.print(
        f'  - Entries are named "{mc.ENTRY_PREFIX}<app>" and run `bastion mcp connect <app>` as you: '
        "log in with `bastion login` before the client starts them.",
        markup=False,
    )
    if identity_given:
        err.print(
            "  - Note: the entries use your login profile, not the identity file given with -i.",
            markup=False,
        )


def _print_result(result: mc.UpdateResult) -> None:
    if not result.changed:
        out.print(f"{result.path} already up to date ({', '.join(result.unchanged)})")
        return
    out.print(f"Updated {result.client.display} configuration at {result.path}")
    for label, names in (
        ("added", result.added),
        ("updated", result.updated),
        ("unchanged", result.unchanged),
    ):
        if names:
            out.print(f"  {label}: {', '.join(names)}")
    if result.backup is not None:
        out.print(f"Backup of the previous file: {result.backup}")
    who = "the MCP client" if result.client is mc.GENERIC else result.client.display
    out.print(
        f'MCP servers from bastion are named "{mc.ENTRY_PREFIX}<app>". '
        f"Restart {who} (or reload its MCP servers) to pick them up."
    )
