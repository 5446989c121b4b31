"""Cluster audit events: typed, coded, and bounded whatever the client sent."""

from __future__ import annotations

from datetime import UTC, datetime

from bastion.audit import cluster_events

NOW = datetime.now(UTC)


def test_a_huge_user_name_is_clipped_with_its_hash() -> None:
    ev = cluster_events.login(NOW, "c", "x" * 100_000, "203.0.113.9", error="bad", reason="password")
    assert ev.type == "user.login" and ev.code == "BAUTH002E"
    assert len(ev.user) < 1_000 and "sha256:" in ev.user
    assert ev.extra == {"reason": "password"}


def test_codes_of_each_event() -> None:
    assert cluster_events.login(NOW, "c", "u", "a").code == "BAUTH002I"
    assert cluster_events.logout(NOW, "c", "u", "a", "jti").code == "BAUTH003I"
    joined = cluster_events.event("app_server.join", NOW, "c", extra={"hostname": "h"})
    assert joined.code == "BHOST001I"
    assert cluster_events.event("app_server.join", NOW, "c", success=False, error="used").code == "BHOST001E"
    refused = cluster_events.app_refused(NOW, "c", "app", "why", host_id="id", hostname="h", remote_addr="a")
    assert refused.code == "BHOST002E" and refused.extra == {"host_id": "id", "hostname": "h"}


def test_every_type_has_a_code_and_extra_lists_are_bounded() -> None:
    from bastion.audit.events import EVENT_TYPES

    for t in EVENT_TYPES:
        assert cluster_events.event(t, NOW, "c").code.endswith("I")
    ev = cluster_events.event(
        "role.create",
        NOW,
        "c",
        user="alice",
        roles=tuple(f"r{i}" for i in range(500)),
        extra={"name": "x" * 10_000, "roles": ["y" * 10_000] * 500, "empty": "", "n": 3, "ok": True},
    )
    assert len(ev.roles) == 64 and len(ev.extra["roles"]) == 64
    assert all(len(r) < 1_000 for r in ev.extra["roles"]) and len(ev.extra["name"]) < 1_000
    assert "empty" not in ev.extra and ev.extra["n"] == 3 and ev.extra["ok"] is True
