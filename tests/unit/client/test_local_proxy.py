"""`bastion proxy mcp`: its own origin only (or requests without one); streams end, never break."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bastion.client.local_proxy import LocalMCPProxy, own_origin
from bastion.errors import UpstreamError


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


# ------------------------------------------------------------------ streams: ended, cut, stopped


class FakeStream:
    """An SSE response body: the chunks given, then an end, an error, or nothing (waits)."""

    def __init__(self, chunks: list[bytes], then: Exception | None = None, *, hang: bool = False) -> None:
        self.chunks, self.then, self.hang = chunks, then, hang
        self.reading = asyncio.Event()

    async def _gen(self) -> AsyncIterator[bytes]:
        for c in self.chunks:
            yield c
        if self.then is not None:
            raise self.then
        if self.hang:
            self.reading.set()
            await asyncio.Event().wait()

    def iter_chunks(self) -> AsyncIterator[bytes]:
        return self._gen()


def _proxy() -> LocalMCPProxy:
    p = LocalMCPProxy.__new__(LocalMCPProxy)  # no pool, no credential: only the relay is used
    p.app_name = "files"
    p.closing = asyncio.Event()
    return p


async def _relay(p: LocalMCPProxy, stream: FakeStream) -> list[Any]:
    sent: list[Any] = []

    async def send(msg: Any) -> None:
        sent.append(msg)

    await p._relay(stream, send)  # type: ignore[arg-type]
    return [m["body"] for m in sent]


async def test_a_stream_is_passed_on_as_it_comes() -> None:
    assert await _relay(_proxy(), FakeStream([b"a", b"b"])) == [b"a", b"b"]


async def test_a_stream_the_cluster_cuts_ends_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    cut = UpstreamError("upstream https://p:1 closed the connection mid-response")
    with caplog.at_level(logging.WARNING, logger="bastion.client.proxy"):
        assert await _relay(_proxy(), FakeStream([b"a"], cut)) == [b"a"]
    assert [r.getMessage() for r in caplog.records] == [
        "the cluster cut a stream of files: upstream https://p:1 closed the connection mid-response"
    ]


async def test_stopping_ends_open_streams() -> None:
    p, stream = _proxy(), FakeStream([b"a"], hang=True)
    relay = asyncio.create_task(_relay(p, stream))
    async with asyncio.timeout(10):
        await stream.reading.wait()
        p.stop()
        assert await relay == [b"a"]
