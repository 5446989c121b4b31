"""The ``bastion`` command line: assembles the command groups."""

from __future__ import annotations

import typer

import bastion.cli.mcp_connect  # noqa: F401  (registers `bastion mcp connect`)
from bastion import __version__
from bastion.cli import admin, audit, auth, login, mcp, proxy, start

app = typer.Typer(
    name="bastion",
    help="mcp-bastion: an identity-aware access gateway for MCP servers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("start")(start.start)
app.command("configure")(start.configure)
app.command("login")(login.login)
app.command("logout")(login.logout)
app.command("status")(login.status)
app.command("create")(admin.create)
app.command("get")(admin.get)
app.command("rm")(admin.rm)
admin.users_app.command("set-password")(login.set_password)
app.add_typer(admin.users_app, name="users")
app.add_typer(admin.tokens_app, name="tokens")
app.add_typer(auth.auth_app, name="auth")
app.add_typer(audit.audit_app, name="audit")
app.add_typer(proxy.proxy_app, name="proxy")
app.add_typer(mcp.mcp_app, name="mcp")
from bastion.cli import mcp_config  # noqa: E402, F401  (registers `bastion mcp config`)


@app.command("version")
def version() -> None:
    """Print the version."""
    print(f"bastion {__version__}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
