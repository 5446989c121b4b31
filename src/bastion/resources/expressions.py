"""CEL expressions in roles (``mcp.tool_rules[].when``): compiled once, refused with a position.

A role's argument rules are written in CEL, the Common Expression Language
(decision 0044).  This module is the one place the CEL library is imported:
it compiles an expression into a :class:`Program` (cached by its text, so a
role stored, loaded and loaded again compiles each expression once per
process) and turns the library's parse errors into an
:class:`ExpressionError` that says where the mistake is.

The variables an expression may use are :data:`VARIABLES`: ``arguments``
(the tool call's arguments, a map) and ``user`` (``name`` and ``traits``).
Anything else is refused here, at ``bastion create``, rather than failing at
every call.  Evaluating is :mod:`bastion.policy.arguments`' business.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final

import cel

__all__ = ["MAX_EXPRESSION", "VARIABLES", "ExpressionError", "Program", "Scope", "compile_expression"]

#: The names an expression may refer to (besides the variables its own macros bind).
VARIABLES: Final = frozenset({"arguments", "user"})
#: Longest expression accepted (characters): a rule is a condition, not a program.
MAX_EXPRESSION: Final = 4096

# "ERROR: <input>:LINE:COLUMN: reason" is how the library reports a parse error.
_POSITION = re.compile(r"<input>:(\d+):(\d+):\s*([^\n]*)")
# A matches() call with a literal pattern: checked at compile time (the library only finds a bad
# regex when it runs, and would then fail every call).
_MATCHES_LITERAL = re.compile(r"""\bmatches\(\s*("(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')\s*\)""")
# Variables bound by a macro: list.all(x, ...), .exists(x, ...), .exists_one, .map, .filter.
_BOUND = re.compile(r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*,")


class ExpressionError(ValueError):
    """An expression that does not compile: the role's author's mistake.

    ``line`` and ``column`` are 1-based (0 when the library gave no position).
    """

    def __init__(self, reason: str, line: int = 0, column: int = 0) -> None:
        self.reason = reason
        self.line = line
        self.column = column
        where = f"at line {line}, column {column}: " if line else ""
        super().__init__(f"invalid CEL expression {where}{reason}")


@dataclass(frozen=True, slots=True)
class Program:
    """A compiled expression and the variables it reads (so callers build only those)."""

    source: str
    uses_arguments: bool
    uses_user: bool
    _program: cel.Program

    def run(self, scope: Scope) -> Any:
        """Evaluate in ``scope``; raises whatever the library raises on a runtime error
        (a missing key, a type mismatch): callers decide what a failed rule means."""
        return self._program.execute(scope._context)


class Scope:
    """The variables rules are evaluated with: ``user`` set once, ``arguments`` per call.

    The library converts a variable to its own values when the scope changes;
    ``user`` (name and traits: nested maps and lists) costs several times what
    a small ``arguments`` map does, so it is converted once per scope rather
    than per call (decision 0044 has the figures).  Not thread-safe: hold
    :attr:`lock` from :meth:`set_arguments` to the last :meth:`Program.run`.
    """

    __slots__ = ("_context", "lock")

    def __init__(self, user: dict[str, Any]) -> None:
        self._context = cel.Context(variables={"user": user})
        self.lock = threading.Lock()

    def set_arguments(self, arguments: Any) -> None:
        self._context.add_variable("arguments", arguments)


def _first_error(message: str) -> ExpressionError:
    m = _POSITION.search(message)
    if m is None:
        return ExpressionError(message.splitlines()[0][:300] if message else "does not compile")
    return ExpressionError(m.group(3)[:300], int(m.group(1)), int(m.group(2)))


@lru_cache(maxsize=1024)
def compile_expression(source: str) -> Program:
    """Compile ``source``; :class:`ExpressionError` says where it is wrong.

    Cached by text: the same expression in many roles (or one role loaded by
    every proxy refresh) is compiled once.
    """
    if not source.strip():
        raise ExpressionError("the expression is empty")
    if len(source) > MAX_EXPRESSION:
        raise ExpressionError(f"the expression is {len(source)} characters long; at most {MAX_EXPRESSION}")
    try:
        program = cel.compile(source)
    except ValueError as e:
        raise _first_error(str(e)) from None
    for m in _MATCHES_LITERAL.finditer(source):
        try:
            cel.compile(f'"".matches({m.group(1)})').execute({})
        except (ValueError, RuntimeError) as e:
            line = source.count("\n", 0, m.start(1)) + 1
            column = m.start(1) - (source.rfind("\n", 0, m.start(1)) + 1) + 1
            reason = " ".join(str(e).split())[:200]
            raise ExpressionError(f"invalid regular expression: {reason}", line, column) from None
    names = set(program.variables())
    bound = set(_BOUND.findall(source))
    unknown = sorted(names - VARIABLES - bound)
    if unknown:
        at = source.find(unknown[0])
        line = source.count("\n", 0, at) + 1 if at >= 0 else 0
        column = at - (source.rfind("\n", 0, at) + 1) + 1 if at >= 0 else 0
        raise ExpressionError(
            f'unknown variable "{unknown[0][:64]}" (an expression may use: {", ".join(sorted(VARIABLES))})',
            line,
            column,
        )
    return Program(source, "arguments" in names, "user" in names, program)
