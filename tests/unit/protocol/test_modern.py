"""The 2026-07-28 ladder, envelope and result shapes (bastion.protocol.modern): pure."""

from __future__ import annotations

from typing import Any

import pytest

from bastion.protocol import modern as wire
from bastion.protocol.headers import decode_header_value, encode_header_value

V = "2026-07-28"


def _params(version: Any = V, **extra: Any) -> dict[str, Any]:
    meta = {
        wire.META_VERSION: version,
        wire.META_CAPABILITIES: {"x": {}},
        wire.META_CLIENT_INFO: {"name": "c"},
    }
    return {"_meta": meta, **extra}


def _h(method: str = "tools/call", name: str | None = "echo", version: str = V) -> dict[bytes, bytes]:
    out = {b"mcp-protocol-version": version.encode(), b"mcp-method": method.encode()}
    if name is not None:
        out[b"mcp-name"] = encode_header_value(name).encode()
    return out


def test_a_request_that_agrees_with_its_headers_gives_its_envelope() -> None:
    env = wire.check_request("tools/call", _params(name="echo"), _h())
    assert isinstance(env, wire.Envelope)
    assert env.version == V and env.client_info == {"name": "c"} and env.capabilities == {"x": {}}


@pytest.mark.parametrize(
    ("method", "params", "headers", "code"),
    [
        ("tools/list", {}, _h("tools/list", None), -32602),  # no envelope
        ("tools/list", {"_meta": {wire.META_VERSION: V}}, _h("tools/list", None), -32602),
        ("tools/list", _params(), {b"mcp-method": b"tools/list"}, -32020),  # no version header
        ("tools/list", _params(), _h("tools/call", None), -32020),  # method disagrees
        ("tools/list", _params(), {b"mcp-protocol-version": V.encode()}, -32020),  # no Mcp-Method
        ("tools/call", _params(name="get-env"), _h(name="echo"), -32020),  # name disagrees
        ("tools/call", _params(name="get-env"), _h(name=None), -32020),  # Mcp-Name absent
        ("tools/call", _params(name="echo"), {**_h(), b"mcp-name": b"=?base64?!!?="}, -32020),
        ("tools/list", _params("2099-01-01"), _h("tools/list", None, "2099-01-01"), -32022),
    ],
)
def test_the_ladder_refuses_in_order(method: str, params: Any, headers: Any, code: int) -> None:
    got = wire.check_request(method, params, headers)
    assert isinstance(got, wire.Rejection) and got.code == code, got
    assert got.status == 400
    if code == -32022:
        assert got.data["supported"] == list(wire.ALL_VERSIONS) and got.data["requested"] == "2099-01-01"


def test_non_ascii_names_travel_base64() -> None:
    name = "outil-é"
    header = encode_header_value(name)
    assert header.startswith("=?base64?") and decode_header_value(header.encode()) == name
    assert isinstance(wire.check_request("tools/call", _params(name=name), _h(name=name)), wire.Envelope)
    assert encode_header_value("echo") == "echo"


def test_duplicated_routing_headers_are_named() -> None:
    raw = [(b"Mcp-Name", b"a"), (b"x", b"1"), (b"mcp-name", b"b")]
    assert wire.duplicated_routing_header(raw) == "mcp-name"
    assert wire.duplicated_routing_header([(b"mcp-name", b"a"), (b"mcp-method", b"m")]) == ""


def test_the_envelope_leaves_meta_and_the_rest_stays() -> None:
    p = _params(name="echo")
    p["_meta"]["progressToken"] = 7
    out = wire.without_envelope(p)
    assert out["_meta"] == {"progressToken": 7} and out["name"] == "echo"
    assert wire.ENVELOPE_KEYS[0] in p["_meta"]  # the client's own value is not changed
    assert "_meta" not in wire.without_envelope(_params())


def test_results_get_result_type_and_private_bounded_caching() -> None:
    assert wire.modern_result("tools/call", {"content": []}, 2000) == {
        "content": [],
        "resultType": "complete",
    }
    listed = wire.modern_result("tools/list", {"tools": [], "ttlMs": 60_000, "cacheScope": "public"}, 2000)
    assert listed["ttlMs"] == 2000 and listed["cacheScope"] == "private"
    assert wire.modern_result("tools/list", {"tools": [], "ttlMs": 5}, 2000)["ttlMs"] == 5


def test_initialize_for_a_2026_client_leaves_out_what_cannot_be_bridged() -> None:
    env = wire.Envelope(V, {"sampling": {}, "elicitation": {}, "roots": {}, "experimental": {}}, None)
    params = wire.initialize_params(env)
    assert params["capabilities"] == {"experimental": {}}
    assert params["protocolVersion"] == wire.LATEST_HANDSHAKE and params["clientInfo"]["name"]


def test_discover_offers_every_bridged_version_and_no_removed_capability() -> None:
    caps = {"logging": {}, "tools": {"listChanged": True}, "resources": {"subscribe": True}, "tasks": {}}
    res = wire.discover_result(caps, "hi", {"name": "s"}, 2000)
    assert res["supportedVersions"] == list(wire.ALL_VERSIONS)
    assert res["capabilities"] == {"tools": {"listChanged": True}, "resources": {}}
    assert res["cacheScope"] == "private" and res["instructions"] == "hi"


def test_mcp_param_headers_follow_the_schema_annotations() -> None:
    schema = {
        "type": "object",
        "properties": {
            "region": {"type": "string", "x-mcp-header": "Region"},
            "opts": {"type": "object", "properties": {"dry": {"type": "boolean", "x-mcp-header": "Dry"}}},
            "n": {"type": "integer", "x-mcp-header": "N"},
        },
    }
    m = wire.param_header_map(schema)
    assert m == {("region",): "Region", ("opts", "dry"): "Dry", ("n",): "N"}
    got = dict(wire.param_headers(m, {"region": "é", "opts": {"dry": True}}))
    assert got == {b"mcp-param-region": encode_header_value("é").encode(), b"mcp-param-dry": b"true"}


@pytest.mark.parametrize(
    "schema",
    [
        {"properties": {"a": {"type": "number", "x-mcp-header": "A"}}},  # numbers are not mirrored
        {"properties": {"a": {"type": "string", "x-mcp-header": "A B"}}},  # not a token
        {
            "properties": {
                "a": {"type": "string", "x-mcp-header": "A"},
                "b": {"type": "string", "x-mcp-header": "a"},
            }
        },
        {"$defs": {"x": {"type": "string", "x-mcp-header": "X"}}},  # off the properties chain
        {"type": "string", "x-mcp-header": "Root"},
    ],
)
def test_a_schema_with_an_invalid_annotation_mirrors_nothing(schema: Any) -> None:
    assert wire.param_header_map(schema) == {}
