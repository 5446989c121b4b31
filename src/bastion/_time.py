"""Durations written the Go way (``90s``, ``30m``, ``12h``, ``1h30m``, ``7d``) and an injectable clock."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Protocol

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> timedelta:
    """Parse ``1h30m``-style text; raise ``ValueError`` with a readable reason."""
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    pos = 0
    total = 0.0
    for m in _PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s):
        raise ValueError(f'invalid duration "{text}" (use forms like 90s, 30m, 12h, 1h30m, 7d)')
    if total <= 0:
        raise ValueError(f'duration "{text}" must be positive')
    return timedelta(seconds=total)


def format_duration(d: timedelta) -> str:
    """The shortest ``XhYmZs`` text for ``d`` (seconds precision)."""
    secs = int(d.total_seconds())
    if secs <= 0:
        return "0s"
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        q, secs = divmod(secs, size)
        if q:
            out.append(f"{q}{unit}")
    return "".join(out)


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    """Wall-clock time in UTC."""

    def now(self) -> datetime:
        return datetime.now(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)
