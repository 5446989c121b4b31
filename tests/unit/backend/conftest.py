"""Fixtures for the backend contract suite: one backend per implementation.

Every fixture here is parametrised over the implementations in ``BACKENDS``;
``test_contract.py`` must run unchanged against each, so nothing here may
hand a test an implementation-specific type.  To add one, add its name to
``BACKENDS`` and a branch to ``_open``.  Everything opened is closed at
teardown: warnings are errors, and an unclosed connection warns.

``postgres`` runs on the machine's PostgreSQL (``tests/pg.py``: started if
installed and stopped, skipped with the reason if there is none), in a fresh
database per test that is dropped afterwards; its tests carry the
``postgres`` mark (``-m "not postgres"`` leaves them out).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

import pytest

from bastion.backend import Backend
from bastion.backend.postgres import PostgresBackend
from bastion.backend.sqlite import SQLiteBackend
from tests.pg import fresh_database

BACKENDS = ["sqlite", "postgres"]
#: Implementations that need a server, marked so they can be deselected.
_MARKS = {"postgres": [pytest.mark.postgres]}

#: Short, so cross-instance watch tests finish quickly; still far below
#: the 5 s deadline those tests allow.
POLL_INTERVAL = 0.05


class ContractBackend(Backend, Protocol):
    """``Backend`` plus the housekeeping every implementation provides."""

    async def expire(self) -> int: ...

    async def compact(self) -> int: ...


class FakeClock:
    """A clock that moves only when told, so expiry is deterministic."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2030, 1, 1, tzinfo=UTC)

    def now(self) -> datetime:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)


class BackendFactory(Protocol):
    """Opens one more backend on the test's storage (the same storage every call)."""

    def __call__(
        self, *, poll_interval: float = ..., event_retention: int = ...
    ) -> Awaitable[ContractBackend]: ...


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def _open(
    kind: str, storage: Path | str, clock: FakeClock, poll_interval: float, event_retention: int
) -> ContractBackend:
    if kind == "sqlite":
        assert isinstance(storage, Path)
        # A subdirectory that does not exist yet, so open() must create it.
        return await SQLiteBackend.open(
            storage / "state" / "bastion.db",
            clock=clock,
            poll_interval=poll_interval,
            event_retention=event_retention,
        )
    if kind == "postgres":
        assert isinstance(storage, str)
        return await PostgresBackend.open(
            storage, clock=clock, poll_interval=poll_interval, event_retention=event_retention
        )
    raise ValueError(f"unknown backend {kind!r}")


@pytest.fixture(params=[pytest.param(kind, marks=_MARKS.get(kind, [])) for kind in BACKENDS])
async def backend_factory(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[BackendFactory]:
    """Opens backends on one shared storage per test (like separate processes)."""
    opened: list[ContractBackend] = []
    kind: str = request.param

    async with AsyncExitStack() as stack:
        # The test's storage: a directory, or a database made for this test alone.
        storage: Path | str = tmp_path
        if kind == "postgres":
            storage = await stack.enter_async_context(fresh_database())

        async def make(
            *, poll_interval: float = POLL_INTERVAL, event_retention: int = 100_000
        ) -> ContractBackend:
            backend = await _open(kind, storage, clock, poll_interval, event_retention)
            opened.append(backend)
            return backend

        yield make
        # Closed before the database is dropped.
        for backend in opened:
            await backend.close()


@pytest.fixture
async def backend(backend_factory: BackendFactory) -> ContractBackend:
    return await backend_factory()


@pytest.fixture
async def backend_pair(
    backend_factory: BackendFactory,
) -> tuple[ContractBackend, ContractBackend]:
    """Two independent instances on the same storage, as two processes would have."""
    return await backend_factory(), await backend_factory()
