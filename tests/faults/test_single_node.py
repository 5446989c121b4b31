"""The fault suite on a single node with the default store: SQLite, no PostgreSQL, nothing joined.

One all-in-one `bastion start` serving server-everything over stdio, four users each calling
``echo`` through it; the node is SIGKILLed under that load and started again on its data
dir. Audit events are committed to the journal before a call is forwarded and outcomes are
appended after it (ADR 12), so after the restart every call answered OK is in the log exactly
once with its outcome (the journal is indexed again), and a call the crash cut off is
completed as "outcome unknown" by the node's own sweep (ADR 38), never left reading as a success.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.faults.harness import SHORT_UNKNOWN_OUTCOME, Load, check_audit, enrol, report
from tests.integration.conftest import Node, start_node, stop_node
from tests.integration.test_topology import app_config
from tests.peers import everything_cmd, requires_node_peers

pytestmark = requires_node_peers

USERS = ("u1", "u2", "u3", "u4")


def _start(root: Path) -> Node:
    return start_node(root, extra_config=app_config(everything_cmd("stdio")) + SHORT_UNKNOWN_OUTCOME)


def test_a_killed_sqlite_node_keeps_every_outcome_across_its_restart(tmp_path: Path) -> None:
    node = _start(tmp_path / "node")
    try:
        ca = tmp_path / "ca.pem"
        tokens = enrol(node, USERS, ca)
        with Load(ca, tokens.__getitem__, {u: [node] for u in USERS}, app="everything") as load:
            load.wait_for_calls(40)
            killed = time.monotonic()
            node.proc.kill()
            node.proc.wait(15)
            node = _start(tmp_path / "node")  # the same data dir; a new port
            for cl in load.clients.values():
                cl.via = [node]
            load.wait_for_recovery(USERS, killed)
            load.wait_for_calls(40)
        # No answer while it is down (0: refused, or cut off); its sessions died with it: 404.
        load.check_failures(USERS, {0, 404})
        report("single SQLite node killed and restarted", load, load.recovery(killed))
        check_audit(node, load)
    finally:
        stop_node(node)
