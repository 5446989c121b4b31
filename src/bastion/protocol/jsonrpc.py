"""JSON-RPC 2.0 messages as MCP uses them: parse once, sanitise, forward what was judged.

:func:`parse_message` turns the bytes of one message into a :class:`Message`
(kind, id, method, params, the parsed body) and puts in ``Message.raw`` the
**canonical serialisation of the parsed body** (compact JSON, one line, no
duplicate members, no raw control characters): the bytes the gateway forwards
are the message it decided on, not the bytes it was sent.  An upstream that
frames messages by newlines (stdio) or by blank lines (SSE) therefore reads
exactly one message per message judged: a body of three lines whose first
line is a ``ping`` (finding F1 of the security review) reaches it as one line,
one ``ping``.  When the bytes already are that serialisation, the usual case,
they are kept and nothing is copied.

Re-serialising does not make ambiguity harmless on the way *in*: the audit
event and the decision must read the message as every parser would, so
messages that parsers disagree on are still refused
(:class:`ProtocolError`, never forwarded):

* **Case variants** of the members we decide on, at the top level and of
  ``name``, ``arguments`` and ``uri`` inside ``params`` (``Method``, ``ID``,
  ``"param\\u017f"`` with a long s): Go's ``encoding/json`` and .NET match
  member names case-insensitively, with Unicode simple folding.
* **Exact duplicates** of those members (``{"method":"ping","method":"tools/call"}``):
  orjson keeps the last, other parsers keep the first.  Checking this costs a
  second parse, so it runs only when the raw bytes could hold one (see
  ``_may_have_duplicates``).  Duplicates deeper down (inside ``arguments``)
  are passed on: the forwarded message holds the one the gateway read, and
  argument rules refuse case variants there themselves (decision 0044).
* **Batches** (JSON arrays): removed from MCP in 2025-06-18, and a classic way
  to smuggle a message past a gateway that inspects single messages.
* **Oversized names**: a method over :data:`MAX_METHOD` characters or a string
  id over :data:`MAX_ID` (no real one comes close; both are echoed in answers
  and audit records, which must stay bounded), and integer ids beyond 2**53 - 1
  (JavaScript peers read them as another number).

Also here: the JSON-RPC error codes (the standard ones, the MCP ones, and the
gateway's own) and encoders for the few messages the gateway writes itself.

This module must not do I/O and must not import anything above ``bastion.errors``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from bastion.errors import ValidationError

__all__ = [
    "ACCESS_DENIED",
    "ERROR",
    "HEADER_MISMATCH",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "MAX_ID",
    "MAX_METHOD",
    "METHOD_NOT_FOUND",
    "NOTIFICATION",
    "PARSE_ERROR",
    "REQUEST",
    "RESPONSE",
    "TOO_MANY_REQUESTS",
    "UNSUPPORTED_PROTOCOL_VERSION",
    "UPSTREAM_UNAVAILABLE",
    "Kind",
    "Message",
    "ProtocolError",
    "RequestId",
    "error_response",
    "fold_key",
    "notification",
    "parse_message",
    "result_response",
]

# ------------------------------------------------------------------ error codes

#: JSON-RPC 2.0: the bytes are not JSON (or not UTF-8).
PARSE_ERROR: Final = -32700
#: JSON-RPC 2.0: JSON, but not a valid JSON-RPC message (also: batches, smuggling attempts).
INVALID_REQUEST: Final = -32600
#: JSON-RPC 2.0: no such method.
METHOD_NOT_FOUND: Final = -32601
#: JSON-RPC 2.0: bad params.  Also what the gateway answers a denied ``tools/call``
#: with, as Teleport does: clients show the message to the model and the user.
INVALID_PARAMS: Final = -32602
#: JSON-RPC 2.0: internal error.  The gateway uses it when the *upstream* answered
#: something it cannot pass on safely (e.g. a malformed ``tools/list`` result).
INTERNAL_ERROR: Final = -32603

#: MCP 2026-07-28: HTTP headers and body disagree (``Mcp-Method``, ``Mcp-Name``...).
HEADER_MISMATCH: Final = -32020
#: MCP 2026-07-28: unsupported protocol version.
UNSUPPORTED_PROTOCOL_VERSION: Final = -32022

# The gateway's own codes, in JSON-RPC's implementation-defined range
# (-32000..-32099).  -32000/-32001 (the SDKs' ConnectionClosed/RequestTimeout),
# -32002 (MCP resource not found), -32020/-32022 (MCP 2026) and -32042 (MCP URL
# elicitation) are taken, so ours start at -32050.

#: The identity may not use this app at all (app-level denial, or access revoked).
ACCESS_DENIED: Final = -32050
#: Too many requests of this session are waiting for the upstream (client's fault).
TOO_MANY_REQUESTS: Final = -32051
#: The upstream went away before it answered (upstream's fault).
UPSTREAM_UNAVAILABLE: Final = -32052

# -------------------------------------------------------------------- messages

Kind = Literal["request", "notification", "response", "error"]
REQUEST: Final = "request"
NOTIFICATION: Final = "notification"
RESPONSE: Final = "response"
ERROR: Final = "error"

#: A JSON-RPC id as MCP allows it (``None`` only on error responses).
RequestId = int | str | None


class ProtocolError(ValidationError):
    """The bytes are not one valid, unambiguous JSON-RPC 2.0 message.

    ``rpc_code`` is the JSON-RPC error code to answer with (:data:`PARSE_ERROR`
    or :data:`INVALID_REQUEST`).  (It is not called ``code``: that name is the
    string error code every :class:`~bastion.errors.BastionError` has.)
    ``id`` and ``method`` are what could be read of the message, for the error
    reply and the audit event: ``id`` is ``None`` unless it was a string or an
    integer.
    """

    def __init__(
        self, rpc_code: int, message: str, *, id: RequestId = None, method: str | None = None
    ) -> None:
        super().__init__(message)
        self.rpc_code = rpc_code
        self.id = id
        self.method = method


#: The longest method name accepted (characters).
MAX_METHOD: Final = 256
#: The longest string id accepted (characters).
MAX_ID: Final = 1024
# Integer ids beyond this lose precision in JavaScript (Number.MAX_SAFE_INTEGER).
_MAX_SAFE_INT: Final = 2**53 - 1
# The deepest nesting orjson serialises; deeper messages cannot be forwarded as judged.
_MAX_DEPTH: Final = 254


@dataclass(slots=True)
class Message:
    """One parsed JSON-RPC message and its canonical bytes (see the module docstring).

    ``raw`` is the compact serialisation of ``body``: the bytes to forward.

    ``params`` is the params object, or ``None`` when absent or an array (MCP
    params are always objects; an array is passed on but gives us nothing to
    decide on).  ``body`` is the whole parsed object; read ``result`` and
    ``error`` from it.  Never mutate ``params`` or ``body``: audit events may
    share them.

    Read-only by contract, not frozen: a frozen dataclass costs about a
    microsecond more to build (measured), and every message builds one.
    """

    raw: bytes
    kind: Kind
    id: RequestId
    method: str | None
    params: dict[str, Any] | None
    body: dict[str, Any]


_loads = orjson.loads
_dumps = orjson.dumps
_JSONDecodeError = orjson.JSONDecodeError

# ----------------------------------------------------------------- sanitising

_TOP_KEYS: Final = frozenset({"jsonrpc", "id", "method", "params", "result", "error"})
# Inside params: ``name`` is what tool RBAC decides on; ``arguments`` and ``uri``
# are what the audit log records and what resource RBAC will decide on.
_PARAM_KEYS: Final = frozenset({"name", "arguments", "uri"})
# Params members that are certainly not case variants of those: when a params
# object has only these, the per-member check is skipped.
_PLAIN_PARAM_KEYS: Final = _PARAM_KEYS | {
    "_meta",
    "cursor",
    "requestId",
    "reason",
    "progressToken",
    "progress",
    "total",
    "message",
    "protocolVersion",
    "capabilities",
    "clientInfo",
    "level",
}

# The only non-ASCII characters whose Unicode *simple* case mapping is an ASCII
# letter: U+0130 (dotted capital I, lower: i), U+0131 (dotless i, upper: I),
# U+017F (long s, upper: S), U+212A (Kelvin sign, lower: k).  Go folds with
# unicode.SimpleFold and .NET with simple upper-casing, so "param\u017f" is
# "params" to them; str.lower alone would miss it.
_FOLD_TO_ASCII: Final = str.maketrans({"\u0130": "i", "\u0131": "i", "\u017f": "s", "\u212a": "k"})

# A \u escape of '"' (U+0022) or of a character in U+0040..U+007F (the ASCII
# letters and a few marks).  Encoders escape control characters, '"' (as \"),
# '\\' and sometimes non-ASCII or <>&, never letters; a member name written
# this way is a disguise, and a \u0022 would fool the quote count below.
_DISGUISED: Final = re.compile(rb"\\u00(?:22|[4-7])")


def fold_key(key: str) -> str:
    """``key`` as case-insensitive JSON decoders compare it (lower case, Unicode simple folding)."""
    if not key.isascii():
        key = key.translate(_FOLD_TO_ASCII)
    return key.lower()


class _Pairs(dict[str, Any]):
    """A JSON object that remembers which of its member names occurred more than once."""

    __slots__ = ("dups",)
    dups: frozenset[str]


def _pairs_hook(pairs: list[tuple[str, Any]]) -> _Pairs:
    obj = _Pairs(pairs)
    dups: set[str] = set()
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                dups.add(k)
            seen.add(k)
    obj.dups = frozenset(dups)
    return obj


def _may_have_duplicates(raw: bytes, again: bytes) -> bool:
    """False only if no member name in ``raw`` can occur twice in one object.

    ``again`` is the parsed value re-serialised, and differs from ``raw``.  A
    cheap, conservative filter in front of :func:`_duplicated_member`.  When
    an object has a duplicate member, parsing keeps one of them, so the parsed
    value re-serialised has fewer ``"`` characters than the bytes (a member name
    alone has two).  Nothing else changes the count, provided no quote is
    written as ``\\u0022``; that and letters written as escapes are checked
    first.  A regex search and two byte counts cost less than counting each
    member name's occurrences.
    """
    if _DISGUISED.search(raw) is not None:
        return True
    return raw.count(b'"') != again.count(b'"')


def _duplicated_member(raw: bytes) -> str | None:
    """The first decided-on member that occurs twice (top level or in params), or None.

    The slow path: a second parse with the standard library, which hands every
    object's (name, value) pairs to a hook before collapsing them.
    """
    try:
        top = json.loads(raw, object_pairs_hook=_pairs_hook)
    except (ValueError, RecursionError):  # orjson accepted it; be strict anyway
        return "(unparsable)"
    if not isinstance(top, _Pairs):
        return None
    if top.dups & _TOP_KEYS:
        return min(top.dups & _TOP_KEYS)
    params = top.get("params")
    if isinstance(params, _Pairs) and params.dups & _PARAM_KEYS:
        return "params." + min(params.dups & _PARAM_KEYS)
    return None


# -------------------------------------------------------------------- parsing


def _invalid(id: RequestId, method: Any, message: str) -> ProtocolError:
    # The id is echoed in the answer and both are audited: oversized ones are dropped.
    if type(id) is str and len(id) > MAX_ID:
        id = None
    return ProtocolError(
        INVALID_REQUEST,
        message,
        id=id,
        method=method if type(method) is str and len(method) <= MAX_METHOD else None,
    )


def parse_message(raw: bytes) -> Message:
    """Parse and validate one JSON-RPC 2.0 message; raise :class:`ProtocolError` if it is not one.

    Refused: invalid JSON or UTF-8 (:data:`PARSE_ERROR`); batches, non-objects,
    ``jsonrpc`` other than ``"2.0"``, an id that is not a string or an integer
    (``null`` only on error responses), a non-string method, params that are
    not an object or array, a message that is both request and response or
    neither, and the ambiguous messages described in the module docstring
    (:data:`INVALID_REQUEST`).  Integers beyond 64 bits are read as floats by
    orjson, so such ids are refused too.
    """
    try:
        body = _loads(raw)
    except _JSONDecodeError as e:
        raise ProtocolError(PARSE_ERROR, f"the message is not valid JSON in UTF-8: {e}") from None
    if type(body) is not dict:
        if type(body) is list:
            raise ProtocolError(
                INVALID_REQUEST,
                "JSON-RPC batches (arrays) are not supported: MCP removed batching in protocol "
                "version 2025-06-18; send one message at a time",
            )
        raise ProtocolError(INVALID_REQUEST, "a JSON-RPC message must be a JSON object")

    rid = body.get("id")
    id_ok = type(rid) is int or type(rid) is str  # not bool, not float
    good_id: RequestId = rid if id_ok else None
    method = body.get("method")

    if body.get("jsonrpc") != "2.0":
        raise _invalid(good_id, method, 'the "jsonrpc" member must be "2.0"')
    if not body.keys() <= _TOP_KEYS:  # one C-level check in the common case
        for key in body:
            if key not in _TOP_KEYS and fold_key(key) in _TOP_KEYS:
                raise _invalid(
                    good_id,
                    method,
                    f'member "{key[:64]}" is a case variant of "{fold_key(key)}"; refused as ambiguous',
                )

    kind: Kind
    params: dict[str, Any] | None = None
    if method is not None:
        if type(method) is not str:
            raise _invalid(good_id, method, '"method" must be a string')
        if "result" in body or "error" in body:
            raise _invalid(good_id, method, "a message cannot be both a request and a response")
        if "params" in body:
            p = body["params"]
            if type(p) is dict:
                params = p
                if not p.keys() <= _PLAIN_PARAM_KEYS:
                    for key in p:
                        if key not in _PARAM_KEYS and fold_key(key) in _PARAM_KEYS:
                            raise _invalid(
                                good_id,
                                method,
                                f'member "params.{key[:64]}" is a case variant of "{fold_key(key)}"; refused',
                            )
            elif type(p) is not list:
                raise _invalid(good_id, method, '"params" must be an object or an array')
        if "id" in body:
            if not id_ok:
                raise _invalid(good_id, method, '"id" must be a string or an integer')
            kind = "request"
        else:
            kind = "notification"
    elif "result" in body:
        if "error" in body:
            raise _invalid(good_id, method, 'a response cannot have both "result" and "error"')
        if not id_ok:
            raise _invalid(good_id, method, '"id" must be a string or an integer')
        kind = "response"
    elif "error" in body:
        if type(body["error"]) is not dict:
            raise _invalid(good_id, method, '"error" must be an object')
        if not id_ok and rid is not None:
            raise _invalid(good_id, method, '"id" must be a string, an integer or null')
        kind = "error"
    else:
        raise _invalid(good_id, method, 'a JSON-RPC message needs "method", "result" or "error"')

    if type(method) is str and len(method) > MAX_METHOD:
        raise _invalid(
            good_id,
            None,
            f"the method name is {len(method)} characters long; at most {MAX_METHOD} are accepted",
        )
    if type(good_id) is str:
        if len(good_id) > MAX_ID:
            raise _invalid(
                None, method, f'"id" is {len(good_id)} characters long; at most {MAX_ID} are accepted'
            )
    elif type(good_id) is int and not -_MAX_SAFE_INT <= good_id <= _MAX_SAFE_INT:
        # JavaScript reads such a number as the nearest double: two ids could become one
        # upstream, and a server that refuses it leaves the request in flight forever.
        raise _invalid(
            None, method, '"id" is an integer beyond 2**53 - 1, which JavaScript peers cannot read exactly'
        )

    try:
        canonical = _dumps(body)
    except orjson.JSONEncodeError:
        # Nested deeper than orjson writes (lone surrogates do not parse at all).
        raise _invalid(
            good_id, method, f"the message is nested more than {_MAX_DEPTH} levels deep; refused"
        ) from None
    if canonical == raw:
        # The usual case (compact JSON, as most encoders write it): the bytes are exactly
        # the parsed value's serialisation, which has no duplicates; one compare.
        return Message(raw, kind, good_id, method, params, body)
    if _may_have_duplicates(raw, canonical):
        dup = _duplicated_member(raw)
        if dup is not None:
            raise _invalid(good_id, method, f'member "{dup}" occurs more than once; refused as ambiguous')
    return Message(canonical, kind, good_id, method, params, body)


# ------------------------------------------------------------------- encoding


def error_response(id: RequestId, code: int, message: str, data: Any = None) -> bytes:
    """A JSON-RPC error response (``data`` omitted when ``None``)."""
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return _dumps({"jsonrpc": "2.0", "id": id, "error": error})


def result_response(id: RequestId, result: Any) -> bytes:
    """A JSON-RPC success response."""
    return _dumps({"jsonrpc": "2.0", "id": id, "result": result})


def notification(method: str, params: Any = None) -> bytes:
    """A JSON-RPC notification (``params`` omitted when ``None``)."""
    if params is None:
        return _dumps({"jsonrpc": "2.0", "method": method})
    return _dumps({"jsonrpc": "2.0", "method": method, "params": params})
