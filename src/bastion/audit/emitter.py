"""The audit emitter: group commit of audit events, in order, with durable waits.

Contract:

- ``await log.record(event)`` returns once a transaction holding ``event``
  is committed by the store (the request it describes may then be
  forwarded).  If that commit fails it raises ``BackendError`` ("audit log
  unavailable: ...") and the caller must refuse the request: no call is
  ever forwarded unaudited.  A caller cancelled while waiting may still
  have its event written (it was accepted).
- ``log.complete(event_id, success, error, duration_ms)`` never blocks: the
  outcome is queued and written after the insert of that event (same
  machinery, same order), updating the row in place, so each call is one
  row.  It is accepted until the writer stops (``close()`` writes every
  completion queued before it ends); one the store fails to write is
  logged, since nobody waits for it.  ``await log.completed(updates)``
  queues outcomes the same way and returns once they are committed (or
  raises ``BackendError``): for a caller that must answer only after the
  outcome is durable (a joined app service's ``audit.complete``), and
  ``log.completing(completion)`` queues one and returns its future without
  waiting (the executor answers a call once it resolves: decision 0040).  (Holding outcomes back a little, to
  share the next event's commit, was measured in the gateway at one call in
  flight: +90 µs at p50 and no CPU saved, so they are written at once.)
- ``log.record_nowait(event)`` never blocks: fire-and-forget for events
  nothing waits on (session start/end, notifications).  Written in order
  with everything else; a failed write is logged, not raised.
- Order: everything is written in the order it was queued, with one
  exception that cannot be observed: within one batch the inserts are
  written before the completions, and a completion is always queued after
  its insert.
- Group commit: one writer task drains the queue; everything queued when
  it runs (up to ``max_batch`` items) is written together, so concurrent
  callers share transactions: one ``write_batch`` per batch, i.e. per
  event-loop iteration under load, when the store has that optional method
  (see ``bastion.audit.store``); otherwise one ``insert_many`` and at most
  one ``complete_many``.  If a ``write_batch`` fails, its events' callers
  get the error and its outcomes are tried again alone.
- Backpressure: when ``max_queue`` items are queued, ``record`` waits for
  room (at most ``enqueue_timeout`` seconds, then ``BackendError``) and
  ``record_nowait`` raises ``BackendError`` at once; ``complete`` is always
  accepted (each is bounded by a ``record`` that was).
- ``close()`` writes everything queued and stops the writer; afterwards
  every method but ``search`` and ``queue_depth`` raises ``BackendError``.
  The store is not closed: whoever opened it closes it, after ``close()``.

What it costs: this module's queue, futures and wake-ups ~1.3 µs of CPU per
call (record + complete), measured with a store that writes nothing; the
rest is the store's (``bastion.audit.sqlite_store`` has the breakdown, and
``bench/audit_micro.py`` measures the whole: docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, Final

from bastion.audit.chain import Checker, VerifyReport
from bastion.audit.events import AuditEvent
from bastion.audit.store import AuditQuery, AuditStore, Completion, FeedPage, iter_search
from bastion.errors import BackendError

__all__ = ["AuditLog"]

log = logging.getLogger("bastion.audit")

WRITER_TASK_NAME: Final = "bastion-audit-writer"

# Queue items are plain tuples (cheapest to build on the hot path):
# (_INSERT, event, future-or-None) or (_COMPLETE, Completion, future-or-None).
_INSERT: Final = 0
_COMPLETE: Final = 1

_Item = tuple[int, Any, "asyncio.Future[None] | None"]


class AuditLog:
    """Durable, ordered, group-committed audit writes; see the module doc."""

    def __init__(
        self,
        store: AuditStore,
        *,
        max_batch: int = 512,
        max_queue: int = 100_000,
        enqueue_timeout: float = 5.0,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        if enqueue_timeout <= 0:
            raise ValueError("enqueue_timeout must be positive")
        self._store = store
        # The optional one-transaction write (see bastion.audit.store); None: two calls.
        self._write_batch: Callable[[Sequence[AuditEvent], Sequence[Completion]], Awaitable[None]] | None = (
            getattr(store, "write_batch", None)
        )
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._enqueue_timeout = enqueue_timeout
        self._queue: collections.deque[_Item] = collections.deque()
        # Started by the first item (construction needs no running loop).
        self._writer: asyncio.Task[None] | None = None
        # Set while the writer sleeps on an empty queue; resolved by the
        # next push.  A bare future: cheaper than asyncio.Event per push.
        self._wakeup: asyncio.Future[None] | None = None
        # record() calls waiting for room, oldest first.
        self._room: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closing = False

    # -- writing -------------------------------------------------------------

    async def record(self, event: AuditEvent) -> None:
        """Queue ``event`` and return once it is committed; see the module doc."""
        if self._closing:
            raise _closed()
        if len(self._queue) >= self._max_queue:
            await self._wait_for_room()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._push((_INSERT, event, fut))
        await fut

    def complete(
        self, event_id: str, success: bool, error: str = "", duration_ms: float | None = None
    ) -> None:
        """Queue the outcome of a recorded call; never blocks."""
        if self._writer_gone():
            raise _closed()
        self._push((_COMPLETE, Completion(event_id, success, error, duration_ms), None))

    async def completed(self, updates: Sequence[Completion]) -> None:
        """Queue outcomes like ``complete`` and return once they are committed.

        Raises ``BackendError`` if the store could not write them (they are
        not written then: the caller still holds them and may try again;
        completing an event twice with the same outcome leaves the same row).
        """
        if self._writer_gone():
            raise _closed()
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[None]] = []
        for c in updates:
            fut: asyncio.Future[None] = loop.create_future()
            futs.append(fut)
            self._push((_COMPLETE, c, fut))
        if futs:
            await asyncio.gather(*futs)

    def completing(self, update: Completion) -> asyncio.Future[None]:
        """Queue one outcome; the future resolves once it is committed (or fails with
        ``BackendError``).  Never blocks; raises ``BackendError`` if the writer has stopped."""
        if self._writer_gone():
            raise _closed()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._push((_COMPLETE, update, fut))
        return fut

    def record_nowait(self, event: AuditEvent) -> None:
        """Queue ``event`` without waiting for its commit; never blocks."""
        if self._closing:
            raise _closed()
        if len(self._queue) >= self._max_queue:
            raise BackendError(f"audit log unavailable: {len(self._queue)} events waiting to be written")
        self._push((_INSERT, event, None))

    @property
    def queue_depth(self) -> int:
        """Items queued and not yet taken by the writer."""
        return len(self._queue)

    async def search(self, query: AuditQuery) -> list[dict[str, Any]]:
        """The store's ``search``: committed events matching ``query``, in ``query.order``."""
        return await self._store.search(query)

    def search_pages(self, query: AuditQuery) -> AsyncIterator[list[dict[str, Any]]]:
        """The store's streaming search (``store.iter_search``; decision 0035)."""
        return iter_search(self._store, query)

    async def feed(self, cursor: str, limit: int, hold_us: int = 0) -> FeedPage:
        """The store's feed: events changed after ``cursor``, in commit order (decision 0034)."""
        feed = getattr(self._store, "feed", None)
        if feed is None:
            raise BackendError("audit log unavailable: this audit store has no feed")
        page: FeedPage = await feed(cursor, limit, hold_us)
        return page

    async def feed_start(self, last: int) -> str:
        """The store's ``feed_start``: the cursor before the ``last`` newest changes."""
        start = getattr(self._store, "feed_start", None)
        if start is None:
            raise BackendError("audit log unavailable: this audit store has no feed")
        return str(await start(last))

    async def verify(self, checker: Checker | None, since: datetime | None = None) -> VerifyReport:
        """The store's ``verify`` (decision 0032): stored events checked against their seals."""
        verify = getattr(self._store, "verify", None)
        if verify is None:
            raise BackendError("audit log unavailable: this audit store keeps no seals")
        report: VerifyReport = await verify(checker, since)
        return report

    async def close(self) -> None:
        """Write everything queued, then stop the writer.  Idempotent.

        If the caller is cancelled, the flush still completes on its own.
        """
        self._closing = True
        self._fail_room_waiters()
        writer = self._writer
        if writer is None:
            return
        self._wake_writer()
        # asyncio.wait neither cancels the writer when this caller is
        # cancelled (the flush goes on by itself) nor raises what the writer
        # raised: if it died, its waiters were failed and its losses logged.
        await asyncio.wait([writer])
        if not writer.cancelled() and (exc := writer.exception()) is not None:
            log.error("audit log: the writer failed", exc_info=exc)

    # -- plumbing ------------------------------------------------------------

    def _push(self, item: _Item) -> None:
        self._queue.append(item)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._run(), name=WRITER_TASK_NAME)
        else:
            self._wake_writer()

    def _wake_writer(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            if not wakeup.done():
                wakeup.set_result(None)

    def _writer_gone(self) -> bool:
        # Completions are accepted while close() drains (their calls were
        # in flight), but not once the writer has stopped: they would be lost.
        return self._closing and (self._writer is None or self._writer.done())

    async def _wait_for_room(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._enqueue_timeout):
                while len(self._queue) >= self._max_queue:
                    waiter: asyncio.Future[None] = loop.create_future()
                    self._room.append(waiter)
                    await waiter
        except TimeoutError:
            raise BackendError(
                f"audit log unavailable: {len(self._queue)} events still waiting to be "
                f"written after {self._enqueue_timeout:g}s"
            ) from None
        if self._closing:
            raise _closed()

    def _fail_room_waiters(self) -> None:
        # Nothing will make room for them any more: fail now rather than at
        # their timeout.
        while self._room:
            waiter = self._room.popleft()
            if not waiter.done():
                waiter.set_exception(_closed())

    def _make_room(self) -> None:
        room = self._max_queue - len(self._queue)
        while room > 0 and self._room:
            waiter = self._room.popleft()
            if not waiter.done():
                waiter.set_result(None)
                room -= 1

    async def _run(self) -> None:
        """The writer: drain the queue batch by batch until closed and empty."""
        loop = asyncio.get_running_loop()
        queue = self._queue
        batch: list[_Item] = []
        try:
            while True:
                if not queue:
                    if self._closing:
                        return
                    self._wakeup = loop.create_future()
                    await self._wakeup
                    continue
                n = min(len(queue), self._max_batch)
                batch = [queue.popleft() for _ in range(n)]
                if self._room:
                    self._make_room()
                await self._write(batch)
                batch = []
                if queue:
                    # More came in while writing (an async store) or more
                    # than a batch was queued: let the callers just resolved
                    # run first, then take everything queued by then.
                    await asyncio.sleep(0)
        except BaseException as exc:
            # Cancelled from outside (loop teardown), or a bug: the log is
            # unusable from now on, and nobody may wait forever for it.
            reason = "audit writer was cancelled" if isinstance(exc, asyncio.CancelledError) else repr(exc)
            self._closing = True
            lost = [*batch, *queue]
            queue.clear()
            self._fail_all(lost, reason)
            self._fail_room_waiters()
            unwaited = sum(1 for _, _, fut in lost if fut is None)
            if unwaited:
                log.error("audit log: %s; %d queued events or outcomes lost", reason, unwaited)
            raise

    async def _write(self, batch: list[_Item]) -> None:
        events: list[AuditEvent] = []
        waiters: list[asyncio.Future[None] | None] = []
        completions: list[Completion] = []
        done: list[asyncio.Future[None] | None] = []
        for kind, payload, fut in batch:
            if kind == _INSERT:
                events.append(payload)
                waiters.append(fut)
            else:
                completions.append(payload)
                done.append(fut)
        if events and completions and self._write_batch is not None:
            try:
                await self._write_batch(events, completions)
            except Exception as exc:  # the waiters must hear of it
                self._insert_failed(events, waiters, exc)
                # Those outcomes need not share the events' fate: try them alone.
                await self._complete(completions, done)
            else:
                self._resolve(waiters)
                self._resolve(done)
            return
        if events:
            try:
                await self._store.insert_many(events)
            except Exception as exc:  # any failure: the waiters must hear of it
                self._insert_failed(events, waiters, exc)
            else:
                self._resolve(waiters)
        if completions:
            await self._complete(completions, done)

    async def _complete(self, completions: list[Completion], done: list[asyncio.Future[None] | None]) -> None:
        try:
            await self._store.complete_many(completions)
        except Exception as exc:  # those waited on hear of it; the others are logged
            detail = str(exc) or type(exc).__name__
            lost = [c.event_id for c, fut in zip(completions, done, strict=True) if fut is None]
            if lost:
                log.error(
                    "audit log: lost %d call outcomes: %s", len(lost), detail, extra={"event_ids": lost[:20]}
                )
            for fut in done:
                if fut is not None and not fut.done():
                    fut.set_exception(BackendError(f"audit log unavailable: {detail}"))
        else:
            self._resolve(done)

    @staticmethod
    def _resolve(waiters: list[asyncio.Future[None] | None]) -> None:
        for fut in waiters:
            if fut is not None and not fut.done():
                fut.set_result(None)

    def _insert_failed(
        self, events: Sequence[AuditEvent], waiters: Sequence[asyncio.Future[None] | None], exc: Exception
    ) -> None:
        detail = str(exc) or type(exc).__name__
        lost = [e.id for e, fut in zip(events, waiters, strict=True) if fut is None]
        if not isinstance(exc, BackendError):
            log.error("audit log: store failed unexpectedly", exc_info=exc)
        if lost:
            log.error("audit log: lost %d events: %s", len(lost), detail, extra={"event_ids": lost[:20]})
        for fut in waiters:
            if fut is not None and not fut.done():
                # One exception per waiter: raising a shared instance in many
                # tasks would splice their tracebacks together.
                fut.set_exception(BackendError(f"audit log unavailable: {detail}"))

    @staticmethod
    def _fail_all(items: list[_Item], reason: str) -> None:
        for _, _, fut in items:
            if fut is not None and not fut.done():
                fut.set_exception(BackendError(f"audit log unavailable: {reason}"))


def _closed() -> BackendError:
    return BackendError("audit log unavailable: it is closed")
