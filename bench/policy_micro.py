"""What pinned tool definitions (0045) and rate limits (0051) cost per ``tools/call``, engine alone.

Drives :class:`bastion.session.engine.Session` as the MCP handler does for one ``tools/call``
(``client_sent`` of the request, ``upstream_sent`` of its answer) and reports the best per-call
time of ``--repeat`` timeit runs, for:

- ``plain``: the ``mcp-user`` preset, no pins (the hot path of an app with ``pinning: off``);
- ``pinned``: ``pinning: first_use``, ``echo`` pinned and listed unchanged in the session
  (two dict lookups per call: the session's listing and the cluster's changes);
- ``limit-other-tool``: a role with a rate limit on another tool (the call looks up its limits,
  finds none, and goes on without a draw);
- ``limited``: a rate limit on ``echo``, the draw answered at once in memory (the engine's and
  executor's share; a real draw adds one database statement).

    .venv/bin/python bench/policy_micro.py [--calls 20000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import orjson
from rules_micro import APP, IDENT, Clock, time_calls

from bastion.policy import AccessChecker, preset_roles
from bastion.policy.pins import NO_PINS, AppPins, Pin, PinMode
from bastion.resources import Role
from bastion.session.engine import Session

ECHO = {"name": "echo", "description": "Echoes back the input", "inputSchema": {"type": "object"}}


class View:
    mode: PinMode = "first_use"

    def __init__(self, pins: AppPins) -> None:
        self.pins = pins

    def current(self) -> AppPins:
        return self.pins


def limit_role(tool: str) -> Role:
    limit = {"tools": [tool], "per_user": "1000000/s", "burst": 1000}
    return Role.model_validate(
        {"metadata": {"name": "bench-limit"}, "spec": {"allow": {"mcp": {"rate_limits": [limit]}}}}
    )


def per_call(pins: View | None, calls: int, repeat: int, limit: str = "") -> float:
    presets = {r.metadata.name: r for r in preset_roles()}
    roles = [presets["mcp-user"], limit_role(limit)] if limit else [presets["mcp-user"]]
    checker = AccessChecker(roles, {})
    s = Session(
        app=APP,
        checker=checker,
        identity=IDENT,
        session_id="s",
        cluster_name="bench",
        transport="http",
        clock=Clock(),
        pins=pins,
    )
    s.client_sent(b'{"jsonrpc":"2.0","id":0,"method":"initialize","params":{}}')
    s.upstream_sent(b'{"jsonrpc":"2.0","id":0,"result":{}}')
    s.client_sent(b'{"jsonrpc":"2.0","id":"l","method":"tools/list"}')
    s.upstream_sent(orjson.dumps({"jsonrpc": "2.0", "id": "l", "result": {"tools": [ECHO]}}))
    return time_calls(s, calls, repeat)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    pinned = NO_PINS.merged([Pin.of(ECHO)], [], "t")
    assert pinned is not None
    variants: dict[str, Any] = {
        "plain": (None, ""),
        "pinned": (View(pinned), ""),
        "limit-other-tool": (None, "other"),
        "limited": (None, "echo"),
    }
    results = {name: per_call(v, args.calls, args.repeat, lim) for name, (v, lim) in variants.items()}
    print(f"| variant | µs per call (best of {args.repeat}) | vs plain |")
    print("|---|---|---|")
    for name, us in results.items():
        delta = "" if name == "plain" else f"{us - results['plain']:+.2f}"
        print(f"| {name} | {us:.2f} | {delta} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
