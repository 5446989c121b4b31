"""MCP 2026-07-28 mirrored headers: ``Mcp-Method`` / ``Mcp-Name`` must agree with the body.

Intermediaries route and filter on headers; a body that says something else
would let a request be authorised as one thing and executed as another.  So
when a client sends these headers, they must match what the body says, or the
request is refused (HTTP 400, JSON-RPC ``-32020``).  Policy itself is always
decided on the body.  Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

#: Methods whose ``Mcp-Name`` mirrors a parameter, and which parameter.
NAME_PARAM = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
#: The most characters of a value quoted in a refusal (the body may hold megabytes of it).
_QUOTE = 128


def decode_header_value(raw: bytes) -> str:
    """Header text; ``=?base64?...?=`` carries non-ASCII values (2026-07-28)."""
    text = raw.decode("latin-1").strip()
    if text.startswith("=?base64?") and text.endswith("?="):
        try:
            return base64.b64decode(text[9:-2], validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return "\x00invalid"  # never equal to a real value
    return text


def encode_header_value(value: str) -> str:
    """``value`` as a header: as it is when plain printable ASCII without edge spaces, else
    ``=?base64?...?=`` (2026-07-28; what :func:`decode_header_value` reads back)."""
    if value == value.strip() and all(" " <= c <= "~" for c in value) and not value.startswith("=?base64?"):
        return value
    return f"=?base64?{base64.b64encode(value.encode('utf-8')).decode('ascii')}?="


def mismatch(method_header: bytes | None, name_header: bytes | None, method: str | None, params: Any) -> str:
    """Why the mirrored headers disagree with the body, or ``""`` when they agree (or are absent)."""
    if method_header is not None:
        want = decode_header_value(method_header)
        if want != (method or ""):
            return f"Mcp-Method header {_quote(want)} does not match the body's method {_quote(method)}"
    if name_header is not None:
        key = NAME_PARAM.get(method or "")
        value = params.get(key) if key and isinstance(params, dict) else None
        got = decode_header_value(name_header)
        if not isinstance(value, str) or got != value:
            return f"Mcp-Name header {_quote(got)} does not match the body's {key or 'name'} {_quote(value)}"
    return ""


def _quote(value: Any) -> str:
    """``repr(value)``, cut to :data:`_QUOTE` characters."""
    text = repr(value)
    return text if len(text) <= _QUOTE else f"{text[:_QUOTE]}… ({len(text)} characters)"
