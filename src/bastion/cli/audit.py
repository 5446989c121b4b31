"""``bastion audit search``, ``bastion audit verify``."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
import typer
from rich.table import Table

from bastion.cli._common import (
    Admin,
    ConfigOpt,
    IdentityOpt,
    InsecureOpt,
    ProxyOpt,
    check_format,
    out,
    print_data,
    run,
    table,
    with_admin,
)
from bastion.errors import BastionError

audit_app = typer.Typer(help="The audit log of MCP sessions.", no_args_is_help=True)


@audit_app.command("search")
def search(
    since: Annotated[
        str | None, typer.Option("--since", help="RFC 3339 time, or how long ago (1h, 30m).")
    ] = None,
    until: Annotated[str | None, typer.Option("--until", help="RFC 3339 time, or how long ago.")] = None,
    type_: Annotated[
        str | None, typer.Option("--type", help="Event types, comma-separated (mcp.session.request, ...).")
    ] = None,
    user: Annotated[str | None, typer.Option("--user", help="Only this user's events.")] = None,
    app: Annotated[str | None, typer.Option("--app", help="Only this app's events.")] = None,
    session: Annotated[str | None, typer.Option("--session", help="Only this session's events.")] = None,
    limit: Annotated[
        int,
        typer.Option("--limit", help="At most this many events: the newest (the oldest with --order=asc)."),
    ] = 1000,
    order: Annotated[
        str, typer.Option("--order", metavar="desc|asc", help="desc: newest first; asc: oldest first.")
    ] = "desc",
    fmt: Annotated[str, typer.Option("--format", help="text (a table), json or yaml.")] = "text",
    config: ConfigOpt = None,
    identity: IdentityOpt = None,
    proxy: ProxyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Search audit events, newest first (needs a role allowing list and read on `event`)."""
    check_format(fmt)
    if order not in ("asc", "desc"):
        raise typer.BadParameter(f'"{order}" is not asc or desc', param_hint="--order")
    params = {
        k: v
        for k, v in {
            "since": since,
            "until": until,
            "type": type_,
            "user": user,
            "app": app,
            "session": session,
            "limit": str(limit),
            "order": order,
        }.items()
        if v
    }

    async def go(admin: Admin) -> None:
        events = await admin.audit_search(params)
        if fmt != "text":
            print_data(events, fmt)
            return
        out.print(_table(events))

    run(with_admin(go, config=config, identity=identity, proxy=proxy, insecure=insecure))


def _table(events: list[dict[str, Any]]) -> Table:
    t = table("Time", "Event", "Code", "User", "App", "Method", "Tool", "Details")
    for e in events:
        details = e.get("error") or (orjson.dumps(e["params"]).decode() if e.get("params") else "")
        t.add_row(
            str(e.get("time", "")),
            e.get("event", ""),
            e.get("code", ""),
            e.get("user", ""),
            e.get("app", ""),
            e.get("method", ""),
            e.get("tool", ""),
            details,
        )
    return t


@audit_app.command("verify")
def verify(
    since: Annotated[
        str | None,
        typer.Option("--since", help="Check only what was written since (RFC 3339, or how long ago: 24h)."),
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="text, json or yaml.")] = "text",
    config: ConfigOpt = None,
    identity: IdentityOpt = None,
    proxy: ProxyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Check the audit log against its signed hash chain; exit 1 naming the first bad event.

    On the server host through the data directory (--config), running or not; elsewhere through
    the proxy (needs a role allowing list and read on `event`).
    """
    check_format(fmt)

    async def go(admin: Admin) -> dict[str, Any]:
        check = getattr(admin, "audit_verify", None)
        if check is None:
            raise BastionError("this client cannot verify the audit log")
        report: dict[str, Any] = await check(since)
        return report

    report = run(with_admin(go, config=config, identity=identity, proxy=proxy, insecure=insecure))
    if fmt != "text":
        print_data(report, fmt)
    breaks = report["breaks"]
    if fmt == "text":
        if breaks:
            first = breaks[0]
            out.print(f"first bad event: {first['event_id']}: {first['reason']}", markup=False)
            for b in breaks[1:20]:
                out.print(f"  also: {b['event_id']}: {b['reason']}", markup=False)
            if len(breaks) > 20:
                out.print(f"  ... {len(breaks) - 20} more", markup=False)
        else:
            note = []
            if report["unsealed_legacy_events"]:
                note.append(f"{report['unsealed_legacy_events']} written before seals existed, not checked")
            if report["journaled_not_yet_sealed"]:
                note.append(f"{report['journaled_not_yet_sealed']} journaled items not sealed yet")
            out.print(
                f"ok: {report['events']} events in {report['seals']} seals "
                f"({report['signed_seals']} signed)" + (f"; {'; '.join(note)}" if note else ""),
                markup=False,
            )
    if breaks:
        raise typer.Exit(1)
