"""The path of an MCP request, normalised once: the path the gateway decides on is the path it forwards.

What follows ``/mcp/apps/<app>`` is read from the *raw* request target (never from a
server's already-decoded ``path``), percent-decoded once, its dot segments resolved,
and refused (:class:`PathError`, the client's fault: HTTP 400) wherever an upstream could
read it differently from us:

- an encoded ``/`` or ``\\`` (``%2F``, ``%5C``): one segment for us, two for many servers;
- an encoded ``?`` or ``#`` (``%3F``, ``%23``): a path for us, a query or fragment after a
  second decoding;
- a raw ``\\`` (some servers treat it as ``/``), a ``%`` not followed by two hex digits,
  bytes outside ASCII in the raw target, decoded bytes that are not UTF-8;
- NUL and other control characters;
- ``..`` climbing above the app's root, and dot segments with parameters (``..;``), which
  some servers resolve as ``..``.

:func:`encode_target` turns the decided path back into a request target: the upstream
decodes it into exactly that path (``%`` itself is re-encoded, so nothing is decoded twice).

Pure; no I/O.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import quote

from bastion.errors import ValidationError

__all__ = ["PathError", "encode_target", "normalise", "split_app"]

_HEX: Final = frozenset("0123456789abcdefABCDEF")
_REFUSED_ENCODED: Final = {
    "2f": "an encoded '/' (%2F)",
    "5c": "an encoded '\\' (%5C)",
    "3f": "an encoded '?' (%3F)",
    "23": "an encoded '#' (%23)",
}
#: Kept as they are in a forwarded target (RFC 3986 pchar sub-delims, ':' and '@').
_SAFE: Final = "/!$&'()*+,;=:@"


#: How much of a client's path an error message quotes.
_QUOTE: Final = 32


class PathError(ValidationError):
    """A request path the gateway will not forward because it is ambiguous or malformed (400)."""

    code = "bad_path"


def split_app(rest: bytes) -> tuple[str, bytes]:
    """``(app name, raw sub-path)`` from the raw target after ``/mcp/apps/``.

    The name is decoded (an app name never holds ``%`` or ``/``; a strange one is simply not
    found); the sub-path stays raw for :func:`normalise`.
    """
    raw_name, sep, sub = rest.partition(b"/")
    name = raw_name.decode("latin-1")
    if "%" in name:
        name = _decode(name, refuse_encoded=False)
    return name, (b"/" + sub) if sep else b""


def normalise(raw: bytes) -> str:
    """The decoded, dot-resolved path for a raw sub-path (``b""`` and ``b"/"`` are ``"/"``).

    Raises :class:`PathError` for what the module doc lists.
    """
    if len(raw) <= 1:
        return "/"
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise PathError("the request path has bytes outside ASCII: percent-encode them") from None
    if "\\" in text:
        raise PathError("the request path contains '\\', which some upstreams read as '/'; not forwarded")
    if "%" in text:
        text = _decode(text, refuse_encoded=True)
    for ch in text:
        if ch < " " or ch == "\x7f":
            raise PathError("the request path contains a control character; not forwarded")
    segments = text.split("/")[1:]
    out: list[str] = []
    for seg in segments:
        bare = seg.partition(";")[0]
        if bare in (".", "..") and bare != seg:
            raise PathError(f"the request path has a dot segment with parameters ({seg[:_QUOTE]!r})")
        if seg == ".":
            continue
        if seg == "..":
            if not out:
                raise PathError("the request path climbs above the app's root with '..'")
            out.pop()
            continue
        out.append(seg)
    path = "/" + "/".join(out)
    if segments[-1] in (".", "..") and path != "/":
        path += "/"  # RFC 3986 5.2.4: "a/b/.." is "a/", not "a"
    return path


def encode_target(path: str) -> str:
    """The request target for a path from :func:`normalise` (ASCII; no query)."""
    return quote(path, safe=_SAFE)


def _decode(text: str, *, refuse_encoded: bool) -> str:
    pieces = text.split("%")
    out = bytearray(pieces[0].encode("latin-1"))
    for piece in pieces[1:]:
        pair = piece[:2]
        if len(pair) < 2 or pair[0] not in _HEX or pair[1] not in _HEX:
            raise PathError(f"malformed percent-encoding in the request path near {('%' + piece)[:_QUOTE]!r}")
        if refuse_encoded and (why := _REFUSED_ENCODED.get(pair.lower())):
            raise PathError(
                f"the request path contains {why}, which upstreams read differently; not forwarded"
            )
        out.append(int(pair, 16))
        out += piece[2:].encode("latin-1")
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise PathError("the percent-decoded request path is not UTF-8") from None
