"""Removed apps are remembered for a while, bounded, and forgotten when they come back."""

from __future__ import annotations

import pytest

from bastion import tombstones
from bastion.resources import App


def app(name: str) -> App:
    return App.model_validate({"metadata": {"name": name}, "spec": {"uri": "mcp+http://x.internal/mcp"}})


def test_a_removed_app_is_remembered_until_it_comes_back() -> None:
    r = tombstones.Removed()
    assert r.get("dyn") is None
    r.add(app("dyn"))
    got = r.get("dyn")
    assert got is not None and got.metadata.name == "dyn"
    r.forget("dyn")
    assert r.get("dyn") is None


def test_the_memory_is_bounded_and_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    r = tombstones.Removed()
    for i in range(300):
        r.add(app(f"a{i}"))
    assert r.get("a0") is None and r.get("a299") is not None  # the oldest are dropped first
    now = tombstones.time.monotonic()
    monkeypatch.setattr(tombstones.time, "monotonic", lambda: now + tombstones.REMEMBER_REMOVED + 1)
    assert r.get("a299") is None
