"""Upstream transports: how the gateway exchanges MCP messages with an MCP server.

A transport turns one upstream connection into a :class:`MessageStream` of raw
JSON-RPC messages, so the session engine never knows whether it talks to a
child process (``bastion.transport.stdio``) or to a legacy HTTP+SSE server
(``bastion.transport.sse``).  Transports frame bytes and nothing more: they do
not parse JSON-RPC, authorise or audit (the session engine does all three on
the bytes it receives), except that the SSE transport reads the ``endpoint``
event it needs to know where to POST.

Failures are :class:`~bastion.errors.UpstreamError` (the upstream's fault);
the end of the upstream is the subclass :class:`UpstreamClosedError`::

    UpstreamError                 the upstream sent something unusable, refused a message, ...
    └── UpstreamClosedError       the upstream ended: EOF, process exit, stream closed

This package must not import anything above ``bastion.errors`` and
``bastion.resources``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol

from bastion.errors import UpstreamError

__all__ = ["Inbox", "MessageStream", "UpstreamClosedError"]


class UpstreamClosedError(UpstreamError):
    """The upstream ended (EOF, process exit, event stream closed); the session cannot continue."""


class MessageStream(Protocol):
    """One upstream MCP connection as a stream of raw JSON-RPC messages.

    Contract:

    - ``upstream_session_id`` is ``""`` for stdio and the upstream's session id
      (the ``sessionId`` of the SSE endpoint URL) when it has one.
    - ``send(raw)`` delivers one message (the bytes of one JSON-RPC message, no
      trailing newline) and returns once the upstream has accepted it (written
      and drained for stdio, POST answered 2xx for SSE).  It raises
      :class:`UpstreamClosedError` when the upstream is gone and
      :class:`~bastion.errors.UpstreamError` when it refuses the message.
    - ``receive()`` returns the next message from the upstream, in order.
      Messages already received are delivered before the end is reported;
      then it raises :class:`UpstreamClosedError` (on every later call too).
      Data that cannot be framed (e.g. a message above the size limit) raises
      :class:`~bastion.errors.UpstreamError`.  One consumer at a time.
    - ``aclose()`` stops everything the stream owns (process, tasks, sockets);
      it is idempotent and safe to call concurrently.  After it, ``send`` and
      ``receive`` raise :class:`UpstreamClosedError`.
    """

    upstream_session_id: str

    async def send(self, raw: bytes) -> None: ...

    async def receive(self) -> bytes: ...

    async def aclose(self) -> None: ...


class Inbox:
    """Bounded, single-consumer queue of upstream messages that ends with an error.

    Shared by the message-stream transports (stdio, SSE).  ``asyncio.Queue`` (3.11) cannot be closed, so a
    consumer blocked in ``get`` could not be woken when the upstream ends; this
    can.  The bound is the backpressure: a reader blocked in ``put`` stops
    reading its pipe or socket, so a fast upstream is slowed to the client's pace.
    """

    def __init__(self, capacity: int = 64) -> None:
        self._items: deque[bytes] = deque()
        self._capacity = capacity
        self._final: UpstreamError | None = None
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    @property
    def closed(self) -> bool:
        return self._final is not None

    async def put(self, item: bytes) -> None:
        """Append ``item``, waiting while full; dropped silently once closed."""
        while len(self._items) >= self._capacity and self._final is None:
            self._writable.clear()
            await self._writable.wait()
        if self._final is not None:
            return
        self._items.append(item)
        self._readable.set()

    def close(self, error: UpstreamError, *, discard: bool = False) -> None:
        """End the inbox with ``error``; the first close wins.

        ``discard`` (the gateway closing) drops queued items and makes ``error``
        the final word even after an earlier close.
        """
        if discard:
            self._final = error
            self._items.clear()
        elif self._final is None:
            self._final = error
        self._readable.set()
        self._writable.set()

    async def get(self) -> bytes:
        """The next item; the closing error (a fresh copy each time) once drained."""
        while not self._items:
            if self._final is not None:
                # A fresh instance per raise: re-raising one object would grow its traceback.
                raise type(self._final)(self._final.message)
            self._readable.clear()
            await self._readable.wait()
        item = self._items.popleft()
        self._writable.set()
        return item

    def final_error(self) -> UpstreamError | None:
        """A fresh copy of the closing error, or ``None`` while open."""
        return None if self._final is None else type(self._final)(self._final.message)
