"""Login throttling by source address, so that strangers cannot lock a user out.

The rule (decision 0020):

1. **Per (source, user)**: ``lockout_attempts`` failures (default 5) from one
   address for one user name lock that pair for ``lockout_duration`` (20 min,
   counted from the last failure).  The attempt is counted *before* the
   password is checked (compare-and-swap), so parallel guesses cannot overrun
   the limit; a successful login clears the pair.
2. **Per source**: ``source_attempts`` failures (default 30) from one address,
   whatever the user names, block that address for ``lockout_duration``
   (password spraying).
3. **Per user, from many sources**: above ``user_attempts`` failures (default
   100) within ``lockout_duration`` from all addresses together, the user is
   not locked: only addresses the user logged in from successfully in the last
   30 days may still try (each under rule 1).  A distributed attacker gets no
   more guesses; the user, from a known address, keeps working.

Refused joins (bad join tokens) are counted per source the same way (rule 2):
past ``source_attempts`` the address is refused without a check, and without
an audit event each, so a flood of bad tokens cannot fill the audit log.

Counters live in the backend with an expiry, keyed by SHA-256 of the name and
the address (known or unknown names alike: a refusal never tells whether a
user exists).  Only ``AuthServer`` uses this; it does I/O only through the
``Backend`` protocol.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

import orjson

from bastion._time import Clock
from bastion.backend import Backend, Item
from bastion.errors import AlreadyExistsError, ConflictError, NotFoundError

KNOWN_SOURCE_TTL = timedelta(days=30)
_MAX_KNOWN = 32


def _h(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


@dataclass(frozen=True)
class Limits:
    pair_attempts: int = 5
    source_attempts: int = 30
    user_attempts: int = 100
    duration: timedelta = timedelta(minutes=20)


@dataclass(frozen=True)
class Verdict:
    """Whether a login may be tried: ``reason`` empty = go on; else why not (for the audit log)."""

    reason: str = ""
    message: str = ""


_PAIR = Verdict(
    "locked",
    "too many failed login attempts for this user from your address; wait a while, then try again",
)
_SOURCE = Verdict(
    "source_locked", "too many failed login attempts from your address; wait a while, then try again"
)
_USER = Verdict(
    "throttled",
    "this user is under a password-guessing attack: logins are accepted only from addresses the user "
    "has logged in from before; wait a while, or ask an administrator",
)


class LoginThrottle:
    def __init__(self, backend: Backend, limits: Limits, clock: Clock) -> None:
        self.backend = backend
        self.limits = limits
        self.clock = clock

    # The legacy per-name key (before decision 0020) is now the user's total across sources.
    @staticmethod
    def user_key(name: str) -> str:
        return f"/login_attempts/{_h(name)}"

    @staticmethod
    def pair_key(name: str, source: str) -> str:
        return f"/login_attempts/{_h(name)}/{_h(source)}"

    @staticmethod
    def source_key(source: str) -> str:
        return f"/login_attempts_by_source/{_h(source)}"

    @staticmethod
    def join_key(source: str) -> str:
        return f"/join_attempts_by_source/{_h(source)}"

    async def join_blocked(self, source: str) -> bool:
        return await self._count(self.join_key(source)) >= self.limits.source_attempts

    async def join_failed(self, source: str) -> None:
        await self._bump(self.join_key(source))

    @staticmethod
    def known_key(name: str) -> str:
        return f"/login_known_sources/{_h(name)}"

    async def admit(self, name: str, source: str) -> Verdict:
        """Check the limits and count this attempt for (source, user) before the password is checked."""
        lim = self.limits
        if await self._count(self.source_key(source)) >= lim.source_attempts:
            return _SOURCE
        if await self._count(self.pair_key(name, source)) >= lim.pair_attempts:
            return _PAIR
        if await self._count(self.user_key(name)) >= lim.user_attempts and not await self._known(
            name, source
        ):
            return _USER
        if await self._bump(self.pair_key(name, source)) > lim.pair_attempts:
            return _PAIR  # lost a race with parallel guesses from the same address
        return Verdict()

    async def failed(self, name: str, source: str) -> bool:
        """Record a failure (the pair was counted by ``admit``); True when the pair is now locked."""
        await self._bump(self.user_key(name))
        await self._bump(self.source_key(source))
        return await self._count(self.pair_key(name, source)) >= self.limits.pair_attempts

    async def succeeded(self, name: str, source: str) -> None:
        with contextlib.suppress(NotFoundError):
            await self.backend.delete(self.pair_key(name, source))
        await self._remember(name, source)

    async def clear(self, name: str) -> None:
        """Forget a user's counters (new password, deleted user)."""
        keys = [self.user_key(name), self.known_key(name)]
        keys += [i.key for i in await self.backend.list(self.user_key(name) + "/")]
        for key in keys:
            with contextlib.suppress(NotFoundError):
                await self.backend.delete(key)

    # ------------------------------------------------------------ storage

    async def _count(self, key: str) -> int:
        try:
            return int(orjson.loads((await self.backend.get(key)).value)["count"])
        except NotFoundError:
            return 0

    async def _bump(self, key: str) -> int:
        """Add one failure (compare-and-swap, so parallel bumps are all counted); the new count."""
        expires = self.clock.now() + self.limits.duration
        for _ in range(20):
            try:
                cur = await self.backend.get(key)
            except NotFoundError:
                with contextlib.suppress(AlreadyExistsError):
                    await self.backend.create(Item(key, orjson.dumps({"count": 1}), expires=expires))
                    return 1
                continue
            count = int(orjson.loads(cur.value)["count"]) + 1
            with contextlib.suppress(ConflictError, NotFoundError):
                await self.backend.update(
                    Item(key, orjson.dumps({"count": count}), expires=expires), cur.revision
                )
                return count
        return self.limits.pair_attempts + 1  # hammered beyond reason: treat as over the limit

    async def _known(self, name: str, source: str) -> bool:
        try:
            seen = orjson.loads((await self.backend.get(self.known_key(name))).value)
        except NotFoundError:
            return False
        at = seen.get(_h(source)[:32])
        return isinstance(at, str) and datetime.fromisoformat(at) + KNOWN_SOURCE_TTL > self.clock.now()

    async def _remember(self, name: str, source: str) -> None:
        key, now = self.known_key(name), self.clock.now()
        try:
            seen = dict(orjson.loads((await self.backend.get(key)).value))
        except NotFoundError:
            seen = {}
        seen[_h(source)[:32]] = now.isoformat()
        if len(seen) > _MAX_KNOWN:
            seen = dict(sorted(seen.items(), key=lambda kv: str(kv[1]))[-_MAX_KNOWN:])
        # Last writer wins: a lost entry only means one known address is asked again later.
        await self.backend.put(Item(key, orjson.dumps(seen), expires=now + KNOWN_SOURCE_TTL))
