"""Argument rules (``mcp.tool_rules``): CEL conditions on a tool call's arguments and its caller.

A role's ``allow.mcp.tool_rules`` and ``deny.mcp.tool_rules`` (decision 0044)
each hold ``{name?, tools, when}``.  For a call to tool T:

* **deny** (every role, greedy like ``deny.mcp.tools``): a rule whose
  ``tools`` match T refuses the call if ``when`` is true, and also if it
  cannot be evaluated (a missing argument, a type mismatch, a result that is
  not a bool): a deny rule that cannot be decided must not let the call through.
* **allow** (roles that grant the app and allow T by name): a role whose
  allow rules match T allows the call only if one of those rules is true
  (one that cannot be evaluated is false).  A role that allows T by name and
  has no allow rule for T allows it whatever the arguments, as before.

The call is allowed iff no deny rule refuses it and some role allows it.
:class:`ArgumentRules` is built once per (identity, app, tool) by the
:class:`~bastion.policy.rbac.AccessChecker` and only when a rule applies, so a
call with no rule costs nothing here.  Expressions were compiled when the role
was validated (:func:`~bastion.resources.expressions.compile_expression`, cached).

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from bastion.policy.decision import Decision
from bastion.policy.matchers import Matcher, compile_patterns
from bastion.protocol.jsonrpc import fold_key
from bastion.resources import ToolRule
from bastion.resources.expressions import Program, Scope, compile_expression

__all__ = ["ArgumentRules", "CompiledToolRule", "compile_tool_rules"]

#: How much of an evaluation error is quoted (it may name keys the client chose).
_MAX_ERROR: Final = 200


@dataclass(frozen=True, slots=True)
class CompiledToolRule:
    """One rule of one role, its tool patterns interpolated and its expression compiled."""

    role: str
    #: What refusals call it: the rule's ``name``, else ``allow.mcp.tool_rules[INDEX]``.
    label: str
    tools: tuple[Matcher, ...]
    program: Program

    def applies_to(self, tool: str) -> bool:
        return any(m.matches(tool) for m in self.tools)

    @property
    def named(self) -> str:
        return f'rule "{self.label}" of role "{self.role}"'


def compile_tool_rules(
    role: str,
    side: Literal["allow", "deny"],
    rules: Sequence[ToolRule],
    traits: Mapping[str, Sequence[str]],
) -> tuple[CompiledToolRule, ...]:
    """Compile a role's rules of one side.  Deny rules' tool patterns fail closed (``*``)."""
    out = []
    for i, rule in enumerate(rules):
        out.append(
            CompiledToolRule(
                role=role,
                label=rule.name or f"{side}.mcp.tool_rules[{i}]",
                tools=compile_patterns(rule.tools, traits, fail_closed=side == "deny"),
                program=compile_expression(rule.when),
            )
        )
    return tuple(out)


def _case_variant(value: Any) -> tuple[str, str] | None:
    """Two member names of one object, anywhere in ``value``, that fold to the same name.

    A rule reads ``arguments.message``; an upstream decoding case-insensitively (Go's
    ``encoding/json``, .NET) may read ``Message`` instead, the last one winning.  The
    parser refuses such pairs only at the levels the gateway judged before rules existed
    (``protocol/jsonrpc.py``), so calls judged on their arguments are checked here.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is dict:
            if len(item) > 1:
                seen: dict[str, str] = {}
                for key in item:
                    folded = fold_key(key)
                    other = seen.setdefault(folded, key)
                    if other is not key:
                        return other[:64], key[:64]
            stack.extend(v for v in item.values() if type(v) is dict or type(v) is list)
        elif type(item) is list:
            stack.extend(v for v in item if type(v) is dict or type(v) is list)
    return None


def _evaluate(rule: CompiledToolRule, scope: Scope) -> bool | str:
    """True/False, or why the rule could not be evaluated."""
    try:
        result = rule.program.run(scope)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # KeyError, TypeError, OverflowError...; and a panic in the library
        # (pyo3's PanicException is a BaseException) must refuse the call, not end the session.
        text = str(e) or type(e).__name__
        if isinstance(e, KeyError):
            text = f"no such key: {text}"
        return text[:_MAX_ERROR]
    if result is True or result is False:
        return result
    return f"the expression gave a {type(result).__name__}, not a bool"


class ArgumentRules:
    """The argument rules that apply to one tool of one app for one identity.  Call it per call."""

    __slots__ = ("_allow", "_deny", "_scope", "_tool", "_traits", "_username")

    def __init__(
        self,
        tool: str,
        deny: tuple[CompiledToolRule, ...],
        allow: tuple[tuple[CompiledToolRule, ...], ...] | None,
        traits: Mapping[str, Sequence[str]],
    ) -> None:
        """``allow``: per granting role, its rules for the tool; ``None`` when some role allows
        the tool unconditionally (then only ``deny`` is checked)."""
        self._tool = tool
        self._deny = deny
        self._allow = allow
        self._traits = {k: list(v) for k, v in traits.items()}
        self._username: str | None = None
        self._scope: Scope | None = None

    def __call__(self, arguments: Any, username: str) -> Decision:
        if arguments is None:
            arguments = {}
        ambiguous = _case_variant(arguments)
        if ambiguous is not None:
            return Decision(
                False,
                f'the arguments hold "{ambiguous[0]}" and "{ambiguous[1]}", which a case-insensitive '
                "decoder reads as one member; refused where argument rules apply",
            )
        scope = self._scope
        if scope is None or username != self._username:  # once per checker, in practice
            scope = self._scope = Scope({"name": username, "traits": self._traits})
            self._username = username
        with scope.lock:
            scope.set_arguments(arguments)
            return self._decide(scope)

    def _decide(self, scope: Scope) -> Decision:
        for rule in self._deny:
            got = _evaluate(rule, scope)
            if got is True:
                return Decision(False, f"the call is denied by {rule.named}")
            if got is not False:
                return Decision(False, f"the call is denied: {rule.named} could not be evaluated ({got})")
        if self._allow is None:
            return Decision(True, f'tool "{self._tool}" is allowed; no deny rule applies')
        failed: list[str] = []
        for rules in self._allow:
            for rule in rules:
                got = _evaluate(rule, scope)
                if got is True:
                    return Decision(True, f"the call is allowed by {rule.named}")
                failed.append(rule.named if got is False else f"{rule.named} (could not be evaluated: {got})")
        shown = "; ".join(failed[:3]) + ("; ..." if len(failed) > 3 else "")
        return Decision(False, f"no argument rule allows the call ({shown}: not true)")
