"""Attacks around the framing fixes (F1, F4): what the second review got past them.

A client may send *responses* (to a server's sampling, elicitation or roots request).  They were
forwarded as the bytes the client sent, not as the message parsed: a response whose body holds
line breaks reached an HTTP upstream as is, and made the stdio transport refuse the write with a
500 blamed on the gateway.  Every message, responses included, is forwarded as parsed; and a
response is forwarded only when it answers an open request of the upstream (A6): any other is
refused and audited.
"""

from __future__ import annotations

import json

import pytest

from tests.security.conftest import Gateway

# A response to a server request, written over three lines; the middle one is a tools/call of a
# tool the user may not call.  One message, so a newline-framed reader must see one line.
SMUGGLED_RESPONSE = (
    b'{"jsonrpc":"2.0","id":"srv-1","result":{"x":\n'
    b'{"jsonrpc":"2.0","id":66,"method":"tools/call","params":{"name":"get-env","arguments":{}}}\r\n'
    b"}}"
)


@pytest.mark.parametrize("app", ["rec-stdio", "rec-http"])
def test_a_smuggled_client_response_reaches_no_upstream(gateway: Gateway, app: str) -> None:
    # The upstream asked nothing, so the response is refused (and audited) before framing matters;
    # a response it did ask for is forwarded as parsed, one line (tests/unit/session/test_engine.py).
    rec = gateway.recordings[app]
    with gateway.session("limited", app) as s:
        n = len(rec.records())
        r = s.post(SMUGGLED_RESPONSE)
        assert r.status_code == 400, r.text
        s.sync()
    raw = [g.get("line", g.get("body")) for g in rec.records()[n:]]
    assert [json.loads(x).get("method") for x in raw] == ["ping"]
    assert all(m.get("method") != "tools/call" for m in rec.messages() if isinstance(m, dict))


def test_a_response_to_no_request_of_the_upstream_is_not_forwarded_and_is_audited(gateway: Gateway) -> None:
    rec = gateway.recordings["rec-http"]
    unsolicited = b'{"jsonrpc":"2.0","id":"never-asked","result":{"exfil":"anything the client likes"}}'
    with gateway.session("limited", "rec-http") as s:
        n = len(rec.records())
        r = s.post(unsolicited)
        s.sync()
        sid = s.id
    assert r.status_code == 400, r.text
    assert [m.get("method") for m in rec.messages()[n:] if isinstance(m, dict)] == ["ping"]
    assert any(e.get("error") for e in gateway.audit() if e.get("session_id") == sid and not e["success"])
