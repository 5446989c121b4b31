"""Patterns used by roles: literals, ``*`` globs, ``^regex$`` and trait templates.

A role pattern (an MCP tool name, a label value) is one of:

* ``*``: matches every string, including the empty one;
* ``^...$`` (starts with ``^`` AND ends with ``$``): a regular expression that
  must match the whole string;
* anything else: a glob in which ``*`` matches any sequence of characters
  (including none) and every other character is literal (``?``, ``[...]``,
  ``.`` and a lone ``^`` or ``$`` have no special meaning).

Matching is case-sensitive.  Before compiling, a pattern may be expanded with
the user's traits (``{{internal.NAME}}``, ``{{external.NAME}}``, see
:func:`interpolate`).  A :class:`LabelSelector` combines these into the
``app_labels`` semantics of a role.

Everything here is pure: no I/O, no clock, no global state other than the
compiled-pattern cache.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

__all__ = [
    "LabelSelector",
    "MatchKind",
    "Matcher",
    "compile_pattern",
    "compile_patterns",
    "interpolate",
]

MatchKind = Literal["any", "literal", "glob", "regex"]

WILDCARD = "*"


@dataclass(frozen=True, slots=True)
class Matcher:
    """A compiled pattern.  ``matches(value)`` is the only operation.

    Two matchers are equal when their ``pattern`` (and so their ``kind``) is.
    """

    pattern: str
    kind: MatchKind
    _regex: re.Pattern[str] | None = field(default=None, repr=False, compare=False)

    def matches(self, value: str) -> bool:
        """True iff ``value`` as a whole matches the pattern (case-sensitive)."""
        if self.kind == "any":
            return True
        if self.kind == "literal":
            return value == self.pattern
        assert self._regex is not None  # set for "glob" and "regex" by compile_pattern
        return self._regex.fullmatch(value) is not None


def is_regex(pattern: str) -> bool:
    """True iff ``pattern`` is written as a regular expression (``^...$``)."""
    return len(pattern) >= 2 and pattern.startswith("^") and pattern.endswith("$")


@lru_cache(maxsize=4096)
def compile_pattern(pattern: str) -> Matcher:
    """Compile one pattern (see the module docstring for the syntax).

    Raises ``ValueError`` if a ``^...$`` pattern is not a valid regular
    expression.  Resource validation rejects such patterns in roles, but one can
    still appear after trait interpolation, so callers decide what a broken
    pattern means for them (see :func:`compile_patterns`).  Results are cached.
    """
    if pattern == WILDCARD:
        return Matcher(pattern, "any")
    if is_regex(pattern):
        try:
            # fullmatch (not match/search): "$" alone would also accept a
            # trailing newline, which must not sneak past an allow-list.
            regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f'invalid regular expression "{pattern}": {e}') from None
        return Matcher(pattern, "regex", regex)
    if WILDCARD not in pattern:
        return Matcher(pattern, "literal")
    # Glob: escape every literal run, join runs with ".*".  DOTALL so that "*"
    # really means "any sequence", newlines included.
    body = ".*".join(re.escape(part) for part in pattern.split(WILDCARD))
    return Matcher(pattern, "glob", re.compile(body, re.DOTALL))


# One template per string, optionally with a literal prefix and suffix that
# contain no braces (as Teleport does): "{{internal.x}}", "pre-{{ external.x }}-suf",
# and the bracket form for names that are not identifiers:
# {{external["http://schemas.example.com/groups"]}}.
_TEMPLATE = re.compile(
    r"(?P<prefix>[^{}]*)"
    r"\{\{\s*(?:internal|external)"
    r"(?:\.(?P<name>[A-Za-z0-9_-]+)|\[\s*\"(?P<quoted>[^\"]+)\"\s*\])"
    r"\s*\}\}"
    r"(?P<suffix>[^{}]*)"
)


def interpolate(pattern: str, traits: Mapping[str, Sequence[str]]) -> list[str]:
    """Expand a trait template in ``pattern`` into one string per trait value.

    * No ``{{`` / ``}}`` in ``pattern``: ``[pattern]`` unchanged.
    * ``prefix{{internal.NAME}}suffix`` or ``prefix{{external.NAME}}suffix``
      (whitespace allowed inside the braces; ``NAME`` may also be written
      ``["any name"]``): ``prefix + value + suffix`` for each value of trait
      ``NAME``, in order, without duplicates.  Both namespaces read the same
      traits (local users have one set).  Empty trait values are skipped.
    * A missing trait, a trait with no values, and any malformed template
      (``{{foo}}``, an unclosed ``{{``, two templates, a brace in the prefix)
      give ``[]``: a pattern that cannot be evaluated matches nothing.

    Trait values are inserted verbatim, so a value may itself be a glob or a
    ``^regex$`` (``mcp_tools: ["*"]`` grants every tool through ``access``).
    """
    if "{{" not in pattern and "}}" not in pattern:
        return [pattern]
    m = _TEMPLATE.fullmatch(pattern)
    if m is None:
        return []
    name = m.group("name") or m.group("quoted")
    values = traits.get(name, ())
    if isinstance(values, str):  # a bare string is one value, not a sequence of characters
        values = (values,)
    prefix, suffix = m.group("prefix"), m.group("suffix")
    out: dict[str, None] = {}  # an ordered set
    for value in values:
        if value:
            out[f"{prefix}{value}{suffix}"] = None
    return list(out)


def compile_patterns(
    patterns: Iterable[str],
    traits: Mapping[str, Sequence[str]],
    *,
    fail_closed: bool = False,
) -> tuple[Matcher, ...]:
    """Interpolate and compile ``patterns``; duplicates removed, order kept.

    A pattern that expands to an invalid regular expression is dropped, unless
    ``fail_closed`` is set, in which case it becomes ``*``.  Use ``fail_closed``
    for deny lists: a deny rule that cannot be evaluated must not let
    everything through.
    """
    out: dict[str, Matcher] = {}
    for pattern in patterns:
        for expanded in interpolate(pattern, traits):
            try:
                matcher = compile_pattern(expanded)
            except ValueError:
                if not fail_closed:
                    continue
                matcher = compile_pattern(WILDCARD)
            out.setdefault(matcher.pattern, matcher)
    return tuple(out.values())


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """A compiled ``app_labels`` selector.

    Semantics of :meth:`matches`:

    * an empty selector matches nothing;
    * every key must match (AND); a key's values are alternatives (OR);
    * key ``*`` with value ``*`` matches any label set; key ``*`` with any
      other value matches nothing;
    * value ``*`` matches any value of a key the labels have; a key the labels
      lack never matches;
    * values are literals, globs or ``^regex$``, and may be trait templates;
    * a key template must expand to exactly one key, otherwise the selector
      matches nothing (an unresolved key must not widen or fake a match).
    """

    terms: tuple[tuple[str, tuple[Matcher, ...]], ...]
    #: False for an empty selector or one with an unsatisfiable term.
    satisfiable: bool

    @classmethod
    def compile(
        cls,
        selector: Mapping[str, Sequence[str] | str],
        traits: Mapping[str, Sequence[str]],
        *,
        fail_closed: bool = False,
    ) -> LabelSelector:
        """Compile ``selector`` with ``traits``; ``fail_closed`` as in :func:`compile_patterns`."""
        terms: list[tuple[str, tuple[Matcher, ...]]] = []
        satisfiable = bool(selector)
        for raw_key, raw_values in selector.items():
            values = [raw_values] if isinstance(raw_values, str) else list(raw_values)
            keys = interpolate(raw_key, traits)
            if len(keys) != 1:
                satisfiable = False
                continue
            key = keys[0]
            if key == WILDCARD:
                expanded = {v for value in values for v in interpolate(value, traits)}
                if WILDCARD not in expanded:
                    satisfiable = False
                # "*": "*" constrains nothing, so it adds no term.
                continue
            matchers = compile_patterns(values, traits, fail_closed=fail_closed)
            if not matchers:
                satisfiable = False
            terms.append((key, matchers))
        return cls(tuple(terms), satisfiable)

    def matches(self, labels: Mapping[str, str]) -> bool:
        """True iff ``labels`` satisfy every term of the selector."""
        if not self.satisfiable:
            return False
        for key, matchers in self.terms:
            value = labels.get(key)
            if value is None:
                return False
            if not any(m.matches(value) for m in matchers):
                return False
        return True
