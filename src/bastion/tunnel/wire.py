"""What crosses the tunnel, as JSON: actors, audit events, backend items, apps.

Pure conversions, both directions, no I/O.  The proxy authenticates the user
and sends the *decided* identity (user record, role documents, credential
facts) with every request it carries to an app service; the app service
trusts it because it comes over mutually authenticated TLS from a proxy
certificate of its own cluster, and rebuilds the policy from it (cached per
user and policy revision, so a request costs a dict lookup).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from bastion.audit import codec
from bastion.auth.server import Actor
from bastion.backend import Event, EventType, Item
from bastion.identity import Identity
from bastion.policy import AccessChecker
from bastion.resources import App, Role, User

# ----------------------------------------------------------------- actors


def actor_to_wire(actor: Actor) -> dict[str, Any]:
    assert actor.user is not None and actor.identity is not None
    ident = actor.identity
    return {
        "name": actor.name,
        # The status (record id, revocations) is the proxy's business; it never crosses.
        "user": actor.user.model_dump(mode="json", exclude={"status"}),
        "roles": [r.model_dump(mode="json") for r in actor.roles],
        "policy_key": list(actor.policy_key),
        "identity": {
            "username": ident.username,
            "cluster_name": ident.cluster_name,
            "roles": list(ident.roles),
            "traits": {k: list(v) for k, v in ident.traits.items()},
            "expires": ident.expires.isoformat(),
            "issued_at": ident.issued_at.isoformat(),
            "token_id": ident.token_id,
        },
    }


class ActorCache:
    """Actors rebuilt from the wire, reused while the user's policy revision is the same."""

    def __init__(self, max_size: int = 10_000) -> None:
        self._cache: dict[tuple[str, tuple[int, ...], str], Actor] = {}
        self._max = max_size

    def get(self, doc: dict[str, Any]) -> Actor:
        ident_doc = doc["identity"]
        key = (doc["name"], tuple(doc["policy_key"]), ident_doc["token_id"] + ident_doc["expires"])
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        user = User.model_validate(doc["user"])
        roles = [Role.model_validate(r) for r in doc["roles"]]
        ident = Identity(
            username=ident_doc["username"],
            cluster_name=ident_doc["cluster_name"],
            roles=tuple(ident_doc["roles"]),
            traits={k: tuple(v) for k, v in ident_doc["traits"].items()},
            expires=datetime.fromisoformat(ident_doc["expires"]),
            issued_at=datetime.fromisoformat(ident_doc["issued_at"]),
            token_id=ident_doc["token_id"],
        )
        actor = Actor(
            name=doc["name"],
            checker=AccessChecker(roles, user.spec.traits),
            identity=ident,
            user=user,
            policy_key=key[1],
            roles=tuple(roles),
        )
        if len(self._cache) >= self._max:
            self._cache.clear()
        self._cache[key] = actor
        return actor


# ------------------------------------------------------------------ audit

event_to_wire = codec.event_to_wire
event_from_wire = codec.event_from_wire
completion_to_wire = codec.completion_to_wire
completion_from_wire = codec.completion_from_wire


# ---------------------------------------------------------- backend items


def item_to_wire(item: Item) -> dict[str, Any]:
    return {
        "key": item.key,
        "value": item.value.decode(),
        "revision": item.revision,
        "expires": item.expires.isoformat() if item.expires else None,
    }


def item_from_wire(doc: dict[str, Any]) -> Item:
    exp = doc.get("expires")
    return Item(
        doc["key"],
        doc["value"].encode(),
        int(doc["revision"]),
        datetime.fromisoformat(exp) if exp else None,
    )


def event_of_item_to_wire(ev: Event) -> dict[str, Any]:
    return {"type": ev.type.value, "item": item_to_wire(ev.item)}


def event_of_item_from_wire(doc: dict[str, Any]) -> Event:
    return Event(EventType(doc["type"]), item_from_wire(doc["item"]))


# -------------------------------------------------------------------- apps


def app_to_wire(app: App) -> dict[str, Any]:
    """An app as a heartbeat carries it; the revision of a dynamic app lets the proxy tell a
    host catching up with an update from one serving another definition."""
    return app.model_dump(mode="json")


def app_from_wire(doc: dict[str, Any]) -> App:
    return App.model_validate(doc)
