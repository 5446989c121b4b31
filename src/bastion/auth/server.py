"""The auth service: users, roles, invites, join tokens, logins and resource management.

Every operation that changes or reveals cluster state takes an ``Actor``: the
built-in administrator (someone with access to the data directory on the
server host) may do anything; any other actor is a user whose roles' ``rules``
decide (deny wins; nothing is allowed unless a rule allows it).  A denied
operation raises ``AccessDeniedError`` before anything is read or written.

Every change and every credential is audited here, whoever calls (the web
API, local administration through the data directory): ``audit`` receives the
cluster event (``bastion.audit.cluster_events``, decision 0033) and returns once
it is durable, before the caller answers.  If it cannot be written the call
fails, so no credential leaves unaudited (a change already made stays made; the
error says so).

This module talks to storage only through the ``Backend`` protocol and never
formats wire responses (that is the proxy's job).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import secrets
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, NoReturn, Protocol

import orjson
import pydantic

from bastion._time import Clock, SystemClock
from bastion.audit import cluster_events
from bastion.audit import events as ev
from bastion.audit.events import AuditEvent
from bastion.audit.refusals import RefusalLimiter
from bastion.auth import credentials, passwords
from bastion.auth.ca import CertAuthority, HostIdentity, ensure_cas, issue_host_cert
from bastion.auth.credentials import Verifier
from bastion.auth.pins import PinStore, describe
from bastion.auth.scope import HostScope
from bastion.auth.throttle import Limits, LoginThrottle, UserLocks
from bastion.backend import Backend, Item
from bastion.errors import (
    AccessDeniedError,
    AlreadyExistsError,
    AuthenticationError,
    BackendError,
    BastionError,
    ConfigError,
    ConflictError,
    NotFoundError,
    SecondFactorRequiredError,
    ValidationError,
)
from bastion.identity import Identity
from bastion.policy import AccessChecker, preset_roles
from bastion.resources import (
    KINDS,
    READ_ONLY_KINDS,
    App,
    AppServer,
    Metadata,
    Resource,
    Role,
    Token,
    User,
    UserSpec,
    UserStatus,
    key_for,
    prefix_for,
)
from bastion.resources.codec import format_pydantic_error

ADMIN_NAME = "bastion-admin"
_LOGIN_FAILED = "invalid user name or password"
_CLUSTER_KEY = "/cluster/name"
#: The address the running proxy listens on (it may have been port 0), for local admin commands.
PROXY_ADDR_KEY = "/cluster/proxy_addr"
_TOKEN_HISTORY = timedelta(days=7)
#: Revoked credentials kept per user before the list is folded into ``not_before``.
_MAX_REVOKED = 256
_HOSTNAME_MAX = 64


class ClusterAudit(Protocol):
    """Where cluster events go: ``record`` returns once the event is durable (``AuditLog``)."""

    async def record(self, event: AuditEvent) -> None: ...


def _token_history_key(token_id: str) -> str:
    return f"/token_history/{token_id}"


class LoginRefusedError(AuthenticationError):
    """A refused login.  ``reason`` (for the audit log): ``password``, ``second_factor``,
    ``locked``, ``source_locked`` or ``throttled``; ``locked_now`` when this failure locked
    the (source, user) pair."""

    def __init__(self, message: str, reason: str, *, locked_now: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.locked_now = locked_now


class JoinThrottledError(AuthenticationError):
    """Too many refused joins from one address: refused unchecked (and not audited one by one)."""


@dataclass(frozen=True)
class AuthSettings:
    second_factor: Literal["off", "optional", "on"] = "optional"
    #: Failures from one address for one user before that pair is locked (decision 0020).
    lockout_attempts: int = 5
    lockout_duration: timedelta = timedelta(minutes=20)
    #: Failures from one address (any users) before the address is blocked.
    source_lockout_attempts: int = 30
    #: Failures for one user from all addresses before only known addresses may try.
    user_throttle_attempts: int = 100
    invite_ttl: timedelta = timedelta(hours=1)
    default_session_ttl: timedelta = timedelta(hours=12)
    default_token_ttl: timedelta = timedelta(minutes=30)
    #: Lifetime of a joined host's certificate; hosts renew at two thirds of it.
    host_cert_ttl: timedelta = timedelta(hours=24)
    #: App names this node's own configuration file defines (its app service's static apps):
    #: no app resource may take one (decision 8), even while no heartbeat says so.
    static_apps: frozenset[str] = frozenset()


def settings_from(cfg: Any) -> AuthSettings:
    """The auth service's settings from the validated configuration (``config.Config``)."""
    a = cfg.auth_service
    return AuthSettings(
        second_factor=a.second_factor,
        lockout_attempts=a.authentication.lockout_attempts,
        lockout_duration=a.authentication.lockout_duration,
        invite_ttl=a.authentication.invite_ttl,
        host_cert_ttl=a.host_cert_ttl,
        static_apps=cfg.app_service.static_names if cfg.app_service.enabled else frozenset(),
    )


@dataclass(frozen=True)
class Actor:
    """Who asks.  ``checker is None`` means the built-in administrator."""

    name: str
    checker: AccessChecker | None = None
    identity: Identity | None = None
    user: User | None = None
    #: Revisions of the user and their roles: changes when their policy may have changed.
    policy_key: tuple[int, ...] = ()
    #: The role documents the checker was built from (sent to remote app services).
    roles: tuple[Role, ...] = ()
    #: The client's address, for the audit log ("" for the administrator on the server host).
    remote_addr: str = ""

    @classmethod
    def admin(cls) -> Actor:
        return cls(name=ADMIN_NAME)

    @property
    def is_admin(self) -> bool:
        return self.checker is None

    def require(self, resource: str, *verbs: str) -> None:
        if self.checker is None:
            return
        for verb in verbs:
            if not self.checker.check_rule(resource, verb):
                raise AccessDeniedError(
                    f'user "{self.name}" may not {verb} {resource} resources: no role of theirs '
                    f'has a rule allowing "{verb}" on "{resource}" (ask an administrator)'
                )


@dataclass(frozen=True)
class Invite:
    user: str
    code: str = field(repr=False)
    expires: datetime


@dataclass(frozen=True)
class InviteInfo:
    user: str
    expires: datetime
    second_factor: str


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def token_id_for(secret: str) -> str:
    """The public id of a join token: a prefix of its secret's SHA-256."""
    return _sha256(secret)[:16]


def encode_resource(res: Resource) -> bytes:
    data = res.model_dump(mode="json", exclude={"metadata": {"revision"}})
    return orjson.dumps(data)


def decode_resource(item: Item) -> Resource:
    data = orjson.loads(item.value)
    model = KINDS[data["kind"]]
    res = model.model_validate(data)
    meta = res.metadata.model_copy(update={"revision": item.revision})  # type: ignore[attr-defined]
    return res.model_copy(update={"metadata": meta})  # type: ignore[return-value]


def public_view(res: Resource) -> Resource:
    """The resource as shown to clients: secrets (token hashes) removed."""
    if isinstance(res, Token):
        return res.model_copy(update={"spec": res.spec.model_copy(update={"secret_sha256": ""})})
    return res


class AuthServer:
    """Cluster state and identity, over one backend.  Build with ``AuthServer.open``."""

    def __init__(
        self,
        backend: Backend,
        cluster_name: str,
        cas: dict[str, CertAuthority],
        settings: AuthSettings,
        clock: Clock,
    ) -> None:
        self.backend = backend
        self.cluster_name = cluster_name
        self.cas = cas
        self.settings = settings
        self.clock = clock
        self.verifier = Verifier(cas["user"])
        self.throttle = LoginThrottle(
            backend,
            Limits(
                pair_attempts=settings.lockout_attempts,
                source_attempts=settings.source_lockout_attempts,
                user_attempts=settings.user_throttle_attempts,
                duration=settings.lockout_duration,
            ),
            clock,
        )
        #: Cluster events go here (set by whoever runs this server: the service's audit log, or
        #: local administration's outbox). None only in unit tests of this class.
        self.audit: ClusterAudit | None = None
        #: Bounds refusals nobody authenticated for (logins while locked, bad invites) per source.
        self.refusal_limiter = RefusalLimiter()

    @classmethod
    async def open(
        cls,
        backend: Backend,
        cluster_name: str,
        settings: AuthSettings | None = None,
        clock: Clock | None = None,
        *,
        initialize: bool = True,
    ) -> AuthServer:
        """Load (and with ``initialize``, create at first start) the cluster's CAs and presets.

        ``cluster_name`` empty means "whatever the cluster already is".  A
        different name from the one stored is a configuration error: the CAs
        and every credential are bound to the stored name.
        """
        clock = clock or SystemClock()
        try:
            stored = (await backend.get(_CLUSTER_KEY)).value.decode()
        except NotFoundError:
            if not initialize:
                raise ConfigError(
                    "", "this data directory holds no cluster yet: run `bastion start` first"
                ) from None
            if not cluster_name:
                raise ConfigError("bastion.cluster_name", "required for a new cluster") from None
            try:
                await backend.create(Item(_CLUSTER_KEY, cluster_name.encode()))
                stored = cluster_name
            except AlreadyExistsError:
                stored = (await backend.get(_CLUSTER_KEY)).value.decode()
        if cluster_name and cluster_name != stored:
            raise ConfigError(
                "bastion.cluster_name",
                f'"{cluster_name}" differs from the cluster "{stored}" already in this backend '
                "(credentials and CAs are bound to its name)",
            )
        cas = await ensure_cas(backend, stored, clock.now())
        server = cls(backend, stored, cas, settings or AuthSettings(), clock)
        if initialize:
            for role in preset_roles():
                with contextlib.suppress(AlreadyExistsError):
                    await backend.create(Item(key_for("role", role.metadata.name), encode_resource(role)))
        return server

    # ------------------------------------------------------------ identity

    async def authenticate(self, token: str, *, source: str = "") -> Actor:
        """The actor behind a bearer credential; ``AuthenticationError`` otherwise.
        ``source`` (the client's address) goes into the audit events of what the actor does."""
        ident = self.verifier.verify(token, self.clock.now())
        try:
            user = await self._get_typed(User, "user", ident.username)
        except NotFoundError:
            raise AuthenticationError(
                f'user "{ident.username}" no longer exists; log in again with `bastion login`'
            ) from None
        _check_not_revoked(ident, user.status)
        roles = await self._roles_of(user)
        return Actor(
            name=user.metadata.name,
            checker=AccessChecker(roles, user.spec.traits),
            identity=ident,
            user=user,
            policy_key=(user.metadata.revision or 0, *(r.metadata.revision or 0 for r in roles)),
            roles=tuple(roles),
            remote_addr=source,
        )

    async def checker_for(self, user: User) -> AccessChecker:
        return AccessChecker(await self._roles_of(user), user.spec.traits)

    async def checker_of(self, username: str) -> AccessChecker | None:
        """What ``username`` may do under their current roles; None if the user no longer exists."""
        try:
            user = await self._get_typed(User, "user", username)
        except NotFoundError:
            return None
        return await self.checker_for(user)

    async def policy_of(self, username: str) -> tuple[list[Role], dict[str, tuple[str, ...]]] | None:
        """The roles and traits that decide for ``username`` now; None if the user no longer
        exists (what a joined app service needs to re-check its live sessions)."""
        try:
            user = await self._get_typed(User, "user", username)
        except NotFoundError:
            return None
        return await self._roles_of(user), dict(user.spec.traits)

    async def _roles_of(self, user: User) -> list[Role]:
        roles = []
        for name in user.spec.roles:
            try:
                roles.append(await self._get_typed(Role, "role", name))
            except NotFoundError:
                continue  # a deleted role grants nothing
        return roles

    async def login(
        self,
        username: str,
        password: str,
        *,
        totp_code: str = "",
        ttl: timedelta | None = None,
        source: str = "",
    ) -> tuple[str, Identity]:
        """Check the password (and TOTP) and issue a credential.

        ``source`` is the client's address: failures are counted per (source,
        user), per source and per user (``bastion.auth.throttle``, decision 0020),
        so a stranger's bad passwords lock the stranger, not the user.  Unknown
        users and wrong passwords give the same message after the same work, and
        counters are kept per *name*, known or not.  Refusals raise
        ``LoginRefusedError`` (an ``AuthenticationError``) with a reason.
        """
        verdict = await self.throttle.admit(username, source)
        if verdict.reason:
            # Not counted, so not bounded by the throttle: recorded up to a rate per source.
            await self._record_refusal(
                source,
                cluster_events.login(
                    self.clock.now(),
                    self.cluster_name,
                    username,
                    source,
                    error=verdict.message,
                    reason=verdict.reason,
                ),
            )
            raise LoginRefusedError(verdict.message, verdict.reason)
        try:
            user: User | None = await self._get_typed(User, "user", username)
        except (NotFoundError, pydantic.ValidationError):
            user = None
        item = await self._password_item(username) if user else None
        secret: dict[str, Any] = dict(orjson.loads(item.value)) if item else {}
        ok = await asyncio.to_thread(passwords.verify_password, secret.get("hash"), password)
        if not ok or user is None:
            # Same answer for both; the audit log tells them apart.
            await self._login_failed(username, source, "unknown_user" if user is None else "password")
        totp_secret = secret.get("totp")
        if self.settings.second_factor == "on" and not totp_secret:
            message = (
                "this cluster requires a second factor and none is registered for you; "
                "ask an administrator for a new invite (`bastion users reset NAME`)"
            )
            await self._record(
                cluster_events.login(
                    self.clock.now(),
                    self.cluster_name,
                    username,
                    source,
                    error=message,
                    reason="no_second_factor",
                )
            )
            raise AuthenticationError(message)
        if totp_secret and self.settings.second_factor != "off":
            if not totp_code:
                raise SecondFactorRequiredError("a one-time code is required: pass it with --otp")
            step = passwords.totp_step(totp_secret, totp_code, at=self.clock.now().timestamp())
            if step is None:
                await self._login_failed(username, source, "second_factor")
            assert item is not None  # (a TOTP secret came from it)
            await self._spend_totp_step(username, source, item, secret, step)
        await self.throttle.succeeded(username, source)
        token, ident = await self._issue(user, ttl)
        now = self.clock.now()
        await self._record(cluster_events.login(now, self.cluster_name, ident.username, source))
        await self._cert_created(ident, actor=ident.username, source=source, how="login")
        return token, ident

    async def _spend_totp_step(
        self, username: str, source: str, item: Item, record: dict[str, Any], step: int
    ) -> None:
        """Record ``step`` as the last one used, or refuse a code of a step already used: a code
        signs in once (RFC 6238, section 5.2).  Compare-and-swap, so of two sign-ins racing with
        the same code one wins."""
        if step <= int(record.get("totp_step", -1)):
            await self._login_failed(username, source, "second_factor_reused")
        try:
            await self.backend.update(
                Item(item.key, orjson.dumps({**record, "totp_step": step})), expected_revision=item.revision
            )
        except (ConflictError, NotFoundError):
            await self._login_failed(username, source, "second_factor_reused")

    async def _login_failed(self, username: str, source: str, reason: str) -> NoReturn:
        """Count a failed password or one-time code, audit it (and the lock it caused), refuse."""
        locked = await self.throttle.failed(username, source)
        message = {
            "second_factor": "invalid one-time code",
            "second_factor_reused": "this one-time code was used already: wait for the next one",
        }.get(reason, _LOGIN_FAILED)
        now = self.clock.now()
        await self._record(
            cluster_events.login(
                now, self.cluster_name, username, source, error=message, reason=reason, locked_now=locked
            )
        )
        if locked:
            until = now + self.settings.lockout_duration
            await self._record(
                cluster_events.event(
                    ev.USER_LOCKED,
                    now,
                    self.cluster_name,
                    user=username,
                    remote_addr=source,
                    extra={"scope": "address+user", "until": until.isoformat(), "after": reason},
                )
            )
        raise LoginRefusedError(message, reason, locked_now=locked)

    async def _cert_created(self, ident: Identity, *, actor: str, source: str, how: str) -> None:
        ttl = ident.expires - self.clock.now()
        await self._record(
            cluster_events.event(
                ev.CERT_CREATE,
                self.clock.now(),
                self.cluster_name,
                user=actor,
                remote_addr=source,
                roles=tuple(ident.roles),
                extra={
                    "for": ident.username,
                    "how": how,
                    "credential_id": ident.token_id,
                    "ttl_s": int(ttl.total_seconds()),
                    "expires": ident.expires.isoformat(),
                },
            )
        )

    async def _issue(self, user: User, ttl: timedelta | None) -> tuple[str, Identity]:
        checker = await self.checker_for(user)
        cap = checker.max_session_ttl()
        want = ttl or self.settings.default_session_ttl
        return credentials.issue(
            self.cas["user"],
            username=user.metadata.name,
            roles=user.spec.roles,
            traits=user.spec.traits,
            ttl=min(want, cap),
            now=self.clock.now(),
            user_uid=user.status.uid,
        )

    async def sign(self, actor: Actor, username: str, ttl: timedelta) -> tuple[str, Identity]:
        """A credential for ``username`` (machine identities); needs ``update`` on ``user``."""
        actor.require("user", "update")
        user = await self._get_typed(User, "user", username)
        token, ident = await self._issue(user, ttl)
        await self._cert_created(ident, actor=actor.name, source=actor.remote_addr, how="auth sign")
        return token, ident

    async def revoke_credential(self, actor: Actor) -> datetime:
        """Revoke the credential ``actor`` authenticated with (``bastion logout``); its expiry.

        Recorded in the user's record (``status.revoked``: id -> expiry, dropped once
        expired), which ``authenticate`` reads anyway: the check costs no extra read.
        """
        expires = await self._revoke(actor)
        token_id = actor.identity.token_id if actor.identity else ""
        await self._record(
            cluster_events.logout(
                self.clock.now(), self.cluster_name, actor.name, actor.remote_addr, token_id
            )
        )
        return expires

    async def _revoke(self, actor: Actor) -> datetime:
        ident, name = actor.identity, actor.name
        if ident is None or actor.user is None or not ident.token_id:
            raise ValidationError("only a user credential can be revoked (log out with `bastion logout`)")
        for _ in range(10):
            user = await self._get_typed(User, "user", name)
            st = user.status
            if st.uid != ident.user_uid:
                return ident.expires  # issued to an earlier user of that name: already dead
            now = self.clock.now()
            revoked = {k: v for k, v in st.revoked.items() if v > now}
            revoked[ident.token_id] = ident.expires
            not_before = st.not_before
            if len(revoked) > _MAX_REVOKED:
                # Fold the list: every credential of the user issued until now stops working.
                revoked, not_before = {}, now.replace(microsecond=0) + timedelta(seconds=1)
            status = st.model_copy(update={"revoked": revoked, "not_before": not_before})
            try:
                await self._write(user.model_copy(update={"status": status}), user.metadata.revision or 0)
                return ident.expires
            except ConflictError:
                continue
        raise ConflictError(f'user "{name}" is being changed by someone else; try logging out again')

    async def _password_item(self, username: str) -> Item | None:
        try:
            return await self.backend.get(f"/passwords/{username}")
        except NotFoundError:
            return None

    # ------------------------------------------------------------- invites

    async def _new_invite(self, actor: Actor, username: str, purpose: Literal["new", "reset"]) -> Invite:
        code = secrets.token_urlsafe(24)
        expires = self.clock.now() + self.settings.invite_ttl
        doc = orjson.dumps({"user": username, "purpose": purpose})
        await self.backend.create(Item(f"/invites/{_sha256(code)}", doc, expires=expires))
        await self._changed(
            ev.INVITE_CREATE, actor, username, extra={"purpose": purpose, "expires": expires.isoformat()}
        )
        return Invite(user=username, code=code, expires=expires)

    async def invite_info(self, code: str, *, source: str = "") -> InviteInfo:
        """Who an invite is for.  An unknown code is refused and audited as a refused use
        (bounded per source), so a scan of invite links leaves a trace."""
        item = await self._checked_invite(code, source, step="info")
        return InviteInfo(
            user=orjson.loads(item.value)["user"],
            expires=item.expires or self.clock.now(),
            second_factor=self.settings.second_factor,
        )

    async def _checked_invite(self, code: str, source: str, step: str = "") -> Item:
        """The invite's record, or the refusal, audited (bounded per source)."""
        try:
            return await self._invite_item(code)
        except AuthenticationError as e:
            await self._record_refusal(
                source,
                cluster_events.event(
                    ev.INVITE_USE,
                    self.clock.now(),
                    self.cluster_name,
                    success=False,
                    error=e.message,
                    remote_addr=source,
                    extra={"step": step} if step else None,
                ),
            )
            raise

    async def _invite_item(self, code: str) -> Item:
        try:
            return await self.backend.get(f"/invites/{_sha256(code)}")
        except NotFoundError:
            raise AuthenticationError(
                "this invite is unknown, already used or expired; ask an administrator for a new one"
            ) from None

    async def accept_invite(
        self, code: str, password: str, *, totp_secret: str = "", totp_code: str = "", source: str = ""
    ) -> str:
        """Set a password (and TOTP) with a one-time invite; returns the user name."""
        try:
            passwords.check_password_policy(password)
        except ValueError as e:
            raise ValidationError(str(e)) from None
        item = await self._checked_invite(code, source)
        invite = orjson.loads(item.value)
        username = str(invite["user"])
        if self.settings.second_factor == "on" and not totp_secret:
            raise ValidationError("this cluster requires a second factor: register a TOTP app")
        if totp_secret and not passwords.verify_totp(totp_secret, totp_code, at=self.clock.now().timestamp()):
            raise ValidationError("the one-time code does not match the TOTP secret; try again")
        await self._get_typed(User, "user", username)
        try:
            # Single use, even when two clients race with the same code.
            await self.backend.delete(item.key, expected_revision=item.revision)
        except (NotFoundError, ConflictError):
            raise AuthenticationError("this invite was already used") from None
        record: dict[str, str] = {"hash": await asyncio.to_thread(passwords.hash_password, password)}
        if totp_secret and self.settings.second_factor != "off":
            record["totp"] = totp_secret
        await self.backend.put(Item(f"/passwords/{username}", orjson.dumps(record)))
        await self.throttle.clear(username)
        now, purpose = self.clock.now(), str(invite.get("purpose", "new"))
        extra = {"purpose": purpose, "second_factor": "totp" if "totp" in record else "none"}
        await self._record(
            cluster_events.event(
                ev.INVITE_USE, now, self.cluster_name, user=username, remote_addr=source, extra=extra
            )
        )
        if purpose == "reset":
            await self._record(
                cluster_events.event(
                    ev.PASSWORD_CHANGE,
                    now,
                    self.cluster_name,
                    user=username,
                    remote_addr=source,
                    extra={"how": "reset invite"},
                )
            )
        return username

    # --------------------------------------------------------------- users

    async def add_user(
        self, actor: Actor, name: str, roles: Sequence[str], traits: Mapping[str, Sequence[str]]
    ) -> Invite:
        actor.require("user", "create")
        user = self._build(
            User,
            {
                "metadata": {"name": name},
                "spec": {"roles": list(roles), "traits": _traits(traits)},
                "status": {"uid": _new_uid()},
            },
        )
        await self._check_roles_exist(user.spec.roles)
        await self._create(user)
        await self._changed(ev.USER_CREATE, actor, name, extra={"roles": list(user.spec.roles)})
        return await self._new_invite(actor, name, "new")

    async def update_user(
        self,
        actor: Actor,
        name: str,
        *,
        roles: Sequence[str] | None = None,
        traits: Mapping[str, Sequence[str]] | None = None,
    ) -> User:
        actor.require("user", "read", "update")
        user = await self._get_typed(User, "user", name)
        spec = user.spec
        if roles is not None:
            await self._check_roles_exist(roles)
            spec = spec.model_copy(update={"roles": list(roles)})
        if traits is not None:
            merged = dict(spec.traits)
            for k, v in _traits(traits).items():
                if v:
                    merged[k] = v
                else:
                    merged.pop(k, None)
            spec = spec.model_copy(update={"traits": merged})
        updated = user.model_copy(update={"spec": UserSpec.model_validate(spec.model_dump())})
        written = await self._update(updated)
        changed: dict[str, Any] = {"roles": list(spec.roles)} if roles is not None else {}
        if traits is not None:
            changed["traits"] = sorted(traits)
        await self._changed(ev.USER_UPDATE, actor, name, extra=changed)
        return written  # type: ignore[return-value]

    async def reset_user(self, actor: Actor, name: str) -> Invite:
        """Remove a user's password and second factor and issue a new invite."""
        actor.require("user", "update")
        await self._get_typed(User, "user", name)
        with contextlib.suppress(NotFoundError):
            await self.backend.delete(f"/passwords/{name}")
        await self.throttle.clear(name)
        return await self._new_invite(actor, name, "reset")

    async def user_locks(self, actor: Actor) -> dict[str, UserLocks]:
        """Users that failed logins lock out now (decision 0020): name -> their locks."""
        actor.require("user", "list", "read")
        out = {}
        for item in await self.backend.list(prefix_for("user")):
            name = item.key.rsplit("/", 1)[-1]
            locks = await self.throttle.locks(name)
            if locks.locked:
                out[name] = locks
        return out

    async def unlock_user(self, actor: Actor, name: str) -> UserLocks:
        """Lift every login lock on ``name`` (what it was is returned); needs ``update`` on ``user``."""
        actor.require("user", "update")
        await self._get_typed(User, "user", name)
        locks = await self.throttle.unlock(name)
        await self._changed(
            ev.USER_UNLOCKED,
            actor,
            name,
            extra={"addresses": locks.addresses, "was_locked": locks.locked},
        )
        return locks

    # ------------------------------------------- pinned tool definitions (0045)

    async def mcp_pins(self, actor: Actor, app: str) -> list[dict[str, Any]]:
        """The pins of ``app``'s tools (``describe``d, by tool name); needs ``read`` on ``mcp_pin``."""
        actor.require("mcp_pin", "read")
        pins = await PinStore(self.backend, self.clock).load(app)
        return [describe(pins.records[t]) for t in sorted(pins.records)]

    async def approve_mcp_pins(self, actor: Actor, app: str, tools: Sequence[str] | None) -> list[str]:
        """Approve the changed or waiting definitions of ``tools`` (None: all) on ``app``: they
        become the pins.  Audited with who; needs ``update`` on ``mcp_pin``."""
        actor.require("mcp_pin", "update")
        done = await PinStore(self.backend, self.clock).approve(app, tools, actor.name)
        if done:
            await self._changed(ev.PIN_APPROVE, actor, app, extra={"tools": done})
        return done

    async def reset_mcp_pins(self, actor: Actor, app: str, tools: Sequence[str] | None) -> list[str]:
        """Forget the pins of ``tools`` (None: all) on ``app``: the next listing pins again."""
        actor.require("mcp_pin", "update")
        done = await PinStore(self.backend, self.clock).reset(app, tools)
        if done:
            await self._changed(ev.PIN_RESET, actor, app, extra={"tools": done})
        return done

    # -------------------------------------------------------------- tokens

    async def add_token(
        self,
        actor: Actor,
        roles: Sequence[str],
        ttl: timedelta | None = None,
        *,
        apps: Sequence[str] = (),
        labels: Mapping[str, Sequence[str]] | None = None,
    ) -> tuple[str, Token]:
        """A single-use join token; ``apps``/``labels`` scope what its host may serve."""
        actor.require("token", "create")
        secret = secrets.token_hex(16)
        expires = self.clock.now() + (ttl or self.settings.default_token_ttl)
        token = self._build(
            Token,
            {
                "metadata": {"name": token_id_for(secret), "expires": expires},
                "spec": {
                    "roles": list(roles),
                    "secret_sha256": _sha256(secret),
                    "apps": list(apps),
                    "labels": {k: list(v) for k, v in (labels or {}).items()},
                },
            },
        )
        created = await self._create(token)
        assert isinstance(created, Token)
        await self._changed(
            ev.JOIN_TOKEN_CREATE,
            actor,
            token.metadata.name,
            extra={
                "roles": list(roles),
                "apps": list(apps),
                "labels": sorted(f"{k}={','.join(v)}" for k, v in (labels or {}).items()),
                "expires": expires.isoformat(),
            },
        )
        # A short history of the token, kept a week past its expiry, so a refused
        # join can say *why* (expired, used by whom, wrong type) instead of guessing.
        await self.backend.put(
            Item(
                _token_history_key(token.metadata.name),
                orjson.dumps({"roles": list(roles), "expires": expires.isoformat()}),
                expires=expires + _TOKEN_HISTORY,
            )
        )
        return secret, created

    async def consume_join_token(self, secret: str, role: str, *, used_by: str = "") -> Token:
        """Use up a join token of type ``role``; a refusal says what was wrong with it.

        Of several joins racing with one token exactly one wins: the token's
        history record is marked used with a compare-and-swap *before* the token
        is deleted, so every loser can say by whom and when it was used.
        """
        token_id = token_id_for(secret)
        try:
            item = await self.backend.get(key_for("token", token_id))
        except NotFoundError:
            raise await self._token_refusal(token_id, role) from None
        token = decode_resource(item)
        assert isinstance(token, Token)
        if not hmac.compare_digest(token.spec.secret_sha256, _sha256(secret)):
            raise await self._token_refusal("", role)
        if role not in token.spec.roles:
            raise AuthenticationError(
                f"join token {token_id} is of type {', '.join(token.spec.roles)}, not {role}; "
                f"create one with `bastion tokens add --type={role}`"
            )
        try:
            hist: Item | None = await self.backend.get(_token_history_key(token_id))
        except NotFoundError:
            hist = None  # a token from before histories were kept: the delete below decides
        if hist is not None:
            data = orjson.loads(hist.value)
            if data.get("used_at"):
                raise await self._token_refusal(token_id, role)
            data.update(used_by=used_by or "?", used_at=self.clock.now().isoformat())
            try:
                await self.backend.update(
                    Item(hist.key, orjson.dumps(data), expires=hist.expires), hist.revision
                )
            except (NotFoundError, ConflictError):
                raise await self._token_refusal(token_id, role, raced=True) from None
        try:
            await self.backend.delete(item.key, expected_revision=item.revision)
        except (NotFoundError, ConflictError):
            raise await self._token_refusal(token_id, role, raced=True) from None
        return token

    async def _token_refusal(self, token_id: str, role: str, *, raced: bool = False) -> AuthenticationError:
        hint = f"create a new one with `bastion tokens add --type={role}`"
        if token_id:
            with contextlib.suppress(NotFoundError):
                data = orjson.loads((await self.backend.get(_token_history_key(token_id))).value)
                if data.get("used_at"):
                    return AuthenticationError(
                        f"join token {token_id} was already used (by {data.get('used_by')} at "
                        f"{data['used_at']}); join tokens are single-use: {hint}"
                    )
                expires = datetime.fromisoformat(data["expires"])
                if expires > self.clock.now():
                    return AuthenticationError(
                        f"join token {token_id} was deleted before it was used (`bastion tokens rm`): {hint}"
                    )
                return AuthenticationError(f"join token {token_id} expired at {data['expires']}: {hint}")
            if raced:
                return AuthenticationError(
                    f"join token {token_id} was already used by another host joining at the same "
                    f"moment; join tokens are single-use: {hint}"
                )
        return AuthenticationError(f"the join token is not known to this cluster (mistyped?): {hint}")

    # -------------------------------------------------------- host identities

    async def join(
        self, secret: str, role: str, *, public_key_pem: bytes, hostname: str, source: str = ""
    ) -> tuple[str, bytes]:
        """Exchange a join token for a host certificate: ``(host_id, cert_pem)``.

        The token's scope (apps, labels) goes into the certificate, so every
        proxy enforces it on the host's heartbeats without a backend read.
        """
        if await self.throttle.join_blocked(source):
            raise JoinThrottledError("too many refused joins from your address; wait a while, then try again")
        new = HostIdentity(
            host_id=str(uuid.uuid4()),
            role=role,
            cluster_name=self.cluster_name,
            hostname=_safe_hostname(hostname),
            expires=self.clock.now(),
        )
        # Validate the key before spending the token, so a bad request keeps it usable.
        try:
            self._host_cert(new, public_key_pem, "issue a")
        except ValidationError as e:
            # Not counted by the join throttle (the token was not tried): bounded per source.
            await self._record_refusal(source, self._join_event(new, source, error=e.message))
            raise
        try:
            token = await self.consume_join_token(secret, role, used_by=f"{new.hostname} ({new.host_id})")
        except AuthenticationError as e:
            await self.throttle.join_failed(source)
            await self._record(self._join_event(new, source, error=e.message))
            raise
        scope = HostScope.of(token.spec.apps, token.spec.labels)
        cert = self._host_cert(dataclasses.replace(new, scope=scope), public_key_pem, "issue a")
        await self._record(self._join_event(new, source, token=token))
        return new.host_id, cert

    def _join_event(
        self, host: HostIdentity, source: str, *, error: str = "", token: Token | None = None
    ) -> AuditEvent:
        extra: dict[str, Any] = {"hostname": host.hostname, "role": host.role}
        if token is not None:
            extra |= {
                "host_id": host.host_id,
                "token": token.metadata.name,
                "apps": list(token.spec.apps),
                "labels": sorted(f"{k}={','.join(v)}" for k, v in token.spec.labels.items()),
            }
        return cluster_events.event(
            ev.HOST_JOIN,
            self.clock.now(),
            self.cluster_name,
            success=not error,
            error=error,
            remote_addr=source,
            extra=extra,
        )

    def renew_host_cert(self, host: HostIdentity, public_key_pem: bytes) -> bytes:
        """A fresh certificate for an already-authenticated host (same id, role, name and scope:
        a renewal never widens what the host may serve)."""
        return self._host_cert(host, public_key_pem, "renew the")

    def _host_cert(self, host: HostIdentity, public_key_pem: bytes, what: str) -> bytes:
        try:
            return issue_host_cert(
                self.cas["host"],
                public_key_pem=public_key_pem,
                host_id=host.host_id,
                role=host.role,
                hostname=host.hostname,
                now=self.clock.now(),
                ttl=self.settings.host_cert_ttl,
                scope=host.scope,
            )
        except ValueError as e:
            raise ValidationError(f"cannot {what} host certificate: {e}") from None

    # ---------------------------------------------------------- app servers

    async def upsert_app_server(self, server: AppServer) -> None:
        """Record an app service's heartbeat (it expires unless renewed)."""
        meta = server.metadata
        await self.backend.put(
            Item(key_for("app_server", meta.name), encode_resource(server), expires=meta.expires)
        )

    async def remove_app_server(self, name: str) -> None:
        with contextlib.suppress(NotFoundError):
            await self.backend.delete(key_for("app_server", name))

    async def app_servers(self) -> list[AppServer]:
        """The live app servers (expired heartbeats are absent)."""
        out = []
        for item in await self.backend.list(prefix_for("app_server")):
            res = decode_resource(item)
            if isinstance(res, AppServer):
                out.append(res)
        return out

    async def upsert_proxy(self, proxy_id: str, public_addr: str, tunnel_addr: str, ttl: timedelta) -> None:
        """A proxy's heartbeat: app services keep a tunnel to every live proxy."""
        doc = orjson.dumps({"public_addr": public_addr, "tunnel_addr": tunnel_addr})
        await self.backend.put(Item(f"/proxies/{proxy_id}", doc, expires=self.clock.now() + ttl))

    async def remove_proxy(self, proxy_id: str) -> None:
        with contextlib.suppress(NotFoundError):
            await self.backend.delete(f"/proxies/{proxy_id}")

    async def proxies(self) -> list[str]:
        """Tunnel addresses (``host:port``) of the live proxies."""
        out = {orjson.loads(i.value).get("tunnel_addr", "") for i in await self.backend.list("/proxies/")}
        return sorted(a for a in out if a)

    # ----------------------------------------------------------- resources

    async def get_resource(self, actor: Actor, kind: str, name: str) -> Resource:
        actor.require(kind, "read")
        return public_view(decode_resource(await self._get_item(kind, name)))

    async def list_resources(self, actor: Actor, kind: str) -> list[Resource]:
        _check_kind(kind)
        actor.require(kind, "list", "read")
        return [public_view(decode_resource(i)) for i in await self.backend.list(prefix_for(kind))]

    async def create_resource(
        self, actor: Actor, data: Mapping[str, Any], *, overwrite: bool = False
    ) -> Resource:
        """Create a resource from its decoded document; with ``overwrite``, replace it if present."""
        kind = data.get("kind")
        if not isinstance(kind, str) or kind not in KINDS:
            raise ValidationError(
                f'unknown kind "{kind}" (known: {", ".join(sorted(KINDS))})'
                if kind is not None
                else 'missing "kind"'
            )
        if kind == "token":
            raise ValidationError("join tokens are made with `bastion tokens add`, not from a file")
        if kind in READ_ONLY_KINDS:
            raise ValidationError(
                f"{kind} resources are written by the cluster itself (heartbeats), not from a file"
            )
        # Refused before any work on the document: a user who may not write it costs nothing.
        if overwrite:
            actor.require(kind, "create", "update")
        else:
            actor.require(kind, "create")
        res = self._build(KINDS[kind], dict(data))
        assert isinstance(res, Role | User | Token) or res.kind == "app"
        if isinstance(res, User):
            await self._check_roles_exist(res.spec.roles)
            # The status is the cluster's, never the file's: a new record gets a new id.
            res = res.model_copy(update={"status": UserStatus(uid=_new_uid())})
        if isinstance(res, App):
            await self._refuse_static_name(res.metadata.name)
        current: Item | None = None
        if overwrite:
            with contextlib.suppress(NotFoundError):
                current = await self.backend.get(key_for(kind, res.metadata.name))
        if current is None:
            written = await self._create(res)
        else:
            if isinstance(res, User):
                stored = decode_resource(current)
                if isinstance(stored, User):  # replacing a user keeps its id and revocations
                    res = res.model_copy(update={"status": stored.status})
            written = await self._write(res, res.metadata.revision or current.revision)
        create, update, _ = ev.RESOURCE_EVENTS[kind]
        extra = {"roles": list(res.spec.roles)} if isinstance(res, User) else {}
        await self._changed(create if current is None else update, actor, res.metadata.name, extra=extra)
        return written

    async def _refuse_static_name(self, name: str) -> None:
        """Refuse an app resource named like a static app that would win over it (decision 8).

        Those are the static apps of app services running in a proxy's process (``via``
        ``proxy``) and of this node's own file.  A joined host's static app does not win:
        the resource takes the name back from it (decision 19), so it is not refused.
        """
        owners = sorted(
            f"app service {s.metadata.name}"
            for s in await self.app_servers()
            if s.spec.via == "proxy" and name in s.spec.static
        )
        if not owners and name in self.settings.static_apps:
            owners = ["the auth service's own node"]
        if owners:
            raise AlreadyExistsError(
                f'app "{name}" is defined in the configuration file of {", ".join(owners)}; an app '
                "resource of that name would never be served there (the file wins, decision 8): "
                "choose another name"
            )

    async def delete_resource(self, actor: Actor, kind: str, name: str) -> None:
        _check_kind(kind)
        actor.require(kind, "delete")
        item = await self._get_item(kind, name)
        if kind == "role":
            users = [
                u.metadata.name
                for u in (decode_resource(i) for i in await self.backend.list(prefix_for("user")))
                if isinstance(u, User) and name in u.spec.roles
            ]
            if users:
                raise ValidationError(
                    f'role "{name}" is still assigned to {", ".join(users)}; '
                    "remove it from them first (`bastion users update NAME --roles=...`)"
                )
        await self.backend.delete(item.key, expected_revision=item.revision)
        if kind == "user":
            # Its credentials die with the record: they name its uid, which no new user gets.
            with contextlib.suppress(NotFoundError):
                await self.backend.delete(f"/passwords/{name}")
            await self.throttle.clear(name)
        if kind in ev.RESOURCE_EVENTS:
            await self._changed(ev.RESOURCE_EVENTS[kind][2], actor, name)

    # ---------------------------------------------------------------- audit

    async def _record(self, event: AuditEvent) -> None:
        """Write ``event`` durably before the caller answers; a failure fails the call."""
        if self.audit is None:
            return
        try:
            await self.audit.record(event)
        except BastionError as e:
            raise BackendError(
                f"the audit log cannot record this {event.type} event ({e.message}); "
                "what was asked may have been done: check, then retry"
            ) from None

    async def _record_refusal(self, source: str, event: AuditEvent) -> None:
        """Record a refusal nobody authenticated for, up to a rate per source (a flood of them
        must not fill the disk; the refusals that locked the address or user were recorded)."""
        if self.refusal_limiter.admit(source or "?"):
            await self._record(event)

    async def _changed(
        self, type_: str, actor: Actor, name: str, *, extra: dict[str, Any] | None = None
    ) -> None:
        """Audit a change ``actor`` made to the resource (or user) ``name``."""
        about = {"name": name, **(extra or {})}
        if actor.is_admin:
            about["via"] = "server host"
        await self._record(
            cluster_events.event(
                type_,
                self.clock.now(),
                self.cluster_name,
                user=actor.name,
                remote_addr=actor.remote_addr,
                roles=tuple(r.metadata.name for r in actor.roles),
                extra=about,
            )
        )

    # ------------------------------------------------------------- helpers

    def _build(self, model: type[pydantic.BaseModel], data: dict[str, Any]) -> Any:
        data.setdefault("kind", model.model_fields["kind"].default)
        try:
            return model.model_validate(data)
        except pydantic.ValidationError as e:
            raise ValidationError(f"invalid {data.get('kind')}:\n" + format_pydantic_error(e)) from None

    async def _check_roles_exist(self, names: Sequence[str]) -> None:
        for name in names:
            try:
                await self.backend.get(key_for("role", name))
            except NotFoundError:
                raise ValidationError(f'role "{name}" does not exist (see `bastion get roles`)') from None

    async def _get_item(self, kind: str, name: str) -> Item:
        _check_kind(kind)
        try:
            return await self.backend.get(key_for(kind, name))
        except NotFoundError:
            raise NotFoundError(f'{kind} "{name}" not found') from None

    async def _get_typed(self, model: type[Any], kind: str, name: str) -> Any:
        res = decode_resource(await self._get_item(kind, name))
        if not isinstance(res, model):
            raise NotFoundError(f'{kind} "{name}" not found')
        return res

    async def _create(self, res: Role | User | Token | Any) -> Resource:
        meta: Metadata = res.metadata
        key = key_for(res.kind, meta.name)
        try:
            item = await self.backend.create(Item(key, encode_resource(res), expires=meta.expires))
        except AlreadyExistsError:
            raise AlreadyExistsError(
                f'{res.kind} "{meta.name}" already exists (use `bastion create -f` to overwrite)'
            ) from None
        return decode_resource(item)

    async def _update(self, res: Role | User | Any) -> Resource:
        return await self._write(res, res.metadata.revision or 0)

    async def _write(self, res: Any, expected: int) -> Resource:
        meta: Metadata = res.metadata
        try:
            item = await self.backend.update(
                Item(key_for(res.kind, meta.name), encode_resource(res), expires=meta.expires),
                expected,
            )
        except ConflictError:
            raise ConflictError(
                f'{res.kind} "{meta.name}" was changed by someone else meanwhile; read it again and retry'
            ) from None
        return decode_resource(item)


def _new_uid() -> str:
    return uuid.uuid4().hex


def _safe_hostname(name: str) -> str:
    """A host's self-reported name, as shown in certificates and messages: bounded, no control
    characters or spaces (it is client input)."""
    kept = "".join(c for c in name if c.isalnum() or c in ".-_")[:_HOSTNAME_MAX]
    return kept or "unknown"


def _check_not_revoked(ident: Identity, status: UserStatus) -> None:
    """Refuse a credential of an earlier user of the same name, or one revoked by logout."""
    if ident.user_uid != status.uid:
        raise AuthenticationError(
            f'this credential was issued to an earlier user named "{ident.username}" (deleted since); '
            "log in again with `bastion login`"
        )
    if ident.token_id in status.revoked or (status.not_before and ident.issued_at < status.not_before):
        raise AuthenticationError(
            "this credential was revoked (logged out); log in again with `bastion login`"
        )


def _traits(traits: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    return {k: [v for v in vs if v != ""] for k, vs in traits.items()}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValidationError(f'unknown kind "{kind}" (known: {", ".join(sorted(KINDS))})')
