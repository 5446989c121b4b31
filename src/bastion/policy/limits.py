"""Rate limits on tool calls (decision 0051): which buckets a call draws from; pure.

A role's ``allow.mcp.rate_limits`` limit each user's calls of the named tools on each app the
role grants (``per_user``); an app's ``rate_limit`` limits every user's calls of it together.
A :class:`RateRule` is one bucket's description: its key (per app, role and rule, with
``{user}`` filled in per call), its emission interval and burst tolerance (GCRA: a call is
admitted if the bucket's theoretical arrival time is at most ``tolerance`` ahead of now), and
a label for refusals.  Where the counters live (the backend, so that every proxy and app
service agrees) and how a call waits for them are the callers'.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bastion.policy.matchers import Matcher, compile_patterns
from bastion.resources import App, RateLimit

__all__ = ["AppRateLimit", "CompiledRateLimit", "RateRule", "compile_rate_limits", "gcra"]


@dataclass(frozen=True, slots=True)
class RateRule:
    """One bucket a call draws a token from.  ``interval``: seconds per call at the sustained
    rate; ``tolerance``: how far ahead of now the bucket may run ((burst - 1) x interval)."""

    key: str
    interval: float
    tolerance: float
    label: str


def _timing(limit: RateLimit) -> tuple[float, float]:
    calls, seconds = limit.per_second
    interval = seconds / calls
    return interval, (limit.burst - 1) * interval


@dataclass(frozen=True, slots=True)
class CompiledRateLimit:
    """A role's rate limit with its tool patterns compiled."""

    role: str
    index: int
    label: str
    tools: tuple[Matcher, ...]
    interval: float
    tolerance: float

    def applies_to(self, tool: str) -> bool:
        return any(m.matches(tool) for m in self.tools)

    def rule(self, app: str, user: str) -> RateRule:
        return RateRule(
            f"{app}/role/{self.role}/{self.index}/{user}", self.interval, self.tolerance, self.label
        )


def compile_rate_limits(
    role: str, limits: Sequence[RateLimit], traits: Mapping[str, Sequence[str]]
) -> tuple[CompiledRateLimit, ...]:
    out = []
    for i, limit in enumerate(limits):
        interval, tolerance = _timing(limit)
        label = (
            f'rate limit "{limit.name or f"rate_limits[{i}]"}" of role "{role}" '
            f"({limit.per_user} per user, burst {limit.burst})"
        )
        out.append(
            CompiledRateLimit(role, i, label, compile_patterns(limit.tools, traits), interval, tolerance)
        )
    return tuple(out)


@dataclass(frozen=True, slots=True)
class AppRateLimit:
    """An app's ``rate_limit``: one bucket for every user's calls of the tools it names."""

    rule: RateRule
    tools: tuple[Matcher, ...]

    def for_tool(self, tool: str) -> RateRule | None:
        return self.rule if any(m.matches(tool) for m in self.tools) else None

    @classmethod
    def of(cls, app: App) -> AppRateLimit | None:
        limit = app.spec.rate_limit
        if limit is None:
            return None
        interval, tolerance = _timing(limit)
        name = app.metadata.name
        label = f'rate limit of app "{name}" ({limit.rate} for all users, burst {limit.burst})'
        return cls(RateRule(f"{name}/app", interval, tolerance, label), compile_patterns(limit.tools, {}))


def gcra(tat: float | None, now: float, interval: float, tolerance: float) -> tuple[float | None, float]:
    """One draw on a bucket whose theoretical arrival time is ``tat`` (None: a full bucket):
    ``(new tat, 0.0)`` if admitted, ``(None, seconds to wait)`` if not."""
    base = now if tat is None or tat < now else tat
    if base - now > tolerance:
        return None, max(base - now - tolerance, 0.001)
    return base + interval, 0.0
