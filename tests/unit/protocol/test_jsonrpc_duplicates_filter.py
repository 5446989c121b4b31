"""The duplicate-member filter's first step: bytes equal to their re-serialisation need no count."""

from __future__ import annotations

import orjson
import pytest

from bastion.protocol import jsonrpc
from bastion.protocol.jsonrpc import ProtocolError, parse_message


@pytest.mark.parametrize(
    "value",
    [
        {
            "jsonrpc": "2.0",
            "id": 7,
            "method": "tools/call",
            "params": {"name": "echo", "arguments": {"m": "é"}},
        },
        {"jsonrpc": "2.0", "id": "a", "result": {"content": [{"type": "text", "text": 'x"y'}], "id": 3}},
    ],
)
def test_compact_messages_pass_without_a_second_parse(
    value: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = orjson.dumps(value)

    def second_parse(raw: bytes) -> str | None:
        raise AssertionError("compact bytes need no second parse")

    monkeypatch.setattr(jsonrpc, "_duplicated_member", second_parse)
    msg = parse_message(raw)
    assert msg.body == value
    assert msg.raw is raw  # the bytes are kept, not copied


@pytest.mark.parametrize(
    "raw",
    [
        b'{"jsonrpc":"2.0","id":1,"method":"ping","method":"tools/call"}',
        b'{"jsonrpc":"2.0","id":1,"id":1,"result":{}}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","name":"a"}}',
    ],
)
def test_compact_duplicates_still_refused(raw: bytes) -> None:
    # Even a duplicate with the same value: the bytes then differ from the re-serialisation.
    with pytest.raises(ProtocolError, match="occurs more than once"):
        parse_message(raw)
