"""What the data path remembers of apps that are gone, so their clients hear why.

A client still using an app the cluster removed (a deleted app resource, a host that stopped
serving it) is told so, from whichever proxy it reaches, instead of "no MCP app named X" (as if
it had asked for a name that never existed) or "session not found" (as if it were its fault).
"""

from __future__ import annotations

import time

from bastion.resources import App

#: How long a removed app is remembered, so its clients hear why it is gone.
REMEMBER_REMOVED = 3600.0
_MAX_REMOVED = 256


class Removed:
    """Apps removed by the cluster, remembered for a while (bounded): a client still using one
    is told that the cluster removed it, not that it asked for an app that does not exist."""

    def __init__(self) -> None:
        self._apps: dict[str, tuple[App, float]] = {}

    def add(self, app: App) -> None:
        self._apps.pop(app.metadata.name, None)
        self._apps[app.metadata.name] = (app, time.monotonic())
        while len(self._apps) > _MAX_REMOVED:
            del self._apps[next(iter(self._apps))]

    def forget(self, name: str) -> None:
        self._apps.pop(name, None)

    def get(self, name: str) -> App | None:
        got = self._apps.get(name)
        if got is None or time.monotonic() - got[1] > REMEMBER_REMOVED:
            return None
        return got[0]
