"""What a proxy believes about the cluster's app services: connected, coming, or gone.

A session id starts with the route tag of the app service holding it (``<tag>.<id>``,
decision 0010).  When no tunnel of that tag is up here, the session may still be alive:
this proxy just started, or the tunnel is reconnecting.  Answering 404 then tells the
client to throw a live session away, so the rules are (decision 0036):

1. A tag with a ready tunnel here: route to it (``TunnelServer.by_tag``).
2. A tag whose app service said it was leaving (its GOAWAY) and has not come back: gone.
3. A tag with a live heartbeat record in the backend (``app_server``, expires
   ``HEARTBEAT_TTL`` after its last beat) of an app service expected to dial in here:
   *believed alive*; its requests wait up to ``HOLD`` seconds for the tunnel, then get
   503 with ``Retry-After``.
4. Any other tag: the app service is known dead (no record): gone.  Its sessions are 404.

Expected to dial in: app services joined over a tunnel, and, when nodes share a
PostgreSQL backend, the other nodes' own app services (decision 0030).  A record of an
in-process app service on SQLite can only be this node's previous run, whose sessions
died with it.  When the backend cannot be read, nothing is known dead (rule 3 applies).

Readiness: a proxy that starts is not ready (``/readyz`` 503, with the reason) until every
app service believed alive has connected here, or ``READY_WITHIN`` seconds have passed;
once ready it stays ready (later losses are rule 3 per session, not a reason to take the
whole proxy out of a balancer).  This module decides; it does no HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable
from typing import Final

from bastion.auth.server import AuthServer
from bastion.errors import BackendError
from bastion.resources import App, AppServer
from bastion.tunnel.server import HEARTBEAT_TTL, TunnelServer

log = logging.getLogger("bastion.proxy")

#: Seconds a request for a session of a believed-alive app service waits for its tunnel.
HOLD: Final = 3.0
#: What ``Retry-After`` says after a hold that did not end in a tunnel.
RETRY_AFTER: Final = 2
#: Seconds after start when the proxy is ready whatever has connected: an app service
#: alive at start has heartbeated somewhere by then, or its record has expired.
READY_WITHIN: Final = HEARTBEAT_TTL.total_seconds()
#: How long a read of the backend's records answers for (bounds the reads unknown tags cause).
_RECORDS_FOR: Final = 1.0


class Fate(enum.Enum):
    CONNECTED = "connected"
    #: Believed alive (a live record, or the backend cannot say): wait, then 503.
    COMING = "coming"
    GONE = "gone"


class Hosts:
    """The app services this proxy expects, from the backend's records and its own tunnels."""

    def __init__(
        self,
        auth: AuthServer,
        tunnels: TunnelServer,
        *,
        own_tag: str,
        peers_dial_in: bool,
        ready_within: float = READY_WITHIN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``own_tag``: the route tag of this node's in-process app service (never waited for);
        ``peers_dial_in``: other nodes share the backend, and their app services dial in."""
        self.auth = auth
        self.tunnels = tunnels
        self.own_tag = own_tag
        self.peers_dial_in = peers_dial_in
        self.ready_within = ready_within
        self._clock = clock
        self._started = clock()
        self._ready = False
        #: Why the proxy is not ready yet ("" once ready).
        self.reason = "starting: the app services have not been counted yet"
        self._records: tuple[float, dict[str, AppServer]] | None = None
        self._reading = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._task = asyncio.create_task(self._settle(), name="proxy-readiness")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def ready(self) -> bool:
        return self._ready

    async def _settle(self) -> None:
        """Check readiness until it holds: at start, each time an app service connects, and
        at least every second (records expire, the bound passes)."""
        while not await self.check():
            await self.tunnels.arrival(1.0)

    async def check(self) -> bool:
        """Whether the proxy is ready now (latched once true); ``reason`` says why not."""
        if self._ready:
            return True
        waited = self._clock() - self._started
        try:
            expected = await self.expected()
        except BackendError:
            expected = None
        missing = [] if expected is None else [t for t in expected if self.tunnels.by_tag(t) is None]
        if (expected is not None and not missing) or waited >= self.ready_within:
            self._ready = True
            self.reason = ""
            log.info(
                "proxy ready",
                extra={
                    "after_s": round(waited, 2),
                    "app_services": len(expected or ()),
                    "not_connected": len(missing),
                },
            )
            return True
        more = max(0, round(self.ready_within - waited))
        if expected is None:
            self.reason = (
                "starting: the cluster database is unreachable, so the app services to wait "
                f"for are unknown (ready in at most {more} s)"
            )
        else:
            self.reason = (
                f"starting: {len(missing)} of {len(expected)} app services the cluster lists as "
                f"alive have not connected to this proxy yet (ready in at most {more} s)"
            )
        return False

    # ------------------------------------------------------------- records

    async def expected(self) -> dict[str, AppServer]:
        """The app services believed alive that should dial in here, by route tag."""
        async with self._reading:  # one read at a time; the others take its result
            if self._records is not None and self._clock() - self._records[0] < _RECORDS_FOR:
                return self._records[1]
            records = await self._read()
            self._records = (self._clock(), records)
            return records

    async def _read(self) -> dict[str, AppServer]:
        out: dict[str, AppServer] = {}
        for srv in await self.auth.app_servers():
            tag = srv.spec.tag
            if not tag or tag == self.own_tag:
                continue
            if srv.spec.via == "tunnel" or self.peers_dial_in:
                out[tag] = srv
        return out

    async def fate(self, tag: str) -> tuple[Fate, dict[str, App]]:
        """Rules 1-4 for ``tag``, with the apps it serves (or served at its last beat)."""
        conn = self.tunnels.by_tag(tag)
        if conn is not None:
            return Fate.CONNECTED, conn.apps
        if tag in self.tunnels.left:
            return Fate.GONE, {}
        try:
            record = (await self.expected()).get(tag)
        except BackendError:
            return Fate.COMING, {}
        if record is None:
            return Fate.GONE, {}
        return Fate.COMING, {a.metadata.name: a for a in record.spec.apps}
