"""``bastion mcp ls`` (and the group other ``bastion mcp`` commands join)."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
import typer

from bastion.cli._common import (
    IdentityOpt,
    InsecureOpt,
    ProxyOpt,
    check_format,
    client_for,
    err,
    out,
    print_data,
    run,
    table,
)

mcp_app = typer.Typer(help="Use MCP servers through the cluster.", no_args_is_help=True)

NO_TOOLS_WARNING = (
    "[!] Warning: you may not call any tool on the MCP servers marked [!]. Ask your cluster "
    "administrator for a role whose allow.mcp.tools covers the tools you need "
    "(see `bastion get roles`)."
)


async def fetch_apps(*, identity: Any, proxy: str | None, insecure: bool) -> list[dict[str, Any]]:
    """The MCP apps the logged-in user may reach, with their tool permissions, sorted by name."""
    client, _ = client_for(identity=identity, proxy=proxy, insecure=insecure)
    try:
        apps = list(await client.get("/v1/mcp/apps"))
    finally:
        await client.close()
    return sorted(apps, key=lambda a: a["name"])


def match_labels(app: dict[str, Any], selector: dict[str, str]) -> bool:
    labels = app.get("labels", {})
    return all(labels.get(k) == v for k, v in selector.items())


def parse_labels(text: str | None) -> dict[str, str]:
    out_: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        k, sep, v = part.partition("=")
        if not sep:
            raise typer.BadParameter(f'"{part}" is not key=value', param_hint="labels")
        out_[k.strip()] = v.strip()
    return out_


def tools_text(app: dict[str, Any]) -> str:
    tools = app["permissions"]["mcp"]["tools"]
    allowed, denied = tools["allowed"], tools["denied"]
    if not allowed:
        return "(none) [!]"
    text = "[" + ", ".join(allowed) + "]"
    if denied:
        text += " except: [" + ", ".join(denied) + "]"
    return text


@mcp_app.command("ls")
def ls(
    labels: Annotated[str | None, typer.Argument(help="Only apps with these labels: k=v,k2=v2.")] = None,
    search: Annotated[
        str | None,
        typer.Option("--search", help="Only apps whose name, description or labels contain these words."),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Also show command, args and denied tools.")
    ] = False,
    fmt: Annotated[str, typer.Option("--format", help="text, json or yaml.")] = "text",
    identity: IdentityOpt = None,
    proxy: ProxyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """List the MCP servers you may use, with their transport and the tools you may call."""
    check_format(fmt)
    selector = parse_labels(labels)
    words = [w.lower() for w in (search or "").replace(",", " ").split() if w]

    async def go() -> None:
        apps = [
            a
            for a in await fetch_apps(identity=identity, proxy=proxy, insecure=insecure)
            if match_labels(a, selector)
        ]
        if words:

            def haystack(a: dict[str, Any]) -> str:
                return " ".join(
                    [a["name"], a.get("description", ""), *(f"{k}={v}" for k, v in a["labels"].items())]
                ).lower()

            apps = [a for a in apps if all(w in haystack(a) for w in words)]
        if fmt != "text":
            print_data(apps, fmt)
            return
        if not apps:
            err.print("No MCP servers found (none match, or your roles' app_labels match none).")
            return
        cols = ["Name", "Description", "Type", "Allowed Tools", "Labels"]
        if verbose:
            cols = [
                "Name",
                "Description",
                "Type",
                "Labels",
                "Command",
                "Args",
                "Allowed Tools",
                "Denied Tools",
            ]
        t = table(*cols)
        for a in apps:
            labels_text = ",".join(
                f"{k}={v}" for k, v in sorted(a["labels"].items()) if not k.startswith("bastion.internal/")
            )
            if verbose:
                t.add_row(
                    a["name"],
                    a["description"],
                    a["type"],
                    labels_text,
                    a["command"],
                    " ".join(a["args"]),
                    tools_text(a),
                    ", ".join(a["permissions"]["mcp"]["tools"]["denied"]),
                )
            else:
                t.add_row(a["name"], a["description"], a["type"], tools_text(a), labels_text)
        out.print(t)
        if any(not a["permissions"]["mcp"]["tools"]["allowed"] for a in apps):
            out.print()
            out.print(NO_TOOLS_WARNING)

    run(go())


def _client(name: str, *, identity: Any, proxy: str | None, insecure: bool) -> Any:
    from bastion.client.mcp_client import MCPClient

    api, prof = client_for(identity=identity, proxy=proxy, insecure=insecure)
    del api  # only its checks (logged in, not expired) were wanted
    return MCPClient(
        proxy=prof.proxy,
        app=name,
        token=prof.token,
        trust=prof.trust(insecure=insecure),
        on_slow_start=lambda message: err.print(message, markup=False),
    )


@mcp_app.command("tools")
def tools(
    name: Annotated[str, typer.Argument(help="The MCP server.")],
    fmt: Annotated[str, typer.Option("--format", help="text (a table), json or yaml.")] = "text",
    identity: IdentityOpt = None,
    proxy: ProxyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """List the tools of an MCP server that you may call, with their descriptions."""
    check_format(fmt)

    async def go() -> None:
        async with _client(name, identity=identity, proxy=proxy, insecure=insecure) as c:
            listed = await c.list_tools()
        if fmt != "text":
            print_data(listed, fmt)
            return
        if not listed:
            err.print(
                f"You may not call any tool on {name}. " + NO_TOOLS_WARNING.removeprefix("[!] Warning: ")
            )
            return
        t = table("Tool", "Description")
        for tool in listed:
            t.add_row(str(tool.get("name")), str(tool.get("description") or "").strip().split("\n")[0])
        out.print(t)

    run(go())


@mcp_app.command("call")
def call(
    name: Annotated[str, typer.Argument(help="The MCP server.")],
    tool: Annotated[str, typer.Argument(help="The tool to call.")],
    arg: Annotated[
        list[str] | None, typer.Option("--arg", help="k=v (repeatable; v parsed as JSON when it can be).")
    ] = None,
    args_json: Annotated[
        str | None, typer.Option("--args-json", help="All arguments as one JSON object.")
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="text (the content), json or yaml (the whole result).")
    ] = "text",
    identity: IdentityOpt = None,
    proxy: ProxyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Call a tool of an MCP server from the terminal."""
    check_format(fmt)
    arguments: dict[str, Any] = {}
    if args_json:
        try:
            parsed = orjson.loads(args_json)
        except orjson.JSONDecodeError as e:
            raise typer.BadParameter(f"not valid JSON: {e}", param_hint="--args-json") from None
        if not isinstance(parsed, dict):
            raise typer.BadParameter("must be a JSON object", param_hint="--args-json")
        arguments.update(parsed)
    for item in arg or []:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise typer.BadParameter(f'"{item}" is not k=v', param_hint="--arg")
        try:
            arguments[k] = orjson.loads(v)
        except orjson.JSONDecodeError:
            arguments[k] = v

    async def go() -> None:
        async with _client(name, identity=identity, proxy=proxy, insecure=insecure) as c:
            result = await c.request("tools/call", {"name": tool, "arguments": arguments})
        if fmt != "text":
            print_data(result, fmt)
            return
        for item in result.get("content") or []:
            if item.get("type") == "text":
                print(item.get("text", ""))
            else:
                print(orjson.dumps(item).decode())
        if result.get("isError"):
            raise typer.Exit(1)

    run(go())
