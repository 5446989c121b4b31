"""Cluster events written where no audit log is open: the outbox in the cluster's backend.

Local administration (``bastion users add`` on the server host, through the data
directory) changes the cluster while the running service holds the audit log: a
SQLite audit log has one writer at a time (``audit.lock``, decision 0032), and the
service may not even be running.  So local administration writes its events here,
in the same backend it writes the change to, before it answers (decision 0033):

* ``Outbox.record`` stores the event under ``/audit_outbox/<time>-<id>``;
* ``deliver`` (run by every node with an audit log: at start and on each new outbox
  key the backend watch reports) records each event into the audit log, waits until
  it is durable, then deletes it.  Several nodes may deliver the same event at once
  (all-in-one nodes on one PostgreSQL): the stores keep the first row of an event id,
  so it is stored once.
* ``pending`` lists what is not delivered yet (``bastion audit search`` on the server
  host shows it too, so nothing an administrator just did is missing from a search).

Only ``AuthServer``'s callers use this; I/O only through the ``Backend`` protocol.
"""

from __future__ import annotations

import contextlib
import logging

import orjson

from bastion.audit.codec import event_from_wire, event_to_wire
from bastion.audit.events import AuditEvent
from bastion.auth.server import ClusterAudit
from bastion.backend import Backend, Event, EventType, Item
from bastion.backend.follow import follow_changes
from bastion.errors import BastionError, NotFoundError

log = logging.getLogger("bastion.audit")

PREFIX = "/audit_outbox/"


class Outbox:
    """An ``AuthServer.audit`` for processes that hold no audit log."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    async def record(self, event: AuditEvent) -> None:
        micros = int(event.time.timestamp() * 1_000_000)
        key = f"{PREFIX}{micros:017d}-{event.id}"
        await self.backend.create(Item(key, orjson.dumps(event_to_wire(event))))


async def pending(backend: Backend) -> list[AuditEvent]:
    """Events in the outbox, oldest first."""
    return [event_from_wire(orjson.loads(i.value)) for i in await backend.list(PREFIX)]


async def deliver(backend: Backend, audit: ClusterAudit) -> int:
    """Move every event in the outbox into ``audit``, oldest first; how many were moved."""
    moved = 0
    for item in await backend.list(PREFIX):
        try:
            event = event_from_wire(orjson.loads(item.value))
        except (ValueError, TypeError, KeyError) as e:
            # Not ours to guess at; leave it for a person (it stays listed by `pending`).
            log.error("unreadable event in the audit outbox", extra={"key": item.key[:200], "error": str(e)})
            continue
        await audit.record(event)
        with contextlib.suppress(NotFoundError):
            await backend.delete(item.key)
        moved += 1
    return moved


async def follow(backend: Backend, audit: ClusterAudit) -> None:
    """Deliver at start and whenever an event arrives in the outbox, until cancelled."""

    async def resync() -> None:
        if await deliver(backend, audit):
            log.info("audit outbox delivered")

    async def apply(ev: Event) -> None:
        if ev.type is EventType.PUT and ev.item.key.startswith(PREFIX):
            try:
                await deliver(backend, audit)
            except BastionError as e:
                # Left in the outbox: the next arrival, or the next start, delivers it.
                log.warning("cannot deliver the audit outbox yet", extra={"error": e.message})

    await follow_changes(backend, resync=resync, apply=apply, log=log, what="audit outbox watch")
