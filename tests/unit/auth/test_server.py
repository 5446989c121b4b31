"""The auth service over a real SQLite file: users, invites, logins, lockout, rules, tokens."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyotp
import pytest

from bastion.auth.server import Actor, AuthServer, AuthSettings
from bastion.backend.sqlite import SQLiteBackend
from bastion.errors import (
    AccessDeniedError,
    AlreadyExistsError,
    AuthenticationError,
    ConfigError,
    NotFoundError,
    SecondFactorRequiredError,
    ValidationError,
)

PW = "correct horse battery"
ADMIN = Actor.admin()


class Clock:
    def __init__(self) -> None:
        self.t = datetime.now(UTC)

    def now(self) -> datetime:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def auth(tmp_path: Path, clock: Clock) -> AsyncIterator[AuthServer]:
    backend = await SQLiteBackend.open(tmp_path / "backend.db", clock=clock)
    try:
        yield await AuthServer.open(backend, "test", AuthSettings(lockout_attempts=3), clock)
    finally:
        await backend.close()


async def _user(
    auth: AuthServer, name: str, roles: list[str], traits: dict[str, list[str]] | None = None
) -> None:
    invite = await auth.add_user(ADMIN, name, roles, traits or {})
    await auth.accept_invite(invite.code, PW)


async def test_presets_exist(auth: AuthServer) -> None:
    names = [r.metadata.name for r in await auth.list_resources(ADMIN, "role")]
    assert {"mcp-user", "access", "editor"} <= set(names)


async def test_cluster_name_is_bound(auth: AuthServer) -> None:
    with pytest.raises(ConfigError, match="differs"):
        await AuthServer.open(auth.backend, "other")


async def test_invite_login_and_authenticate(auth: AuthServer) -> None:
    await _user(auth, "alice", ["mcp-user"])
    token, ident = await auth.login("alice", PW)
    assert ident.username == "alice"
    actor = await auth.authenticate(token)
    assert actor.name == "alice"
    assert actor.user is not None
    assert actor.user.spec.roles == ["mcp-user"]


async def test_invite_is_single_use(auth: AuthServer) -> None:
    invite = await auth.add_user(ADMIN, "bob", ["mcp-user"], {})
    results = await asyncio.gather(
        auth.accept_invite(invite.code, PW),
        auth.accept_invite(invite.code, PW + "x"),
        return_exceptions=True,
    )
    assert sum(1 for r in results if r == "bob") == 1
    assert any(isinstance(r, AuthenticationError) for r in results)
    with pytest.raises(AuthenticationError, match="already used or expired"):
        await auth.accept_invite(invite.code, PW)


async def test_invite_expires(auth: AuthServer, clock: Clock) -> None:
    invite = await auth.add_user(ADMIN, "carol", ["mcp-user"], {})
    clock.t += timedelta(hours=2)
    with pytest.raises(AuthenticationError, match="expired"):
        await auth.accept_invite(invite.code, PW)


async def test_weak_password_refused_and_invite_kept(auth: AuthServer) -> None:
    invite = await auth.add_user(ADMIN, "dave", ["mcp-user"], {})
    with pytest.raises(ValidationError, match="at least 12"):
        await auth.accept_invite(invite.code, "short")
    assert await auth.accept_invite(invite.code, PW) == "dave"


async def test_wrong_password_and_unknown_user_look_the_same(auth: AuthServer) -> None:
    await _user(auth, "erin", ["mcp-user"])
    with pytest.raises(AuthenticationError) as wrong:
        await auth.login("erin", "not the password")
    with pytest.raises(AuthenticationError) as unknown:
        await auth.login("nobody", "not the password")
    assert str(wrong.value) == str(unknown.value) == "invalid user name or password"


async def test_lockout_for_known_and_unknown_names(auth: AuthServer, clock: Clock) -> None:
    await _user(auth, "frank", ["mcp-user"])
    for name in ("frank", "ghost"):
        for _ in range(3):
            with pytest.raises(AuthenticationError, match="invalid user name"):
                await auth.login(name, "wrong password!")
        with pytest.raises(AuthenticationError, match="too many failed"):
            await auth.login(name, PW)
    clock.t += timedelta(minutes=21)
    _, ident = await auth.login("frank", PW)
    assert ident.username == "frank"


async def test_session_ttl_capped_by_roles(auth: AuthServer) -> None:
    await auth.create_resource(
        ADMIN,
        {
            "kind": "role",
            "metadata": {"name": "short"},
            "spec": {"options": {"max_session_ttl": "2h"}},
        },
    )
    await _user(auth, "gina", ["mcp-user", "short"])
    _, ident = await auth.login("gina", PW, ttl=timedelta(hours=24))
    assert ident.expires - ident.issued_at == timedelta(hours=2)


async def test_totp(auth: AuthServer, clock: Clock) -> None:
    invite = await auth.add_user(ADMIN, "hank", ["mcp-user"], {})
    secret = pyotp.random_base32()
    with pytest.raises(ValidationError, match="does not match"):
        await auth.accept_invite(invite.code, PW, totp_secret=secret, totp_code="000000")
    code = pyotp.TOTP(secret).at(clock.now().timestamp())
    await auth.accept_invite(invite.code, PW, totp_secret=secret, totp_code=code)
    with pytest.raises(SecondFactorRequiredError):
        await auth.login("hank", PW)
    with pytest.raises(AuthenticationError, match="invalid one-time code"):
        await auth.login("hank", PW, totp_code="000000" if code != "000000" else "111111")
    _, ident = await auth.login("hank", PW, totp_code=code)
    assert ident.username == "hank"


async def test_rules_decide_for_users(auth: AuthServer) -> None:
    await _user(auth, "ivy", ["mcp-user"])
    await _user(auth, "jack", ["editor"])
    ivy = await auth.authenticate((await auth.login("ivy", PW))[0])
    jack = await auth.authenticate((await auth.login("jack", PW))[0])
    role = {
        "kind": "role",
        "metadata": {"name": "r1"},
        "spec": {"allow": {"mcp": {"tools": ["echo"]}}},
    }
    with pytest.raises(AccessDeniedError, match="may not create role"):
        await auth.create_resource(ivy, role)
    with pytest.raises(AccessDeniedError):
        await auth.list_resources(ivy, "role")
    with pytest.raises(NotFoundError):
        await auth.get_resource(jack, "role", "r1")
    await auth.create_resource(jack, role)
    with pytest.raises(AlreadyExistsError, match="create -f"):
        await auth.create_resource(jack, role)
    updated = {**role, "spec": {"allow": {"mcp": {"tools": ["echo", "get-sum"]}}}}
    res = await auth.create_resource(jack, updated, overwrite=True)
    assert res.spec.allow.mcp.tools == ["echo", "get-sum"]  # type: ignore[union-attr]
    with pytest.raises(AccessDeniedError):
        await auth.delete_resource(ivy, "role", "r1")
    await auth.delete_resource(jack, "role", "r1")
    with pytest.raises(NotFoundError):
        await auth.get_resource(jack, "role", "r1")


async def test_deleted_user_credential_stops_working(auth: AuthServer) -> None:
    await _user(auth, "kim", ["mcp-user"])
    token, _ = await auth.login("kim", PW)
    await auth.delete_resource(ADMIN, "user", "kim")
    with pytest.raises(AuthenticationError, match="no longer exists"):
        await auth.authenticate(token)


async def test_role_in_use_cannot_be_deleted(auth: AuthServer) -> None:
    await _user(auth, "lee", ["editor"])
    with pytest.raises(ValidationError, match="still assigned"):
        await auth.delete_resource(ADMIN, "role", "editor")


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"kind": "widget", "metadata": {"name": "x"}}, 'unknown kind "widget"'),
        ({"metadata": {"name": "x"}}, 'missing "kind"'),
        (
            {"kind": "role", "metadata": {"name": "x"}, "spec": {"allow": {"colour": 1}}},
            "spec.allow.colour: unknown field",
        ),
        (
            {
                "kind": "role",
                "metadata": {"name": "x"},
                "spec": {"allow": {"mcp": {"tools": ["^(a$"]}}},
            },
            "invalid regular expression",
        ),
        (
            {
                "kind": "role",
                "metadata": {"name": "x"},
                "spec": {"allow": {"app_labels": {"env": "^[$"}}},
            },
            "invalid regular expression",
        ),
        (
            {"kind": "app", "metadata": {"name": "x"}, "spec": {"uri": "mcp+ftp://h/"}},
            'unknown scheme "mcp+ftp"',
        ),
        (
            {"kind": "user", "metadata": {"name": "x"}, "spec": {"roles": ["nope"]}},
            'role "nope" does not exist',
        ),
        ({"kind": "role", "metadata": {"name": "bad name!"}}, "invalid name"),
    ],
)
async def test_bad_resources_are_refused_and_change_nothing(
    auth: AuthServer, doc: dict, message: str
) -> None:  # type: ignore[type-arg]
    before = await auth.backend.current_revision()
    with pytest.raises(ValidationError, match=re.escape(message)):
        await auth.create_resource(ADMIN, doc)
    assert await auth.backend.current_revision() == before


async def test_join_tokens(auth: AuthServer, clock: Clock) -> None:
    secret, token = await auth.add_token(ADMIN, ["app"], timedelta(minutes=30))
    listed = await auth.list_resources(ADMIN, "token")
    assert [t.metadata.name for t in listed] == [token.metadata.name]
    assert listed[0].spec.secret_sha256 == ""  # type: ignore[union-attr]
    assert secret not in repr(listed)
    used = await auth.consume_join_token(secret, "app")
    assert used.metadata.name == token.metadata.name
    with pytest.raises(AuthenticationError, match="already used"):
        await auth.consume_join_token(secret, "app")
    secret2, _ = await auth.add_token(ADMIN, ["app"], timedelta(minutes=5))
    clock.t += timedelta(minutes=6)
    with pytest.raises(AuthenticationError, match="expired"):
        await auth.consume_join_token(secret2, "app")
    with pytest.raises(AuthenticationError):
        await auth.consume_join_token("f" * 32, "app")


async def test_update_user_roles_and_traits(auth: AuthServer) -> None:
    await _user(auth, "max", ["mcp-user"], {"mcp_tools": ["echo"]})
    user = await auth.update_user(ADMIN, "max", roles=["access"], traits={"mcp_tools": ["echo", "get-sum"]})
    assert user.spec.roles == ["access"]
    assert user.spec.traits["mcp_tools"] == ["echo", "get-sum"]
    user = await auth.update_user(ADMIN, "max", traits={"mcp_tools": []})
    assert "mcp_tools" not in user.spec.traits
    with pytest.raises(ValidationError, match="does not exist"):
        await auth.update_user(ADMIN, "max", roles=["nope"])


async def test_join_refusals_say_why(auth: AuthServer, clock: Clock) -> None:
    from bastion.auth.ca import new_host_key

    _, pub = new_host_key()
    secret, token = await auth.add_token(ADMIN, ["app"], timedelta(minutes=30))
    host_id, cert = await auth.join(secret, "app", public_key_pem=pub, hostname="h1")
    assert b"BEGIN CERTIFICATE" in cert
    with pytest.raises(
        AuthenticationError, match=rf"{token.metadata.name} was already used \(by h1 \({host_id}\)"
    ):
        await auth.join(secret, "app", public_key_pem=pub, hostname="h2")
    with pytest.raises(AuthenticationError, match="not known to this cluster"):
        await auth.join("0" * 32, "app", public_key_pem=pub, hostname="h2")
    # A bad key is refused before the token is spent.
    good, _ = await auth.add_token(ADMIN, ["app"], timedelta(minutes=30))
    with pytest.raises(ValidationError, match="cannot issue a host certificate"):
        await auth.join(good, "app", public_key_pem=b"not a key", hostname="h3")
    await auth.join(good, "app", public_key_pem=pub, hostname="h3")
    short, tok = await auth.add_token(ADMIN, ["app"], timedelta(minutes=1))
    clock.t += timedelta(minutes=2)
    with pytest.raises(AuthenticationError, match=rf"join token {tok.metadata.name} expired at"):
        await auth.join(short, "app", public_key_pem=pub, hostname="h4")


async def test_app_servers_expire(auth: AuthServer, clock: Clock) -> None:
    from bastion.resources import AppServer, AppServerSpec, Metadata

    srv = AppServer(
        metadata=Metadata(name="h-1", expires=clock.t + timedelta(seconds=20)),
        spec=AppServerSpec(hostname="h", via="tunnel"),
    )
    await auth.upsert_app_server(srv)
    assert [s.metadata.name for s in await auth.app_servers()] == ["h-1"]
    listed = await auth.list_resources(ADMIN, "app_server")
    assert [s.metadata.name for s in listed] == ["h-1"]
    with pytest.raises(ValidationError, match="written by the cluster itself"):
        await auth.create_resource(ADMIN, {"kind": "app_server", "metadata": {"name": "x"}, "spec": {}})
    clock.t += timedelta(seconds=21)
    assert await auth.app_servers() == []


def _app_doc(name: str) -> dict[str, Any]:
    return {"kind": "app", "metadata": {"name": name}, "spec": {"uri": "mcp+https://mcp.example.com/mcp"}}


async def test_an_app_resource_may_not_take_a_static_apps_name(auth: AuthServer, clock: Clock) -> None:
    from bastion.resources import AppServer, AppServerSpec, Metadata

    for name, via in (("h-2", "proxy"), ("h-1", "proxy"), ("j-1", "tunnel")):
        srv = AppServer(
            metadata=Metadata(name=name, expires=clock.t + timedelta(seconds=20)),
            spec=AppServerSpec(hostname="h", via=via, static=["files", "bastion-demo", f"{via}-only"]),
        )
        await auth.upsert_app_server(srv)
    for overwrite in (False, True):
        with pytest.raises(AlreadyExistsError) as e:
            await auth.create_resource(ADMIN, _app_doc("files"), overwrite=overwrite)
        assert e.value.message == (
            'app "files" is defined in the configuration file of app service h-1, app service h-2; '
            "an app resource of that name would never be served there (the file wins, decision 8): "
            "choose another name"
        )
    await auth.create_resource(ADMIN, _app_doc("other"))
    # A joined host's static app does not win: the resource takes the name back (decision 19).
    await auth.create_resource(ADMIN, _app_doc("tunnel-only"))
    with pytest.raises(AlreadyExistsError):
        await auth.create_resource(ADMIN, _app_doc("proxy-only"))
    clock.t += timedelta(seconds=21)  # the hosts went away: the name is free
    await auth.create_resource(ADMIN, _app_doc("files"))


async def test_this_nodes_static_apps_are_known_without_a_heartbeat(tmp_path: Path, clock: Clock) -> None:
    backend = await SQLiteBackend.open(tmp_path / "b.db", clock=clock)
    try:
        auth = await AuthServer.open(backend, "t", AuthSettings(static_apps=frozenset({"logger"})), clock)
        with pytest.raises(AlreadyExistsError) as e:
            await auth.create_resource(ADMIN, _app_doc("logger"))
        assert e.value.message.startswith(
            'app "logger" is defined in the configuration file of the auth service\'s own node; '
        )
    finally:
        await backend.close()


async def test_concurrent_joins_one_wins_the_others_say_by_whom(auth: AuthServer) -> None:
    from bastion.auth.ca import new_host_key

    _, pub = new_host_key()
    secret, _ = await auth.add_token(ADMIN, ["app"], timedelta(minutes=30))
    results = await asyncio.gather(
        *(auth.join(secret, "app", public_key_pem=pub, hostname=f"h{i}") for i in range(4)),
        return_exceptions=True,
    )
    won = [r for r in results if not isinstance(r, BaseException)]
    lost = [r for r in results if isinstance(r, BaseException)]
    assert len(won) == 1 and len(lost) == 3
    winner_id = won[0][0]
    for e in lost:
        assert isinstance(e, AuthenticationError)
        assert "already used" in e.message and winner_id in e.message, e.message
        assert "expired" not in e.message


async def test_a_deleted_token_is_not_called_expired(auth: AuthServer) -> None:
    secret, token = await auth.add_token(ADMIN, ["app"], timedelta(minutes=30))
    await auth.delete_resource(ADMIN, "token", token.metadata.name)
    with pytest.raises(AuthenticationError, match="was deleted before it was used"):
        await auth.consume_join_token(secret, "app")


async def test_scoped_token_goes_into_the_host_certificate(auth: AuthServer) -> None:
    from cryptography import x509

    from bastion.auth.ca import host_identity, new_host_key

    _, pub = new_host_key()
    secret, token = await auth.add_token(
        ADMIN, ["app"], timedelta(minutes=30), apps=["a", "b"], labels={"env": ["dev"]}
    )
    assert token.spec.apps == ["a", "b"] and token.spec.labels == {"env": ["dev"]}
    _, cert = await auth.join(secret, "app", public_key_pem=pub, hostname="h\n1 evil")
    host = host_identity(x509.load_pem_x509_certificate(cert))
    assert host.hostname == "h1evil"  # client input, bounded and cleaned
    assert host.scope.apps == ("a", "b") and dict(host.scope.labels) == {"env": ("dev",)}
    renewed = host_identity(x509.load_pem_x509_certificate(auth.renew_host_cert(host, pub)))
    assert renewed.scope == host.scope
    plain, _ = await auth.add_token(ADMIN, ["app"], timedelta(minutes=30))
    _, cert = await auth.join(plain, "app", public_key_pem=pub, hostname="h2")
    assert host_identity(x509.load_pem_x509_certificate(cert)).scope.unrestricted
    with pytest.raises(ValidationError, match="invalid label key"):
        await auth.add_token(ADMIN, ["app"], labels={"bad key!": ["x"]})


async def test_logout_revokes_only_that_credential(auth: AuthServer, clock: Clock) -> None:
    await _user(auth, "rita", ["mcp-user"])
    first, _ = await auth.login("rita", PW)
    second, _ = await auth.login("rita", PW)
    actor = await auth.authenticate(first)
    await auth.revoke_credential(actor)
    with pytest.raises(AuthenticationError, match="revoked"):
        await auth.authenticate(first)
    assert (await auth.authenticate(second)).name == "rita"
    # Entries are dropped once the credential they name has expired.
    clock.t += timedelta(hours=13)
    third, _ = await auth.login("rita", PW)
    await auth.revoke_credential(await auth.authenticate(third))
    user = await auth.get_resource(ADMIN, "user", "rita")
    assert list(user.status.revoked) == [(await _ident(auth, third)).token_id]  # type: ignore[union-attr]


async def _ident(auth: AuthServer, token: str) -> Any:
    return auth.verifier.verify(token, auth.clock.now())


async def test_deleted_and_recreated_user_does_not_inherit_credentials(auth: AuthServer) -> None:
    await _user(auth, "sam", ["mcp-user"])
    old, _ = await auth.login("sam", PW)
    signed, _ = await auth.sign(ADMIN, "sam", timedelta(hours=1))
    await auth.delete_resource(ADMIN, "user", "sam")
    await _user(auth, "sam", ["mcp-user"])
    for token in (old, signed):
        with pytest.raises(AuthenticationError, match="earlier user"):
            await auth.authenticate(token)
    # A file re-creating the user cannot choose its id; overwriting keeps the stored one.
    doc = {"kind": "user", "metadata": {"name": "sam"}, "spec": {"roles": ["mcp-user"]}}
    stored = await auth.get_resource(ADMIN, "user", "sam")
    kept = await auth.create_resource(ADMIN, {**doc, "status": {"uid": "forged"}}, overwrite=True)
    assert kept.status.uid == stored.status.uid != "forged"  # type: ignore[union-attr]
    new, _ = await auth.login("sam", PW)
    assert (await auth.authenticate(new)).name == "sam"


async def test_a_strangers_bad_passwords_do_not_lock_the_user(auth: AuthServer, clock: Clock) -> None:
    await _user(auth, "tess", ["mcp-user"])
    for _ in range(3):  # lockout_attempts=3 in this fixture
        with pytest.raises(AuthenticationError, match="invalid user name or password"):
            await auth.login("tess", "wrong password!", source="203.0.113.9")
    with pytest.raises(AuthenticationError, match="from your address"):
        await auth.login("tess", PW, source="203.0.113.9")
    _, ident = await auth.login("tess", PW, source="198.51.100.7")
    assert ident.username == "tess"


async def test_parallel_guesses_cannot_overrun_the_pair_limit(auth: AuthServer) -> None:
    from bastion.auth.server import LoginRefusedError

    await _user(auth, "uma", ["mcp-user"])
    results = await asyncio.gather(
        *(auth.login("uma", f"wrong password {i}", source="203.0.113.9") for i in range(10)),
        return_exceptions=True,
    )
    reasons = [r.reason for r in results if isinstance(r, LoginRefusedError)]
    assert reasons.count("password") == 3 and reasons.count("locked") == 7


class Recorder:
    """An audit log that keeps what it is given, or refuses everything (``broken``)."""

    def __init__(self, *, broken: bool = False) -> None:
        self.events: list[Any] = []
        self.broken = broken

    async def record(self, event: Any) -> None:
        if self.broken:
            from bastion.errors import BackendError

            raise BackendError("the disk is full")
        self.events.append(event)


async def test_every_change_and_credential_is_audited_without_secrets(auth: AuthServer) -> None:
    rec = Recorder()
    auth.audit = rec
    invite = await auth.add_user(ADMIN, "alice", ["mcp-user"], {})
    await auth.accept_invite(invite.code, PW, source="192.0.2.7")
    token, _ = await auth.login("alice", PW, source="192.0.2.7")
    secret, tok = await auth.add_token(ADMIN, ["app"], timedelta(minutes=5))
    await auth.delete_resource(ADMIN, "token", tok.metadata.name)
    types = [e.type for e in rec.events]
    assert types == [
        "user.create",
        "invite.create",
        "invite.use",
        "user.login",
        "cert.create",
        "join_token.create",
        "join_token.delete",
    ]
    text = repr(rec.events)
    for s in (invite.code, PW, token, secret):
        assert s not in text
    login = rec.events[3]
    assert login.user == "alice" and login.remote_addr == "192.0.2.7" and login.success


async def test_no_credential_leaves_when_the_audit_log_cannot_record(auth: AuthServer) -> None:
    from bastion.errors import BackendError

    await _user(auth, "alice", ["mcp-user"])
    auth.audit = Recorder(broken=True)
    with pytest.raises(BackendError, match=r"cannot record this user\.login event"):
        await auth.login("alice", PW)
    with pytest.raises(BackendError, match=r"cannot record this user\.create event.*may have been done"):
        await auth.add_user(ADMIN, "bob", ["mcp-user"], {})
