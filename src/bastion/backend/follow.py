"""Follow the backend's ordered change feed, starting again after a gap or a failure.

The app service's watchers (``dynamic.py``: apps; ``revocation.py``: users and roles) share
this loop: look at everything once (``resync``), then hand each change to ``apply``. When the
feed fell behind (changes compacted away) or the backend failed, the loop starts over with a
fresh ``resync``, backing off on failures.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from bastion.backend import Backend, Event
from bastion.errors import BastionError, WatchExpiredError


async def follow_changes(
    backend: Backend,
    *,
    resync: Callable[[], Awaitable[None]],
    apply: Callable[[Event], Awaitable[None]],
    log: logging.Logger,
    what: str,
) -> None:
    """Run until cancelled; ``what`` names the watch in log lines ("app watch")."""
    delay = 0.5
    while True:
        try:
            rev = await backend.current_revision()
            await resync()
            delay = 0.5
            async for ev in backend.watch(rev):
                await apply(ev)
        except WatchExpiredError:
            log.info(f"{what} fell behind; starting again from the current state")
        except BastionError as e:
            log.warning(f"{what} failed; retrying", extra={"error": e.message, "retry_in_s": delay})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
