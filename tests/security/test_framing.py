"""What is forwarded is what was decided: framing (F1), requests without ids (F4), bounded echoes (F12).

Each test sends the attack's exact bytes through a real gateway to a recording
upstream (stdio and streamable HTTP) and asserts what reached the upstream.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.security.conftest import Gateway

APPS = ["rec-stdio", "rec-http"]

# Finding F1, byte for byte: one ping whose params hold a tools/call on a line of its own.
F1_BODY = (
    b'{"jsonrpc":"2.0","id":6,"method":"ping","params":{"x":\n'
    b'{"jsonrpc": "2.0", "id": 6, "method": "tools/call", "params": {"name": "get-env", "arguments": {}}}\n'
    b"}}"
)


def _new_records(gw: Gateway, app: str, before: int) -> list[object]:
    return gw.recordings[app].messages()[before:]


@pytest.mark.parametrize("app", APPS)
@pytest.mark.parametrize("sep", [b"\n", b"\r", b"\r\n"])
def test_f1_a_body_of_several_lines_reaches_the_upstream_as_the_one_message_judged(
    gateway: Gateway, app: str, sep: bytes
) -> None:
    with gateway.session("limited", app) as s:
        before = len(gateway.recordings[app].records())
        r = s.post(F1_BODY.replace(b"\n", sep))
        assert r.status_code == 200, r.text
        answer = s.answer(r)
        assert answer["id"] == 6 and answer["result"] == {}  # a ping's answer, not get-env's
        got = _new_records(gateway, app, before)
        assert got == [json.loads(F1_BODY)]  # exactly one message: the ping, with its params
        assert "get-env" not in json.dumps(answer)


def test_f1_stdio_upstream_gets_one_line_per_message_for_line_separators(gateway: Gateway) -> None:
    # U+2028/U+2029/U+0085 are line breaks to str.splitlines: written as escapes, the same JSON.
    with gateway.session("limited", "rec-stdio") as s:
        rec = gateway.recordings["rec-stdio"]
        before = len(rec.records())
        text = "a\u2028b\u2029c\x85d"
        body = json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 7,
                "method": "tools/call",
                "params": {"name": "echo", "arguments": {"t": text}},
            },
            ensure_ascii=False,
        ).encode()
        r = s.post(body)
        assert r.status_code == 200, r.text
        lines = [rec["line"] for rec in rec.records()[before:]]
        assert len(lines) == 1
        assert not any(ch in lines[0] for ch in "\u2028\u2029\x85\n\r")
        assert json.loads(lines[0])["params"]["arguments"]["t"] == text


@pytest.mark.parametrize("app", APPS)
def test_f4_tools_call_sent_as_a_notification_is_refused_and_audited(gateway: Gateway, app: str) -> None:
    with gateway.session("limited", app) as s:
        before = len(gateway.recordings[app].records())
        r = s.post(b'{"jsonrpc":"2.0","method":"tools/call","params":{"name":"get-env","arguments":{}}}')
        assert r.status_code == 400
        err = r.json()
        assert err["id"] is None and "needs an id" in err["error"]["message"]
        # An unknown client notification is refused too; a real one still passes.
        r = s.post(b'{"jsonrpc":"2.0","method":"notifications/tools/list_changed"}')
        assert r.status_code == 400
        r = s.post(b'{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":99}}')
        assert r.status_code == 202
        s.sync()
        assert gateway.recordings[app].methods()[before:] == ["notifications/cancelled", "ping"]
        refused = [
            e
            for e in gateway.audit("--user=limited", f"--app={app}", "--type=mcp.session.invalid_request")
            if e.get("session_id") == s.id
        ]
        assert {e["method"] for e in refused} >= {"tools/call", "notifications/tools/list_changed"}
        assert all(e["success"] is False for e in refused)


@pytest.mark.parametrize("app", APPS)
def test_f4_allowed_tools_still_work_and_denied_ones_never_reach_the_upstream(
    gateway: Gateway, app: str
) -> None:
    with gateway.session("limited", app) as s:
        before = len(gateway.recordings[app].records())
        ok = s.answer(
            s.post(
                b'{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"echo","arguments":{"m":1}}}'
            )
        )
        assert ok["result"]["content"][0]["text"] == '{"m": 1}'
        denied = s.answer(
            s.post(b'{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"get-env"}}')
        )
        assert "not allowed" in denied["error"]["message"]
        assert [m["params"]["name"] for m in _new_records(gateway, app, before)] == ["echo"]  # type: ignore[index]


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.parametrize("app", APPS)
def test_f12_huge_tool_names_are_neither_stored_nor_echoed(gateway: Gateway, app: str) -> None:
    with gateway.session("limited", app) as s:
        data = gateway.node.root / "data"
        size_before = _dir_size(data)
        name = "x" * (3 * 1024 * 1024)
        sent = 0
        for i in range(5):
            body = json.dumps(
                {"jsonrpc": "2.0", "id": 100 + i, "method": "tools/call", "params": {"name": name}}
            ).encode()
            sent += len(body)
            r = s.post(body)
            assert r.status_code == 200
            assert len(r.content) < 2048, len(r.content)  # bounded, not the name echoed
            assert "characters long" in s.answer(r)["error"]["message"]
        grown = _dir_size(data) - size_before
        assert grown < sent / 100, (grown, sent)
        events = [e for e in gateway.audit("--user=limited", f"--app={app}") if e.get("session_id") == s.id]
        denied = [e for e in events if e.get("method") == "tools/call" and not e["success"]]
        assert len(denied) == 5
        for e in denied:
            assert len(json.dumps(e)) < 4096
            assert "sha256:" in json.dumps(e)  # what was cut is identified


def test_f12_oversized_ids_and_methods_are_refused_without_echo(gateway: Gateway) -> None:
    with gateway.session("limited", "rec-http") as s:
        for body in (
            json.dumps({"jsonrpc": "2.0", "id": "i" * 100_000, "method": "ping"}).encode(),
            json.dumps({"jsonrpc": "2.0", "id": 1, "method": "m" * 100_000}).encode(),
        ):
            r = s.post(body)
            assert r.status_code in (200, 400)
            assert len(r.content) < 1024
            assert "characters long" in r.json()["error"]["message"]


def test_no_child_reads_anything_but_whole_lines(gateway: Gateway) -> None:
    # Across this module every stdio record is one complete JSON message.
    for m in gateway.recordings["rec-stdio"].messages():
        assert isinstance(m, dict), m
