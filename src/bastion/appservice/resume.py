"""Event logs of SSE streams, so a client can resume one with ``Last-Event-ID``.

Every event the gateway writes on an SSE stream of a message-stream upstream
(stdio, legacy SSE, demo) gets an id ``<stream>.<n>`` and is kept in that
stream's log (bounded).  A client whose connection dropped GETs the endpoint
with ``Last-Event-ID`` and receives the rest of *that* stream only — never
another stream's events (spec: no replay across streams) — then, for a POST
stream, up to its response.  Ids carry no secrets and mean nothing outside
their session.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque


class EventLog:
    """The events of one SSE stream: ``append`` assigns ids, ``after(n)`` replays."""

    def __init__(self, stream_id: str, keep: int = 256) -> None:
        self.stream_id = stream_id
        self.done = False
        self._events: deque[tuple[int, bytes]] = deque(maxlen=keep)
        self._next = 1
        self._wake: asyncio.Future[None] | None = None

    def event_id(self, n: int) -> str:
        return f"{self.stream_id}.{n}"

    @property
    def last(self) -> int:
        return self._next - 1

    def append(self, raw: bytes) -> int:
        n = self._next
        self._next += 1
        self._events.append((n, raw))
        self._notify()
        return n

    def finish(self) -> None:
        self.done = True
        self._notify()

    def after(self, n: int) -> list[tuple[int, bytes]]:
        return [(i, raw) for i, raw in self._events if i > n]

    def changed(self) -> asyncio.Future[None]:
        """A future resolved by the next ``append`` or ``finish``; get it *before* checking."""
        if self._wake is None or self._wake.done():
            self._wake = asyncio.get_running_loop().create_future()
        return self._wake

    def _notify(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)


class EventLogs:
    """The logs of one session's streams, newest kept (at most ``max_streams``)."""

    def __init__(self, max_streams: int = 32) -> None:
        self._logs: OrderedDict[str, EventLog] = OrderedDict()
        self._count = 0
        self._max = max_streams

    def new(self, prefix: str) -> EventLog:
        self._count += 1
        log = EventLog(f"{prefix}{self._count}")
        self._logs[log.stream_id] = log
        while len(self._logs) > self._max:
            self._logs.popitem(last=False)
        return log

    def find(self, last_event_id: str) -> tuple[EventLog, int] | None:
        """The log and position a ``Last-Event-ID`` points at, if we still have it."""
        stream_id, sep, n = last_event_id.strip().rpartition(".")
        log = self._logs.get(stream_id) if sep else None
        # ASCII digits, at most 18: int() refuses "²" and numbers over 4300 digits (a 500 each).
        if log is None or not (n.isascii() and n.isdigit()) or len(n) > 18:
            return None
        return log, int(n)
