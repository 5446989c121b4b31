"""An app name is one app: what the proxy accepts from a joined host's heartbeat."""

from __future__ import annotations

from typing import Any

from bastion.auth.scope import HostScope
from bastion.resources import App
from bastion.tunnel.admission import Authorities, admit


def _app(name: str, uri: str = "mcp+http://10.0.0.1/mcp", revision: int | None = None, **labels: str) -> App:
    meta: dict[str, Any] = {"name": name, "labels": labels}
    if revision is not None:
        meta["revision"] = revision
    return App.model_validate({"metadata": meta, "spec": {"uri": uri}})


NONE = Authorities({}, {}, {})


def test_new_names_are_accepted() -> None:
    accepted, refused = admit([_app("a"), _app("b")], HostScope(), NONE)
    assert set(accepted) == {"a", "b"} and refused == []


def test_a_different_definition_under_a_static_name_is_refused() -> None:
    known = Authorities({"logger": _app("logger", "mcp+http://10.0.0.1/log")}, {}, {})
    accepted, refused = admit([_app("logger", "mcp+http://evil/log")], HostScope(), known)
    assert accepted == {}
    assert refused[0].alarm and "proxy's own app service" in refused[0].reason


def test_a_relabelled_copy_of_an_app_resource_is_refused() -> None:
    known = Authorities({}, {"db": _app("db", revision=5, env="prod")}, {})
    accepted, refused = admit([_app("db", env="dev")], HostScope(), known)
    assert accepted == {} and "app resource" in refused[0].reason


def test_the_same_definition_from_several_hosts_is_fine() -> None:
    resource = _app("db", revision=5, env="prod")
    known = Authorities({}, {"db": resource}, {"db": resource})
    accepted, refused = admit([_app("db", revision=5, env="prod")], HostScope(), known)
    assert set(accepted) == {"db"} and refused == []


def test_a_host_catching_up_is_skipped_without_an_alarm() -> None:
    known = Authorities({}, {"db": _app("db", uri="mcp+http://new/mcp", revision=9)}, {})
    accepted, refused = admit([_app("db", revision=5)], HostScope(), known)
    assert accepted == {} and not refused[0].alarm


def test_the_first_host_owns_a_name_no_resource_has() -> None:
    known = Authorities({}, {}, {"tool": _app("tool", "mcp+http://first/mcp")})
    _, refused = admit([_app("tool", "mcp+http://second/mcp")], HostScope(), known)
    assert "another host" in refused[0].reason


def test_scope_is_checked_first() -> None:
    scope = HostScope.of(["a"], {"env": ["dev"]})
    accepted, refused = admit(
        [_app("a", env="dev"), _app("a2", env="dev"), _app("x", env="prod")], scope, NONE
    )
    assert set(accepted) == {"a"}
    assert {r.app for r in refused} == {"a2", "x"} and all(r.alarm for r in refused)
