"""Streamable-HTTP upstreams: each client POST, GET and DELETE becomes one upstream HTTP exchange.

A reverse proxy with the engine in the middle: the forwarded message goes out on the app's
shared keep-alive pool (``transport/http.py``) with the session's headers (the client's,
minus what never passes, plus the upstream identity); what comes back — one JSON answer, or
an SSE stream relayed event by event, never buffered whole — passes through the engine
before the client sees it.  The upstream's own ``Mcp-Session-Id`` is kept per session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import orjson
from starlette.types import Receive

from bastion._time import Clock
from bastion.answers import JSON, ORIGIN_HEADER, SSE, Answer
from bastion.appservice.executor import Collected, Executor
from bastion.appservice.sessions import GatewaySession, session_headers
from bastion.appservice.upstream import ClientPost
from bastion.audit.bound import MAX_QUOTE, clip
from bastion.errors import UpstreamError
from bastion.metrics import upstream_error_kind
from bastion.protocol.sse import EventTooLargeError, SSEParser, encode_event
from bastion.session.engine import ForwardToUpstream, SendToClient
from bastion.transport.http import HTTPUpstreamPool, PreparedHeaders

log = logging.getLogger("bastion.app")
_DEFAULT_ACCEPT = b"application/json, text/event-stream"
#: Reasons a session ends after which the upstream's session is over already (or ended by the client).
_UPSTREAM_ENDED = frozenset({"client ended the session"})


class HTTPUpstream:
    """The upstream of one session on a streamable-HTTP MCP server."""

    def __init__(self, pool: HTTPUpstreamPool, path: str, ex: Executor, clock: Clock) -> None:
        self.pool = pool
        #: The path of the app's MCP endpoint on its origin.
        self.path = path
        self.ex = ex
        self.clock = clock
        self.in_flight = 0
        #: The headers of a POST upstream, validated and encoded, rebuilt only when what
        #: they are made of changes.
        self.post_hdrs: PreparedHeaders | None = None
        self.post_key: tuple[Any, ...] = ()
        #: The upstream said it no longer knows the session (nothing to DELETE there).
        self.forgotten = False

    @property
    def busy(self) -> bool:
        return self.in_flight > 0

    async def start(self, s: GatewaySession) -> None:
        return None

    #: Every message of an HTTP upstream is read by the POST or GET it answers: they wait.
    defers = False

    def to_client_after(self, barrier: asyncio.Future[None], cmd: SendToClient) -> None:
        raise AssertionError("an HTTP upstream's messages are read by a POST or GET, which waits")

    def to_client(self, cmd: SendToClient) -> None:
        # The client's server-to-client stream is the upstream's own GET stream, relayed:
        # a message the gateway makes outside a POST's answer has no way to the client.
        log.debug("no stream to deliver a gateway message on (streamable HTTP upstream); dropped")

    def forward(self, cmd: ForwardToUpstream) -> None:
        log.error("a forward outside a client's message was dropped", extra={"method": cmd.message.method})

    # --------------------------------------------------------------- headers

    def _headers(
        self, s: GatewaySession, headers: dict[bytes, bytes], *, accept: bytes
    ) -> list[tuple[bytes, bytes]]:
        out = list(session_headers(s, headers)[1]) if headers else []
        out.append((b"accept", accept))
        if s.upstream_session_id:
            out.append((b"mcp-session-id", s.upstream_session_id.encode()))
        out += s.ident.encoded_headers(self.clock.now())
        return out

    def _post_headers(self, s: GatewaySession, headers: dict[bytes, bytes]) -> PreparedHeaders:
        """The headers of a POST upstream: ``_headers`` plus the content type,
        validated and encoded once and reused while their parts are the same objects."""
        passed = session_headers(s, headers)[1]
        ident = s.ident.encoded_headers(self.clock.now())
        accept = headers.get(b"accept", _DEFAULT_ACCEPT)
        key = self.post_key
        prepared = self.post_hdrs
        if (
            prepared is None
            or key[0] is not passed
            or key[1] is not ident
            or key[2] != accept
            or key[3] != s.upstream_session_id
        ):
            out = list(passed)
            out.append((b"accept", accept))
            if s.upstream_session_id:
                out.append((b"mcp-session-id", s.upstream_session_id.encode()))
            out += ident
            out.append((b"content-type", JSON))
            prepared = self.post_hdrs = PreparedHeaders(out)
            self.post_key = (passed, ident, accept, s.upstream_session_id)
        return prepared

    # ------------------------------------------------------------------ POST

    async def exchange(
        self, s: GatewaySession, fwd: ForwardToUpstream, answer: Answer, post: ClientPost
    ) -> None:
        self.in_flight += 1
        try:
            await self._exchange(s, fwd, answer, post)
        finally:
            self.in_flight -= 1

    async def _exchange(
        self, s: GatewaySession, fwd: ForwardToUpstream, answer: Answer, post: ClientPost
    ) -> None:
        ex = self.ex
        request_id = fwd.message.id
        sent_at = time.perf_counter()
        try:
            resp = await self.pool.request(
                "POST", post.target or self.path, self._post_headers(s, post.headers), fwd.raw
            )
        except ValueError as e:
            # The request could not be written (a header or target the pool refuses): our fault,
            # since client input is checked before; the call is still completed in the audit log.
            log.error("upstream request not built", extra={"session_id": s.id, "error": str(e)[:200]})
            body = await ex.fail_request(s, request_id, "the gateway could not build the upstream request")
            await answer.failed(500, body, "gateway")
            return
        except UpstreamError as e:
            s.m.upstream_error(upstream_error_kind(e))
            body = await ex.fail_request(s, request_id, e.message)
            await answer.failed(e.http_status, body, "upstream")
            return
        if fwd.message.kind == "request":  # as for message streams: requests only, not notifications
            s.m.latency.observe(time.perf_counter() - sent_at)
        streaming = False  # the SSE answer began: an error can no longer be a status code
        try:
            usid = resp.header(b"mcp-session-id")
            if usid and not s.upstream_session_id:
                s.upstream_session_id = usid.decode("latin-1")
                await ex.run(s, s.engine.upstream_session_known(s.upstream_session_id))
            ctype = (resp.header(b"content-type") or b"").split(b";")[0].strip().lower()
            status = resp.status
            if ctype == JSON and status < 400 and status != 202:
                # 200, or another 2xx or 3xx with a JSON body: answered as a 200.
                got = Collected()
                await ex.upstream_sent(s, await resp.read(), got)
                if got.replies:
                    await answer.json(200, got.replies[0].raw)
                else:
                    await answer.error(502, "the upstream answered with an unexpected message", "upstream")
                return
            early: bytes | None = None  # the body, when read here already
            if status in (400, 404) and s.upstream_session_id and not post.new:
                early = await resp.read()
                if status == 404 or _about_the_session(early):
                    await self._forgotten(s, status, early, answer)
                    return
            if status == 202:
                await resp.aclose()
                await answer.empty(202)
                return
            if status >= 400 or ctype not in (JSON, SSE):
                data = early if early is not None else await resp.read()
                if ctype in (JSON, SSE):
                    # JSON-RPC under an error status: the client reads what the engine made of it
                    # (filtered, canonical), never the upstream's bytes, nor events it did not see.
                    got = Collected()
                    if ctype == JSON and data:
                        await ex.upstream_sent(s, data, got)
                    body = (
                        got.replies[0].raw
                        if got.replies
                        else await ex.fail_request(
                            s, request_id, f"the upstream MCP server answered with HTTP status {status}"
                        )
                    )
                    await answer.whole(status, [(b"content-type", JSON), (ORIGIN_HEADER, b"upstream")], body)
                    return
                if fwd.message.kind == "request":  # no JSON-RPC answer will come: the call is over
                    await ex.fail_request(
                        s,
                        request_id,
                        f"the upstream MCP server answered HTTP {status} without a JSON-RPC message",
                    )
                await answer.whole(
                    status, [(b"content-type", ctype or b"text/plain"), (ORIGIN_HEADER, b"upstream")], data
                )
                return
            streaming = True  # relay starts the answer before anything else
            await self._relay(s, answer, resp)
        except (UpstreamError, EventTooLargeError) as e:
            # The upstream broke off mid-answer, or sent an event over the limit: fail the call
            # through the engine (audit completed as failed), and tell the client whose fault it was.
            s.m.upstream_error(upstream_error_kind(e))
            body = await ex.fail_request(s, request_id, e.message)
            if not streaming:
                await answer.failed(e.http_status, body, "upstream")
            else:
                await answer.finish(encode_event(body, event="message"))
        finally:
            resp.close()

    async def _forgotten(self, s: GatewaySession, status: int, body: bytes, answer: Answer) -> None:
        """The upstream no longer knows the session (it restarted, or expired it): the session
        ends — its calls still waiting are failed and audited with the reason, their ids freed —
        and the client hears 404, so that it starts a new session with ``initialize`` (decision
        0039).  Not re-initialized behind its back: the upstream's state of the session is gone."""
        if not s.dead:
            self.forgotten = True
            said = _said(body)
            await self.ex.end(
                s,
                f"the upstream MCP server no longer knows the session (HTTP {status}"
                + (f": {said}" if said else "")
                + "); it may have restarted",
            )
        await answer.error(
            404,
            f"the upstream MCP server no longer knows this session ({s.dead}): "
            "start a new one with initialize",
            "upstream",
            code=-32001,
        )

    async def _relay(self, s: GatewaySession, answer: Answer, resp: Any) -> None:
        """Upstream SSE → client SSE, event by event, each message through the engine.

        Never buffered whole: each event is written as soon as it is parsed.
        """
        await answer.start_sse()
        parser = SSEParser()
        async for chunk in resp.iter_chunks():
            for ev in parser.feed(chunk):
                if not ev.data:
                    await answer.chunk(encode_event(b"", id=ev.id, retry=ev.retry))
                    continue
                got = Collected()
                await self.ex.upstream_sent(s, ev.data, got)
                for c in got.replies:
                    await answer.event(c.raw, id=ev.id, event=ev.event or None)
        await answer.finish()

    # ------------------------------------------------------------------- GET

    async def listen(
        self, s: GatewaySession, answer: Answer, receive: Receive, headers: dict[bytes, bytes]
    ) -> None:
        resp = await self.pool.request("GET", self.path, self._headers(s, headers, accept=SSE))
        try:
            ctype = (resp.header(b"content-type") or b"").split(b";")[0].strip().lower()
            if resp.status != 200 or ctype != SSE:
                data = await resp.read()
                if (
                    resp.status in (400, 404)
                    and s.upstream_session_id
                    and (resp.status == 404 or _about_the_session(data))
                ):
                    await self._forgotten(s, resp.status, data, answer)
                    return
                await answer.whole(
                    resp.status,
                    [(b"content-type", ctype or b"text/plain"), (ORIGIN_HEADER, b"upstream")],
                    data,
                )
                return
            try:
                await self._relay(s, answer, resp)
            except (UpstreamError, EventTooLargeError) as e:
                # The upstream's fault, not the client's: the stream ends (the client may GET again).
                s.m.upstream_error(upstream_error_kind(e))
                log.warning("upstream stream ended", extra={"session_id": s.id, "error": e.message})
                await answer.finish()
        finally:
            await resp.aclose()

    # ------------------------------------------------------------------- end

    async def client_ended(self, s: GatewaySession, headers: dict[bytes, bytes]) -> None:
        if not s.upstream_session_id:
            return
        with contextlib.suppress(UpstreamError):
            resp = await self.pool.request("DELETE", self.path, self._headers(s, headers, accept=JSON))
            await resp.aclose()

    async def stop(self, s: GatewaySession) -> None:
        return None  # each exchange ends with its own POST

    async def release(self, s: GatewaySession, reason: str) -> None:
        if not s.upstream_session_id or reason in _UPSTREAM_ENDED or self.forgotten:
            return
        # Reaped or shut down: end the upstream's session too (best effort).
        with contextlib.suppress(Exception):
            resp = await asyncio.wait_for(
                self.pool.request("DELETE", self.path, self._headers(s, {}, accept=JSON)), 5.0
            )
            await resp.aclose()


def _about_the_session(body: bytes) -> bool:
    """Whether a 400 answer is about the session id (a server that lost its sessions answers
    400 "No valid session ID provided", as the TypeScript SDK's examples do), not the message."""
    return b"session" in body[:_SNIFF].lower()


def _said(body: bytes) -> str:
    """What the upstream said, from its JSON-RPC error (bounded), or its text: for the reason."""
    text = body[:_SNIFF].decode("utf-8", "replace")
    try:
        doc = orjson.loads(body)
        if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
            text = str(doc["error"].get("message", ""))
    except orjson.JSONDecodeError:
        pass
    return clip(" ".join(text.split()), MAX_QUOTE)


#: How much of an upstream's error answer is looked at.
_SNIFF = 4096
