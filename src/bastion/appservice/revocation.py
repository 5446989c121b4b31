"""Revocation ends live sessions: when users or roles change, sessions that lost their app end.

A request on a live session already takes the user's new roles (``MCPHandler._session``), but
a session nobody sends to would keep its upstream (a stdio child process) until the idle
reaper. This watcher follows the backend's ordered change feed, like ``dynamic.py``, and on
every change to a ``user`` or ``role`` resource asks the handler to end each session whose
user may no longer use its app (``MCPHandler.end_unauthorised_sessions``): upstream closed,
streams closed, end event with the reason.  Nothing here runs per request.

Only an app service in the auth server's process can follow the backend; a joined app
service (over the tunnel) has no backend access, so its sessions still end on their next
request or at the idle reaper.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from bastion._tasks import stop_tasks
from bastion.backend import Backend, Event
from bastion.backend.follow import follow_changes
from bastion.resources import prefix_for
from bastion.session.engine import ToolPolicy

log = logging.getLogger("bastion.app.revocation")

#: Changes to these resources can take an app away from a user.
_WATCHED = (prefix_for("user"), prefix_for("role"))

Access = Callable[[str], Awaitable[ToolPolicy | None]]


def concerns_access(key: str) -> bool:
    """Can a change to the backend ``key`` take an app away from a user?"""
    return key.startswith(_WATCHED)


class AccessWatch:
    """Re-checks live sessions whenever a user or a role changes in ``backend``."""

    def __init__(self, backend: Backend, access: Access, end: Callable[[Access], Awaitable[None]]) -> None:
        #: ``access(user)``: the user's current policy (None: no such user any more);
        #: ``end(access)``: ends the sessions it no longer allows.
        self.backend = backend
        self.access = access
        self.end = end
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="access-watch")

    async def aclose(self) -> None:
        if self._task is not None:
            await stop_tasks(self._task)

    async def _run(self) -> None:
        async def check() -> None:
            # On start and after a gap: whatever changed while nobody watched is checked once.
            await self.end(self.access)

        async def apply(ev: Event) -> None:
            if concerns_access(ev.item.key):
                await self.end(self.access)

        await follow_changes(self.backend, resync=check, apply=apply, log=log, what="access watch")
