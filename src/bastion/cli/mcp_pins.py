"""``bastion mcp pins ls|diff|approve|reset APP``: pinned tool definitions (decision 0045)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer

from bastion.cli._common import (
    Admin,
    ConfigOpt,
    IdentityOpt,
    InsecureOpt,
    ProxyOpt,
    check_format,
    err,
    out,
    print_data,
    run,
    table,
    with_admin,
)
from bastion.cli.mcp import mcp_app

pins_app = typer.Typer(
    help="Pinned tool definitions: what each tool of an app was when first seen or approved.",
    no_args_is_help=True,
)
mcp_app.add_typer(pins_app, name="pins")

ToolsArg = Annotated[list[str] | None, typer.Argument(help="Tool names (default: with --all, every one).")]
AllOpt = Annotated[bool, typer.Option("--all", help="Every tool of the app.")]


def _tools(tools: list[str] | None, every: bool) -> list[str] | None:
    if every and tools:
        raise typer.BadParameter("name tools or pass --all, not both")
    if not every and not tools:
        raise typer.BadParameter("name the tools, or pass --all")
    return None if every else list(tools or ())


@pins_app.command("ls")
def pins_ls(
    app: str,
    fmt: Annotated[str, typer.Option("--format", help="text, json or yaml.")] = "text",
    config: ConfigOpt = None,
    identity: IdentityOpt = None,
    proxy: ProxyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """List the pinned tools of APP: approved, waiting for approval, or changed since pinned."""
    check_format(fmt)

    async def go(admin: Admin) -> None:
        pins = await admin.mcp_pins(app)
        if fmt != "text":
            print_data(pins, fmt)
            return
        if not pins:
            err.print(f'No pins for app "{app}" (it does not pin, or no tool was listed yet).')
            return
        t = table("Tool", "State", "Pinned", "Served", "Approved By", "First Seen")
        for p in pins:
            served = p.get("changed", {}).get("fingerprint", "")
            t.add_row(
                p["tool"],
                p["state"],
                p["fingerprint"][:12],
                served[:12],
                p["approved_by"] or "-",
                p["first_seen"],
            )
        out.print(t)
        if any(p["state"] != "approved" for p in pins):
            out.print(
                f"Review with `bastion mcp pins diff {app}`, then `bastion mcp pins approve {app} TOOL`."
            )

    run(with_admin(go, config=config, identity=identity, proxy=proxy, insecure=insecure))


@pins_app.command("diff")
def pins_diff(
    app: str,
    tools: ToolsArg = None,
    config: ConfigOpt = None,
    identity: IdentityOpt = None,
    proxy: ProxyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Show how the served definitions of APP's changed tools differ from their pins (and what
    waiting tools would be approved as)."""

    async def go(admin: Admin) -> None:
        pins: list[dict[str, Any]] = await admin.mcp_pins(app)
        wanted = set(tools or ())
        shown = 0
        for p in pins:
            if wanted and p["tool"] not in wanted:
                continue
            if p["state"] == "changed":
                was, now = p["fingerprint"][:12], p["changed"]["fingerprint"][:12]
                out.print(f"tool {p['tool']}: changed ({was} -> {now})")
                for line in p["diff"]:
                    out.print(line, markup=False, highlight=False)
            elif p["state"] == "waiting":
                out.print(f"tool {p['tool']}: waiting for approval, as first seen:")
                out.print_json(data=p["definition"])
            else:
                continue
            shown += 1
        if not shown:
            err.print(f'No changed or waiting tool definitions on app "{app}".')

    run(with_admin(go, config=config, identity=identity, proxy=proxy, insecure=insecure))


def _change(action: str, app: str, tools: list[str] | None, every: bool, **conn: Any) -> None:
    names = _tools(tools, every)

    async def go(admin: Admin) -> None:
        done = await admin.mcp_pins_change(action, app, names)
        verb = "approved" if action == "approve" else "forgotten"
        if done:
            out.print(f'App "{app}": {verb}: {", ".join(done)}.')
        else:
            what = "changed or waiting" if action == "approve" else "pinned"
            err.print(f'App "{app}": no {what} definition among those tools; nothing done.')

    run(with_admin(go, **conn))


def _changer(action: str, doc: str) -> Callable[..., None]:
    def command(
        app: str,
        tools: ToolsArg = None,
        every: AllOpt = False,
        config: ConfigOpt = None,
        identity: IdentityOpt = None,
        proxy: ProxyOpt = None,
        insecure: InsecureOpt = False,
    ) -> None:
        _change(action, app, tools, every, config=config, identity=identity, proxy=proxy, insecure=insecure)

    command.__doc__ = doc
    return command


pins_app.command("approve")(
    _changer(
        "approve",
        """Approve the served (changed) or waiting definitions of TOOLS on APP: they become the
    pins, and the tools are listed and callable again.""",
    )
)
pins_app.command("reset")(
    _changer(
        "reset",
        """Forget the pins of TOOLS on APP: the next listing pins them again (pinning: approve:
    they wait for approval again).""",
    )
)
