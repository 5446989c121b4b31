"""One HTTP exchange over one tunnel stream: the proxy side and the app-service side.

The proxy opens a stream whose header says ``kind: http`` and carries the
request line, headers, the app's name, the decided actor and a fresh upstream
JWT; it then sends the request body and ends its side.  The app service runs
the very same ASGI handler it runs in-process (``MCPHandler``) and answers on
the stream with one JSON frame (status and headers) followed by the body as
it is produced (SSE events one by one).  A client that goes away resets the
stream, which the handler sees as ``http.disconnect``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from bastion._tasks import stop_tasks
from bastion.answers import error_headers
from bastion.protocol import jsonrpc
from bastion.tunnel.mux import Stream, StreamReset, TunnelClosed

log = logging.getLogger("bastion.tunnel")

ASGI = Callable[[Scope, Receive, Send], Awaitable[None]]


class NotStarted(Exception):
    """The app service went away before it answered: the request may be retried elsewhere."""


# ------------------------------------------------------------------ proxy


async def forward(
    stream: Stream, body: bytes, send: Send, receive: Receive, *, client_gone: asyncio.Event | None = None
) -> None:
    """Relay one request (already opened as ``stream``) and its answer.

    Raises ``NotStarted`` when the stream fails before the answer began, so the
    caller can answer with an error (or try another app service).
    """
    try:
        if body:
            await stream.send(body)
        await stream.end()
        first = await stream.recv()
    except (StreamReset, TunnelClosed) as e:
        raise NotStarted(str(e)) from None
    if first is None:
        raise NotStarted("the app service ended the stream without answering")
    start = orjson.loads(first)
    await send(
        {
            "type": "http.response.start",
            "status": int(start["status"]),
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in start["headers"]],
        }
    )
    watcher = asyncio.create_task(_watch_disconnect(receive, stream))
    try:
        while True:
            try:
                chunk = await stream.recv()
            except (StreamReset, TunnelClosed) as e:
                log.debug("tunnel stream ended mid-response", extra={"reason": str(e)})
                break
            if chunk is None:
                break
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        with contextlib.suppress(OSError, RuntimeError):
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        await stop_tasks(watcher)
        if not stream.done:
            stream.reset("done")


async def _watch_disconnect(receive: Receive, stream: Stream) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            stream.reset("client disconnected")
            return


# ------------------------------------------------------------ app service


async def serve(stream: Stream, handler: Callable[[dict[str, Any], Receive, Send], Awaitable[None]]) -> None:
    """Answer one ``kind: http`` stream by running ``handler(header, receive, send)``."""
    body_done = False
    started = False

    async def receive() -> dict[str, Any]:
        nonlocal body_done
        if not body_done:
            try:
                parts: list[bytes] = []
                while True:
                    chunk = await stream.recv()
                    if chunk is None:
                        break
                    parts.append(chunk)
            except (StreamReset, TunnelClosed):
                return {"type": "http.disconnect"}
            body_done = True
            return {"type": "http.request", "body": b"".join(parts), "more_body": False}
        await stream.wait_done()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal started
        t = message["type"]
        if t == "http.response.start":
            started = True
            head = {
                "status": message["status"],
                "headers": [
                    (k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", ())
                ],
            }
            await stream.send(orjson.dumps(head))
        elif t == "http.response.body":
            data = message.get("body", b"")
            if data:
                await stream.send(data)
            if not message.get("more_body", False):
                await stream.end()

    try:
        await handler(stream.header, receive, send)  # type: ignore[arg-type]
    except (StreamReset, TunnelClosed):
        return
    except Exception as e:
        log.exception("tunnelled request failed")
        if not started:
            body = jsonrpc.error_response(None, jsonrpc.INTERNAL_ERROR, f"app service error: {e}")
            head = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in error_headers(502, "gateway")]
            with contextlib.suppress(StreamReset, TunnelClosed):
                await stream.send(orjson.dumps({"status": 502, "headers": head}))
                await stream.send(body)
                await stream.end()
        else:
            stream.reset(f"app service error: {e}")
