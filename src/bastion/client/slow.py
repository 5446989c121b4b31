"""Telling the user that a server is slow to start, instead of showing nothing.

An MCP server started per session (stdio under ``npx``, say) can take seconds to
answer ``initialize``; ``bastion mcp call``/``tools`` and ``bastion mcp connect``
say so on stderr once :data:`SLOW_START` has passed without an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Final

__all__ = ["SLOW_START", "notice_if_slow", "waiting_message"]

#: How long ``initialize`` may go unanswered before the user is told.
SLOW_START: Final = 1.5


def waiting_message(app: str) -> str:
    return f"waiting for {app} to start…"


@contextlib.contextmanager
def notice_if_slow(notice: Callable[[], None], delay: float = SLOW_START) -> Iterator[None]:
    """Call ``notice`` once if the block is still running after ``delay`` seconds."""
    handle = asyncio.get_running_loop().call_later(delay, notice)
    try:
        yield
    finally:
        handle.cancel()
