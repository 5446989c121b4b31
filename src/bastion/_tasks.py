"""Stopping background tasks: cancel, then wait until they are really over.

``await task`` after ``task.cancel()`` inside ``suppress(CancelledError)`` also swallows a
cancellation aimed at the *waiting* task (a shutdown that then never stops). Waiting with
``asyncio.wait`` keeps the two apart: the tasks' own outcome is theirs (an error is logged,
never raised here), and a cancellation of the caller still interrupts the caller.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("bastion.tasks")


async def stop_tasks(*tasks: asyncio.Task[Any] | asyncio.Future[Any] | None) -> None:
    """Cancel ``tasks`` (None and the calling task are skipped) and wait for all of them to end."""
    me = asyncio.current_task()
    live = [t for t in tasks if t is not None and t is not me]
    for t in live:
        t.cancel()
    if not live:
        return
    await asyncio.wait(live)
    for t in live:
        if not t.cancelled() and t.exception() is not None:
            name = t.get_name() if isinstance(t, asyncio.Task) else repr(t)
            log.warning("a task failed while stopping", exc_info=t.exception(), extra={"task": name})
