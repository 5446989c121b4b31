"""What the PostgreSQL stores share: opening a migrated pool, safe names for a DSN, error mapping, migrations.

Used by ``bastion.backend.postgres`` and ``bastion.audit.pg_store``.  What it
must not do: put any part of a DSN (password, user, host, port, database) or an
address in any message or log line, let an ``asyncpg`` or socket exception
escape unmapped, or import anything above ``bastion.errors`` (``bastion.metrics``,
a leaf, excepted: ``map_error`` counts ``bastion_backend_errors_total``).

``map_error`` is the one place a driver or socket failure becomes words.  The
error's message (what an HTTP body or a CLI line shows) names the component
(``CLUSTER_DB``, ``AUDIT_DB``) and what to do, and nothing of the failure
itself; the failure's detail goes to the log (``bastion.pg``), with every part
of the DSN replaced by what it is (``<user>``, ``<host>``...) and addresses
removed, at most once per component, action and detail every ``LOG_EVERY`` s.

Migrations: every store names its ``component`` (``backend``, ``audit``)
and lists its migrations in order, version 1 first.  ``migrate`` applies the
missing ones in ONE transaction that first takes a transaction-level advisory
lock, so several processes starting at once apply each migration exactly
once (the others wait for the lock, then find nothing left to do).  The
applied versions are rows of ``bastion_schema_migrations``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import asyncpg

from bastion.errors import BackendError, BastionError, ValidationError
from bastion.metrics import backend_error

__all__ = [
    "AUDIT_DB",
    "CLUSTER_DB",
    "CONNECT_TIMEOUT",
    "DRIVER_ERRORS",
    "MIGRATIONS_TABLE",
    "Migration",
    "UnreachableError",
    "describe_dsn",
    "is_unreachable",
    "map_error",
    "migrate",
    "open_pool",
    "scrub",
    "wait_event",
]

log = logging.getLogger("bastion.pg")

#: What errors call the stores (never an address: bodies and logs show these).
CLUSTER_DB: Final = "the cluster database"
AUDIT_DB: Final = "the audit database"
#: Seconds between two log lines of the same failure.
LOG_EVERY: Final = 10.0
_WHAT_TO_DO: Final = (
    "retry shortly; if it lasts, an administrator should check that PostgreSQL is up and "
    "reachable from this node (the detail is in this node's log)"
)
#: Addresses in a driver's or server's words: IPv4 (with a port, or as "('10.0.0.5', 5432)"),
#: IPv6 in brackets, quotes or with "::", and a redacted host's port.
_ADDRESS: Final = re.compile(
    r"\(?'?\b(?:\d{1,3}\.){3}\d{1,3}\b'?(?:(?::|,\s*)\d+)?\)?"
    r"|\[[0-9a-fA-F:.%\w]*:[0-9a-fA-F:.%\w]*\](?::\d+)?"
    r"|'[0-9a-fA-F:.%]*:[0-9a-fA-F:.%]*'"
    r"|\b[0-9a-fA-F]*::[0-9a-fA-F:]*"
    r"|(?<=<host>):\d+"
)
_ERRNO: Final = re.compile(r"\[Errno (\d+)\]")
_logged: dict[tuple[str, str, str], float] = {}

#: Seconds to wait for a TCP connection and the PostgreSQL handshake.
CONNECT_TIMEOUT: Final = 5.0
#: The table recording applied migrations, shared by every component.
MIGRATIONS_TABLE: Final = "bastion_schema_migrations"
#: What the driver and the sockets under it raise.
DRIVER_ERRORS: Final = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
    ValueError,
)
#: ``pg_advisory_xact_lock`` key serialising migrations ("bastion" in ASCII).
MIGRATION_LOCK: Final = 0x62617374696F6E

_MIGRATIONS_DDL: Final = f"""
CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (
    component   TEXT        NOT NULL,
    version     INTEGER     NOT NULL,
    description TEXT        NOT NULL,
    applied_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version)
)
"""


class UnreachableError(BackendError):
    """The database could not be reached (refused, reset, shut down, timed out).

    A ``BackendError`` to callers; the stores use the subclass to tell an
    outage (retry later) from a real failure.
    """


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    #: Statements run in order, inside the migration transaction.
    statements: tuple[str, ...]


def describe_dsn(dsn: str) -> str:
    """``dsn`` without password or query: ``postgresql://user@host:port/db``."""
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or ""
        port = parts.port
        user = unquote(parts.username) if parts.username else ""
    except ValueError:
        return "postgresql://(invalid dsn)"
    if ":" in host:
        host = f"[{host}]"
    where = f"{host}:{port}" if port is not None else host
    db = unquote(parts.path.lstrip("/"))
    return f"{parts.scheme or 'postgresql'}://{user + '@' if user else ''}{where}/{db}"


def _secrets(dsn: str) -> list[str]:
    """Strings of ``dsn`` that must never be shown: the password, in every spelling."""
    found: list[str] = []
    try:
        parts = urlsplit(dsn)
        if parts.password:
            found += [parts.password, unquote(parts.password)]
        for pair in parts.query.split("&"):
            name, _, value = pair.partition("=")
            if name.lower() in ("password", "sslpassword") and value:
                found += [value, unquote(value)]
    except ValueError:
        pass
    return sorted({s for s in found if s}, key=len, reverse=True)


def scrub(text: str, dsn: str) -> str:
    """``text`` with the DSN's password(s) replaced by ``***``."""
    for secret in _secrets(dsn):
        text = text.replace(secret, "***")
    return text


def _parts(dsn: str) -> list[tuple[str, str]]:
    """(value, what it is) for every part of ``dsn`` that names where or who, longest first."""
    found: list[tuple[str, str]] = [(s, "***") for s in _secrets(dsn)]
    try:
        parts = urlsplit(dsn)
        named: list[tuple[str | None, str]] = [
            (parts.username, "<user>"),
            (parts.hostname, "<host>"),
            (parts.path.lstrip("/"), "<database>"),
        ]
        for pair in parts.query.split("&"):
            name, _, value = pair.partition("=")
            if name.lower() in ("user", "host", "hostaddr", "dbname", "port"):
                named.append((value, f"<{name.lower()}>"))
        for part, what in named:
            if part:
                found += [(part, what), (unquote(part), what)]
    except ValueError:
        pass
    return sorted({(v, w) for v, w in found if len(v) > 1}, key=lambda p: len(p[0]), reverse=True)


def redact(text: str, dsn: str) -> str:
    """``text`` without any part of ``dsn`` (each replaced by what it is) or any address."""
    for value, what in _parts(dsn):
        text = text.replace(value, what)
    return _ADDRESS.sub("<address>", text)


def _detail(exc: BaseException, dsn: str) -> str:
    """What went wrong, for the log: never the driver's own text for a socket error (it
    quotes the address it dialled); the server's or driver's words redacted."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError):
        errno = exc.errno or next((int(m) for m in _ERRNO.findall(str(exc))), 0)
        return os.strerror(errno).lower() if errno else type(exc).__name__
    text = redact(str(exc) or type(exc).__name__, dsn)
    if len(text) > 300:
        text = text[:300] + "..."
    state = getattr(exc, "sqlstate", None)
    return f"{text} (SQLSTATE {state})" if isinstance(state, str) else text


def _log_once(label: str, action: str, detail: str) -> None:
    now = time.monotonic()
    key = (label, action, detail)
    if now - _logged.get(key, -LOG_EVERY) < LOG_EVERY:
        return
    if len(_logged) > 1000:
        _logged.clear()
    _logged[key] = now
    log.warning("%s: cannot %s: %s", label, action, detail)


def is_unreachable(exc: BaseException) -> bool:
    """True when ``exc`` means the server cannot be talked to right now."""
    if isinstance(
        exc,
        OSError
        | TimeoutError
        | asyncpg.PostgresConnectionError
        | asyncpg.AdminShutdownError
        | asyncpg.CrashShutdownError
        | asyncpg.CannotConnectNowError
        | asyncpg.TooManyConnectionsError,
    ):
        return True
    if isinstance(exc, asyncpg.InterfaceError):
        # What asyncpg raises for a connection that closed under it.
        text = str(exc)
        return "connection is closed" in text or "connection was closed" in text
    # A connection the server ended while it was idle (its FATAL message was
    # read, the socket not closed yet) refuses the next query with "cannot
    # switch to state ...": it is as good as lost.
    return isinstance(exc, asyncpg.InternalClientError) and not isinstance(
        exc, asyncpg.exceptions.OutdatedSchemaCacheError | asyncpg.exceptions.TargetServerAttributeNotMatched
    )


def map_error(label: str, dsn: str, action: str, exc: BaseException) -> BastionError:
    """The project error for a driver/socket failure: the one place they become words.

    ``label`` names the component (``CLUSTER_DB``, ``AUDIT_DB``); the message says that and
    what to do, nothing of ``dsn`` or the failure; the detail is logged, redacted.
    """
    if isinstance(exc, asyncpg.DataError | UnicodeEncodeError | asyncpg.CharacterNotInRepertoireError):
        cause = exc if isinstance(exc, UnicodeEncodeError) else exc.__cause__
        if isinstance(cause, UnicodeEncodeError):
            return ValidationError(f"text is not valid Unicode: {cause.reason} at {cause.start}")
        if isinstance(exc, asyncpg.CharacterNotInRepertoireError):
            return ValidationError("text must not contain NUL characters")
    backend_error("postgres", action)
    _log_once(label, action, _detail(exc, dsn))
    if is_unreachable(exc):
        return UnreachableError(f"{label} is unreachable (cannot {action}): {_WHAT_TO_DO}")
    if isinstance(exc, asyncpg.LockNotAvailableError):
        return BackendError(
            f"{label} is busy (cannot {action}: another bastion process held the write lock too "
            "long): retry shortly"
        )
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        return BackendError(
            f"{label} refused the login (cannot {action}): an administrator should check the user "
            "and password in auth_service.backend.dsn (the detail is in this node's log)"
        )
    if isinstance(exc, ValueError | asyncpg.ClientConfigurationError):
        return BackendError(
            f"auth_service.backend.dsn is not a valid PostgreSQL address for {label} "
            "(the detail is in this node's log)"
        )
    return BackendError(f"{label} failed (cannot {action}); the detail is in this node's log")


async def migrate(
    conn: asyncpg.Connection[Any] | asyncpg.pool.PoolConnectionProxy[Any],
    component: str,
    migrations: Sequence[Migration],
    label: str,
) -> int:
    """Apply the missing ``migrations`` of ``component``; return the schema version.

    One transaction, serialised across processes by an advisory lock taken
    before anything else (even ``CREATE TABLE IF NOT EXISTS`` races without
    it).  Raises ``BackendError`` if the database has a newer version than
    ``migrations`` knows.
    """
    newest = migrations[-1].version if migrations else 0
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(_MIGRATIONS_DDL)
        applied = {
            int(row[0])
            for row in await conn.fetch(
                f"SELECT version FROM {MIGRATIONS_TABLE} WHERE component = $1", component
            )
        }
        if applied and max(applied) > newest:
            raise BackendError(
                f"{label}: {component} schema version {max(applied)} is newer than this "
                f"bastion supports ({newest}); upgrade bastion"
            )
        for migration in migrations:
            if migration.version in applied:
                continue
            for statement in migration.statements:
                await conn.execute(statement)
            await conn.execute(
                f"INSERT INTO {MIGRATIONS_TABLE} (component, version, description) VALUES ($1, $2, $3)",
                component,
                migration.version,
                migration.description,
            )
    return newest


async def open_pool(
    dsn: str,
    label: str,
    *,
    pool_size: int,
    command_timeout: float,
    server_settings: dict[str, str],
    component: str,
    migrations: Sequence[Migration],
) -> asyncpg.Pool[asyncpg.Record]:
    """A connection pool to ``dsn`` with ``component``'s schema migrated.

    Failures are ``map_error``'s errors (no password in them); a pool whose
    migration failed is terminated, not left open.
    """
    try:
        pool: asyncpg.Pool[asyncpg.Record] = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=max(1, pool_size),
            timeout=CONNECT_TIMEOUT,
            command_timeout=command_timeout,
            server_settings=server_settings,
        )
    except DRIVER_ERRORS as exc:
        # ``from None``: the driver's exception is summarised (without the
        # password) in the message; chaining it could print more.
        raise map_error(label, dsn, "connect", exc) from None
    try:
        async with pool.acquire() as conn:
            await migrate(conn, component, migrations, label)
    except BaseException as exc:
        pool.terminate()
        if isinstance(exc, DRIVER_ERRORS):
            raise map_error(label, dsn, "migrate the schema", exc) from None
        raise
    return pool


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``event``; True if it was set."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True
