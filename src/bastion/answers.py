"""Writing HTTP answers on the MCP data path: JSON, JSON-RPC errors that say whose fault, and SSE.

Every JSON-RPC error the gateway writes on the data path (the proxy's front door and routing,
the MCP handler, a tunnelled request) is built here, so each carries the
``X-Bastion-Error-Origin`` header (``client``, ``gateway`` or ``upstream``) and, for a 401, the
``WWW-Authenticate`` challenge.  The web API's errors have their own shape (``proxy/errors.py``).

:class:`Answer` is one HTTP answer to one ASGI request, with the headers every part of it
carries (``Mcp-Session-Id`` on the answer that starts a session).
"""

from __future__ import annotations

from typing import Any

from starlette.types import Send

from bastion.protocol import jsonrpc
from bastion.protocol.sse import encode_event

ORIGIN_HEADER = b"x-bastion-error-origin"
JSON = b"application/json"
SSE = b"text/event-stream"
CHALLENGE = b'Bearer realm="bastion", error="invalid_token"'
NO_HEADERS: list[tuple[bytes, bytes]] = []  # never changed

Headers = list[tuple[bytes, bytes]]


def error_headers(status: int, origin: str) -> Headers:
    """The headers of an error answer: its JSON type, whose fault, and the challenge for a 401."""
    out = [(b"content-type", JSON), (ORIGIN_HEADER, origin.encode())]
    if status == 401:
        out.append((b"www-authenticate", CHALLENGE))
    return out


def rpc_code_for(status: int) -> int:
    """The JSON-RPC code of an error answer made by the gateway with no more specific one."""
    return jsonrpc.INVALID_REQUEST if status < 500 else jsonrpc.INTERNAL_ERROR


async def send_body(
    send: Send, status: int, headers: Headers, body: bytes, extra: Headers = NO_HEADERS
) -> None:
    """A whole answer: ``headers``, then ``extra``, then its length."""
    hs = (
        [*headers, *extra, (b"content-length", b"%d" % len(body))]
        if extra
        else [*headers, (b"content-length", b"%d" % len(body))]
    )
    await send({"type": "http.response.start", "status": status, "headers": hs})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_jsonrpc_error(
    send: Send,
    status: int,
    message: str,
    origin: str,
    *,
    code: int | None = None,
    mid: Any = None,
    extra: Headers = NO_HEADERS,
    data: Any = None,
) -> None:
    """A JSON-RPC error answer (``code`` defaults to -32600 below 500, else -32603)."""
    body = jsonrpc.error_response(mid, rpc_code_for(status) if code is None else code, message, data)
    await send_body(send, status, error_headers(status, origin), body, extra)


class Answer:
    """The answer to one request: a JSON body, an empty status, an error, or an SSE stream."""

    __slots__ = ("extra", "send")

    def __init__(self, send: Send, extra: Headers = NO_HEADERS) -> None:
        self.send = send
        #: Headers on whatever is answered (``Mcp-Session-Id`` when the request began a session).
        self.extra = extra

    async def json(self, status: int, body: bytes) -> None:
        extra = self.extra
        if extra:
            hs = [(b"content-type", JSON), *extra, (b"content-length", b"%d" % len(body))]
        else:
            hs = [(b"content-type", JSON), (b"content-length", b"%d" % len(body))]
        await self.send({"type": "http.response.start", "status": status, "headers": hs})
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    async def empty(self, status: int) -> None:
        await send_body(self.send, status, NO_HEADERS, b"", self.extra)

    async def whole(self, status: int, headers: Headers, body: bytes) -> None:
        await send_body(self.send, status, headers, body, self.extra)

    async def failed(self, status: int, body: bytes, origin: str) -> None:
        """An error answer whose JSON-RPC body is made already (by the engine, with the request's id)."""
        await send_body(self.send, status, error_headers(status, origin), body, self.extra)

    async def error(
        self, status: int, message: str, origin: str, *, code: int | None = None, mid: Any = None
    ) -> None:
        await send_jsonrpc_error(self.send, status, message, origin, code=code, mid=mid, extra=self.extra)

    async def start_sse(self) -> None:
        await self.send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", SSE),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),
                    *self.extra,
                ],
            }
        )

    async def event(self, raw: bytes, *, id: str | None = None, event: str | None = "message") -> None:
        """One SSE event carrying one JSON-RPC message."""
        await self.send(
            {"type": "http.response.body", "body": encode_event(raw, id=id, event=event), "more_body": True}
        )

    async def chunk(self, body: bytes) -> None:
        """Bytes of an SSE stream as they are (an event made already, a priming event)."""
        await self.send({"type": "http.response.body", "body": body, "more_body": True})

    async def finish(self, body: bytes = b"") -> None:
        await self.send({"type": "http.response.body", "body": body, "more_body": False})
