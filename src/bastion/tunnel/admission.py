"""Which of the apps a joined host advertises the proxy accepts: an app name is ONE app.

A joined app service heartbeats the apps it serves; the proxy routes new
sessions to every live app service serving a name.  Without a check, a host
joined with an ordinary token could advertise an app under a name that
already means something else (the proxy's own ``logger``) and receive half of
its sessions, or advertise an app with labels of its choosing.  The rules,
applied to every heartbeat (decision 0019):

1. **Scope.** An app outside the host's join-token scope (names, labels; see
   ``bastion.auth.scope``) is refused.
2. **One name, one definition.** The definition a name already has wins, in
   this order of authority: a static app of the proxy's own app service; the
   ``app`` resource of that name in the backend; the app another connected
   host advertised first.  A host advertising a *different* definition under
   that name is refused and alarmed; the *same* definition (a dynamic app
   served by several app services, or the same static app on several hosts)
   is accepted and load-balanced, as before.
3. **Catching up is not an attack.** A host that still serves an older
   revision of an app resource (it has not seen the update yet) is skipped
   without an alarm until its next heartbeat.

A definition is everything routing and RBAC read: the app's kind, version,
name, description, labels and spec (not the stored revision or expiry).

Pure: no I/O.  ``bastion.tunnel.server`` gathers the inputs and carries out
the alarms (a warning log line and a ``host.app_refused`` audit event).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import orjson

from bastion.auth.scope import HostScope
from bastion.resources import App


def definition(app: App) -> bytes:
    """The canonical bytes of what an app *is* (revision and expiry left out)."""
    doc = app.model_dump(mode="json", exclude={"metadata": {"revision", "expires"}})
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)


def digest(app: App) -> str:
    return hashlib.sha256(definition(app)).hexdigest()[:16]


@dataclass(frozen=True)
class Refusal:
    app: str
    reason: str
    #: False for a host catching up with an update (skipped quietly).
    alarm: bool = True
    #: Of the refused definition: alarms are raised once per (app, definition).
    digest: str = ""


@dataclass(frozen=True)
class Authorities:
    """Definitions names already have, by authority (see the module doc)."""

    local_static: Mapping[str, App]
    resources: Mapping[str, App]
    #: Apps accepted from the other connected hosts, earliest connection first.
    others: Mapping[str, App]


def admit(
    advertised: Iterable[App], scope: HostScope, known: Authorities
) -> tuple[dict[str, App], list[Refusal]]:
    """Split what a host advertises into what is accepted (by name) and what is refused."""
    accepted: dict[str, App] = {}
    refused: list[Refusal] = []
    for app in advertised:
        name = app.metadata.name
        if name in accepted:
            refused.append(Refusal(name, "advertised twice in one heartbeat", digest=digest(app)))
            continue
        why = scope.refusal(app)
        if why:
            refused.append(Refusal(name, why, digest=digest(app)))
            continue
        refusal = _name_clash(app, known)
        if refusal is None:
            accepted[name] = app
        else:
            refused.append(refusal)
    return accepted, refused


def _name_clash(app: App, known: Authorities) -> Refusal | None:
    name, mine = app.metadata.name, definition(app)
    for owner, table in (
        ("a static app of the proxy's own app service", known.local_static),
        ("the app resource of that name", known.resources),
        ("an app another host serves", known.others),
    ):
        theirs = table.get(name)
        if theirs is None:
            continue
        if definition(theirs) == mine:
            return None
        if table is known.resources and _older(app, theirs):
            return Refusal(
                name,
                f"serves revision {app.metadata.revision} of the app resource, which is now at "
                f"revision {theirs.metadata.revision} (catching up)",
                alarm=False,
                digest=digest(app),
            )
        return Refusal(
            name,
            f'app "{name}" already exists with another definition ({owner}); a joined host may not '
            "serve a different app under an existing name",
            digest=digest(app),
        )
    return None


def _older(app: App, resource: App) -> bool:
    mine, theirs = app.metadata.revision, resource.metadata.revision
    return mine is not None and theirs is not None and mine < theirs
