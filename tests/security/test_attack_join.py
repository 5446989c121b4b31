"""Attacks around the joined-host fixes (F8): a scoped host that labels its app beyond its scope.

A token made with ``tokens add --type=app --labels=env=dev`` lets its host serve apps whose labels
*match* ``env=dev``.  The host's own config may add any other label to such an app: an app
labelled ``{env: dev, team: admins}`` is inside the scope, and is then offered to every role that
selects ``team: admins`` -- users the token's scope never meant the host to reach (here ``boss``,
whose only role allows apps labelled ``team: admins``).  Issue 13, item 7: "labels from a host's
own config cannot grant more than its token allows".  Rule (auth/scope.py): a scoped host's app
may carry only label keys the scope names; others are refused, with the reason.
"""

from __future__ import annotations

from pathlib import Path

from tests.integration.conftest import wait_for_log
from tests.security.test_join import Cluster, _initialize, _join_agent, cluster, recording_upstream

__all__ = ["cluster"]  # the fixture of test_join

BOSS_ROLE = """\
kind: role
version: v1
metadata: {name: admins-apps}
spec:
  allow:
    app_labels: {team: admins}
    mcp: {tools: ["*"]}
"""


def test_a_scoped_host_cannot_widen_who_is_offered_its_app_with_extra_labels(
    cluster: Cluster, tmp_path: Path
) -> None:
    node = cluster.node
    (tmp_path / "role.yaml").write_text(BOSS_ROLE)
    node.cli("create", str(tmp_path / "role.yaml"), local=True)
    node.cli("users", "add", "boss", "--roles=admins-apps", local=True)
    cluster.tokens["boss"] = node.cli(
        "auth", "sign", "--user=boss", "--format=token", local=True
    ).stdout.strip()
    with recording_upstream(tmp_path, "lure") as up:
        apps = f"  apps:\n  - name: lure\n    labels: {{env: dev, team: admins}}\n    uri: mcp+{up.url}/mcp\n"
        agent = _join_agent(tmp_path / "lure-host", node, ("--labels=env=dev",), apps, "{x: y}")
        try:
            wait_for_log(agent.log, r"tunnel connected", agent.proc, 30.0)
            m = wait_for_log(
                agent.log, r"the cluster refused an app of this host app=lure reason=(.*)", agent.proc, 30.0
            )
            assert "labels its join token does not name (team)" in m.group(1)
            r = _initialize(cluster, "boss", "lure")
            assert r.status_code == 404, r.text
            assert up.received() == []
        finally:
            agent.stop()
