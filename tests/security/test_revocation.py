"""Revocation ends live sessions: a user who loses an app loses their open sessions of it at once.

Without it, a session nobody sends to keeps its upstream (a stdio child process) until the
idle reaper, 30 minutes later. The checks below send nothing on the revoked session until
its child is gone and its end event is written: what ends it is the role change itself,
not a request finding the roles changed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from tests.security.conftest import Gateway

NO_APPS = """\
kind: role
version: v1
metadata: {name: prod-only}
spec:
  allow:
    app_labels: {env: prod}
    mcp: {tools: ["*"]}
"""

DEADLINE = 15.0


def _children(pid: int) -> dict[int, str]:
    """Every live descendant of ``pid``, with its command line (from /proc)."""
    parents: dict[int, int] = {}
    cmdlines: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # it ended while we looked
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")".
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] == "Z":
            continue  # a zombie is gone, only not yet reaped
        parents[int(entry)] = int(fields[1])
        cmdlines[int(entry)] = cmd
    out: dict[int, str] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        for child, parent in parents.items():
            if parent == p and child not in out:
                out[child] = cmdlines[child]
                todo.append(child)
    return out


def _stdio_children(gateway: Gateway) -> set[int]:
    return {p for p, cmd in _children(gateway.node.proc.pid).items() if "recording_server" in cmd}


def _wait(what: str, ok: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not ok():
        assert time.monotonic() < deadline, f"{what} within {DEADLINE:.0f}s"
        time.sleep(0.05)  # polling for a condition, bounded by the deadline


def test_a_revoked_role_ends_the_open_stdio_session(gateway: Gateway, tmp_path: Path) -> None:
    node = gateway.node
    (tmp_path / "role.yaml").write_text(NO_APPS)
    node.cli("create", str(tmp_path / "role.yaml"), local=True)
    node.cli("users", "add", "carol", "--roles=echo-only", local=True)
    node.cli("users", "add", "dave", "--roles=echo-only", local=True)
    before = _stdio_children(gateway)
    with gateway.session("carol", "rec-stdio") as s:
        child = _stdio_children(gateway) - before
        assert child, "carol's stdio child was not found"
        r = s.post(b'{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"echo","arguments":{}}}')
        assert r.status_code == 200 and "result" in s.answer(r)
        kept = gateway.session("dave", "rec-stdio")

        node.cli("users", "update", "carol", "--roles=prod-only", local=True)

        # Nothing is sent on carol's session: the change alone ends it and its child process.
        def ended() -> bool:
            return bool(gateway.audit("--type=mcp.session.end", f"--session={s.id}"))

        _wait("carol's session did not end", ended)
        _wait("carol's stdio child did not exit", lambda: not child & _stdio_children(gateway))
        (end,) = gateway.audit("--type=mcp.session.end", f"--session={s.id}")
        assert end["user"] == "carol" and end["success"] is False
        assert end["error"].startswith("access to app 'rec-stdio' was revoked: "), end["error"]

        r = s.post(b'{"jsonrpc":"2.0","id":3,"method":"ping"}')
        assert r.status_code == 404, r.text

        # dave's session of the same app, still allowed, goes on.
        kept.sync()
        assert not gateway.audit("--type=mcp.session.end", f"--session={kept.id}")
        kept.close()


def test_a_deleted_user_loses_the_open_session(gateway: Gateway) -> None:
    node = gateway.node
    node.cli("users", "add", "erin", "--roles=echo-only", local=True)
    before = _stdio_children(gateway)
    with gateway.session("erin", "rec-stdio") as s:
        child = _stdio_children(gateway) - before
        assert child
        node.cli("users", "rm", "erin", local=True)
        _wait(
            "erin's session did not end",
            lambda: bool(gateway.audit("--type=mcp.session.end", f"--session={s.id}")),
        )
        _wait("erin's stdio child did not exit", lambda: not child & _stdio_children(gateway))
        (end,) = gateway.audit("--type=mcp.session.end", f"--session={s.id}")
        assert end["error"] == "access to app 'rec-stdio' was revoked: user \"erin\" no longer exists"
