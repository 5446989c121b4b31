"""Attacks on the session data path after the executor refactor (issue 14).

* A hostile streamable-HTTP upstream answering under an error status: its JSON body reached the
  client as sent, not as the engine made it (an unfiltered ``tools/list``, for instance).
* A ``Last-Event-ID`` whose number Python cannot read: an internal error (500) and a traceback
  in the log for each such GET, from any authenticated client.
* ``Mcp-Name`` / ``Mcp-Method`` disagreeing with the body: the refusal quoted the body's tool name
  or method whole (megabytes back to the client).
"""

from __future__ import annotations

import json

from tests.security.conftest import Gateway


def test_an_error_status_does_not_carry_an_unfiltered_answer_to_the_client(gateway: Gateway) -> None:
    """``limited`` may call ``echo`` only, so its ``tools/list`` is filtered to ``echo``; the
    upstream answers with the whole list under HTTP 500."""
    with gateway.session("limited", "rec-http") as s:
        r = s.post(b'{"jsonrpc":"2.0","id":7,"method":"tools/list","params":{}}')
        assert [t["name"] for t in s.answer(r)["result"]["tools"]] == ["echo"]
        r = s.post(b'{"jsonrpc":"2.0","id":8,"method":"tools/list","params":{"x-reply-status":500}}')
        assert r.status_code >= 400
        assert "get-env" not in r.text, r.text


def test_a_last_event_id_python_cannot_count_is_not_an_internal_error(gateway: Gateway) -> None:
    with gateway.session("limited", "rec-stdio") as s:
        headers = {
            "Authorization": f"Bearer {gateway.token('limited')}",
            "Accept": "text/event-stream",
            "Mcp-Session-Id": s.id,
        }
        with s.client.stream("GET", s.url, headers=headers) as r:  # makes the GET stream's log, g1
            assert r.status_code == 200
        for last in ("g1." + "9" * 5000, "g1.\xb2"):
            with s.client.stream(
                "GET", s.url, headers={**headers, "Last-Event-ID": last.encode("latin-1")}
            ) as r:
                assert r.status_code != 500, r.read()
        assert json.loads(s.post(b'{"jsonrpc":"2.0","id":9,"method":"ping"}').text)["result"] == {}


def test_a_mirrored_header_mismatch_does_not_echo_the_body(gateway: Gateway) -> None:
    """``Mcp-Name`` disagreeing with a 1 MiB tool name (or ``Mcp-Method`` with a long method):
    the refusal quotes both, cut, not the whole body back."""
    big = "A" * (1 << 20)
    with gateway.session("limited", "rec-stdio") as s:
        call = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": big}}
        for name, value in (("Mcp-Name", "echo"), ("Mcp-Method", "tools/call" + "x" * 6000)):
            r = s.client.post(
                s.url,
                content=json.dumps(call).encode(),
                headers={
                    "Authorization": f"Bearer {gateway.token('limited')}",
                    "Accept": "application/json, text/event-stream",
                    "Content-Type": "application/json",
                    "Mcp-Session-Id": s.id,
                    name: value,
                },
            )
            assert r.status_code == 400, r.text[:200]
            assert len(r.content) < 2000, (name, len(r.content))
