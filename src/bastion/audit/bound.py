"""Size caps for what enters an audit event or an error message: nothing unbounded is stored or echoed.

A hostile client controls tool names, methods, arguments and ids; a hostile
upstream controls error messages.  Stored as they came, twenty denied calls
with a 4 MiB tool name grew the audit database by 340 MB, and an error that
quoted the name twice sent 8 MB back.  So every such value is cut to a fixed
size before it is stored or quoted, and what was cut is named by its length
and SHA-256, so that the record still identifies exactly what was sent.

Pure functions; no I/O.  The cheap checks (``len``) come first: values within
their cap, the usual case, cost one comparison.
"""

from __future__ import annotations

import hashlib
from typing import Any, Final

import orjson

__all__ = ["MAX_ERROR", "MAX_NAME", "MAX_PARAMS_BYTES", "MAX_QUOTE", "clip", "clip_params", "digest"]

#: Names stored in an event: tool, method, app, user, request id (characters).
MAX_NAME: Final = 512
#: Error texts stored in an event (characters).
MAX_ERROR: Final = 4096
#: A value quoted inside an error message sent to a client (characters).
MAX_QUOTE: Final = 128
#: The serialised request params stored in an event (bytes).
MAX_PARAMS_BYTES: Final = 64 * 1024
#: How much of cut params is kept as a preview (characters of their JSON).
_PREVIEW: Final = 1024


def digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def clip(text: str, limit: int) -> str:
    """``text`` if it has at most ``limit`` characters; else its start, its length and its hash."""
    if len(text) <= limit:
        return text
    whole = text.encode("utf-8", "surrogatepass")
    return f"{text[:limit]}… [cut: {len(text)} characters, {digest(whole)}]"


def clip_params(params: Any, size_hint: int) -> Any:
    """``params`` unchanged if small; else a summary ``{"_cut": {...}, "preview": ...}``.

    ``size_hint`` is an upper bound on the serialised size (the raw message's
    length): below :data:`MAX_PARAMS_BYTES` nothing is serialised at all.
    """
    if size_hint <= MAX_PARAMS_BYTES:
        return params
    try:
        data = orjson.dumps(params)
    except orjson.JSONEncodeError:  # nested too deep or a lone surrogate: summarise by repr
        data = repr(params).encode("utf-8", "replace")
    if len(data) <= MAX_PARAMS_BYTES:
        return params
    return {
        "_cut": {"bytes": len(data), "hash": digest(data), "kept": _PREVIEW},
        "preview": data[: _PREVIEW * 4].decode("utf-8", "ignore")[:_PREVIEW],
    }
