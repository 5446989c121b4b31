"""The executor carries out engine commands: driven here with scripted batches, no sockets."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from bastion.appservice.executor import Collected, Executor
from bastion.appservice.sessions import GatewaySession
from bastion.appservice.upstreams import UpstreamIdentity
from bastion.audit.events import AuditEvent
from bastion.audit.store import Completion
from bastion.errors import BackendError
from bastion.identity import Identity
from bastion.metrics import app_metrics
from bastion.policy import AccessChecker
from bastion.protocol.jsonrpc import parse_message
from bastion.resources import App, Role
from bastion.session.engine import (
    CloseSession,
    CompleteAudit,
    ForwardToUpstream,
    Log,
    RecordAudit,
    SendToClient,
    Session,
)

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
APP = App.model_validate(
    {
        "metadata": {"name": "files", "labels": {"env": "dev"}},
        "spec": {"uri": "mcp+stdio://", "mcp": {"command": "x"}},
    }
)
ROLE = Role.model_validate(
    {"metadata": {"name": "dev"}, "spec": {"allow": {"app_labels": {"env": "dev"}, "mcp": {"tools": ["*"]}}}}
)


class Clock:
    def now(self) -> datetime:
        return T0


class Audit:
    """Records what the executor committed, in order; ``fail`` makes every record fail."""

    def __init__(self, *, fail: bool = False, fail_outcomes: bool = False) -> None:
        self.fail = fail
        self.fail_outcomes = fail_outcomes
        self.log: list[tuple[str, Any]] = []

    async def record(self, event: AuditEvent) -> None:
        if self.fail:
            raise BackendError("the audit store is down")
        self.log.append(("record", event.id))

    def completing(self, c: Completion) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.fail_outcomes:
            fut.set_exception(BackendError("the audit store is down"))
        else:
            self.log.append(("complete", (c.event_id, c.success, c.error, c.duration_ms)))
            fut.set_result(None)
        return fut


class Upstream:
    """The session's outlet: what it was handed, in order (shared with the audit log's order)."""

    defers = False

    def __init__(self, order: list[tuple[str, Any]]) -> None:
        self.order = order

    def to_client_after(self, barrier: asyncio.Future[None], cmd: SendToClient) -> None:
        raise AssertionError("not deferring")

    def to_client(self, cmd: SendToClient) -> None:
        self.order.append(("to_client", cmd.raw))

    def forward(self, cmd: ForwardToUpstream) -> None:
        self.order.append(("forward", cmd.raw))


def event(n: int) -> AuditEvent:
    return AuditEvent(
        id=f"ev-{n}",
        type="mcp.session.request",
        time=T0,
        success=True,
        cluster_name="c",
        user="alice",
        app="files",
        session_id="sess-1",
    )


def fwd(raw: bytes) -> ForwardToUpstream:
    return ForwardToUpstream(raw, parse_message(raw))


def make(audit: Audit) -> tuple[Executor, GatewaySession, list[tuple[str, str]]]:
    ended: list[tuple[str, str]] = []

    async def end(s: GatewaySession, reason: str) -> None:
        ended.append((s.id, reason))
        s.dead = reason

    identity = Identity(
        username="alice",
        cluster_name="c",
        roles=("dev",),
        traits={},
        expires=T0 + timedelta(hours=1),
        issued_at=T0,
    )
    engine = Session(
        app=APP,
        checker=AccessChecker([ROLE], {}),
        identity=identity,
        session_id="sess-1",
        cluster_name="c",
        transport="http->stdio",
        clock=Clock(),
    )
    s = GatewaySession(
        id="sess-1",
        user="alice",
        app=APP,
        engine=engine,
        ident=UpstreamIdentity(None, APP, "alice", ["dev"], {}, cache={}),
        m=app_metrics("files", "stdio"),
        upstream=Upstream(audit.log),  # type: ignore[arg-type]
    )
    return Executor(audit, end=end, upstream_failed=end), s, ended


async def test_every_command_is_carried_out_in_order() -> None:
    audit = Audit()
    ex, s, ended = make(audit)
    call = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}}'
    batch = [
        RecordAudit(event(1)),
        CompleteAudit("ev-0", False, "cancelled by the client", 3.0),
        SendToClient(b'{"jsonrpc":"2.0","method":"notifications/tools/list_changed"}'),
        Log("info", "something odd", {"size": 3}),
        RecordAudit(event(2)),
        fwd(call),
    ]
    assert await ex.run(s, batch)
    assert audit.log == [
        ("record", "ev-1"),
        ("complete", ("ev-0", False, "cancelled by the client", 3.0)),
        ("to_client", b'{"jsonrpc":"2.0","method":"notifications/tools/list_changed"}'),
        ("record", "ev-2"),
        ("forward", call),
    ]
    assert ended == []


async def test_an_audit_failure_stops_the_batch_before_its_forward() -> None:
    audit = Audit(fail=True)
    ex, s, _ = make(audit)
    out = Collected()
    ok = await ex.run(s, [RecordAudit(event(1)), fwd(b'{"jsonrpc":"2.0","id":1,"method":"ping"}')], out)
    assert ok is False
    assert out.fwd is None and out.replies == []  # nothing forwarded, nothing answered by the batch


async def test_close_session_ends_the_session_with_its_reason() -> None:
    ex, s, ended = make(Audit())
    assert await ex.run(s, [CloseSession("access to app 'files' was revoked: no role allows it")])
    assert ended == [("sess-1", "access to app 'files' was revoked: no role allows it")]


async def test_log_goes_to_the_structured_log(caplog: pytest.LogCaptureFixture) -> None:
    ex, s, _ = make(Audit())
    with caplog.at_level(logging.DEBUG, logger="bastion.app"):
        await ex.run(s, [Log("warning", "upstream sent garbage", {"size": 12}), Log("loud", "unknown level")])
    got = [(r.levelno, r.getMessage(), getattr(r, "session_id", None)) for r in caplog.records]
    assert got == [
        (logging.WARNING, "upstream sent garbage", "sess-1"),
        (logging.WARNING, "unknown level", "sess-1"),  # an unknown level is not dropped
    ]
    assert caplog.records[0].size == 12  # type: ignore[attr-defined]


async def test_a_collected_batch_keeps_its_answer_and_its_one_forward() -> None:
    audit = Audit()
    ex, s, _ = make(audit)
    out = Collected()
    one, two = (
        fwd(b'{"jsonrpc":"2.0","id":1,"method":"ping"}'),
        fwd(b'{"jsonrpc":"2.0","id":2,"method":"ping"}'),
    )
    assert await ex.run(s, [SendToClient(b"{}", 1), one, two], out)
    assert [r.raw for r in out.replies] == [b"{}"]
    assert out.fwd is one  # a second forward for one client message is never carried out
    assert audit.log == []  # the session's own outlet got nothing


async def test_a_real_engine_batch_is_recorded_before_it_is_forwarded() -> None:
    audit = Audit()
    ex, s, _ = make(audit)
    init = b'{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18"}}'
    out = Collected()
    assert await ex.run(s, s.engine.client_sent(init), out)
    assert out.fwd is not None and out.fwd.message.method == "initialize"
    answered = await ex.upstream_sent(
        s,
        b'{"jsonrpc":"2.0","id":0,"result":{"protocolVersion":"2025-06-18","capabilities":{}}}',
        Collected(),
    )
    assert answered
    call = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read"}}'
    out = Collected()
    assert await ex.run(s, s.engine.client_sent(call), out)
    recorded = [k for k, _ in audit.log if k == "record"]
    assert len(recorded) >= 2  # the session start and the call, both before the call goes out
    assert out.fwd is not None and out.fwd.raw == call


async def test_fail_request_answers_through_the_engine() -> None:
    audit = Audit()
    ex, s, _ = make(audit)
    init = b'{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18"}}'
    await ex.run(s, s.engine.client_sent(init), Collected())
    await ex.upstream_sent(s, b'{"jsonrpc":"2.0","id":0,"result":{"capabilities":{}}}', Collected())
    await ex.run(
        s,
        s.engine.client_sent(b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"a"}}'),
        Collected(),
    )
    body = await ex.fail_request(s, 7, "the upstream MCP server did not answer within 1s")
    assert parse_message(body).id == 7
    assert s.engine.in_flight == 0  # the request is over: its slot is free
    completes = [v for k, v in audit.log if k == "complete"]
    assert completes and completes[-1][1] is False  # its audit event completed as failed


async def test_an_answer_waits_for_its_outcome_to_be_durable() -> None:
    """Decision 0040: the client sees an answer only once its call's outcome is committed."""
    gate = asyncio.Event()
    reached = asyncio.Event()

    class Slow(Audit):
        def completing(self, c: Completion) -> asyncio.Future[None]:
            reached.set()
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            async def later() -> None:
                await gate.wait()
                self.log.append(("complete", (c.event_id, c.success, c.error, c.duration_ms)))
                fut.set_result(None)

            tasks.append(asyncio.create_task(later()))
            return fut

    tasks: list[asyncio.Task[None]] = []

    audit = Slow()
    ex, s, _ = make(audit)
    out = Collected()
    task = asyncio.create_task(
        ex.run(s, [CompleteAudit("ev-9", True, "", 2.0), SendToClient(b'{"jsonrpc":"2.0","id":9}', 9)], out)
    )
    await asyncio.wait_for(reached.wait(), 5)
    assert out.replies == []  # the outcome is not written yet: nothing answered
    gate.set()
    assert await asyncio.wait_for(task, 5)
    assert audit.log == [("complete", ("ev-9", True, "", 2.0))]
    assert [r.raw for r in out.replies] == [b'{"jsonrpc":"2.0","id":9}']


async def test_an_outcome_that_cannot_be_written_is_logged_and_the_answer_still_goes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ex, s, _ = make(Audit(fail_outcomes=True))
    out = Collected()
    with caplog.at_level(logging.ERROR, logger="bastion.app"):
        ok = await ex.run(s, [CompleteAudit("ev-9", True, "", 2.0), SendToClient(b"{}", 9)], out)
    assert ok  # the call ran upstream: its answer is the client's (the sweep marks the row)
    assert [r.raw for r in out.replies] == [b"{}"]
    assert [r.getMessage() for r in caplog.records] == [
        "audit unavailable; the outcome of a call was not recorded"
    ]
    assert caplog.records[0].event_id == "ev-9"  # type: ignore[attr-defined]


async def test_a_deferring_outlet_gets_the_answer_with_its_commit_and_the_batch_goes_on() -> None:
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    class Pending(Audit):
        def completing(self, c: Completion) -> asyncio.Future[None]:
            return gate

    class Deferring:
        defers = True

        def __init__(self) -> None:
            self.got: list[tuple[str, Any]] = []

        def to_client(self, cmd: SendToClient) -> None:
            self.got.append(("now", cmd.raw))

        def to_client_after(self, barrier: asyncio.Future[None], cmd: SendToClient) -> None:
            self.got.append(("after", (barrier, cmd.raw)))

        def forward(self, cmd: ForwardToUpstream) -> None:
            raise AssertionError("no forward")

    ex, s, _ = make(Pending())
    out = Deferring()
    ok = await asyncio.wait_for(
        ex.run(s, [SendToClient(b"1"), CompleteAudit("ev-9", True, "", 2.0), SendToClient(b"2")], out), 5
    )
    assert ok  # returned without the commit
    assert out.got == [("now", b"1"), ("after", (gate, b"2"))]
    gate.set_result(None)
