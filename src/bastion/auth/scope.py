"""What a joined host may serve: the scope of the join token it joined with.

A join token may name the apps (``--apps=a,b``) and the app labels
(``--labels=env=dev``) its host may serve; the scope is written into the host
certificate (a private X.509 extension signed by the host CA) and carried over
renewals, so the proxy reads it from the TLS peer certificate of every tunnel
without a backend lookup.  An empty scope allows any app (tokens made without
``--apps``/``--labels``), as before scopes existed.

Rule: an app is inside the scope when its name is one of ``apps`` (if any are
given) **and** its labels match ``labels`` with the semantics of a role's
``app_labels`` selector (every key must match; values are literals, globs or
``^regex$``), **and** it has no label whose key the scope does not name.
Labels come from the host's own config for static apps: a host cannot widen
its scope by labelling an app as it likes, because the labels are checked, not
trusted.  The last clause is why: a host scoped to ``env=dev`` that labels its
app ``{env: dev, team: admins}`` would otherwise be offered to every role that
selects ``team: admins``, users the scope never named (found by the second
adversarial review, A5).

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from bastion.policy.matchers import LabelSelector
from bastion.policy.rbac import app_labels
from bastion.resources import SUB_KIND_LABEL, App

#: OID of the certificate extension holding a host's scope (JSON): a UUID-derived OID
#: (``2.25.<uuid>``, ITU-T X.667), so it needs no registration and clashes with nothing.
SCOPE_OID = "2.25.126917154570175767087689470678609286538"
_MAX_DOC = 16 << 10


@dataclass(frozen=True)
class HostScope:
    apps: tuple[str, ...] = ()
    labels: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, apps: Sequence[str] = (), labels: Mapping[str, Sequence[str]] | None = None) -> HostScope:
        return cls(tuple(apps), {k: tuple(v) for k, v in (labels or {}).items()})

    @property
    def unrestricted(self) -> bool:
        return not self.apps and not self.labels

    def refusal(self, app: App) -> str:
        """Why ``app`` is outside this scope, or ``""`` when it is inside."""
        name = app.metadata.name
        if self.apps and name not in self.apps:
            return f'app "{name}" is not among the apps its join token allows ({", ".join(self.apps)})'
        if self.labels:
            labels = app_labels(app)
            sel = LabelSelector.compile(dict(self.labels), {}, fail_closed=True)
            if not sel.matches(labels):
                return (
                    f'the labels of app "{name}" are outside what its join token allows ({self.describe()})'
                )
            extra = sorted(k for k in labels if k not in self.labels and k != SUB_KIND_LABEL)
            if extra:
                shown = ", ".join(k[:64] for k in extra[:5])
                return (
                    f'app "{name}" has labels its join token does not name ({shown}); '
                    f"the token allows only {self.describe()}"
                )
        return ""

    def describe(self) -> str:
        parts = []
        if self.apps:
            parts.append("apps=" + ",".join(self.apps))
        if self.labels:
            parts.append("labels=" + ",".join(f"{k}={'|'.join(v)}" for k, v in sorted(self.labels.items())))
        return " ".join(parts) or "any app"

    def to_json(self) -> bytes:
        return orjson.dumps(
            {"apps": list(self.apps), "labels": {k: list(v) for k, v in self.labels.items()}},
            option=orjson.OPT_SORT_KEYS,
        )

    @classmethod
    def from_json(cls, data: bytes) -> HostScope:
        """Parse a scope document; a malformed one is an error (never "no scope")."""
        if len(data) > _MAX_DOC:
            raise ValueError("host scope document too large")
        doc: Any = orjson.loads(data)
        apps = doc.get("apps", []) if isinstance(doc, dict) else None
        labels = doc.get("labels", {}) if isinstance(doc, dict) else None
        if not isinstance(apps, list) or not all(isinstance(a, str) for a in apps):
            raise ValueError("host scope: apps must be a list of names")
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(x, str) for x in v)
            for k, v in labels.items()
        ):
            raise ValueError("host scope: labels must map keys to lists of values")
        return cls.of(apps, labels)


def parse_label_scope(text: str) -> dict[str, list[str]]:
    """``env=dev,team=a|b`` -> ``{"env": ["dev"], "team": ["a", "b"]}`` (the CLI's ``--labels``)."""
    out: dict[str, list[str]] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f'malformed label "{part[:64]}" (expected key=value)')
        out.setdefault(key.strip(), []).extend(v.strip() for v in value.split("|") if v.strip())
    return out
