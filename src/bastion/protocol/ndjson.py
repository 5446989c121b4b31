"""Newline-delimited framing, as the MCP stdio transport uses it.

:class:`LineSplitter` turns a byte stream, in chunks split anywhere, into
complete lines: one JSON-RPC message per line (MCP forbids newlines inside a
message).  ``\\r\\n`` is accepted as a line end, blank lines are skipped, and a
line longer than the limit is an error rather than unbounded buffering.

This module only frames bytes: it does not parse JSON, does no I/O and keeps
no more than one partial line.
"""

from __future__ import annotations

from typing import NoReturn

from bastion.errors import LimitExceededError

__all__ = ["LineSplitter", "LineTooLongError"]


class LineTooLongError(LimitExceededError):
    """A line exceeded the splitter's limit.  The stream cannot be resynchronised: close it."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"a message is longer than the limit of {limit} bytes (no newline within the limit)")
        self.limit = limit


class LineSplitter:
    """Split a byte stream into lines of at most ``max_line`` bytes (terminator excluded)."""

    __slots__ = ("_max", "_parts", "_pending")

    def __init__(self, max_line: int) -> None:
        if max_line <= 0:
            raise ValueError("max_line must be positive")
        self._max = max_line
        # The unterminated line so far, as the chunks it came in: joining on
        # every chunk would copy a large message once per chunk.
        self._parts: list[bytes] = []
        self._pending = 0

    @property
    def pending(self) -> int:
        """Bytes held of a line not yet terminated."""
        return self._pending

    def feed(self, chunk: bytes) -> list[bytes]:
        """The lines completed by ``chunk``, without their ``\\n`` / ``\\r\\n``; blank lines skipped.

        Raises :class:`LineTooLongError` as soon as a line (complete or not)
        is longer than ``max_line``.
        """
        if b"\n" not in chunk:
            if chunk:
                self._pending += len(chunk)
                # +1: the line may still end in \r\n, and the \r is not counted.
                if self._pending > self._max + 1:
                    self._fail()
                self._parts.append(bytes(chunk))
            return []
        if self._parts:
            self._parts.append(chunk)
            data = b"".join(self._parts)
            self._parts = []
        else:
            data = bytes(chunk)
        lines = data.split(b"\n")
        rest = lines.pop()
        limit = self._max
        out: list[bytes] = []
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > limit:
                self._fail()
            if line and not line.isspace():  # whitespace alone carries no message
                out.append(line)
        self._pending = len(rest)
        if rest:
            if len(rest) > limit + 1:
                self._fail()
            self._parts.append(rest)
        return out

    def finish(self) -> list[bytes]:
        """At end of stream: the last line if it had no newline (an empty list otherwise)."""
        rest = b"".join(self._parts)
        self._parts, self._pending = [], 0
        if rest.endswith(b"\r"):
            rest = rest[:-1]
        if len(rest) > self._max:
            raise LineTooLongError(self._max)
        return [rest] if rest and not rest.isspace() else []

    def _fail(self) -> NoReturn:
        self._parts, self._pending = [], 0
        raise LineTooLongError(self._max)
