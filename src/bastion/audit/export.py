"""Audit export: every committed event, in commit order and at least once, to a file or a webhook.

An ``Exporter`` reads the store's feed (decision 0034) from a cursor and hands
each page to one sink: ``FileSink`` (JSON lines appended to a file, rotated by
size, ``keep`` old files) or ``HttpSink`` (a POST of the batch, JSON lines or a
JSON array; anything but a 2xx answer is a failure).  Only after the sink took
a page is the cursor saved, so a crash between the two sends that page again on
restart (at least once), and never skips one.  A failed page is retried, the
same page, with backoff (0.5 s doubling to 30 s) until it goes through; new
events meanwhile wait in the store, not in memory.  Each sink has its own
exporter and cursor: a dead webhook never holds up the file.

Decoupled from the data path on purpose: the exporter only reads what the
store committed (on SQLite a read-only connection, in a thread), so a sink that
is down, slow or full never blocks, slows or fails an MCP call; what it has not
sent yet is ``bastion_audit_export_backlog{sink}``.

Where the cursor lives is the lease's business (decision 0035): on SQLite a file
in the data directory (``audit-export/<sink>.cursor``, replaced atomically), as
one process writes that audit log; on PostgreSQL a row in the database, read
and written under a session advisory lock, so of several proxies one exports
at a time and another takes over (from the same cursor) when it stops.

What it must not do: hold events in memory beyond one page, log a webhook's
headers, or import anything above ``bastion.audit.store`` and ``bastion.metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Final, Protocol

import httpx
import orjson

from bastion import metrics
from bastion.audit.store import FeedPage
from bastion.errors import BastionError

__all__ = ["CursorFile", "Exporter", "FileSink", "HttpSink", "file_lease"]

log = logging.getLogger("bastion.audit.export")

#: Retry delays after a failure (seconds): the first, and the most.
RETRY_MIN: Final = 0.5
RETRY_MAX: Final = 30.0
#: Seconds between two reads of the feed once caught up.
POLL: Final = 0.5
#: Seconds between two counts of the backlog (a count of rows after the cursor).
BACKLOG_EVERY: Final = 2.0
#: Seconds between two tries for the lease while another process holds it.
LEASE_RETRY: Final = 5.0


class ExportError(BastionError):
    """A sink could not take a batch (it is retried)."""


class Source(Protocol):
    """What an exporter reads: the store's feed (``SQLiteAuditStore``, ``SpoolingAuditStore``...)."""

    async def feed(self, cursor: str, limit: int, hold_us: int = 0) -> FeedPage: ...

    async def feed_backlog(self, cursor: str) -> int: ...


class Cursor(Protocol):
    """Where an exporter stands: loaded once it holds its lease, saved after each page."""

    async def load(self) -> str: ...

    async def save(self, cursor: str) -> None: ...


class Sink(Protocol):
    name: str

    async def send(self, lines: list[bytes]) -> None: ...

    async def close(self) -> None: ...


Lease = Callable[[], AbstractAsyncContextManager[Cursor | None]]


# -- cursors -------------------------------------------------------------------------


class CursorFile:
    """A cursor in a file, replaced atomically (a crash leaves the old one or the new one)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def load(self) -> str:
        try:
            return (await asyncio.to_thread(self.path.read_text)).strip()
        except FileNotFoundError:
            return ""
        except OSError as e:
            raise ExportError(f"audit export cursor {self.path}: cannot read: {e.strerror or e}") from None

    async def save(self, cursor: str) -> None:
        try:
            await asyncio.to_thread(self._write, cursor)
        except OSError as e:
            raise ExportError(f"audit export cursor {self.path}: cannot write: {e.strerror or e}") from None

    def _write(self, cursor: str) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, cursor.encode())
        finally:
            os.close(fd)
        os.replace(tmp, self.path)


def file_lease(path: Path) -> Lease:
    """The lease of a process that alone writes its audit log (SQLite): always held, a cursor file."""

    @contextlib.asynccontextmanager
    async def lease() -> AsyncIterator[Cursor | None]:
        yield CursorFile(path)

    return lease


# -- sinks ---------------------------------------------------------------------------


class FileSink:
    """JSON lines appended to ``path`` (0600); past ``max_bytes`` it becomes ``path.1`` (and
    ``path.1`` ``path.2``...), ``keep`` rotated files at most."""

    name = "file"

    def __init__(self, path: Path, *, max_bytes: int, keep: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep

    async def send(self, lines: list[bytes]) -> None:
        try:
            await asyncio.to_thread(self._append, b"".join(line + b"\n" for line in lines))
        except OSError as e:
            raise ExportError(f"audit export file {self.path}: cannot write: {e.strerror or e}") from None

    def _append(self, data: bytes) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size >= self.max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self.path}.{self.keep}")
        for n in range(self.keep - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{self.path}.{n}", f"{self.path}.{n + 1}")
        os.replace(self.path, f"{self.path}.1")

    async def close(self) -> None:
        return None


class HttpSink:
    """Each batch POSTed to ``url``: JSON lines (``application/x-ndjson``) or a JSON array."""

    name = "http"

    def __init__(
        self, url: str, *, fmt: str = "jsonl", headers: dict[str, str] | None = None, timeout: float = 10.0
    ) -> None:
        self.url = url
        self.fmt = fmt
        self._http = httpx.AsyncClient(headers=headers or {}, timeout=timeout)

    async def send(self, lines: list[bytes]) -> None:
        if self.fmt == "json":
            body, kind = b"[" + b",".join(lines) + b"]", "application/json"
        else:
            body, kind = b"".join(line + b"\n" for line in lines), "application/x-ndjson"
        try:
            resp = await self._http.post(self.url, content=body, headers={"content-type": kind})
        except httpx.HTTPError as e:
            # The reason only: the URL may carry credentials, and the headers do.
            raise ExportError(f"audit export endpoint unreachable: {type(e).__name__}") from None
        if not 200 <= resp.status_code < 300:
            raise ExportError(f"audit export endpoint answered HTTP {resp.status_code}")

    async def close(self) -> None:
        await self._http.aclose()


# -- the exporter ----------------------------------------------------------------------


class Exporter:
    """Sends ``source``'s feed to ``sink`` from the cursor ``lease`` gives; ``run`` until cancelled."""

    def __init__(
        self, source: Source, sink: Sink, lease: Lease, *, batch: int = 500, hold_us: int = 2_000_000
    ) -> None:
        self.source = source
        self.sink = sink
        self.lease = lease
        self.batch = batch
        self.hold_us = hold_us
        self._backlog = metrics.AUDIT_EXPORT_BACKLOG.labels(sink.name)
        self._exported = metrics.AUDIT_EXPORTED.labels(sink.name)
        self._failures = metrics.AUDIT_EXPORT_FAILURES.labels(sink.name)
        self._error = ""
        self._counted = -BACKLOG_EVERY

    async def run(self) -> None:
        try:
            delay = RETRY_MIN
            while True:
                try:
                    async with self.lease() as cursor:
                        if cursor is None:  # another process exports: stand by
                            self._backlog.set(0)
                            await asyncio.sleep(LEASE_RETRY)
                            continue
                        await self._export(cursor)
                except BastionError as e:  # the lease or the cursor failed (database away)
                    self._failed(e)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
        finally:
            await self.sink.close()

    async def _export(self, store: Cursor) -> None:
        cursor = await store.load()
        while True:
            page = await self._read(cursor)
            if page.events:
                await self._send([orjson.dumps(e) for e in page.events], cursor)
                await store.save(page.cursor)
                self._exported.inc(len(page.events))
                cursor = page.cursor
            await self._count(cursor)
            if len(page.events) < self.batch:
                await asyncio.sleep(POLL)

    async def _count(self, cursor: str) -> None:
        """``bastion_audit_export_backlog``: counted every ``BACKLOG_EVERY`` seconds at most."""
        now = asyncio.get_running_loop().time()
        if now - self._counted >= BACKLOG_EVERY:
            self._counted = now
            with contextlib.suppress(BastionError):
                self._backlog.set(await self.source.feed_backlog(cursor))

    async def _read(self, cursor: str) -> FeedPage:
        delay = RETRY_MIN
        while True:
            try:
                return await self.source.feed(cursor, self.batch, self.hold_us)
            except BastionError as e:
                self._failed(e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def _send(self, lines: list[bytes], cursor: str) -> None:
        """Hand ``lines`` to the sink; the same lines again, with backoff, until it takes them."""
        delay = RETRY_MIN
        while True:
            try:
                await self.sink.send(lines)
            except BastionError as e:
                self._failures.inc()
                self._failed(e)
                await self._count(cursor)
            else:
                if self._error:
                    log.info("audit export works again", extra={"sink": self.sink.name})
                    self._error = ""
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    def _failed(self, e: BastionError) -> None:
        # Once per distinct reason: a webhook down for an hour is one line, not thousands.
        if e.message != self._error:
            self._error = e.message
            log.warning("audit export failed; retrying", extra={"sink": self.sink.name, "error": e.message})
