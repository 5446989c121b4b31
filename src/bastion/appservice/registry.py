"""Which apps this app service serves: static ones from the config, the demo, dynamic ones later.

The proxy asks ``get(name)``; a name not served here is indistinguishable
from a name the user may not see (both: "no such app").
"""

from __future__ import annotations

from collections.abc import Iterable

from bastion.appservice.demo import demo_app
from bastion.resources import App


class AppRegistry:
    def __init__(self, apps: Iterable[App] = (), *, demo: bool = False) -> None:
        self._apps: dict[str, App] = {}
        for app in apps:
            self._apps[app.metadata.name] = app
        if demo:
            d = demo_app()
            self._apps.setdefault(d.metadata.name, d)

    def get(self, name: str) -> App | None:
        return self._apps.get(name)

    def all(self) -> list[App]:
        return sorted(self._apps.values(), key=lambda a: a.metadata.name)

    def is_demo(self, app: App) -> bool:
        return app.metadata.name == demo_app().metadata.name and app.spec.uri == demo_app().spec.uri
