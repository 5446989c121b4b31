"""Event logs for Last-Event-ID resumption."""

from __future__ import annotations

import asyncio

from bastion.appservice.resume import EventLog, EventLogs


def test_ids_and_replay_after() -> None:
    log = EventLog("p1", keep=3)
    assert [log.append(x) for x in (b"a", b"b", b"c", b"d")] == [1, 2, 3, 4]
    assert log.event_id(2) == "p1.2"
    assert log.after(1) == [(2, b"b"), (3, b"c"), (4, b"d")]
    assert log.after(0) == [(2, b"b"), (3, b"c"), (4, b"d")]  # 1 fell out of the bounded log
    assert log.after(4) == []


async def test_changed_wakes_on_append_and_finish() -> None:
    log = EventLog("g1")
    fut = log.changed()
    assert not fut.done()
    log.append(b"x")
    await asyncio.wait_for(fut, 1)
    fut = log.changed()
    log.finish()
    await asyncio.wait_for(fut, 1)
    assert log.done


def test_find_only_own_streams() -> None:
    logs = EventLogs(max_streams=2)
    a, b = logs.new("p"), logs.new("g")
    assert logs.find(f"{a.stream_id}.7") == (a, 7)
    assert logs.find(f"{b.stream_id}.0") == (b, 0)
    assert logs.find("p99.1") is None
    assert logs.find("garbage") is None
    assert logs.find(f"{a.stream_id}.x") is None
    logs.new("p")  # evicts the oldest
    assert logs.find(f"{a.stream_id}.1") is None
