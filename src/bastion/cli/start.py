"""``bastion start`` and ``bastion configure``."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated

import typer

from bastion import log as logs
from bastion.appservice.hostcheck import Host, check_static_apps
from bastion.cli._common import err, fail, out, run
from bastion.config import load_config
from bastion.config_template import render_starter
from bastion.errors import ConfigError


def start(
    config: Annotated[
        Path, typer.Option("--config", "-c", envvar="BASTION_CONFIG", help="Configuration file.")
    ],
) -> None:
    """Run the services the configuration enables, in the foreground."""
    try:
        cfg = load_config(config)
        if cfg.app_service.enabled:
            check_static_apps(cfg.app_service, Host.this())  # before anything listens
    except ConfigError as e:
        err.print(f"[red]error:[/red] invalid configuration {config}:", markup=True)
        err.print(e.message, markup=False)
        raise typer.Exit(2) from None
    lc = cfg.bastion.log
    logs.setup(lc.severity, lc.format, lc.output)
    from bastion.service import serve

    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        pass
    run(serve(cfg))


def configure(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the file.")],
    cluster_name: Annotated[str, typer.Option("--cluster-name", help="Cluster name.")] = "",
    data_dir: Annotated[str, typer.Option("--data-dir", help="Data directory.")] = "/var/lib/bastion",
    proxy_listen: Annotated[
        str, typer.Option("--proxy-listen", help="Proxy listen address.")
    ] = "127.0.0.1:3080",
    auth_listen: Annotated[
        str, typer.Option("--auth-listen", help="Auth listen address.")
    ] = "127.0.0.1:3025",
    roles: Annotated[
        str, typer.Option("--roles", help="Services to enable: auth,proxy,app.")
    ] = "auth,proxy,app",
    demo_server: Annotated[
        bool, typer.Option("--demo-server", help="Serve the built-in demo MCP server.")
    ] = False,
    proxy_server: Annotated[
        str, typer.Option("--proxy-server", help="Proxy HOST:PORT (app service alone).")
    ] = "",
    token: Annotated[
        str, typer.Option("--token", help="Join token or a file holding it (app service alone).")
    ] = "",
    apps: Annotated[
        list[str] | None, typer.Option("--app", help="NAME=URI of an MCP server (repeatable).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented starter configuration file."""
    role_set = {r.strip() for r in roles.split(",") if r.strip()}
    unknown = role_set - {"auth", "proxy", "app"}
    if unknown or not role_set:
        raise typer.BadParameter(
            f"unknown services {sorted(unknown)} (use auth, proxy, app)", param_hint="--roles"
        )
    app_pairs: list[tuple[str, str]] = []
    for a in apps or []:
        name, sep, uri = a.partition("=")
        if not sep:
            raise typer.BadParameter(f'"{a}" is not NAME=URI', param_hint="--app")
        app_pairs.append((name.strip(), uri.strip()))
    if output.exists() and not force:
        raise fail(f"{output} exists; pass --force to overwrite it")
    text = render_starter(
        cluster_name=cluster_name or socket.gethostname(),
        data_dir=data_dir,
        proxy_listen=proxy_listen,
        auth_listen=auth_listen,
        roles=role_set,
        demo_server=demo_server,
        proxy_server=proxy_server,
        join_token=token,
        apps=app_pairs,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    try:
        written = load_config(output)
    except ConfigError as e:
        raise fail(f"the written file does not validate: {e.message}") from None
    try:  # the file may be meant for another host: a warning, not a failure
        check_static_apps(written.app_service, Host.this())
    except ConfigError as e:
        why = e.message.replace("[", r"\[")
        err.print(f"[yellow]warning:[/yellow] bastion start on this host would refuse it: {why}")
    out.print(f"Wrote {output}. Start the cluster with:\n  bastion start --config {output}")
