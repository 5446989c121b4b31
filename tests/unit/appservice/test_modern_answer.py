"""The 2026 answer's rewrite (bastion.appservice.modern.ModernAnswer): the spliced fast path
gives the same JSON as parsing and rewriting (decision 0048)."""

from __future__ import annotations

import orjson
import pytest

from bastion.appservice.modern import ModernAnswer

UID = "bastion-17"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"jsonrpc":"2.0","id":"bastion-17","result":{"content":[{"type":"text","text":"hi \\u00e9"}]}}',
        b'{"jsonrpc":"2.0","id":"bastion-17","result":{}}',
        b'{"result":{"content":[]},"jsonrpc":"2.0","id":"bastion-17"}',
        b'{"jsonrpc":"2.0","id":"bastion-17","result":{"resultType":"incomplete","x":1}}',
        b'{"jsonrpc":"2.0","id":"bastion-17","result":{"content":[{"type":"text","text":"\\"resultType\\""}]}}',
        b'{"jsonrpc":"2.0","id":"bastion-17","error":{"code":-32602,"message":"no"}}',
    ],
)
@pytest.mark.parametrize("client_id", [7, "c-1", None])
def test_fast_path_is_the_same_json_as_the_parse(raw: bytes, client_id: object) -> None:
    fast = ModernAnswer(None, client_id, UID, "tools/call")  # type: ignore[arg-type]
    slow = ModernAnswer(None, client_id, UID, "tools/call")  # type: ignore[arg-type]
    slow._head = None  # the parse-and-rewrite path only
    a, b = fast.rewrite(raw), slow.rewrite(raw)
    assert a is not None and b is not None
    assert orjson.loads(a) == orjson.loads(b)
    assert fast.final == slow.final
    assert orjson.loads(a)["id"] == client_id


def test_cacheable_results_are_parsed_for_their_hints() -> None:
    a = ModernAnswer(None, 1, UID, "tools/list")  # type: ignore[arg-type]
    out = a.rewrite(b'{"jsonrpc":"2.0","id":"bastion-17","result":{"tools":[]}}')
    assert out is not None
    assert orjson.loads(out)["result"] == {
        "tools": [],
        "resultType": "complete",
        "ttlMs": 2000,
        "cacheScope": "private",
    }


def test_another_requests_answer_is_not_passed() -> None:
    a = ModernAnswer(None, 1, UID, "tools/call")  # type: ignore[arg-type]
    assert a.rewrite(b'{"jsonrpc":"2.0","id":"bastion-18","result":{"content":[]}}') is None
