"""JSON-RPC parsing: kinds, validation, the sanitisation that blocks smuggling, and the encoders."""

from __future__ import annotations

import json
import random
from typing import Any

import orjson
import pytest

from bastion.errors import ValidationError
from bastion.protocol import jsonrpc
from bastion.protocol.jsonrpc import (
    ACCESS_DENIED,
    HEADER_MISMATCH,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    TOO_MANY_REQUESTS,
    UNSUPPORTED_PROTOCOL_VERSION,
    UPSTREAM_UNAVAILABLE,
    Message,
    ProtocolError,
    error_response,
    fold_key,
    notification,
    parse_message,
    result_response,
)


def test_public_names() -> None:
    for name in jsonrpc.__all__:
        assert hasattr(jsonrpc, name), name


def refused(raw: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_message(raw)
    return info.value


# ---------------------------------------------------------------- valid input


class TestKinds:
    def test_request(self) -> None:
        raw = b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":{"x":1}}}'
        m = parse_message(raw)
        assert m == Message(
            raw=raw,
            kind="request",
            id=7,
            method="tools/call",
            params={"name": "echo", "arguments": {"x": 1}},
            body=orjson.loads(raw),
        )
        assert m.raw is raw  # kept, not copied: these are the bytes forwarded

    def test_string_id(self) -> None:
        m = parse_message(b'{"jsonrpc":"2.0","id":"a-1","method":"ping"}')
        assert (m.kind, m.id, m.method, m.params) == ("request", "a-1", "ping", None)

    def test_notification(self) -> None:
        m = parse_message(b'{"jsonrpc":"2.0","method":"notifications/initialized"}')
        assert (m.kind, m.id, m.method) == ("notification", None, "notifications/initialized")

    def test_response(self) -> None:
        m = parse_message(b'{"jsonrpc":"2.0","id":1,"result":{"tools":[]}}')
        assert (m.kind, m.id, m.method, m.params) == ("response", 1, None, None)
        assert m.body["result"] == {"tools": []}

    def test_error_response(self) -> None:
        m = parse_message(b'{"jsonrpc":"2.0","id":"x","error":{"code":-32601,"message":"no"}}')
        assert (m.kind, m.id) == ("error", "x")
        assert m.body["error"]["code"] == -32601

    @pytest.mark.parametrize(
        "raw",
        [
            b'{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"bad"}}',
            b'{"jsonrpc":"2.0","error":{}}',
        ],
    )
    def test_error_response_without_id(self, raw: bytes) -> None:
        m = parse_message(raw)
        assert (m.kind, m.id) == ("error", None)

    def test_array_params_are_accepted_but_not_decided_on(self) -> None:
        m = parse_message(b'{"jsonrpc":"2.0","id":1,"method":"x","params":[1,2]}')
        assert m.params is None
        assert m.body["params"] == [1, 2]

    def test_whitespace_and_unknown_members(self) -> None:
        m = parse_message(b' \n{ "jsonrpc" : "2.0", "id" : 1, "method" : "ping", "extension" : true }\n')
        assert (m.kind, m.method) == ("request", "ping")

    def test_non_ascii_is_fine(self) -> None:
        raw = '{"jsonrpc":"2.0","id":1,"method":"x","params":{"name":"grüßen","arguments":{}}}'.encode()
        assert parse_message(raw).params == {"name": "grüßen", "arguments": {}}

    def test_escaped_non_ascii_is_fine(self) -> None:
        # Python's json.dumps writes non-ASCII as \u escapes by default.
        raw = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "x", "params": {"name": "é"}}).encode()
        assert parse_message(raw).params == {"name": "é"}

    def test_duplicates_deep_inside_arguments_pass(self) -> None:
        # The gateway decides nothing on them; only the envelope and params' own members matter.
        raw = (
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":{"k":1,"k":2}}}'
        )
        assert parse_message(raw).params == {"name": "a", "arguments": {"k": 2}}

    def test_nesting_deeper_than_can_be_forwarded_as_judged_is_refused(self) -> None:
        # Deeper than orjson will re-serialise (254), within what it parses (1024).
        deep = b'{"a":' * 300 + b"1" + b"}" * 300
        raw = (
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":' + deep + b"}}"
        )
        e = refused(raw)
        assert e.id == 1 and e.method == "tools/call"
        assert "nested more than 254 levels" in e.message
        ok = b'{"a":' * 200 + b"1" + b"}" * 200
        assert parse_message(raw.replace(deep, ok)).params is not None

    def test_repeated_names_at_different_levels_pass(self) -> None:
        raw = b'{"jsonrpc":"2.0","id":1,"method":"x","params":{"name":"a","arguments":{"name":"b","id":2}}}'
        assert parse_message(raw).params == {"name": "a", "arguments": {"name": "b", "id": 2}}


# -------------------------------------------------------------- invalid input


@pytest.mark.parametrize(
    ("raw", "code", "fragment"),
    [
        (b"", PARSE_ERROR, "not valid JSON"),
        (b"{", PARSE_ERROR, "not valid JSON"),
        (b'{"jsonrpc":"2.0","id":1,"method":"\xff"}', PARSE_ERROR, "UTF-8"),
        (b'{"jsonrpc":"2.0","id":1,"method":"\\ud800"}', PARSE_ERROR, "not valid JSON"),
        (b'{"jsonrpc":"2.0","id":1,"method":"x","params":{"a":NaN}}', PARSE_ERROR, "not valid JSON"),
        (b"\xef\xbb\xbf{}", PARSE_ERROR, "not valid JSON"),
        (b'"hello"', INVALID_REQUEST, "must be a JSON object"),
        (b"42", INVALID_REQUEST, "must be a JSON object"),
        (b"null", INVALID_REQUEST, "must be a JSON object"),
        (b'{"id":1,"method":"ping"}', INVALID_REQUEST, '"jsonrpc" member must be "2.0"'),
        (b'{"jsonrpc":"1.0","id":1,"method":"ping"}', INVALID_REQUEST, '"2.0"'),
        (b'{"jsonrpc":2.0,"id":1,"method":"ping"}', INVALID_REQUEST, '"2.0"'),
        (b'{"jsonrpc":"2.0","id":1.5,"method":"ping"}', INVALID_REQUEST, '"id" must be'),
        (b'{"jsonrpc":"2.0","id":1.0,"method":"ping"}', INVALID_REQUEST, '"id" must be'),
        (b'{"jsonrpc":"2.0","id":true,"method":"ping"}', INVALID_REQUEST, '"id" must be'),
        (b'{"jsonrpc":"2.0","id":null,"method":"ping"}', INVALID_REQUEST, '"id" must be'),
        (b'{"jsonrpc":"2.0","id":[1],"method":"ping"}', INVALID_REQUEST, '"id" must be'),
        (b'{"jsonrpc":"2.0","id":18446744073709551616,"method":"ping"}', INVALID_REQUEST, '"id" must be'),
        (b'{"jsonrpc":"2.0","id":1,"method":5}', INVALID_REQUEST, '"method" must be a string'),
        (b'{"jsonrpc":"2.0","id":1,"method":"x","params":"p"}', INVALID_REQUEST, '"params" must be'),
        (b'{"jsonrpc":"2.0","id":1,"method":"x","params":null}', INVALID_REQUEST, '"params" must be'),
        (
            b'{"jsonrpc":"2.0","id":1,"method":"x","result":{}}',
            INVALID_REQUEST,
            "both a request and a response",
        ),
        (b'{"jsonrpc":"2.0","id":1,"result":{},"error":{}}', INVALID_REQUEST, 'both "result" and "error"'),
        (b'{"jsonrpc":"2.0","id":null,"result":{}}', INVALID_REQUEST, '"id" must be'),
        (b'{"jsonrpc":"2.0","result":{}}', INVALID_REQUEST, '"id" must be'),
        (b'{"jsonrpc":"2.0","id":1,"error":"boom"}', INVALID_REQUEST, '"error" must be an object'),
        (b'{"jsonrpc":"2.0","id":1.5,"error":{}}', INVALID_REQUEST, '"id" must be'),
        (b'{"jsonrpc":"2.0","id":1}', INVALID_REQUEST, 'needs "method", "result" or "error"'),
    ],
)
def test_invalid(raw: bytes, code: int, fragment: str) -> None:
    e = refused(raw)
    assert e.rpc_code == code
    assert fragment in e.message


def test_batches_are_refused_with_a_reason() -> None:
    e = refused(b'[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"tools/call"}]')
    assert e.rpc_code == INVALID_REQUEST
    assert "batch" in e.message
    assert "2025-06-18" in e.message
    assert e.id is None
    assert refused(b"[]").rpc_code == INVALID_REQUEST


def test_protocol_error_is_the_clients_validation_error() -> None:
    e = refused(b"{")
    assert isinstance(e, ValidationError)
    assert e.origin == "client"
    assert e.id is None
    assert e.method is None


def test_protocol_error_carries_what_could_be_read() -> None:
    e = refused(b'{"jsonrpc":"1.0","id":"r1","method":"tools/call"}')
    assert (e.id, e.method) == ("r1", "tools/call")
    e = refused(b'{"jsonrpc":"2.0","id":true,"method":["x"]}')
    assert (e.id, e.method) == (None, None)


# ----------------------------------------------------------------- smuggling


class TestCaseVariants:
    """Members that a case-insensitive decoder (Go, .NET) would read as the ones we decide on."""

    @pytest.mark.parametrize(
        "raw",
        [
            b'{"jsonrpc":"2.0","id":1,"method":"ping","Method":"tools/call"}',
            b'{"jsonrpc":"2.0","id":1,"Method":"tools/call","method":"ping"}',
            b'{"jsonrpc":"2.0","ID":1,"id":2,"method":"tools/call","params":{"name":"echo"}}',
            b'{"jsonrpc":"2.0","ID":1,"method":"tools/call","params":{"name":"echo"}}',
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call","PARAMS":{"name":"x"},"params":{"name":"y"}}',
            b'{"jsonrpc":"2.0","JSONRPC":"1.0","id":1,"method":"ping"}',
            b'{"jsonrpc":"2.0","id":1,"result":{},"Result":{}}',
            b'{"jsonrpc":"2.0","id":1,"error":{},"eRRor":{}}',
            # Unicode simple folding: dotless i (U+0131) and long s (U+017F).
            '{"jsonrpc":"2.0","\u0131d":1,"id":2,"method":"ping"}'.encode(),
            '{"jsonrpc":"2.0","id":1,"method":"x","param\u017f":{"name":"y"}}'.encode(),
            b'{"jsonrpc":"2.0","id":1,"method":"x","param\\u017f":{"name":"y"}}',
        ],
    )
    def test_top_level(self, raw: bytes) -> None:
        e = refused(raw)
        assert e.rpc_code == INVALID_REQUEST
        assert "case variant" in e.message

    @pytest.mark.parametrize(
        "raw",
        [
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"Name":"denied","name":"allowed"}}',
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"allowed","Name":"denied"}}',
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"NAME":"denied"}}',
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","Arguments":{}}}',
            b'{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"a","URI":"b"}}',
            '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","argument\u017f":{}}}'.encode(),
        ],
    )
    def test_in_params(self, raw: bytes) -> None:
        e = refused(raw)
        assert e.rpc_code == INVALID_REQUEST
        assert "params." in e.message
        assert e.id == 1

    def test_other_params_members_are_not_checked(self) -> None:
        raw = b'{"jsonrpc":"2.0","id":1,"method":"x","params":{"Cursor":"c","_meta":{},"nameX":1}}'
        assert parse_message(raw).params == {"Cursor": "c", "_meta": {}, "nameX": 1}


class TestExactDuplicates:
    """orjson keeps the last duplicate, other parsers the first: refuse both readings."""

    @pytest.mark.parametrize(
        ("raw", "member"),
        [
            (b'{"jsonrpc":"2.0","id":1,"method":"ping","method":"tools/call"}', "method"),
            (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","method":"ping"}', "method"),
            (b'{"jsonrpc":"2.0","id":1,"id":2,"method":"ping"}', "id"),
            (b'{"jsonrpc":"2.0","jsonrpc":"2.0","id":1,"method":"ping"}', "jsonrpc"),
            (
                b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a"},"params":{"name":"b"}}',
                "params",
            ),
            (b'{"jsonrpc":"2.0","id":1,"result":{"tools":[]},"result":{}}', "result"),
            (b'{"jsonrpc":"2.0","id":1,"error":{"code":1},"error":{"code":2}}', "error"),
            (
                b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","name":"b"}}',
                "params.name",
            ),
            (
                b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":{},"arguments":{}}}',
                "params.arguments",
            ),
            # The same member written with escapes: still a duplicate once decoded.
            (b'{"jsonrpc":"2.0","id":1,"method":"ping","\\u006dethod":"tools/call"}', "method"),
            (
                b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","na\\u006De":"b"}}',
                "params.name",
            ),
            # With whitespace, and far apart.
            (
                b'{ "method" : "ping" , "jsonrpc":"2.0", "id":1, "params":{"a":[1,2,3]},\n "method":"x"}',
                "method",
            ),
        ],
    )
    def test_refused(self, raw: bytes, member: str) -> None:
        e = refused(raw)
        assert e.rpc_code == INVALID_REQUEST
        assert f'"{member}" occurs more than once' in e.message

    def test_escaped_member_alone_is_fine(self) -> None:
        # Odd but unambiguous: every parser decodes it to the same single member.
        m = parse_message(b'{"jsonrpc":"2.0","id":1,"\\u006dethod":"ping"}')
        assert m.method == "ping"

    def test_quote_disguised_as_escape_does_not_hide_a_duplicate(self) -> None:
        # "\u0022name" re-serialises as "\"name", which would make the quote counts equal.
        raw = (
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call",'
            b'"params":{"name":"ok","name":"bad","arguments":{"q":"x\\u0022name"}}}'
        )
        assert "occurs more than once" in refused(raw).message

    def test_the_cheap_filter_never_misses_a_duplicate(self) -> None:
        # Property: whenever the slow check finds a duplicate of a decided-on
        # member, the cheap filter said "maybe".  Random messages with
        # duplicates, escapes and whitespace.
        rng = random.Random(20261122)
        names = ["jsonrpc", "id", "method", "params", "result", "name", "arguments", "uri", "x", "q"]
        for _ in range(3000):
            raw = _random_message(rng, names)
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if jsonrpc._duplicated_member(raw) is not None:
                again = orjson.dumps(body)
                assert again != raw and jsonrpc._may_have_duplicates(raw, again), raw


def _random_string(rng: random.Random, names: list[str]) -> bytes:
    text = rng.choice([*names, 'a"name', "na\\me", "é", ""])
    out = b""
    for ch in text:
        r = rng.random()
        if ch == '"':
            out += b'\\"' if r < 0.7 else b"\\u0022"
        elif ch == "\\":
            out += b"\\\\"
        elif r < 0.05:
            out += b"\\u%04x" % ord(ch)
        else:
            out += ch.encode()
    return b'"' + out + b'"'


def _random_value(rng: random.Random, names: list[str], depth: int) -> bytes:
    r = rng.random()
    if depth > 2 or r < 0.4:
        return _random_string(rng, names) if r < 0.25 else str(rng.randint(-5, 5)).encode()
    if r < 0.55:
        return b"[" + b",".join(_random_value(rng, names, depth + 1) for _ in range(rng.randint(0, 3))) + b"]"
    return _random_object(rng, names, depth + 1)


def _random_object(rng: random.Random, names: list[str], depth: int) -> bytes:
    members = []
    for _ in range(rng.randint(0, 4)):
        key = _random_string(rng, names)
        members.append(key + rng.choice([b":", b" : "]) + _random_value(rng, names, depth))
        if rng.random() < 0.2:  # a duplicate
            members.append(key + b":" + _random_value(rng, names, depth))
    rng.shuffle(members)
    return b"{" + b",".join(members) + b"}"


def _random_message(rng: random.Random, names: list[str]) -> bytes:
    head = [b'"jsonrpc":"2.0"', b'"id":1', b'"method":"m"', b'"params":' + _random_object(rng, names, 1)]
    for _ in range(rng.randint(0, 3)):
        head.append(_random_string(rng, names) + b":" + _random_value(rng, names, 1))
    rng.shuffle(head)
    return b"{" + b",".join(head) + b"}"


def test_fold_key() -> None:
    assert fold_key("Method") == "method"
    assert fold_key("\u0131D") == "id"  # dotless i
    assert fold_key("\u0130d") == "id"  # dotted capital I
    assert fold_key("param\u017f") == "params"  # long s
    assert fold_key("\u212aey") == "key"  # Kelvin sign
    assert fold_key("名前") == "名前"


# ------------------------------------------------------------------- encoding


def test_error_response() -> None:
    raw = error_response(3, INVALID_PARAMS, "no")
    assert orjson.loads(raw) == {"jsonrpc": "2.0", "id": 3, "error": {"code": -32602, "message": "no"}}
    m = parse_message(raw)
    assert (m.kind, m.id) == ("error", 3)


def test_error_response_with_data_and_null_id() -> None:
    raw = error_response(None, PARSE_ERROR, "bad", {"why": 1})
    assert orjson.loads(raw) == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": -32700, "message": "bad", "data": {"why": 1}},
    }


def test_result_response() -> None:
    raw = result_response("a", {"tools": []})
    assert orjson.loads(raw) == {"jsonrpc": "2.0", "id": "a", "result": {"tools": []}}
    assert parse_message(raw).kind == "response"


def test_notification() -> None:
    assert orjson.loads(notification("notifications/tools/list_changed")) == {
        "jsonrpc": "2.0",
        "method": "notifications/tools/list_changed",
    }
    params: dict[str, Any] = {"progressToken": 1, "progress": 0.5}
    m = parse_message(notification("notifications/progress", params))
    assert (m.kind, m.params) == ("notification", params)


def test_error_codes() -> None:
    standard = [PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS, INTERNAL_ERROR]
    assert standard == [-32700, -32600, -32601, -32602, -32603]
    assert (HEADER_MISMATCH, UNSUPPORTED_PROTOCOL_VERSION) == (-32020, -32022)
    ours = [ACCESS_DENIED, TOO_MANY_REQUESTS, UPSTREAM_UNAVAILABLE]
    assert all(-32099 <= c <= -32000 for c in ours)
    # Clear of codes the SDKs and the MCP spec already use.
    assert not set(ours) & {-32000, -32001, -32002, -32020, -32022, -32042}
    assert len(set(standard + ours)) == len(standard + ours)


@pytest.mark.parametrize("rid", [2**53, -(2**53), 2**63 - 1])
def test_integer_ids_javascript_cannot_read_exactly_are_refused(rid: int) -> None:
    raw = b'{"jsonrpc":"2.0","id":%d,"method":"ping"}' % rid
    e = refused(raw)
    assert e.id is None and "2**53" in e.message
    assert parse_message(b'{"jsonrpc":"2.0","id":%d,"method":"ping"}' % (2**53 - 1)).id == 2**53 - 1
