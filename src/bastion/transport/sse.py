"""The legacy HTTP+SSE upstream (MCP 2024-11-05): GET an event stream, POST messages to its endpoint.

``connect_sse`` opens ``GET url`` (``Accept: text/event-stream``), waits for
the first ``endpoint`` event, and returns an :class:`SSEUpstream` (a
:class:`~bastion.transport.MessageStream`): ``send`` POSTs one message to the
endpoint, ``receive`` returns the data of each ``message`` event.

Security: the endpoint URL comes from the upstream, and the user's messages
(with the caller's headers, which may carry a signed identity assertion) are
POSTed to it, so an endpoint on another origin (scheme, host, port) than
``url`` is refused.

HTTP client choices: one ``httpx.AsyncClient`` per upstream session (this is
not the hot path); ``trust_env=False``, so the gateway's environment does not
silently add proxies or ``.netrc`` credentials; no redirects (a redirect could
lead to another origin).  With a ``guard`` (dynamic apps), every TCP connect
resolves the host through it and dials only the addresses it allowed (see
``bastion.transport.guard``).  The event stream has no read timeout, on purpose:
an idle SSE stream is normal, and idle sessions are the session layer's
business.  Every other wait (connect, response headers, the endpoint event,
each POST) has one.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

from bastion.errors import UpstreamError
from bastion.transport import Inbox, UpstreamClosedError
from bastion.transport.guard import AddressGuard

__all__ = ["SSEUpstream", "connect_sse"]

DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024
#: How much of an error response body is quoted in an error message.
_ERROR_BODY = 300
#: How much of a successful POST's body we read (and ignore) so the connection can be reused.
_MAX_ACK_BODY = 64 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}

log = logging.getLogger("bastion.upstream.sse")


# --------------------------------------------------------------------------- SSE framing


@dataclass(frozen=True, slots=True)
class _Event:
    event: str
    data: bytes
    id: str | None


_EOL = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


class _SSEParser:
    """Incremental ``text/event-stream`` parser (WHATWG HTML §9.2.6): bytes in, events out.

    Chunks may split anywhere, even between ``\\r`` and ``\\n``.  Lines end in
    ``\\r\\n``, ``\\r`` or ``\\n``; ``data`` lines of one event are joined with
    ``\\n``; comment lines (``:``) and unknown fields are ignored; an event with
    no data is not dispatched; the event type defaults to ``message``.  Data is
    kept as bytes (the splitters are ASCII, so UTF-8 is never cut).  A line or
    an event larger than ``max_event`` raises ``UpstreamError``.
    """

    def __init__(self, max_event: int = DEFAULT_MAX_MESSAGE) -> None:
        self._max = max_event
        self._buf = bytearray()
        self._scanned = 0
        self._skip_lf = False  # the last chunk ended in "\r": a leading "\n" belongs to it
        self._started = False
        self._event = b""
        self._data: list[bytes] = []
        self._size = 0
        self._last_id: str | None = None

    def feed(self, chunk: bytes) -> list[_Event]:
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        buf = self._buf
        buf += chunk
        if not self._started:
            # A UTF-8 byte order mark may open the stream: wait until we know, then drop it.
            if len(buf) < len(_BOM) and _BOM.startswith(buf):
                return []
            self._started = True
            if buf.startswith(_BOM):
                del buf[: len(_BOM)]
        events: list[_Event] = []
        start = 0
        for m in _EOL.finditer(buf, self._scanned):
            if m.end() == len(buf) and m.group() == b"\r":
                self._skip_lf = True
            event = self._line(bytes(buf[start : m.start()]))
            if event is not None:
                events.append(event)
            start = m.end()
        del buf[:start]
        self._scanned = len(buf)
        if len(buf) > self._max:
            raise UpstreamError(f"upstream sent a message larger than {self._max} bytes")
        return events

    def _line(self, line: bytes) -> _Event | None:
        if not line:
            return self._dispatch()
        if line.startswith(b":"):
            return None
        name, sep, value = line.partition(b":")
        if sep and value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            self._size += len(value) + 1
            if self._size > self._max + 1:
                raise UpstreamError(f"upstream sent a message larger than {self._max} bytes")
            self._data.append(value)
        elif name == b"event":
            self._event = value
        elif name == b"id" and b"\0" not in value:
            self._last_id = value.decode("utf-8", "replace")
        return None

    def _dispatch(self) -> _Event | None:
        data, event = self._data, self._event
        self._data, self._event, self._size = [], b"", 0
        if not data:
            return None
        return _Event(
            event=event.decode("utf-8", "replace") or "message",
            data=data[0] if len(data) == 1 else b"\n".join(data),
            id=self._last_id,
        )


# --------------------------------------------------------------------------- helpers


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port or _DEFAULT_PORTS.get(url.scheme)


def _display(url: httpx.URL) -> str:
    """``url`` without user info and query, which may hold secrets, for messages and logs."""
    return str(url.copy_with(userinfo=b"", query=None, fragment=None))


async def _read_some(resp: httpx.Response, limit: int) -> bytes:
    out = bytearray()
    async for chunk in resp.aiter_bytes():
        out += chunk
        if len(out) >= limit:
            break
    return bytes(out[:limit])


def _snippet(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    return f": {text[:_ERROR_BODY]}" if text else ""


# --------------------------------------------------------------------------- the upstream


async def connect_sse(
    url: str,
    *,
    headers: Mapping[str, str],
    verify: bool | ssl.SSLContext,
    connect_timeout: float = 10,
    endpoint_timeout: float = 10,
    post_timeout: float = 60,
    max_message: int = DEFAULT_MAX_MESSAGE,
    guard: AddressGuard | None = None,
) -> SSEUpstream:
    """Open the event stream at ``url`` and wait for its ``endpoint`` event.

    ``headers`` are sent with the GET and with every POST (the caller's
    rewrite headers and identity assertion; see :meth:`SSEUpstream.set_headers`).
    ``connect_timeout`` bounds the TCP/TLS connect; ``endpoint_timeout``
    bounds the wait for the response headers and, again, for the ``endpoint``
    event; ``post_timeout`` bounds each POST.  Raises ``UpstreamError`` when
    the server is unreachable, answers other than 200 ``text/event-stream``,
    sends no endpoint in time, or names an endpoint on another origin;
    ``ForbiddenAddressError`` when ``guard`` refuses the address.
    """
    try:
        base = httpx.URL(url)
    except httpx.InvalidURL as e:
        raise UpstreamError(f"invalid upstream SSE URL: {e}") from None
    if base.scheme not in _DEFAULT_PORTS or not base.host:
        raise UpstreamError(f"invalid upstream SSE URL {_display(base)}: expected http(s)://host/...")
    client = httpx.AsyncClient(
        verify=verify,
        transport=None if guard is None else _guarded_transport(guard, verify),
        trust_env=False,
        follow_redirects=False,
        timeout=httpx.Timeout(post_timeout, connect=connect_timeout),
    )
    upstream: SSEUpstream | None = None
    try:
        upstream = SSEUpstream(
            client, base, headers=headers, endpoint_timeout=endpoint_timeout, max_message=max_message
        )
        await upstream._open()
        return upstream
    except BaseException:
        if upstream is not None:
            await upstream.aclose()
        else:
            await client.aclose()
        raise


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend with every TCP connect going through an ``AddressGuard``."""

    def __init__(self, guard: AddressGuard) -> None:
        self._guard = guard
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await self._guard.resolve(host, port)
        for i, address in enumerate(addresses):
            try:
                return await self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout):
                if i == len(addresses) - 1:
                    raise
        raise httpcore.ConnectError(f"no address for {host}")  # resolve() never returns none

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not dialled for dynamic apps")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def _guarded_transport(guard: AddressGuard, verify: bool | ssl.SSLContext) -> httpx.AsyncHTTPTransport:
    transport = httpx.AsyncHTTPTransport(verify=verify, trust_env=False)
    # httpx offers no way to pass httpcore a network backend: replace the pool it built
    # with the same one plus ours (tests/unit/transport/test_sse.py checks the dial).
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=httpx.create_ssl_context(verify=verify, trust_env=False),
        network_backend=_GuardedBackend(guard),
    )
    return transport


class SSEUpstream:
    """A legacy HTTP+SSE MCP session (see :class:`~bastion.transport.MessageStream`).

    Owns the HTTP client, the open GET response and the task reading it.
    Built by :func:`connect_sse`.
    """

    upstream_session_id: str

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: httpx.URL,
        *,
        headers: Mapping[str, str],
        endpoint_timeout: float,
        max_message: int,
    ) -> None:
        self.upstream_session_id = ""
        self._client = client
        self._url = url
        self._headers = dict(headers)
        self._endpoint_timeout = endpoint_timeout
        self._parser = _SSEParser(max_message)
        self._inbox = Inbox()
        self._endpoint: httpx.URL | None = None
        self._endpoint_ready: asyncio.Future[httpx.URL] = asyncio.get_running_loop().create_future()
        self._response: httpx.Response | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None

    @property
    def endpoint(self) -> str:
        """The URL messages are POSTed to (``""`` before the endpoint event)."""
        return "" if self._endpoint is None else str(self._endpoint)

    def set_headers(self, headers: Mapping[str, str]) -> None:
        """Replace the headers sent with later POSTs (e.g. a renewed identity assertion)."""
        self._headers = dict(headers)

    # ------------------------------------------------------------- opening

    async def _open(self) -> None:
        shown = _display(self._url)
        request = self._client.build_request(
            "GET",
            self._url,
            headers={**self._headers, "Accept": "text/event-stream", "Cache-Control": "no-cache"},
            # No read timeout on the stream itself (see the module docstring); the headers
            # and the endpoint event are bounded below.
            timeout=httpx.Timeout(None, connect=self._client.timeout.connect),
        )
        try:
            async with asyncio.timeout(self._endpoint_timeout):
                response = await self._client.send(request, stream=True)
        except TimeoutError:
            raise UpstreamError(
                f"upstream SSE server {shown} sent no response headers within {self._endpoint_timeout:g}s"
            ) from None
        except httpx.ConnectTimeout:
            raise UpstreamError(f"cannot connect to upstream SSE server {shown}: connect timed out") from None
        except httpx.HTTPError as e:
            reason = str(e) or type(e).__name__
            raise UpstreamError(f"cannot connect to upstream SSE server {shown}: {reason}") from None
        self._response = response
        if response.status_code != 200:
            try:
                async with asyncio.timeout(self._endpoint_timeout):
                    body = await _read_some(response, _ERROR_BODY)
            except (TimeoutError, httpx.HTTPError):
                body = b""  # the status alone says enough
            raise UpstreamError(
                f"upstream SSE server answered GET {shown} with HTTP {response.status_code}{_snippet(body)}"
            )
        ctype = response.headers.get("content-type", "")
        if ctype.split(";")[0].strip().lower() != "text/event-stream":
            raise UpstreamError(
                f"upstream SSE server answered GET {shown} with content type "
                f'"{ctype or "(none)"}", not text/event-stream'
            )
        self._reader = asyncio.create_task(self._read(response), name=f"sse-reader:{shown}")
        try:
            async with asyncio.timeout(self._endpoint_timeout):
                endpoint = await asyncio.shield(self._endpoint_ready)
        except TimeoutError:
            raise UpstreamError(
                f"upstream SSE server sent no endpoint event within {self._endpoint_timeout:g}s"
            ) from None
        self._endpoint = endpoint
        self.upstream_session_id = endpoint.params.get("sessionId", "")
        log.debug("SSE upstream connected", extra={"url": shown, "endpoint": _display(endpoint)})

    def _resolve_endpoint(self, data: bytes) -> httpx.URL:
        text = data.decode("utf-8", "replace").strip()
        try:
            endpoint = self._url.join(text)
        except httpx.InvalidURL as e:
            raise UpstreamError(f'upstream SSE server sent an invalid endpoint "{text[:200]}": {e}') from None
        if _origin(endpoint) != _origin(self._url):
            raise UpstreamError(
                f"upstream SSE server sent an endpoint on another origin ({_display(endpoint)}); "
                f"refusing to post messages outside {_display(self._url.copy_with(path='/'))}"
            )
        return endpoint

    # ------------------------------------------------------------- the event stream

    async def _read(self, response: httpx.Response) -> None:
        """Own the GET response: parse events, hand ``message`` data to the inbox until it ends."""
        final: UpstreamError
        try:
            async for chunk in response.aiter_bytes():
                for event in self._parser.feed(chunk):
                    await self._on_event(event)
            final = UpstreamClosedError("upstream SSE server closed the event stream")
        except UpstreamError as e:
            final = e
        except httpx.HTTPError as e:
            final = UpstreamClosedError(f"upstream SSE event stream failed: {str(e) or type(e).__name__}")
        except Exception as e:
            log.error("SSE reader failed", exc_info=e)
            final = UpstreamError(f"reading the upstream SSE event stream failed: {e}")
        self._inbox.close(final)
        if not self._endpoint_ready.done():
            self._endpoint_ready.set_exception(type(final)(final.message))
            # connect_sse may already have given up waiting; don't warn about an unread exception.
            self._endpoint_ready.exception()

    async def _on_event(self, event: _Event) -> None:
        if event.event == "endpoint":
            if self._endpoint_ready.done():
                log.warning("upstream SSE server sent a second endpoint event; ignored")
                return
            # Raises for a bad endpoint, which ends the reader (and the connect).
            self._endpoint_ready.set_result(self._resolve_endpoint(event.data))
        elif event.event == "message":
            await self._inbox.put(event.data)
        else:
            log.debug("ignored SSE event from upstream", extra={"event": event.event[:100]})

    # ------------------------------------------------------------- messages

    async def send(self, raw: bytes) -> None:
        """POST ``raw`` to the endpoint; any 2xx is success (servers answer 202)."""
        if self._closer is not None:
            raise UpstreamClosedError("upstream connection already closed by the gateway")
        closed = self._inbox.final_error()
        if isinstance(closed, UpstreamClosedError):
            raise closed
        assert self._endpoint is not None, "send before connect_sse returned"
        shown = _display(self._endpoint)
        try:
            async with self._client.stream(
                "POST",
                self._endpoint,
                content=raw,
                headers={**self._headers, "Content-Type": "application/json"},
            ) as response:
                if not 200 <= response.status_code < 300:
                    body = await _read_some(response, _ERROR_BODY)
                    raise UpstreamError(
                        f"upstream SSE server rejected a message: POST {shown} answered "
                        f"HTTP {response.status_code}{_snippet(body)}"
                    )
                await _read_some(response, _MAX_ACK_BODY)
        except httpx.TimeoutException:
            raise UpstreamError(f"upstream SSE server did not answer POST {shown} in time") from None
        except httpx.HTTPError as e:
            reason = str(e) or type(e).__name__
            raise UpstreamError(f"POST {shown} to the upstream SSE server failed: {reason}") from None

    async def receive(self) -> bytes:
        """The data of the next ``message`` event; ``UpstreamClosedError`` once the stream ended."""
        return await self._inbox.get()

    # ------------------------------------------------------------- shutdown

    async def aclose(self) -> None:
        """Stop the reader, close the event stream and the HTTP client.  Idempotent."""
        if self._closer is None:
            self._inbox.close(UpstreamClosedError("upstream connection closed by the gateway"), discard=True)
            self._closer = asyncio.create_task(self._shutdown(), name=f"sse-close:{_display(self._url)}")
        await asyncio.shield(self._closer)

    async def _shutdown(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            # wait(), not await: the reader's CancelledError is not ours to raise or swallow.
            await asyncio.wait((self._reader,))
        if not self._endpoint_ready.done():
            self._endpoint_ready.cancel()
        try:
            if self._response is not None:
                await self._response.aclose()
        finally:
            await self._client.aclose()
