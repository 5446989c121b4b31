"""``bastion mcp connect NAME``: an MCP app as a stdio server, for MCP clients to launch."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from bastion.cli._common import IdentityOpt, InsecureOpt, ProxyOpt, run
from bastion.cli.mcp import mcp_app


def _debug_enabled() -> bool:
    return os.environ.get("BASTION_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


@mcp_app.command("connect")
def connect(
    name: Annotated[str, typer.Argument(help="The MCP app to reach (see `bastion mcp ls`).")],
    header: Annotated[
        list[str] | None,
        typer.Option(
            "--header",
            "-H",
            help='Extra HTTP header for the app, "Name: value" (repeatable).',
        ),
    ] = None,
    identity: IdentityOpt = None,
    proxy: ProxyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Serve an MCP app on stdio, through the cluster, as you: the command for an MCP client's config.

    stdout carries only MCP messages; logs go to stderr (BASTION_DEBUG=1 for more).
    Reconnects by itself after a dropped connection or a new `bastion login`.
    """
    from bastion import log as logs
    from bastion.client.bridge import Credentials, parse_header, reserve_stdout, run_stdio
    from bastion.client.local_proxy import CredentialSource
    from bastion.errors import BastionError

    headers: list[tuple[str, str]] = []
    for text in header or []:
        try:
            headers.append(parse_header(text))
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--header") from None
    logs.setup("debug" if _debug_enabled() else "info", "text", "stderr")
    out_fd = reserve_stdout()

    async def go() -> int:
        creds = Credentials(CredentialSource(identity=identity, proxy=proxy))
        if not creds.proxy:
            raise BastionError("pass --proxy HOST:PORT with an identity file that names no proxy")
        return await run_stdio(name, creds, headers=headers, insecure=insecure, out_fd=out_fd)

    rc = run(go())
    if rc:
        raise typer.Exit(rc)
