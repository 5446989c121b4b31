"""Refused requests as audit events, rate-limited per source so that a flood cannot fill the disk.

Every request the gateway refuses before a session engine has seen it becomes one event:
``auth.failed`` for a missing or bad credential, ``mcp.session.rejected`` for everything
else (a bad ``Origin``, an app the caller may not reach, an unknown session or one of
another app, a malformed path or body outside a session, a size or count limit).  Each
holds the user if known, the app, the remote address, the reason, the HTTP status and the
method and path; every field is clipped (``audit.bound``), so an event is small whatever
the request was.

Rate limit (:class:`RefusalLimiter`, pure, with an injected clock): each source address
has a token bucket of ``burst`` events refilled at ``per_minute``; a global bucket bounds
the sum over all sources (an attacker may own many addresses).  A refusal past either
bucket is counted instead of recorded; once a source's counting has gone on for
``window`` seconds it is flushed as one ``audit.suppressed`` event with the count
(source ``*`` for the global bucket), so a flood costs at most ``burst`` events plus one
per window per source, and a quiet source loses nothing.

:class:`Refusals` carries this out: events are queued with ``record_nowait`` (a refusal
never waits for a commit, and when the audit queue is full the event is dropped with a
log line: refusing must not fail), and a task flushes counts once per window.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Protocol

from bastion._tasks import stop_tasks
from bastion._time import Clock
from bastion.audit.bound import MAX_ERROR, MAX_NAME, clip
from bastion.audit.events import AUTH_FAILED, SESSION_REJECTED, SUPPRESSED, AuditEvent
from bastion.errors import BastionError

__all__ = ["RefusalLimiter", "Refusals", "Suppressed"]

log = logging.getLogger("bastion.audit")

#: Source key for refusals counted by the global bucket.
ALL_SOURCES: Final = "*"
#: The path and session id of a refused request are kept to this many characters.
_MAX_PATH: Final = 256


@dataclass
class Suppressed:
    """Refusals from ``source`` counted, not recorded, between ``since`` and ``until`` (clock seconds)."""

    source: str
    count: int
    since: float
    until: float


@dataclass
class _Bucket:
    tokens: float
    at: float


class RefusalLimiter:
    """Token buckets per source plus one global bucket; pure (``now`` is injected)."""

    def __init__(
        self,
        *,
        burst: int = 30,
        per_minute: float = 30.0,
        global_burst: int = 300,
        global_per_minute: float = 600.0,
        window: float = 60.0,
        max_sources: int = 10_000,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.rate = per_minute / 60.0
        self.global_burst = global_burst
        self.global_rate = global_per_minute / 60.0
        self.window = window
        self.max_sources = max_sources
        self.now = now
        self._buckets: dict[str, _Bucket] = {}
        self._global = _Bucket(float(global_burst), now())
        self._counting: dict[str, Suppressed] = {}

    def admit(self, source: str) -> bool:
        """True: record this refusal; False: it was counted (see :meth:`due`)."""
        t = self.now()
        b = self._buckets.get(source)
        if b is None:
            if len(self._buckets) >= self.max_sources:
                # Forget sources that are not being counted: at worst one gets a fresh burst,
                # and the global bucket still bounds the total.
                self._buckets = {k: v for k, v in self._buckets.items() if k in self._counting}
            b = self._buckets[source] = _Bucket(float(self.burst), t)
        _refill(b, t, self.rate, self.burst)
        g = self._global
        _refill(g, t, self.global_rate, self.global_burst)
        if b.tokens < 1.0:
            self._count(source, t)
            return False
        if g.tokens < 1.0:
            self._count(ALL_SOURCES, t)
            return False
        b.tokens -= 1.0
        g.tokens -= 1.0
        return True

    def due(self, *, everything: bool = False) -> list[Suppressed]:
        """Counts whose window has passed (all of them with ``everything``), taken out."""
        if not self._counting:
            return []
        t = self.now()
        out = [c for c in self._counting.values() if everything or t - c.since >= self.window]
        for c in out:
            del self._counting[c.source]
        return out

    def _count(self, source: str, t: float) -> None:
        c = self._counting.get(source)
        if c is None:
            self._counting[source] = Suppressed(source, 1, t, t)
        else:
            c.count += 1
            c.until = t


def _refill(b: _Bucket, t: float, rate: float, cap: int) -> None:
    if t > b.at:
        b.tokens = min(float(cap), b.tokens + (t - b.at) * rate)
    b.at = t


class AuditSink(Protocol):
    def record_nowait(self, event: AuditEvent) -> None: ...


class Refusals:
    """Records refusals through ``audit`` within the limits of ``limiter``."""

    def __init__(
        self,
        audit: AuditSink,
        *,
        cluster_name: str,
        clock: Clock,
        limiter: RefusalLimiter | None = None,
    ) -> None:
        self.audit = audit
        self.cluster_name = cluster_name
        self.clock = clock
        self.limiter = limiter or RefusalLimiter()
        self._task: asyncio.Task[None] | None = None
        # A monotonic reading and the wall-clock time at that reading, to date counted refusals.
        self._epoch = (self.limiter.now(), clock.now())

    def refused(
        self,
        *,
        status: int,
        reason: str,
        remote_addr: str,
        user: str = "",
        app: str = "",
        session_id: str = "",
        http_method: str = "",
        path: str = "",
        auth: bool = False,
    ) -> None:
        """Record one refusal (or count it, past the source's rate); never raises, never waits."""
        lim = self.limiter
        if lim._counting:
            self.flush()
        if not lim.admit(remote_addr):
            return
        self._emit(
            AuditEvent(
                id=uuid.uuid4().hex,
                type=AUTH_FAILED if auth else SESSION_REJECTED,
                time=self.clock.now(),
                success=False,
                cluster_name=self.cluster_name,
                user=clip(user, MAX_NAME),
                app=clip(app, MAX_NAME),
                session_id=clip(session_id, _MAX_PATH),
                remote_addr=clip(remote_addr, MAX_NAME),
                error=clip(reason, MAX_ERROR),
                extra={"status": status, "http_method": clip(http_method, 16), "path": clip(path, _MAX_PATH)},
            )
        )

    def flush(self, *, everything: bool = False) -> None:
        """Record one ``audit.suppressed`` event per source whose counting window has passed."""
        for c in self.limiter.due(everything=everything):
            self._emit(
                AuditEvent(
                    id=uuid.uuid4().hex,
                    type=SUPPRESSED,
                    time=self.clock.now(),
                    success=False,
                    cluster_name=self.cluster_name,
                    user="",
                    app="",
                    session_id="",
                    remote_addr=clip(c.source, MAX_NAME),
                    error=f"{c.count} refused requests from {clip(c.source, MAX_NAME)} past the audit "
                    "rate limit were counted, not recorded one by one",
                    extra={"count": c.count, "since": self._wall(c.since), "until": self._wall(c.until)},
                )
            )

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="refusal-audit-flush")

    async def aclose(self) -> None:
        if self._task is not None:
            await stop_tasks(self._task)
            self._task = None
        self.flush(everything=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.limiter.window / 4)
            self.flush()

    def _wall(self, t: float) -> str:
        mono, wall = self._epoch
        return datetime.fromtimestamp(wall.timestamp() + (t - mono), wall.tzinfo).isoformat()

    def _emit(self, event: AuditEvent) -> None:
        try:
            self.audit.record_nowait(event)
        except BastionError as e:
            log.warning("refusal not audited: the audit log is unavailable", extra={"error": e.message})
