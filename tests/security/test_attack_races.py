"""Races on one session, driven in-process so that each interleaving is chosen, not hoped for.

The MCP handler runs with a message-stream upstream that records what reached it and an audit
log whose commits a test holds open: a call allowed and audited while its session ends
(DELETE, revocation, the idle reaper, the upstream failing) must not then reach the upstream,
and its client must be answered at once, not after the response timeout.

A streamable-HTTP upstream whose SSE event is over the parser's limit: the call was left in
flight (its audit event never completed) and a refusal was audited as the *client's* (429).
One that answers a call with a text 500: the call stayed in flight too.

Initializes sent together: each passed the per-user session limit (one stdio process each).
Access revoked while a session's upstream was starting: the watch did not see it, and it lived.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from bastion.appservice import mcp_http
from bastion.appservice.mcp_http import Limits, MCPHandler
from bastion.appservice.registry import AppRegistry
from bastion.appservice.stream_upstream import QUEUE_BOUND
from bastion.audit.events import REQUEST, SESSION_END, AuditEvent
from bastion.audit.store import Completion
from bastion.auth.credentials import Identity
from bastion.auth.server import Actor
from bastion.handoff import SCOPE_KEY, Handoff
from bastion.policy import AccessChecker
from bastion.protocol.sse import DEFAULT_MAX_EVENT_SIZE
from bastion.resources import App, Role, User
from bastion.transport import UpstreamClosedError

T0 = datetime(2026, 12, 7, 12, 0, 0, tzinfo=UTC)
APP = App.model_validate(
    {"metadata": {"name": "rec", "labels": {"env": "dev"}}, "spec": {"mcp": {"command": "rec"}}}
)
ROLE = Role.model_validate(
    {
        "metadata": {"name": "echo-only"},
        "spec": {"allow": {"app_labels": {"env": "dev"}, "mcp": {"tools": ["echo"]}}},
    }
)
USER = User.model_validate(
    {"kind": "user", "metadata": {"name": "limited"}, "spec": {"roles": ["echo-only"]}}
)
ACTOR = Actor(
    "limited",
    AccessChecker([ROLE], {}),
    Identity("limited", "t", ("echo-only",), {}, T0 + timedelta(hours=1), T0),
    USER,
    (1,),
    (ROLE,),
)


class Clock:
    def now(self) -> datetime:
        return T0


class HeldAudit:
    """An audit log that keeps every event; ``hold()`` makes the next commit wait for a release."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []
        self.outcomes: list[tuple[str, bool, str]] = []
        self._held: list[tuple[asyncio.Event, asyncio.Event]] = []

    def hold(self) -> tuple[asyncio.Event, asyncio.Event]:
        """(reached: the commit is waiting, release: let it commit)."""
        pair = (asyncio.Event(), asyncio.Event())
        self._held.append(pair)
        return pair

    async def record(self, event: AuditEvent) -> None:
        if self._held:
            reached, release = self._held.pop(0)
            reached.set()
            await release.wait()
        self.events.append(event)

    def complete(
        self, event_id: str, success: bool, error: str = "", duration_ms: float | None = None
    ) -> None:
        self.outcomes.append((event_id, success, error))

    def completing(self, c: Completion) -> asyncio.Future[None]:
        self.complete(c.event_id, c.success, c.error, c.duration_ms)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    def record_nowait(self, event: AuditEvent) -> None:
        self.events.append(event)


class RecordingStream:
    """A stdio-like upstream: answers every request with ``{}`` and records what it was sent."""

    upstream_session_id = ""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.called = asyncio.Event()  # a tools/call reached it
        self.closed = False
        self._out: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def send(self, raw: bytes) -> None:
        if self.closed:
            raise UpstreamClosedError("stdio server exited")
        msg = json.loads(raw)
        self.sent.append(msg)
        if msg.get("method") == "tools/call":
            self.called.set()
        if "id" in msg and "method" in msg:
            result: dict[str, Any] = {}
            if msg["method"] == "initialize":
                result = {"protocolVersion": "2025-06-18", "capabilities": {"tools": {}}}
            self._out.put_nowait(json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": result}).encode())

    async def receive(self) -> bytes:
        raw = await self._out.get()
        if raw is None or self.closed:
            raise UpstreamClosedError("stdio server exited")
        return raw

    async def aclose(self) -> None:
        self.closed = True
        self._out.put_nowait(None)


def gateway_handler(
    audit: HeldAudit, *, registry: AppRegistry | None = None, limits: Limits | None = None
) -> MCPHandler:
    """The MCP handler of an app service, in this process: the app ``APP``, audit held by the test."""
    return MCPHandler(
        cluster_name="t",
        clock=Clock(),
        jwt_ca=None,
        registry=registry if registry is not None else AppRegistry([APP]),
        audit=audit,  # type: ignore[arg-type]
        redact=lambda v: v,
        limits=limits,
    )


@pytest.fixture
async def node(
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[MCPHandler, HeldAudit, RecordingStream]]:
    stream = RecordingStream()

    async def open_stream(*args: Any, **kwargs: Any) -> RecordingStream:
        return stream

    monkeypatch.setattr(mcp_http, "open_stream", open_stream)
    audit = HeldAudit()
    handler = gateway_handler(audit, limits=Limits(response_timeout=60.0))
    try:
        yield handler, audit, stream
    finally:
        await handler.aclose()


async def request(
    handler: MCPHandler, method: str, body: bytes = b"", sid: str = "", app: App = APP
) -> tuple[int, dict[bytes, bytes], bytes]:
    headers = {b"accept": b"application/json, text/event-stream", b"content-type": b"application/json"}
    if sid:
        headers[b"mcp-session-id"] = sid.encode()
    scope = {
        "type": "http",
        "method": method,
        "path": "/mcp/apps/rec",
        "headers": list(headers.items()),
        "client": ("192.0.2.1", 1),
        SCOPE_KEY: Handoff(ACTOR, app, "/", headers, jwt=("upstream-jwt", T0 + timedelta(hours=1))),
    }
    fed = False

    async def receive() -> dict[str, Any]:
        nonlocal fed
        if not fed:
            fed = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client stays
        raise AssertionError

    out: dict[str, Any] = {"body": b""}

    async def send(m: dict[str, Any]) -> None:
        if m["type"] == "http.response.start":
            out["status"], out["headers"] = m["status"], dict(m["headers"])
        else:
            out["body"] += m.get("body", b"")

    await handler(scope, receive, send)
    return out["status"], out["headers"], out["body"]


async def started(handler: MCPHandler, app: App = APP) -> str:
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "a", "version": "1"},
        },
    }
    status, headers, body = await request(handler, "POST", json.dumps(init).encode(), app=app)
    assert status == 200, body
    sid = headers[b"mcp-session-id"].decode()
    status, _, body = await request(
        handler, "POST", b'{"jsonrpc":"2.0","method":"notifications/initialized"}', sid, app
    )
    assert status == 202, body
    return sid


CALL = b'{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"echo","arguments":{}}}'


async def test_a_call_audited_while_its_session_ends_is_not_forwarded_and_is_answered_at_once(
    node: tuple[MCPHandler, HeldAudit, RecordingStream],
) -> None:
    handler, audit, stream = node
    sid = await started(handler)
    call_reached, call_release = audit.hold()  # the call's audit event: committed late
    call = asyncio.create_task(request(handler, "POST", CALL, sid))
    async with asyncio.timeout(10):
        await call_reached.wait()
    end_reached, end_release = audit.hold()  # the session's end event: being committed
    delete = asyncio.create_task(request(handler, "DELETE", b"", sid))
    async with asyncio.timeout(10):
        await end_reached.wait()
    call_release.set()  # the call's record commits while the session is ending
    called = asyncio.create_task(stream.called.wait())
    async with asyncio.timeout(10):
        await asyncio.wait({call, called}, return_when=asyncio.FIRST_COMPLETED)
    called.cancel()
    end_release.set()
    async with asyncio.timeout(10):
        assert (await delete)[0] == 200
    assert [m.get("method") for m in stream.sent if m.get("method") == "tools/call"] == [], (
        "a call reached the upstream of a session that had ended"
    )
    async with asyncio.timeout(10):  # not after the 60 s response timeout
        status, _, body = await call
    assert status in (404, 502), body
    assert [e.type for e in audit.events].count(SESSION_END) == 1
    (recorded,) = [e for e in audit.events if e.type == REQUEST and e.tool == "echo"]
    assert [ok for eid, ok, _ in audit.outcomes if eid == recorded.id] == [False]  # never ran


# ------------------------------------------------- a hostile streamable-HTTP upstream


@pytest.fixture
async def huge_event_upstream() -> AsyncIterator[str]:
    """A streamable-HTTP MCP server that answers tools/call with an SSE event over the parser's
    limit (16 MiB), or (``"arguments": {"plain": true}``) with a text 500; its base URL."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                msg = json.loads(await reader.readexactly(length)) if length else {}
                if "id" not in msg:
                    writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
                elif msg.get("method") == "tools/call" and msg["params"].get("arguments", {}).get("plain"):
                    writer.write(
                        b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n"
                        b"Content-Length: 4\r\n\r\noops"
                    )
                elif msg.get("method") == "tools/call":
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
                    )
                    writer.write(b"data: " + b"x" * (DEFAULT_MAX_EVENT_SIZE + 1024) + b"\n\n")
                    await writer.drain()
                    return
                else:
                    result = {"protocolVersion": "2025-06-18", "capabilities": {"tools": {}}}
                    body = json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": result}).encode()
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nMcp-Session-Id: up-1\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                    )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


async def test_an_upstream_event_over_the_limit_fails_the_call_and_is_not_blamed_on_the_client(
    monkeypatch: pytest.MonkeyPatch, huge_event_upstream: str
) -> None:
    app = App.model_validate(
        {
            "metadata": {"name": "rec", "labels": {"env": "dev"}},
            "spec": {"uri": f"mcp+{huge_event_upstream}/mcp"},
        }
    )
    monkeypatch.setattr(mcp_http, "open_stream", None)  # never a message stream here
    audit = HeldAudit()
    handler = gateway_handler(audit, registry=AppRegistry([app]), limits=Limits(response_timeout=60.0))
    refused: list[dict[str, Any]] = []
    monkeypatch.setattr(handler.refusals, "refused", lambda **kw: refused.append(kw))
    try:
        sid = await started(handler, app)
        async with asyncio.timeout(30):
            _, _, body = await request(handler, "POST", CALL, sid, app)
    finally:
        await handler.aclose()
    assert refused == [], "the upstream's oversized event was recorded as the client's refusal"
    (recorded,) = [e for e in audit.events if e.type == REQUEST and e.tool == "echo"]
    done = [(ok, why) for eid, ok, why in audit.outcomes if eid == recorded.id]
    assert len(done) == 1 and not done[0][0] and "larger than the limit" in done[0][1], done
    assert b"larger than the limit" in body, body[:300]


async def test_an_upstream_error_without_json_still_completes_the_calls_audit_event(
    monkeypatch: pytest.MonkeyPatch, huge_event_upstream: str
) -> None:
    """A text 500: the client got it, but the call stayed in flight in the engine (its audit
    event open until the session ended, its slot held: enough of them and the session refuses
    every request as too many in flight)."""
    app = App.model_validate(
        {
            "metadata": {"name": "rec", "labels": {"env": "dev"}},
            "spec": {"uri": f"mcp+{huge_event_upstream}/mcp"},
        }
    )
    audit = HeldAudit()
    handler = gateway_handler(audit, registry=AppRegistry([app]))
    plain = (
        b'{"jsonrpc":"2.0","id":6,"method":"tools/call","params":{"name":"echo","arguments":{"plain":true}}}'
    )
    try:
        sid = await started(handler, app)
        async with asyncio.timeout(30):
            status, _, body = await request(handler, "POST", plain, sid, app)
        assert (status, body) == (500, b"oops")
        (recorded,) = [e for e in audit.events if e.type == REQUEST and e.tool == "echo"]
        assert [ok for eid, ok, _ in audit.outcomes if eid == recorded.id] == [False]
        assert handler.sessions[sid].engine.in_flight == 0
    finally:
        await handler.aclose()


async def test_concurrent_initializes_do_not_open_more_sessions_than_the_users_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The per-user session limit was counted before the upstream was started and the session
    stored after: initializes sent together each passed the count (one stdio process each)."""
    gate, over = asyncio.Event(), asyncio.Event()
    opened: list[RecordingStream] = []

    async def open_stream(*args: Any, **kwargs: Any) -> RecordingStream:
        stream = RecordingStream()
        opened.append(stream)
        if len(opened) > 2:
            over.set()
        await gate.wait()  # starting a process takes a while
        return stream

    monkeypatch.setattr(mcp_http, "open_stream", open_stream)
    handler = gateway_handler(HeldAudit(), limits=Limits(sessions_per_user=2))
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18"}}
    try:
        tasks = {asyncio.create_task(request(handler, "POST", json.dumps(init).encode())) for _ in range(5)}
        watch = asyncio.create_task(over.wait())
        async with asyncio.timeout(10):
            while not watch.done() and sum(t.done() for t in tasks) < 3:
                await asyncio.wait({*tasks, watch}, return_when=asyncio.FIRST_COMPLETED)
        watch.cancel()
        gate.set()
        async with asyncio.timeout(10):
            statuses = sorted([(await t)[0] for t in tasks])
        assert len(opened) <= 2, f"{len(opened)} upstream processes started for a limit of 2"
        assert statuses == [200, 200, 429, 429, 429]
        assert len(handler.sessions) == 2
    finally:
        await handler.aclose()


async def test_access_revoked_while_a_session_opens_ends_it_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """The revocation watch checks the sessions in the table; one whose upstream was still
    starting was not there, and lived on (its stdio process too) until the idle reaper."""
    gate, entered = asyncio.Event(), asyncio.Event()
    stream = RecordingStream()

    async def open_stream(*args: Any, **kwargs: Any) -> RecordingStream:
        entered.set()
        await gate.wait()
        return stream

    async def nobody(user: str) -> None:
        return None

    monkeypatch.setattr(mcp_http, "open_stream", open_stream)
    audit = HeldAudit()
    handler = gateway_handler(audit)
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18"}}
    try:
        opening = asyncio.create_task(request(handler, "POST", json.dumps(init).encode()))
        async with asyncio.timeout(10):
            await entered.wait()
        await handler.end_unauthorised_sessions(nobody)  # the user was deleted meanwhile
        gate.set()
        async with asyncio.timeout(10):
            status, _, body = await opening
        assert handler.sessions == {}, "a session of a deleted user lives on"
        assert stream.closed, "its upstream process was left running"
        assert status == 404, body
        ends = [e for e in audit.events if e.type == SESSION_END]
        assert len(ends) == 1 and "no longer exists" in ends[0].error
        assert [m.get("method") for m in stream.sent] == []
    finally:
        await handler.aclose()


@pytest.mark.parametrize("sweep", ["app removed", "gateway shutting down"])
async def test_a_session_opening_during_a_sweep_is_swept_too(
    monkeypatch: pytest.MonkeyPatch, sweep: str
) -> None:
    """Sessions are ended by passes over the table (an app removed, the gateway shutting down);
    one whose upstream was still starting was not there, and kept its stdio process."""
    gate, entered = asyncio.Event(), asyncio.Event()
    stream = RecordingStream()

    async def open_stream(*args: Any, **kwargs: Any) -> RecordingStream:
        entered.set()
        await gate.wait()
        return stream

    monkeypatch.setattr(mcp_http, "open_stream", open_stream)
    audit = HeldAudit()
    registry = AppRegistry()
    registry.set_dynamic(APP)
    handler = gateway_handler(audit, registry=registry)
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18"}}
    closed = False
    try:
        opening = asyncio.create_task(request(handler, "POST", json.dumps(init).encode()))
        async with asyncio.timeout(10):
            await entered.wait()
        if sweep == "app removed":
            registry.remove_dynamic(APP.metadata.name)
            await handler.end_app_sessions(APP.metadata.name)
        else:
            await handler.aclose()
            closed = True
        gate.set()
        async with asyncio.timeout(10):
            status, _, body = await opening
        assert handler.sessions == {}, "a session opened during the sweep lives on"
        assert stream.closed, "its upstream process was left running"
        assert status == 404, body
        ends = [e for e in audit.events if e.type == SESSION_END]
        assert len(ends) == 1
        assert [m.get("method") for m in stream.sent] == []
    finally:
        if not closed:
            await handler.aclose()


class ChattyStream(RecordingStream):
    """Answers tools/call with 5000 progress notifications and no result."""

    def __init__(self) -> None:
        super().__init__()
        self.drained = asyncio.Event()

    async def send(self, raw: bytes) -> None:
        msg = json.loads(raw)
        if msg.get("method") != "tools/call":
            await super().send(raw)
            return
        self.sent.append(msg)
        note = {
            "jsonrpc": "2.0",
            "method": "notifications/progress",
            "params": {"progressToken": 1, "progress": 0},
        }
        for _ in range(5000):
            self._out.put_nowait(json.dumps(note).encode())

    async def receive(self) -> bytes:
        if self._out.empty():
            self.drained.set()
        return await super().receive()


async def test_a_chatty_upstream_and_a_slow_client_do_not_grow_memory_without_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = ChattyStream()

    async def open_stream(*args: Any, **kwargs: Any) -> RecordingStream:
        return stream

    monkeypatch.setattr(mcp_http, "open_stream", open_stream)
    handler = gateway_handler(HeldAudit())
    try:
        sid = await started(handler)
        stuck = asyncio.Event()
        headers = {b"accept": b"application/json, text/event-stream", b"mcp-session-id": sid.encode()}
        scope = {
            "type": "http",
            "method": "POST",
            "headers": list(headers.items()),
            "client": ("192.0.2.1", 1),
            SCOPE_KEY: Handoff(ACTOR, APP, "/", headers),
        }
        fed = False

        async def receive() -> dict[str, Any]:
            nonlocal fed
            if not fed:
                fed = True
                return {"type": "http.request", "body": CALL, "more_body": False}
            await asyncio.Event().wait()
            raise AssertionError

        async def send(m: dict[str, Any]) -> None:
            if m["type"] == "http.response.body":
                stuck.set()
                await asyncio.Event().wait()  # a client that does not read

        call = asyncio.create_task(handler(scope, receive, send))
        up = handler.sessions[sid].upstream
        async with asyncio.timeout(10):
            await stuck.wait()
            await up.paused.wait()  # type: ignore[attr-defined]
        queued = sum(q.qsize() for q in up.pending.values())  # type: ignore[attr-defined]
        assert queued <= QUEUE_BOUND, f"{queued} messages held for one client that does not read"
        held = stream._out.qsize()
        assert held > 0, "the rest stays with the upstream (backpressure), not dropped"
        stream.drained.clear()
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
        # The stalled request gone, the reader goes on: the rest is read (to the GET stream's log).
        async with asyncio.timeout(10):
            await stream.drained.wait()
        assert stream._out.empty()
    finally:
        await handler.aclose()
