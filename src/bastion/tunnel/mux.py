"""A stream multiplexer over one asyncio stream connection (the reverse tunnel).

An app service dials the proxy (mutually authenticated TLS) and keeps that one connection;
both ends then open many concurrent logical streams over it: the proxy one per HTTP request
it carries to the app service, the app service one per RPC to the cluster (heartbeats,
audit batches, a watch).  The transport is any ``asyncio.StreamReader``/``StreamWriter``
pair; TLS or not makes no difference here.

Usage::

    mux = Mux(reader, writer, initiator=True, on_stream=handle)   # inside a running loop
    runner = asyncio.create_task(mux.run())                       # the read loop
    stream = await mux.open({"kind": "rpc", "method": "heartbeat"})
    await stream.send(b"...")
    await stream.end()
    while (chunk := await stream.recv()) is not None: ...
    await mux.close("bye")                                       # run() returns

Wire format
-----------
Every frame is a 9-byte header followed by ``length`` bytes of payload, all integers
big-endian::

    type:u8 | stream_id:u32 | length:u32 | payload

======  ====  ==========  =========================================================
type    code  stream      payload
======  ====  ==========  =========================================================
OPEN    0x01  new id      the stream's header: one JSON object (at most ``max_header``)
DATA    0x02  open id     application bytes, at most 65536 per frame
END     0x03  open id     empty; the sender will send no more DATA on this stream
RESET   0x04  any id      utf-8 reason; abort both directions of the stream
WINDOW  0x05  open id     u32 credit: the receiver may now send that many more bytes
PING    0x06  0           8 opaque bytes, echoed back in a PONG
PONG    0x07  0           the 8 bytes of the PING it answers
GOAWAY  0x08  0           utf-8 reason; the sender is closing the connection
======  ====  ==========  =========================================================

Stream ids: the end that dialled (``initiator=True``) opens odd ids, the other end even
ids, each strictly increasing and never reused; id 0 is the connection itself.

Flow control is per stream and per direction.  Each direction of each stream starts with
``window`` bytes of credit (**both ends must be configured with the same window**).  A
sender never sends more DATA than its credit; the receiver buffers what arrives (at most a
window per stream, so memory is bounded and the read loop never waits for a slow
consumer) and grants the credit back with WINDOW once the application has taken half a
window out with ``recv()``.  One slow consumer therefore stalls only its own stream.

Errors: a peer that breaks the protocol (unknown frame type, a bad length, an OPEN with
the wrong parity or a reused id, an oversized or non-JSON header, DATA for a stream that
was never opened, DATA beyond its credit, DATA after END) gets a GOAWAY with the reason and
the connection is closed.  Frames for a stream that has been reset or has finished are
ignored: they may cross a RESET on the wire.

Keepalive: when nothing has been received for ``ping_interval`` seconds a PING goes out
(again every ``ping_interval`` while the silence lasts); when nothing at all has been
received for ``ping_timeout`` seconds the connection is closed with the reason
"peer not responding".

Writing: frames are appended to one output buffer and written in one ``write()`` per event
loop iteration (or as soon as 64 KiB are pending), so small frames from many streams share
a system call (and a TLS record); ``send()``, ``end()`` and ``open()`` wait on
``writer.drain()`` for back-pressure.  The read loop only ever appends control frames
(PONG, RESET of a refused stream) and never waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

__all__ = [
    "DATA",
    "END",
    "FRAME_HEADER",
    "GOAWAY",
    "MAX_DATA",
    "OPEN",
    "PING",
    "PONG",
    "RESET",
    "WINDOW",
    "Mux",
    "Stream",
    "StreamReset",
    "TunnelClosed",
]

log = logging.getLogger("bastion.tunnel")

OPEN = 0x01
DATA = 0x02
END = 0x03
RESET = 0x04
WINDOW = 0x05
PING = 0x06
PONG = 0x07
GOAWAY = 0x08

FRAME_HEADER = struct.Struct(">BII")
"""``type:u8 | stream_id:u32 | length:u32``"""

MAX_DATA = 64 * 1024
"""The largest DATA payload; ``send()`` splits larger data."""

_HEADER_SIZE = FRAME_HEADER.size
_HEADER_ZEROS = bytes(_HEADER_SIZE)
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_MAX_REASON = 64 * 1024  # the largest RESET/GOAWAY payload we accept
_SENT_REASON_CHARS = 1024  # reasons we send are cut to this many characters
_MAX_CREDIT = 2**31 - 1
_MAX_ID = 2**32 - 1
_READ_SIZE = 256 * 1024
_FLUSH_AT = 64 * 1024  # write at once when this much is pending, else at the end of the loop iteration
_CLOSE_TIMEOUT = 2.0  # how long a closing writer may take to flush before it is aborted


class TunnelClosed(Exception):
    """The tunnel connection is gone; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StreamReset(Exception):
    """The stream was reset (by the peer or by us); ``reason`` is the reset's reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _ProtocolError(Exception):
    pass


class _PeerGoaway(Exception):
    pass


def _wake(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)


def _reason_bytes(reason: str) -> bytes:
    return reason[:_SENT_REASON_CHARS].encode("utf-8", "replace")


class Stream:
    """One logical, bidirectional stream of a :class:`Mux`.

    ``send()``/``end()`` may be called from any task (they are serialised per stream);
    ``recv()`` from one task at a time.
    """

    __slots__ = (
        "_done",
        "_done_waiters",
        "_error",
        "_is_reset",
        "_local_ended",
        "_mux",
        "_rbuf",
        "_rcredit",
        "_remote_ended",
        "_rwaiter",
        "_scredit",
        "_send_lock",
        "_swaiter",
        "_unacked",
        "header",
        "id",
    )

    def __init__(self, mux: Mux, sid: int, header: dict[str, Any], window: int) -> None:
        self.id = sid
        self.header = header
        self._mux = mux
        self._rbuf: deque[bytes] = deque()
        self._rcredit = window  # bytes the peer may still send us
        self._unacked = 0  # bytes taken by recv() and not yet granted back
        self._scredit = window  # bytes we may still send
        self._remote_ended = False
        self._local_ended = False
        self._done = False
        self._error: str | None = None  # reason of a reset or of the tunnel's end
        self._is_reset = False
        self._rwaiter: asyncio.Future[None] | None = None
        self._swaiter: asyncio.Future[None] | None = None
        self._done_waiters: list[asyncio.Future[None]] | None = None
        self._send_lock = asyncio.Lock()

    def __repr__(self) -> str:
        state = "done" if self._done else "open"
        return f"<Stream {self.id} {state} header={self.header!r}>"

    @property
    def done(self) -> bool:
        """True once the stream is reset, the tunnel closed, or both sides have ended."""
        return self._done

    async def wait_done(self) -> None:
        """Wait until :attr:`done` (reset, tunnel closed, or both sides ended)."""
        if self._done:
            return
        fut: asyncio.Future[None] = self._mux._loop.create_future()
        if self._done_waiters is None:
            self._done_waiters = []
        self._done_waiters.append(fut)
        try:
            await fut
        finally:
            with contextlib.suppress(ValueError):
                self._done_waiters.remove(fut)

    # ------------------------------------------------------------ sending

    def _raise_error(self) -> None:
        if self._error is not None:
            if self._is_reset:
                raise StreamReset(self._error)
            raise TunnelClosed(self._error)

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` (any bytes-like object), waiting for flow-control credit.

        Data larger than 64 KiB (or than the credit at hand) goes out as several frames.
        Raises :class:`StreamReset` or :class:`TunnelClosed` when the stream can no
        longer send, ``RuntimeError`` after :meth:`end`.
        """
        mux = self._mux
        async with self._send_lock:
            with memoryview(data).cast("B") as view:
                total = len(view)
                off = 0
                while True:
                    self._raise_error()
                    if self._local_ended:
                        raise RuntimeError(f"stream {self.id}: send() after end()")
                    if off >= total:
                        return
                    credit = self._scredit
                    if credit <= 0:
                        fut: asyncio.Future[None] = mux._loop.create_future()
                        self._swaiter = fut
                        try:
                            await fut
                        finally:
                            self._swaiter = None
                        continue
                    n = min(total - off, credit, MAX_DATA)
                    self._scredit = credit - n
                    mux._queue(DATA, self.id, view[off : off + n])
                    off += n
                    await mux._drain()
                    if off >= total:
                        return

    async def end(self) -> None:
        """Half-close: we send no more data; the peer's ``recv()`` then returns ``None``.

        Idempotent; raises :class:`StreamReset`/:class:`TunnelClosed` on a failed stream.
        """
        async with self._send_lock:
            self._raise_error()
            if self._local_ended:
                return
            self._local_ended = True
            mux = self._mux
            mux._queue(END, self.id, b"")
            if self._remote_ended:
                mux._finished(self)
            await mux._drain()

    # ------------------------------------------------------------ receiving

    async def recv(self) -> bytes | None:
        """The next chunk of data; ``None`` once the peer has ended and all data is read.

        Raises :class:`StreamReset` (with the reason) when the stream is reset, and
        :class:`TunnelClosed` when the connection ends before the peer ended the stream
        (after the data that did arrive).
        """
        while True:
            buf = self._rbuf
            if buf:
                chunk = buf.popleft()
                if not self._remote_ended and not self._done:
                    self._unacked += len(chunk)
                    mux = self._mux
                    if self._unacked >= mux._grant_at:
                        mux._grant(self)
                return chunk
            if self._remote_ended and not self._is_reset:
                return None
            self._raise_error()
            if self._rwaiter is not None:
                raise RuntimeError(f"stream {self.id}: recv() called concurrently")
            fut: asyncio.Future[None] = self._mux._loop.create_future()
            self._rwaiter = fut
            try:
                await fut
            finally:
                self._rwaiter = None

    # ------------------------------------------------------------ aborting

    def reset(self, reason: str) -> None:
        """Abort both directions and tell the peer; a no-op on a stream already done."""
        if self._done:
            return
        mux = self._mux
        mux._forget(self)
        if not mux._closed:
            mux._queue(RESET, self.id, _reason_bytes(reason))
        self._fail(reason, reset=True)

    def _fail(self, reason: str, *, reset: bool) -> None:
        if self._error is None:
            self._error = reason
            self._is_reset = reset
            if reset:
                self._rbuf.clear()
        self._set_done()
        _wake(self._rwaiter)
        _wake(self._swaiter)

    def _set_done(self) -> None:
        self._done = True
        if self._done_waiters:
            for fut in self._done_waiters:
                _wake(fut)


class Mux:
    """Many logical streams over one stream connection; see the module docstring.

    Create it inside a running event loop.  ``on_stream(stream)`` runs in its own task for
    every stream the peer opens: if it raises, the stream is reset with the exception's
    text; if it returns without ending or resetting the stream, the stream is ended.
    Streams the peer opens beyond ``max_streams`` at once (or at all, without
    ``on_stream``) are refused with a RESET.  ``ping_interval=0`` turns keepalive off.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        initiator: bool,
        on_stream: Callable[[Stream], Awaitable[None]] | None = None,
        window: int = 256 * 1024,
        ping_interval: float = 10.0,
        ping_timeout: float = 30.0,
        max_streams: int = 10_000,
        max_header: int = 1 << 20,
    ) -> None:
        if not 1 <= window <= _MAX_CREDIT:
            raise ValueError(f"window must be 1..{_MAX_CREDIT}")
        if ping_interval < 0 or ping_timeout <= ping_interval:
            raise ValueError("ping_interval must be >= 0 and ping_timeout longer than ping_interval")
        if max_streams < 0 or max_header < 2:
            raise ValueError("max_streams must be >= 0 and max_header >= 2")
        self._loop = asyncio.get_running_loop()
        self._reader = reader
        self._writer = writer
        self._on_stream = on_stream
        self._window = window
        self._grant_at = max(1, window // 2)
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._max_streams = max_streams
        self._max_header = max_header
        self._next_id = 1 if initiator else 2
        self._peer_parity = 0 if initiator else 1
        self._max_peer_id = 0
        self._streams: dict[int, Stream] = {}
        self._peer_streams = 0
        self._handlers: set[asyncio.Task[None]] = set()
        self._out = bytearray()
        self._flush_scheduled = False
        self._writer_closed = False
        self._closed = False
        self._reason: str | None = None
        self._peer_goaway: str | None = None
        self._finished_event = asyncio.Event()
        self._run_started = False
        self._read_task: asyncio.Task[None] | None = None
        self._keepalive_task: asyncio.Task[None] | None = None
        self._last_recv = self._loop.time()

    # ------------------------------------------------------------ public

    @property
    def closed(self) -> bool:
        """True once the connection is closing or closed (no new streams)."""
        return self._closed

    @property
    def close_reason(self) -> str | None:
        """Why the connection closed (``None`` while open)."""
        return self._reason

    @property
    def peer_goaway(self) -> str | None:
        """The reason the peer gave in its GOAWAY (``None`` if it sent none: the connection was
        lost, or this end closed it)."""
        return self._peer_goaway

    @property
    def open_streams(self) -> int:
        """Streams not yet done."""
        return len(self._streams)

    async def wait_closed(self) -> None:
        """Wait until the connection is closed and :meth:`run` has finished."""
        await self._finished_event.wait()

    async def open(self, header: dict[str, Any]) -> Stream:
        """Open a new stream carrying ``header`` (a JSON object).

        Data may be sent at once (the peer buffers up to a window before its ``on_stream``
        reads).  Raises :class:`TunnelClosed`, or ``ValueError`` for a header larger than
        ``max_header`` once serialised.  A peer that refuses the stream resets it.
        """
        if self._closed:
            raise TunnelClosed(self._reason or "closed")
        payload = orjson.dumps(header)
        if len(payload) > self._max_header:
            raise ValueError(f"stream header of {len(payload)} bytes exceeds {self._max_header}")
        sid = self._next_id
        if sid > _MAX_ID:
            self._shutdown("stream ids exhausted", goaway=True)
            raise TunnelClosed("stream ids exhausted")
        self._next_id = sid + 2
        stream = Stream(self, sid, header, self._window)
        self._streams[sid] = stream
        self._queue(OPEN, sid, payload)
        await self._drain()
        return stream

    async def run(self) -> None:
        """Read frames until the connection ends or :meth:`close`; then clean up.

        On return every stream that was not done has failed with :class:`TunnelClosed`,
        waiting ``send()``/``recv()`` calls have woken, ``on_stream`` tasks still running
        have been cancelled and awaited, and the writer is closed.
        """
        if self._run_started:
            raise RuntimeError("Mux.run() may be called only once")
        self._run_started = True
        loop = self._loop
        self._last_recv = loop.time()
        if not self._closed:
            self._read_task = loop.create_task(self._read_loop())
            if self._ping_interval > 0:
                self._keepalive_task = loop.create_task(self._keepalive())
        try:
            if self._read_task is not None:
                await asyncio.wait((self._read_task,))
        finally:
            self._shutdown("closed", goaway=True)  # only if run() itself was cancelled
            tasks = [t for t in (self._read_task, self._keepalive_task) if t is not None]
            tasks.extend(self._handlers)
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            await self._close_writer()
            self._finished_event.set()

    async def close(self, reason: str = "closed") -> None:
        """Send GOAWAY with ``reason``, close the connection, wait for :meth:`run` to end."""
        self._shutdown(reason, goaway=True)
        if self._run_started:
            await self._finished_event.wait()
        elif not self._finished_event.is_set():
            await self._close_writer()
            self._finished_event.set()

    # ------------------------------------------------------------ writing

    def _queue(self, ftype: int, sid: int, payload: bytes | memoryview) -> None:
        out = self._out
        pos = len(out)
        out += _HEADER_ZEROS
        FRAME_HEADER.pack_into(out, pos, ftype, sid, len(payload))
        if payload:
            out += payload
        if len(out) >= _FLUSH_AT:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self._flush()

    def _flush(self) -> None:
        out = self._out
        if not out:
            return
        self._out = bytearray()
        if not self._writer_closed and not self._writer.transport.is_closing():
            self._writer.write(out)

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except OSError as e:  # ConnectionResetError and friends: the read loop will notice too
            raise TunnelClosed(self._reason or f"connection lost: {e}") from None

    def _grant(self, stream: Stream) -> None:
        n = stream._unacked
        stream._unacked = 0
        stream._rcredit += n
        self._queue(WINDOW, stream.id, _U32.pack(n))

    # ------------------------------------------------------------ stream table

    def _forget(self, stream: Stream) -> None:
        if self._streams.pop(stream.id, None) is not None and stream.id & 1 == self._peer_parity:
            self._peer_streams -= 1

    def _finished(self, stream: Stream) -> None:
        """Both sides ended: the stream is done (its unread data stays readable)."""
        self._forget(stream)
        stream._set_done()

    def _was_opened(self, sid: int) -> bool:
        if sid == 0:
            return False
        if sid & 1 == self._peer_parity:
            return sid <= self._max_peer_id
        return sid < self._next_id

    # ------------------------------------------------------------ reading

    async def _read_loop(self) -> None:
        reader = self._reader
        loop = self._loop
        pending = b""  # the start of an incomplete frame
        goaway = False
        try:
            while True:
                chunk = await reader.read(_READ_SIZE)
                if not chunk:
                    reason = "connection closed mid-frame" if pending else "connection closed by peer"
                    break
                self._last_recv = loop.time()
                data = pending + chunk if pending else chunk
                off = self._process(data)
                pending = data[off:] if off < len(data) else b""
        except _PeerGoaway as e:
            self._peer_goaway = str(e)
            reason = f"peer closed: {e}"
        except _ProtocolError as e:
            reason = f"protocol error: {e}"
            goaway = True
            log.warning("tunnel protocol error, closing", extra={"reason": str(e)})
        except OSError as e:
            reason = f"connection lost: {str(e) or type(e).__name__}"
        except Exception as e:  # a bug of ours: do not leave the peer hanging
            log.exception("tunnel read loop failed")
            reason = f"internal error: {e}"
            goaway = True
        self._shutdown(reason, goaway=goaway)

    def _process(self, data: bytes) -> int:
        """Handle every complete frame in ``data``; return how many bytes were used."""
        end = len(data)
        off = 0
        streams = self._streams
        unpack = FRAME_HEADER.unpack_from
        while end - off >= _HEADER_SIZE:
            ftype, sid, n = unpack(data, off)
            if ftype == DATA:
                if n > MAX_DATA or sid == 0:
                    raise _ProtocolError(f"DATA frame of {n} bytes on stream {sid}")
            else:
                self._check_frame(ftype, sid, n)
            start = off + _HEADER_SIZE
            stop = start + n
            if stop > end:
                break
            off = stop
            if ftype == DATA:
                s = streams.get(sid)
                if s is None:
                    if not self._was_opened(sid):
                        raise _ProtocolError(f"DATA for stream {sid}, which was never opened")
                    continue  # a stream reset or finished here; the frame crossed the RESET
                if n > s._rcredit:
                    raise _ProtocolError(
                        f"stream {sid} exceeded its flow-control window ({n} bytes, credit {s._rcredit})"
                    )
                if s._remote_ended:
                    raise _ProtocolError(f"DATA after END on stream {sid}")
                if n:
                    s._rcredit -= n
                    s._rbuf.append(data[start:stop])
                    _wake(s._rwaiter)
            else:
                self._control(ftype, sid, data[start:stop])
        return off

    def _check_frame(self, ftype: int, sid: int, n: int) -> None:
        if ftype == OPEN:
            if n > self._max_header:
                raise _ProtocolError(f"OPEN header of {n} bytes exceeds the limit of {self._max_header}")
            ok = sid != 0
        elif ftype == END:
            ok = sid != 0 and n == 0
        elif ftype == RESET:
            ok = sid != 0 and n <= _MAX_REASON
        elif ftype == WINDOW:
            ok = sid != 0 and n == 4
        elif ftype in (PING, PONG):
            ok = sid == 0 and n == 8
        elif ftype == GOAWAY:
            ok = sid == 0 and n <= _MAX_REASON
        else:
            raise _ProtocolError(f"unknown frame type {ftype:#04x}")
        if not ok:
            raise _ProtocolError(f"bad frame: type {ftype:#04x}, stream {sid}, length {n}")

    def _control(self, ftype: int, sid: int, payload: bytes) -> None:
        if ftype == WINDOW:
            s = self._streams.get(sid)
            if s is None:
                self._check_known(sid, "WINDOW")
                return
            s._scredit += _U32.unpack(payload)[0]
            if s._scredit > _MAX_CREDIT:
                raise _ProtocolError(f"WINDOW overflows the credit of stream {sid}")
            _wake(s._swaiter)
        elif ftype == OPEN:
            self._on_open(sid, payload)
        elif ftype == END:
            s = self._streams.get(sid)
            if s is None:
                self._check_known(sid, "END")
                return
            if s._remote_ended:
                raise _ProtocolError(f"second END on stream {sid}")
            s._remote_ended = True
            _wake(s._rwaiter)
            if s._local_ended:
                self._finished(s)
        elif ftype == RESET:
            s = self._streams.get(sid)
            if s is None:
                self._check_known(sid, "RESET")
                return
            self._forget(s)
            s._fail(payload.decode("utf-8", "replace"), reset=True)
        elif ftype == PING:
            self._queue(PONG, 0, payload)
        elif ftype == GOAWAY:
            raise _PeerGoaway(payload.decode("utf-8", "replace"))
        # PONG: its arrival already refreshed _last_recv

    def _check_known(self, sid: int, what: str) -> None:
        if not self._was_opened(sid):
            raise _ProtocolError(f"{what} for stream {sid}, which was never opened")

    def _on_open(self, sid: int, payload: bytes) -> None:
        if sid & 1 != self._peer_parity:
            raise _ProtocolError(f"OPEN of stream {sid}: that id is ours to use")
        if sid <= self._max_peer_id:
            raise _ProtocolError(f"OPEN of stream {sid} reuses an id (the last was {self._max_peer_id})")
        self._max_peer_id = sid
        try:
            header = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise _ProtocolError(f"OPEN of stream {sid}: the header is not JSON") from None
        if not isinstance(header, dict):
            raise _ProtocolError(f"OPEN of stream {sid}: the header is not a JSON object")
        if self._on_stream is None or self._closed:
            self._queue(RESET, sid, b"not accepting streams")
            return
        if self._peer_streams >= self._max_streams:
            self._queue(RESET, sid, b"too many streams")
            return
        stream = Stream(self, sid, header, self._window)
        self._streams[sid] = stream
        self._peer_streams += 1
        task = self._loop.create_task(self._serve(stream))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _serve(self, stream: Stream) -> None:
        assert self._on_stream is not None
        try:
            await self._on_stream(stream)
        except asyncio.CancelledError:
            stream.reset("handler cancelled")  # a no-op when the tunnel is closing
            raise
        except (StreamReset, TunnelClosed) as e:
            stream.reset(str(e))  # a no-op when it is this stream that failed
        except Exception as e:
            log.warning(
                "tunnel stream handler failed",
                exc_info=True,
                extra={"stream_id": stream.id, "error": str(e)},
            )
            stream.reset(str(e) or type(e).__name__)
        else:
            if not stream._done and not stream._local_ended:
                with contextlib.suppress(StreamReset, TunnelClosed):
                    await stream.end()

    # ------------------------------------------------------------ liveness and shutdown

    async def _keepalive(self) -> None:
        loop = self._loop
        interval = self._ping_interval
        timeout = self._ping_timeout
        last_ping = loop.time()
        seq = 0
        while True:
            now = loop.time()
            last = self._last_recv
            if now - last >= timeout:
                log.warning("tunnel peer not responding, closing", extra={"silent_s": round(now - last, 1)})
                self._shutdown("peer not responding", goaway=True, abort=True)
                return
            quiet_since = max(last, last_ping)
            if now - quiet_since >= interval:
                seq += 1
                self._queue(PING, 0, _U64.pack(seq))
                last_ping = quiet_since = now
            await asyncio.sleep(max(min(last + timeout, quiet_since + interval) - now, 0.001))

    def _shutdown(self, reason: str, *, goaway: bool, abort: bool = False) -> None:
        """Stop everything at once (idempotent): fail the streams, close the writer."""
        if self._closed:
            return
        self._closed = True
        self._reason = reason
        if goaway:
            self._queue(GOAWAY, 0, _reason_bytes(reason))
        self._flush()
        self._writer_closed = True
        streams = list(self._streams.values())
        self._streams.clear()
        self._peer_streams = 0
        for s in streams:
            s._fail(reason, reset=False)
        current = asyncio.current_task()
        for t in (self._read_task, self._keepalive_task):
            if t is not None and t is not current:
                t.cancel()
        if abort:
            self._writer.transport.abort()
        else:
            self._writer.close()

    async def _close_writer(self) -> None:
        writer = self._writer
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await writer.wait_closed()
        except TimeoutError:
            writer.transport.abort()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        except OSError:
            pass
