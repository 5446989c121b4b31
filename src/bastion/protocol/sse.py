"""Server-Sent Events: an incremental parser and an encoder (WHATWG HTML, "server-sent events").

MCP carries JSON-RPC messages in SSE ``data`` on the streamable-HTTP
transport (responses to a POST, and the GET stream) and on the legacy
HTTP+SSE transport (``endpoint`` and ``message`` events).  :class:`SSEParser`
takes the stream in chunks split anywhere -- inside a field, between the
``\\r`` and ``\\n`` of a line end -- and returns each event once its blank
line arrives.  It follows the spec's line rules (``\\n``, ``\\r\\n`` and ``\\r``
line ends, an optional space after the colon, comments, multi-line data, a
leading byte order mark) with two choices made for a proxy:

* an event carries the ``id`` and ``retry`` fields *of its own block*
  (``None`` when absent), so a proxy re-encodes exactly what it received;
  the spec's persisting "last event ID" is :attr:`SSEParser.last_event_id`;
* a block with an ``id`` or ``retry`` field but no ``data`` (a resumption
  point, a reconnection delay) is returned as an event with empty ``data``,
  where a browser would not dispatch one, so that a proxy can pass it on.
  An event with empty ``data`` carries no JSON-RPC message.

Event size is bounded: data plus the partial line held may not exceed
``max_event_size`` (:class:`EventTooLargeError`).  Data stays bytes: it is
JSON, parsed later, exactly once.

This module must not do I/O or parse the JSON it carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

from bastion.errors import LimitExceededError

__all__ = ["DEFAULT_MAX_EVENT_SIZE", "EventTooLargeError", "SSEEvent", "SSEParser", "encode_event"]

#: Default bound on one event (its data and any partial line): 16 MiB.
DEFAULT_MAX_EVENT_SIZE = 16 * 1024 * 1024

_BOM = b"\xef\xbb\xbf"


class EventTooLargeError(LimitExceededError):
    """An SSE event exceeded the parser's size limit.  The stream cannot be resynchronised: close it."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"a server-sent event is larger than the limit of {limit} bytes")
        self.limit = limit


@dataclass(slots=True)
class SSEEvent:
    """One event: ``data`` lines joined with ``\\n``; ``event`` defaults to ``"message"``.

    ``id`` and ``retry`` are the fields given in this event's block (``None``
    if absent; an empty ``id`` resets the client's last event ID).  Read-only
    by contract, not frozen: one is built per message on a stream, and a
    frozen dataclass costs about a microsecond more to build (measured).
    """

    data: bytes
    event: str = "message"
    id: str | None = None
    retry: int | None = None


class SSEParser:
    """Incremental SSE parser: ``feed`` chunks, get complete events."""

    __slots__ = (
        "_at_start",
        "_data",
        "_data_size",
        "_event",
        "_id",
        "_last_event_id",
        "_max",
        "_partial",
        "_partial_size",
        "_retry",
        "_skip_lf",
    )

    def __init__(self, max_event_size: int = DEFAULT_MAX_EVENT_SIZE) -> None:
        if max_event_size <= 0:
            raise ValueError("max_event_size must be positive")
        self._max = max_event_size
        # The unterminated line, as the chunks it came in (joining on every
        # chunk would copy a large event once per chunk).
        self._partial: list[bytes] = []
        self._partial_size = 0
        # The last chunk ended in \r: a \n starting the next one ends no new line.
        self._skip_lf = False
        self._at_start = True  # a byte order mark may open the stream
        self._last_event_id = ""
        # The event being read: its data lines and fields so far.
        self._data: list[bytes] = []
        self._data_size = 0
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None

    @property
    def last_event_id(self) -> str:
        """The spec's last event ID: the latest ``id`` field seen (``""`` if none or reset)."""
        return self._last_event_id

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """The events completed by ``chunk``, in order.  Raises :class:`EventTooLargeError`."""
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
                if not chunk:
                    return []
        if self._at_start:
            head = b"".join(self._partial) + chunk
            if len(head) < len(_BOM) and _BOM.startswith(head):
                self._partial, self._partial_size = [head], len(head)
                return []  # too short to tell
            self._at_start = False
            self._partial, self._partial_size = [], 0
            chunk = head[len(_BOM) :] if head.startswith(_BOM) else head
        if b"\n" not in chunk and b"\r" not in chunk:
            self._partial.append(bytes(chunk))
            self._partial_size += len(chunk)
            if self._partial_size + self._data_size > self._max:
                self._fail()
            return []
        if self._partial:
            self._partial.append(chunk)
            text = b"".join(self._partial)
            self._partial, self._partial_size = [], 0
        else:
            text = bytes(chunk)
        if b"\r" in text:
            # A final \r ends its line now; its \n, if any, is in the next chunk.
            self._skip_lf = text.endswith(b"\r")
            text = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = text.split(b"\n")
        rest = lines.pop()
        out: list[SSEEvent] = []
        # The event's state in locals while the lines are read (this loop runs
        # for every message on an SSE stream), written back at the end.
        data, size, event, eid, retry = self._data, self._data_size, self._event, self._id, self._retry
        limit = self._max
        for line in lines:
            if not line:  # a blank line ends the event
                if data or eid is not None or retry is not None:
                    out.append(SSEEvent(b"\n".join(data), event or "message", eid, retry))
                data, size, event, eid, retry = [], 0, None, None, None
                continue
            if line[0] == 0x3A:  # lines starting with ":" are comments (keep-alives)
                continue
            name, colon, value = line.partition(b":")
            if colon and value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                # The size of the data as it will be joined: a \n between lines.
                size += len(value) + 1 if data else len(value)
                if size > limit:
                    self._fail()
                data.append(value)
            elif name == b"event":
                event = value.decode("utf-8", "replace")
            elif name == b"id":
                if b"\0" not in value:  # the spec ignores ids containing NUL
                    eid = self._last_event_id = value.decode("utf-8", "replace")
            elif name == b"retry" and value.isdigit():  # ASCII digits only, as the spec requires
                retry = int(value)
            # Any other field is ignored, as the spec says.
        self._data, self._data_size, self._event, self._id, self._retry = data, size, event, eid, retry
        if rest:
            self._partial.append(rest)
            self._partial_size = len(rest)
            if self._partial_size + size > limit:
                self._fail()
        return out

    def _fail(self) -> NoReturn:
        self._partial, self._partial_size = [], 0
        self._data, self._data_size, self._event, self._id, self._retry = [], 0, None, None, None
        raise EventTooLargeError(self._max)


def _single_line(value: str, what: str) -> bytes:
    if "\n" in value or "\r" in value:
        raise ValueError(f"an SSE {what} cannot contain a line break")
    return value.encode()


def encode_event(
    data: bytes, *, id: str | None = None, event: str | None = None, retry: int | None = None
) -> bytes:
    """One SSE event block: ``event``, ``id``, ``retry`` (when given), then ``data`` lines, then a blank line.

    ``data`` is split at line breaks into several ``data:`` lines (a parser
    joins them back with ``\\n``); empty ``data`` is one empty ``data:`` line,
    as in MCP's priming events.  Raises ``ValueError`` for an ``id`` or
    ``event`` with a line break (it would inject fields), an ``id`` with NUL,
    or a negative ``retry``.
    """
    if b"\n" in data or b"\r" in data:
        lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        body = b"".join(b"data: " + line + b"\n" for line in lines)
    else:
        body = b"data: " + data + b"\n"
    if id is None and event is None and retry is None:
        return body + b"\n"  # the common case: a message on a stream
    head = b""
    if event is not None:
        head += b"event: " + _single_line(event, "event type") + b"\n"
    if id is not None:
        if "\0" in id:
            raise ValueError("an SSE event id cannot contain NUL")
        head += b"id: " + _single_line(id, "event id") + b"\n"
    if retry is not None:
        if retry < 0:
            raise ValueError("an SSE retry must not be negative")
        head += b"retry: %d\n" % retry
    return head + body + b"\n"
