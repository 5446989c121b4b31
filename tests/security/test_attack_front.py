"""Attacks around the front-door fixes (F5): header names spelt with ``_``.

CGI, WSGI and Rack servers (and what runs behind them) read ``X_Upstream_Identity`` and
``X-Upstream-Identity`` as one header, ``HTTP_X_UPSTREAM_IDENTITY``; so do some proxies.  The
gateway removed the ``-`` spellings of rewrite and identity headers only, so a client's
``X_Upstream_Identity: FORGED`` reached the upstream beside the gateway's own value.
"""

from __future__ import annotations

from tests.security.conftest import INIT
from tests.security.test_front import Front, call, front

__all__ = ["front"]  # the fixture, shared with test_front's module

FORGED = {
    "X_Upstream_Identity": "FORGED",  # the app's rewrite header
    "X_Forwarded_User": "admin",
    "X_Forwarded_For": "10.9.9.9",
    "X_Real_IP": "10.9.9.9",
    "Teleport_Jwt_Assertion": "forged.jwt.value",
    "Bastion_Jwt_Assertion": "forged.jwt.value",
    "Mcp_Session_Id": "someone-elses-upstream-session",
    "X_Bastion_User": "admin",
    "Mcp_Name": "get-env",  # the gateway checks Mcp-Name against the body, not this spelling
    "Mcp_Method": "tools/call",
    "X_Request_Id": "kept-1",  # not an identity header: passes
}


def test_underscore_spellings_of_rewrite_and_identity_headers_never_reach_the_upstream(front: Front) -> None:
    n = len(front.up.requests())
    status, hdrs, _ = front.send("/mcp/apps/logger", INIT, headers=FORGED)
    assert status == 200
    sid = hdrs["mcp-session-id"]
    status, _, _ = front.send("/mcp/apps/logger", call(2), headers={**FORGED, "Mcp-Session-Id": sid})
    assert status == 200
    # The gateway's one probe of the app's MCP era (ADR 47) carries none of the client's headers.
    got = [r for r in front.up.requests()[n:] if "bastion-probe" not in str(r.get("body", ""))]
    assert len(got) == 2
    for req in got:
        names = [k.replace("_", "-") for k, _ in req["headers"]]
        values = [v for _, v in req["headers"]]
        assert names.count("x-upstream-identity") == 1
        assert names.count("bastion-jwt-assertion") == 1
        for name in (
            "x-forwarded-user",
            "x-forwarded-for",
            "x-real-ip",
            "teleport-jwt-assertion",
            "x-bastion-user",
        ):
            assert name not in names, name
        assert "FORGED" not in values and "forged.jwt.value" not in values and "admin" not in values
        assert "someone-elses-upstream-session" not in values
        assert "get-env" not in values and "mcp-name" not in names and "mcp-method" not in names
        assert ("x_request_id", "kept-1") in [tuple(h) for h in req["headers"]]
