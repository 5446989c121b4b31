"""The audit table's Details column (the CLI's and the web UI's): what a cluster event was
about, why, and from where."""

from __future__ import annotations

from bastion.client.auditread import details as _details


def test_a_refused_login_shows_its_reason_and_address() -> None:
    e = {
        "event": "user.login",
        "error": "invalid user name or password",
        "remote_addr": "203.0.113.7",
        "extra": {"reason": "unknown_user"},
    }
    assert _details(e) == "reason=unknown_user from 203.0.113.7 invalid user name or password"


def test_a_change_shows_what_it_was_about_and_a_call_its_arguments() -> None:
    change = {"event": "role.update", "extra": {"name": "ops", "via": "server host", "roles": ["x"]}}
    assert _details(change) == "name=ops via=server host"
    call = {"event": "mcp.session.request", "session_id": "s", "remote_addr": "a", "params": {"name": "echo"}}
    assert _details(call) == '{"name":"echo"}'
