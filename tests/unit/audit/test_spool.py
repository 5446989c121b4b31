"""The audit spool over a real PostgreSQL and a real outage (a TCP hop that is cut)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bastion.audit.pg_store import PostgresAuditStore
from bastion.audit.spool import SpoolingAuditStore
from bastion.audit.store import AuditQuery, Completion
from tests.pg import TcpProxy, fresh_database
from tests.unit.audit.test_store import make_event

pytestmark = pytest.mark.postgres

DEADLINE = 10.0


@pytest.fixture
async def dsn() -> AsyncIterator[str]:
    async with fresh_database() as database:
        yield database


async def _spooling(proxy: TcpProxy, dsn: str, tmp_path: Path) -> SpoolingAuditStore:
    return SpoolingAuditStore(
        await PostgresAuditStore.open(proxy.dsn(dsn)),
        tmp_path / "spool.db",
        write_timeout=1.0,
        retry_min=0.05,
    )


async def _until_drained(s: SpoolingAuditStore) -> None:
    async with asyncio.timeout(DEADLINE):
        await s.wait_drained()


async def test_outage_spools_then_drains_once_in_order(dsn: str, tmp_path: Path) -> None:
    async with TcpProxy.for_dsn(dsn) as proxy:
        s = await _spooling(proxy, dsn, tmp_path)
        try:
            before = make_event()
            await s.insert_many([before])
            assert s.spooled == 0
            await proxy.cut()
            during = [make_event() for _ in range(5)]
            for e in during:
                await s.insert_many([e])  # "committed": on the local disk
            await s.complete_many([Completion(during[0].id, False, "upstream gone", 2.0)])
            assert s.spooled == 6
            # The same batch written again (a retry whose answer was lost) doubles nothing.
            await s.insert_many([during[1]])
            await proxy.restore()
            await _until_drained(s)
            got = await s.search(AuditQuery())
            ids = [g["id"] for g in got]
            assert sorted(ids) == sorted([before.id, *(e.id for e in during)])
            first = next(g for g in got if g["id"] == during[0].id)
            assert (first["success"], first["error"]) == (False, "upstream gone")
            # Straight to the database again.
            after = make_event()
            await s.insert_many([after])
            assert s.spooled == 0
        finally:
            await s.close()


async def test_backlog_survives_a_restart(dsn: str, tmp_path: Path) -> None:
    async with TcpProxy.for_dsn(dsn) as proxy:
        spool = tmp_path / "spool.db"
        s = SpoolingAuditStore(
            await PostgresAuditStore.open(proxy.dsn(dsn)), spool, write_timeout=0.5, retry_min=0.05
        )
        await proxy.cut()
        kept = make_event()
        await s.insert_many([kept])
        assert s.spooled == 1
        s.write_timeout = 0.1
        await s.close()  # the database is still away: the event stays on disk
        await proxy.restore()
        again = SpoolingAuditStore(await PostgresAuditStore.open(proxy.dsn(dsn)), spool, retry_min=0.05)
        try:
            assert again.spooled == 1
            again.start()
            await _until_drained(again)
            assert [g["id"] for g in await again.search(AuditQuery())] == [kept.id]
        finally:
            await again.close()


async def test_write_batch_is_one_transaction_here_or_in_the_spool(dsn: str, tmp_path: Path) -> None:
    async with TcpProxy.for_dsn(dsn) as proxy:
        s = await _spooling(proxy, dsn, tmp_path)
        try:
            first, second = make_event(), make_event()
            await s.insert_many([first])
            await s.write_batch([second], [Completion(first.id, True, "", 1.0)])  # straight through
            assert s.spooled == 0
            await proxy.cut()
            third = make_event()
            await s.write_batch([third], [Completion(second.id, False, "cut", 2.0)])
            assert s.spooled == 2  # the inserts, then the outcomes: in that order
            await proxy.restore()
            await _until_drained(s)
            got = {g["id"]: g for g in await s.search(AuditQuery())}
            assert list(got) == [first.id, second.id, third.id]
            assert got[first.id]["duration_ms"] == 1.0
            assert (got[second.id]["success"], got[second.id]["error"]) == (False, "cut")
        finally:
            await s.close()
