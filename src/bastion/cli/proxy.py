"""``bastion proxy mcp``."""

from __future__ import annotations

from typing import Annotated

import typer

from bastion.cli._common import IdentityOpt, ProxyOpt, err, run

proxy_app = typer.Typer(
    help="Local listeners that carry your credential to the cluster.", no_args_is_help=True
)


@proxy_app.command("mcp")
def mcp(
    name: Annotated[str, typer.Argument(help="The MCP app to reach.")],
    port: Annotated[
        int, typer.Option("--port", "-p", help="Local port on 127.0.0.1 (0 = any free port).")
    ] = 0,
    identity: IdentityOpt = None,
    proxy: ProxyOpt = None,
) -> None:
    """Serve an MCP app as streamable HTTP on 127.0.0.1, authenticated as you.

    The app must be one you may use (`bastion mcp ls`): that is checked before listening.
    """
    import logging

    from bastion import log as logs
    from bastion.cli.mcp import fetch_apps
    from bastion.client.local_proxy import CredentialSource, serve
    from bastion.errors import NotFoundError

    logs.setup("info", "text", "stderr")
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # not its start-up chatter

    async def go() -> None:
        creds = CredentialSource(identity=identity, proxy=proxy)
        apps = await fetch_apps(identity=identity, proxy=proxy, insecure=False)
        if name not in {a["name"] for a in apps}:
            raise NotFoundError(
                f'no MCP app "{name}" that you may use at {creds.profile.proxy}: see `bastion mcp ls`'
            )

        def ready(p: int) -> None:
            print(f"Proxying connections to {name} on 127.0.0.1:{p}", flush=True)
            err.print(f"MCP endpoint: http://127.0.0.1:{p}/ (also /mcp). Press Ctrl-C to stop.")

        await serve(name, creds, port=port, ready=ready)

    run(go())
