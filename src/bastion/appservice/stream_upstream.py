"""Message-stream upstreams (a stdio process, a legacy SSE server, the demo) behind one session.

One reader task feeds everything the upstream sends through the engine.  Routing: a response
goes to the POST waiting for its id; server notifications and server-to-client requests go to
the most recently opened POST stream still waiting (that is where progress and logging of a
running call belong), else to the session's server-to-client log, which the open GET stream
(or the next one) delivers.  Every SSE event written here has an id and is kept, bounded, so a
client can resume a dropped stream with ``Last-Event-ID`` (``resume.py``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from typing import Any

import orjson
from starlette.types import Receive

from bastion._tasks import stop_tasks
from bastion.answers import Answer
from bastion.appservice.executor import Executor
from bastion.appservice.resume import EventLog, EventLogs
from bastion.appservice.sessions import GatewaySession
from bastion.appservice.upstream import ClientPost
from bastion.errors import UpstreamError
from bastion.protocol.sse import encode_event
from bastion.session.engine import ForwardToUpstream, SendToClient
from bastion.transport import MessageStream

log = logging.getLogger("bastion.app")

#: Messages a waiting POST may hold that its client has not taken yet: beyond that, the reader
#: stops reading the upstream (whose own pipe or stream then fills, and it waits).
QUEUE_BOUND = 256


class StreamUpstream:
    """The upstream of one session that speaks JSON-RPC messages over a stream."""

    def __init__(self, stream: MessageStream, ex: Executor, *, response_timeout: float) -> None:
        self.stream = stream
        self.ex = ex
        self.response_timeout = response_timeout
        #: POSTs waiting for an answer, by request id, in the order they came.
        self.pending: dict[Any, asyncio.Queue[bytes | None]] = {}
        self.order: list[Any] = []
        self.logs = EventLogs()
        #: The server-to-client stream (what a GET receives), and how far GETs have read it.
        self.get_log: EventLog | None = None
        self.get_sent = 0
        self.get_owner: object | None = None
        self.reader: asyncio.Task[None] | None = None
        #: Set whenever a POST takes a message or stops waiting (room for the reader).
        self._room = asyncio.Event()
        #: Set while the reader waits for a client to take what it holds.
        self.paused = asyncio.Event()
        #: Messages held until the outcome commit before them resolves, in order (ADR 40).
        self._held: collections.deque[tuple[asyncio.Future[None] | None, SendToClient]] = collections.deque()

    @property
    def busy(self) -> bool:
        return bool(self.pending)

    async def start(self, s: GatewaySession) -> None:
        usid = self.stream.upstream_session_id
        if usid:
            s.upstream_session_id = usid
            await self.ex.run(s, s.engine.upstream_session_known(usid))
        self.reader = asyncio.create_task(self._read(s), name=f"upstream-reader-{s.id[:8]}")

    # ------------------------------------------------------------- delivery

    #: The reader goes on while an answer waits for its outcome's commit (``to_client_after``):
    #: one commit per message read would cap a session at one commit's pace.
    defers = True

    def to_client_after(self, barrier: asyncio.Future[None], cmd: SendToClient) -> None:
        if not self._held and barrier.done():
            self._deliver(cmd)
            return
        self._held.append((barrier, cmd))
        barrier.add_done_callback(self._release)

    def to_client(self, cmd: SendToClient) -> None:
        if self._held:  # nothing overtakes a held answer
            self._held.append((None, cmd))
        else:
            self._deliver(cmd)

    def _release(self, _: object = None) -> None:
        held = self._held
        while held:
            barrier, cmd = held[0]
            if barrier is not None and not barrier.done():
                return
            held.popleft()
            self._deliver(cmd)

    def _deliver(self, cmd: SendToClient) -> None:
        related = cmd.related_request_id
        if related is not None and related in self.pending:
            self.pending[related].put_nowait(cmd.raw)
            return
        for rid in reversed(self.order):
            q = self.pending.get(rid)
            if q is not None:
                q.put_nowait(cmd.raw)
                return
        if self.get_log is None:
            self.get_log = self.logs.new("g")
        self.get_log.append(cmd.raw)  # delivered by the current or the next GET (bounded log)

    def forward(self, cmd: ForwardToUpstream) -> None:
        log.error("a forward outside a client's message was dropped", extra={"method": cmd.message.method})

    async def _read(self, s: GatewaySession) -> None:
        try:
            while True:
                raw = await self.stream.receive()
                s.last_active = time.monotonic()
                await self.ex.upstream_sent(s, raw, self)
                await self._wait_for_room()
        except asyncio.CancelledError:
            raise
        except UpstreamError as e:
            await self.ex.upstream_failed(s, e.message)
        except Exception as e:  # a bug must not leave clients waiting forever
            log.exception("upstream reader failed", extra={"session_id": s.id})
            await self.ex.upstream_failed(s, f"gateway error: {e}")

    async def _wait_for_room(self) -> None:
        """Backpressure: while a waiting POST holds ``QUEUE_BOUND`` messages its client has not
        taken, read nothing more (a client that does not read stalls its own session only, and
        only until its request's deadline)."""
        while len(self._held) >= QUEUE_BOUND:  # the audit log is slow: wait for the oldest commit
            barrier = self._held[0][0]
            if barrier is not None:
                await asyncio.wait([barrier])
            self._release()
        while any(q.qsize() >= QUEUE_BOUND for q in self.pending.values()):
            self.paused.set()
            self._room.clear()
            try:
                await self._room.wait()
            finally:
                self.paused.clear()

    # ------------------------------------------------------------------ POST

    async def exchange(
        self, s: GatewaySession, fwd: ForwardToUpstream, answer: Answer, post: ClientPost
    ) -> None:
        msg = fwd.message
        rid = msg.id
        waiter: asyncio.Queue[bytes | None] | None = None
        if msg.kind == "request":
            # The engine forwards a request only when its id is free; a POST still finishing with
            # the same id (its answer already in its own queue) keeps that queue, not the id.
            waiter = asyncio.Queue()
            self.pending[rid] = waiter
            self.order.append(rid)
        try:
            try:
                await self.stream.send(fwd.raw)
            except UpstreamError as e:
                await self.ex.upstream_failed(s, str(e))
                await answer.error(e.http_status, e.message, "upstream", mid=rid)
                return
            sent_at = time.perf_counter()
            if waiter is None:
                await answer.empty(202)
                return
            await self._answer_from_queue(s, answer, waiter, rid, sent_at)
        finally:
            if waiter is not None and self.pending.get(rid) is waiter:
                del self.pending[rid]
                with contextlib.suppress(ValueError):
                    self.order.remove(rid)
                self._room.set()

    async def _answer_from_queue(
        self, s: GatewaySession, answer: Answer, waiter: asyncio.Queue[bytes | None], rid: Any, sent_at: float
    ) -> None:
        deadline = self.response_timeout
        try:
            # asyncio.timeout, not wait_for: no task per wait (this is every stdio call).
            async with asyncio.timeout(deadline):
                first = await waiter.get()
            self._room.set()
        except TimeoutError:
            s.m.upstream_error("timeout")
            body = await self.ex.fail_request(
                s, rid, f"the upstream MCP server did not answer within {deadline:.0f}s"
            )
            await answer.failed(504, body, "upstream")
            return
        if first is None:
            await answer.error(502, f"the upstream MCP server ended: {s.dead}", "upstream")
            return
        if _is_response(first):
            s.m.latency.observe(time.perf_counter() - sent_at)
            await answer.json(200, first)
            return
        # Every event is logged first, so a client that lost the connection can
        # resume this stream with Last-Event-ID; writes to a gone client are dropped.
        events = self.logs.new("p")
        try:
            await answer.start_sse()
            await self._prime(s, answer, events)
            await answer.event(first, id=events.event_id(events.append(first)))
            while True:
                try:
                    async with asyncio.timeout(deadline):
                        item = await waiter.get()
                    self._room.set()
                except TimeoutError:
                    item = None
                if item is None:
                    break
                await answer.event(item, id=events.event_id(events.append(item)))
                if _is_response(item):
                    s.m.latency.observe(time.perf_counter() - sent_at)
                    break
            await answer.finish()
        finally:
            events.finish()

    # ------------------------------------------------------------------- GET

    async def listen(
        self, s: GatewaySession, answer: Answer, receive: Receive, headers: dict[bytes, bytes]
    ) -> None:
        last = headers.get(b"last-event-id", b"").decode("latin-1")
        found = self.logs.find(last) if last else None
        if self.get_log is None:
            self.get_log = self.logs.new("g")
        if found is not None and found[0] is not self.get_log:
            # Resuming a POST stream: the rest of that stream only, up to its response.
            events, pos = found
            await answer.start_sse()
            await self._follow(answer, receive, events, pos, owner=None)
            return
        events = self.get_log
        pos = found[1] if found is not None else self.get_sent
        owner = object()
        self.get_owner = owner  # one GET stream at a time: a new one takes over
        await answer.start_sse()
        await self._prime(s, answer, events)
        await self._follow(answer, receive, events, pos, owner=owner)

    async def _prime(self, s: GatewaySession, answer: Answer, events: EventLog) -> None:
        """2025-11-25: an event with an id and no data first, so even an empty stream can resume."""
        if s.engine.protocol_version >= "2025-11-25":
            await answer.chunk(encode_event(b"", id=events.event_id(events.last)))

    async def _follow(
        self, answer: Answer, receive: Receive, events: EventLog, pos: int, *, owner: object | None
    ) -> None:
        """Write ``events`` after ``pos`` as they come, until the log is done, the client
        goes away, or (for the GET stream) a newer GET takes over."""
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            while True:
                changed = events.changed()
                for n, raw in events.after(pos):
                    await answer.event(raw, id=events.event_id(n))
                    pos = n
                    if owner is not None:
                        self.get_sent = max(self.get_sent, n)
                if events.done or (owner is not None and self.get_owner is not owner):
                    break
                await asyncio.wait({changed, gone}, return_when=asyncio.FIRST_COMPLETED)
                if gone.done():
                    return
            await answer.finish()
        finally:
            gone.cancel()

    # ------------------------------------------------------------------- end

    async def client_ended(self, s: GatewaySession, headers: dict[bytes, bytes]) -> None:
        return None  # closing the stream (release) ends the upstream's side

    async def stop(self, s: GatewaySession) -> None:
        await stop_tasks(self.reader)  # not when the reader itself ends the session
        for q in list(self.pending.values()):
            q.put_nowait(None)
        if self.get_log is not None:
            self.get_log.finish()

    async def release(self, s: GatewaySession, reason: str) -> None:
        with contextlib.suppress(Exception):
            await self.stream.aclose()


def _is_response(raw: bytes) -> bool:
    # Cheap: responses carry "result" or "error" and no "method".  The engine
    # already validated the message; this only picks JSON vs SSE framing.
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    return isinstance(obj, dict) and "method" not in obj and ("result" in obj or "error" in obj)


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (the request body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass
