"""`bastion proxy mcp` serves its own origin only (or requests without one)."""

from __future__ import annotations

import pytest

from bastion.client.local_proxy import own_origin


@pytest.mark.parametrize(
    "origin",
    ["http://127.0.0.1:4100", "http://localhost:4100", "http://[::1]:4100", "http://localhost:4100/"],
)
def test_own_origin_spellings(origin: str) -> None:
    assert own_origin(origin, 4100)


@pytest.mark.parametrize(
    "origin",
    [
        "http://localhost:8080",  # another local server's page
        "http://127.0.0.1",  # no port: port 80, not ours
        "https://localhost:4100",
        "http://localhost.evil.example:4100",
        "http://evil.example:4100",
        "http://user@localhost:4100",
        "null",
        "http://localhost:99999",
        "",
    ],
)
def test_foreign_origins(origin: str) -> None:
    assert not own_origin(origin, 4100)
