"""The app service's copy of the cluster's pinned tool definitions (decision 0045).

A :class:`PinBook` keeps the pins of the apps it serves in memory, filled on a session's start
(one read per app) and kept current by following the cluster's changes (``PinSource.follow``:
the backend's watch in-process, the tunnel for a joined app service), so that the engine
judges a ``tools/list`` or a ``tools/call`` without any I/O.  New pins and changes a session
found (``RecordPins``) are merged into the copy at once and written for the cluster in the
background: the write is not a condition of the call (what to hide and refuse was decided).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from bastion._tasks import stop_tasks
from bastion.errors import BastionError
from bastion.policy.pins import NO_PINS, AppPins, Change, Pin, PinMode
from bastion.resources import App
from bastion.session.engine import PinView, RecordPins

__all__ = ["PinBook", "PinSource"]

log = logging.getLogger("bastion.app.pins")


class PinSource(Protocol):
    """Where the cluster's pins are (``auth.pins.PinStore`` in-process; the tunnel when joined)."""

    async def load(self, app: str) -> AppPins: ...

    async def record(self, app: str, new: Sequence[Pin], changed: Sequence[Change]) -> object: ...

    async def follow(
        self, on_change: Callable[[str, AppPins], None], on_resync: Callable[[set[str]], None]
    ) -> None: ...


class _View:
    """One app's pins as the book has them now (the engine's ``PinView``)."""

    __slots__ = ("_app", "_cache", "mode")

    def __init__(self, cache: dict[str, AppPins], app: str, mode: PinMode) -> None:
        self._cache = cache
        self._app = app
        self.mode: PinMode = mode

    def current(self) -> AppPins:
        return self._cache.get(self._app, NO_PINS)


class PinBook:
    """Pins of the apps served here, current within the cluster's watch delay."""

    def __init__(self, source: PinSource) -> None:
        self.source = source
        self._cache: dict[str, AppPins] = {}
        #: Apps whose pins were read (or arrived through the watch) since the last resync.
        self._known: set[str] = set()
        self._follow: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        watch = self.source.follow(self._changed, self._resynced)
        self._follow = asyncio.create_task(watch, name="pins-watch")

    async def aclose(self) -> None:
        await stop_tasks(self._follow)
        if self._writes:  # let pending writes finish (they are few and short)
            await asyncio.wait(set(self._writes), timeout=5.0)
        await stop_tasks(*self._writes)

    def _changed(self, app: str, pins: AppPins) -> None:
        self._cache[app] = pins
        self._known.add(app)

    def _resynced(self, listed: set[str]) -> None:
        # Pins deleted while nobody watched: gone here too.
        for app in set(self._cache) - listed:
            self._cache[app] = NO_PINS

    async def view(self, app: App) -> PinView | None:
        """The engine's view of ``app``'s pins; None when the app does not pin (no cost at all).
        Reads the cluster's pins once if this process has not seen them yet."""
        mode = app.spec.pinning
        if mode == "off":
            return None
        name = app.metadata.name
        if name not in self._known:
            self._cache[name] = await self.source.load(name)
            self._known.add(name)
        return _View(self._cache, name, mode)

    def record(self, cmd: RecordPins) -> None:
        """Merge ``cmd`` into the copy now; write it for the cluster in the background."""
        merged = self._cache.get(cmd.app, NO_PINS).merged(cmd.new, cmd.changed, "")
        if merged is not None:
            self._cache[cmd.app] = merged
        task = asyncio.create_task(self._write(cmd), name=f"pins-write-{cmd.app}")
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, cmd: RecordPins) -> None:
        try:
            await self.source.record(cmd.app, cmd.new, cmd.changed)
        except BastionError as e:
            log.error(
                "pinned tool definitions could not be stored for the cluster; this process still "
                "hides and refuses what it found",
                extra={"app": cmd.app, "error": e.message},
            )
            return
        log.debug("pins stored", extra={"app": cmd.app})
