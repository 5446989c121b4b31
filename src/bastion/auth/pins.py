"""Pinned tool definitions in the backend (decision 0045): one document per app, every writer agreeing.

The pins of app ``A`` are one item, ``/mcp_pins/A`` (``policy.pins.AppPins`` as JSON).  Every
write is a compare-and-swap on the item's revision, retried on a conflict with the merge
applied to what is stored now: two app services pinning the same tool at once keep the first
definition written, and an approval is never lost to a concurrent "first sight" write.  App
services follow the prefix with the backend's watch (``follow``), so an approval reaches every
proxy and app service of the cluster within the watch delay.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from bastion._time import Clock
from bastion.backend import Backend, Event, EventType, Item
from bastion.backend.follow import follow_changes
from bastion.errors import AlreadyExistsError, BackendError, ConflictError, NotFoundError
from bastion.policy.pins import NO_PINS, AppPins, Change, Pin, Pinned, diff

__all__ = ["PREFIX", "PinStore", "describe", "follow_pins", "pins_key"]

log = logging.getLogger("bastion.pins")

PREFIX = "/mcp_pins/"
#: Compare-and-swap attempts before a write gives up (each one re-reads what is stored).
_ATTEMPTS = 20


def pins_key(app: str) -> str:
    return PREFIX + app


def _decode(item: Item) -> AppPins:
    try:
        return AppPins.from_json(item.value)
    except (ValueError, KeyError, TypeError) as e:
        # A document nobody can read pins nothing: say so loudly, hide nothing silently.
        log.error("stored pins cannot be read; treated as none", extra={"key": item.key, "error": str(e)})
        return NO_PINS


def describe(rec: Pinned) -> dict[str, Any]:
    """One tool's pin as the web API shows it: its state, both definitions, and the diff."""
    state = "changed" if rec.changed is not None else ("approved" if rec.pin.approved else "waiting")
    out: dict[str, Any] = {
        "tool": rec.pin.tool,
        "state": state,
        "fingerprint": rec.pin.fingerprint,
        "approved": rec.pin.approved,
        "first_seen": rec.first_seen,
        "approved_by": rec.approved_by,
        "approved_at": rec.approved_at,
        "definition": dict(rec.pin.definition),
    }
    if rec.changed is not None:
        out["changed"] = {
            "fingerprint": rec.changed.fingerprint,
            "seen": rec.changed_at,
            "definition": dict(rec.changed.definition),
        }
        out["diff"] = diff(rec.pin.definition, rec.changed.definition)
    return out


class PinStore:
    """Reads and writes the pins of apps in ``backend``."""

    def __init__(self, backend: Backend, clock: Clock) -> None:
        self.backend = backend
        self.clock = clock

    def _now(self) -> str:
        return self.clock.now().isoformat(timespec="seconds")

    async def load(self, app: str) -> AppPins:
        try:
            return _decode(await self.backend.get(pins_key(app)))
        except NotFoundError:
            return NO_PINS

    async def _change(self, app: str, merge: Callable[[AppPins], AppPins | None]) -> AppPins:
        """Apply ``merge`` to the stored pins with compare-and-swap (``merge`` returning None:
        nothing to write); what is stored afterwards."""
        key = pins_key(app)
        for _ in range(_ATTEMPTS):
            try:
                item = await self.backend.get(key)
            except NotFoundError:
                item = None
            current = _decode(item) if item is not None else NO_PINS
            changed = merge(current)
            if changed is None:
                return current
            try:
                if item is None:
                    await self.backend.create(Item(key, changed.to_json()))
                elif changed.records:
                    await self.backend.update(Item(key, changed.to_json()), item.revision)
                else:
                    await self.backend.delete(key, item.revision)
            except (AlreadyExistsError, ConflictError, NotFoundError):
                continue  # someone else wrote meanwhile: merge into theirs
            return changed
        raise BackendError(f"the pins of app {app!r} kept changing under this write; try again")

    async def record(self, app: str, new: Sequence[Pin], changed: Sequence[Change]) -> AppPins:
        """Pins first seen and definitions that differ from their pins, from a ``tools/list``."""
        now = self._now()
        return await self._change(app, lambda cur: cur.merged(new, changed, now))

    async def approve(self, app: str, tools: Sequence[str] | None, by: str) -> list[str]:
        """Approve the waiting or changed definitions of ``tools`` (None: all); those approved."""
        now = self._now()
        done: list[str] = []

        def merge(cur: AppPins) -> AppPins | None:
            new, approved = cur.approved(tools, by, now)
            done[:] = approved
            return new if approved else None

        await self._change(app, merge)
        return done

    async def reset(self, app: str, tools: Sequence[str] | None) -> list[str]:
        """Forget the pins of ``tools`` (None: all); those forgotten."""
        done: list[str] = []

        def merge(cur: AppPins) -> AppPins | None:
            new, gone = cur.reset(tools)
            done[:] = gone
            return new if gone else None

        await self._change(app, merge)
        return done

    async def follow(
        self, on_change: Callable[[str, AppPins], None], on_resync: Callable[[set[str]], None]
    ) -> None:
        """See :func:`follow_pins`."""
        await follow_pins(self.backend, on_change, on_resync)


async def follow_pins(
    backend: Backend, on_change: Callable[[str, AppPins], None], on_resync: Callable[[set[str]], None]
) -> None:
    """Until cancelled: ``on_change(app, pins)`` for every stored app then ``on_resync(apps)``
    (at start and after a gap), and ``on_change`` for every later write (NO_PINS when an app's
    pins are deleted).  ``backend`` is only read (a joined app service passes its tunnel view)."""

    async def resync() -> None:
        listed: set[str] = set()
        for item in await backend.list(PREFIX):
            app = item.key[len(PREFIX) :]
            listed.add(app)
            on_change(app, _decode(item))
        on_resync(listed)

    async def apply(ev: Event) -> None:
        key = ev.item.key
        if key.startswith(PREFIX):
            app = key[len(PREFIX) :]
            on_change(app, NO_PINS if ev.type == EventType.DELETE else _decode(ev.item))

    await follow_changes(backend, resync=resync, apply=apply, log=log, what="pins watch")
