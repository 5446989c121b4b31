"""``bastion auth sign`` and ``bastion auth export``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bastion._time import parse_duration
from bastion.auth.ca import fingerprint
from bastion.cli._common import (
    Admin,
    ConfigOpt,
    IdentityOpt,
    InsecureOpt,
    ProxyOpt,
    out,
    run,
    with_admin,
)
from bastion.client.profile import Profile, write_private

auth_app = typer.Typer(help="Credentials for machines, and the cluster CA.", no_args_is_help=True)


@auth_app.command("sign")
def sign(
    user: Annotated[str, typer.Option("--user", help="Whose credential.")],
    ttl: Annotated[str, typer.Option("--ttl", help="Lifetime, e.g. 1h (capped by the user's roles).")] = "1h",
    output: Annotated[
        Path | None, typer.Option("--out", "-o", help="Identity file to write (mode 0600).")
    ] = None,
    fmt: Annotated[
        str,
        typer.Option("--format", help="identity (a file for -i) or token (print a bearer token)."),
    ] = "identity",
    config: ConfigOpt = None,
    identity: IdentityOpt = None,
    proxy: ProxyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Issue a credential for a user: an identity file for machines, or a bearer token."""
    try:
        ttl_d = parse_duration(ttl)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--ttl") from None
    if fmt not in ("identity", "token"):
        raise typer.BadParameter("use identity or token", param_hint="--format")
    if fmt == "identity" and output is None:
        raise typer.BadParameter("an identity file needs --out FILE", param_hint="--out")

    async def go(admin: Admin) -> None:
        res: dict[str, Any] = await admin.sign(user, ttl_d)
        if fmt == "token":
            if output is not None:
                write_private(output, res["token"] + "\n")
                out.print(f"Wrote a bearer token for {user} to {output} (expires {res['expires']}).")
            else:
                print(res["token"])
            return
        assert output is not None
        prof = Profile(
            proxy=admin.proxy_addr,
            user=res["user"],
            cluster_name=admin.cluster_name,
            token=res["token"],
            expires=res["expires"],
            ca_pem=await admin.ca_pem(),
            kind="identity",
        )
        write_private(output, prof.to_yaml())
        out.print(f"Wrote an identity file for {user} to {output} (expires {res['expires']}).")
        out.print(f"Use it with: bastion status -i {output} --proxy={admin.proxy_addr}")

    run(with_admin(go, config=config, identity=identity, proxy=proxy, insecure=insecure))


@auth_app.command("export")
def export(
    type_: Annotated[
        str, typer.Option("--type", help="tls: the CA certificate clients trust the proxy with.")
    ] = "tls",
    show_fingerprint: Annotated[
        bool, typer.Option("--fingerprint", help="Print only its SHA-256 fingerprint.")
    ] = False,
    config: ConfigOpt = None,
    identity: IdentityOpt = None,
    proxy: ProxyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Print the cluster's CA certificate (public; never a private key)."""
    if type_ != "tls":
        raise typer.BadParameter("only tls is supported", param_hint="--type")

    async def go(admin: Admin) -> None:
        pem = await admin.ca_pem()
        print(
            fingerprint(pem.encode()) if show_fingerprint else pem,
            end="" if not show_fingerprint else "\n",
        )

    run(with_admin(go, config=config, identity=identity, proxy=proxy, insecure=insecure))
