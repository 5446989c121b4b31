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


async def test_a_request_reusing_an_id_just_answered_gets_its_own_answer() -> None:
    up = upstream()
    old = waiting(up, 1)
    up.to_client(SendToClient(b'{"jsonrpc":"2.0","id":1,"result":"first"}', 1))  # the first answer
    new = waiting(up, 1)  # the client reuses id 1 before the first POST has finished
    up.to_client(SendToClient(b'{"jsonrpc":"2.0","id":1,"result":"second"}', 1))
    assert old.get_nowait() == b'{"jsonrpc":"2.0","id":1,"result":"first"}' and old.empty()
    assert new.get_nowait() == b'{"jsonrpc":"2.0","id":1,"result":"second"}'


async def test_exchange_waits_for_its_own_answer_while_an_earlier_post_with_its_id_finishes() -> None:
    from bastion.answers import Answer
    from bastion.appservice.sessions import GatewaySession
    from bastion.appservice.upstream import ClientPost
    from bastion.metrics import app_metrics
    from bastion.protocol.jsonrpc import parse_message
    from bastion.resources import App
    from bastion.session.engine import ForwardToUpstream

    sent: list[bytes] = []
    sent_one, sent_two, writing = asyncio.Event(), asyncio.Event(), asyncio.Event()

    class Recorder(Stream):
        async def send(self, raw: bytes) -> None:
            sent.append(raw)
            (sent_one if len(sent) == 1 else sent_two).set()

    up = StreamUpstream(Recorder(), None, response_timeout=5.0)  # type: ignore[arg-type]
    app = App.model_validate({"metadata": {"name": "files"}, "spec": {"uri": "mcp+http://x.internal/mcp"}})
    s = GatewaySession(
        id="s",
        user="u",
        app=app,
        engine=None,
        ident=None,
        m=app_metrics("files", "stdio"),
        upstream=up,  # type: ignore[arg-type]
    )
    call = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'
    fwd = ForwardToUpstream(call, parse_message(call))
    release = asyncio.Event()
    first_out: list[dict[str, object]] = []
    second_out: list[dict[str, object]] = []

    async def slow_client(m: dict[str, object]) -> None:  # the first POST's client reads slowly
        first_out.append(m)
        writing.set()
        await release.wait()

    async def client(m: dict[str, object]) -> None:
        second_out.append(m)

    first = asyncio.create_task(up.exchange(s, fwd, Answer(slow_client), ClientPost({})))
    await asyncio.wait_for(sent_one.wait(), 5)
    up.to_client(SendToClient(b'{"jsonrpc":"2.0","id":1,"result":{}}', 1))
    await asyncio.wait_for(writing.wait(), 5)  # the first POST writes its answer, its id still registered
    second = asyncio.create_task(up.exchange(s, fwd, Answer(client), ClientPost({})))
    await asyncio.wait_for(sent_two.wait(), 5)
    up.to_client(SendToClient(b'{"jsonrpc":"2.0","id":1,"result":{"again":true}}', 1))
    await asyncio.wait_for(second, 5)
    assert second_out[0]["status"] == 200  # not a 202 with the answer lost
    assert second_out[1]["body"] == b'{"jsonrpc":"2.0","id":1,"result":{"again":true}}'
    release.set()
    await asyncio.wait_for(first, 5)


async def test_an_answer_held_for_its_outcome_commit_is_not_overtaken() -> None:
    """Decision 0040: the reader hands an answer over with its outcome's commit; the answer and
    everything after it wait for that commit, in order, while the reader goes on."""
    up = upstream()
    q = waiting(up, 1)
    commit: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    answer = b'{"jsonrpc":"2.0","id":1,"result":{}}'
    up.to_client_after(commit, SendToClient(answer, 1))
    up.to_client(SendToClient(NOTE, 1))
    assert q.empty()  # nothing before the outcome is durable
    commit.set_result(None)
    await asyncio.sleep(0)  # the commit's callbacks run on the loop
    assert [q.get_nowait(), q.get_nowait()] == [answer, NOTE]
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    done.set_result(None)
    up.to_client_after(done, SendToClient(NOTE, 1))  # already durable: delivered at once
    assert q.get_nowait() == NOTE


async def test_a_failed_commit_still_delivers_the_answer() -> None:
    up = upstream()
    q = waiting(up, 1)
    commit: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    up.to_client_after(commit, SendToClient(b"{}", 1))
    commit.set_exception(RuntimeError("disk full"))
    commit.exception()  # retrieved (the executor logs it)
    await asyncio.sleep(0)
    assert q.get_nowait() == b"{}"
