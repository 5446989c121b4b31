"""Structured logs: text or JSON lines, with the request id of the request being served.

Log records carry facts (what, who, how long), never secrets: credentials,
passwords, invite codes, join tokens and private keys are never passed to a
logger in the first place.  ``request_id`` is a context variable set by the
proxy for each HTTP request and copied onto every record logged while it runs.

One record is one line, whatever its values hold: client input reaches log
fields (paths, names, user agents), and a value with a line break could forge
a whole record (finding F9: ``GET /v1/webapi/find%0d%0a2026-... INFO ...``).
So the text format escapes every character that is not printable (control
characters, line and paragraph separators, bidirectional overrides) as
``\\n``, ``\\xNN`` or ``\\uNNNN``, quotes field values that hold a space, ``"``
or ``=`` (so ``user=a admin=yes`` stays one field), and indents traceback
lines so that none can pass for a record.  The JSON format is escaped by its
encoder.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

_STD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STD_ATTRS and not k.startswith("_")}


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "component": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id.get()
        if rid:
            out["request_id"] = rid
        out.update(_extras(record))
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(ch: str) -> str:
    named = _NAMED_ESCAPES.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape(text: str) -> str:
    """``text`` with every non-printable character escaped: one line, nothing hidden."""
    if text.isprintable():  # the usual case: one C-level scan
        return text
    return "".join(ch if ch.isprintable() else _escape_char(ch) for ch in text)


#: Longest field value written whole (characters); longer ones are cut, saying how much.
MAX_FIELD = 1024


def _field(value: Any) -> str:
    text = str(value)
    if len(text) > MAX_FIELD:
        text = f"{text[:MAX_FIELD]}...(+{len(text) - MAX_FIELD} characters)"
    if text and text.isprintable() and " " not in text and '"' not in text and "=" not in text:
        return text
    return '"' + escape(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        parts = [ts, f"{record.levelname:<5}", f"[{escape(record.name)}]", escape(record.getMessage())]
        rid = request_id.get()
        if rid:
            parts.append(f"request_id={_field(rid)}")
        parts.extend(f"{escape(k)}={_field(v)}" for k, v in _extras(record).items())
        line = " ".join(parts)
        if record.exc_info:
            trace = self.formatException(record.exc_info)
            line += "".join("\n    | " + escape(t) for t in trace.split("\n"))
        return line


class OneLineErrors(logging.Filter):
    """For other libraries' loggers: an exception on the same line as the message, no traceback.

    asyncpg's pool logs "Failed to restore the pool connection floor" with a whole
    traceback each time the database is briefly away (an outage we report ourselves);
    the type and text of the error say all an operator needs.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {exc}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


class _Forward(logging.Handler):
    """Hands records (once its filters passed them) to another handler."""

    def __init__(self, target: logging.Handler) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.handle(record)


#: Libraries whose warnings and errors go through our handler, on one line each.
_THIRD_PARTY = ("asyncpg",)

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}


def _close_handlers(names: tuple[str, ...]) -> None:
    """Close the handlers an earlier ``setup`` installed (a log file stays open otherwise)."""
    seen: set[int] = set()
    for name in names:
        for h in logging.getLogger(name).handlers:
            target = h.target if isinstance(h, _Forward) else h
            if id(target) not in seen:  # closing a StreamHandler leaves its stream open
                seen.add(id(target))
                target.close()


def setup(severity: str = "info", fmt: str = "text", output: str = "stderr") -> None:
    """Configure the root ``bastion`` logger (idempotent)."""
    if output == "stderr":
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
    elif output == "stdout":
        handler = logging.StreamHandler(sys.stdout)
    else:
        handler = logging.FileHandler(output)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    _close_handlers(("bastion", "uvicorn.error", *_THIRD_PARTY))
    for name in ("bastion", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(_LEVELS.get(severity, logging.INFO))
        logger.propagate = False
    # A filter on a handler (unlike one on a logger) also sees what child loggers
    # ("asyncpg.pool") log; this one hands the shortened records to the same handler.
    lib = _Forward(handler)
    lib.addFilter(OneLineErrors())
    for name in _THIRD_PARTY:
        logger = logging.getLogger(name)
        logger.handlers[:] = [lib]
        logger.setLevel(max(_LEVELS.get(severity, logging.INFO), logging.WARNING))
        logger.propagate = False
