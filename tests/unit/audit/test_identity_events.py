"""Identity audit events: typed, coded, and bounded whatever the client sent."""

from __future__ import annotations

from datetime import UTC, datetime

from bastion.audit import identity_events

NOW = datetime.now(UTC)


def test_a_huge_user_name_is_clipped_with_its_hash() -> None:
    ev = identity_events.login(NOW, "c", "x" * 100_000, "203.0.113.9", error="bad", reason="password")
    assert ev.type == "user.login" and ev.code == "BAUTH002E"
    assert len(ev.user) < 1_000 and "sha256:" in ev.user
    assert ev.extra == {"reason": "password"}


def test_codes_of_each_event() -> None:
    assert identity_events.login(NOW, "c", "u", "a").code == "BAUTH002I"
    assert identity_events.logout(NOW, "c", "u", "a", "jti").code == "BAUTH003I"
    assert identity_events.join(NOW, "c", "h", "a", host_id="id").code == "BHOST001I"
    assert identity_events.join(NOW, "c", "h", "a", error="used").code == "BHOST001E"
    refused = identity_events.app_refused(NOW, "c", "app", "why", host_id="id", hostname="h", remote_addr="a")
    assert refused.code == "BHOST002E" and refused.extra == {"host_id": "id", "hostname": "h"}
