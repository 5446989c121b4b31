"""Structured logs: text or JSON lines, with the request id of the request being served.

Log records carry facts (what, who, how long), never secrets: credentials,
passwords, invite codes, join tokens and private keys are never passed to a
logger in the first place.  ``request_id`` is a context variable set by the
proxy for each HTTP request and copied onto every record logged while it runs.
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


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        parts = [ts, f"{record.levelname:<5}", f"[{record.name}]", record.getMessage()]
        rid = request_id.get()
        if rid:
            parts.append(f"request_id={rid}")
        parts.extend(f"{k}={v}" for k, v in _extras(record).items())
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
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
