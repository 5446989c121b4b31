"""A joined app service's pinned tool definitions, through the tunnel (decision 0045).

A joined app service has no backend: it reads the pins of the apps it serves (``pins.get``,
``pins.list``), follows their changes (``apps.watch`` with the pins prefix) and hands what its
sessions found to a proxy (``pins.record``), which judges the definitions again and writes them
with the same compare-and-swap as an in-process app service.  Calls fail over between proxies
(they are idempotent: a merge).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import orjson

from bastion.auth.pins import PREFIX, follow_pins
from bastion.backend import Backend
from bastion.policy.pins import AppPins, Change, Pin
from bastion.tunnel.agent import Agent, TunnelAppsView

__all__ = ["TunnelPinSource", "TunnelRates"]


def _pin(pin: Pin) -> dict[str, Any]:
    return dict(pin.definition)


class TunnelPinSource:
    """``appservice.pins.PinSource`` over the tunnel."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.view = TunnelAppsView(agent, list_call="pins.list", prefix=PREFIX)

    async def load(self, app: str) -> AppPins:
        got = await self.agent.call_any("pins.get", {"app": app}, wait=5.0)
        return AppPins.from_json(orjson.dumps(got["pins"]))

    async def record(self, app: str, new: Sequence[Pin], changed: Sequence[Change]) -> object:
        args = {
            "app": app,
            "new": [_pin(p) for p in new],
            "changed": [{"pin": _pin(c.pin), "served": dict(c.served)} for c in changed],
        }
        return await self.agent.call_any("pins.record", args, wait=5.0)

    async def follow(
        self, on_change: Callable[[str, AppPins], None], on_resync: Callable[[set[str]], None]
    ) -> None:
        await follow_pins(cast(Backend, self.view), on_change, on_resync)


class TunnelRates:
    """``appservice.executor.RateCounter`` over the tunnel: a proxy draws from the cluster's
    buckets (decision 0051).  Not failed over: a draw is not idempotent."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    async def take(self, key: str, interval: float, tolerance: float) -> float:
        got = await self.agent.call("rate.take", {"key": key, "interval": interval, "tolerance": tolerance})
        return float(got["wait"])
