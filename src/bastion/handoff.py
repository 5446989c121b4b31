"""The request hand-off: what the proxy (or a tunnel) gives the MCP handler with a request.

The proxy authenticates the caller, finds the app and checks that the caller may reach it;
then it calls the handler of ``/mcp/apps/<app>`` (in-process, or on an app service over a
tunnel) with a :class:`Handoff` in ``scope["bastion"]``: nothing else in the scope is trusted
to say who is asking or for which app.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bastion.auth.server import Actor
from bastion.resources import App

SCOPE_KEY = "bastion"


@dataclass(frozen=True, slots=True)
class Handoff:
    #: Who is asking (authenticated by the proxy), with the roles that decide.
    actor: Actor
    #: The app asked for, as the proxy found it (the handler's registry decides again).
    app: App
    #: The path below ``/mcp/apps/<app>``, normalised by the proxy ("/" for the MCP endpoint).
    subpath: str = "/"
    #: The request's headers, lower-cased, when the proxy read them already.
    headers: dict[bytes, bytes] | None = None
    #: An upstream JWT the proxy signed for this caller and app (a joined app service holds no
    #: cluster keys), with its expiry.
    jwt: tuple[str, datetime] | None = None


def handoff_of(scope: Mapping[str, Any]) -> Handoff:
    """The hand-off in ``scope``; a TypeError if there is none (a wiring bug, never client input)."""
    h = scope.get(SCOPE_KEY)
    if not isinstance(h, Handoff):
        raise TypeError(f"scope[{SCOPE_KEY!r}] holds {type(h).__name__}, not a Handoff")
    return h
