"""``bastion login``, ``logout``, ``status`` and ``users set-password``: the first contact with a proxy."""

from __future__ import annotations

import asyncio
import getpass
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from bastion._time import format_duration, parse_duration, utcnow
from bastion.auth import passwords
from bastion.auth.ca import fingerprint
from bastion.cli._common import (
    IdentityOpt,
    InsecureOpt,
    ProxyOpt,
    client_for,
    err,
    fail,
    is_tty,
    out,
    run,
)
from bastion.client import profile as profiles
from bastion.client.api import ApiClient, Trust, UntrustedProxyError, fetch_ca_unverified
from bastion.errors import AuthenticationError, BastionError, SecondFactorRequiredError, ValidationError

CAFingerprintOpt = Annotated[
    str | None,
    typer.Option(
        "--ca-fingerprint",
        help="Expected cluster CA fingerprint (SHA256:...), to pin it without a prompt.",
    ),
]
CAFileOpt = Annotated[
    Path | None,
    typer.Option("--ca-file", help="Cluster CA certificate (from `bastion auth export --type=tls`)."),
]


async def resolve_trust(
    proxy: str, *, ca_fingerprint: str | None, ca_file: Path | None, insecure: bool
) -> Trust:
    """What to accept from ``proxy``: the system trust store and a cluster CA (decision 0027).

    ``--ca-file`` or ``--ca-fingerprint`` name the cluster CA to pin, whatever was pinned before.
    Otherwise the CA pinned by an earlier login is used; on first contact, a proxy whose
    certificate the system trusts gives its cluster CA over that verified connection (pinned
    without a prompt), and any other shows the CA's fingerprint and has it pinned only when the
    user confirms it (or passed the expected one): trust on first use, never silently.
    """
    pin_file = str(profiles.ca_pin_path(proxy))
    if insecure:
        err.print(
            "[yellow]warning:[/yellow] --insecure: the proxy's identity is NOT verified",
            markup=True,
        )
        return Trust(insecure=True)
    if ca_file is not None:
        try:
            return Trust(ca_file.read_text(), pinned_in=str(ca_file))
        except OSError as e:
            raise ValidationError(f"cannot read {ca_file}: {e.strerror}") from None
    pinned = profiles.pinned_ca(proxy)
    if pinned and not ca_fingerprint:
        return Trust(pinned, pinned_in=pin_file)
    if not ca_fingerprint:
        probe = ApiClient(proxy, trust=Trust())
        try:
            ca = await probe.get("/v1/webapi/ca")
            # A certificate the system trusts: the CA it vouches for needs no prompt.
            return Trust(ca.decode() if isinstance(ca, bytes) else str(ca), pinned_in=pin_file)
        except UntrustedProxyError:
            pass
        finally:
            await probe.close()
    ca_pem = await fetch_ca_unverified(proxy)
    fp = fingerprint(ca_pem.encode())
    if ca_fingerprint:
        if ca_fingerprint.strip() != fp:
            raise AuthenticationError(
                f"the proxy {proxy} presents cluster CA {fp}, not the expected {ca_fingerprint}: "
                "refusing to connect (someone may be intercepting the connection)"
            )
    elif is_tty():
        err.print(f"The cluster at {proxy} presents a CA with fingerprint\n  {fp}")
        err.print("Compare it with `bastion auth export --type=tls --fingerprint` on the server.")
        if not typer.confirm("Trust this cluster?", default=False, err=True):
            raise AuthenticationError("cluster CA not trusted; nothing was saved")
    else:
        raise AuthenticationError(
            f"first contact with {proxy}: its cluster CA ({fp}) is not pinned yet. Check the fingerprint "
            "with `bastion auth export --type=tls --fingerprint` on the server, then pass "
            "--ca-fingerprint=SHA256:..., or --ca-file FILE"
        )
    return Trust(ca_pem, pinned_in=pin_file)


def pin(proxy: str, trust: Trust) -> None:
    """Pin ``trust``'s CA for ``proxy`` (after a successful login); say so if it replaces another."""
    if not trust.ca_pem:
        return
    before = profiles.pin_ca(proxy, trust.ca_pem)
    if before:
        err.print(
            f"Re-pinned the cluster CA for {proxy}: {fingerprint(trust.ca_pem.encode())} replaces "
            f"{fingerprint(before.encode())} in {profiles.ca_pin_path(proxy)}"
        )


def _read_password(password_stdin: bool, prompt: str, *, confirm: bool = False) -> str:
    if password_stdin:
        line = sys.stdin.readline()
        if not line:
            raise ValidationError("--password-stdin: nothing on standard input")
        return line.rstrip("\r\n")
    if not is_tty():
        raise ValidationError("no terminal to prompt for a password: use --password-stdin")
    pw = getpass.getpass(prompt)
    if confirm and getpass.getpass("Repeat the password: ") != pw:
        raise ValidationError("the passwords do not match")
    return pw


def login(
    proxy: Annotated[str, typer.Option("--proxy", envvar="BASTION_PROXY", help="Proxy address HOST:PORT.")],
    user: Annotated[str | None, typer.Option("--user", help="User name (default: your login name).")] = None,
    ttl: Annotated[
        str | None,
        typer.Option("--ttl", help="Credential lifetime, e.g. 8h (capped by your roles)."),
    ] = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from stdin.")
    ] = False,
    otp: Annotated[str | None, typer.Option("--otp", help="One-time code from your TOTP app.")] = None,
    ca_fingerprint: CAFingerprintOpt = None,
    ca_file: CAFileOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Log in to a cluster and keep a short-lived credential in ~/.bastion."""
    username = user or getpass.getuser()
    ttl_s: float | None = None
    if ttl:
        try:
            ttl_s = parse_duration(ttl).total_seconds()
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--ttl") from None

    async def go() -> None:
        trust = await resolve_trust(proxy, ca_fingerprint=ca_fingerprint, ca_file=ca_file, insecure=insecure)
        client = ApiClient(proxy, trust=trust)
        try:
            password = _read_password(password_stdin, f"Enter password for {username}: ")
            body: dict[str, Any] = {"user": username, "password": password, "otp": otp or ""}
            if ttl_s:
                body["ttl_seconds"] = ttl_s
            try:
                res = await client.post("/v1/webapi/login", body)
            except SecondFactorRequiredError:
                if otp or not is_tty():
                    raise
                body["otp"] = typer.prompt("Enter your one-time code", err=True)
                res = await client.post("/v1/webapi/login", body)
        finally:
            await client.close()
        prof = profiles.Profile(
            proxy=proxy,
            user=res["user"],
            cluster_name=res["cluster_name"],
            token=res["token"],
            expires=res["expires"],
            ca_pem=trust.ca_pem,
            insecure=insecure,
        )
        profiles.save(prof)
        pin(proxy, trust)
        _print_status(prof, res.get("roles", []))

    run(go())


def _print_status(prof: profiles.Profile, roles: list[str]) -> None:
    left = prof.expires_at - utcnow()
    valid = f"valid for {format_duration(left)}" if left.total_seconds() > 0 else "EXPIRED"
    out.print(f"> Profile URL:  https://{prof.proxy}")
    out.print(f"  Logged in as: {prof.user}")
    out.print(f"  Cluster:      {prof.cluster_name}")
    out.print(f"  Roles:        {', '.join(roles) or '(none)'}")
    out.print(f"  Valid until:  {prof.expires_at:%Y-%m-%d %H:%M:%S} UTC [{valid}]")


def status(identity: IdentityOpt = None, proxy: ProxyOpt = None, insecure: InsecureOpt = False) -> None:
    """Show who you are logged in as, your roles and when the credential expires."""

    async def go() -> None:
        client, prof = client_for(identity=identity, proxy=proxy, insecure=insecure)
        try:
            me = await client.get("/v1/whoami")
        finally:
            await client.close()
        _print_status(prof, me.get("roles", []))

    run(go())


def logout(proxy: ProxyOpt = None, insecure: InsecureOpt = False) -> None:
    """Revoke the credential of the current (or the named) profile at the proxy, and remove it.

    With --proxy, the cluster CA pinned for that proxy is forgotten too.
    """
    prof = profiles.load_current(proxy)
    forgot = profiles.forget_ca(proxy) if proxy else None
    said = f"Forgot the cluster CA pinned for {proxy} ({forgot})." if forgot else ""
    if prof is None:
        out.print("Not logged in.")
        if said:
            out.print(said)
        return
    problem = ""
    if not prof.is_expired(utcnow()):
        problem = _revoke(prof, insecure=insecure)
    profiles.remove(prof.proxy)
    if problem:
        if said:
            out.print(said)
        # The local copy is gone, but the credential would still work if someone copied it.
        raise fail(
            f"Removed the local credential of {prof.user}, but the proxy could not revoke it "
            f"({problem}): it stays valid until {prof.expires}."
        )
    out.print(f"Logged out {prof.user} from {prof.proxy}.")
    if said:
        out.print(said)


def _revoke(prof: profiles.Profile, *, insecure: bool) -> str:
    """Ask the proxy to revoke ``prof``'s credential; "" when done, else what went wrong."""

    async def go() -> None:
        client = ApiClient(prof.proxy, trust=prof.trust(insecure=insecure), token=prof.token)
        try:
            await client.post("/v1/auth/logout", {})
        finally:
            await client.close()

    try:
        asyncio.run(go())
    except AuthenticationError:
        return ""  # the proxy no longer accepts it: nothing left to revoke
    except BastionError as e:
        return e.message
    return ""


def set_password(
    invite: Annotated[
        str, typer.Option("--invite", help="The one-time invite code from your administrator.")
    ],
    proxy: Annotated[str, typer.Option("--proxy", envvar="BASTION_PROXY", help="Proxy address HOST:PORT.")],
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from stdin.")
    ] = False,
    totp: Annotated[bool, typer.Option("--totp", help="Register a TOTP app as a second factor.")] = False,
    totp_secret: Annotated[
        str | None, typer.Option("--totp-secret", help="Use this base32 TOTP secret (scripts).")
    ] = None,
    otp: Annotated[str | None, typer.Option("--otp", help="Current code of the TOTP secret.")] = None,
    ca_fingerprint: CAFingerprintOpt = None,
    ca_file: CAFileOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Set your password with a one-time invite (and optionally register TOTP)."""

    async def go() -> None:
        trust = await resolve_trust(proxy, ca_fingerprint=ca_fingerprint, ca_file=ca_file, insecure=insecure)
        client = ApiClient(proxy, trust=trust)
        try:
            info = await client.post("/v1/webapi/invites/info", {"code": invite})
            user = info["user"]
            secret = ""
            if totp or totp_secret or info["second_factor"] == "on":
                if info["second_factor"] == "off":
                    raise ValidationError("this cluster has second factors turned off")
                secret = totp_secret or passwords.new_totp_secret()
                if not totp_secret:
                    cluster = (await client.get("/v1/webapi/find"))["cluster_name"]
                    err.print("Add this account to your authenticator app:")
                    err.print(f"  {passwords.totp_uri(secret, user=user, cluster=cluster)}")
                    err.print(f"  (secret: {secret})")
            code = otp or ""
            if secret and not code:
                if not is_tty():
                    raise ValidationError("pass --otp with the current code of the TOTP secret")
                code = typer.prompt("Enter the code your app shows", err=True)
            password = _read_password(password_stdin, f"New password for {user}: ", confirm=True)
            await client.post(
                "/v1/webapi/invites/accept",
                {"code": invite, "password": password, "totp_secret": secret, "otp": code},
            )
        finally:
            await client.close()
        pin(proxy, trust)
        out.print(f"Password set for {user}. Log in with:\n  bastion login --proxy={proxy} --user={user}")

    run(go())


__all__ = ["fail", "login", "logout", "set_password", "status"]
