"""``bastion.identity``: a value type the pure core can name without loading the credential code."""

from __future__ import annotations

import json
import subprocess
import sys

from bastion.auth import credentials
from bastion.identity import Identity


def _loaded_after_import(module: str) -> set[str]:
    """The modules a fresh interpreter has loaded after ``import module``."""
    code = f"import sys, {module}; print(__import__('json').dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    return set(json.loads(out.stdout))


def test_the_old_name_is_the_same_type() -> None:
    assert credentials.Identity is Identity


def test_identity_imports_nothing_else_of_the_project() -> None:
    loaded = _loaded_after_import("bastion.identity")
    assert {m for m in loaded if m.startswith("bastion.")} == {"bastion.identity"}


def test_the_session_engine_loads_no_credential_storage_or_crypto_code() -> None:
    loaded = _loaded_after_import("bastion.session.engine")
    heavy = {"jwt", "cryptography", "bastion.auth", "bastion.auth.credentials", "bastion.backend"}
    assert not heavy & loaded
