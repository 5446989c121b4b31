"""Rate limit buckets (decision 0051) where no database keeps them: in this process's memory.

``PostgresBackend.take`` keeps the buckets of a cluster of nodes in one table (every proxy and
app service agrees); a joined app service asks a proxy over the tunnel (``rate.take``).  A node
on SQLite is one node: :class:`LocalRates` keeps its buckets in memory (the app service's, and
the tunnel listener's for joined hosts), with the same arithmetic (``policy.limits.gcra``),
bounded in size.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bastion.policy.limits import gcra

__all__ = ["LocalRates"]

#: Buckets kept; past this, full ones are dropped (absent is the same as full).
_MAX_BUCKETS = 100_000


class LocalRates:
    """In-memory GCRA buckets for one process (``RateCounter``)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tat: dict[str, float] = {}

    async def take(self, key: str, interval: float, tolerance: float) -> float:
        now = self._clock()
        tat, wait = gcra(self._tat.get(key), now, interval, tolerance)
        if tat is None:
            return wait
        if len(self._tat) >= _MAX_BUCKETS and key not in self._tat:
            self._tat = {k: v for k, v in self._tat.items() if v > now}
        self._tat[key] = tat
        return 0.0
