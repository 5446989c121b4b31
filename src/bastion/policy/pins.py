"""Pinned tool definitions (decision 0045): what each tool of an app was when first seen or approved.

A server can change a tool's description or schema after users were granted it (a "rug pull":
new instructions for the model in the description, a new parameter that exfiltrates).  The
gateway keeps, per app, a :class:`Pin` per tool: the fingerprint of its definition (name,
title, description, input and output schema, annotations) when first seen (``first_use``) or
approved by an administrator (``approve``).  :func:`review` judges a ``tools/list`` result
against the pins: a tool whose definition changed is hidden, and so is one not approved yet in
``approve`` mode; :func:`call_refusal` says why a call to such a tool is refused.

:class:`AppPins` is what the cluster stores per app (one JSON document, ``to_json`` /
``from_json``): each tool's :class:`Pinned` record (its pin, who approved it and when, and the
last served definition that differed from it, for ``bastion mcp pins diff``), with the pure
merges the writers apply (:meth:`AppPins.merged`, :meth:`AppPins.approved`,
:meth:`AppPins.reset`).

This module is the pure core: no I/O, no clock (times come in as ISO strings).  Where pins are
stored (the backend, so every proxy and app service agrees), who writes them and how a change
is audited are the callers'.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import orjson

__all__ = [
    "DEFINITION_KEYS",
    "NO_PINS",
    "AppPins",
    "Change",
    "Pin",
    "PinMode",
    "Pinned",
    "Review",
    "call_refusal",
    "definition",
    "diff",
    "fingerprint",
    "review",
]

PinMode = Literal["first_use", "approve"]

#: The members of a tool entry that define it (``_meta``, ``icons`` and the like do not).
DEFINITION_KEYS: Final = ("name", "title", "description", "inputSchema", "outputSchema", "annotations")
#: Lines of a diff kept (a changed schema can be long; the full definitions stay in the pin).
MAX_DIFF_LINES: Final = 200


def definition(tool: Mapping[str, Any]) -> dict[str, Any]:
    """The defining members of a ``tools/list`` entry (absent ones left out)."""
    return {k: tool[k] for k in DEFINITION_KEYS if k in tool}


def _canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def fingerprint(defn: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of a definition: member order does not matter."""
    return hashlib.sha256(_canonical(dict(defn))).hexdigest()


def diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """A unified diff of two definitions, as indented JSON with sorted keys (at most
    :data:`MAX_DIFF_LINES` lines)."""

    def lines(d: Mapping[str, Any]) -> list[str]:
        text = orjson.dumps(dict(d), option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2).decode()
        return text.splitlines()

    out = list(difflib.unified_diff(lines(old), lines(new), "pinned", "served", lineterm="", n=2))
    if len(out) > MAX_DIFF_LINES:
        out = [*out[:MAX_DIFF_LINES], f"... ({len(out) - MAX_DIFF_LINES} more lines)"]
    return out


@dataclass(frozen=True, slots=True)
class Pin:
    """One tool's pin.  ``approved`` is False for a definition waiting for an administrator
    (``approve`` mode, first sight); ``definition`` is what was pinned (or awaits approval)."""

    tool: str
    fingerprint: str
    definition: Mapping[str, Any]
    approved: bool = True

    @classmethod
    def of(cls, tool: Mapping[str, Any], *, approved: bool = True) -> Pin:
        defn = definition(tool)
        return cls(str(defn.get("name", "")), fingerprint(defn), defn, approved)


@dataclass(frozen=True, slots=True)
class Change:
    """A served definition that differs from its pin."""

    pin: Pin
    served: Mapping[str, Any]
    served_fingerprint: str

    @property
    def diff(self) -> list[str]:
        return diff(self.pin.definition, self.served)


@dataclass(frozen=True, slots=True)
class Review:
    """What a ``tools/list`` result means for the pins of its app.

    ``visible``: the entries to pass on, in order.  ``new``: pins to record (approved in
    ``first_use`` mode, waiting in ``approve`` mode).  ``changed``: served definitions that
    differ from their pins (to audit, once per new fingerprint).  ``hidden``: names not shown.
    """

    visible: list[Mapping[str, Any]]
    new: tuple[Pin, ...] = ()
    changed: tuple[Change, ...] = ()
    hidden: tuple[str, ...] = field(default=())


def review(pins: Mapping[str, Pin], tools: Sequence[Mapping[str, Any]], mode: PinMode) -> Review:
    """Judge ``tools`` (entries already filtered by RBAC) against ``pins`` (by tool name).

    A tool is shown iff its pin is approved and its definition's fingerprint is the pinned
    one.  An unseen tool is pinned now: approved (shown) in ``first_use`` mode, waiting
    (hidden) in ``approve`` mode.  Entries without a string name are dropped.
    """
    visible: list[Mapping[str, Any]] = []
    new: list[Pin] = []
    changed: list[Change] = []
    hidden: list[str] = []
    for tool in tools:
        name = tool.get("name")
        if type(name) is not str:
            continue
        pin = pins.get(name)
        if pin is None:
            pin = Pin.of(tool, approved=mode == "first_use")
            new.append(pin)
            if pin.approved:
                visible.append(tool)
            else:
                hidden.append(name)
            continue
        defn = definition(tool)
        served = fingerprint(defn)
        if served != pin.fingerprint:
            changed.append(Change(pin, defn, served))
            hidden.append(name)
        elif not pin.approved:
            hidden.append(name)
        else:
            visible.append(tool)
    return Review(visible, tuple(new), tuple(changed), tuple(hidden))


def call_refusal(pins: Mapping[str, Pin], served: Mapping[str, str], tool: str, mode: PinMode) -> str | None:
    """Why a call to ``tool`` is refused, or None.  ``served``: the fingerprint each tool was
    last listed with on this app (by any session); a tool not listed yet is judged by its pin."""
    pin = pins.get(tool)
    if pin is None:
        if mode == "approve":
            return f'tool "{tool}" has no approved definition on this app yet (pinning: approve)'
        return None  # first_use: pinned when first listed
    if not pin.approved:
        return f'tool "{tool}" waits for an administrator to approve its definition (pinning: approve)'
    last = served.get(tool)
    if last is not None and last != pin.fingerprint:
        return (
            f'tool "{tool}" changed its definition since it was pinned; an administrator must '
            "approve the change (`bastion mcp pins diff` / `approve`)"
        )
    return None


# ------------------------------------------------------------ stored state


@dataclass(frozen=True, slots=True)
class Pinned:
    """One tool's stored record: its ``pin``; ``changed``: the last served definition that
    differed from it (kept, as a waiting pin, until approved or reset: a server that flips
    back and forth does not clear it); times are ISO 8601 strings."""

    pin: Pin
    first_seen: str = ""
    approved_by: str = ""
    approved_at: str = ""
    changed: Pin | None = None
    changed_at: str = ""

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "fingerprint": self.pin.fingerprint,
            "definition": dict(self.pin.definition),
            "approved": self.pin.approved,
            "first_seen": self.first_seen,
            "approved_by": self.approved_by,
            "approved_at": self.approved_at,
        }
        if self.changed is not None:
            doc["changed"] = {
                "fingerprint": self.changed.fingerprint,
                "definition": dict(self.changed.definition),
                "seen": self.changed_at,
            }
        return doc

    @classmethod
    def from_json(cls, tool: str, doc: Mapping[str, Any]) -> Pinned:
        pin = Pin(tool, str(doc["fingerprint"]), dict(doc["definition"]), bool(doc.get("approved", True)))
        ch = doc.get("changed")
        changed = None
        if isinstance(ch, Mapping):
            changed = Pin(tool, str(ch["fingerprint"]), dict(ch["definition"]), False)
        return cls(
            pin,
            str(doc.get("first_seen", "")),
            str(doc.get("approved_by", "")),
            str(doc.get("approved_at", "")),
            changed,
            str(ch.get("seen", "")) if isinstance(ch, Mapping) else "",
        )


class AppPins:
    """The stored pins of one app: a :class:`Pinned` record per tool (immutable: the merges
    return a new value).  ``pins`` and ``served`` are what :func:`review` and
    :func:`call_refusal` take, computed once per value."""

    __slots__ = ("pins", "records", "served")

    def __init__(self, records: Mapping[str, Pinned] | None = None) -> None:
        self.records: Mapping[str, Pinned] = dict(records or {})
        self.pins: Mapping[str, Pin] = {t: r.pin for t, r in self.records.items()}
        #: The fingerprint a changed tool was last served with (anywhere in the cluster).
        self.served: Mapping[str, str] = {
            t: r.changed.fingerprint for t, r in self.records.items() if r.changed is not None
        }

    def merged(self, new: Sequence[Pin], changed: Sequence[Change], now: str) -> AppPins | None:
        """With ``new`` pinned where the tool has no pin yet (the first writer wins) and each of
        ``changed`` noted against its pin if that pin is still the one it was judged against;
        None if nothing would change (so a writer skips the write)."""
        records = dict(self.records)
        dirty = False
        for pin in new:
            if pin.tool not in records:
                records[pin.tool] = Pinned(pin, now)
                dirty = True
        for ch in changed:
            rec = records.get(ch.pin.tool)
            if rec is None or rec.pin.fingerprint != ch.pin.fingerprint:
                continue  # approved or reset meanwhile: the next listing judges again
            if rec.changed is not None and rec.changed.fingerprint == ch.served_fingerprint:
                continue
            served = Pin(ch.pin.tool, ch.served_fingerprint, dict(ch.served), False)
            records[ch.pin.tool] = Pinned(
                rec.pin, rec.first_seen, rec.approved_by, rec.approved_at, served, now
            )
            dirty = True
        return AppPins(records) if dirty else None

    def approved(self, tools: Sequence[str] | None, by: str, now: str) -> tuple[AppPins, list[str]]:
        """Approve ``tools`` (None: every tool waiting): a changed definition becomes the pin, a
        waiting pin is approved.  The new value and the tools approved (sorted)."""
        records = dict(self.records)
        done: list[str] = []
        for tool in sorted(records if tools is None else set(tools)):
            rec = records.get(tool)
            if rec is None:
                continue
            if rec.changed is not None:
                pin = Pin(tool, rec.changed.fingerprint, rec.changed.definition, True)
            elif not rec.pin.approved:
                pin = Pin(tool, rec.pin.fingerprint, rec.pin.definition, True)
            else:
                continue
            records[tool] = Pinned(pin, rec.first_seen, by, now)
            done.append(tool)
        return AppPins(records), done

    def reset(self, tools: Sequence[str] | None) -> tuple[AppPins, list[str]]:
        """Forget ``tools`` (None: all): the next listing pins them again."""
        if tools is None:
            return AppPins(), sorted(self.records)
        records = dict(self.records)
        done = sorted(t for t in set(tools) if records.pop(t, None) is not None)
        return AppPins(records), done

    def to_json(self) -> bytes:
        return orjson.dumps({"tools": {t: r.to_json() for t, r in self.records.items()}})

    @classmethod
    def from_json(cls, data: bytes) -> AppPins:
        doc = orjson.loads(data)
        tools = doc.get("tools") if isinstance(doc, dict) else None
        if not isinstance(tools, dict):
            raise ValueError("a pins document needs a tools object")
        return cls({str(t): Pinned.from_json(str(t), r) for t, r in tools.items()})


#: An app with no pins yet.
NO_PINS: Final = AppPins()
