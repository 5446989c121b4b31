"""Property tests of the parser, the framing and the engine: for ANY body a client can send.

* A newline-framed (stdio) upstream receives exactly one line per message the
  policy allowed, and that line is the message judged.
* No ``tools/call`` of a tool outside the role reaches an upstream, however the
  bytes are dressed: whitespace and line breaks, escapes, duplicates, case
  variants, nesting, missing ids.
* Nothing the gateway answers or records grows with the size of a name.

Upstream parsers differ, so the forwarded bytes are read the ways they read
them: first-wins and last-wins duplicate members, and every line-splitting rule
(``\\n``, ``\\r``, ``str.splitlines``).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bastion.audit.bound import MAX_PARAMS_BYTES
from bastion.auth.credentials import Identity
from bastion.policy import AccessChecker
from bastion.resources import App, Role
from bastion.session.engine import ForwardToUpstream, RecordAudit, SendToClient, Session
from bastion.transport.stdio import line_for

T0 = datetime(2026, 12, 7, 12, 0, 0, tzinfo=UTC)
APP = App.model_validate(
    {"metadata": {"name": "rec", "labels": {"env": "dev"}}, "spec": {"uri": "mcp+http://127.0.0.1:1/mcp"}}
)
ROLE = Role.model_validate(
    {
        "metadata": {"name": "echo-only"},
        "spec": {"allow": {"app_labels": {"env": "dev"}, "mcp": {"tools": ["echo"]}}},
    }
)
CHECKER = AccessChecker([ROLE], {})
IDENTITY = Identity(
    username="limited",
    cluster_name="t",
    roles=("echo-only",),
    traits={},
    expires=T0 + timedelta(hours=1),
    issued_at=T0,
)


class _Clock:
    def now(self) -> datetime:
        return T0


def new_session() -> Session:
    s = Session(
        app=APP,
        checker=CHECKER,
        identity=IDENTITY,
        session_id="s",
        cluster_name="t",
        transport="stdio",
        clock=_Clock(),
    )
    s.client_sent(b'{"jsonrpc":"2.0","id":"init","method":"initialize","params":{}}')
    s.upstream_sent(b'{"jsonrpc":"2.0","id":"init","result":{"protocolVersion":"2025-06-18"}}')
    return s


# ------------------------------------------------------------- strategies

METHODS = ["tools/call", "ping", "tools/list", "resources/read", "notifications/cancelled", "x"]
NAMES = ["echo", "get-env", "Echo", "echo ", "get-env\n", "e\u0063ho"]
KEYS = ["jsonrpc", "id", "method", "params", "name", "arguments", "Method", "ID", "param\u017f", "nAme"]
WS = st.sampled_from(["", " ", "\n", "\r", "\r\n", "\t", "\u2028"])

leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.text(max_size=8),
    st.sampled_from(NAMES + METHODS),
)
json_values = st.recursive(
    leaf,
    lambda kids: st.one_of(
        st.lists(kids, max_size=3), st.dictionaries(st.sampled_from([*KEYS, "x", "y"]), kids, max_size=3)
    ),
    max_leaves=12,
)


@st.composite
def messages(draw: st.DrawFn) -> dict[str, Any]:
    msg: dict[str, Any] = {"jsonrpc": "2.0"}
    if draw(st.booleans()):
        msg["id"] = draw(st.one_of(st.integers(0, 9), st.text(max_size=4)))
    msg["method"] = draw(st.sampled_from(METHODS))
    params: dict[str, Any] = {}
    if draw(st.booleans()):
        params["name"] = draw(st.sampled_from(NAMES))
    if draw(st.booleans()):
        params["arguments"] = draw(json_values)
    if draw(st.booleans()):
        params[draw(st.sampled_from(KEYS))] = draw(json_values)
    msg["params"] = params
    return msg


def _encode(value: Any, ws: list[str], dup: dict[str, Any] | None) -> str:
    """JSON with the given whitespace between tokens, string escapes varied, and maybe a duplicate member."""
    pad = ws[0] if ws else ""
    if isinstance(value, dict):
        items = [f"{pad}{json.dumps(k)}{pad}:{pad}{_encode(v, ws[1:], None)}" for k, v in value.items()]
        if dup:
            items += [f"{json.dumps(k)}:{_encode(v, [], None)}" for k, v in dup.items()]
        return "{" + ",".join(items) + pad + "}"
    if isinstance(value, list):
        return "[" + pad + ",".join(_encode(v, ws[1:], None) for v in value) + "]"
    return json.dumps(value, ensure_ascii=bool(len(ws) % 2))


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    msg = draw(messages())
    ws = draw(st.lists(WS, max_size=4))
    dup = draw(st.one_of(st.none(), st.dictionaries(st.sampled_from(KEYS), json_values, max_size=2)))
    text = _encode(msg, ws, dup)
    evil = json.dumps({"jsonrpc": "2.0", "id": 99, "method": "tools/call", "params": {"name": "get-env"}})
    how = draw(st.sampled_from(["none", "after", "nested"]))
    if how == "after":  # a second message after a line break (not one JSON value: refused)
        text += draw(WS) + evil
    elif how == "nested":  # F1: a whole message on a line of its own inside the params of an allowed one
        method = draw(st.sampled_from(["ping", "tools/list", "notifications/cancelled"]))
        text = (
            f'{{"jsonrpc":"2.0","id":6,"method":"{method}","params":{{"x":'
            + draw(WS)
            + evil
            + draw(WS)
            + "}}"
        )
    return text.encode("utf-8", "surrogatepass")


# ------------------------------------------------------------ how upstreams read


def _first_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        out.setdefault(k, v)
    return out


def upstream_readings(line: bytes) -> list[Any]:
    """Every message any common upstream parser would see in bytes written as one stdio line."""
    out: list[Any] = []
    text = line.decode("utf-8", "surrogatepass")
    splits = {tuple(text.split("\n")), tuple(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"))}
    splits.add(tuple(text.splitlines()))
    for parts in splits:
        for part in parts:
            if not part.strip():
                continue
            for hook in (None, _first_wins):
                try:
                    out.append(json.loads(part, object_pairs_hook=hook))
                except ValueError:
                    out.append("unparsable")
    return out


def _calls_outside_role(value: Any) -> list[Any]:
    if not isinstance(value, dict):
        return []
    method = value.get("method")
    params = value.get("params")
    if isinstance(method, str) and method.lower() == "tools/call" and isinstance(params, dict):
        name = params.get("name")
        if name != "echo":
            return [value]
    return []


# --------------------------------------------------------------------- props


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies())
@example(
    '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"t":"a\x85b\u2028c"}}}'.encode()
)
def test_a_stdio_upstream_reads_exactly_one_line_per_message_allowed(body: bytes) -> None:
    s = new_session()
    cmds = s.client_sent(body)
    forwards = [c for c in cmds if isinstance(c, ForwardToUpstream)]
    assert len(forwards) <= 1
    for f in forwards:
        line = line_for(f.raw)  # exactly what the stdio transport writes (before its newline)
        # What every reader of that line sees is one message: the one judged.
        readings = upstream_readings(line)
        assert readings and all(r == f.message.body for r in readings), (body, readings)
        assert orjson.loads(f.raw) == f.message.body
    # Whatever was not forwarded was answered and audited.
    if not forwards and s.last_method:
        assert any(isinstance(c, SendToClient | RecordAudit) for c in cmds)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(bodies(), min_size=1, max_size=5))
def test_no_call_of_a_tool_outside_the_role_reaches_the_upstream(stream: list[bytes]) -> None:
    s = new_session()
    for body in stream:
        for c in s.client_sent(body):
            if isinstance(c, ForwardToUpstream):
                for reading in upstream_readings(line_for(c.raw)):
                    assert not _calls_outside_role(reading), (body, reading)
                    if isinstance(reading, dict) and reading.get("method") == "tools/call":
                        assert "id" in reading  # never as a notification


@settings(max_examples=60, deadline=None)
@given(st.integers(600, 400_000), st.sampled_from(["name", "id", "method"]))
def test_answers_and_records_stay_bounded_whatever_the_size_of_a_name(size: int, where: str) -> None:
    s = new_session()
    big = "n" * size
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "x"}}
    if where == "name":
        msg["params"]["name"] = big
    elif where == "id":
        msg["id"] = big
    else:
        msg["method"] = big
    cmds = s.client_sent(orjson.dumps(msg))
    assert not any(isinstance(c, ForwardToUpstream) for c in cmds)
    for c in cmds:
        if isinstance(c, SendToClient):
            assert len(c.raw) < 2048
        if isinstance(c, RecordAudit):
            # params are kept up to MAX_PARAMS_BYTES (then summarised); everything else is clipped
            assert len(orjson.dumps(c.event.to_dict())) < MAX_PARAMS_BYTES + 8192
