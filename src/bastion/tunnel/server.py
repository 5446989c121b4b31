"""The proxy's end of the reverse tunnel: where joined app services dial in.

A plain asyncio TLS listener (``proxy_service.tunnel_listen_addr``) that
requires a client certificate signed by the cluster's host CA with role
``app``.  Each accepted connection is one multiplexed ``Mux``; the proxy opens
a stream per HTTP request it carries to that app service (``tunnel.http``),
and the app service opens streams for its calls to the cluster:

    heartbeat       what it serves now; recorded as an ``app_server`` that expires
    revision        the backend's current revision
    apps.list       the app resources (for its label selectors)
    apps.watch      changes to app resources from a revision on (a long stream); with
                    ``prefix: /mcp_pins/``, changes to the pins of the apps it serves
    pins.get        the pinned tool definitions of an app it serves (decision 0045)
    pins.list       those of every app it serves
    pins.record     pins first seen and changed definitions, from its sessions' listings
    rate.take       a token from a rate limit bucket of an app it serves (decision 0051)
    audit.insert    audit events, committed before the answer (idempotent by id)
    audit.complete  outcomes of recorded calls, committed before the answer
                    (idempotent: the same outcome again leaves the same row)
    renew           a new host certificate for a new public key

An app service only ever reaches app resources, the pins of the apps it serves, its own
heartbeat and the audit log through here; it never sees users, roles, keys or tokens.  A host
joined with a scoped token sees only the app resources inside its scope, and
what it advertises passes ``bastion.tunnel.admission`` (an app name is one
app) before any session is routed to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
from cryptography import x509

from bastion import __version__
from bastion._listen import bind_tcp
from bastion._tasks import stop_tasks
from bastion.audit import cluster_events
from bastion.audit.emitter import AuditLog
from bastion.auth.ca import HostIdentity, host_identity, issue_host_cert, new_host_key
from bastion.auth.pins import PREFIX as PINS_PREFIX
from bastion.auth.pins import PinStore
from bastion.auth.server import AuthServer, decode_resource
from bastion.backend import Event, EventType, Item
from bastion.backend.rates import LocalRates
from bastion.errors import BastionError, ConfigError, ValidationError, WatchExpiredError
from bastion.policy.pins import Change, Pin, definition, fingerprint
from bastion.resources import App, AppServer, AppServerSpec, Metadata
from bastion.tombstones import Removed
from bastion.tunnel import admission, wire
from bastion.tunnel.mux import Mux, Stream, StreamReset, TunnelClosed

log = logging.getLogger("bastion.tunnel")

#: An app service heartbeats this often; its record lives a few beats longer.
HEARTBEAT_EVERY = 5.0
HEARTBEAT_TTL = timedelta(seconds=20)
#: The GOAWAY reason of an app service that is shutting down (its sessions end with it).
LEAVING = "app service shutting down"
#: Seconds a lost tunnel (no goodbye) has to come back before this proxy drops the host's
#: record (when no other proxy carries it): a live host redials within about a second.
LOST_GRACE = 5.0
#: Users per ``policies`` call (an app service batches its users).
_MAX_POLICY_USERS = 500
_MAX_CARRIED_USERS = 100_000
_MAX_RPC_BODY = 64 << 20


def route_tag(host_id: str) -> str:
    """The session-id prefix of an app service (the proxy routes sessions by it)."""
    return host_id.replace("-", "")[:12]


@dataclass
class AgentConn:
    """One connected app service."""

    host: HostIdentity
    mux: Mux
    peer: str
    tag: str
    apps: dict[str, App] = field(default_factory=dict)
    connected_at: float = field(default_factory=time.monotonic)
    #: Set once the first heartbeat told us what it serves.
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    #: What its last heartbeat advertised (re-checked when app resources change).
    advertised: list[App] = field(default_factory=list)
    #: Apps of its last heartbeat that were refused: name -> definition digest (alarm once).
    refused: dict[str, str] = field(default_factory=dict)
    #: Users this proxy carried requests of to it: the only ones whose policies it may ask for.
    users: set[str] = field(default_factory=set)

    def carried(self, user: str) -> None:
        if user not in self.users and len(self.users) < _MAX_CARRIED_USERS:
            self.users.add(user)


class TunnelServer:
    def __init__(
        self,
        auth: AuthServer,
        audit: AuditLog | None,
        *,
        host: str,
        port: int,
        data_dir: Path,
        proxy_addr: Callable[[], str],
        on_change: Callable[[], None] | None = None,
        local_static: Callable[[], Mapping[str, App]] = dict,
    ) -> None:
        self.auth = auth
        #: The static apps of this node's own app service (they own their names).
        self.local_static = local_static
        #: App resources decoded for admission: key -> (revision, app).
        self._decoded: dict[str, tuple[int, App | None]] = {}
        self.audit = audit
        self.host = host
        self._want_port = port
        self.data_dir = data_dir
        self.proxy_addr = proxy_addr
        self.on_change = on_change or (lambda: None)
        self.conns: dict[str, AgentConn] = {}
        #: Apps joined hosts stopped serving (removed by the cluster), remembered for a while.
        self.removed = Removed()
        #: By host id: the users whose requests this proxy carried to that host.
        self._carried: dict[str, set[str]] = {}
        #: By route tag: when (monotonic) an app service said it was leaving and has not come back.
        self.left: dict[str, float] = {}
        #: Set (then replaced) each time an app service's tunnel becomes ready.
        self._arrived = asyncio.Event()
        self._stopping = False
        #: Rate limit buckets for joined hosts when the backend keeps none (SQLite: one proxy).
        self._local_rates = LocalRates()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = 0

    # ------------------------------------------------------------- lifecycle

    def _ssl(self) -> ssl.SSLContext:
        host_ca = self.auth.cas["host"]
        key_pem, pub_pem = new_host_key()
        cert_pem = issue_host_cert(
            host_ca,
            public_key_pem=pub_pem,
            host_id=f"proxy.{self.auth.cluster_name}",
            role="proxy",
            hostname=os.uname().nodename,
            now=self.auth.clock.now(),
            ttl=timedelta(days=365),
        )
        tls_dir = self.data_dir / "proxy"
        tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cert_file, key_file = tls_dir / "tunnel.crt", tls_dir / "tunnel.key"
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        cert_file.write_bytes(cert_pem)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(cert_file), str(key_file))
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=host_ca.cert_pem.decode())
        return ctx

    async def start(self) -> None:
        try:
            sock = bind_tcp(self.host, self._want_port)
        except OSError as e:
            raise ConfigError(
                "proxy_service.tunnel_listen_addr",
                f"cannot listen on {self.host}:{self._want_port}: {e.strerror}",
            ) from None
        self._server = await asyncio.start_server(
            self._accept, sock=sock, ssl=self._ssl(), ssl_handshake_timeout=10.0
        )
        self.port = int(sock.getsockname()[1])
        follow = asyncio.create_task(self._follow_apps(), name="tunnel-app-admission")
        self._tasks.add(follow)
        log.info("tunnel listening", extra={"addr": f"{self.host}:{self.port}"})

    async def stop(self) -> None:
        # The app services are not leaving: their records stay for the next proxy (or the others).
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.conns.values()):
            await conn.mux.close("proxy shutting down")
        await stop_tasks(*list(self._tasks))
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)

    # ------------------------------------------------------------ connections

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        peer = writer.get_extra_info("peername")
        peer_s = f"{peer[0]}:{peer[1]}" if peer else "?"
        try:
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            host = host_identity(x509.load_der_x509_certificate(der))
            if host.role != "app" or host.cluster_name != self.auth.cluster_name:
                log.warning(
                    "tunnel refused: not an app service of this cluster",
                    extra={"peer": peer_s, "role": host.role, "cluster": host.cluster_name},
                )
                writer.close()
                return
            conn: AgentConn | None = None

            async def on_stream(stream: Stream) -> None:
                assert conn is not None
                await self._rpc(conn, stream)

            mux = Mux(reader, writer, initiator=False, on_stream=on_stream)
            conn = AgentConn(
                host=host,
                mux=mux,
                peer=peer_s,
                tag=route_tag(host.host_id),
                # Kept across reconnections: its sessions outlive a dropped tunnel.
                users=self._carried.setdefault(host.host_id, set()),
            )
            old = self.conns.get(host.host_id)
            self.conns[host.host_id] = conn
            if old is not None:
                await old.mux.close("replaced by a new connection from the same app service")
            log.info(
                "app service connected",
                extra={"host_id": host.host_id, "hostname": host.hostname, "peer": peer_s},
            )
            try:
                await mux.run()
            finally:
                if self.conns.get(host.host_id) is conn:
                    del self.conns[host.host_id]
                    self.on_change()
                    # A host that said it is leaving is gone at once; a lost tunnel may come
                    # back (its sessions are waited for, proxy/hosts.py), so its record is
                    # dropped only if it has not within LOST_GRACE.  A proxy that stops drops
                    # nothing: the hosts stay for the next one.
                    if self._stopping:
                        pass
                    elif mux.peer_goaway == LEAVING:
                        self._left(conn.tag)
                        await self._forget(host.host_id)
                    else:
                        lost = asyncio.create_task(
                            self._forget_unless_back(host.host_id), name="tunnel-lost-grace"
                        )
                        self._tasks.add(lost)
                        lost.add_done_callback(self._tasks.discard)
                log.info("app service disconnected", extra={"host_id": host.host_id, "peer": peer_s})
        except Exception:
            log.exception("tunnel connection failed", extra={"peer": peer_s})
            writer.close()
        finally:
            if task is not None:
                self._tasks.discard(task)

    def _left(self, tag: str) -> None:
        now = time.monotonic()
        ttl = HEARTBEAT_TTL.total_seconds()
        # After its record's life, the backend tells the same (no record): forget older goodbyes.
        self.left = {t: at for t, at in self.left.items() if now - at < ttl}
        self.left[tag] = now

    async def _forget_unless_back(self, host_id: str) -> None:
        await asyncio.sleep(LOST_GRACE)
        if host_id not in self.conns and not self._stopping:
            await self._forget(host_id)

    async def _forget(self, host_id: str) -> None:
        """Drop the heartbeat of an app service that left, unless other proxies still carry it."""
        try:
            for srv in await self.auth.app_servers():
                if srv.metadata.name == host_id and set(srv.spec.proxies) <= {self.proxy_addr()}:
                    await self.auth.remove_app_server(host_id)
        except BastionError as e:
            log.warning("cannot drop app server heartbeat", extra={"error": e.message})

    async def access_changed(self) -> None:
        """Users or roles changed: tell every connected app service to re-check its live sessions
        (it asks back for the policies of the users it holds sessions of: ``policies``)."""
        for conn in list(self.conns.values()):
            if conn.mux.closed:
                continue
            try:
                stream = await conn.mux.open({"kind": "notice", "what": "access.changed"})
                await stream.end()
            except (StreamReset, TunnelClosed) as e:
                log.info(
                    "could not tell an app service that access changed",
                    extra={"host_id": conn.host.host_id, "error": str(e)},
                )

    @property
    def advertised(self) -> str:
        """The tunnel address app services are told to dial for this proxy."""
        return self.proxy_addr()

    def candidates(self, name: str) -> list[AgentConn]:
        return [c for c in self.conns.values() if name in c.apps and not c.mux.closed]

    def by_tag(self, tag: str) -> AgentConn | None:
        """The connected app service with route tag ``tag``, once it told what it serves."""
        for c in self.conns.values():
            if c.tag == tag and c.ready.is_set() and not c.mux.closed:
                return c
        return None

    async def wait_tag(self, tag: str, within: float) -> AgentConn | None:
        """``by_tag(tag)``, waiting up to ``within`` seconds for that app service to connect."""
        loop = asyncio.get_running_loop()
        until = loop.time() + within
        while (conn := self.by_tag(tag)) is None:
            left = until - loop.time()
            if left <= 0:
                return None
            await self.arrival(left)
        return conn

    async def arrival(self, within: float) -> None:
        """Return when an app service's tunnel becomes ready (its first heartbeat), or after
        ``within`` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._arrived.wait(), within)

    # ------------------------------------------------------------------ RPCs

    async def _rpc(self, conn: AgentConn, stream: Stream) -> None:
        h = stream.header
        method = h.get("method", "")
        if h.get("kind") != "rpc":
            stream.reset(f"unexpected stream kind {h.get('kind')!r}")
            return
        if method == "apps.watch":
            await self._watch(conn, stream, int(h.get("revision", 0)), str(h.get("prefix", "/apps/")))
            return
        body = await _read_all(stream)
        try:
            args = orjson.loads(body) if body else {}
            result = await self._call(conn, method, args)
            reply = {"result": result}
        except BastionError as e:
            reply = {"error": {"message": e.message, "origin": e.origin, "code": e.code}}
        except (ValueError, KeyError, TypeError) as e:
            reply = {
                "error": {"message": f"bad {method} request: {e}", "origin": "client", "code": "invalid"}
            }
        await stream.send(orjson.dumps(reply))
        await stream.end()

    async def _call(self, conn: AgentConn, method: str, args: dict[str, Any]) -> Any:
        if method == "heartbeat":
            conn.advertised = [wire.app_from_wire(d) for d in args.get("apps", ())]
            apps, refused = await self._admit(conn, conn.advertised)
            for name in conn.apps.keys() - apps.keys():
                self.removed.add(conn.apps[name])
            for name in apps:
                self.removed.forget(name)
            conn.apps = apps
            first = not conn.ready.is_set()
            conn.ready.set()
            if first:
                self.left.pop(conn.tag, None)
                self._arrived.set()
                self._arrived = asyncio.Event()
            self.on_change()
            now = self.auth.clock.now()
            proxies = sorted({*args.get("proxies", ()), self.proxy_addr()})
            await self.auth.upsert_app_server(
                AppServer(
                    metadata=Metadata(name=conn.host.host_id, expires=now + HEARTBEAT_TTL),
                    spec=AppServerSpec(
                        hostname=conn.host.hostname,
                        version=str(args.get("version", "")),
                        tag=conn.tag,
                        via="tunnel",
                        proxies=proxies,
                        apps=list(apps.values()),
                        refused=_refused(args.get("refused")),
                        static=_static(args.get("static"), apps),
                    ),
                )
            )
            if first:
                log.info(
                    "app service serves",
                    extra={"host_id": conn.host.host_id, "apps": ",".join(sorted(apps))},
                )
            return {
                "proxy_version": __version__,
                "cluster_name": self.auth.cluster_name,
                "proxies": await self.auth.proxies(),
                "refused": [{"app": r.app, "reason": r.reason} for r in refused],
            }
        if method == "policies":
            # The current roles and traits of users with live sessions on the host (access.changed):
            # only of users whose requests this proxy carried to it (it saw their actors then);
            # of anyone else, "unknown" (a host cannot read the policies of every user).
            users = [str(u) for u in args["users"]][:_MAX_POLICY_USERS]
            out: dict[str, Any] = {}
            for name in users:
                if name not in conn.users:
                    out[name] = {"unknown": True}
                    continue
                got = await self.auth.policy_of(name)
                out[name] = (
                    None
                    if got is None
                    else {
                        "roles": [r.model_dump(mode="json") for r in got[0]],
                        "traits": {k: list(v) for k, v in got[1].items()},
                    }
                )
            return {"policies": out}
        if method == "revision":
            return {"revision": await self.auth.backend.current_revision()}
        if method == "apps.list":
            items = await self.auth.backend.list("/apps/")
            return {"items": [wire.item_to_wire(i) for i in items if self._in_scope(conn, i)]}
        if method == "rate.take":
            key = str(args["key"])
            if key.split("/", 1)[0] not in conn.apps:
                raise ValidationError("a host draws only from the rate limit buckets of apps it serves")
            # PostgreSQL keeps the cluster's buckets; on SQLite this proxy is the only one.
            take = getattr(self.auth.backend, "take", None) or self._local_rates.take
            return {"wait": await take(key, float(args["interval"]), float(args["tolerance"]))}
        if method.startswith("pins."):
            return await self._pins(conn, method, args)
        if method == "audit.insert":
            if self.audit is None:
                raise ValidationError("this proxy keeps no audit log")
            events = [wire.event_from_wire(d) for d in args["events"]]
            await asyncio.gather(*(self.audit.record(e) for e in events))
            return {"written": len(events)}
        if method == "audit.complete":
            if self.audit is None:
                raise ValidationError("this proxy keeps no audit log")
            # Answered once committed: the app service keeps an outcome (on disk) until a
            # proxy says it is stored, so an answer before the commit could lose it.
            updates = [wire.completion_from_wire(d) for d in args["updates"]]
            await self.audit.completed(updates)
            return {"written": len(updates)}
        if method == "renew":
            cert = self.auth.renew_host_cert(conn.host, str(args["public_key"]).encode())
            log.info("host certificate renewed", extra={"host_id": conn.host.host_id})
            return {"cert": cert.decode()}
        raise ValidationError(f"unknown tunnel call {method!r}")

    async def _watch(self, conn: AgentConn, stream: Stream, revision: int, prefix: str) -> None:
        if prefix not in ("/apps/", PINS_PREFIX):
            stream.reset(f"no watch of {prefix[:64]!r}")
            return
        try:
            async for ev in self.auth.backend.watch(revision):
                if prefix == PINS_PREFIX:
                    if ev.item.key.startswith(PINS_PREFIX) and ev.item.key[len(PINS_PREFIX) :] in conn.apps:
                        await stream.send(orjson.dumps(wire.event_of_item_to_wire(ev)) + b"\n")
                elif ev.item.key.startswith("/apps/"):
                    if ev.type == EventType.PUT and not self._in_scope(conn, ev.item):
                        # Moved out of (or created outside) the host's scope: for it, gone.
                        ev = Event(EventType.DELETE, Item(ev.item.key, b"", ev.item.revision))
                    await stream.send(orjson.dumps(wire.event_of_item_to_wire(ev)) + b"\n")
        except WatchExpiredError:
            stream.reset("watch expired: list again")
        except BastionError as e:
            stream.reset(f"watch failed: {e.message}")
        except (StreamReset, TunnelClosed):
            pass

    async def _pins(self, conn: AgentConn, method: str, args: dict[str, Any]) -> Any:
        """Pinned tool definitions of the apps the host serves (decision 0045); no other app's."""
        store = PinStore(self.auth.backend, self.auth.clock)
        if method == "pins.list":
            items = await self.auth.backend.list(PINS_PREFIX)
            return {"items": [wire.item_to_wire(i) for i in items if i.key[len(PINS_PREFIX) :] in conn.apps]}
        name = str(args["app"])
        app = conn.apps.get(name)
        if app is None:
            raise ValidationError(f"this host does not serve app {name[:128]!r}: no pins of it")
        if method == "pins.get":
            return {"pins": orjson.loads((await store.load(name)).to_json())}
        if method == "pins.record":
            # Definitions are judged again here: fingerprints are recomputed, and whether a new
            # pin is approved follows the app's pinning as admitted, not what the host says.
            approved = app.spec.pinning == "first_use"
            new = [Pin.of(d, approved=approved) for d in args.get("new", ())]
            changed = []
            for c in args.get("changed", ()):
                pin, served = Pin.of(c["pin"]), definition(c["served"])
                changed.append(Change(pin, served, fingerprint(served)))
            stored = await store.record(name, new, changed)
            return {"tools": len(stored.records)}
        raise ValidationError(f"unknown tunnel call {method!r}")

    # ------------------------------------------------------------ admission

    def _in_scope(self, conn: AgentConn, item: Item) -> bool:
        """Whether a scoped host may see an app resource (unscoped hosts see all)."""
        scope = conn.host.scope
        if scope.unrestricted:
            return True
        try:
            app = decode_resource(item)
        except (ValueError, KeyError):
            return False
        return isinstance(app, App) and not scope.refusal(app)

    async def _resources(self) -> dict[str, App]:
        """The app resources by name; each decoded once per revision (heartbeats are frequent)."""
        resources: dict[str, App] = {}
        seen: dict[str, tuple[int, App | None]] = {}
        for item in await self.auth.backend.list("/apps/"):
            hit = self._decoded.get(item.key)
            if hit is None or hit[0] != item.revision:
                app: App | None = None
                with contextlib.suppress(ValueError, KeyError):
                    res = decode_resource(item)
                    app = res if isinstance(res, App) else None
                hit = (item.revision, app)
            seen[item.key] = hit
            if hit[1] is not None:
                resources[hit[1].metadata.name] = hit[1]
        self._decoded = seen
        return resources

    async def _follow_apps(self) -> None:
        """Re-check what connected hosts serve whenever app resources change, so that a name
        clash made by a change (a resource created under a name a host serves) holds at once,
        not only at that host's next heartbeat."""
        delay = 0.5
        while True:
            try:
                rev = await self.auth.backend.current_revision()
                await self._readmit_all()
                delay = 0.5
                async for ev in self.auth.backend.watch(rev):
                    if ev.item.key.startswith("/apps/"):
                        await self._readmit_all()
            except WatchExpiredError:
                continue
            except BastionError as e:
                log.warning("app admission watch failed; retrying", extra={"error": e.message})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _readmit_all(self) -> None:
        if not self.conns:
            return
        resources = await self._resources()
        for conn in sorted(self.conns.values(), key=lambda c: c.connected_at):
            if conn.ready.is_set() and not conn.mux.closed:
                conn.apps, _ = await self._admit(conn, conn.advertised, resources, keep_stale=True)
        self.on_change()

    async def _admit(
        self,
        conn: AgentConn,
        advertised: list[App],
        resources: dict[str, App] | None = None,
        *,
        keep_stale: bool = False,
    ) -> tuple[dict[str, App], list[admission.Refusal]]:
        """Apply ``bastion.tunnel.admission`` to what ``conn`` advertises; alarm once per refused
        definition.  With ``keep_stale`` (a re-check between heartbeats) an app the host served
        and that an update made stale stays served until the host's next heartbeat, as before
        (a live update applies to new sessions once the host has it)."""
        if resources is None:
            resources = await self._resources()
        others: dict[str, App] = {}
        for c in sorted(self.conns.values(), key=lambda c: c.connected_at):
            if c is not conn and not c.mux.closed:
                for name, app in c.apps.items():
                    others.setdefault(name, app)
        known = admission.Authorities(dict(self.local_static()), resources, others)
        accepted, refused = admission.admit(advertised, conn.host.scope, known)
        if keep_stale:
            for r in refused:
                had = conn.apps.get(r.app)
                if not r.alarm and had is not None and admission.digest(had) == r.digest:
                    accepted[r.app] = had
        now_refused = {r.app: r.digest for r in refused if r.alarm}
        for r in refused:
            if not r.alarm or conn.refused.get(r.app) == r.digest:
                continue
            log.warning(
                "app of a joined host refused",
                extra={
                    "host_id": conn.host.host_id,
                    "hostname": conn.host.hostname,
                    "app": r.app,
                    "reason": r.reason,
                },
            )
            if self.audit is not None:
                event = cluster_events.app_refused(
                    self.auth.clock.now(),
                    self.auth.cluster_name,
                    r.app,
                    r.reason,
                    host_id=conn.host.host_id,
                    hostname=conn.host.hostname,
                    remote_addr=conn.peer,
                )
                try:
                    await self.audit.record(event)
                except BastionError as e:
                    log.warning("cannot audit a refused app", extra={"error": e.message})
        conn.refused = now_refused
        return accepted, refused


async def _read_all(stream: Stream) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        chunk = await stream.recv()
        if chunk is None:
            return b"".join(parts)
        size += len(chunk)
        if size > _MAX_RPC_BODY:
            raise ValidationError("tunnel request too large")
        parts.append(chunk)


def _static(value: Any, accepted: dict[str, App]) -> list[str]:
    """The names a joined host says its own file defines, among the apps it was accepted to serve
    (so a host cannot hold names it does not serve against app resources)."""
    if not isinstance(value, list):
        return []
    return sorted({v for v in value if isinstance(v, str) and v in accepted})


def _refused(value: Any) -> dict[str, str]:
    """A joined host's refused dynamic apps, bounded (its own words, shown to admins)."""
    if not isinstance(value, dict):
        return {}
    items = list(value.items())[:256]
    return {str(k)[:128]: str(v)[:512] for k, v in items}
