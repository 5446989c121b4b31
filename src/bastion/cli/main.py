"""The ``bastion`` command line: assembles the command groups."""

from __future__ import annotations

import enum
from typing import Annotated, Any

import typer
from typer.core import TyperArgument, TyperOption

import bastion.cli.mcp_connect  # noqa: F401  (registers `bastion mcp connect`)
from bastion import __version__
from bastion.cli import admin, audit, auth, login, mcp, proxy, start
from bastion.cli._common import full_width_unless_terminal

app = typer.Typer(
    name="bastion",
    help="mcp-bastion: an identity-aware access gateway for MCP servers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        print(f"bastion {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit."),
    ] = False,
) -> None:
    """mcp-bastion: an identity-aware access gateway for MCP servers."""
    full_width_unless_terminal()


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
from bastion.cli import mcp_config  # noqa: E402, F401, I001  (registers `bastion mcp config`)
from bastion.cli import mcp_pins  # noqa: E402, F401  (registers `bastion mcp pins`)


@app.command("version")
def version() -> None:
    """Print the version."""
    print(f"bastion {__version__}")


class Shell(enum.StrEnum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"


@app.command("completion")
def completion(
    shell: Annotated[Shell, typer.Argument(metavar="bash|zsh|fish", help="The shell.")],
) -> None:
    """Print the shell completion script: e.g. `eval "$(bastion completion bash)"` in ~/.bashrc.

    For zsh, `eval "$(bastion completion zsh)"` after compinit; for fish,
    `bastion completion fish > ~/.config/fish/completions/bastion.fish`.
    """
    from typer._completion_shared import get_completion_script

    print(get_completion_script(prog_name="bastion", complete_var=COMPLETE_VAR, shell=shell.value))


#: The variable the completion scripts set when they ask `bastion` for completions.
COMPLETE_VAR = "_BASTION_COMPLETE"

#: What an option's value is, in help (``--since TIME``); others show their name in capitals.
PLACEHOLDERS = {
    "--config": "FILE",
    "--identity": "FILE",
    "--out": "FILE",
    "--output": "FILE",
    "--ca-file": "FILE",
    "--proxy": "HOST:PORT",
    "--proxy-listen": "HOST:PORT",
    "--auth-listen": "HOST:PORT",
    "--proxy-server": "HOST:PORT",
    "--format": "FORMAT",
    "--ttl": "DURATION",
    "--since": "TIME",
    "--until": "TIME",
    "--limit": "N",
    "--port": "PORT",
    "--user": "NAME",
    "--app": "NAME",
    "--roles": "ROLES",
    "--arg": "K=V",
    "--header": "'NAME: VALUE'",
    "--args-json": "JSON",
    "--data-dir": "DIR",
}


class _Argument(TyperArgument):
    """An argument shown as its name (``NAME``), without the ``<str>`` type tag typer adds."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None

    def _usage_display_name(self) -> str:
        name = self.display_name_raw
        name = name if self.required else f"[{name}]"
        return name + ("..." if self.nargs != 1 else "")


def plain_help(command: Any) -> Any:
    """Help without type tags: flags show nothing, options a placeholder, arguments their name."""
    # The help option is made on first use; made here, it is shown like the other flags.
    help_option = command.get_help_option(typer.Context(command))
    for param in [*command.params, *([help_option] if help_option is not None else [])]:
        if isinstance(param, TyperOption):
            if param.is_flag or param.count:
                param.metavar = ""
            elif param.metavar is None:
                long = max(param.opts, key=len)
                param.metavar = PLACEHOLDERS.get(long, long.lstrip("-").upper())
        elif isinstance(param, TyperArgument):
            if param.metavar is None:
                param.metavar = (param.name or "").upper()
            param.__class__ = _Argument
    for sub in getattr(command, "commands", {}).values():
        plain_help(sub)
    return command


def command() -> Any:
    """The click command ``bastion`` runs (typer's, with :func:`plain_help` applied)."""
    return plain_help(typer.main.get_command(app))


def main() -> None:
    command()(prog_name="bastion")


if __name__ == "__main__":
    main()
