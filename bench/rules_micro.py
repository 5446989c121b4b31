"""What argument rules (``mcp.tool_rules``, decision 0044) cost per ``tools/call``, in the engine alone.

Drives :class:`bastion.session.engine.Session` as the MCP handler does for one ``tools/call``
(``client_sent`` of the request, ``upstream_sent`` of its answer) and reports the best per-call
time of ``--repeat`` timeit runs, for:

- ``no-rules``: the ``mcp-user`` preset alone (the hot path before this feature);
- ``rule-other-tool``: plus a role with a deny rule on another tool (compiled, never evaluated:
  must cost what ``no-rules`` does);
- ``one-rule``: plus a deny rule on the called tool, ``has(arguments.message) &&
  arguments.message.contains("secret")``, evaluated per call (the bench's echo call passes it);
- ``one-rule-user``: a rule that also reads ``user`` (name and traits are converted too);
- ``rule-alone``: just the rule's check (``Decision.check_arguments``), without the engine.

    .venv/bin/python bench/rules_micro.py [--calls 20000] [--repeat 7]

Also prints what compiling one expression costs (done once per expression and process).
"""

from __future__ import annotations

import argparse
import sys
import timeit
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import orjson

from bastion.identity import Identity
from bastion.policy import AccessChecker, preset_roles
from bastion.resources import App, Role
from bastion.resources.expressions import compile_expression
from bastion.session.engine import CheckRate, Session

RULE = 'has(arguments.message) && arguments.message.contains("secret")'
USER_RULE = 'arguments.message.contains(user.name) || "ops" in user.traits.teams'
APP = App.model_validate({"metadata": {"name": "bench"}, "spec": {"uri": "mcp+http://127.0.0.1:9/mcp"}})
T0 = datetime(2026, 12, 1, tzinfo=UTC)
IDENT = Identity("bench", "bench", ("mcp-user",), {}, T0 + timedelta(hours=1), T0)


class Clock:
    def now(self) -> datetime:
        return T0


def rule_role(tool: str, when: str) -> Role:
    rule = {"name": "bench-rule", "tools": [tool], "when": when}
    return Role.model_validate(
        {"metadata": {"name": "bench-rule"}, "spec": {"deny": {"mcp": {"tool_rules": [rule]}}}}
    )


def session(checker: AccessChecker) -> Session:
    return Session(
        app=APP,
        checker=checker,
        identity=IDENT,
        session_id="s",
        cluster_name="bench",
        transport="http",
        clock=Clock(),
    )


def per_call(checker: AccessChecker, calls: int, repeat: int) -> float:
    s = session(checker)
    s.client_sent(b'{"jsonrpc":"2.0","id":0,"method":"initialize","params":{}}')
    s.upstream_sent(b'{"jsonrpc":"2.0","id":0,"result":{}}')
    return time_calls(s, calls, repeat)


def time_calls(s: Session, calls: int, repeat: int) -> float:
    """Best µs per ``tools/call`` of ``echo`` (request in, answer out) on an initialized ``s``;
    a call held for a rate limit (decision 0051) is let through at once."""
    answer = b'{"jsonrpc":"2.0","id":%d,"result":{"content":[{"type":"text","text":"hello from wrk"}]}}'
    request = (
        b'{"jsonrpc":"2.0","id":%d,"method":"tools/call",'
        b'"params":{"name":"echo","arguments":{"message":"hello from wrk"}}}'
    )
    n = [0]

    def one() -> None:
        n[0] += 1
        i = n[0]
        if type(s.client_sent(request % i)[-1]) is CheckRate:
            s.rate_checked(i, None)
        s.upstream_sent(answer % i)

    return min(timeit.repeat(one, number=calls, repeat=repeat)) / calls * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    presets = {r.metadata.name: r for r in preset_roles()}
    base = [presets["mcp-user"]]
    traits = {"teams": ["dev", "ops"]}
    checkers: dict[str, Any] = {
        "no-rules": AccessChecker(base, traits),
        "rule-other-tool": AccessChecker([*base, rule_role("other", RULE)], traits),
        "one-rule": AccessChecker([*base, rule_role("echo", RULE)], traits),
        "one-rule-user": AccessChecker([*base, rule_role("echo", USER_RULE)], traits),
    }
    results = {name: per_call(c, args.calls, args.repeat) for name, c in checkers.items()}
    check = checkers["one-rule"].check_tool(APP, "echo").check_arguments
    arguments = orjson.loads(b'{"message":"hello from wrk"}')
    results["rule-alone"] = (
        min(timeit.repeat(lambda: check(arguments, "bench"), number=args.calls, repeat=args.repeat))
        / args.calls
        * 1e6
    )
    compile_expression.cache_clear()
    compile_us = (
        min(
            timeit.repeat(
                lambda: (compile_expression.cache_clear(), compile_expression(RULE)), number=500, repeat=5
            )
        )
        / 500
        * 1e6
    )
    print(f"| variant | µs per call (best of {args.repeat}) | vs no-rules |")
    print("|---|---|---|")
    for name, us in results.items():
        delta = "" if name in ("no-rules", "rule-alone") else f"{us - results['no-rules']:+.2f}"
        print(f"| {name} | {us:.2f} | {delta} |")
    print(f"\ncompile one expression (once per expression and process): {compile_us:.1f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
