"""Resource URI patterns of roles (``mcp.resources``) and the canonical form a judged URI must have.

A resource pattern is a role pattern (literal, ``*`` glob, ``^regex$``, trait
template: :mod:`bastion.policy.matchers`) that may also be an RFC 6570 URI
template, as servers list them in ``resources/templates/list``.  A
:class:`ResourcePattern` matches

* a resource URI (``resources/read``, ``resources/subscribe``, entries of
  ``resources/list``): the pattern itself matches it, or, for a template
  pattern, the URI is one the template expands to (:func:`_expansion`);
* a URI template (entries of ``resources/templates/list``, the ``ref/resource``
  of ``completion/complete``): the pattern matches the template's text.

**Canonical form** (:func:`uri_problem`).  A rule is only as good as the
string it is matched against: if ``demo://x/%73ecret`` or ``file:///srv/pub/../key``
were judged as written and then decoded by the upstream, a deny rule would be
stepped around and an allow rule stretched.  So where a rule restricts an app's
resources, a URI the upstream could read as another string is refused, not
normalised (the gateway forwards what it judged, decision 0022): percent-encoded
unreserved characters, ``/`` or ``\\`` encoded in the path, dot segments, backslashes, control
characters and white space, and upper case in the scheme or authority.

Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Final

from bastion.policy.matchers import Matcher, compile_pattern, interpolate, is_regex

__all__ = ["ResourcePattern", "compile_resource_patterns", "uri_problem"]

# One RFC 6570 expression: an optional operator, then variable names.
_EXPRESSION: Final = re.compile(r"\{([+#./;?&]?)([A-Za-z0-9_.,%*:]+)\}")
# What each operator's expansion may contain (values are percent-encoded by
# the client, so a simple expansion cannot hold "/", "?" or "#").
_EXPANDS_TO: Final = {
    "": r"[^/?#]*",
    "+": r"[^?#]*",
    "#": r"(?:#.*)?",
    ".": r"(?:\.[^/?#]*)*",
    "/": r"(?:/[^/?#]*)*",
    ";": r"(?:;[^/?#]*)*",
    "?": r"(?:\?[^#]*)?",
    "&": r"(?:&[^#]*)?",
}
_ENCODED_UNRESERVED: Final = re.compile(r"%(?:[46][1-9A-Fa-f]|[57][0-9Aa]|3[0-9]|2[DdEe]|5[Ff]|7[Ee])")
_ENCODED_SEPARATOR: Final = re.compile(r"%(?:2[Ff]|5[Cc])")
_DOT_SEGMENT: Final = re.compile(r"(?:^|/)\.{1,2}(?:/|$|[?#])")
_CONTROL_OR_SPACE: Final = re.compile(r"[\x00-\x20\x7f\\]")
_SCHEME_AUTHORITY: Final = re.compile(r"^([^:/?#]*):(//[^/?#]*)?")


def uri_problem(uri: str) -> str | None:
    """Why ``uri`` is not in canonical form (see the module docstring), or None if it is."""
    if _CONTROL_OR_SPACE.search(uri):
        return "it holds white space, a control character or a backslash"
    if _ENCODED_UNRESERVED.search(uri):
        return "it percent-encodes a letter, digit or one of '-._~', which need no encoding"
    head = _SCHEME_AUTHORITY.match(uri)
    if head is None:
        return "it has no scheme"
    if head.group(0) != head.group(0).lower():
        return "its scheme or authority is not in lower case"
    path = uri[head.end() :].split("?", 1)[0].split("#", 1)[0]
    if _ENCODED_SEPARATOR.search(path):
        return "its path percent-encodes '/' or '\\'"
    if _DOT_SEGMENT.search(path):
        return "its path has a '.' or '..' segment"
    return None


def _glob_regex(text: str) -> str:
    return ".*".join(re.escape(part) for part in text.split("*"))


def _expansion(template: str) -> re.Pattern[str] | None:
    """A regex for the URIs ``template`` expands to; None if it has no expression.

    ``*`` in the literal parts is a glob, as in any role pattern.
    """
    parts: list[str] = []
    pos = 0
    for m in _EXPRESSION.finditer(template):
        parts.append(_glob_regex(template[pos : m.start()]))
        parts.append(_EXPANDS_TO[m.group(1)])
        pos = m.end()
    if pos == 0:
        return None
    parts.append(_glob_regex(template[pos:]))
    return re.compile("".join(parts), re.DOTALL)


@dataclass(frozen=True, slots=True)
class ResourcePattern:
    """A compiled ``mcp.resources`` pattern."""

    matcher: Matcher
    _expansion: re.Pattern[str] | None = field(default=None, repr=False, compare=False)

    @property
    def pattern(self) -> str:
        return self.matcher.pattern

    def matches_uri(self, uri: str) -> bool:
        """True iff ``uri`` matches the pattern or is an expansion of the template it is."""
        if self.matcher.matches(uri):
            return True
        return self._expansion is not None and self._expansion.fullmatch(uri) is not None

    def matches_template(self, template: str) -> bool:
        """True iff the text of the URI template ``template`` matches the pattern."""
        return self.matcher.matches(template)


@lru_cache(maxsize=4096)
def _compile_one(pattern: str) -> ResourcePattern:
    matcher = compile_pattern(pattern)  # ValueError for a broken ^regex$
    return ResourcePattern(matcher, None if is_regex(pattern) else _expansion(pattern))


def compile_resource_patterns(
    patterns: Sequence[str], traits: Mapping[str, Sequence[str]], *, fail_closed: bool = False
) -> tuple[ResourcePattern, ...]:
    """Interpolate ``patterns`` with ``traits`` and compile them, deduplicated.

    As :func:`~bastion.policy.matchers.compile_patterns`: a pattern that does
    not compile after interpolation is dropped, or with ``fail_closed`` (deny
    lists) becomes ``*``.
    """
    out: dict[str, ResourcePattern] = {}
    for raw in patterns:
        for pattern in interpolate(raw, traits):
            try:
                compiled = _compile_one(pattern)
            except ValueError:
                if not fail_closed:
                    continue
                compiled = _compile_one("*")
            out.setdefault(compiled.pattern, compiled)
    return tuple(out.values())
