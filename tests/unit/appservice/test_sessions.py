"""Session ids and the per-session header split (what is audited, what may pass upstream)."""

from __future__ import annotations

import re

from bastion.appservice.sessions import GatewaySession, new_session_id, session_headers
from bastion.appservice.upstreams import stripped_headers
from bastion.resources import App

APP = App.model_validate(
    {
        "metadata": {"name": "files"},
        "spec": {
            "uri": "mcp+http://files.internal:8080/mcp",
            "rewrite": {"headers": [{"name": "X-Api-Key", "value": "{{internal.logins}}"}]},
        },
    }
)


def session() -> GatewaySession:
    return GatewaySession(
        id="s",
        user="alice",
        app=APP,
        engine=None,  # type: ignore[arg-type]
        ident=None,  # type: ignore[arg-type]
        m=None,  # type: ignore[arg-type]
        upstream=None,  # type: ignore[arg-type]
        strip=stripped_headers(APP),
    )


def test_session_ids_are_unguessable_visible_ascii_in_time_order() -> None:
    ids = [new_session_id() for _ in range(200)]
    assert len(set(ids)) == 200
    assert all(re.fullmatch(r"[0-9a-f]{44}", i) for i in ids)
    assert ids == sorted(ids, key=lambda i: i[:12])  # the time part never goes back


def test_credentials_and_identity_headers_never_pass_upstream() -> None:
    s = session()
    headers = {
        b"authorization": b"Bearer secret",
        b"cookie": b"a=b",
        b"mcp-session-id": b"gw-session",
        b"x-api-key": b"from-the-client",  # the app's own rewrite header
        b"x-forwarded-user": b"root",
        b"x_forwarded_user": b"root",  # read as X-Forwarded-User by CGI-style servers
        b"mcp_name": b"other",
        b"x-bastion-anything": b"1",
        b"accept": b"*/*",
        b"user-agent": b"claude-code/2.0",
        b"x-request-id": b"r-1",
    }
    audited, passed = session_headers(s, headers)
    assert passed == [(b"user-agent", b"claude-code/2.0"), (b"x-request-id", b"r-1")]
    assert audited["authorization"] != "Bearer secret"  # redacted in the audit log
    assert audited["user-agent"] == "claude-code/2.0"


def test_the_split_is_recomputed_only_when_the_headers_change() -> None:
    s = session()
    one = {b"user-agent": b"a", b"content-length": b"10"}
    _, first = session_headers(s, one)
    _, again = session_headers(s, {b"user-agent": b"a", b"content-length": b"99"})
    assert again is first  # only the length differs: the same list
    _, changed = session_headers(s, {b"user-agent": b"b"})
    assert changed is not first and changed == [(b"user-agent", b"b")]
