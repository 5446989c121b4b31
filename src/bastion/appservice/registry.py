"""Which apps this app service serves: static ones from the config, the demo, dynamic ones later.

The proxy asks ``get(name)``; a name not served here is indistinguishable
from a name the user may not see (both: "no such app").
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable

from bastion.appservice.demo import demo_app
from bastion.resources import App
from bastion.tombstones import Removed


class AppRegistry:
    """Static apps (config file, demo) and dynamic ones (backend resources); static names win."""

    def __init__(
        self, apps: Iterable[App] = (), *, demo: bool = False, on_change: Callable[[], None] | None = None
    ) -> None:
        self._static: dict[str, App] = {}
        self._dynamic: dict[str, App] = {}
        self._refused: dict[str, str] = {}
        #: Dynamic apps removed by the cluster (``Removed``).
        self.removed = Removed()
        self._on_change = on_change
        # Made here, not at the first wait: a change before that wait must not be lost.
        self._changed = asyncio.Event()
        for app in apps:
            self._static[app.metadata.name] = app
        if demo:
            d = demo_app()
            self._static.setdefault(d.metadata.name, d)

    def get(self, name: str) -> App | None:
        return self._static.get(name) or self._dynamic.get(name)

    def all(self) -> list[App]:
        merged = {**self._dynamic, **self._static}
        return sorted(merged.values(), key=lambda a: a.metadata.name)

    def is_static(self, name: str) -> bool:
        return name in self._static

    def static_apps(self) -> dict[str, App]:
        """The static apps (config file, demo) by name: the names this host's operator owns."""
        return dict(self._static)

    def dynamic_names(self) -> list[str]:
        return list(self._dynamic)

    def set_dynamic(self, app: App) -> None:
        self._dynamic[app.metadata.name] = app
        self.removed.forget(app.metadata.name)
        self._notify()

    def remove_dynamic(self, name: str) -> bool:
        gone = self._dynamic.pop(name, None)
        if gone is not None:
            self.removed.add(gone)
            self._notify()
        return gone is not None

    def refused(self) -> dict[str, str]:
        """Dynamic apps the host's policy refuses: name -> reason (shown in heartbeats)."""
        return dict(self._refused)

    def set_refused(self, name: str, reason: str | None) -> None:
        """Record (or with ``None``, forget) why a dynamic app is not served."""
        before = self._refused.get(name)
        if reason is None:
            self._refused.pop(name, None)
        else:
            self._refused[name] = reason
        if before != reason:
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        if self._on_change is not None:
            self._on_change()

    async def wait_changed(self, within: float) -> None:
        """Return when the served apps change, or after ``within`` seconds.

        Cleared on return, before the caller reads what is served: a change after that
        sets it again (no lost wake-up, as in the agent's heartbeat loop).
        """
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), within)
        self._changed.clear()

    def is_demo(self, app: App) -> bool:
        return app.metadata.name == demo_app().metadata.name and app.spec.uri == demo_app().spec.uri
