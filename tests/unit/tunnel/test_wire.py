"""What crosses the tunnel survives the trip: actors (with their policy), audit events, items."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson

from bastion.audit.events import REQUEST, AuditEvent
from bastion.audit.store import Completion
from bastion.auth.credentials import Identity
from bastion.auth.server import Actor
from bastion.backend import Event, EventType, Item
from bastion.policy import AccessChecker
from bastion.resources import App, Role, User
from bastion.tunnel import wire


def _actor() -> Actor:
    role = Role.model_validate(
        {
            "kind": "role",
            "metadata": {"name": "echo-only", "revision": 7},
            "spec": {"allow": {"app_labels": {"env": "dev"}, "mcp": {"tools": ["echo"]}}},
        }
    )
    user = User.model_validate(
        {"kind": "user", "metadata": {"name": "alice", "revision": 3}, "spec": {"roles": ["echo-only"]}}
    )
    now = datetime.now(UTC)
    ident = Identity("alice", "c1", ("echo-only",), {}, now + timedelta(hours=1), now, "tok1")
    return Actor("alice", AccessChecker([role], {}), ident, user, (3, 7), (role,))


def test_actor_round_trip_keeps_the_policy() -> None:
    actor = _actor()
    doc = orjson.loads(orjson.dumps(wire.actor_to_wire(actor)))
    cache = wire.ActorCache()
    back = cache.get(doc)
    assert back.name == "alice" and back.policy_key == (3, 7)
    assert back.identity is not None and back.identity.expires == actor.identity.expires  # type: ignore[union-attr]
    app = App.model_validate(
        {
            "kind": "app",
            "metadata": {"name": "a", "labels": {"env": "dev"}},
            "spec": {"uri": "mcp+http://x/mcp"},
        }
    )
    other = app.model_copy(update={"metadata": app.metadata.model_copy(update={"labels": {"env": "prod"}})})
    assert back.checker is not None
    assert back.checker.can_access_app(app) and not back.checker.can_access_app(other)
    assert (
        back.checker.check_tool(app, "echo").allowed and not back.checker.check_tool(app, "get-sum").allowed
    )
    assert cache.get(doc) is back  # same user and policy revision: no rebuild
    doc["policy_key"] = [4, 7]
    assert cache.get(doc) is not back


def test_audit_event_round_trip() -> None:
    ev = AuditEvent(
        id="e1",
        type=REQUEST,
        time=datetime.now(UTC),
        success=True,
        cluster_name="c1",
        user="alice",
        app="a",
        session_id="tag.s1",
        roles=("r1", "r2"),
        method="tools/call",
        request_id=5,
        tool="echo",
        params={"arguments": {"message": "hi"}},
        headers={"user-agent": "x"},
    )
    assert wire.event_from_wire(orjson.loads(orjson.dumps(wire.event_to_wire(ev)))) == ev
    c = Completion("e1", False, "boom", 1.5)
    assert wire.completion_from_wire(orjson.loads(orjson.dumps(wire.completion_to_wire(c)))) == c


def test_items_and_events_round_trip() -> None:
    item = Item("/apps/a", b'{"kind":"app"}', 12, datetime.now(UTC))
    assert wire.item_from_wire(orjson.loads(orjson.dumps(wire.item_to_wire(item)))) == item
    ev = Event(EventType.DELETE, Item("/apps/a", b"", 13))
    assert wire.event_of_item_from_wire(orjson.loads(orjson.dumps(wire.event_of_item_to_wire(ev)))) == ev
