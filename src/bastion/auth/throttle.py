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
from typing import Any

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


@dataclass(frozen=True)
class UserLocks:
    """What failed logins hold against one user name now (``bastion users ls``)."""

    #: Addresses locked out for this user (rule 1), and when the last of those locks ends.
    addresses: int = 0
    until: datetime | None = None
    #: When rule 3 (only known addresses may try) stops applying, if it applies now.
    throttled_until: datetime | None = None

    @property
    def locked(self) -> bool:
        return bool(self.addresses) or self.throttled_until is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "locked": self.locked,
            "addresses": self.addresses,
            "until": self.until.isoformat() if self.until else None,
            "throttled_until": self.throttled_until.isoformat() if self.throttled_until else None,
        }


def _wait(until: datetime | None, now: datetime) -> str:
    """ "try again in 19 minutes (at 18:42 UTC)": how long a lock holds, for the refusal."""
    if until is None:
        return "wait a while, then try again"
    minutes = max(1, -(-int((until - now).total_seconds()) // 60))
    unit = "minute" if minutes == 1 else "minutes"
    return f"try again in {minutes} {unit} (at {until:%H:%M} UTC)"


def _pair(until: datetime | None, now: datetime) -> Verdict:
    return Verdict(
        "locked",
        f"too many failed login attempts for this user from your address; {_wait(until, now)}, "
        "or ask an administrator to unlock you (`bastion users unlock NAME`)",
    )


def _source(until: datetime | None, now: datetime) -> Verdict:
    return Verdict("source_locked", f"too many failed login attempts from your address; {_wait(until, now)}")


def _user(until: datetime | None, now: datetime) -> Verdict:
    return Verdict(
        "throttled",
        "this user is under a password-guessing attack: logins are accepted only from addresses the "
        f"user has logged in from before; {_wait(until, now)}, or ask an administrator",
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
        return (await self._state(self.join_key(source)))[0] >= self.limits.source_attempts

    async def join_failed(self, source: str) -> None:
        await self._bump(self.join_key(source))

    @staticmethod
    def known_key(name: str) -> str:
        return f"/login_known_sources/{_h(name)}"

    async def admit(self, name: str, source: str) -> Verdict:
        """Check the limits and count this attempt for (source, user) before the password is checked."""
        lim, now = self.limits, self.clock.now()
        count, until = await self._state(self.source_key(source))
        if count >= lim.source_attempts:
            return _source(until, now)
        count, until = await self._state(self.pair_key(name, source))
        if count >= lim.pair_attempts:
            return _pair(until, now)
        count, until = await self._state(self.user_key(name))
        if count >= lim.user_attempts and not await self._known(name, source):
            return _user(until, now)
        if await self._bump(self.pair_key(name, source)) > lim.pair_attempts:
            # Lost a race with parallel guesses from the same address.
            return _pair(now + lim.duration, now)
        return Verdict()

    async def failed(self, name: str, source: str) -> bool:
        """Record a failure (the pair was counted by ``admit``); True when the pair is now locked."""
        await self._bump(self.user_key(name))
        await self._bump(self.source_key(source))
        return (await self._state(self.pair_key(name, source)))[0] >= self.limits.pair_attempts

    async def succeeded(self, name: str, source: str) -> None:
        with contextlib.suppress(NotFoundError):
            await self.backend.delete(self.pair_key(name, source))
        await self._remember(name, source)

    async def clear(self, name: str) -> None:
        """Forget a user's counters (new password, deleted user)."""
        await self.unlock(name)
        with contextlib.suppress(NotFoundError):
            await self.backend.delete(self.known_key(name))

    async def locks(self, name: str) -> UserLocks:
        """The locks failed logins hold against ``name`` now (addresses stay hashed: not shown)."""
        pairs = [
            (int(orjson.loads(i.value)["count"]), i.expires)
            for i in await self.backend.list(self.user_key(name) + "/")
        ]
        locked = [exp for count, exp in pairs if count >= self.limits.pair_attempts]
        total, total_until = await self._state(self.user_key(name))
        return UserLocks(
            addresses=len(locked),
            until=max((e for e in locked if e is not None), default=None),
            throttled_until=total_until if total >= self.limits.user_attempts else None,
        )

    async def unlock(self, name: str) -> UserLocks:
        """Lift the locks on ``name`` (its per-address counters and its total); what they were.
        The addresses it logged in from are kept (rule 3 still knows them)."""
        before = await self.locks(name)
        keys = [self.user_key(name)] + [i.key for i in await self.backend.list(self.user_key(name) + "/")]
        for key in keys:
            with contextlib.suppress(NotFoundError):
                await self.backend.delete(key)
        return before

    # ------------------------------------------------------------ storage

    async def _state(self, key: str) -> tuple[int, datetime | None]:
        """A counter's failures and when it expires (the lock it holds ends then)."""
        try:
            item = await self.backend.get(key)
        except NotFoundError:
            return 0, None
        return int(orjson.loads(item.value)["count"]), item.expires

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
