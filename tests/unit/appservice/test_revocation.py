"""AccessWatch: a change to a user or a role re-checks the live sessions; other changes do not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bastion.appservice.revocation import Access, AccessWatch, concerns_access
from bastion.backend import Item
from bastion.backend.sqlite import SQLiteBackend
from bastion.session.engine import ToolPolicy


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[SQLiteBackend]:
    b = await SQLiteBackend.open(tmp_path / "backend.db")
    try:
        yield b
    finally:
        await b.close()


async def nobody(user: str) -> ToolPolicy | None:
    return None


async def test_user_and_role_changes_recheck_sessions_and_others_do_not(backend: SQLiteBackend) -> None:
    checks: asyncio.Queue[Access] = asyncio.Queue()

    async def end(access: Access) -> None:
        checks.put_nowait(access)

    watch = AccessWatch(backend, nobody, end)
    watch.start()
    try:
        async with asyncio.timeout(10):
            assert await checks.get() is nobody  # one check on start: what changed before it
            await backend.put(Item(key="/roles/r", value=b"{}"))
            assert await checks.get() is nobody
            await backend.delete("/roles/r")
            await checks.get()
            await backend.put(Item(key="/users/u", value=b"{}"))
            await checks.get()
    finally:
        await watch.aclose()


@pytest.mark.parametrize(
    ("key", "concerns"),
    [
        ("/users/alice", True),
        ("/roles/mcp-user", True),
        ("/apps/x", False),
        ("/app_servers/h", False),
        ("/usersx", False),
        ("/tokens/t", False),
    ],
)
def test_only_users_and_roles_concern_access(key: str, concerns: bool) -> None:
    assert concerns_access(key) is concerns
