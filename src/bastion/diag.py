"""The diagnostics listener (``bastion.diag_addr``): ``/metrics``, ``/healthz``, ``/readyz``.

Plain HTTP on its own socket, apart from the proxy, so that a scraper or a
load balancer's health check needs no certificate and no credential.  That
is also why it must listen on a private address: nothing here is
authenticated, and ``/metrics`` names the apps this node serves.

* ``GET /metrics``: the registry of ``bastion.metrics`` in the Prometheus
  text format (OpenMetrics when the scraper asks for it).
* ``GET /healthz``: 200 ``ok`` while the process serves at all (liveness).
* ``GET /readyz``: 200 when the ``ready`` callable says True (within
  ``READY_TIMEOUT`` seconds), else 503 (readiness); 200 without a callable.

``HEAD`` works like ``GET`` without a body; other methods get 405, other
paths 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Generator
from typing import Final

import uvicorn
from prometheus_client.exposition import choose_encoder
from starlette.types import Receive, Scope, Send

from bastion._listen import bind_tcp, start_uvicorn
from bastion.errors import ConfigError
from bastion.metrics import REGISTRY

__all__ = ["READY_TIMEOUT", "DiagServer"]

log = logging.getLogger("bastion.diag")

#: Seconds ``ready()`` may take before ``/readyz`` answers 503.
READY_TIMEOUT: Final = 5.0

_TEXT: Final = b"text/plain; charset=utf-8"


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the service owns signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class DiagServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` over plain HTTP on ``host:port``.

    ``await start()`` binds (port 0: any free port, then read ``.port``) and
    serves; ``await stop()`` ends it.  A busy or unusable address is a
    ``ConfigError`` naming ``bastion.diag_addr``.
    """

    def __init__(self, host: str, port: int, *, ready: Callable[[], Awaitable[bool]] | None = None) -> None:
        self.host = host
        self.port = port
        self._ready = ready
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def addr(self) -> str:
        """``http://host:port`` (the real port once started)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        try:
            sock = bind_tcp(self.host, self.port, backlog=64)
        except OSError as e:
            raise ConfigError(
                "bastion.diag_addr", f"cannot listen on {self.host}:{self.port}: {e.strerror or e}"
            ) from None
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self,
            http="httptools",
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=2,
        )
        self._server = _Server(config)
        try:
            self._task = await start_uvicorn(self._server, sock, name="diag-http")
        except BaseException:
            _close(sock)
            raise
        log.info("diag listening", extra={"addr": self.addr})

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            await self._task
            self._task = None

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method = scope["method"]
        path = scope["path"]
        if path not in ("/metrics", "/healthz", "/readyz"):
            await _answer(send, method, 404, _TEXT, b"not found: try /metrics, /healthz or /readyz\n")
            return
        if method not in ("GET", "HEAD"):
            await _answer(send, method, 405, _TEXT, b"method not allowed\n", [(b"allow", b"GET, HEAD")])
            return
        if path == "/metrics":
            accept = ""
            for name, value in scope["headers"]:
                if name == b"accept":
                    accept = value.decode("latin-1")
            encoder, content_type = choose_encoder(accept)
            await _answer(send, method, 200, content_type.encode(), encoder(REGISTRY))
        elif path == "/healthz":
            await _answer(send, method, 200, _TEXT, b"ok\n")
        elif await self._is_ready():
            await _answer(send, method, 200, _TEXT, b"ready\n")
        else:
            await _answer(send, method, 503, _TEXT, b"not ready\n")

    async def _is_ready(self) -> bool:
        if self._ready is None:
            return True
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                return bool(await self._ready())
        except Exception as e:  # a failing check means "not ready", never a 500
            log.warning("readiness check failed", extra={"error": str(e) or type(e).__name__})
            return False


async def _answer(
    send: Send,
    method: str,
    status: int,
    content_type: bytes,
    body: bytes,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
