"""The stdio side of ``bastion mcp connect``: the client's stdin and stdout as asyncio streams.

Pipes and sockets are read and written through the event loop; a terminal or a file
is read by a daemon thread and written with plain blocking writes.
:func:`reserve_stdout` keeps stdout for MCP messages alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import sys
import threading
from typing import Final

__all__ = ["MAX_LINE", "Output", "open_input", "reserve_stdout"]

log = logging.getLogger("bastion.mcp.connect")

#: Longest message accepted from the client (one line of stdin).
MAX_LINE: Final = 16 * 1024 * 1024


class Output:
    """Writes messages to the client, one per line, flushed (drained) before returning."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        pipe = os.fdopen(self.fd, "wb", buffering=0, closefd=False)
        try:
            if not _is_pipe(self.fd):
                raise ValueError("not a pipe")
            transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, pipe)
        except (ValueError, OSError):
            pipe.close()
            return  # a file or a terminal: plain blocking writes (they do not block for long)
        self.writer = asyncio.StreamWriter(transport, protocol, None, loop)

    async def write(self, raw: bytes) -> None:
        if self.writer is not None:
            self.writer.write(raw + b"\n")
            await self.writer.drain()
            return
        data = memoryview(raw + b"\n")
        while data:
            n = os.write(self.fd, data)
            data = data[n:]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _is_pipe(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


async def open_input(fd: int) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE)
    if _is_pipe(fd):
        pipe = os.fdopen(fd, "rb", buffering=0, closefd=False)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        return reader

    # A terminal or a file: a daemon thread reads (it cannot hold up the exit).
    def pump() -> None:
        try:
            while chunk := os.read(fd, 1 << 16):
                loop.call_soon_threadsafe(reader.feed_data, chunk)
        except OSError as e:
            log.debug("stdin: %s", e)
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(reader.feed_eof)

    threading.Thread(target=pump, name="mcp-connect-stdin", daemon=True).start()
    return reader


def reserve_stdout() -> int:
    """Keep stdout for MCP messages alone: a private copy of fd 1 is returned, and fd 1
    (``print``, stray library output, C code) is pointed at stderr."""
    sys.stdout.flush()
    fd = os.dup(1)
    os.dup2(2, 1)
    return fd
