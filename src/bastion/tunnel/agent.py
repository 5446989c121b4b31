"""The app service's end of the reverse tunnel: join once, then dial out and stay connected.

join      first start: fetch the cluster CA, check it against ``bastion.ca_pin``,
          exchange the join token for a host certificate (the private key is
          made here and never leaves the host); kept under ``<data_dir>/host/``
connect   dial the proxy's tunnel listener over mutually authenticated TLS and
          keep the connection; lost connections are re-established with
          exponential backoff and jitter
serve     streams the proxy opens carry HTTP requests for ``MCPHandler``
report    heartbeats (what is served now, at once when it changes), audit
          events (committed by the cluster before the call goes upstream; any
          live proxy will do), call outcomes (kept in an on-disk queue until a
          proxy committed them), app resources for the label selectors (list + watch)
renew     the host certificate, at two thirds of its life, over the tunnel
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import orjson
from cryptography import x509
from starlette.types import Receive, Send

from bastion import __version__
from bastion._tasks import stop_tasks
from bastion.answers import send_jsonrpc_error
from bastion.audit.events import AuditEvent
from bastion.audit.spool import SpoolingAuditStore
from bastion.audit.store import AuditQuery, Completion
from bastion.auth.ca import CertAuthority, fingerprint, host_identity, issue_host_cert, new_host_key
from bastion.backend import Event, Item
from bastion.errors import (
    AuthenticationError,
    BackendError,
    BastionError,
    ConfigError,
    UpstreamError,
    ValidationError,
    WatchExpiredError,
)
from bastion.handoff import SCOPE_KEY, Handoff
from bastion.policy import AccessChecker
from bastion.resources import App, Role
from bastion.tunnel import http as tunnel_http
from bastion.tunnel import wire
from bastion.tunnel.mux import Mux, Stream, StreamReset, TunnelClosed
from bastion.tunnel.server import HEARTBEAT_EVERY, LEAVING, route_tag

log = logging.getLogger("bastion.agent")

_BACKOFF_MIN, _BACKOFF_MAX = 0.25, 10.0
_RPC_TIMEOUT = 30.0
#: How long one proxy may take over an idempotent call (audit) before another is tried.
_FAILOVER_ATTEMPT = 10.0
_GIVE_UP_AFTER = 5
_BACKDATED = 300.0  # seconds: how far issue_host_cert back-dates not_valid_before
_REJOIN = "remove <data_dir>/host, set bastion.ca_pin to the new CA's fingerprint and join again"


# ---------------------------------------------------------------- identity


@dataclass(frozen=True)
class HostCreds:
    host_id: str
    cluster_name: str
    hostname: str
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes
    expires: datetime

    @property
    def tag(self) -> str:
        return route_tag(self.host_id)


def _host_dir(data_dir: Path) -> Path:
    return data_dir / "host"


def load_creds(data_dir: Path) -> HostCreds | None:
    d = _host_dir(data_dir)
    try:
        cert_pem = (d / "host.crt").read_bytes()
        key_pem = (d / "host.key").read_bytes()
        ca_pem = (d / "ca.pem").read_bytes()
    except FileNotFoundError:
        return None
    ident = host_identity(x509.load_pem_x509_certificate(cert_pem))
    return HostCreds(
        ident.host_id, ident.cluster_name, ident.hostname, cert_pem, key_pem, ca_pem, ident.expires
    )


def save_creds(data_dir: Path, creds: HostCreds) -> None:
    d = _host_dir(data_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name, data, mode in (
        ("host.key", creds.key_pem, 0o600),
        ("host.crt", creds.cert_pem, 0o644),
        ("ca.pem", creds.ca_pem, 0o644),
    ):
        tmp = d / (name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        tmp.replace(d / name)


async def join(
    data_dir: Path, proxy: str, token: str, ca_pins: Sequence[str], *, now: datetime | None = None
) -> HostCreds:
    """Exchange ``token`` for a host identity, or return the one already kept in ``data_dir``."""
    from bastion.apiclient import ApiClient, Trust, fetch_ca_unverified

    have = load_creds(data_dir)
    now = now or datetime.now(UTC)
    if have is not None and have.expires > now:
        return have
    if have is not None:
        log.warning("the host certificate expired while this app service was down; joining again")
    ca_pem = await fetch_ca_unverified(proxy)
    got = fingerprint(ca_pem.encode())
    if not ca_pins:
        raise ConfigError(
            "bastion.ca_pin",
            f"required to join: the fingerprint of the cluster's CA, so that this host cannot be "
            f"joined to an impostor. The proxy at {proxy} presents {got}; check it with the cluster's "
            "administrator (`bastion tokens add --type=app` prints it) before you put it here",
        )
    if got not in ca_pins:
        raise AuthenticationError(
            f"the proxy at {proxy} presents a cluster CA with fingerprint {got}, which is not in "
            "bastion.ca_pin: not joining (someone may be intercepting the connection, or the pin "
            "belongs to another cluster)"
        )
    key_pem, pub_pem = new_host_key()
    # The web API may present the operator's certificate: the system store or the pinned CA.
    api = ApiClient(proxy, trust=Trust(ca_pem, pinned_in="bastion.ca_pin", hint=_REJOIN))
    try:
        data = await api.request(
            "POST",
            "/v1/webapi/host/join",
            json={
                "token": token,
                "role": "app",
                "public_key": pub_pem.decode(),
                "hostname": socket.gethostname(),
            },
        )
    finally:
        await api.close()
    cert_pem = str(data["cert"]).encode()
    ident = host_identity(x509.load_pem_x509_certificate(cert_pem))
    creds = HostCreds(
        ident.host_id, ident.cluster_name, ident.hostname, cert_pem, key_pem, ca_pem.encode(), ident.expires
    )
    save_creds(data_dir, creds)
    log.info("joined the cluster", extra={"cluster": creds.cluster_name, "host_id": creds.host_id})
    return creds


def peer_creds(
    host_ca: CertAuthority, data_dir: Path, *, cluster_name: str, now: datetime, ttl: timedelta
) -> HostCreds:
    """The host identity of a node's own app service when the node also runs the auth service
    and a proxy on a shared backend (decision 0030): issued in-process from the cluster's host
    CA, since this process holds it (no join token), and kept under ``data_dir/host/`` while it
    has more than a third of its life left, so the node keeps its id (and route tag) across
    restarts."""
    have = load_creds(data_dir)
    if have is not None and have.cluster_name == cluster_name and have.expires - now > ttl / 3:
        return have
    key_pem, pub_pem = new_host_key()
    host_id = have.host_id if have is not None and have.cluster_name == cluster_name else str(uuid.uuid4())
    cert_pem = issue_host_cert(
        host_ca,
        public_key_pem=pub_pem,
        host_id=host_id,
        role="app",
        hostname=socket.gethostname(),
        now=now,
        ttl=ttl,
    )
    ident = host_identity(x509.load_pem_x509_certificate(cert_pem))
    creds = HostCreds(
        ident.host_id, ident.cluster_name, ident.hostname, cert_pem, key_pem, host_ca.cert_pem, ident.expires
    )
    save_creds(data_dir, creds)
    return creds


# ------------------------------------------------------------------ agent


class ServedApps(Protocol):
    """What the agent needs of the app service's registry (``appservice.registry.AppRegistry``).

    A narrow protocol rather than an import: the tunnel sits below the app service in the layer
    order (docs/architecture.md), and the composition root (``service.py``) hands the real
    registry in.
    """

    def get(self, name: str) -> App | None: ...

    def all(self) -> list[App]: ...

    def refused(self) -> dict[str, str]: ...

    def static_apps(self) -> dict[str, App]: ...


class Agent:
    """Connections to the proxies and everything carried over them."""

    def __init__(
        self,
        creds: HostCreds,
        data_dir: Path,
        proxy: str,
        registry: ServedApps,
        *,
        handler: Any = None,
        discover: Callable[[], Awaitable[list[str]]] | None = None,
        skip: Callable[[], Collection[str]] = frozenset,
    ) -> None:
        """``discover``: where the proxies' tunnels are, asked every heartbeat instead of asking
        ``proxy`` when no tunnel is up (a node's own app service reads the backend's list);
        ``skip``: tunnel addresses never dialled (that node's own proxy)."""
        self.creds = creds
        self._discover = discover
        self._skip = skip
        #: ``end_unauthorised(access)``: ends the live sessions ``access`` no longer allows
        #: (the handler's); called when a proxy says users or roles changed, and on connecting.
        self.end_unauthorised: Callable[[Callable[[str], Awaitable[Any]]], Awaitable[None]] | None = None
        self._recheck: asyncio.Task[None] | None = None
        self._recheck_via: set[Mux] = set()
        self.data_dir = data_dir
        self.proxy = proxy
        self.registry = registry
        self.handler = handler
        self.actors = wire.ActorCache()
        self.conns: dict[str, Mux] = {}
        self.connected = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._dialers: dict[str, asyncio.Task[None]] = {}
        self._beat_now: set[asyncio.Event] = set()
        self._closing = False

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._bootstrap(), name="tunnel-bootstrap"))
        self._tasks.append(asyncio.create_task(self._renew_loop(), name="host-cert-renew"))

    async def _bootstrap(self) -> None:
        """Whenever no tunnel is up, ask ``proxy_server`` where to dial (it may be a balancer)."""
        if self._discover is not None:
            await self._follow_proxies(self._discover)
            return
        delay = _BACKOFF_MIN
        while not self._closing:
            if not self.conns:
                try:
                    self._dial(await self._tunnel_addr(self.proxy))
                    delay = _BACKOFF_MIN
                except (OSError, BastionError) as e:
                    msg = e.message if isinstance(e, BastionError) else (str(e) or type(e).__name__)
                    log.warning(
                        "cannot reach the proxy; retrying",
                        extra={"proxy": self.proxy, "error": msg, "retry_in_s": round(delay, 2)},
                    )
                    delay = min(delay * 2, _BACKOFF_MAX)
            await asyncio.sleep(delay * (0.5 + random.random()) if not self.conns else HEARTBEAT_EVERY)

    async def _follow_proxies(self, discover: Callable[[], Awaitable[list[str]]]) -> None:
        """Dial every live proxy the cluster lists, each heartbeat (proxies come and go)."""
        while not self._closing:
            try:
                for tunnel in await discover():
                    self._dial(tunnel)
            except BastionError as e:
                log.warning("cannot list the cluster's proxies; retrying", extra={"error": e.message})
            await asyncio.sleep(HEARTBEAT_EVERY)

    def _dial(self, tunnel: str) -> None:
        """Keep a tunnel to ``tunnel`` (``host:port``) while that proxy lives."""
        if tunnel in self._dialers or self._closing or tunnel in self._skip():
            return
        task = asyncio.create_task(self._dial_loop(tunnel), name=f"tunnel-dial-{tunnel}")
        self._dialers[tunnel] = task
        self._tasks.append(task)

    async def aclose(self) -> None:
        self._closing = True
        for mux in list(self.conns.values()):
            await mux.close(LEAVING)  # the proxies answer its sessions "gone" at once
        await stop_tasks(*self._tasks)

    def apps_changed(self) -> None:
        """Tell the proxies what is served now (called when the registry changes)."""
        for ev in self._beat_now:
            ev.set()

    # ---------------------------------------------------------- connections

    async def _tunnel_addr(self, proxy: str) -> str:
        from bastion.apiclient import ApiClient, Trust

        pinned_in = str(_host_dir(self.data_dir) / "ca.pem")
        api = ApiClient(proxy, trust=Trust(self.creds.ca_pem.decode(), pinned_in=pinned_in, hint=_REJOIN))
        try:
            info = await api.request("GET", "/v1/webapi/find")
        finally:
            await api.close()
        addr = str(info.get("proxy", {}).get("tunnel_addr", ""))
        if not addr:
            raise UpstreamError(f"the proxy at {proxy} has no tunnel listener")
        host, _, port = addr.rpartition(":")
        host = host.strip("[]")
        if host in ("", "0.0.0.0", "::"):
            host = proxy.rpartition(":")[0].strip("[]")
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _client_ssl(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # The tunnel trusts the pinned cluster CA alone (never the system store, decision 0027).
        # Any certificate of this cluster's host CA is checked below for the proxy role;
        # names are not: proxies are reached by whatever address the operator gave.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=self.creds.ca_pem.decode())
        d = _host_dir(self.data_dir)
        ctx.load_cert_chain(str(d / "host.crt"), str(d / "host.key"))
        return ctx

    async def _dial_loop(self, proxy: str) -> None:
        try:
            await self._dial_forever(proxy)
        finally:
            self._dialers.pop(proxy, None)

    async def _dial_forever(self, proxy: str) -> None:
        delay = _BACKOFF_MIN
        failures = 0
        host, _, port_s = proxy.rpartition(":")
        host, port = host.strip("[]"), int(port_s)
        while not self._closing:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port, ssl=self._client_ssl()), 15.0
                )
                der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
                peer = host_identity(x509.load_der_x509_certificate(der))
                if peer.role != "proxy" or peer.cluster_name != self.creds.cluster_name:
                    writer.close()
                    raise AuthenticationError(
                        f"{host}:{port} is not a proxy of cluster {self.creds.cluster_name!r}"
                    )
                mux = self._new_mux(reader, writer)
                self.conns[proxy] = mux
                log.info("tunnel connected", extra={"tunnel": proxy})
                runner = asyncio.create_task(mux.run(), name="tunnel-mux")
                beat = asyncio.create_task(self._heartbeat_loop(mux), name="tunnel-heartbeat")
                delay = _BACKOFF_MIN
                failures = 0
                try:
                    await runner
                finally:
                    await stop_tasks(beat)
                    if self.conns.get(proxy) is mux:
                        del self.conns[proxy]
                    if not self.conns:
                        self.connected.clear()
                if not self._closing:
                    log.warning("tunnel lost; reconnecting", extra={"tunnel": proxy})
            except asyncio.CancelledError:
                raise
            except (OSError, TimeoutError, ssl.SSLError, BastionError, TunnelClosed) as e:
                msg = e.message if isinstance(e, BastionError) else (str(e) or type(e).__name__)
                failures += 1
                if failures >= _GIVE_UP_AFTER:
                    log.warning(
                        "giving up on this proxy's tunnel for now (the cluster names the live "
                        "proxies in every heartbeat; proxy_server is asked again when none is up)",
                        extra={"tunnel": proxy, "error": msg},
                    )
                    return
                log.warning(
                    "cannot reach the proxy's tunnel; retrying",
                    extra={"tunnel": proxy, "error": msg, "retry_in_s": round(delay, 2)},
                )
            if self._closing:
                return
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, _BACKOFF_MAX)

    def _new_mux(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Mux:
        """A tunnel whose incoming streams are served knowing which tunnel they came on."""
        mine: list[Mux] = []

        async def on_stream(stream: Stream) -> None:
            await self._serve_stream(stream, mine[0])

        mux = Mux(reader, writer, initiator=True, on_stream=on_stream)
        mine.append(mux)
        return mux

    async def _heartbeat_loop(self, mux: Mux) -> None:
        """Beat every ``HEARTBEAT_EVERY`` seconds, and at once when ``apps_changed()`` is called.

        Invariant (no lost wake-up): ``now`` is cleared *before* the state a beat carries is
        read, and never after.  ``apps_changed()`` sets it, so a change made while a beat is
        built or in flight leaves it set and the loop beats again at once with the new state.
        Clearing it after the call dropped exactly that wake-up, and the proxy believed the
        host served its old apps (none, just after a restart) until the next periodic beat.
        """
        first = True
        now = asyncio.Event()
        self._beat_now.add(now)
        told: dict[str, str] = {}
        try:
            while True:
                now.clear()  # before _heartbeat_doc() reads the registry: see the invariant
                try:
                    reply = await self._call_on(mux, "heartbeat", self._heartbeat_doc())
                    if first:
                        self.connected.set()
                        first = False
                        # Whatever changed while this tunnel was down is checked once.
                        self.recheck_access(mux)
                    told = _report_refused(reply.get("refused", ()), told)
                    # Every live proxy must be able to carry any session: connect to all.
                    for addr in reply.get("proxies", ()):
                        self._dial(str(addr))
                except BastionError as e:
                    log.warning("heartbeat failed", extra={"error": e.message})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(now.wait(), HEARTBEAT_EVERY)
        finally:
            self._beat_now.discard(now)

    def _heartbeat_doc(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "apps": [wire.app_to_wire(a) for a in self.registry.all()],
            "refused": self.registry.refused(),
            "static": sorted(self.registry.static_apps()),
            "proxies": sorted(self.conns),
        }

    # -------------------------------------------------------------- serving

    async def _serve_stream(self, stream: Stream, via: Mux) -> None:
        if stream.header.get("kind") == "notice":
            if stream.header.get("what") == "access.changed":
                self.recheck_access(via)
            with contextlib.suppress(StreamReset, TunnelClosed):
                await stream.end()
            return
        if stream.header.get("kind") != "http":
            stream.reset(f"unexpected stream kind {stream.header.get('kind')!r}")
            return
        await tunnel_http.serve(stream, self._handle_http)

    async def _handle_http(self, h: dict[str, Any], receive: Receive, send: Send) -> None:
        app = self.registry.get(str(h.get("app", "")))
        if app is None:
            await send_jsonrpc_error(send, 404, f'no MCP app named "{h.get("app")}"', "client")
            return
        actor = self.actors.get(h["actor"])
        sub = str(h.get("subpath", "/"))
        scope: dict[str, Any] = {
            "type": "http",
            "method": h["method"],
            "path": f"/mcp/apps/{app.metadata.name}{sub if sub != '/' else ''}",
            "query_string": str(h.get("query", "")).encode("latin-1"),
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in h["headers"]],
            "client": tuple(h.get("client") or ("", 0)),
            SCOPE_KEY: Handoff(actor, app, sub, jwt=_offered_jwt(h.get("jwt"))),
        }
        await self.handler(scope, receive, send)

    # ---------------------------------------------------------- revocation

    def recheck_access(self, via: Mux) -> None:
        """Re-check live sessions against the users' current policies, as the proxy at the other
        end of ``via`` knows them (one run at a time; what comes in meanwhile runs next)."""
        if self.end_unauthorised is None or self._closing:
            return
        self._recheck_via.add(via)
        if self._recheck is None or self._recheck.done():
            self._recheck = asyncio.create_task(self._recheck_loop(), name="access-recheck")
            self._tasks.append(self._recheck)

    async def _recheck_loop(self) -> None:
        assert self.end_unauthorised is not None
        while self._recheck_via:
            via = self._recheck_via.pop()
            if via.closed:
                continue
            try:
                await self.end_unauthorised(self._current_policies(via))
            except BastionError as e:
                log.warning(
                    "could not re-check live sessions after an access change", extra={"error": e.message}
                )

    def _current_policies(self, via: Mux) -> Callable[[str], Awaitable[AccessChecker | None]]:
        """``access(user)``: the user's policy now, asked of one proxy once per user per re-check;
        None for a user who no longer exists; LookupError for one that proxy never carried
        requests of (another proxy, which did, tells us about them)."""
        asked: dict[str, AccessChecker | None] = {}

        async def access(user: str) -> AccessChecker | None:
            if user not in asked:
                got = await self._call_on(via, "policies", {"users": [user]})
                doc = got["policies"].get(user)
                if isinstance(doc, dict) and doc.get("unknown"):
                    raise LookupError(user)
                asked[user] = (
                    None
                    if doc is None
                    else AccessChecker(
                        [Role.model_validate(r) for r in doc["roles"]],
                        {k: tuple(v) for k, v in doc["traits"].items()},
                    )
                )
            return asked[user]

        return access

    # ------------------------------------------------------------ calls out

    def _any(self) -> Mux:
        for mux in self.conns.values():
            if not mux.closed:
                return mux
        raise BackendError("not connected to the cluster (no tunnel to a proxy is up)")

    async def wait_connected(self, within: float) -> Mux:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.connected.wait(), within)
        return self._any()

    async def call(self, method: str, args: dict[str, Any], *, wait: float = 0.0) -> Any:
        mux = await self.wait_connected(wait) if wait else self._any()
        return await self._call_on(mux, method, args)

    async def call_any(
        self, method: str, args: dict[str, Any], *, wait: float = 0.0, attempt: float = _FAILOVER_ATTEMPT
    ) -> Any:
        """``call`` for idempotent calls: tried on each live tunnel in turn until a proxy answers.

        A proxy that dies, hangs (``attempt`` seconds) or cannot do it (its answer is an error of
        the cluster's, not a refusal of the request) is passed over for the next one; the call
        fails only when every live tunnel failed it.  Only for calls that may be carried out
        twice (the first proxy may have done it before it went silent)."""
        mux: Mux | None = await self.wait_connected(wait) if wait else self._any()
        tried: set[Mux] = set()
        while mux is not None:
            tried.add(mux)
            try:
                return await self._call_on(mux, method, args, within=attempt)
            except ValidationError:
                raise  # refused for what it carries: another proxy would refuse it too
            except BackendError as e:
                mux = next((m for m in self.conns.values() if not m.closed and m not in tried), None)
                if mux is None:
                    raise
                log.warning(
                    "a proxy failed a call; trying another", extra={"call": method, "error": e.message}
                )
        raise BackendError("not connected to the cluster (no tunnel to a proxy is up)")  # pragma: no cover

    async def _call_on(
        self, mux: Mux, method: str, args: dict[str, Any], *, within: float = _RPC_TIMEOUT
    ) -> Any:
        try:
            stream = await mux.open({"kind": "rpc", "method": method})
            await stream.send(orjson.dumps(args))
            await stream.end()
            parts: list[bytes] = []
            async with asyncio.timeout(within):
                while (chunk := await stream.recv()) is not None:
                    parts.append(chunk)
        except (StreamReset, TunnelClosed, TimeoutError) as e:
            raise BackendError(f"the cluster did not answer {method}: {e or 'timed out'}") from None
        reply = orjson.loads(b"".join(parts))
        if "error" in reply:
            err = reply["error"]
            cls = ValidationError if err.get("origin") == "client" else BackendError
            raise cls(f"cluster refused {method}: {err.get('message')}")
        return reply["result"]

    # -------------------------------------------------------------- renewal

    async def _renew_loop(self) -> None:
        while True:
            now = datetime.now(UTC)
            cert = x509.load_pem_x509_certificate(self.creds.cert_pem)
            # Certificates are back-dated by a few minutes for clock skew; renew at two
            # thirds of the lifetime the cluster granted.
            life = (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds() - _BACKDATED
            renew_at = cert.not_valid_after_utc.timestamp() - max(life, 3.0) / 3
            await asyncio.sleep(max(1.0, renew_at - now.timestamp()))
            try:
                await self.renew()
            except BastionError as e:
                log.warning("host certificate renewal failed; will retry", extra={"error": e.message})
                await asyncio.sleep(30.0)

    async def renew(self) -> None:
        key_pem, pub_pem = new_host_key()
        result = await self.call("renew", {"public_key": pub_pem.decode()}, wait=30.0)
        cert_pem = str(result["cert"]).encode()
        ident = host_identity(x509.load_pem_x509_certificate(cert_pem))
        creds = HostCreds(
            ident.host_id,
            ident.cluster_name,
            ident.hostname,
            cert_pem,
            key_pem,
            self.creds.ca_pem,
            ident.expires,
        )
        save_creds(self.data_dir, creds)
        self.creds = creds
        log.info("host certificate renewed", extra={"expires": ident.expires.isoformat()})


def _report_refused(refused: Any, told: dict[str, str]) -> dict[str, str]:
    """Log (once per app and reason) the apps the cluster refused to route to this host."""
    now: dict[str, str] = {}
    for r in refused if isinstance(refused, list) else ():
        if isinstance(r, dict):
            app, reason = str(r.get("app", ""))[:128], str(r.get("reason", ""))[:512]
            now[app] = reason
            if told.get(app) != reason:
                log.warning("the cluster refused an app of this host", extra={"app": app, "reason": reason})
    return now


# ----------------------------------------------------- what goes through it


class TunnelAuditStore:
    """An ``AuditStore`` whose writes are committed by the cluster, over the tunnel.

    ``insert_many`` returns only after a proxy committed the events (so a request is never
    forwarded un-audited); it waits a while for a tunnel when none is up, and a proxy that
    dies or fails the call is passed over for another live one (``Agent.call_any``): inserts
    are idempotent by event id (the store keeps the first row), so a retry never doubles.

    ``complete_many`` hands outcomes to a proxy, which answers once they are committed; with
    a ``queue`` (a file in the data dir) an outcome no proxy takes now is kept there and
    delivered, in order, when one does — also after this app service restarts
    (``SpoolingAuditStore`` in front of the tunnel).  Completing an event again with the same
    outcome leaves the same row, so a delivery whose answer was lost is simply repeated.
    """

    def __init__(self, agent: Agent, *, wait: float = 10.0, queue: Path | None = None) -> None:
        self.agent = agent
        self.wait = wait
        self.queue = (
            None
            if queue is None
            else SpoolingAuditStore(
                _Outcomes(self), queue, write_timeout=_QUEUE_WRITE_TIMEOUT, target="the cluster"
            )
        )

    def start(self) -> None:
        """Deliver what an earlier run left in the queue (call once a loop runs)."""
        if self.queue is not None:
            self.queue.start()

    async def insert_many(self, events: Sequence[AuditEvent]) -> None:
        await self.agent.call_any(
            "audit.insert", {"events": [wire.event_to_wire(e) for e in events]}, wait=self.wait
        )

    async def complete_many(self, updates: Sequence[Completion]) -> None:
        if self.queue is not None:
            await self.queue.complete_many(updates)
        else:
            await self.deliver(updates)

    async def deliver(self, updates: Sequence[Completion]) -> None:
        """Hand ``updates`` to a proxy; returns once one committed them."""
        await self.agent.call_any(
            "audit.complete", {"updates": [wire.completion_to_wire(c) for c in updates]}, wait=self.wait
        )

    async def search(self, query: AuditQuery) -> list[dict[str, Any]]:
        raise ValidationError("search the audit log through the proxy (`bastion audit search`)")

    async def close(self) -> None:
        """A last try to deliver the queue; what stays is kept for the next start."""
        if self.queue is not None:
            await self.queue.close()


#: An outcome delivery slower than this (seconds) goes to the queue and is retried from there.
_QUEUE_WRITE_TIMEOUT = 8.0


class _Outcomes:
    """The outcome queue's primary: outcomes delivered over the tunnel (it never holds events)."""

    def __init__(self, store: TunnelAuditStore) -> None:
        self.store = store

    async def insert_many(self, events: Sequence[AuditEvent]) -> None:
        raise BackendError("the outcome queue holds no events")  # pragma: no cover - never called

    async def complete_many(self, updates: Sequence[Completion]) -> None:
        await self.store.deliver(updates)

    async def search(self, query: AuditQuery) -> list[dict[str, Any]]:
        raise ValidationError("search the audit log through the proxy (`bastion audit search`)")

    async def close(self) -> None:
        return None


class TunnelAppsView:
    """The three backend calls ``DynamicApps`` makes, answered by the cluster over the tunnel.

    With ``list_call="pins.list"`` and ``prefix="/mcp_pins/"``: the pins of the apps the host
    serves, for ``tunnel.pins.TunnelPinSource`` (decision 0045)."""

    def __init__(self, agent: Agent, *, list_call: str = "apps.list", prefix: str = "/apps/") -> None:
        self.agent = agent
        self.list_call = list_call
        self.prefix = prefix

    async def current_revision(self) -> int:
        return int((await self.agent.call("revision", {}, wait=5.0))["revision"])

    async def list(self, prefix: str) -> list[Item]:
        result = await self.agent.call(self.list_call, {}, wait=5.0)
        return [wire.item_from_wire(d) for d in result["items"] if d["key"].startswith(prefix)]

    async def watch(self, revision: int) -> AsyncIterator[Event]:
        mux = await self.agent.wait_connected(5.0)
        try:
            header = {"kind": "rpc", "method": "apps.watch", "revision": revision, "prefix": self.prefix}
            stream = await mux.open(header)
            await stream.end()
        except TunnelClosed as e:
            raise BackendError(f"app watch: {e}") from None
        buf = b""
        try:
            while True:
                try:
                    chunk = await stream.recv()
                except StreamReset as e:
                    if "expired" in str(e):
                        raise WatchExpiredError(str(e)) from None
                    raise BackendError(f"app watch ended: {e}") from None
                except TunnelClosed as e:
                    raise BackendError(f"app watch ended: {e}") from None
                if chunk is None:
                    raise BackendError("app watch ended by the proxy")
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line:
                        yield wire.event_of_item_from_wire(json.loads(line))
        finally:
            stream.reset("watch closed")


def _offered_jwt(value: Any) -> tuple[str, datetime] | None:
    """The upstream JWT the proxy sent with a request (``[token, expiry]``), if any."""
    if not value:
        return None
    return (str(value[0]), datetime.fromisoformat(str(value[1])))
