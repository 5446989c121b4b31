"""Composition root: start the services a configuration enables, in one process.

    Cluster.start(cfg) -> backend -> auth service -> proxy service (-> app service, next)

Nothing here decides policy or speaks a protocol; it wires parts together,
owns their tasks, runs housekeeping (expiry and compaction of the backend),
and stops everything in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from bastion import __version__
from bastion.appservice.dynamic import DynamicApps
from bastion.appservice.mcp_http import Limits, MCPHandler
from bastion.appservice.registry import AppRegistry
from bastion.audit.emitter import AuditLog
from bastion.audit.redact import DEFAULT_SECRET_KEYS, Redactor
from bastion.audit.store import SQLiteAuditStore
from bastion.auth.ca import fingerprint
from bastion.auth.server import AuthServer
from bastion.backend import Backend, Item
from bastion.backend.factory import open_backend
from bastion.client.local import PROXY_ADDR_KEY, settings_from
from bastion.config import Config, split_addr
from bastion.errors import BastionError, ConfigError
from bastion.proxy.server import ProxyService, ProxySettings

log = logging.getLogger("bastion.service")


class AppServiceParts:
    """The in-process app service: its registry, audit log and MCP handler."""

    def __init__(
        self, registry: AppRegistry, audit: AuditLog, handler: MCPHandler, dynamic: DynamicApps
    ) -> None:
        self.registry = registry
        self.audit = audit
        self.handler = handler
        self.dynamic = dynamic

    @classmethod
    async def start(cls, cfg: Config, auth: AuthServer) -> AppServiceParts:
        a = cfg.app_service
        registry = AppRegistry((app.to_app() for app in a.apps), demo=a.demo_server)
        store = await SQLiteAuditStore.open(cfg.bastion.data_dir)
        audit = AuditLog(store)
        limits = Limits(
            max_body=a.max_body,
            sessions_per_user=a.sessions_per_user,
            idle_timeout=a.idle_timeout.total_seconds(),
            response_timeout=a.response_timeout.total_seconds(),
        )
        redactor = Redactor((*DEFAULT_SECRET_KEYS, *a.audit_redact_keys))
        handler = MCPHandler(auth=auth, registry=registry, audit=audit, redact=redactor, limits=limits)
        handler.start()
        dynamic = DynamicApps(
            auth.backend, registry, [r.labels for r in a.resources], on_removed=handler.end_app_sessions
        )
        dynamic.start()
        log.info("app service started", extra={"apps": ",".join(x.metadata.name for x in registry.all())})
        return cls(registry, audit, handler, dynamic)

    async def aclose(self) -> None:
        await self.dynamic.aclose()
        await self.handler.aclose()
        await self.audit.close()


EXPIRE_EVERY = 30.0
COMPACT_EVERY = 600.0


class Cluster:
    """The running services of one process."""

    def __init__(
        self,
        cfg: Config,
        backend: Backend,
        auth: AuthServer,
        proxy: ProxyService | None,
        apps: AppServiceParts | None = None,
    ) -> None:
        self.cfg = cfg
        self.backend = backend
        self.auth = auth
        self.proxy = proxy
        self.apps = apps
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def start(cls, cfg: Config) -> Cluster:
        if not cfg.auth_service.enabled:
            raise ConfigError(
                "auth_service.enabled",
                "running without the auth service (an app service joining a remote cluster) "
                "is not supported by this version yet",
            )
        data_dir = cfg.bastion.data_dir
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        backend = await open_backend(cfg.auth_service.backend, data_dir)
        apps: AppServiceParts | None = None
        try:
            auth = await AuthServer.open(backend, cfg.bastion.cluster_name, settings_from(cfg))
            if cfg.app_service.enabled:
                apps = await AppServiceParts.start(cfg, auth)
            proxy = None
            if cfg.proxy_service.enabled:
                host, port = split_addr(cfg.proxy_service.listen_addr, allow_zero=True)
                tls = cfg.proxy_service.tls
                proxy = ProxyService(
                    auth,
                    ProxySettings(
                        host=host,
                        port=port,
                        public_addr=cfg.proxy_service.public_addr,
                        data_dir=data_dir,
                        cert_file=tls.cert_file,
                        key_file=tls.key_file,
                        allowed_origins=tuple(cfg.proxy_service.allowed_origins),
                    ),
                    mcp=apps.handler if apps else None,
                    registry=apps.registry if apps else None,
                    audit=apps.audit if apps else None,
                )
                await proxy.start()
        except BaseException:
            if apps is not None:
                await apps.aclose()
            await backend.close()
            raise
        cluster = cls(cfg, backend, auth, proxy, apps)
        if proxy is not None:
            await backend.put(Item(PROXY_ADDR_KEY, cluster.proxy_addr.encode()))
        cluster._tasks.append(asyncio.create_task(cluster._housekeeping(), name="backend-housekeeping"))
        log.info(
            "cluster started",
            extra={
                "cluster": auth.cluster_name,
                "version": __version__,
                "ca_fingerprint": fingerprint(auth.cas["host"].cert_pem),
            },
        )
        return cluster

    @property
    def proxy_addr(self) -> str:
        """The address clients use (``host:port``, with the real port when 0 was asked)."""
        assert self.proxy is not None
        pub = self.cfg.proxy_service.public_addr
        if pub:
            return pub
        host = self.proxy.settings.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"{host}:{self.proxy.port}"

    async def _housekeeping(self) -> None:
        expire = getattr(self.backend, "expire", None)
        compact = getattr(self.backend, "compact", None)
        loop = asyncio.get_running_loop()
        next_compact = loop.time() + COMPACT_EVERY
        while True:
            await asyncio.sleep(EXPIRE_EVERY)
            try:
                if expire is not None:
                    await expire()
                if compact is not None and loop.time() >= next_compact:
                    await compact()
                    next_compact = loop.time() + COMPACT_EVERY
            except BastionError as e:
                log.warning("backend housekeeping failed; will retry", extra={"error": e.message})

    async def wait(self) -> None:
        if self.proxy:
            await self.proxy.wait()
        else:
            await asyncio.Event().wait()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self.proxy:
            await self.proxy.stop()
        if self.apps:
            await self.apps.aclose()
        await self.backend.close()
        log.info("cluster stopped")


async def serve(cfg: Config) -> None:
    """Run until SIGINT or SIGTERM."""
    cluster = await Cluster.start(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.create_task(cluster.wait(), name="cluster-wait")
    stopper = asyncio.create_task(stop.wait(), name="stop-signal")
    try:
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        log.info("shutting down")
        await cluster.stop()
        if waiter.done() and not waiter.cancelled() and waiter.exception():
            raise waiter.exception()  # type: ignore[misc]
        waiter.cancel()
