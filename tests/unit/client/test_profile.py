"""Profiles and pins on disk: where a profile came from is told in errors, never written."""

from __future__ import annotations

from pathlib import Path

import pytest

from bastion.client import profile as profiles


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BASTION_HOME", str(tmp_path / "bh"))
    return tmp_path / "bh"


def _prof(**kw: str) -> profiles.Profile:
    return profiles.Profile(
        proxy="p.example:3080",
        user="u",
        cluster_name="c",
        token="t",
        expires="2099-01-01T00:00:00+00:00",
        **kw,
    )


def test_a_loaded_profile_knows_its_file_and_does_not_write_it(home: Path) -> None:
    path = profiles.save(_prof(ca_pem="PEM"))
    loaded = profiles.load_current()
    assert loaded is not None and loaded.path == str(path)
    assert "path" not in path.read_text()
    trust = loaded.trust()
    assert (trust.ca_pem, trust.pinned_in, trust.insecure) == ("PEM", str(path), False)
    assert "log in again with --ca-fingerprint" in trust.hint
    assert loaded.trust(insecure=True).insecure


def test_an_identity_file_says_to_get_a_new_one(tmp_path: Path) -> None:
    f = tmp_path / "id.yaml"
    f.write_text(_prof(ca_pem="PEM", kind="identity").to_yaml())
    trust = profiles.load_identity(str(f)).trust()
    assert trust.pinned_in == str(f)
    assert "bastion auth sign" in trust.hint


def test_pin_repin_forget(home: Path) -> None:
    proxy = "p.example:3080"
    assert profiles.ca_pin_path(proxy) == home / "cas" / "p.example_3080.pem"
    assert profiles.pin_ca(proxy, "A") == ""
    assert profiles.pin_ca(proxy, "A") == ""  # the same CA: nothing replaced
    assert profiles.pin_ca(proxy, "B") == "A"
    assert profiles.pinned_ca(proxy) == "B"
    assert profiles.forget_ca(proxy) == home / "cas" / "p.example_3080.pem"
    assert profiles.forget_ca(proxy) is None
    assert profiles.pinned_ca(proxy) == ""


def test_home_defaults_to_dot_bastion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BASTION_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert profiles.ca_pin_path("h:1") == tmp_path / ".bastion" / "cas" / "h_1.pem"
