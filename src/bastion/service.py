"""Composition root: start the services a configuration enables, in one process.

    Cluster.start(cfg) -> backend -> auth service -> proxy service (-> app service, next)

Nothing here decides policy or speaks a protocol; it wires parts together,
owns their tasks, runs housekeeping (expiry and compaction of the backend),
and stops everything in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import signal
import socket
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from bastion import __version__, metrics
from bastion._tasks import stop_tasks
from bastion._time import Clock, SystemClock
from bastion.appservice.dynamic import DynamicApps
from bastion.appservice.executor import RateCounter
from bastion.appservice.hostcheck import Host, check_static_apps
from bastion.appservice.hostpolicy import HostPolicy
from bastion.appservice.mcp_http import Limits, MCPHandler
from bastion.appservice.pins import PinBook, PinSource
from bastion.appservice.registry import AppRegistry
from bastion.appservice.revocation import Access, AccessWatch
from bastion.audit import unfinished
from bastion.audit.chain import Signer, signer_of
from bastion.audit.emitter import AuditLog
from bastion.audit.export import Exporter, FileSink, HttpSink, Lease, Sink, Source, file_lease
from bastion.audit.redact import DEFAULT_SECRET_KEYS, Redactor
from bastion.audit.refusals import Refusals
from bastion.audit.sqlite_store import SQLiteAuditStore
from bastion.audit.store import AuditStore
from bastion.auth import outbox
from bastion.auth.ca import CertAuthority, fingerprint
from bastion.auth.pins import PinStore
from bastion.auth.server import PROXY_ADDR_KEY, AuthServer, settings_from
from bastion.backend import Backend, Item
from bastion.backend.factory import open_backend
from bastion.backend.rates import LocalRates
from bastion.config import Config, split_addr
from bastion.diag import DiagServer
from bastion.errors import BastionError
from bastion.proxy.front import ASGI
from bastion.proxy.hosts import Hosts
from bastion.proxy.routing import Router
from bastion.proxy.server import ProxyService, ProxySettings, UIFactory
from bastion.resources import AppServer, AppServerSpec, Metadata
from bastion.tunnel.agent import (
    Agent,
    HostCreds,
    TunnelAppsView,
    TunnelAuditStore,
    join,
    load_creds,
    peer_creds,
)
from bastion.tunnel.pins import TunnelPinSource, TunnelRates
from bastion.tunnel.server import HEARTBEAT_EVERY, HEARTBEAT_TTL, TunnelServer
from bastion.webui import build_webui

log = logging.getLogger("bastion.service")


class AppServiceParts:
    """An app service: its registry, audit log, MCP handler and dynamic apps."""

    def __init__(
        self,
        registry: AppRegistry,
        audit: AuditLog,
        handler: MCPHandler,
        dynamic: DynamicApps,
        tag: str,
    ) -> None:
        self.registry = registry
        self.audit = audit
        self.handler = handler
        self.dynamic = dynamic
        self.tag = tag
        #: Ends sessions whose user lost their app (only where the backend is at hand).
        self.access_watch: AccessWatch | None = None

    def watch_access(self, backend: Backend, access: Access) -> None:
        self.access_watch = AccessWatch(backend, access, self.handler.end_unauthorised_sessions)
        self.access_watch.start()

    @classmethod
    async def start(
        cls,
        cfg: Config,
        *,
        cluster_name: str,
        clock: Clock,
        jwt_ca: CertAuthority | None,
        audit: AuditLog,
        apps_source: Any,
        tag: str,
        on_change: Callable[[], None] = lambda: None,
        pins: PinSource | None = None,
        rates: RateCounter | None = None,
    ) -> AppServiceParts:
        a = cfg.app_service
        registry = AppRegistry((app.to_app() for app in a.apps), demo=a.demo_server, on_change=on_change)
        limits = Limits(
            max_body=a.max_body,
            sessions_per_user=a.sessions_per_user,
            idle_timeout=a.idle_timeout.total_seconds(),
            response_timeout=a.response_timeout.total_seconds(),
        )
        redactor = Redactor((*DEFAULT_SECRET_KEYS, *a.audit_redact_keys))
        host = HostPolicy(a.dynamic_apps, a.stdio_limits, trusted=registry.is_static, host=Host.this())
        _warn_gateway_user(host)
        book = PinBook(pins) if pins is not None else None
        if book is not None:
            book.start()
        handler = MCPHandler(
            cluster_name=cluster_name,
            clock=clock,
            jwt_ca=jwt_ca,
            registry=registry,
            audit=audit,
            redact=redactor,
            limits=limits,
            session_tag=tag,
            host=host,
            pins=book,
            rates=rates,
        )
        handler.start()
        dynamic = DynamicApps(
            apps_source,
            registry,
            [r.labels for r in a.resources],
            on_removed=handler.end_app_sessions,
            on_redefined=handler.end_redefined_sessions,
            policy=host,
        )
        dynamic.start()
        log.info("app service started", extra={"apps": ",".join(x.metadata.name for x in registry.all())})
        return cls(registry, audit, handler, dynamic, tag)

    async def aclose(self) -> None:
        if self.access_watch is not None:
            await self.access_watch.aclose()
        await self.dynamic.aclose()
        await self.handler.aclose()
        if self.handler.pins is not None:
            await self.handler.pins.aclose()


def _rate_counter(backend: Backend) -> RateCounter:
    """PostgreSQL keeps the cluster's rate limit buckets; on SQLite this node is the only one."""
    return cast(RateCounter, backend) if hasattr(backend, "take") else LocalRates()


def _warn_gateway_user(host: HostPolicy) -> None:
    if host.gateway_user in host.dynamic.run_as:
        log.warning(
            "app_service.dynamic_apps.run_as lists the user bastion runs as: a dynamic stdio app "
            "running as it can read the data directory and the cluster's keys",
            extra={"user": host.gateway_user},
        )


def _guard_own_listeners(apps: AppServiceParts, cfg: Config, *bound: tuple[str, int] | None) -> None:
    """Tell the address guard where this process listens: dynamic apps may never dial it."""
    guard = apps.handler.host.guard
    auth_host, auth_port = split_addr(cfg.auth_service.listen_addr, allow_zero=True)
    for addr in (*bound, (auth_host, auth_port)):
        if addr is not None and addr[1]:
            guard.add_listener(*addr)


EXPIRE_EVERY = 30.0
COMPACT_EVERY = 600.0
#: Seconds between two audit retention runs (``audit.retention``).
RETENTION_EVERY = 3600.0
#: How often (seconds, at most) the audit log is swept for calls left without an outcome.
UNFINISHED_EVERY = 60.0
#: A joined app service's queue of call outcomes not yet committed by a proxy (data dir).
OUTCOME_QUEUE = "audit-outcomes.db"


class Cluster:
    """The running services of one process."""

    def __init__(
        self,
        cfg: Config,
        backend: Backend | None,
        auth: AuthServer | None,
        proxy: ProxyService | None,
        apps: AppServiceParts | None = None,
        *,
        audit: AuditLog | None = None,
        audit_store: AuditStore | None = None,
        tunnels: TunnelServer | None = None,
        agent: Agent | None = None,
        diag: DiagServer | None = None,
    ) -> None:
        self.cfg = cfg
        self.backend = backend
        self.auth = auth
        self.proxy = proxy
        self.apps = apps
        self.audit = audit
        #: The store under ``audit`` when this process opened it (closed after the log).
        self.audit_store = audit_store
        self.tunnels = tunnels
        self.agent = agent
        self.diag = diag
        self._tasks: list[asyncio.Task[None]] = []
        self._proxy_id = ""
        #: A node's own app service serving the other nodes' proxies (shared backend only).
        self.peer: Agent | None = None
        #: Tells joined app services when users or roles change (a proxy with a tunnel listener).
        self.access_notices: AccessWatch | None = None

    @classmethod
    async def start(cls, cfg: Config) -> Cluster:
        if cfg.app_service.enabled:
            # Before anything is created or listens: a stdio app the host cannot run is
            # a configuration error (ConfigError naming the key), not a failure at call time.
            check_static_apps(cfg.app_service, Host.this())
        data_dir = cfg.bastion.data_dir
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not cfg.auth_service.enabled:
            return await cls._start_agent(cfg)
        backend = await open_backend(cfg.auth_service.backend, data_dir)
        apps: AppServiceParts | None = None
        audit: AuditLog | None = None
        store: AuditStore | None = None
        tunnels: TunnelServer | None = None
        proxy: ProxyService | None = None
        diag: DiagServer | None = None
        hosts: Hosts | None = None
        local_tag = secrets.token_hex(4)
        peer: Agent | None = None
        try:
            auth = await AuthServer.open(backend, cfg.bastion.cluster_name, settings_from(cfg))
            # A node with every service on a shared backend is one of several: its app service
            # also serves the other nodes' proxies, over their tunnels, as a joined one would
            # (decision 0030). Its identity (and so the route tag of its sessions) comes first.
            peer_id: HostCreds | None = None
            if _shares_backend(cfg):
                peer_id = peer_creds(
                    auth.cas["host"],
                    data_dir / "peer",
                    cluster_name=auth.cluster_name,
                    now=auth.clock.now(),
                    ttl=auth.settings.host_cert_ttl,
                )
                local_tag = peer_id.tag
            # Seals are signed with the cluster's JWT key (decision 0032).
            store = await _open_audit_store(cfg, signer_of(auth.cas["jwt"].private_key_pem))
            audit = AuditLog(store)
            # Cluster events (logins, changes, joins) are recorded by the auth server itself.
            auth.audit = audit
            metrics.register_audit_queue(lambda: audit.queue_depth if audit is not None else 0)
            router: Router | None = None

            peer_ref: list[Agent] = []

            def changed() -> None:
                if peer_ref:
                    peer_ref[0].apps_changed()

            if cfg.app_service.enabled:
                apps = await AppServiceParts.start(
                    cfg,
                    cluster_name=auth.cluster_name,
                    clock=auth.clock,
                    jwt_ca=auth.cas["jwt"],
                    audit=audit,
                    apps_source=backend,
                    tag=local_tag,
                    on_change=changed,
                    pins=PinStore(backend, auth.clock),
                    rates=_rate_counter(backend),
                )
                apps.watch_access(backend, auth.checker_of)
            if cfg.proxy_service.enabled:
                host, port = split_addr(cfg.proxy_service.listen_addr, allow_zero=True)
                t_host, t_port = cfg.proxy_service.effective_tunnel_listen
                advertised: list[str] = []
                tunnels = TunnelServer(
                    auth,
                    audit,
                    host=t_host,
                    port=t_port,
                    data_dir=data_dir,
                    proxy_addr=lambda: advertised[0] if advertised else "",
                    on_change=changed,
                    local_static=apps.registry.static_apps if apps else dict,
                )
                await tunnels.start()
                tunnel_public = _tunnel_public(cfg, t_host, tunnels.port)
                advertised.append(tunnel_public)
                # Not ready, and no session of a live app service answered 404, until the app
                # services the backend lists as alive have connected (decision 0036).
                hosts = Hosts(
                    auth,
                    tunnels,
                    own_tag=local_tag if apps else "",
                    peers_dial_in=cfg.auth_service.backend.type == "postgres",
                )
                hosts.start()
                router = Router(
                    auth,
                    local=apps.handler if apps else None,
                    local_registry=apps.registry if apps else None,
                    local_tag=local_tag,
                    tunnels=tunnels,
                    # Refusals at the front are audited with the local app service's recorder
                    # (one rate limit per source for the process), or one of the proxy's own.
                    refusals=apps.handler.refusals
                    if apps
                    else Refusals(audit, cluster_name=auth.cluster_name, clock=auth.clock),
                    hosts=hosts,
                )
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
                        http_server=cfg.proxy_service.http_server,
                        acme=cfg.proxy_service.acme,
                    ),
                    router=router,
                    audit=audit,
                    tunnel_addr=lambda: tunnel_public,
                    ui=_web_ui(auth, router, audit),
                )
                await proxy.start()
                if peer_id is not None and apps is not None:
                    own_tunnel = frozenset({tunnel_public})
                    peer = Agent(
                        peer_id,
                        data_dir / "peer",
                        _public(cfg, proxy.port),
                        apps.registry,
                        handler=apps.handler,
                        discover=auth.proxies,
                        skip=lambda: own_tunnel,
                    )
                    peer_ref.append(peer)
                    peer.start()
            if cfg.bastion.diag_addr:

                async def ready() -> bool:
                    await backend.current_revision()  # raises BackendError while the database is down
                    return router is None or router.hosts is None or router.hosts.ready

                diag = DiagServer(*split_addr(cfg.bastion.diag_addr, allow_zero=True), ready=ready)
                await diag.start()
        except BaseException:
            if diag is not None:
                await diag.stop()
            if peer is not None:
                await peer.aclose()
            if proxy is not None:
                await proxy.stop()
            if hosts is not None:
                await hosts.aclose()
            if tunnels is not None:
                await tunnels.stop()
            if apps is not None:
                await apps.aclose()
            if audit is not None:
                await audit.close()
            if store is not None:
                await store.close()
            await backend.close()
            raise
        if apps is not None:
            _guard_own_listeners(
                apps,
                cfg,
                (proxy.settings.host, proxy.port) if proxy is not None else None,
                (tunnels.host, tunnels.port) if tunnels is not None else None,
                (diag.host, diag.port) if diag is not None else None,
            )
        cluster = cls(
            cfg, backend, auth, proxy, apps, audit=audit, audit_store=store, tunnels=tunnels, diag=diag
        )
        cluster.peer = peer
        if tunnels is not None:
            # Joined app services cannot follow the backend: this proxy tells them when users
            # or roles change, and they re-check their live sessions (decision 0025).
            tunnel_server = tunnels

            async def tell_app_services(_access: Access) -> None:
                await tunnel_server.access_changed()

            cluster.access_notices = AccessWatch(backend, auth.checker_of, tell_app_services)
            cluster.access_notices.start()
        if proxy is not None:
            await backend.put(Item(PROXY_ADDR_KEY, cluster.proxy_addr.encode()))
        cluster._tasks.append(asyncio.create_task(cluster._housekeeping(), name="backend-housekeeping"))
        # What local administration did (while this node ran, or before it started) reaches the log.
        cluster._tasks.append(asyncio.create_task(outbox.follow(backend, audit), name="audit-outbox"))
        if store is not None:
            cluster._tasks.append(
                asyncio.create_task(
                    cluster._audit_unfinished(cfg.audit.unknown_outcome_after), name="audit-unknown-outcomes"
                )
            )
        if cfg.audit.retention is not None and store is not None:
            cluster._tasks.append(
                asyncio.create_task(cluster._audit_retention(cfg.audit.retention), name="audit-retention")
            )
        if cfg.audit.export is not None and store is not None:
            for exporter in _audit_exporters(cfg, store):
                cluster._tasks.append(
                    asyncio.create_task(exporter.run(), name=f"audit-export-{exporter.sink.name}")
                )
        if apps is not None:
            cluster._tasks.append(asyncio.create_task(cluster._local_heartbeat(), name="app-heartbeat"))
        if proxy is not None:
            cluster._tasks.append(asyncio.create_task(cluster._proxy_heartbeat(), name="proxy-heartbeat"))
        log.info(
            "cluster started",
            extra={
                "cluster": auth.cluster_name,
                "version": __version__,
                "ca_fingerprint": fingerprint(auth.cas["host"].cert_pem),
            },
        )
        return cluster

    @classmethod
    async def _start_agent(cls, cfg: Config) -> Cluster:
        """An app service alone: join through the proxy, then serve over the tunnel."""
        data_dir = cfg.bastion.data_dir
        proxy_addr = cfg.bastion.proxy_server
        creds = load_creds(data_dir)
        if creds is None or creds.expires <= datetime.now(UTC):
            # The token is read only to join: once joined, the host certificate is what counts
            # (renewed over the tunnel), and the token file may be gone.
            creds = await join(data_dir, proxy_addr, cfg.bastion.join_params.read_token(), cfg.bastion.ca_pin)
        registry_ref: list[Agent] = []

        def changed() -> None:
            if registry_ref:
                registry_ref[0].apps_changed()

        placeholder = AppRegistry()
        agent = Agent(creds, data_dir, proxy_addr, placeholder)
        registry_ref.append(agent)
        # Outcomes no proxy takes at once wait in a queue in the data dir (kept across restarts).
        tunnel_audit = TunnelAuditStore(agent, queue=data_dir / OUTCOME_QUEUE)
        tunnel_audit.start()
        audit = AuditLog(tunnel_audit)
        apps = await AppServiceParts.start(
            cfg,
            cluster_name=creds.cluster_name,
            clock=SystemClock(),
            jwt_ca=None,
            audit=audit,
            apps_source=TunnelAppsView(agent),
            tag=creds.tag,
            on_change=changed,
            pins=TunnelPinSource(agent),
            rates=TunnelRates(agent),
        )
        agent.registry = apps.registry
        agent.handler = apps.handler
        # A proxy says when users or roles change; sessions that lost their app end then.
        agent.end_unauthorised = apps.handler.end_unauthorised_sessions
        agent.start()
        metrics.register_audit_queue(lambda: audit.queue_depth)
        diag: DiagServer | None = None
        if cfg.bastion.diag_addr:

            async def ready() -> bool:
                return agent.connected.is_set()  # the tunnel to the proxy is up

            diag = DiagServer(*split_addr(cfg.bastion.diag_addr, allow_zero=True), ready=ready)
            try:
                await diag.start()
            except BaseException:
                await agent.aclose()
                await apps.aclose()
                await audit.close()
                await tunnel_audit.close()
                raise
        _guard_own_listeners(apps, cfg, (diag.host, diag.port) if diag is not None else None)
        log.info(
            "app service started as an agent",
            extra={"cluster": creds.cluster_name, "host_id": creds.host_id, "proxy": proxy_addr},
        )
        return cls(cfg, None, None, None, apps, audit=audit, audit_store=tunnel_audit, agent=agent, diag=diag)

    @property
    def proxy_addr(self) -> str:
        """The address clients use (``host:port``, with the real port when 0 was asked)."""
        assert self.proxy is not None
        return _public(self.cfg, self.proxy.port)

    async def _local_heartbeat(self) -> None:
        """Advertise the in-process app service like any other (``bastion get app_servers``)."""
        assert self.apps is not None and self.auth is not None
        # Under the name the other proxies record it by, when it serves them too.
        host_id = self.peer.creds.host_id if self.peer else f"{self.auth.cluster_name}-{self.apps.tag}"
        while True:
            try:
                now = self.auth.clock.now()
                await self.auth.upsert_app_server(
                    AppServer(
                        metadata=Metadata(name=host_id, expires=now + HEARTBEAT_TTL),
                        spec=AppServerSpec(
                            hostname=socket.gethostname(),
                            version=__version__,
                            tag=self.apps.tag,
                            via="proxy",
                            proxies=[self.proxy_addr] if self.proxy else [],
                            apps=self.apps.registry.all(),
                            refused=self.apps.registry.refused(),
                            static=sorted(self.apps.registry.static_apps()),
                        ),
                    )
                )
            except BastionError as e:
                log.warning("app service heartbeat failed", extra={"error": e.message})
            await self.apps.registry.wait_changed(HEARTBEAT_EVERY)

    async def _proxy_heartbeat(self) -> None:
        """Advertise this proxy, so app services connect to every live one."""
        assert self.auth is not None
        proxy_id = f"{self.auth.cluster_name}-{secrets.token_hex(4)}"
        self._proxy_id = proxy_id
        while True:
            try:
                tunnel = self.tunnels.advertised if self.tunnels else ""
                await self.auth.upsert_proxy(proxy_id, self.proxy_addr, tunnel, HEARTBEAT_TTL)
            except BastionError as e:
                log.warning("proxy heartbeat failed", extra={"error": e.message})
            await asyncio.sleep(HEARTBEAT_EVERY)

    async def _housekeeping(self) -> None:
        assert self.backend is not None
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

    async def _audit_retention(self, keep: timedelta) -> None:
        """Prune audit events older than ``keep``: at start, then every ``RETENTION_EVERY``."""
        prune = getattr(self.audit_store, "prune", None)
        if prune is None:
            return
        while True:
            try:
                await prune(datetime.now(UTC) - keep)
            except BastionError as e:
                log.warning("audit retention failed; will retry", extra={"error": e.message})
            await asyncio.sleep(RETENTION_EVERY)

    async def _audit_unfinished(self, after: timedelta) -> None:
        """Complete calls left without an outcome for ``after`` as "outcome unknown" (decision
        0038): every process writing an audit store sweeps it, a few times per ``after`` (at
        most every minute); on PostgreSQL the proxies share the work (rows locked are skipped)."""
        complete = getattr(self.audit_store, "complete_unfinished", None)
        if complete is None or self.auth is None:
            return
        every = min(UNFINISHED_EVERY, max(after.total_seconds() / 4, 0.25))
        while True:
            await asyncio.sleep(every)
            try:
                live = {s.spec.tag for s in await self.auth.app_servers()}
                await unfinished.sweep(complete, now=datetime.now(UTC), after=after, live_tags=live)
            except BastionError as e:
                log.warning(
                    "cannot complete calls left without an outcome; will retry", extra={"error": e.message}
                )

    async def wait(self) -> None:
        if self.proxy:
            await self.proxy.wait()
        else:
            await asyncio.Event().wait()

    async def stop(self) -> None:
        if self.diag:
            await self.diag.stop()
        await stop_tasks(*self._tasks)
        if self.auth is not None and self._proxy_id:
            with contextlib.suppress(BastionError):
                await self.auth.remove_proxy(self._proxy_id)
        if self.access_notices is not None:
            await self.access_notices.aclose()
        if self.peer is not None:  # the other proxies stop sending it requests first
            await self.peer.aclose()
        if self.proxy:
            await self.proxy.stop()
            if self.proxy.router is not None and self.proxy.router.hosts is not None:
                await self.proxy.router.hosts.aclose()
        if self.tunnels:
            await self.tunnels.stop()
        # Sessions end (with their end events) and the audit log is flushed while a
        # joined app service's tunnel, which carries them to the cluster, is still up.
        if self.apps:
            await self.apps.aclose()
        if self.audit:
            await self.audit.close()
        if self.audit_store is not None:
            # Indexes what is journaled, then releases the audit log for the next process.
            try:
                await self.audit_store.close()
            except BastionError as e:
                log.error("audit store: %s", e.message)
        if self.agent:
            await self.agent.aclose()
        if self.backend:
            await self.backend.close()
        log.info("cluster stopped")


def _shares_backend(cfg: Config) -> bool:
    """Whether this node runs every service on a backend other nodes may share (PostgreSQL)."""
    return (
        cfg.auth_service.backend.type == "postgres" and cfg.app_service.enabled and cfg.proxy_service.enabled
    )


async def _open_audit_store(cfg: Config, signer: Signer) -> AuditStore:
    """The cluster's audit log: SQLite next to the backend, or PostgreSQL with a local spool."""
    b = cfg.auth_service.backend
    if b.type == "postgres":
        from bastion.audit.pg_store import PostgresAuditStore
        from bastion.audit.spool import SpoolingAuditStore

        assert b.dsn is not None
        store = SpoolingAuditStore(
            await PostgresAuditStore.open(b.dsn.get_secret_value(), signer=signer),
            cfg.bastion.data_dir / "audit-spool.db",
        )
        store.start()
        return store
    return await SQLiteAuditStore.open(cfg.bastion.data_dir, signer=signer)


def _audit_exporters(cfg: Config, store: AuditStore) -> list[Exporter]:
    """One exporter per sink of ``audit.export`` (decision 0035), reading ``store``'s feed."""
    export = cfg.audit.export
    assert export is not None
    sinks: list[Sink] = []
    if export.file is not None:
        sinks.append(FileSink(export.file.path, max_bytes=export.file.max_bytes, keep=export.file.keep))
    if export.http is not None:
        h = export.http
        sinks.append(HttpSink(h.url, fmt=h.format, headers=h.headers, timeout=h.timeout.total_seconds()))
    source = cast(Source, store)
    shared = cfg.auth_service.backend.type == "postgres"
    out = []
    for sink in sinks:
        # PostgreSQL: one proxy of the cluster at a time, its cursor in the database.
        lease: Lease = (
            functools.partial(cast(Any, store).export_lease, sink.name)
            if shared
            else file_lease(cfg.bastion.data_dir / "audit-export" / f"{sink.name}.cursor")
        )
        out.append(
            Exporter(source, sink, lease, batch=export.batch, hold_us=int(export.hold.total_seconds() * 1e6))
        )
    return out


def _tunnel_public(cfg: Config, host: str, port: int) -> str:
    """The tunnel address app services dial: set, or the listen host, or this host's name."""
    if cfg.proxy_service.tunnel_public_addr:
        return cfg.proxy_service.tunnel_public_addr
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _public(cfg: Config, port: int) -> str:
    pub = cfg.proxy_service.public_addr
    if pub:
        return pub
    host, _ = split_addr(cfg.proxy_service.listen_addr, allow_zero=True)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"{host}:{port}"


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


def _web_ui(auth: AuthServer, router: Router, audit: Any) -> UIFactory:
    """The web UI, built once the proxy knows its address and front (decision 0041)."""

    def build(public_addr: str, front: ASGI) -> ASGI:
        return build_webui(auth, public_addr=public_addr, front=front, registry=router, audit_log=audit)

    return build
