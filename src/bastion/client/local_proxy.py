"""``bastion proxy mcp``: a local streamable-HTTP listener that adds the user's credential.

Listens on 127.0.0.1 only. Every request to ``/`` or ``/mcp`` is carried to
``https://<proxy>/mcp/apps/<app>`` with ``Authorization: Bearer`` from the login profile
(re-read when it changes, so a new ``bastion login`` applies without a restart), over one
keep-alive pool that accepts what the profile's ``Trust`` accepts (the system trust store
or the pinned cluster CA). Bodies and SSE streams are passed through as they arrive.
Browser requests from any origin but this listener's own (``http://`` + ``localhost``,
``127.0.0.1`` or ``[::1]`` + its port) are refused (403): another local web server's page
(``http://localhost:8080``) or a DNS-rebinding page must not borrow the user's credential.
Requests without ``Origin`` (MCP clients that are not browsers) are served.

No tracebacks in normal operation: an SSE stream the cluster cuts (a restart) ends for the
client with one warning line; the proxy unreachable is a 502 and one line; on Ctrl-C or
SIGTERM open streams are ended (not cancelled mid-way) and the listener stops with one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

import orjson
from starlette.types import Receive, Scope, Send

from bastion._time import utcnow
from bastion.client import profile as profiles
from bastion.errors import AuthenticationError, BastionError
from bastion.transport.http import HTTPUpstreamPool, UpstreamCertificateError, UpstreamResponse

log = logging.getLogger("bastion.client.proxy")


_PASS = frozenset(
    {
        b"content-type",
        b"accept",
        b"mcp-session-id",
        b"mcp-protocol-version",
        b"last-event-id",
        b"mcp-method",
        b"mcp-name",
    }
)
_DROP_BACK = frozenset({b"content-length", b"transfer-encoding", b"connection", b"keep-alive"})
_EXPIRED = (
    "your bastion credential expired: run `bastion login` in a terminal; "
    "there is no need to restart this proxy or your MCP client"
)


class CredentialSource:
    """The bearer token, from an identity file or the login profile (reloaded when it changes)."""

    def __init__(self, *, identity: Path | None, proxy: str | None) -> None:
        self.identity = identity
        self.proxy = proxy
        self._prof: profiles.Profile | None = None
        self.reload()

    def reload(self) -> profiles.Profile:
        if self.identity is not None:
            prof = profiles.load_identity(str(self.identity))
            if self.proxy:
                prof.proxy = self.proxy
        else:
            found = profiles.load_current(self.proxy)
            if found is None:
                raise AuthenticationError("not logged in: run `bastion login --proxy=HOST:PORT --user=NAME`")
            prof = found
        self._prof = prof
        return prof

    def token(self) -> str:
        prof = self._prof
        if prof is None or prof.is_expired(utcnow()):
            prof = self.reload()  # a new login may have replaced it
        if prof.is_expired(utcnow()):
            raise AuthenticationError(_EXPIRED)
        return prof.token

    @property
    def profile(self) -> profiles.Profile:
        assert self._prof is not None
        return self._prof


class LocalMCPProxy:
    """ASGI app forwarding MCP requests to one app through the cluster proxy."""

    def __init__(self, app_name: str, creds: CredentialSource, *, port: int) -> None:
        prof = creds.profile
        self.app_name = app_name
        self.creds = creds
        self.port = port
        self.pool = HTTPUpstreamPool(
            f"https://{prof.proxy}",
            ssl_context=prof.trust().context(),
            response_timeout=600.0,
        )
        self.target = f"/mcp/apps/{app_name}"
        #: Set when the listener stops: open streams end instead of being cancelled mid-way.
        self.closing = asyncio.Event()
        #: The MCP versions the clients were seen to speak (each logged once).
        self.versions: set[bytes] = set()

    async def aclose(self) -> None:
        await self.pool.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"].rstrip("/") or "/"
        if path not in ("/", "/mcp"):
            await _error(send, 404, f"not found: this proxy serves MCP at / and /mcp (app {self.app_name})")
            return
        headers: list[tuple[bytes, bytes]] = []
        for k, v in scope["headers"]:
            lk = k.lower()
            if lk == b"origin":
                origin = v.decode("latin-1")
                if not own_origin(origin, self.port):
                    shown = origin[:200]
                    log.warning("request from a foreign origin refused", extra={"origin": shown})
                    await _error(send, 403, f"origin {shown!r} is not allowed (only this proxy's own)")
                    return
            elif lk == b"host":
                # DNS rebinding: a page on evil.example that resolves to 127.0.0.1 sends its own
                # name as Host (browsers add Origin to POSTs, but not every request has one).
                host = v.decode("latin-1")
                if not own_origin(f"http://{host}", self.port):
                    shown = host[:200]
                    log.warning("request for a foreign host name refused", extra={"host": shown})
                    await _error(send, 403, f"host {shown!r} is not this proxy (use localhost:{self.port})")
                    return
            elif lk in _PASS:
                headers.append((lk, v))
                if lk == b"mcp-protocol-version" and v not in self.versions and len(self.versions) < 8:
                    self.versions.add(v)
                    version = v.decode("latin-1")[:32]
                    how = "no session" if version >= "2026" else "in a session"
                    log.info(
                        "an MCP client speaks %s (%s); passed to %s as it is", version, how, self.app_name
                    )
        body = b""
        if scope["method"] == "POST":
            chunks = []
            while True:
                msg = await receive()
                chunks.append(msg.get("body", b""))
                if not msg.get("more_body"):
                    break
            body = b"".join(chunks)
        try:
            token = self.creds.token()
        except BastionError as e:
            await _error(send, 401, e.message)
            return
        headers.append((b"authorization", b"Bearer " + token.encode()))
        try:
            resp = await self.pool.request(scope["method"], self.target, headers, body)
        except UpstreamCertificateError as e:
            refusal = self.creds.profile.trust().refusal(self.creds.profile.proxy, e.verify_message)
            await _error(send, 502, f"cannot reach the bastion proxy: {refusal}")
            return
        except BastionError as e:
            log.warning("cannot reach the bastion proxy: %s", e.message)
            await _error(send, 502, f"cannot reach the bastion proxy: {e.message}")
            return
        try:
            out = [(k, v) for k, v in resp.headers if k.lower() not in _DROP_BACK]
            streaming = resp.content_type.startswith("text/event-stream")
            if not streaming:
                data = await resp.read()
                out.append((b"content-length", str(len(data)).encode()))
                await send({"type": "http.response.start", "status": resp.status, "headers": out})
                await send({"type": "http.response.body", "body": data, "more_body": False})
                return
            await send({"type": "http.response.start", "status": resp.status, "headers": out})
            await self._relay(resp, send)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await resp.aclose()

    def stop(self) -> None:
        """End the open streams now (the listener is stopping): each client sees its stream end."""
        self.closing.set()

    async def _relay(self, resp: UpstreamResponse, send: Send) -> None:
        """Pass an SSE stream on as it comes, until it ends, is cut, or the listener stops."""
        chunks = resp.iter_chunks().__aiter__()
        stopping = asyncio.ensure_future(self.closing.wait())
        try:
            while True:
                nxt = asyncio.ensure_future(chunks.__anext__())
                await asyncio.wait({nxt, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():
                    nxt.cancel()
                    await asyncio.gather(nxt, return_exceptions=True)
                    return
                try:
                    chunk = nxt.result()
                except StopAsyncIteration:
                    return
                except BastionError as e:
                    log.warning("the cluster cut a stream of %s: %s", self.app_name, e.message)
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finally:
            stopping.cancel()


_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def own_origin(origin: str, port: int) -> bool:
    """Whether ``origin`` is this listener's own: ``http``, a loopback spelling, exactly ``port``."""
    try:
        parts = urlsplit(origin)
        origin_port = parts.port
    except ValueError:
        return False
    return (
        parts.scheme == "http"
        and (parts.hostname or "") in _LOOPBACK_NAMES
        and origin_port == port
        and not parts.username
        and not parts.password
        and parts.path in ("", "/")
        and not parts.query
        and not parts.fragment
    )


async def _error(send: Send, status: int, message: str) -> None:
    body = orjson.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": message}})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def serve(app_name: str, creds: CredentialSource, *, port: int, ready: Callable[[int], None]) -> None:
    import uvicorn

    from bastion._listen import bind_tcp, start_uvicorn

    try:
        sock = bind_tcp("127.0.0.1", port, backlog=256)
    except OSError as e:
        raise BastionError(f"cannot listen on 127.0.0.1:{port}: {e.strerror}") from None
    real_port = sock.getsockname()[1]
    app = LocalMCPProxy(app_name, creds, port=real_port)
    config = uvicorn.Config(
        app,
        http="httptools",
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        # Open SSE streams would otherwise hold a stopped proxy forever.
        timeout_graceful_shutdown=2,
    )
    loop = asyncio.get_running_loop()

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if not self.should_exit:
                what = "interrupted" if sig == signal.SIGINT else f"signal {signal.Signals(sig).name}"
                log.info("stopping (%s)", what)
                loop.call_soon_threadsafe(app.stop)
            super().handle_exit(sig, frame)

    try:
        task = await start_uvicorn(Server(config), sock, name="local MCP proxy")
        ready(real_port)
        await task
    finally:
        with contextlib.suppress(Exception):
            await app.aclose()
