"""The session engine, driven by scripted playbooks: inputs in, exact commands out, no sockets."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

import bastion.session as session_pkg
from bastion.audit import events as ev
from bastion.audit.events import AuditEvent
from bastion.identity import Identity
from bastion.policy import AccessChecker
from bastion.protocol.jsonrpc import (
    ACCESS_DENIED,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    PARSE_ERROR,
    TOO_MANY_REQUESTS,
    UPSTREAM_UNAVAILABLE,
    parse_message,
)
from bastion.resources import App, Role
from bastion.session import engine
from bastion.session.engine import (
    QUIET_METHODS,
    CloseSession,
    Command,
    CompleteAudit,
    ForwardToUpstream,
    Log,
    RecordAudit,
    SendToClient,
    Session,
)

# ------------------------------------------------------------------ fixtures

T0 = datetime(2026, 11, 22, 12, 0, 0, tzinfo=UTC)
URI = "mcp+http://upstream.example:8080/mcp"
APP = App.model_validate({"metadata": {"name": "everything", "labels": {"env": "dev"}}, "spec": {"uri": URI}})
IDENTITY = Identity(
    username="alice",
    cluster_name="test",
    roles=("mcp-dev",),
    traits={},
    expires=T0 + timedelta(hours=1),
    issued_at=T0,
)


def role(name: str, tools: list[str], deny: list[str] | None = None, env: str = "dev") -> Role:
    return Role.model_validate(
        {
            "metadata": {"name": name},
            "spec": {
                "allow": {"app_labels": {"env": env}, "mcp": {"tools": tools}},
                "deny": {"mcp": {"tools": deny or []}},
            },
        }
    )


DEV = AccessChecker([role("mcp-dev", ["echo", "get_*"], deny=["get_secret"])], {})


class FakeClock:
    def __init__(self) -> None:
        self.t = T0

    def now(self) -> datetime:
        return self.t

    def advance(self, ms: float) -> None:
        self.t += timedelta(milliseconds=ms)


class Ids:
    """Deterministic audit event ids: ev-1, ev-2, ..."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f"ev-{self.n}"


@dataclass
class Harness:
    s: Session
    clock: FakeClock
    info: dict[str, Any] = field(default_factory=dict)

    def event(
        self, type_: str, id_: str, *, success: bool = True, time: datetime | None = None, **kw: Any
    ) -> AuditEvent:
        """The event we expect: session fields, then the message-specific ones."""
        values: dict[str, Any] = {
            "cluster_name": "test",
            "user": "alice",
            "app": "everything",
            "session_id": "sess-1",
            "roles": ("mcp-dev",),
            "app_uri": URI,
            "transport": "stdio",
            "remote_addr": "10.0.0.1",
            **self.info,
            **kw,
        }
        return AuditEvent(id=id_, type=type_, time=time or self.clock.t, success=success, **values)


def harness(checker: Any = DEV, **kw: Any) -> Harness:
    clock = FakeClock()
    options: dict[str, Any] = {
        "app": APP,
        "checker": checker,
        "identity": IDENTITY,
        "session_id": "sess-1",
        "cluster_name": "test",
        "transport": "stdio",
        "clock": clock,
        "remote_addr": "10.0.0.1",
        "new_id": Ids(),
        **kw,
    }
    return Harness(Session(**options), clock)


def req(id_: Any, method: str, params: Any = None) -> bytes:
    body: dict[str, Any] = {"jsonrpc": "2.0", "id": id_, "method": method}
    if params is not None:
        body["params"] = params
    return orjson.dumps(body)


def call(id_: Any, tool: str, arguments: Any = None) -> bytes:
    return req(id_, "tools/call", {"name": tool, "arguments": arguments or {}})


def notif(method: str, params: Any = None) -> bytes:
    body: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        body["params"] = params
    return orjson.dumps(body)


def res(id_: Any, result: Any) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "id": id_, "result": result})


def err(id_: Any, code: int, message: str) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "id": id_, "error": {"code": code, "message": message}})


def fwd(raw: bytes) -> ForwardToUpstream:
    return ForwardToUpstream(raw, parse_message(raw))


def error_of(cmd: Command) -> dict[str, Any]:
    assert isinstance(cmd, SendToClient)
    body = orjson.loads(cmd.raw)
    assert body["jsonrpc"] == "2.0"
    assert body["id"] == cmd.related_request_id
    error: dict[str, Any] = body["error"]
    return error


def forwarded(cmds: list[Command]) -> list[ForwardToUpstream]:
    return [c for c in cmds if isinstance(c, ForwardToUpstream)]


INIT_PARAMS = {
    "protocolVersion": "2025-06-18",
    "capabilities": {},
    "clientInfo": {"name": "test-client", "version": "1.0"},
}
INIT_RESULT = {
    "protocolVersion": "2025-06-18",
    "capabilities": {"tools": {"listChanged": True}},
    "serverInfo": {"name": "test-server", "version": "2.0"},
}
INFO: dict[str, Any] = {
    "client_info": "test-client/1.0",
    "server_info": "test-server/2.0",
    "protocol_version": "2025-06-18",
}


def initialized(checker: Any = DEV, **kw: Any) -> Harness:
    """A session after the handshake (events ev-1..ev-3 used); the clock is at T0 + 10 ms."""
    h = harness(checker, **kw)
    h.s.client_sent(req(0, "initialize", INIT_PARAMS))
    h.clock.advance(5)
    h.s.upstream_sent(res(0, INIT_RESULT))
    h.s.client_sent(notif("notifications/initialized"))
    h.clock.advance(5)
    h.info = dict(INFO)
    return h


# ---------------------------------------------------------------- public API


def test_public_names() -> None:
    for name in session_pkg.__all__:
        assert hasattr(session_pkg, name)
    assert {
        "ping",
        "tools/list",
        "resources/list",
        "resources/templates/list",
        "prompts/list",
    } == QUIET_METHODS


def test_commands_are_frozen() -> None:
    cmd = SendToClient(b"x", 1)
    with pytest.raises(AttributeError):
        cmd.raw = b"y"  # type: ignore[misc]


# ------------------------------------------------------- initialize, start, end


class TestLifecycle:
    def test_initialize_handshake(self) -> None:
        h = harness()
        init = req(0, "initialize", INIT_PARAMS)
        client_side: dict[str, Any] = {"client_info": "test-client/1.0", "protocol_version": "2025-06-18"}
        # The start event waits for the initialize result: only the request is recorded.
        assert h.s.client_sent(init) == [
            RecordAudit(
                h.event(
                    ev.REQUEST, "ev-1", method="initialize", request_id=0, params=INIT_PARAMS, **client_side
                )
            ),
            fwd(init),
        ]
        h.clock.advance(5)
        result = res(0, INIT_RESULT)
        assert h.s.upstream_sent(result) == [
            # Timed at the session's creation, so that it sorts first.
            RecordAudit(h.event(ev.SESSION_START, "ev-2", time=T0, **INFO)),
            CompleteAudit("ev-1", True, "", 5.0),
            SendToClient(result, 0),
        ]
        assert (h.s.client_info, h.s.server_info, h.s.protocol_version) == (
            "test-client/1.0",
            "test-server/2.0",
            "2025-06-18",
        )
        done = notif("notifications/initialized")
        assert h.s.client_sent(done) == [
            RecordAudit(h.event(ev.NOTIFICATION, "ev-3", method="notifications/initialized", **INFO)),
            fwd(done),
        ]

    def test_negotiated_version_wins(self) -> None:
        h = harness()
        h.s.client_sent(req(0, "initialize", {**INIT_PARAMS, "protocolVersion": "2099-01-01"}))
        assert h.s.protocol_version == "2099-01-01"
        cmds = h.s.upstream_sent(res(0, INIT_RESULT))
        start = cmds[0]
        assert isinstance(start, RecordAudit)
        assert start.event.protocol_version == "2025-06-18"

    def test_failed_initialize_still_starts_the_session(self) -> None:
        h = harness()
        h.s.client_sent(req(0, "initialize", INIT_PARAMS))
        failure = err(0, -32602, "unsupported protocol version")
        assert h.s.upstream_sent(failure) == [
            RecordAudit(
                h.event(
                    ev.SESSION_START, "ev-2", client_info="test-client/1.0", protocol_version="2025-06-18"
                )
            ),
            CompleteAudit("ev-1", False, "unsupported protocol version", 0.0),
            SendToClient(failure, 0),
        ]
        # No initialize result reached the client: a policy change sends nothing.
        assert h.s.policy_changed(DEV) == []

    def test_start_is_flushed_before_the_first_other_event(self) -> None:
        h = harness()
        h.clock.advance(3)
        raw = call(1, "echo")
        assert h.s.client_sent(raw) == [
            RecordAudit(h.event(ev.SESSION_START, "ev-1", time=T0)),
            RecordAudit(
                h.event(
                    ev.REQUEST,
                    "ev-2",
                    method="tools/call",
                    request_id=1,
                    tool="echo",
                    params=parse_message(raw).params,
                )
            ),
            fwd(raw),
        ]

    def test_quiet_requests_do_not_flush_the_start(self) -> None:
        h = harness()
        assert h.s.client_sent(req(1, "ping")) == [fwd(req(1, "ping"))]
        assert h.s.upstream_sent(res(1, {})) == [SendToClient(res(1, {}), 1)]

    def test_client_info_from_meta_without_initialize(self) -> None:
        # MCP 2026-07-28: no initialize; the client describes itself in _meta.
        h = harness()
        meta = {
            "io.modelcontextprotocol/clientInfo": {"name": "modern", "version": "3"},
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        }
        raw = req(1, "tools/call", {"name": "echo", "arguments": {}, "_meta": meta})
        cmds = h.s.client_sent(raw)
        start = cmds[0]
        assert isinstance(start, RecordAudit)
        assert start.event.type == ev.SESSION_START
        assert (start.event.client_info, start.event.protocol_version) == ("modern/3", "2026-07-28")

    def test_end(self) -> None:
        h = initialized()
        assert h.s.ended() == [RecordAudit(h.event(ev.SESSION_END, "ev-4"))]
        assert h.s.closed

    def test_end_with_error(self) -> None:
        h = initialized()
        assert h.s.ended("upstream exited with status 1") == [
            RecordAudit(h.event(ev.SESSION_END, "ev-4", success=False, error="upstream exited with status 1"))
        ]

    def test_end_before_anything_records_start_and_end(self) -> None:
        h = harness()
        h.clock.advance(1)
        assert h.s.ended() == [
            RecordAudit(h.event(ev.SESSION_START, "ev-1", time=T0)),
            RecordAudit(h.event(ev.SESSION_END, "ev-2")),
        ]

    def test_end_fails_requests_in_flight(self) -> None:
        h = initialized()
        h.s.client_sent(call(1, "echo"))  # ev-4
        h.s.client_sent(req(2, "tools/list"))  # quiet: no event yet
        h.clock.advance(7)
        cmds = h.s.ended("upstream crashed")
        why = "the session ended before the upstream MCP server answered (upstream crashed)"
        assert cmds[0] == CompleteAudit("ev-4", False, why, 7.0)
        assert error_of(cmds[1]) == {"code": UPSTREAM_UNAVAILABLE, "message": why}
        assert cmds[2] == RecordAudit(
            h.event(
                ev.REQUEST,
                "ev-5",
                success=False,
                time=T0 + timedelta(milliseconds=10),
                method="tools/list",
                request_id=2,
                error=why,
                duration_ms=7.0,
            )
        )
        assert error_of(cmds[3])["code"] == UPSTREAM_UNAVAILABLE
        assert cmds[4] == RecordAudit(
            h.event(ev.SESSION_END, "ev-6", success=False, error="upstream crashed")
        )
        assert len(cmds) == 5
        assert h.s.in_flight == 0

    def test_nothing_happens_after_the_end(self) -> None:
        h = initialized()
        h.s.ended()
        assert h.s.ended() == []
        assert h.s.policy_changed(DEV) == []
        for cmds in (h.s.client_sent(call(1, "echo")), h.s.upstream_sent(res(1, {}))):
            assert [type(c) for c in cmds] == [Log]


# ------------------------------------------------------------------ tools/call


class TestToolCalls:
    def test_allowed_call_round_trip(self) -> None:
        h = initialized()
        raw = call(7, "echo", {"message": "hi"})
        # Audit before forward: the runner commits ev-4 before it sends the bytes.
        assert h.s.client_sent(raw) == [
            RecordAudit(
                h.event(
                    ev.REQUEST,
                    "ev-4",
                    method="tools/call",
                    request_id=7,
                    tool="echo",
                    params={"name": "echo", "arguments": {"message": "hi"}},
                )
            ),
            fwd(raw),
        ]
        assert h.s.in_flight == 1
        h.clock.advance(12.5)
        answer = res(7, {"content": [{"type": "text", "text": "Echo: hi"}]})
        cmds = h.s.upstream_sent(answer)
        assert cmds == [CompleteAudit("ev-4", True, "", 12.5), SendToClient(answer, 7)]
        assert isinstance(cmds[1], SendToClient)
        assert cmds[1].raw is answer  # the upstream's bytes, untouched
        assert h.s.in_flight == 0

    def test_forwarded_bytes_are_the_message_judged(self) -> None:
        # Compact JSON is forwarded as it came; anything else as its canonical
        # serialisation: one line, whatever whitespace the client used.
        h = initialized()
        compact = b'{"jsonrpc":"2.0","id":"b","method":"tools/call","params":{"name":"echo"}}'
        (forward,) = forwarded(h.s.client_sent(compact))
        assert forward.raw is compact
        raw = b'{ "jsonrpc": "2.0", "id": "a",\n "method": "tools/call", "params": {"name": "echo"} }'
        (forward,) = forwarded(h.s.client_sent(raw))
        assert forward.raw == b'{"jsonrpc":"2.0","id":"a","method":"tools/call","params":{"name":"echo"}}'

    def test_failed_call(self) -> None:
        h = initialized()
        h.s.client_sent(call("x", "get_weather"))
        h.clock.advance(2)
        failure = err("x", -32000, "weather service down")
        assert h.s.upstream_sent(failure) == [
            CompleteAudit("ev-4", False, "weather service down", 2.0),
            SendToClient(failure, "x"),
        ]

    def test_error_without_message(self) -> None:
        h = initialized()
        h.s.client_sent(call(1, "echo"))
        raw = b'{"jsonrpc":"2.0","id":1,"error":{"code":-32000}}'
        assert h.s.upstream_sent(raw)[0] == CompleteAudit("ev-4", False, "error code -32000", 0.0)

    def test_tool_error_result_is_a_successful_call(self) -> None:
        # isError results are the tool's own failure, delivered by a working protocol exchange.
        h = initialized()
        h.s.client_sent(call(1, "echo"))
        answer = res(1, {"content": [], "isError": True})
        assert h.s.upstream_sent(answer)[0] == CompleteAudit("ev-4", True, "", 0.0)

    @pytest.mark.parametrize(
        ("tool", "reason"),
        [
            ("delete_everything", 'no role allows tool "delete_everything" on app "everything"'),
            ("get_secret", 'tool "get_secret" is denied by role "mcp-dev"'),  # deny wins over get_*
        ],
    )
    def test_denied_call_is_answered_and_never_forwarded(self, tool: str, reason: str) -> None:
        h = initialized()
        raw = call(9, tool, {"path": "/"})
        cmds = h.s.client_sent(raw)
        assert forwarded(cmds) == []
        assert cmds[0] == RecordAudit(
            h.event(
                ev.REQUEST,
                "ev-4",
                success=False,
                method="tools/call",
                request_id=9,
                tool=tool,
                params={"name": tool, "arguments": {"path": "/"}},
                error=f"access denied: {reason}",
                duration_ms=0.0,
            )
        )
        assert error_of(cmds[1]) == {
            "code": INVALID_PARAMS,
            "message": f'tool "{tool}" is not allowed for user "alice" on app "everything": {reason}. '
            "Run `bastion mcp tools everything` to see the tools you may call.",
        }
        assert len(cmds) == 2
        assert h.s.in_flight == 0
        # The id is free again (nothing is pending for it), and an answer to it is unmatched.
        assert [type(c) for c in h.s.upstream_sent(res(9, {}))] == [Log]

    @pytest.mark.parametrize(
        "params",
        [None, {}, {"name": 5}, {"name": None}, {"name": ["echo"]}, ["echo", {}]],
    )
    def test_call_without_a_string_name(self, params: Any) -> None:
        h = initialized()
        cmds = h.s.client_sent(req(3, "tools/call", params))
        assert forwarded(cmds) == []
        assert isinstance(cmds[0], RecordAudit)
        assert not cmds[0].event.success
        assert error_of(cmds[1]) == {
            "code": INVALID_PARAMS,
            "message": 'tools/call needs "params.name": the tool name, a string',
        }

    def test_params_are_redacted_before_the_event_exists(self) -> None:
        def redact(value: Any) -> Any:
            return {k: ("<REDACTED>" if k == "arguments" else v) for k, v in value.items()}

        h = initialized(redact=redact)
        cmds = h.s.client_sent(call(1, "echo", {"password": "hunter2"}))
        assert isinstance(cmds[0], RecordAudit)
        assert cmds[0].event.params == {"name": "echo", "arguments": "<REDACTED>"}

    def test_array_params_are_audited_as_sent(self) -> None:
        h = initialized()
        cmds = h.s.client_sent(req(1, "custom/method", [1, 2]))
        assert isinstance(cmds[0], RecordAudit)
        assert cmds[0].event.params == [1, 2]


# ------------------------------------------------------------------ smuggling


SMUGGLING = [
    # A case-insensitive upstream would read tools/call, or the denied tool, or another id.
    b'{"jsonrpc":"2.0","id":1,"method":"ping","Method":"tools/call","params":{"name":"get_secret"}}',
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"Name":"get_secret","name":"echo"}}',
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","NAME":"get_secret"}}',
    b'{"jsonrpc":"2.0","ID":1,"id":2,"method":"tools/call","params":{"name":"echo"}}',
    # A first-wins upstream would read the denied one.
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","method":"ping","params":{"name":"get_secret"}}',
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_secret","name":"echo"}}',
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_secret","na\\u006de":"echo"}}',
]


class TestSmuggling:
    @pytest.mark.parametrize("raw", SMUGGLING)
    def test_ambiguous_messages_are_refused(self, raw: bytes) -> None:
        h = initialized()
        cmds = h.s.client_sent(raw)
        assert forwarded(cmds) == []
        (record, answer) = cmds
        assert isinstance(record, RecordAudit)
        assert record.event.type == ev.INVALID_REQUEST
        assert not record.event.success
        assert record.event.extra == {"size": len(raw), "rpc_code": INVALID_REQUEST}
        assert error_of(answer)["code"] == INVALID_REQUEST
        assert "refused" in error_of(answer)["message"]

    def test_batch_is_refused_as_a_whole(self) -> None:
        h = initialized()
        raw = b'[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"tools/call"}]'
        cmds = h.s.client_sent(raw)
        assert forwarded(cmds) == []
        assert cmds[0] == RecordAudit(
            h.event(
                ev.INVALID_REQUEST,
                "ev-4",
                success=False,
                error="JSON-RPC batches (arrays) are not supported: MCP removed batching in protocol "
                "version 2025-06-18; send one message at a time",
                extra={"size": len(raw), "rpc_code": INVALID_REQUEST},
            )
        )
        assert cmds[1] == SendToClient(
            orjson.dumps(
                {
                    "jsonrpc": "2.0",
                    "id": None,
                    "error": {"code": INVALID_REQUEST, "message": cmds[0].event.error},
                }
            ),
            None,
        )

    def test_unparsable_bytes(self) -> None:
        h = initialized()
        cmds = h.s.client_sent(b'{"jsonrpc":"2.0","id":1,')
        assert forwarded(cmds) == []
        assert error_of(cmds[1])["code"] == PARSE_ERROR
        assert isinstance(cmds[0], RecordAudit)
        assert cmds[0].event.request_id is None

    def test_readable_id_is_answered(self) -> None:
        h = initialized()
        cmds = h.s.client_sent(b'{"jsonrpc":"1.0","id":"r-5","method":"tools/call"}')
        assert isinstance(cmds[1], SendToClient)
        assert cmds[1].related_request_id == "r-5"
        assert error_of(cmds[1])["code"] == INVALID_REQUEST
        assert isinstance(cmds[0], RecordAudit)
        assert (cmds[0].event.method, cmds[0].event.request_id) == ("tools/call", "r-5")


# ------------------------------------------------------------------ tools/list

TOOLS = [
    {"name": "echo", "description": "Echo", "inputSchema": {"type": "object"}},
    {"name": "get_weather", "inputSchema": {"type": "object"}},
    {"name": "get_secret", "inputSchema": {"type": "object"}},
    {"name": "delete_everything", "inputSchema": {"type": "object"}},
]


class TestToolsList:
    def listed(self, h: Harness, result: Any, id_: Any = 2) -> list[Command]:
        assert h.s.client_sent(req(id_, "tools/list")) == [fwd(req(id_, "tools/list"))]  # quiet: no event
        return h.s.upstream_sent(res(id_, result))

    def test_filtered(self) -> None:
        h = initialized()
        cmds = self.listed(h, {"tools": TOOLS})
        # A successful list is not audited; the result is re-serialised with the allowed tools only.
        assert cmds == [SendToClient(res(2, {"tools": TOOLS[:2]}), 2)]

    def test_nothing_allowed_is_an_empty_list(self) -> None:
        h = initialized(AccessChecker([role("none", [])], {}))
        (cmd,) = self.listed(h, {"tools": TOOLS})
        assert isinstance(cmd, SendToClient)
        assert cmd.raw == b'{"jsonrpc":"2.0","id":2,"result":{"tools":[]}}'

    def test_pagination(self) -> None:
        h = initialized()
        page1 = self.listed(h, {"tools": TOOLS[2:], "nextCursor": "p2", "_meta": {"k": 1}}, id_=2)
        assert page1 == [SendToClient(res(2, {"tools": [], "nextCursor": "p2", "_meta": {"k": 1}}), 2)]
        page2 = h.s.client_sent(req(3, "tools/list", {"cursor": "p2"}))
        assert page2 == [fwd(req(3, "tools/list", {"cursor": "p2"}))]
        assert h.s.upstream_sent(res(3, {"tools": TOOLS[:2]})) == [
            SendToClient(res(3, {"tools": TOOLS[:2]}), 3)
        ]

    def test_always_reserialised(self) -> None:
        # Even when everything is allowed: the client reads exactly what was checked.
        h = initialized(AccessChecker([role("all", ["*"])], {}))
        h.s.client_sent(req(2, "tools/list"))
        raw = b'{"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"get_secret","name":"echo"}]}}'
        assert h.s.upstream_sent(raw) == [SendToClient(res(2, {"tools": [{"name": "echo"}]}), 2)]

    def test_strange_entries_are_dropped(self) -> None:
        h = initialized(AccessChecker([role("all", ["*"])], {}))
        tools = [
            "echo",
            None,
            {"description": "no name"},
            {"name": 5},
            {"name": "echo", "Name": "get_secret"},  # a case-insensitive client might see get_secret
            {"name": "fine"},
        ]
        assert self.listed(h, {"tools": tools, "Tools": [{"name": "hidden"}]}) == [
            SendToClient(res(2, {"tools": [{"name": "fine"}]}), 2)
        ]

    @pytest.mark.parametrize(
        "result",
        [{}, {"tools": None}, {"tools": {"name": "echo"}}, {"tools": "echo"}, [], "tools", None],
    )
    def test_malformed_result_is_replaced_by_an_error(self, result: Any) -> None:
        h = initialized()
        h.clock.advance(1)
        cmds = self.listed(h, result)
        text = (
            "the upstream MCP server sent a tools/list result without a tools list; "
            "the gateway does not pass on tool lists it cannot filter"
        )
        # A quiet method is recorded when it fails.
        assert cmds[0] == RecordAudit(
            h.event(
                ev.REQUEST,
                "ev-4",
                success=False,
                method="tools/list",
                request_id=2,
                error=text,
                duration_ms=0.0,
            )
        )
        assert error_of(cmds[1]) == {"code": INTERNAL_ERROR, "message": text}
        assert len(cmds) == 2

    def test_error_passes_through_and_is_recorded(self) -> None:
        h = initialized()
        h.s.client_sent(req(2, "tools/list", {"cursor": "bad"}))
        h.clock.advance(4)
        failure = err(2, -32602, "invalid cursor")
        assert h.s.upstream_sent(failure) == [
            RecordAudit(
                h.event(
                    ev.REQUEST,
                    "ev-4",
                    success=False,
                    time=T0 + timedelta(milliseconds=10),
                    method="tools/list",
                    request_id=2,
                    params={"cursor": "bad"},
                    error="invalid cursor",
                    duration_ms=4.0,
                )
            ),
            SendToClient(failure, 2),
        ]

    def test_other_lists_are_not_filtered(self) -> None:
        h = initialized()
        h.s.client_sent(req(2, "resources/list"))
        answer = res(2, {"resources": [{"uri": "file:///secret", "name": "secret"}]})
        assert h.s.upstream_sent(answer) == [SendToClient(answer, 2)]

    def test_a_tools_list_result_under_another_id_is_not_mistaken(self) -> None:
        h = initialized()
        h.s.client_sent(req(2, "tools/list"))
        h.s.client_sent(req(3, "resources/list"))
        # Answers arrive out of order; each is matched by id.
        answer3 = res(3, {"resources": []})
        assert h.s.upstream_sent(answer3) == [SendToClient(answer3, 3)]
        assert h.s.upstream_sent(res(2, {"tools": TOOLS})) == [SendToClient(res(2, {"tools": TOOLS[:2]}), 2)]


# ----------------------------------------------------------- response matching


class TestMatching:
    def test_unknown_id_is_dropped(self) -> None:
        h = initialized()
        assert h.s.upstream_sent(res(99, {"tools": TOOLS})) == [
            Log(
                "warning",
                "dropped a response from the upstream to a request the client did not send "
                "or that was already answered",
                {"id": 99},
            )
        ]

    def test_second_answer_is_dropped(self) -> None:
        h = initialized()
        h.s.client_sent(req(1, "tools/list"))
        assert len(h.s.upstream_sent(res(1, {"tools": []}))) == 1
        assert [type(c) for c in h.s.upstream_sent(res(1, {"tools": TOOLS}))] == [Log]

    def test_id_types_are_distinct(self) -> None:
        h = initialized()
        h.s.client_sent(req(1, "tools/list"))
        assert [type(c) for c in h.s.upstream_sent(res("1", {"tools": TOOLS}))] == [Log]

    def test_null_id_error_is_dropped(self) -> None:
        h = initialized()
        h.s.client_sent(req(1, "ping"))
        assert [type(c) for c in h.s.upstream_sent(err(None, -32700, "parse error"))] == [Log]

    def test_duplicate_id_in_flight_is_refused(self) -> None:
        h = initialized()
        first = call(1, "echo")
        h.s.client_sent(first)  # ev-4
        cmds = h.s.client_sent(call(1, "get_weather"))
        assert forwarded(cmds) == []
        assert isinstance(cmds[0], RecordAudit)
        assert (cmds[0].event.type, cmds[0].event.success) == (ev.INVALID_REQUEST, False)
        assert error_of(cmds[1]) == {
            "code": INVALID_REQUEST,
            "message": "request id 1 is already in use by a request in flight in this session; "
            "use a new id for each request",
        }
        # The first request is still matched properly.
        assert h.s.upstream_sent(res(1, {}))[0] == CompleteAudit("ev-4", True, "", 0.0)

    def test_in_flight_limit(self) -> None:
        h = initialized(max_in_flight=2)
        h.s.client_sent(call(1, "echo"))  # ev-4
        h.s.client_sent(req(2, "ping"))
        cmds = h.s.client_sent(req(3, "tools/list"))
        assert forwarded(cmds) == []
        assert cmds[0] == RecordAudit(
            h.event(
                ev.REQUEST,
                "ev-5",
                success=False,
                method="tools/list",
                request_id=3,
                error="too many requests in flight in this session (limit 2); wait for some to be answered",
                duration_ms=0.0,
            )
        )
        assert error_of(cmds[1])["code"] == TOO_MANY_REQUESTS
        # Notifications and responses are not limited.
        assert forwarded(
            h.s.client_sent(notif("notifications/progress", {"progressToken": 1, "progress": 1}))
        )
        h.s.upstream_sent(req("s-1", "sampling/createMessage"))
        assert forwarded(h.s.client_sent(res("s-1", {})))
        # An answer frees a slot.
        h.s.upstream_sent(res(2, {}))
        assert forwarded(h.s.client_sent(req(3, "tools/list")))

    def test_invalid_limit(self) -> None:
        with pytest.raises(ValueError, match="positive"):
            harness(max_in_flight=0)


class TestCancellation:
    def cancel(self, id_: Any) -> bytes:
        return notif("notifications/cancelled", {"requestId": id_, "reason": "user hit stop"})

    def test_cancel_completes_the_event_and_drops_a_late_answer(self) -> None:
        h = initialized()
        h.s.client_sent(call(1, "echo"))  # ev-4
        h.clock.advance(3)
        cancel = self.cancel(1)
        assert h.s.client_sent(cancel) == [
            RecordAudit(
                h.event(
                    ev.NOTIFICATION,
                    "ev-5",
                    method="notifications/cancelled",
                    params={"requestId": 1, "reason": "user hit stop"},
                )
            ),
            CompleteAudit("ev-4", False, "cancelled by the client", 3.0),
            fwd(cancel),
        ]
        assert [type(c) for c in h.s.upstream_sent(res(1, {}))] == [Log]
        assert h.s.in_flight == 0

    def test_id_stays_reserved_until_the_upstream_answers(self) -> None:
        # Otherwise a late tools/list result could be matched to a new request
        # with the same id (and skip the filter), or the other way round.
        h = initialized()
        h.s.client_sent(req(1, "tools/list"))
        h.s.client_sent(self.cancel(1))
        cmds = h.s.client_sent(call(1, "echo"))
        assert forwarded(cmds) == []
        assert error_of(cmds[-1])["code"] == INVALID_REQUEST
        h.s.upstream_sent(res(1, {"tools": TOOLS}))  # the late answer, dropped
        assert forwarded(h.s.client_sent(call(1, "echo")))

    def test_cancelled_slots_are_reused_when_full(self) -> None:
        h = initialized(max_in_flight=2)
        h.s.client_sent(req(1, "ping"))
        h.s.client_sent(req(2, "ping"))
        h.s.client_sent(self.cancel(1))
        assert forwarded(h.s.client_sent(req(3, "ping")))  # evicts cancelled 1
        assert h.s.in_flight == 2
        assert error_of(h.s.client_sent(req(4, "ping"))[-1])["code"] == TOO_MANY_REQUESTS

    @pytest.mark.parametrize("params", [{"requestId": 42}, {"requestId": None}, {"requestId": [1]}, {}])
    def test_cancel_of_nothing_is_just_forwarded(self, params: Any) -> None:
        h = initialized()
        raw = notif("notifications/cancelled", params)
        assert [type(c) for c in h.s.client_sent(raw)] == [RecordAudit, ForwardToUpstream]

    def test_cancel_twice(self) -> None:
        h = initialized()
        h.s.client_sent(call(1, "echo"))
        h.s.client_sent(self.cancel(1))
        assert [type(c) for c in h.s.client_sent(self.cancel(1))] == [RecordAudit, ForwardToUpstream]


# ------------------------------------------------------- passing things through


class TestPassThrough:
    def test_server_notifications_and_requests(self) -> None:
        h = initialized()
        for raw in (
            notif("notifications/tools/list_changed"),
            notif("notifications/progress", {"progressToken": 1, "progress": 0.5}),
            req("s-1", "sampling/createMessage", {"messages": [], "maxTokens": 10}),
            req("s-2", "roots/list"),
        ):
            assert h.s.upstream_sent(raw) == [SendToClient(raw)]

    def test_client_responses_to_the_upstreams_requests_are_forwarded_not_audited(self) -> None:
        h = initialized()
        h.s.upstream_sent(req("s-1", "sampling/createMessage"))
        h.s.upstream_sent(req("s-2", "elicitation/create"))
        for raw in (res("s-1", {"role": "assistant"}), err("s-2", -1, "declined")):
            assert h.s.client_sent(raw) == [fwd(raw)]

    def test_a_client_response_to_no_open_request_is_refused_and_audited(self) -> None:
        h = initialized()
        h.s.upstream_sent(req("s-1", "roots/list"))
        assert forwarded(h.s.client_sent(res("s-1", {"roots": []})))
        for raw in (res("s-1", {"again": True}), res("never", {"exfil": 1}), err(None, -1, "x")):
            cmds = h.s.client_sent(raw)
            assert forwarded(cmds) == []
            (audit,) = [c for c in cmds if isinstance(c, RecordAudit)]
            assert audit.event.type == ev.INVALID_REQUEST and not audit.event.success
            assert "not forwarded" in audit.event.error
            assert error_of(cmds[-1])["code"] == INVALID_REQUEST

    def test_other_requests_are_forwarded_and_audited(self) -> None:
        h = initialized()
        raw = req(5, "resources/read", {"uri": "file:///a"})
        assert h.s.client_sent(raw) == [
            RecordAudit(
                h.event(
                    ev.REQUEST, "ev-4", method="resources/read", request_id=5, params={"uri": "file:///a"}
                )
            ),
            fwd(raw),
        ]

    @pytest.mark.parametrize("method", sorted(QUIET_METHODS))
    def test_quiet_methods_are_forwarded_without_an_event(self, method: str) -> None:
        h = initialized()
        assert h.s.client_sent(req(5, method)) == [fwd(req(5, method))]

    def test_ping_failure_is_recorded(self) -> None:
        h = initialized()
        h.s.client_sent(req(5, "ping"))
        cmds = h.s.upstream_sent(err(5, -32603, "busy"))
        assert isinstance(cmds[0], RecordAudit)
        assert (cmds[0].event.method, cmds[0].event.success, cmds[0].event.error) == ("ping", False, "busy")

    def test_invalid_upstream_message_is_dropped(self) -> None:
        h = initialized()
        assert [type(c) for c in h.s.upstream_sent(b"not json")] == [Log]
        assert [type(c) for c in h.s.upstream_sent(b"[1,2]")] == [Log]

    def test_invalid_answer_to_a_tracked_request_fails_it(self) -> None:
        h = initialized()
        h.s.client_sent(call(1, "echo"))  # ev-4
        cmds = h.s.upstream_sent(b'{"jsonrpc":"2.0","id":1,"result":{},"Result":{"x":1}}')
        text = (
            "the upstream MCP server sent an invalid response: "
            'member "Result" is a case variant of "result"; refused as ambiguous'
        )
        assert cmds[0] == CompleteAudit("ev-4", False, text, 0.0)
        assert error_of(cmds[1]) == {"code": INTERNAL_ERROR, "message": text}
        assert h.s.in_flight == 0

    def test_invalid_server_request_with_a_colliding_id_fails_nothing(self) -> None:
        h = initialized()
        h.s.client_sent(call(1, "echo"))
        assert [
            type(c) for c in h.s.upstream_sent(b'{"jsonrpc":"2.0","id":1,"method":"x","Method":"y"}')
        ] == [Log]
        assert h.s.in_flight == 1


# ----------------------------------------------------------------- policy change


class TestPolicyChange:
    def test_change_tells_the_client_to_list_again(self) -> None:
        h = initialized()
        only_echo = AccessChecker([role("echo-only", ["echo"])], {})
        assert h.s.policy_changed(only_echo) == [
            SendToClient(b'{"jsonrpc":"2.0","method":"notifications/tools/list_changed"}')
        ]
        # The new checker decides from now on, and events carry the new roles.
        cmds = h.s.client_sent(call(1, "get_weather"))
        assert forwarded(cmds) == []
        assert isinstance(cmds[0], RecordAudit)
        assert cmds[0].event.roles == ("echo-only",)
        h.s.client_sent(req(2, "tools/list"))
        assert h.s.upstream_sent(res(2, {"tools": TOOLS})) == [SendToClient(res(2, {"tools": TOOLS[:1]}), 2)]

    def test_before_initialize_nothing_is_sent(self) -> None:
        h = harness()
        assert h.s.policy_changed(DEV) == []

    def test_in_flight_list_is_filtered_with_the_new_policy(self) -> None:
        h = initialized()
        h.s.client_sent(req(2, "tools/list"))
        h.s.policy_changed(AccessChecker([role("echo-only", ["echo"])], {}))
        assert h.s.upstream_sent(res(2, {"tools": TOOLS})) == [SendToClient(res(2, {"tools": TOOLS[:1]}), 2)]

    def test_revoked_app_closes_the_session(self) -> None:
        h = initialized()
        prod_only = AccessChecker([role("prod", ["*"], env="prod")], {})
        assert h.s.policy_changed(prod_only) == [
            CloseSession("access to app 'everything' was revoked: app \"everything\" is not accessible")
        ]
        # Until the runner closes it, nothing more is forwarded.
        cmds = h.s.client_sent(call(1, "echo"))
        assert forwarded(cmds) == []
        assert error_of(cmds[-1]) == {
            "code": ACCESS_DENIED,
            "message": 'user "alice" may not use app "everything": app "everything" is not accessible',
        }
        assert [type(c) for c in h.s.client_sent(notif("notifications/initialized"))] == [Log]
        assert [type(c) for c in h.s.client_sent(res("s-1", {}))] == [Log]
        # Access restored: forwarding resumes.
        assert h.s.policy_changed(DEV)[0] == SendToClient(
            b'{"jsonrpc":"2.0","method":"notifications/tools/list_changed"}'
        )
        assert forwarded(h.s.client_sent(call(2, "echo")))

    def test_session_on_an_inaccessible_app_forwards_nothing(self) -> None:
        h = harness(AccessChecker([role("prod", ["*"], env="prod")], {}))
        for raw in (req(0, "initialize", INIT_PARAMS), req(1, "ping"), call(2, "echo")):
            cmds = h.s.client_sent(raw)
            assert forwarded(cmds) == []
            assert error_of(cmds[-1])["code"] == ACCESS_DENIED


# --------------------------------------------------------------- audit events


class TestEvents:
    def test_every_event_carries_the_session(self) -> None:
        h = initialized()
        assert h.s.upstream_session_known("up-77") == []
        cmds = h.s.client_sent(call(1, "echo"))
        assert isinstance(cmds[0], RecordAudit)
        e = cmds[0].event
        assert (e.user, e.roles, e.app, e.app_uri, e.cluster_name) == (
            "alice",
            ("mcp-dev",),
            "everything",
            URI,
            "test",
        )
        assert (e.session_id, e.upstream_session_id, e.transport, e.remote_addr) == (
            "sess-1",
            "up-77",
            "stdio",
            "10.0.0.1",
        )
        assert (e.client_info, e.server_info, e.protocol_version) == (
            "test-client/1.0",
            "test-server/2.0",
            "2025-06-18",
        )

    def test_fast_events_equal_constructed_ones(self) -> None:
        h = initialized()
        cmds = h.s.client_sent(call(1, "echo", {"a": 1}))
        assert isinstance(cmds[0], RecordAudit)
        built = cmds[0].event
        assert type(built) is AuditEvent
        again = AuditEvent(**{f.name: getattr(built, f.name) for f in fields(AuditEvent)})
        assert built == again
        assert repr(built) == repr(again)
        assert built.to_dict() == again.to_dict()
        assert list(built.to_dict()) == list(again.to_dict())
        with pytest.raises(AttributeError):
            built.success = False  # type: ignore[misc]

    def test_constructor_fallback_builds_the_same_events(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # Used if AuditEvent ever gains __slots__ or __post_init__.
        fast = initialized().s.client_sent(call(1, "echo"))
        monkeypatch.setattr(engine, "_FAST_EVENTS", False)
        slow = initialized().s.client_sent(call(1, "echo"))
        assert fast == slow

    def test_events_do_not_share_mutable_defaults(self) -> None:
        h = initialized()
        a = h.s.client_sent(call(1, "echo"))[0]
        b = h.s.client_sent(call(2, "echo"))[0]
        assert isinstance(a, RecordAudit)
        assert isinstance(b, RecordAudit)
        assert a.event.headers == {} and a.event.headers is not b.event.headers
        assert a.event.extra is not b.event.extra

    def test_default_event_ids(self) -> None:
        h = harness(new_id=None)
        ids = set()
        for i in range(2000):
            cmds = h.s.client_sent(call(i, "echo"))
            record = cmds[-2]
            assert isinstance(record, RecordAudit)
            ids.add(record.event.id)
            h.s.upstream_sent(res(i, {}))
        assert len(ids) == 2000
        for event_id in list(ids)[:50]:
            assert len(event_id) == 32
            assert uuid.UUID(hex=event_id).version == 4
            assert uuid.UUID(hex=event_id).variant == uuid.RFC_4122

    def test_event_ids_reseed_before_the_counter_overflows(self) -> None:
        ids = engine._EventIds()
        first = ids.next()
        ids._n = 0x100000000
        second = ids.next()
        assert second[:24] != first[:24]
        assert second.endswith("00000000")

    def test_duration_never_negative(self) -> None:
        h = initialized()
        h.s.client_sent(call(1, "echo"))
        h.clock.advance(-50)  # the wall clock stepped back
        assert h.s.upstream_sent(res(1, {}))[0] == CompleteAudit("ev-4", True, "", 0.0)
