"""The tunnel stream multiplexer, over real loopback sockets (plain TCP and mutual TLS).

Two ``Mux`` ends talk to each other, or one ``Mux`` talks to a raw socket the test drives
frame by frame (protocol errors, credit violations, a silent peer).  Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bastion.tunnel.mux import (
    DATA,
    END,
    FRAME_HEADER,
    GOAWAY,
    OPEN,
    PING,
    PONG,
    RESET,
    WINDOW,
    Mux,
    Stream,
    StreamReset,
    TunnelClosed,
)

Handler = Callable[[Stream], Awaitable[None]]
KiB = 1024
MiB = 1024 * 1024


# ------------------------------------------------------------------ helpers


async def until(cond: Callable[[], bool], within: float = 1.0) -> None:
    """Poll ``cond`` until it holds, failing after ``within`` seconds."""
    async with asyncio.timeout(within):
        while not cond():  # noqa: ASYNC110 - polling internal state with a deadline is the point
            await asyncio.sleep(0.002)


async def read_all(stream: Stream) -> bytes:
    parts: list[bytes] = []
    while (chunk := await stream.recv()) is not None:
        parts.append(chunk)
    return b"".join(parts)


async def echo(stream: Stream) -> None:
    while (chunk := await stream.recv()) is not None:
        await stream.send(chunk)
    await stream.end()


async def digest_reply(stream: Stream) -> None:
    """Read everything, answer with its sha256 and the largest chunk seen."""
    h = hashlib.sha256()
    biggest = 0
    while (chunk := await stream.recv()) is not None:
        h.update(chunk)
        biggest = max(biggest, len(chunk))
    await stream.send(f"{h.hexdigest()} {biggest}".encode())


def buffered(stream: Stream) -> int:
    return sum(len(c) for c in stream._rbuf)


def frame(ftype: int, sid: int, payload: bytes = b"") -> bytes:
    return FRAME_HEADER.pack(ftype, sid, len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    ftype, sid, n = FRAME_HEADER.unpack(await reader.readexactly(FRAME_HEADER.size))
    return ftype, sid, await reader.readexactly(n)


async def next_frame(reader: asyncio.StreamReader, ftype: int, within: float = 1.0) -> tuple[int, bytes]:
    """The next frame of type ``ftype`` (others, such as PINGs, are skipped)."""
    async with asyncio.timeout(within):
        while True:
            t, sid, payload = await read_frame(reader)
            if t == ftype:
                return sid, payload


Pipe = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def tcp_pair(
    tls: tuple[ssl.SSLContext, ssl.SSLContext] | None = None,
) -> AsyncIterator[tuple[Pipe, Pipe]]:
    """A connected (client, server) pair of asyncio streams over loopback."""
    accepted: asyncio.Future[Pipe] = asyncio.get_running_loop().create_future()

    async def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.set_result((r, w))

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=tls[0] if tls else None)
    port = server.sockets[0].getsockname()[1]
    cr, cw = await asyncio.open_connection(
        "127.0.0.1", port, ssl=tls[1] if tls else None, server_hostname="localhost" if tls else None
    )
    sr, sw = await asyncio.wait_for(accepted, 2)
    try:
        yield (cr, cw), (sr, sw)
    finally:
        for w in (cw, sw):
            w.close()
        for w in (cw, sw):
            with contextlib.suppress(OSError):
                await asyncio.wait_for(w.wait_closed(), 2)
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def mux_pair(
    *,
    client_handler: Handler | None = None,
    server_handler: Handler | None = None,
    tls: tuple[ssl.SSLContext, ssl.SSLContext] | None = None,
    **kw: Any,
) -> AsyncIterator[tuple[Mux, Mux]]:
    """Two Muxes over one connection: the client dials (odd ids), the server accepts."""
    async with tcp_pair(tls) as ((cr, cw), (sr, sw)):
        client = Mux(cr, cw, initiator=True, on_stream=client_handler, **kw)
        server = Mux(sr, sw, initiator=False, on_stream=server_handler, **kw)
        runs = [asyncio.create_task(client.run()), asyncio.create_task(server.run())]
        try:
            yield client, server
        finally:
            await client.close("test over")
            await server.close("test over")
            await asyncio.wait_for(asyncio.gather(*runs), 2)


@dataclass
class Raw:
    """A Mux (the accepting end) and the raw socket the test drives as its peer."""

    mux: Mux
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    run: asyncio.Task[None]

    async def send(self, *frames: bytes) -> None:
        self.writer.write(b"".join(frames))
        await self.writer.drain()

    async def closed_with(self) -> str:
        """Wait for the Mux to close; return its reason."""
        await asyncio.wait_for(asyncio.shield(self.run), 1.5)
        assert self.mux.close_reason is not None
        return self.mux.close_reason


@contextlib.asynccontextmanager
async def raw_peer(
    handler: Handler | None = None, *, initiator: bool = False, **kw: Any
) -> AsyncIterator[Raw]:
    async with tcp_pair() as ((cr, cw), (sr, sw)):
        mux = Mux(sr, sw, initiator=initiator, on_stream=handler, **kw)
        run = asyncio.create_task(mux.run())
        try:
            yield Raw(mux, cr, cw, run)
        finally:
            await mux.close("test over")
            await asyncio.wait_for(run, 2)


def tls_contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """Server and client contexts for mutual TLS with one self-signed certificate both trust."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tunnel-test")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file = tmp_path / "cert.pem"
    key_file = tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_file, key_file)
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(cert_file)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
    client.load_verify_locations(cert_file)
    client.load_cert_chain(cert_file, key_file)
    return server, client


# ------------------------------------------------------------------ basics


async def test_open_send_recv_end_both_directions() -> None:
    seen: list[tuple[int, dict[str, Any]]] = []

    async def upper(stream: Stream) -> None:
        seen.append((stream.id, stream.header))
        data = await read_all(stream)
        await stream.send(data.upper())
        # returning without end(): the Mux ends the stream

    async with mux_pair(client_handler=upper, server_handler=upper) as (client, server):
        s = await client.open({"kind": "test", "n": [1, 2]})
        assert s.id == 1
        assert s.header == {"kind": "test", "n": [1, 2]}
        await s.send(b"hello ")
        await s.send(bytearray(b"wor") + memoryview(b"ld"))
        await s.end()
        await s.end()  # idempotent
        assert await read_all(s) == b"HELLO WORLD"
        assert await s.recv() is None  # stays ended
        assert s.done

        back = await server.open({"kind": "back"})
        assert back.id == 2
        await back.send(b"from the proxy")
        await back.end()
        assert await read_all(back) == b"FROM THE PROXY"

        s3 = await client.open({})
        assert s3.id == 3
        await s3.end()
        assert await s3.recv() is None

        assert seen == [(1, {"kind": "test", "n": [1, 2]}), (2, {"kind": "back"}), (3, {})]
        await until(lambda: client.open_streams == 0 and server.open_streams == 0)


async def test_send_after_end_and_idempotent_reset() -> None:
    async with mux_pair(server_handler=echo) as (client, _):
        s = await client.open({})
        await s.send(b"")  # nothing to send is fine
        await s.end()
        with pytest.raises(RuntimeError, match="after end"):
            await s.send(b"late")
        assert await read_all(s) == b""
        assert s.done
        s.reset("already done")  # a no-op on a finished stream
        assert await s.recv() is None

        t = await client.open({})
        t.reset("first")
        t.reset("second")
        with pytest.raises(StreamReset, match="first"):
            await t.recv()
        with pytest.raises(StreamReset, match="first"):
            await t.send(b"x")
        with pytest.raises(StreamReset, match="first"):
            await t.end()
        await t.wait_done()


async def test_many_concurrent_streams_keep_their_data_apart() -> None:
    async with mux_pair(client_handler=echo, server_handler=echo, window=32 * KiB) as (client, server):

        async def one(mux: Mux, i: int) -> None:
            rnd = random.Random(i)
            chunks = [rnd.randbytes(rnd.randint(1, 12_000)) for _ in range(rnd.randint(1, 8))]
            s = await mux.open({"i": i})

            async def write() -> None:
                for c in chunks:
                    await s.send(c)
                    await asyncio.sleep(0)  # interleave with the other streams
                await s.end()

            writer = asyncio.create_task(write())
            got = await read_all(s)
            await writer
            assert hashlib.sha256(got).digest() == hashlib.sha256(b"".join(chunks)).digest()

        jobs = [one(client, i) for i in range(200)] + [one(server, 1000 + i) for i in range(50)]
        await asyncio.wait_for(asyncio.gather(*jobs), 5)
        await until(lambda: client.open_streams == 0 and server.open_streams == 0)


async def test_five_megabytes_through_a_64k_window() -> None:
    window = 64 * KiB
    peak = 0

    async def measure(stream: Stream) -> None:
        nonlocal peak
        h = hashlib.sha256()
        while True:
            peak = max(peak, buffered(stream))
            chunk = await stream.recv()
            if chunk is None:
                break
            h.update(chunk)
        await stream.send(h.hexdigest().encode())

    payload = random.Random(5).randbytes(5 * MiB)
    async with mux_pair(server_handler=measure, window=window) as (client, _):
        s = await client.open({"kind": "bulk"})
        await asyncio.wait_for(s.send(payload), 5)  # one call, split by the Mux
        await s.end()
        assert (await read_all(s)).decode() == hashlib.sha256(payload).hexdigest()
    assert 0 < peak <= window


async def test_slow_consumer_does_not_block_another_stream() -> None:
    window = 64 * KiB
    release = asyncio.Event()
    slow_side: list[Stream] = []

    async def handler(stream: Stream) -> None:
        if stream.header["kind"] == "slow":
            slow_side.append(stream)
            await release.wait()
        await digest_reply(stream)

    data = random.Random(7).randbytes(MiB)
    async with mux_pair(server_handler=handler, window=window) as (client, _):
        slow = await client.open({"kind": "slow"})
        slow_send = asyncio.create_task(slow.send(data))
        await until(lambda: slow._scredit == 0)  # the slow stream has used all its credit

        fast = await client.open({"kind": "fast"})
        async with asyncio.timeout(1.5):
            await fast.send(data)
            await fast.end()
            answer = await read_all(fast)
        assert answer.split()[0].decode() == hashlib.sha256(data).hexdigest()

        # the slow stream is still stuck, and its receiver holds no more than one window
        assert not slow_send.done()
        assert buffered(slow_side[0]) == window

        release.set()
        await asyncio.wait_for(slow_send, 1.5)
        await slow.end()
        digest, biggest = (await read_all(slow)).decode().split()
        assert digest == hashlib.sha256(data).hexdigest()
        assert int(biggest) <= 64 * KiB


# ------------------------------------------------------------------ resets


async def test_reset_by_the_opener_wakes_the_peer() -> None:
    failures: dict[str, BaseException] = {}
    blocked: dict[str, Stream] = {}

    async def handler(stream: Stream) -> None:
        mode = stream.header["mode"]
        blocked[mode] = stream
        try:
            if mode == "recv":
                await stream.recv()
            else:
                await stream.send(b"x" * MiB)  # the opener never reads: this blocks on credit
        except StreamReset as e:
            failures[mode] = e
            raise

    async with mux_pair(server_handler=handler, window=64 * KiB) as (client, server):
        r = await client.open({"mode": "recv"})
        await until(lambda: "recv" in blocked)
        r.reset("changed my mind")
        await until(lambda: "recv" in failures)
        assert str(failures["recv"]) == "changed my mind"

        s = await client.open({"mode": "send"})
        await until(lambda: "send" in blocked and blocked["send"]._scredit == 0)
        s.reset("stop sending")
        await until(lambda: "send" in failures)
        assert isinstance(failures["send"], StreamReset)
        assert failures["send"].reason == "stop sending"
        with pytest.raises(StreamReset, match="stop sending"):
            await s.recv()

        # the DATA that crossed the RESET was ignored; the connection is fine
        e = await client.open({"mode": "recv"})
        assert not client.closed and not server.closed
        e.reset("bye")


async def test_reset_by_the_acceptor_wakes_the_opener() -> None:
    go = asyncio.Event()

    async def handler(stream: Stream) -> None:
        if stream.header["mode"] == "now":
            stream.reset("go away")
            return
        await go.wait()  # never reads
        stream.reset("not interested")

    async with mux_pair(server_handler=handler, window=64 * KiB) as (client, _):
        s = await client.open({"mode": "now"})
        with pytest.raises(StreamReset, match="go away") as info:
            await s.recv()
        assert info.value.reason == "go away"
        assert s.done

        t = await client.open({"mode": "later"})
        send = asyncio.create_task(t.send(b"y" * MiB))
        recv = asyncio.create_task(t.recv())
        await until(lambda: t._scredit == 0)
        go.set()
        with pytest.raises(StreamReset, match="not interested"):
            await asyncio.wait_for(send, 1)
        with pytest.raises(StreamReset, match="not interested"):
            await asyncio.wait_for(recv, 1)
        await asyncio.wait_for(t.wait_done(), 1)


async def test_handler_that_raises_resets_the_stream_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def boom(stream: Stream) -> None:
        await stream.recv()
        raise ValueError("kaboom: no such method")

    caplog.set_level(logging.WARNING, logger="bastion.tunnel")
    async with mux_pair(server_handler=boom) as (client, _):
        s = await client.open({})
        await s.send(b"call")
        with pytest.raises(StreamReset, match=r"^kaboom: no such method$"):
            await s.recv()
        with pytest.raises(StreamReset):
            await s.send(b"more")
    records = [r for r in caplog.records if r.name == "bastion.tunnel" and r.exc_info]
    assert records
    assert isinstance(records[0].exc_info[1], ValueError)  # type: ignore[index]


async def test_refused_streams() -> None:
    gate = asyncio.Event()

    async def wait_then_echo(stream: Stream) -> None:
        await gate.wait()
        await echo(stream)

    async with mux_pair(server_handler=wait_then_echo, max_streams=2) as (client, server):
        a = await client.open({})
        b = await client.open({})
        c = await client.open({})
        with pytest.raises(StreamReset, match="too many streams"):
            await c.recv()
        gate.set()
        for s in (a, b):
            await s.send(b"ok")
            await s.end()
            assert await read_all(s) == b"ok"
        d = await client.open({})  # room again
        await d.end()
        assert await read_all(d) == b""

        # the client has no on_stream: what the server opens is refused
        e = await server.open({})
        with pytest.raises(StreamReset, match="not accepting streams"):
            await e.recv()


# ------------------------------------------------------------------ the connection ends


async def test_close_sends_goaway_and_fails_streams_on_both_ends() -> None:
    handler_cancelled = asyncio.Event()

    async def hang(stream: Stream) -> None:
        if stream.header.get("hang"):
            try:
                await asyncio.Event().wait()  # stuck on something else than the stream
            except asyncio.CancelledError:
                handler_cancelled.set()
                raise
        await stream.wait_done()  # never reads: blocks until the tunnel ends

    async with mux_pair(server_handler=hang, window=64 * KiB) as (client, server):
        s = await client.open({})
        await client.open({"hang": True})
        recv = asyncio.create_task(s.recv())
        send = asyncio.create_task(s.send(b"z" * MiB))  # blocks: the server never reads
        await until(lambda: s._scredit == 0 and server.open_streams == 2)

        await asyncio.wait_for(client.close("maintenance"), 1)
        assert client.closed
        assert client.close_reason == "maintenance"
        for task in (recv, send):
            with pytest.raises(TunnelClosed, match="maintenance"):
                await asyncio.wait_for(task, 1)
        with pytest.raises(TunnelClosed):
            await client.open({})
        await asyncio.wait_for(server.wait_closed(), 1)
        assert server.close_reason == "peer closed: maintenance"
        assert handler_cancelled.is_set()  # run() cancels the handlers still running
        assert client.open_streams == server.open_streams == 0
        await client.close("again")  # idempotent
        assert client.close_reason == "maintenance"


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_connection_drop_fails_every_stream(how: str) -> None:
    async with tcp_pair() as ((cr, cw), (sr, sw)):
        mux = Mux(cr, cw, initiator=True, window=64 * KiB)
        run = asyncio.create_task(mux.run())
        a = await mux.open({"n": 1})
        b = await mux.open({"n": 2})
        recv = asyncio.create_task(a.recv())
        send = asyncio.create_task(b.send(b"q" * MiB))
        # the raw peer sees both OPENs, then goes away
        assert (await next_frame(sr, OPEN))[0] == 1
        assert (await next_frame(sr, OPEN))[0] == 3
        await until(lambda: b._scredit == 0)
        if how == "abort":
            sw.transport.abort()
        else:
            sw.close()

        await asyncio.wait_for(run, 1)  # run() returns, it does not raise
        assert mux.closed
        assert mux.close_reason is not None
        assert mux.close_reason.startswith("connection")
        for task in (recv, send):
            with pytest.raises(TunnelClosed):
                await asyncio.wait_for(task, 1)
        with pytest.raises(TunnelClosed):
            await b.send(b"more")
        with pytest.raises(TunnelClosed):
            await mux.open({})
        assert a.done and b.done and mux.open_streams == 0
        await asyncio.wait_for(mux.wait_closed(), 1)


async def test_data_received_before_the_drop_is_still_readable() -> None:
    async with tcp_pair() as ((_, cw), (sr, sw)):
        streams: list[Stream] = []

        async def keep(stream: Stream) -> None:
            streams.append(stream)
            await asyncio.Event().wait()

        mux = Mux(sr, sw, initiator=False, on_stream=keep)
        run = asyncio.create_task(mux.run())
        cw.write(frame(OPEN, 1, b"{}") + frame(DATA, 1, b"abc") + frame(OPEN, 3, b"{}"))
        cw.write(frame(DATA, 3, b"def") + frame(END, 3))
        await cw.drain()
        await until(lambda: len(streams) == 2)
        cw.close()
        await asyncio.wait_for(run, 1)
        one, three = streams  # cancelled handlers, streams still readable
        assert await one.recv() == b"abc"
        with pytest.raises(TunnelClosed, match="connection closed by peer"):
            await one.recv()
        assert await read_all(three) == b"def"  # it was complete


async def test_close_before_run() -> None:
    async with tcp_pair() as ((cr, cw), _):
        mux = Mux(cr, cw, initiator=True)
        await asyncio.wait_for(mux.close("never started"), 1)
        assert mux.closed
        await asyncio.wait_for(mux.run(), 1)  # returns at once
        with pytest.raises(RuntimeError):
            await mux.run()


async def test_cancelling_run_closes_everything() -> None:
    async with tcp_pair() as ((cr, cw), _):
        mux = Mux(cr, cw, initiator=True)
        task = asyncio.create_task(mux.run())
        s = await mux.open({})
        recv = asyncio.create_task(s.recv())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 1)
        assert mux.closed
        assert cw.is_closing()
        with pytest.raises(TunnelClosed):
            await asyncio.wait_for(recv, 1)
        await asyncio.wait_for(mux.wait_closed(), 1)


async def test_frames_split_across_reads_are_reassembled() -> None:
    async with raw_peer(echo, ping_interval=0) as raw:
        body = bytes(range(256)) * 4
        wire = frame(OPEN, 1, b'{"split": true}') + frame(DATA, 1, body) + frame(END, 1)
        wire += frame(PING, 0, b"abcdefgh")
        rnd = random.Random(11)
        pos = 0
        while pos < len(wire):
            step = rnd.randint(1, 9)
            raw.writer.write(wire[pos : pos + step])
            await raw.writer.drain()
            await asyncio.sleep(0)
            pos += step
        echoed = b""
        seen: list[int] = []
        async with asyncio.timeout(1):
            while END not in seen or PONG not in seen:
                t, _, payload = await read_frame(raw.reader)
                seen.append(t)
                if t == DATA:
                    echoed += payload
                elif t == PONG:
                    assert payload == b"abcdefgh"
        assert echoed == body


# ------------------------------------------------------------------ keepalive


async def test_keepalive_detects_a_silent_peer() -> None:
    async with tcp_pair() as ((cr, cw), (sr, _)):
        mux = Mux(cr, cw, initiator=True, ping_interval=0.05, ping_timeout=0.3)
        start = time.monotonic()
        await asyncio.wait_for(mux.run(), 1.5)  # the peer never reads nor writes
        assert mux.close_reason == "peer not responding"
        assert time.monotonic() - start >= 0.29
        types = []
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                types.append((await read_frame(sr))[0])
        assert types.count(PING) >= 2


async def test_keepalive_keeps_a_live_idle_connection_open() -> None:
    async with mux_pair(server_handler=echo, ping_interval=0.05, ping_timeout=0.3) as (client, server):
        await asyncio.sleep(0.7)  # twice the timeout of application silence, answered by PONGs
        assert not client.closed and not server.closed
        s = await client.open({})
        await s.send(b"still here")
        await s.end()
        assert await read_all(s) == b"still here"


async def test_pings_are_answered() -> None:
    async with raw_peer(ping_interval=0) as raw:
        await raw.send(frame(PING, 0, b"12345678"))
        assert await next_frame(raw.reader, PONG) == (0, b"12345678")


# ------------------------------------------------------------------ protocol errors


async def _wait_forever(stream: Stream) -> None:
    await stream.wait_done()


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "unknown frame type 0x47"),
        (FRAME_HEADER.pack(OPEN, 1, 4097), "OPEN header of 4097 bytes exceeds the limit of 4096"),
        (frame(OPEN, 2, b"{}"), "OPEN of stream 2: that id is ours to use"),
        (frame(OPEN, 1, b"{}") + frame(OPEN, 1, b"{}"), "OPEN of stream 1 reuses an id"),
        (frame(OPEN, 5, b"{}") + frame(OPEN, 3, b"{}"), "OPEN of stream 3 reuses an id"),
        (frame(OPEN, 0, b"{}"), "bad frame: type 0x01, stream 0"),
        (frame(OPEN, 1, b"{nope"), "the header is not JSON"),
        (frame(OPEN, 1, b"[1]"), "the header is not a JSON object"),
        (frame(DATA, 7, b"x"), "DATA for stream 7, which was never opened"),
        (frame(DATA, 2, b"x"), "DATA for stream 2, which was never opened"),
        (FRAME_HEADER.pack(DATA, 1, 65537), "DATA frame of 65537 bytes"),
        (frame(END, 9), "END for stream 9, which was never opened"),
        (frame(OPEN, 1, b"{}") + frame(END, 1) + frame(DATA, 1, b"x"), "DATA after END on stream 1"),
        (frame(OPEN, 1, b"{}") + frame(END, 1) + frame(END, 1), "second END on stream 1"),
        (frame(WINDOW, 1, b"abc"), "bad frame: type 0x05, stream 1, length 3"),
        (frame(PING, 1, b"12345678"), "bad frame: type 0x06, stream 1"),
        (frame(RESET, 11, b"why"), "RESET for stream 11, which was never opened"),
        (frame(OPEN, 1, b"{}") + frame(WINDOW, 1, (2**31).to_bytes(4, "big")), "WINDOW overflows"),
    ],
)
async def test_protocol_errors_close_the_connection(frames: bytes, reason: str) -> None:
    async with raw_peer(_wait_forever, max_header=4096, ping_interval=0) as raw:
        await raw.send(frames)
        got = await raw.closed_with()
        assert got.startswith("protocol error: ")
        assert reason in got
        _, goaway = await next_frame(raw.reader, GOAWAY)
        assert goaway.decode() == got
        # and the connection is really closed
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(raw.reader.read(), 1) == b""


async def test_peer_goaway_closes_with_its_reason() -> None:
    async with raw_peer(_wait_forever, ping_interval=0) as raw:
        await raw.send(frame(OPEN, 1, b"{}"), frame(GOAWAY, 0, b"shutting down"))
        assert await raw.closed_with() == "peer closed: shutting down"


async def test_frames_for_a_reset_stream_are_ignored() -> None:
    async def refuse(stream: Stream) -> None:
        stream.reset("nope")

    async with raw_peer(refuse, ping_interval=0) as raw:
        await raw.send(frame(OPEN, 1, b'{"a": 1}'), frame(DATA, 1, b"early"))
        assert await next_frame(raw.reader, RESET) == (1, b"nope")
        # everything the peer had in flight for stream 1 is dropped silently
        await raw.send(
            frame(DATA, 1, b"late"),
            frame(WINDOW, 1, (1000).to_bytes(4, "big")),
            frame(END, 1),
            frame(RESET, 1, b"whatever"),
            frame(PING, 0, b"87654321"),
        )
        assert await next_frame(raw.reader, PONG) == (0, b"87654321")
        assert not raw.mux.closed


async def test_credit_is_granted_back_and_enforced() -> None:
    window = 1024
    got: list[bytes] = []

    async def read_one(stream: Stream) -> None:
        got.append(await stream.recv() or b"")
        await stream.wait_done()  # and then never read again

    async with raw_peer(read_one, window=window, ping_interval=0) as raw:
        await raw.send(frame(OPEN, 1, b"{}"), frame(DATA, 1, b"a" * window))  # exactly the credit
        sid, credit = await next_frame(raw.reader, WINDOW)  # consumed, so granted back
        assert (sid, int.from_bytes(credit, "big")) == (1, window)
        assert got == [b"a" * window]
        await raw.send(frame(DATA, 1, b"b" * window))  # the new credit, unread
        await raw.send(frame(DATA, 1, b"c"))  # one byte too many
        assert "stream 1 exceeded its flow-control window" in await raw.closed_with()


async def test_sender_stops_at_the_credit_it_was_given() -> None:
    """The Mux's own sending side: a raw receiver that grants nothing gets one window."""
    async with raw_peer(initiator=True, window=4096, ping_interval=0) as raw:
        s = await raw.mux.open({"kind": "push"})
        send = asyncio.create_task(s.send(b"p" * 10_000))
        assert await next_frame(raw.reader, OPEN) == (1, b'{"kind":"push"}')
        received = 0
        while received < 4096:
            _, data = await next_frame(raw.reader, DATA)
            received += len(data)
        assert received == 4096
        await until(lambda: s._scredit == 0)
        assert not send.done()
        await raw.send(frame(WINDOW, 1, (10_000).to_bytes(4, "big")))
        await asyncio.wait_for(send, 1)
        while received < 10_000:
            received += len((await next_frame(raw.reader, DATA))[1])
        assert received == 10_000


# ------------------------------------------------------------------ TLS


async def test_mutual_tls(tmp_path: Path) -> None:
    tls = tls_contexts(tmp_path)
    payload = random.Random(3).randbytes(2 * MiB)
    async with mux_pair(client_handler=echo, server_handler=digest_reply, tls=tls, window=64 * KiB) as (
        client,
        server,
    ):
        assert client._writer.get_extra_info("ssl_object") is not None
        peer_cert = server._writer.get_extra_info("peercert")
        assert peer_cert is not None  # the server saw and verified the client's certificate

        s = await client.open({"kind": "bulk"})
        await s.send(payload)
        await s.end()
        assert (await read_all(s)).split()[0].decode() == hashlib.sha256(payload).hexdigest()

        async def small(i: int) -> None:
            t = await server.open({"i": i})
            await t.send(b"ping %d" % i)
            await t.end()
            assert await read_all(t) == b"ping %d" % i

        await asyncio.wait_for(asyncio.gather(*(small(i) for i in range(50))), 2)
        await client.close("done")
        await asyncio.wait_for(server.wait_closed(), 1)
        assert server.close_reason == "peer closed: done"
