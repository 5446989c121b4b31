"""The proxy's listener: HTTPS (TLS 1.2+) serving the front (MCP data path, web API).

The HTTP server is ours (``proxy/h1.py``) unless ``proxy_service.http_server`` says
``uvicorn``.

The socket is bound before anything else starts, so a busy port is a clear
start-up error, and ``port 0`` works for tests (``ProxyService.port`` tells
which port was picked).  Without a configured certificate, one is ordered over ACME
(``proxy_service.acme``, ``proxy/acme.py``) or issued by the cluster's host CA for
``localhost``, the loopback addresses, this host's name and the public address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn

from bastion._listen import bind_tcp, start_uvicorn
from bastion.auth.ca import issue_server_cert
from bastion.auth.server import AuthServer
from bastion.config import ACMEConfig
from bastion.errors import ConfigError
from bastion.proxy import acme, h1
from bastion.proxy.front import ASGI, Front
from bastion.proxy.webapi import RequestContext, build_webapi

if TYPE_CHECKING:
    from bastion.proxy.routing import Router

log = logging.getLogger("bastion.proxy")

#: Builds the web UI: ``(public_addr, front) -> ASGI app`` (decision 0041).
UIFactory = Callable[[str, ASGI], ASGI]


@dataclass(frozen=True)
class ProxySettings:
    host: str
    port: int
    public_addr: str
    data_dir: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    allowed_origins: tuple[str, ...] = ()
    #: ``bastion`` (proxy/h1.py, the default) or ``uvicorn``.
    http_server: str = "bastion"
    #: Order the certificate over ACME (when enabled and no cert_file is given).
    acme: ACMEConfig | None = None


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the service owns signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def split_host_port(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep:
        raise ValueError(f'address "{addr}" has no port')
    return host.strip("[]"), int(port)


def _bind(host: str, port: int) -> socket.socket:
    try:
        return bind_tcp(host, port)
    except OSError as e:
        raise ConfigError(
            "proxy_service.listen_addr", f"cannot listen on {host}:{port}: {e.strerror}"
        ) from None


class ProxyService:
    def __init__(
        self,
        auth: AuthServer,
        settings: ProxySettings,
        *,
        router: Router | None = None,
        audit: object | None = None,
        tunnel_addr: Callable[[], str] = lambda: "",
        ui: UIFactory | None = None,
    ) -> None:
        """``ui(public_addr, front)``: the web UI's ASGI app, given the proxy's public address and
        its front (for MCP requests the UI makes in process); built by ``service.py``."""
        self.auth = auth
        self.ui = ui
        self.settings = settings
        self.router = router
        self.audit = audit
        self.tunnel_addr = tunnel_addr
        self._sock: socket.socket | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._h1: h1.Server | None = None
        self._ctx: ssl.SSLContext | None = None
        self._renewal: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        assert self._sock is not None, "start() first"
        return int(self._sock.getsockname()[1])

    def _tls_files(self) -> tuple[Path, Path]:
        s = self.settings
        if s.cert_file and s.key_file:
            return s.cert_file, s.key_file
        hosts = ["localhost", "127.0.0.1", "::1", socket.gethostname()]
        pub_host = split_host_port(s.public_addr)[0] if s.public_addr else ""
        for h in (pub_host, s.host):
            if h and h not in ("0.0.0.0", "::"):
                hosts.insert(0, h)
        issued = issue_server_cert(self.auth.cas["host"], hosts=hosts, now=self.auth.clock.now())
        tls_dir = s.data_dir / "proxy"
        tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cert, key = tls_dir / "tls.crt", tls_dir / "tls.key"
        # The key file is created 0600 before anything is written to it.
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(issued.key_pem)
        cert.write_bytes(issued.cert_pem + self.auth.cas["host"].cert_pem)
        return cert, key

    async def start(self) -> None:
        s = self.settings
        self._sock = _bind(s.host, s.port)
        ordered = s.acme is not None and s.acme.enabled and s.cert_file is None
        if ordered:
            assert s.acme is not None
            cert, key = await acme.ensure(s.data_dir, s.acme, now=self.auth.clock.now())
        else:
            cert, key = self._tls_files()

        def tls_context(config: uvicorn.Config | None = None, default: object = None) -> ssl.SSLContext:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(str(cert), str(key))
            ctx.set_alpn_protocols(["http/1.1"])
            self._ctx = ctx  # a renewed certificate is loaded into it in place
            return ctx

        if ordered:
            assert s.acme is not None
            self._renewal = asyncio.create_task(
                acme.renew_forever(s.data_dir, s.acme, cert, self._load_cert), name="acme-renewal"
            )

        public = s.public_addr or f"{s.host}:{self.port}"
        webapi = RequestContext(
            build_webapi(
                self.auth,
                public_addr=public,
                audit=self.audit,
                registry=self.router,
                tunnel_addr=self.tunnel_addr,
                not_ready=self._not_ready,
            )
        )
        origins = frozenset({f"https://{public}", *s.allowed_origins})
        app = Front(auth=self.auth, webapi=webapi, router=self.router, allowed_origins=origins)
        if self.ui is not None:
            app.ui = RequestContext(self.ui(public, app))
        if s.http_server == "bastion":
            self._h1 = await h1.serve(self._sock, app, ssl_ctx=tls_context(), shutdown_timeout=5)
            log.info("proxy listening", extra={"addr": f"https://{s.host}:{self.port}"})
            return
        config = uvicorn.Config(
            app,
            http="httptools",
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            date_header=False,
            # We trust no X-Forwarded-* headers (and skip the per-request work of reading them).
            proxy_headers=False,
            ssl_certfile=str(cert),
            ssl_keyfile=str(key),
            ssl_context_factory=tls_context,
            timeout_graceful_shutdown=5,
        )
        self._server = _Server(config)
        self._task = await start_uvicorn(self._server, self._sock, name="proxy-http")
        log.info("proxy listening", extra={"addr": f"https://{s.host}:{self.port}"})

    def _not_ready(self) -> str:
        hosts = self.router.hosts if self.router is not None else None
        return hosts.reason if hosts is not None else ""

    def _load_cert(self, cert: Path, key: Path) -> None:
        """New handshakes use the renewed certificate; open connections keep theirs."""
        if self._ctx is not None:
            self._ctx.load_cert_chain(str(cert), str(key))
            log.info("proxy certificate reloaded", extra={"cert": str(cert)})

    async def wait(self) -> None:
        if self._h1:
            await self._h1.wait_closed()
        if self._task:
            await self._task

    async def stop(self) -> None:
        if self._renewal is not None:
            self._renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewal
        if self._h1:
            self._h1.close()
            await self._h1.wait_closed()
        if self._server:
            self._server.should_exit = True
        if self._task:
            await self._task
