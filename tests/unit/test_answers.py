"""Data-path answers: every JSON-RPC error says whose fault it is; SSE framing; session headers."""

from __future__ import annotations

from typing import Any

import orjson

from bastion.answers import ORIGIN_HEADER, Answer, send_jsonrpc_error


class Sent:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def __call__(self, message: Any) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.messages[0]["headers"])

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])


async def test_an_error_names_its_origin_and_its_length() -> None:
    sent = Sent()
    await send_jsonrpc_error(sent, 404, 'no MCP app named "x"', "client")
    assert sent.status == 404
    assert sent.headers[ORIGIN_HEADER] == b"client"
    assert int(sent.headers[b"content-length"]) == len(sent.body)
    assert orjson.loads(sent.body) == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": -32600, "message": 'no MCP app named "x"'},
    }


async def test_a_401_carries_the_challenge_and_a_5xx_the_internal_code() -> None:
    sent = Sent()
    await send_jsonrpc_error(sent, 401, "credential expired", "client")
    assert sent.headers[b"www-authenticate"].startswith(b"Bearer ")
    sent = Sent()
    await send_jsonrpc_error(sent, 502, "upstream down", "upstream", mid=7)
    assert orjson.loads(sent.body)["error"]["code"] == -32603
    assert orjson.loads(sent.body)["id"] == 7
    assert sent.headers[ORIGIN_HEADER] == b"upstream"


async def test_every_part_of_an_answer_carries_its_extra_headers() -> None:
    extra = [(b"mcp-session-id", b"abc")]
    for write in (
        lambda a: a.json(200, b"{}"),
        lambda a: a.empty(202),
        lambda a: a.error(503, "audit down", "gateway"),
        lambda a: a.start_sse(),
    ):
        sent = Sent()
        await write(Answer(sent, extra))
        assert sent.headers[b"mcp-session-id"] == b"abc"


async def test_sse_events_are_framed_one_message_each() -> None:
    sent = Sent()
    a = Answer(sent)
    await a.start_sse()
    await a.event(b'{"a":1}', id="p1")
    await a.finish()
    assert sent.headers[b"content-type"] == b"text/event-stream"
    assert sent.body == b'event: message\nid: p1\ndata: {"a":1}\n\n'
    assert sent.messages[-1]["more_body"] is False
