"""Calls left without an outcome: completed as "outcome unknown", never left looking successful.

A forwarded call is recorded before it goes upstream (marked successful, without a duration)
and its outcome completes that row when the upstream answers (decision 0005).  If the outcome
never arrives — the app service that carried the call was killed, or lost its host with the
outcome still in its queue — the row would read like a success forever.  So every process
that writes an audit store (the auth service's) sweeps it: a call recorded longer ago than
``audit.unknown_outcome_after`` and still without an outcome is completed as failed, with the
reason (decision 0038).  A real outcome delivered later still replaces it.

``reason_for`` words the reason from the session id's route tag (the app service that owned
the session) and the tags of the app services alive now; ``sweep`` runs one round over a
store's ``complete_unfinished``.  Pure but for the store call; no clock of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection
from datetime import datetime, timedelta
from typing import Final

from bastion._time import format_duration

__all__ = ["BATCH", "reason_for", "sweep"]

log = logging.getLogger("bastion.audit")

#: Calls completed per store transaction; a round goes on while full batches come back.
BATCH: Final = 1000

#: ``complete_unfinished(before, reason, limit)`` of a store (``bastion.audit.store``).
Completer = Callable[[datetime, Callable[[str], str], int], Awaitable[int]]


def reason_for(session_id: str, live_tags: Collection[str], after: timedelta) -> str:
    """Why a call of ``session_id`` has no outcome, as its audit row will say."""
    within = format_duration(after)
    tag = session_id.split(".", 1)[0] if "." in session_id else ""
    if tag and tag not in live_tags:
        return (
            f"outcome unknown: no outcome was recorded within {within}, and the app service that "
            "carried the call is gone (it stopped or was restarted before reporting it)"
        )
    return (
        f"outcome unknown: no outcome was recorded within {within} (the app service that carried "
        "the call did not report it)"
    )


async def sweep(complete: Completer, *, now: datetime, after: timedelta, live_tags: Collection[str]) -> int:
    """One round: complete every call recorded before ``now - after`` without an outcome.

    Returns how many were completed (logged when any were).
    """
    before = now - after
    total = 0
    while True:
        n = await complete(before, lambda sid: reason_for(sid, live_tags, after), BATCH)
        total += n
        if n < BATCH:
            break
    if total:
        log.warning(
            "audit: calls without an outcome completed as 'outcome unknown'",
            extra={"calls": total, "recorded_before": before.isoformat()},
        )
    return total
