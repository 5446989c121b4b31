"""Attacks on the session data path after the executor refactor (issue 14).

* A hostile streamable-HTTP upstream answering under an error status: its JSON body reached the
  client as sent, not as the engine made it (an unfiltered ``tools/list``, for instance).
"""

from __future__ import annotations

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
