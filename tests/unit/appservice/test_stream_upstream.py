"""Routing of what a message-stream upstream sends: to the waiting POST, else the GET stream."""

from __future__ import annotations

import asyncio

from bastion.appservice.stream_upstream import StreamUpstream
from bastion.session.engine import SendToClient

NOTE = b'{"jsonrpc":"2.0","method":"notifications/progress","params":{"progress":1}}'


class Stream:
    upstream_session_id = ""

    async def send(self, raw: bytes) -> None:
        raise AssertionError("not used here")

    async def receive(self) -> bytes:
        raise AssertionError("not used here")

    async def aclose(self) -> None:
        return None


def upstream() -> StreamUpstream:
    return StreamUpstream(Stream(), None, response_timeout=1.0)  # type: ignore[arg-type]


def waiting(up: StreamUpstream, rid: int) -> asyncio.Queue[bytes | None]:
    q: asyncio.Queue[bytes | None] = asyncio.Queue()
    up.pending[rid] = q
    up.order.append(rid)
    return q


async def test_an_answer_goes_to_the_post_that_waits_for_its_id() -> None:
    up = upstream()
    one, two = waiting(up, 1), waiting(up, 2)
    up.to_client(SendToClient(b'{"jsonrpc":"2.0","id":1,"result":{}}', 1))
    assert one.get_nowait() == b'{"jsonrpc":"2.0","id":1,"result":{}}'
    assert two.empty()


async def test_a_notification_goes_to_the_newest_waiting_post_else_the_get_stream() -> None:
    up = upstream()
    older, newer = waiting(up, 1), waiting(up, 2)
    up.to_client(SendToClient(NOTE))
    assert newer.get_nowait() == NOTE and older.empty()
    up.pending.clear()
    up.order.clear()
    up.to_client(SendToClient(NOTE))
    assert up.get_log is not None
    assert [raw for _, raw in up.get_log.after(0)] == [NOTE]  # kept for the current or next GET


async def test_stop_wakes_every_waiting_post_and_ends_the_get_stream() -> None:
    up = upstream()
    q = waiting(up, 1)
    up.to_client(SendToClient(NOTE, None))  # to the POST
    up.pending.clear()
    up.to_client(SendToClient(NOTE))  # to the GET log
    up.pending[1] = q
    await up.stop(None)  # type: ignore[arg-type]
    assert q.get_nowait() == NOTE
    assert q.get_nowait() is None  # woken: the session is ending
    assert up.get_log is not None and up.get_log.done
