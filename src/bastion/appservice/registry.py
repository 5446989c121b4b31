"""Which apps this app service serves: static ones from the config, the demo, dynamic ones later.

The proxy asks ``get(name)``; a name not served here is indistinguishable
from a name the user may not see (both: "no such app").
"""

from __future__ import annotations

from collections.abc import Iterable

from bastion.appservice.demo import demo_app
from bastion.resources import App


class AppRegistry:
    """Static apps (config file, demo) and dynamic ones (backend resources); static names win."""

    def __init__(self, apps: Iterable[App] = (), *, demo: bool = False) -> None:
        self._static: dict[str, App] = {}
        self._dynamic: dict[str, App] = {}
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

    def dynamic_names(self) -> list[str]:
        return list(self._dynamic)

    def set_dynamic(self, app: App) -> None:
        self._dynamic[app.metadata.name] = app

    def remove_dynamic(self, name: str) -> bool:
        return self._dynamic.pop(name, None) is not None

    def is_demo(self, app: App) -> bool:
        return app.metadata.name == demo_app().metadata.name and app.spec.uri == demo_app().spec.uri
