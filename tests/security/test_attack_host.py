"""Attacks around the host-policy fixes (F2): app definitions the operating system refuses.

An app creator's ``mcp.args`` holding a NUL, or an ``mcp.env`` name holding ``=`` (allowed by
a prefix such as ``MYAPP_*``), passed the host policy; ``Popen`` then raised ``ValueError`` on
every initialize, which the gateway answered with a 500 "internal gateway error" and a
traceback in its log (the F10 class, with an app resource as the client input).  Such apps are
refused by the host, with the reason, like any other definition it will not run.
"""

from __future__ import annotations

from typing import Any

import pytest

from bastion.appservice.hostpolicy import HostPolicy
from bastion.config import DynamicAppsPolicy, StdioLimits
from bastion.resources import App
from tests.security.test_host import Host, host, pytestmark

__all__ = ["host", "pytestmark"]  # the fixture and skip marks of test_host


def _policy(**dynamic: Any) -> HostPolicy:
    return HostPolicy(
        DynamicAppsPolicy.model_validate(dynamic), StdioLimits(), trusted=lambda _: False, gateway_user="b"
    )


def _app(**mcp: Any) -> App:
    spec = {"command": "/usr/bin/srv", "run_as_host_user": "mcp", **mcp}
    return App.model_validate({"metadata": {"name": "dyn"}, "spec": {"mcp": spec}})


@pytest.mark.parametrize(
    ("mcp", "why"),
    [
        ({"env": {"MYAPP_A=1": "x"}}, "is not a variable name"),
        ({"env": {"MYAPP_A\u0000LD_PRELOAD": "x"}}, "is not a variable name"),
        ({"env": {"MYAPP_ A": "x"}}, "is not a variable name"),
        ({"env": {"MYAPP_A": "x\u0000y"}}, "NUL"),
        ({"args": ["-c", "x\u0000"]}, "NUL"),
    ],
)
def test_definitions_the_os_cannot_run_are_refused_by_the_policy(mcp: dict[str, Any], why: str) -> None:
    p = _policy(commands=["/usr/bin/srv"], run_as=["mcp"], env=["MYAPP_*"])
    assert p.refusal(_app(env={"MYAPP_A": "x"})) is None
    assert why in (p.refusal(_app(**mcp)) or "")


def test_an_app_with_a_nul_in_its_arguments_is_not_served_and_never_a_500(host: Host) -> None:
    record = host.shared / "nul-args.jsonl"
    spec = host.recorder_spec(record)
    spec["mcp"]["args"] = [*spec["mcp"]["args"], "x\u0000y"]
    host.create("nul-args", spec)
    assert "NUL" in host.refused("nul-args")
    r = host.initialize("alice", "nul-args")
    assert r.status_code == 404, r.text  # not served: no such app, not "internal gateway error"
    assert not record.exists()
    assert "app=nul-args" not in "\n".join(
        line for line in host.node.log.read_text().splitlines() if "Traceback" in line or "ERROR" in line
    )
