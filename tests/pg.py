"""The machine's PostgreSQL server, for tests: find it (start it if needed), fresh databases.

The server is ``$BASTION_TEST_PG_DSN`` or ``postgresql://postgres@127.0.0.1:5432/postgres``.
If nothing answers there and a local cluster is installed (Debian's ``pg_ctlcluster``),
it is started and waited for, with a deadline.  Only when no server can be found or
started is the calling test skipped, with the reason.

Use ``fresh_database()``: an async context manager giving the DSN of a new, empty
database, dropped afterwards with every connection to it (a fixture wraps it in one
line).  ``TcpProxy`` puts a real TCP hop in front of the server that a test
can cut and restore, to play a database outage without touching the shared server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
#: Seconds a started server has to accept connections.
START_DEADLINE = 60.0
#: Prefix of every database made here, so a leftover is easy to recognise.
DB_PREFIX = "bastion_test_"

# The outcome of the first discovery: a DSN, or why there is none.
_found: str | None = None
_missing: str | None = None


def server_dsn_setting() -> str:
    return os.environ.get("BASTION_TEST_PG_DSN") or DEFAULT_DSN


def with_database(dsn: str, database: str) -> str:
    """``dsn`` pointing at ``database`` instead."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


def with_port(dsn: str, host: str, port: int) -> str:
    """``dsn`` pointing at ``host:port`` instead (user and password kept)."""
    parts = urlsplit(dsn)
    auth = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{auth + '@' if auth else ''}{host}:{port}"))


async def _answers(dsn: str) -> str | None:
    """``None`` if a connection to ``dsn`` works, else why not."""
    try:
        conn = await asyncpg.connect(dsn, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return f"{type(exc).__name__}: {exc}"
    await conn.close()
    return None


def is_local(dsn: str) -> bool:
    return urlsplit(dsn).hostname in ("127.0.0.1", "localhost", "::1")


def local_cluster(dsn: str) -> str | None:
    """The version of this machine's Debian cluster ``main`` on ``dsn``'s port, if there is one.

    Only such a server may be started (or restarted by a test): anything else
    is somebody else's.
    """
    if not is_local(dsn) or shutil.which("pg_lsclusters") is None or shutil.which("pg_ctlcluster") is None:
        return None
    listed = subprocess.run(
        ["pg_lsclusters", "--no-header"], capture_output=True, text=True, timeout=30, check=False
    )
    port = urlsplit(dsn).port or 5432
    for line in listed.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] == "main" and fields[2] == str(port):
            return fields[0]
    return None


async def pg_ctlcluster(version: str, action: str) -> None:
    """``pg_ctlcluster <version> main <action>`` (``stop``/``restart`` in fast mode)."""
    args = ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action]
    if action in ("stop", "restart"):
        args += ["-m", "fast"]
    proc = await asyncio.create_subprocess_exec(*args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {out.decode(errors='replace')}")


async def wait_until_answers(dsn: str, deadline_s: float = START_DEADLINE) -> str | None:
    """Poll ``dsn`` until it accepts a connection or the deadline passes; ``None`` on success."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while True:
        why = await _answers(dsn)
        if why is None or loop.time() >= deadline:
            return why
        await asyncio.sleep(0.1)  # between attempts: polling a condition with a deadline


async def server_dsn() -> str:
    """The test server's DSN; starts a local cluster if needed; skips the test if there is none."""
    global _found, _missing
    if _found is not None:
        return _found
    if _missing is not None:
        pytest.skip(_missing)
    dsn = server_dsn_setting()
    why = await _answers(dsn)
    if why is not None:
        version = local_cluster(dsn)
        if version is None:
            where = "this machine has no PostgreSQL cluster on that port" if is_local(dsn) else "not local"
            _missing = f"no PostgreSQL server at {_safe(dsn)} ({why}), and none to start ({where})"
            pytest.skip(_missing)
        try:
            await pg_ctlcluster(version, "start")
        except RuntimeError as exc:
            _missing = f"PostgreSQL at {_safe(dsn)} not reachable ({why}) and could not be started: {exc}"
            pytest.skip(_missing)
        why = await wait_until_answers(dsn)
        if why is not None:
            _missing = f"PostgreSQL started but {_safe(dsn)} still refuses connections: {why}"
            pytest.skip(_missing)
    _found = dsn
    return dsn


def _safe(dsn: str) -> str:
    parts = urlsplit(dsn)
    if parts.password:
        return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))
    return dsn


async def _admin(dsn: str) -> asyncpg.Connection[Any]:
    return await asyncpg.connect(dsn, timeout=10)


async def create_database() -> tuple[str, str, str]:
    """A new empty database on the test server: (server DSN, its name, its DSN); the caller drops
    it (``drop_database``) — for module fixtures that outlive one event loop."""
    server = await server_dsn()
    name = f"{DB_PREFIX}{uuid.uuid4().hex[:16]}"
    admin = await _admin(server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return server, name, with_database(server, name)


@asynccontextmanager
async def fresh_database() -> AsyncIterator[str]:
    """A new empty database on the test server; yields its DSN, drops it afterwards."""
    server, name, dsn = await create_database()
    try:
        yield dsn
    finally:
        await drop_database(server, name)


async def drop_database(server: str, name: str) -> None:
    """Drop ``name``, ending its connections; waits for the server if it is restarting."""
    why = await wait_until_answers(server)
    if why is not None:
        raise RuntimeError(f"cannot drop test database {name}: server not answering: {why}")
    admin = await _admin(server)
    try:
        # FORCE (PostgreSQL 13+) terminates the connections still open to it.
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


class TcpProxy:
    """A TCP relay on 127.0.0.1 in front of ``target``: ``cut()`` is an outage, ``restore()`` ends it.

    ``cut`` closes every relayed connection (both sides see a real disconnect)
    and stops listening, so new connections are refused; ``restore`` listens
    again on the same port.  Use ``async with TcpProxy(host, port) as proxy``.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> TcpProxy:
        await self.restore()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.cut()

    @classmethod
    def for_dsn(cls, dsn: str) -> TcpProxy:
        parts = urlsplit(dsn)
        return cls(parts.hostname or "127.0.0.1", parts.port or 5432)

    def dsn(self, dsn: str) -> str:
        """``dsn`` going through this proxy."""
        return with_port(dsn, "127.0.0.1", self.port)

    async def restore(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
            self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        if server is not None:
            await server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        up_writer: asyncio.StreamWriter | None = None
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
            self._writers.add(up_writer)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    self._writers.discard(w)
                    w.close()
                    with contextlib.suppress(OSError, asyncio.CancelledError):
                        await w.wait_closed()
            self._tasks.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


def _pg_bindir() -> str | None:
    """The directory of ``initdb``/``pg_ctl``: on PATH, else Debian's newest under /usr/lib/postgresql."""
    found = shutil.which("pg_ctl")
    if found:
        return os.path.dirname(found)
    root = "/usr/lib/postgresql"
    with contextlib.suppress(OSError):
        for version in sorted(os.listdir(root), key=lambda v: int(v) if v.isdigit() else 0, reverse=True):
            bindir = os.path.join(root, version, "bin")
            if os.path.exists(os.path.join(bindir, "pg_ctl")):
                return bindir
    return None


class OwnServer:
    """A PostgreSQL server of a test's own (``initdb`` in a new directory, a free port, trust auth
    on 127.0.0.1 only), so a fault test can really stop, crash and restart it without touching the
    machine's shared server.  Run as the ``postgres`` user when the tests run as root (PostgreSQL
    refuses root).  ``stop(mode)`` is ``pg_ctl stop -m fast|immediate`` (immediate: a crash, with
    recovery at the next start); ``start()`` starts it on the same port and waits until it answers.
    """

    def __init__(self) -> None:
        bindir = _pg_bindir()
        if bindir is None:
            pytest.skip("no PostgreSQL server programs (initdb, pg_ctl) on this machine")
        self.bindir = bindir
        self.dir = tempfile.mkdtemp(prefix="bastion-pg-")
        self.data = os.path.join(self.dir, "data")
        self.port = _free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write(
                f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.dir}'\nfsync = off\nmax_connections = 200\n"
            )

    def _run(self, program: str, *args: str) -> None:
        cmd = [*self._as, os.path.join(self.bindir, program), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{program} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")

    def start(self) -> None:
        log = os.path.join(self.dir, "server.log")
        self._run("pg_ctl", "-D", self.data, "-l", log, "-w", "-t", str(int(START_DEADLINE)), "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop")

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
