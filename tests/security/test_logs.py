"""Logs cannot be forged (F9): whatever a client sends, one record is one line, values escaped."""

from __future__ import annotations

from tests.security.conftest import Gateway

FORGED_TS = "2026-01-01T00:00:00.000Z"


def test_f9_a_percent_encoded_line_break_in_the_path_does_not_forge_a_record(gateway: Gateway) -> None:
    forged = f"%0d%0a{FORGED_TS}%20INFO%20%20[bastion.tunnel]%20host%20joined%20host=evil"
    with gateway.http() as c:
        for path in (
            f"/v1/webapi/find{forged}",
            f"/mcp/apps/rec-http{forged}",
            f"/nope{forged}",
            "/x" * 20_000,
        ):
            r = c.get(
                f"https://{gateway.node.addr}{path}",
                headers={"User-Agent": f"ua\r\n{FORGED_TS} x"[:0] + "ua"},
            )
            assert r.status_code < 500, (path, r.status_code, r.text)
        # Headers with control characters are refused by HTTP itself; a request id is ours.
        r = c.get(f"https://{gateway.node.addr}/v1/webapi/find", headers={"X-Request-Id": "a\tb"})
        assert r.status_code == 200
    lines = gateway.node.log.read_text().splitlines()
    assert not [ln for ln in lines if ln.startswith(FORGED_TS)]
    assert not [ln for ln in lines if "Traceback" in ln]
    assert max(len(ln) for ln in lines) < 4096
