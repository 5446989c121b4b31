"""Upstream HTTP client benchmark: bastion's HTTPUpstreamPool vs httpx (vs aiohttp if installed).

Not a test.  Starts a minimal upstream — a raw asyncio protocol on httptools echoing the
request body, the lowest floor Python offers — in a subprocess pinned to core 1, pins
itself to core 0, then for each client sends ``--requests`` POSTs of a ~200-byte
JSON-RPC ``tools/call`` at ``--concurrency`` and prints req/s (wall clock) and client CPU
µs per request (``time.process_time()`` / requests).  The client is CPU-bound, so req/s
≈ 1e6 / (µs per request).  Clients run interleaved, ``--repeat`` times; medians printed.

    .venv/bin/python bench/http_client_bench.py [--requests 10000] [--concurrency 16]
                                                [--repeat 3] [--loop uvloop|asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Awaitable, Callable
from typing import Any

BODY = (
    b'{"jsonrpc":"2.0","id":12345,"method":"tools/call","params":{"name":"search_documents",'
    b'"arguments":{"query":"quarterly revenue by region","limit":10,"include_archived":false},'
    b'"_meta":{"progressToken":"p-77"}}}'
)
PATH = "/mcp"
HEADERS = [
    (b"content-type", b"application/json"),
    (b"accept", b"application/json, text/event-stream"),
    (b"mcp-session-id", b"3f1c1d0e6a6b4d3c9b0a8e7f6d5c4b3a"),
]

# ----------------------------------------------------------------- the upstream


def serve() -> None:
    """Child process: echo server on 127.0.0.1:0; prints its port, serves until terminated."""
    import httptools

    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})

    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"

    class Echo(asyncio.Protocol):
        def __init__(self) -> None:
            self.parser = httptools.HttpRequestParser(self)
            self.body: list[bytes] = []
            self.transport: Any = None

        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_body(self, body: bytes) -> None:
            self.body.append(body)

        def on_message_complete(self) -> None:
            body = b"".join(self.body)
            self.body.clear()
            self.transport.write(head % len(body) + body)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", 0, backlog=1024)
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()  # until the parent terminates us

    _run(main(), "uvloop")


# ----------------------------------------------------------------- the clients

Send = Callable[[], Awaitable[bytes]]


async def bastion_client(url: str, concurrency: int) -> tuple[Send, Callable[[], Awaitable[None]]]:
    from bastion.transport.http import HTTPUpstreamPool

    pool = HTTPUpstreamPool(url, max_connections=concurrency)

    async def send() -> bytes:
        resp = await pool.request("POST", PATH, HEADERS, BODY)
        return await resp.read()

    return send, pool.aclose


# Without sniffio (anyio 4.16 stopped depending on it) httpcore retries the failing
# ``import sniffio`` on every request, a sys.path search costing milliseconds.  httpx is
# measured as installed, and (if sniffio is missing) again with a stand-in module in
# sys.modules — nothing installed — to show httpx as it performs where sniffio is present.
_SNIFFIO_MISSING = importlib.util.find_spec("sniffio") is None
_SNIFFIO_STUB = types.ModuleType("sniffio")
_SNIFFIO_STUB.current_async_library = lambda: "asyncio"  # type: ignore[attr-defined]


async def _httpx(
    url: str, concurrency: int, sniffio_stub: bool
) -> tuple[Send, Callable[[], Awaitable[None]]]:
    import httpx

    if _SNIFFIO_MISSING:
        if sniffio_stub:
            sys.modules["sniffio"] = _SNIFFIO_STUB
        else:
            sys.modules.pop("sniffio", None)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    client = httpx.AsyncClient(base_url=url, limits=limits)
    headers = [(k.decode(), v.decode()) for k, v in HEADERS]

    async def send() -> bytes:
        resp = await client.post(PATH, content=BODY, headers=headers)
        return resp.content

    return send, client.aclose


async def httpx_client(url: str, concurrency: int) -> tuple[Send, Callable[[], Awaitable[None]]]:
    return await _httpx(url, concurrency, sniffio_stub=False)


async def httpx_stub_client(url: str, concurrency: int) -> tuple[Send, Callable[[], Awaitable[None]]]:
    return await _httpx(url, concurrency, sniffio_stub=True)


async def aiohttp_client(url: str, concurrency: int) -> tuple[Send, Callable[[], Awaitable[None]]]:
    import aiohttp  # type: ignore[import-not-found,unused-ignore]

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency))
    headers = {k.decode(): v.decode() for k, v in HEADERS}
    target = url + PATH

    async def send() -> bytes:
        async with session.post(target, data=BODY, headers=headers) as resp:
            data: bytes = await resp.read()
            return data

    return send, session.close


CLIENTS: dict[str, Callable[[str, int], Awaitable[tuple[Send, Callable[[], Awaitable[None]]]]]] = {
    "bastion HTTPUpstreamPool": bastion_client,
    "httpx.AsyncClient": httpx_client,
}
if _SNIFFIO_MISSING:
    CLIENTS["httpx + sniffio stand-in"] = httpx_stub_client
if importlib.util.find_spec("aiohttp") is not None:
    CLIENTS["aiohttp.ClientSession"] = aiohttp_client


async def measure(
    make: Callable[[str, int], Awaitable[tuple[Send, Callable[[], Awaitable[None]]]]],
    url: str,
    requests: int,
    concurrency: int,
) -> tuple[float, float]:
    """(requests per wall second, client CPU µs per request)."""
    send, close = await make(url, concurrency)
    try:
        left = 0

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                data = await send()
                if data != BODY:
                    raise AssertionError(f"bad echo: {data[:80]!r}")

        left = min(1000, requests)  # warm-up: connections open, caches hot
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        left = requests
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    finally:
        await close()
    return requests / wall, cpu / requests * 1e6


def _run(coro: Awaitable[Any], loop: str) -> Any:
    if loop == "uvloop" and importlib.util.find_spec("uvloop") is not None:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)  # type: ignore[arg-type]
    return asyncio.run(coro)  # type: ignore[arg-type]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    ap.add_argument("--only", default="", help="run only clients whose name contains this")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve()
        return

    for name in [n for n in CLIENTS if args.only.lower() not in n.lower()]:
        del CLIENTS[name]
    pinned = hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1
    child = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        url = f"http://127.0.0.1:{port}"
        if pinned:
            os.sched_setaffinity(0, {0})
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in CLIENTS}
        for _ in range(args.repeat):
            for name, make in CLIENTS.items():  # interleaved: drift on a shared host hits all
                results[name].append(_run(measure(make, url, args.requests, args.concurrency), args.loop))
    finally:
        child.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=10)
        if child.poll() is None:
            child.kill()

    print(
        f"{args.requests} POSTs of {len(BODY)} B at concurrency {args.concurrency}, loop={args.loop}, "
        f"client pinned to core 0 and upstream to core 1: {'yes' if pinned else 'no (single CPU)'}; "
        f"median of {args.repeat}"
    )
    print(f"{'client':<26} {'req/s':>10} {'CPU µs/req':>11} {'vs first':>8}")
    first = next(iter(results.values()))
    base = statistics.median(cpu for _, cpu in first)
    for name, runs in results.items():
        rps = statistics.median(r for r, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        print(f"{name:<26} {rps:>10,.0f} {cpu:>11.1f} {cpu / base:>7.1f}x")
    if "aiohttp.ClientSession" not in CLIENTS:
        print("(aiohttp not installed: skipped)")


if __name__ == "__main__":
    main()
