"""What every audit store is: the ``AuditStore`` protocol, its types, and the rows stores share.

Contract of every ``AuditStore``:

- ``insert_many(events)`` stores all of ``events`` in ONE transaction and
  returns only once that transaction is committed (durable against a crash
  of the process); if it raises, none of them is stored.  Inserting an id
  that is already stored keeps the stored row (idempotent retries; one row
  per event, always).
- ``complete_many(updates)`` sets ``success``, ``error`` and ``duration_ms``
  of already stored events: ``search`` returns them with that outcome
  (``code`` follows ``success``; an empty ``error`` or a ``None`` duration
  removes the field, as ``AuditEvent.to_dict`` would have omitted it; a
  field the outcome adds comes after the event's own fields).  One
  transaction; ids not stored are ignored; a later completion of the same
  event wins.
- ``search(query)`` returns stored events (the ``to_dict`` form, completions
  applied) matching every given filter, oldest first (by event time, then
  by insertion order) -- newest first when ``query.order`` is ``"desc"`` --
  at most ``query.limit`` of them (``0``: all), taken from that end: the
  oldest ``limit`` ascending, the newest ``limit`` descending.
- Optional (decision 0035): ``search_pages(query)``, the same events as an
  async iterator of lists, read as they are consumed (constant memory, however
  many match); ``iter_search`` below uses it where a store has it.
- Optional (decision 0034): ``feed(cursor, limit, hold_us)``, the events
  changed after ``cursor`` in commit order (a ``FeedPage``: an event comes
  again, completed, when its outcome is stored after it was read), and
  ``feed_start(last)``, the cursor before the ``last`` newest changes.  For
  ``bastion audit tail`` and the exporters.
- Failures raise ``BackendError``; ``close()`` is idempotent, and any other
  call after it raises ``BackendError``.
- Optional: ``write_batch(events, updates)`` does ``insert_many(events)``
  then ``complete_many(updates)`` in ONE transaction (if it raises, nothing
  of either is stored).  ``AuditLog`` uses it when a store has it (one
  commit per batch instead of two) and the two methods above otherwise, so
  a store without it is still a complete ``AuditStore``.
- Optional (decision 0038): ``complete_unfinished(before, reason, limit)``
  completes as failed, with ``reason(session_id)`` as its error and no
  duration, at most ``limit`` calls recorded before ``before`` that have no
  outcome yet (``UNFINISHED``: a forwarded request's event, still marked
  successful and without a duration), oldest first, and returns how many.
  A call completed meanwhile keeps its outcome (the condition is checked as
  the row is written); a real outcome arriving later replaces this one, as
  any later completion does.
- Optional (decision 0032): ``verify(checker, since)`` checks what is stored
  against the store's seals (a ``chain.VerifyReport``), and ``prune(before)``
  removes what was sealed before ``before`` (retention); ``AuditLog.verify``
  and the cluster's retention use them where a store has them.

The stores: ``SQLiteAuditStore`` (``bastion.audit.sqlite_store``, a journal
in front of ``<data_dir>/audit.db``) and ``PostgresAuditStore``
(``bastion.audit.pg_store``).  Both store the same document
(``AuditEvent.to_dict`` as JSON, built by ``event_row`` below) with the
outcome of its call in columns beside it, merged back in by
``merge_outcome``.

What this module must not do: any I/O, or import anything above
``bastion.errors`` and ``bastion.audit.events``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple, Protocol

import orjson

from bastion.audit.events import REQUEST, AuditEvent, code_for
from bastion.errors import ValidationError

__all__ = [
    "OUTCOMES",
    "UNFINISHED",
    "AuditQuery",
    "AuditStore",
    "Completion",
    "FeedPage",
    "apply_outcome",
    "clean_text",
    "epoch_micros",
    "event_row",
    "iter_search",
    "merge_outcome",
    "pending_outcome",
    "take_feed",
]

#: The rows of calls without an outcome, in SQL (both stores; a partial index of each covers it):
#: a forwarded request is recorded successful and without a duration, and every outcome sets one
#: of them (an engine completion always has a duration; ``complete_unfinished`` sets success false).
UNFINISHED: Final = f"type = '{REQUEST}' AND success AND duration_ms IS NULL"

#: ``AuditQuery.order``: oldest first, newest first.
ORDERS: Final = ("asc", "desc")
#: ``AuditQuery.outcome``: the event's ``success`` as stored (decision 0035).
OUTCOMES: Final = ("success", "failure")
#: A large ``AuditQuery.limit`` (no longer a cap: ``0`` means no limit at all).
MAX_LIMIT: Final = 100_000


class Completion(NamedTuple):
    """The outcome of the call an already recorded event describes.

    A ``NamedTuple`` rather than a frozen dataclass: one is built per call
    on the hot path, and a tuple is built several times faster.
    """

    event_id: str
    success: bool
    error: str = ""
    duration_ms: float | None = None


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Filters for ``AuditStore.search``; every given filter must match.

    ``since <= time < until`` (naive datetimes are UTC); ``types`` empty
    means any type; ``user``/``app``/``session_id``/``tool`` ``None`` (or
    empty) mean any.  ``outcome`` ``"success"``/``"failure"`` keeps the events
    whose ``success`` (as search shows it, completions applied) is true/false:
    a call whose outcome was never recorded shows the ``success`` it was
    recorded with (true: allowed and forwarded), so it counts as a success,
    exactly as its ``code`` (``...I``) reads (decision 0035).  Results are
    oldest first (``order="asc"``) or newest first (``order="desc"``), at most
    ``limit`` from that end; ``limit=0``: all of them.
    """

    since: datetime | None = None
    until: datetime | None = None
    types: tuple[str, ...] = ()
    user: str | None = None
    app: str | None = None
    session_id: str | None = None
    limit: int = 1000
    order: str = "asc"
    tool: str | None = None
    outcome: str | None = None

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValidationError(f'audit search order must be "asc" or "desc", got "{self.order}"')
        if self.limit < 0:
            raise ValidationError(f"audit search limit must be 0 (no limit) or more, got {self.limit}")
        if self.outcome is not None and self.outcome not in OUTCOMES:
            raise ValidationError(
                f'audit search outcome must be "success" or "failure", got "{self.outcome}"'
            )


class FeedPage(NamedTuple):
    """What ``feed`` read: events in commit order, and the cursor to read on from."""

    events: list[dict[str, Any]]
    cursor: str


def pending_outcome(doc: dict[str, Any]) -> bool:
    """Whether ``doc`` is a forwarded call whose outcome is not stored yet (ADR 5)."""
    return doc.get("event") == REQUEST and doc.get("success") is True and doc.get("duration_ms") is None


def take_feed(
    rows: Sequence[tuple[str, int, dict[str, Any]]], cursor: str, hold_us: int, now_us: int
) -> FeedPage:
    """The page ``feed`` answers from ``rows`` (position, event time, document), in commit order.

    A forwarded call still waiting for its outcome and younger than ``hold_us``
    stops the page there: its completion moves it further on (decision 0034), so
    it is usually read once, with its outcome.  Older than that, it is read as it
    is, and read again once completed.
    """
    docs: list[dict[str, Any]] = []
    for pos, t, doc in rows:
        if hold_us > 0 and t > now_us - hold_us and pending_outcome(doc):
            break
        docs.append(doc)
        cursor = pos
    return FeedPage(docs, cursor)


class AuditStore(Protocol):
    """Durable storage of audit events; the contract is in the module doc."""

    async def insert_many(self, events: Sequence[AuditEvent]) -> None: ...

    async def complete_many(self, updates: Sequence[Completion]) -> None: ...

    async def search(self, query: AuditQuery) -> list[dict[str, Any]]: ...

    async def close(self) -> None: ...


async def iter_search(store: Any, query: AuditQuery) -> AsyncIterator[list[dict[str, Any]]]:
    """``store``'s events matching ``query`` in pages: its ``search_pages`` if it has it, else one page."""
    pages = getattr(store, "search_pages", None)
    if pages is not None:
        async for page in pages(query):
            yield page
        return
    yield await store.search(query)


# -- rows ----------------------------------------------------------------------


def epoch_micros(when: datetime) -> int:
    """Microseconds since the epoch; naive datetimes are UTC."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    # round(): the float is within 0.25 µs of the exact value at today's
    # magnitudes, so rounding recovers the datetime's exact microsecond.
    return round(when.timestamp() * 1_000_000)


def _doc(event: AuditEvent) -> dict[str, Any]:
    """``event.to_dict()``, as JSON, at a fraction of the cost.

    to_dict builds two containers per field to test emptiness; this tests
    the common types directly and hands the rest to ``_put``, which applies
    to_dict's own rule.  A test checks both agree, field by field.
    """
    d: dict[str, Any] = {"event": event.type, "code": code_for(event.type, event.success)}
    for k, v in event.__dict__.items():
        cls = v.__class__
        if cls is str or cls is dict or cls is list or cls is tuple:
            if v:  # for these types, empty is exactly what to_dict omits
                d[k] = v  # orjson writes a tuple as an array, like to_dict's list
        elif cls is bool or cls is int or cls is float:
            d[k] = v
        elif v is None:
            if k == "success":  # to_dict keeps success whatever it is
                d[k] = v
        elif cls is datetime and v.tzinfo is UTC:
            d[k] = v  # orjson writes it exactly like isoformat()
        else:
            _put(d, k, v)
    del d["type"]  # written as "event"
    return d


def _put(d: dict[str, Any], k: str, v: Any) -> None:
    # AuditEvent.to_dict's rule, for values of any other type.
    if isinstance(v, datetime):
        v = v.isoformat()
    elif isinstance(v, tuple):
        v = list(v)
    if v in (None, "", [], {}) and k != "success":
        return
    d[k] = v


def event_row(event: AuditEvent) -> tuple[Any, ...]:
    """The index row of ``event`` (shared with ``pg_store``, whose columns are the same)."""
    doc = _doc(event)
    try:
        text = orjson.dumps(doc, default=_json_default).decode()
    except orjson.JSONEncodeError:
        # orjson refuses str with lone surrogates (and very deep nesting);
        # repair rather than lose the event.  Rare, so slow is fine.
        text = orjson.dumps(_sanitise(doc, 0), default=_json_default).decode()
        return (
            clean_text(event.id),
            epoch_micros(event.time),
            clean_text(event.type),
            clean_text(event.user),
            clean_text(event.app),
            clean_text(event.session_id),
            bool(event.success),
            clean_text(event.error),
            event.duration_ms,
            text,
        )
    # orjson accepted every str in ``doc`` (the columns below among them),
    # so they encode as UTF-8 and binding them cannot fail.
    return (
        event.id,
        epoch_micros(event.time),
        event.type,
        event.user,
        event.app,
        event.session_id,
        bool(event.success),
        event.error,
        event.duration_ms,
        text,
    )


def _completed_json(text: str, success: bool, error: str, duration_ms: float | None) -> str:
    """The stored JSON ``text`` rewritten with an outcome, as versions before 2026-11-22 stored it.

    Both stores now keep the outcome in columns instead (see ``merge_outcome``);
    the tests build such older rows with this.
    """
    return orjson.dumps(merge_outcome(text, success, error, duration_ms)).decode()


def _json_default(value: Any) -> Any:
    """orjson's fallback: never fail an audit write over an odd type."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    return repr(value)


def clean_text(text: str) -> str:
    """``text`` with lone surrogates replaced, so it encodes as UTF-8."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode()
    return text


_SANITISE_DEPTH = 200


def _sanitise(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        return clean_text(value)
    if depth > _SANITISE_DEPTH:
        return "<TOO DEEP>"
    if isinstance(value, dict):
        return {clean_text(str(k)): _sanitise(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_sanitise(v, depth + 1) for v in value]
    return value


def merge_outcome(text: str, success: Any, error: str, duration_ms: float | None) -> dict[str, Any]:
    """The stored event with the outcome columns applied (see ``apply_outcome``)."""
    doc: dict[str, Any] = orjson.loads(text)
    apply_outcome(doc, success, error, duration_ms)
    return doc


def apply_outcome(doc: dict[str, Any], success: Any, error: str, duration_ms: float | None) -> None:
    """Set an outcome in an event's document.

    The same document earlier versions stored on completion (``_completed_json``:
    ``code`` follows ``success``; an empty error or a NULL duration is omitted;
    keys a completion adds come last).  The columns hold the event's own values
    until a completion changes them, so an event never completed comes back
    exactly as it was stored.
    """
    success = bool(success)
    if bool(doc.get("success")) != success:
        doc["success"] = success
        code = doc.get("code")
        if isinstance(code, str) and code:
            doc["code"] = code[:-1] + ("I" if success else "E")
    # Empty values are omitted, as to_dict omits them.
    if error:
        doc["error"] = error
    else:
        doc.pop("error", None)
    if duration_ms is not None:
        doc["duration_ms"] = duration_ms
    elif doc.get("duration_ms") is not None:
        del doc["duration_ms"]
