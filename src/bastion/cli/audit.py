"""``bastion audit search``, ``bastion audit tail``, ``bastion audit verify``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
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
from bastion.client import auditread
from bastion.errors import BastionError

audit_app = typer.Typer(help="The audit log of MCP sessions.", no_args_is_help=True)

#: ``tail -f``: seconds between two reads of the feed once caught up.
POLL_SECONDS = 0.5
#: ``tail -f``: a forwarded call is held back this long for its outcome (decision 0034).
HOLD_MS = 2000
#: Events asked of the feed at a time.
FEED_PAGE = 500


def _reader(admin: Admin) -> Any:
    reader = getattr(admin, "audit_reader", None)
    if reader is None:
        raise BastionError("this client cannot read the audit log")
    return reader()


def _write_lines(events: list[dict[str, Any]]) -> None:
    """Events as JSON lines on stdout, flushed (a pipe or a log shipper sees each page at once)."""
    if events:
        sys.stdout.buffer.write(b"".join(orjson.dumps(e) + b"\n" for e in events))
        sys.stdout.buffer.flush()


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
    tool: Annotated[str | None, typer.Option("--tool", help="Only calls of this tool.")] = None,
    outcome: Annotated[
        str | None,
        typer.Option(
            "--outcome",
            metavar="success|failure",
            help="Only events that succeeded, or failed (a call with no outcome recorded yet counts as "
            "a success, as its code reads).",
        ),
    ] = None,
    session: Annotated[str | None, typer.Option("--session", help="Only this session's events.")] = None,
    limit: Annotated[
        int,
        typer.Option(
            "--limit",
            help="At most this many events: the newest (the oldest with --order=asc); 0: all of them.",
        ),
    ] = 1000,
    all_: Annotated[
        bool, typer.Option("--all", help="Every matching event (--limit 0), streamed as JSON lines.")
    ] = False,
    order: Annotated[
        str, typer.Option("--order", metavar="desc|asc", help="desc: newest first; asc: oldest first.")
    ] = "desc",
    fmt: Annotated[
        str | None,
        typer.Option("--format", help="text (a table), json, yaml or jsonl (one event per line, streamed)."),
    ] = None,
    config: ConfigOpt = None,
    identity: IdentityOpt = None,
    proxy: ProxyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Search audit events, newest first (needs a role allowing list and read on `event`)."""
    if all_:
        limit = 0
    if limit < 0:
        raise typer.BadParameter("must be 0 (all) or more", param_hint="--limit")
    fmt = check_format(fmt or ("jsonl" if limit == 0 else "text"), ("text", "yaml", "json", "jsonl"))
    if limit == 0 and fmt != "jsonl":
        raise typer.BadParameter(
            "every event (--all, --limit 0) is streamed as JSON lines: use --format=jsonl, or a --limit",
            param_hint="--format",
        )
    if order not in ("asc", "desc"):
        raise typer.BadParameter(f'"{order}" is not asc or desc', param_hint="--order")
    if outcome is not None and outcome not in ("success", "failure"):
        raise typer.BadParameter(f'"{outcome}" is not success or failure', param_hint="--outcome")
    params = {
        k: v
        for k, v in {
            "since": since,
            "until": until,
            "type": type_,
            "user": user,
            "app": app,
            "session": session,
            "tool": tool,
            "outcome": outcome,
            "limit": str(limit),
            "order": order,
        }.items()
        if v
    }

    async def go(admin: Admin) -> None:
        if limit == 0:  # everything: streamed page by page, in constant memory
            async with _reader(admin) as reader:
                pages: AsyncIterator[list[dict[str, Any]]] = reader.search_pages(params)
                async for page in pages:
                    _write_lines(page)
            return
        events = await admin.audit_search(params)
        if fmt == "jsonl":
            _write_lines(events)
            return
        if fmt != "text":
            print_data(events, fmt)
            return
        out.print(_table(events))

    with _quiet_broken_pipe():
        run(with_admin(go, config=config, identity=identity, proxy=proxy, insecure=insecure))


@audit_app.command("tail")
def tail(
    follow: Annotated[
        bool,
        typer.Option(
            "--follow", "-f", help="Then print new events as they are committed, until interrupted."
        ),
    ] = False,
    lines: Annotated[
        int, typer.Option("--lines", "-n", help="Start with this many of the newest events.")
    ] = 10,
    config: ConfigOpt = None,
    identity: IdentityOpt = None,
    proxy: ProxyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Print the newest audit events as JSON lines, in the order they were committed.

    One event per line, as `search --format=json` shows it. With -f, new events follow as they
    are committed (a call is printed once it has its outcome, or after 2 s without one and again
    when it gets it). On the server host through the data directory (--config), elsewhere
    through the proxy (needs a role allowing list and read on `event`).
    """
    if lines < 0:
        raise typer.BadParameter("must be 0 or more", param_hint="--lines")

    async def go(admin: Admin) -> None:
        async with _reader(admin) as reader:
            cursor = await reader.feed_start(lines)
            while True:
                page = await reader.feed(cursor, FEED_PAGE, HOLD_MS if follow else 0)
                _write_lines(page.events)
                cursor = page.cursor
                if len(page.events) < FEED_PAGE:  # caught up
                    if not follow:
                        return
                    await asyncio.sleep(POLL_SECONDS)

    with _quiet_broken_pipe():
        run(with_admin(go, config=config, identity=identity, proxy=proxy, insecure=insecure))


@contextlib.contextmanager
def _quiet_broken_pipe() -> Any:
    """A reader that went away (``| head``) ends the command quietly, as `cat` would."""
    try:
        yield
    except BrokenPipeError:
        # Python's own recipe: point stdout at /dev/null so the flush at exit does not fail too.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None


def _table(events: list[dict[str, Any]]) -> Table:
    t = table("Time", "Event", "Code", "User", "App", "Method", "Tool", "Details")
    for e in events:
        details = auditread.details(e)
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
