"""What pinned tool definitions (decision 0045) cost per ``tools/call``, in the engine alone.

Drives :class:`bastion.session.engine.Session` as the MCP handler does for one ``tools/call``
(``client_sent`` of the request, ``upstream_sent`` of its answer) and reports the best per-call
time of ``--repeat`` timeit runs, for:

- ``plain``: the ``mcp-user`` preset, no pins (the hot path of an app with ``pinning: off``);
- ``pinned``: ``pinning: first_use``, ``echo`` pinned and listed unchanged in the session
  (two dict lookups per call: the session's listing and the cluster's changes).

    .venv/bin/python bench/policy_micro.py [--calls 20000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import orjson
from rules_micro import APP, IDENT, Clock

from bastion.policy import AccessChecker, preset_roles
from bastion.policy.pins import NO_PINS, AppPins, Pin, PinMode
from bastion.session.engine import Session

ECHO = {"name": "echo", "description": "Echoes back the input", "inputSchema": {"type": "object"}}


class View:
    mode: PinMode = "first_use"

    def __init__(self, pins: AppPins) -> None:
        self.pins = pins

    def current(self) -> AppPins:
        return self.pins


def per_call(pins: View | None, calls: int, repeat: int) -> float:
    presets = {r.metadata.name: r for r in preset_roles()}
    checker = AccessChecker([presets["mcp-user"]], {})
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
    answer = b'{"jsonrpc":"2.0","id":%d,"result":{"content":[{"type":"text","text":"hello from wrk"}]}}'
    request = (
        b'{"jsonrpc":"2.0","id":%d,"method":"tools/call",'
        b'"params":{"name":"echo","arguments":{"message":"hello from wrk"}}}'
    )
    n = [0]

    def one() -> None:
        n[0] += 1
        i = n[0]
        s.client_sent(request % i)
        s.upstream_sent(answer % i)

    return min(timeit.repeat(one, number=calls, repeat=repeat)) / calls * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    pinned = NO_PINS.merged([Pin.of(ECHO)], [], "t")
    assert pinned is not None
    variants: dict[str, Any] = {"plain": None, "pinned": View(pinned)}
    results = {name: per_call(v, args.calls, args.repeat) for name, v in variants.items()}
    print(f"| variant | µs per call (best of {args.repeat}) | vs plain |")
    print("|---|---|---|")
    for name, us in results.items():
        delta = "" if name == "plain" else f"{us - results['plain']:+.2f}"
        print(f"| {name} | {us:.2f} | {delta} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
