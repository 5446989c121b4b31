"""Shared CLI plumbing: connection options, the async runner, error printing, output."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, Protocol, TypeVar

import orjson
import typer
import yaml
from rich.console import Console
from rich.table import Table

from bastion._time import utcnow
from bastion.client import profile as profiles
from bastion.client.api import ApiClient, RemoteAdmin
from bastion.errors import AuthenticationError, BastionError, ConfigError

out = Console(highlight=False, soft_wrap=True, markup=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)

#: The width of output that is not a terminal (a pipe, a file): wide enough never to cut a line.
UNLIMITED_WIDTH = 1_000_000


def full_width_unless_terminal() -> None:
    """Tables fit a terminal; piped or redirected, they are never cut (``| cat``, ``| grep``)."""
    if not out.is_terminal:
        out.width = UNLIMITED_WIDTH


def table(*columns: str) -> Table:
    """A table of plain columns whose long cells wrap (on a terminal) and are never cut."""
    t = Table(box=None, header_style="bold", pad_edge=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    return t


def check_format(fmt: str, allowed: tuple[str, ...] = ("text", "yaml", "json")) -> str:
    """``fmt`` if it is one of ``allowed``, else a usage error naming them."""
    if fmt not in allowed:
        raise typer.BadParameter(f'"{fmt}" is not one of {", ".join(allowed)}', param_hint="--format")
    return fmt


def print_data(data: Any, fmt: str) -> None:
    """``data`` as JSON (indented) or YAML on stdout."""
    if fmt == "json":
        print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
    else:
        print(yaml.safe_dump(data, sort_keys=False), end="")


DEFAULT_CONFIG = Path("/etc/bastion.yaml")

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        envvar="BASTION_CONFIG",
        help="Work on the cluster's data directly, on the server host (its config file).",
    ),
]
IdentityOpt = Annotated[
    Path | None, typer.Option("--identity", "-i", help="Identity file (from `bastion auth sign`).")
]
ProxyOpt = Annotated[
    str | None, typer.Option("--proxy", envvar="BASTION_PROXY", help="Proxy address HOST:PORT.")
]
InsecureOpt = Annotated[
    bool,
    typer.Option("--insecure", help="Do not verify the proxy's certificate (development only)."),
]
FormatOpt = Annotated[str, typer.Option("--format", help="Output format: text, yaml or json.")]

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro``; print a ``BastionError`` as a one-line error and exit 1 (2 for config)."""
    try:
        return asyncio.run(coro)
    except ConfigError as e:
        err.print(f"[red]error:[/red] {e.message}", markup=True)
        raise typer.Exit(2) from None
    except BastionError as e:
        err.print(f"[red]error:[/red] {_escape(e.message)}", markup=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {_escape(message)}", markup=True)
    return typer.Exit(code)


def _escape(text: str) -> str:
    return text.replace("[", r"\[")


class Admin(Protocol):
    """What the admin commands need, whether local (data dir) or remote (through the proxy)."""

    cluster_name: str
    proxy_addr: str

    async def close(self) -> None: ...
    async def whoami(self) -> dict[str, Any]: ...
    async def get(self, kind: str, name: str) -> dict[str, Any]: ...
    async def ls(self, kind: str) -> list[dict[str, Any]]: ...
    async def create(self, doc: dict[str, Any], *, overwrite: bool) -> dict[str, Any]: ...
    async def delete(self, kind: str, name: str) -> None: ...
    async def add_user(self, name: str, roles: list[str], traits: dict[str, list[str]]) -> dict[str, Any]: ...
    async def update_user(
        self, name: str, *, roles: list[str] | None, traits: dict[str, list[str]] | None
    ) -> dict[str, Any]: ...
    async def reset_user(self, name: str) -> dict[str, Any]: ...
    async def user_locks(self) -> dict[str, dict[str, Any]]: ...
    async def unlock_user(self, name: str) -> dict[str, Any]: ...
    async def add_token(
        self,
        roles: list[str],
        ttl: Any,
        *,
        apps: list[str] | None = None,
        labels: dict[str, list[str]] | None = None,
    ) -> dict[str, Any]: ...
    async def sign(self, user: str, ttl: Any) -> dict[str, Any]: ...
    async def ca_pem(self) -> str: ...
    async def audit_search(self, params: dict[str, str]) -> list[dict[str, Any]]: ...
    async def mcp_pins(self, app: str) -> list[dict[str, Any]]: ...
    async def mcp_pins_change(self, action: str, app: str, tools: list[str] | None) -> list[str]: ...


def client_for(
    *, identity: Path | None, proxy: str | None, insecure: bool
) -> tuple[ApiClient, profiles.Profile]:
    """An authenticated API client from an identity file or the login profile."""
    if identity is not None:
        prof = profiles.load_identity(str(identity))
        prof.proxy = proxy or prof.proxy
        if not prof.proxy:
            raise BastionError("pass --proxy HOST:PORT with an identity file that names no proxy")
    else:
        found = profiles.load_current(proxy)
        if found is None:
            where = f" for {proxy}" if proxy else ""
            raise AuthenticationError(
                f"not logged in{where}: run `bastion login --proxy=HOST:PORT --user=NAME`"
            )
        prof = found
    if prof.is_expired(utcnow()):
        raise AuthenticationError(
            f"your credential for {prof.proxy} expired at {prof.expires}; log in again with `bastion login`"
        )
    client = ApiClient(prof.proxy, trust=prof.trust(insecure=insecure), token=prof.token)
    return client, prof


async def connect_admin(
    *, config: Path | None, identity: Path | None, proxy: str | None, insecure: bool
) -> Admin:
    """Local access through the data dir when a config is named, else the user's credential."""
    if config is None and identity is None and proxy is None and profiles.load_current() is None:
        if DEFAULT_CONFIG.exists():
            config = DEFAULT_CONFIG
        else:
            raise AuthenticationError(
                "no cluster to talk to: on the server host pass --config FILE (or set "
                "BASTION_CONFIG); elsewhere log in first with `bastion login --proxy=HOST:PORT --user=NAME`"
            )
    if config is not None and identity is None and proxy is None:
        from bastion.client.local import LocalAdmin

        return await LocalAdmin.open(config)
    client, prof = client_for(identity=identity, proxy=proxy, insecure=insecure)
    return RemoteAdmin(client, prof.cluster_name)


async def with_admin(
    fn: Callable[[Admin], Awaitable[T]],
    *,
    config: Path | None,
    identity: Path | None,
    proxy: str | None,
    insecure: bool,
) -> T:
    admin = await connect_admin(config=config, identity=identity, proxy=proxy, insecure=insecure)
    try:
        return await fn(admin)
    finally:
        await admin.close()


def is_tty() -> bool:
    return sys.stdin.isatty() and os.environ.get("BASTION_NONINTERACTIVE") != "1"
