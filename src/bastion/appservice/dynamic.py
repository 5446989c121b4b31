"""Dynamic apps: ``app`` resources from the backend, picked by the app service's label selectors.

``bastion create app.yaml`` / ``create -f`` / ``rm app/NAME`` change resources in
the backend; this watcher follows the backend's ordered change feed (no slow
polling: in-process writes wake it at once, other processes' within the
backend's poll interval) and keeps the registry in step:

* a created or updated app whose labels match a selector is served (an
  update applies to new sessions; live ones keep what they started with);
* an app deleted, or whose labels stop matching, is unregistered and its live
  sessions end cleanly (each with its end event);
* a dynamic app named like a static one from the config file is ignored with
  a warning: **the config file wins** (an admin with only backend access must
  not be able to replace what the host's operator configured); ``bastion
  create`` refuses such a name when the cluster can tell (decision 28), so this
  is left for a resource older than the static app;
* a dynamic app the host's policy refuses (``app_service.dynamic_apps``: a
  command, host user, variable or upstream address the host does not allow) is
  not served, with a warning giving the reason; one already served stops
  (its live sessions end).  The reasons are kept in the registry (``refused()``),
  which heartbeats show (``bastion get app_servers``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from bastion._tasks import stop_tasks
from bastion.appservice.hostpolicy import HostPolicy
from bastion.appservice.registry import AppRegistry
from bastion.auth.server import decode_resource
from bastion.backend import Backend, Event, EventType, Item
from bastion.backend.follow import follow_changes
from bastion.policy.matchers import LabelSelector
from bastion.policy.rbac import app_labels
from bastion.resources import App, prefix_for

log = logging.getLogger("bastion.app.dynamic")

PREFIX = prefix_for("app")


class DynamicApps:
    """Keeps ``registry``'s dynamic apps equal to the matching ``app`` resources."""

    def __init__(
        self,
        backend: Backend,
        registry: AppRegistry,
        selectors: Sequence[dict[str, list[str]]],
        *,
        on_removed: Callable[[str], Awaitable[None]],
        on_redefined: Callable[[str], Awaitable[None]] | None = None,
        policy: HostPolicy | None = None,
    ) -> None:
        #: ``policy`` None: the defaults, which serve no dynamic stdio or HTTP/SSE app.
        self.policy = policy if policy is not None else HostPolicy.defaults(registry.is_static)
        self.backend = backend
        self.registry = registry
        self.selectors = [LabelSelector.compile(s, {}) for s in selectors]
        self.on_removed = on_removed
        #: Called after an app served here changed definition (its older sessions end).
        self.on_redefined = on_redefined
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    def matches(self, app: App) -> bool:
        labels = app_labels(app)
        return any(sel.matches(labels) for sel in self.selectors)

    def start(self) -> None:
        if self.selectors:
            self._task = asyncio.create_task(self._run(), name="dynamic-apps")
        else:
            self.ready.set()

    async def aclose(self) -> None:
        if self._task is not None:
            await stop_tasks(self._task)

    async def _run(self) -> None:
        async def resync() -> None:
            await self._resync()
            self.ready.set()

        async def apply(ev: Event) -> None:
            if ev.item.key.startswith(PREFIX):
                await self._apply(ev.item.key[len(PREFIX) :], ev)

        await follow_changes(self.backend, resync=resync, apply=apply, log=log, what="app watch")

    async def _resync(self) -> None:
        wanted: dict[str, App] = {}
        for item in await self.backend.list(PREFIX):
            app = self._decode(item.key, item)
            if app is not None and self.matches(app):
                wanted[app.metadata.name] = app
        for name in set(self.registry.refused()) - set(wanted):
            self.registry.set_refused(name, None)
        for name in set(self.registry.dynamic_names()) - set(wanted):
            await self._remove(name, "no longer matches")
        for app in wanted.values():
            await self._serve(app)

    async def _apply(self, name: str, ev: Event) -> None:
        if ev.type == EventType.DELETE:
            await self._remove(name, "deleted")
            return
        app = self._decode(ev.item.key, ev.item)
        if app is None or not self.matches(app):
            await self._remove(name, "labels no longer match")
            return
        await self._serve(app)

    def _decode(self, key: str, item: Item) -> App | None:
        try:
            res = decode_resource(item)
        except Exception as e:  # a bad stored resource must not stop the watcher
            log.warning("cannot read app resource; ignored", extra={"key": key, "error": str(e)})
            return None
        return res if isinstance(res, App) else None

    async def _serve(self, app: App) -> None:
        name = app.metadata.name
        if self.registry.is_static(name):
            log.warning(
                "dynamic app ignored: an app of the same name is in the config file (the file wins)",
                extra={"app": name},
            )
            return
        why = self.policy.refusal(app)
        if why is not None:
            if self.registry.refused().get(name) != why:
                log.warning(
                    "dynamic app not served: refused by this host", extra={"app": name, "reason": why}
                )
            self.registry.set_refused(name, why)
            await self._remove(name, f"refused by this host: {why}")
            return
        self.registry.set_refused(name, None)
        known = self.registry.get(name)
        self.registry.set_dynamic(app)
        log.info("dynamic app updated" if known else "dynamic app registered", extra={"app": name})
        if known is not None and known != app and self.on_redefined is not None:
            await self.on_redefined(name)

    async def _remove(self, name: str, why: str) -> None:
        if not why.startswith("refused by this host"):
            self.registry.set_refused(name, None)
        if self.registry.remove_dynamic(name):
            log.info("dynamic app unregistered", extra={"app": name, "reason": why})
            await self.on_removed(name)
