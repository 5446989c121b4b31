"""Administration through the data directory, on the server host.

Whoever can read the cluster's config and data directory already holds every
key; so local access acts as the built-in administrator, with no login.  It
writes to the same backend the running service uses (SQLite in WAL mode lets
both write), and the service sees the changes through its watch.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bastion.audit.query import matches
from bastion.auth import outbox
from bastion.auth.outbox import Outbox
from bastion.auth.server import PROXY_ADDR_KEY, Actor, AuthServer, settings_from
from bastion.backend import Backend
from bastion.backend.factory import open_backend
from bastion.config import load_config
from bastion.errors import NotFoundError

if TYPE_CHECKING:
    from bastion.audit.store import AuditQuery
    from bastion.client.auditread import StoreReader

__all__ = ["PROXY_ADDR_KEY", "LocalAdmin", "settings_from"]


class LocalAdmin:
    def __init__(self, auth: AuthServer, backend: Backend, proxy_addr: str, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.auth = auth
        self.backend = backend
        self.cluster_name = auth.cluster_name
        self.proxy_addr = proxy_addr
        self.actor = Actor.admin()
        #: The PostgreSQL DSN when the cluster keeps its state (and audit log) there.
        self.dsn = ""

    @classmethod
    async def open(cls, config_path: Path) -> LocalAdmin:
        cfg = load_config(config_path)
        backend = await open_backend(cfg.auth_service.backend, cfg.bastion.data_dir)
        try:
            auth = await AuthServer.open(backend, "", settings_from(cfg), initialize=False)
            try:
                # The address the running proxy listens on (it may have been port 0).
                proxy_addr = (await backend.get(PROXY_ADDR_KEY)).value.decode()
            except NotFoundError:
                proxy_addr = cfg.proxy_service.effective_public_addr
        except BaseException:
            await backend.close()
            raise
        # What the administrator does here is audited through the cluster's outbox: the running
        # service (or the next one to start) moves it into the audit log (decision 0033).
        auth.audit = Outbox(backend)
        admin = cls(auth, backend, proxy_addr, cfg.bastion.data_dir)
        admin.dsn = (
            cfg.auth_service.backend.dsn.get_secret_value()
            if cfg.auth_service.backend.type == "postgres" and cfg.auth_service.backend.dsn
            else ""
        )
        return admin

    async def close(self) -> None:
        await self.backend.close()

    async def whoami(self) -> dict[str, Any]:
        return {
            "user": self.actor.name,
            "cluster_name": self.cluster_name,
            "roles": ["(local administrator)"],
        }

    async def get(self, kind: str, name: str) -> dict[str, Any]:
        return (await self.auth.get_resource(self.actor, kind, name)).model_dump(mode="json")

    async def ls(self, kind: str) -> list[dict[str, Any]]:
        return [r.model_dump(mode="json") for r in await self.auth.list_resources(self.actor, kind)]

    async def create(self, doc: dict[str, Any], *, overwrite: bool) -> dict[str, Any]:
        return (await self.auth.create_resource(self.actor, doc, overwrite=overwrite)).model_dump(mode="json")

    async def delete(self, kind: str, name: str) -> None:
        await self.auth.delete_resource(self.actor, kind, name)

    async def add_user(self, name: str, roles: list[str], traits: dict[str, list[str]]) -> dict[str, Any]:
        inv = await self.auth.add_user(self.actor, name, roles, traits)
        return {"user": inv.user, "code": inv.code, "expires": inv.expires.isoformat()}

    async def update_user(
        self, name: str, *, roles: list[str] | None, traits: dict[str, list[str]] | None
    ) -> dict[str, Any]:
        user = await self.auth.update_user(self.actor, name, roles=roles, traits=traits)
        return user.model_dump(mode="json")

    async def reset_user(self, name: str) -> dict[str, Any]:
        inv = await self.auth.reset_user(self.actor, name)
        return {"user": inv.user, "code": inv.code, "expires": inv.expires.isoformat()}

    async def user_locks(self) -> dict[str, dict[str, Any]]:
        return {name: v.to_dict() for name, v in (await self.auth.user_locks(self.actor)).items()}

    async def unlock_user(self, name: str) -> dict[str, Any]:
        return {"user": name, "was": (await self.auth.unlock_user(self.actor, name)).to_dict()}

    async def mcp_pins(self, app: str) -> list[dict[str, Any]]:
        return await self.auth.mcp_pins(self.actor, app)

    async def mcp_pins_change(self, action: str, app: str, tools: list[str] | None) -> list[str]:
        if action == "approve":
            return await self.auth.approve_mcp_pins(self.actor, app, tools)
        return await self.auth.reset_mcp_pins(self.actor, app, tools)

    async def add_token(
        self,
        roles: list[str],
        ttl: timedelta | None,
        *,
        apps: list[str] | None = None,
        labels: dict[str, list[str]] | None = None,
    ) -> dict[str, Any]:
        secret, token = await self.auth.add_token(self.actor, roles, ttl, apps=apps or (), labels=labels)
        from bastion.auth.ca import fingerprint

        return {
            "token": secret,
            "resource": token.model_dump(mode="json"),
            "ca_pin": fingerprint(self.auth.cas["host"].cert_pem),
            "proxy_addr": self.proxy_addr,
        }

    async def sign(self, user: str, ttl: timedelta) -> dict[str, Any]:
        token, ident = await self.auth.sign(self.actor, user, ttl)
        return {"token": token, "user": ident.username, "expires": ident.expires.isoformat()}

    async def audit_search(self, params: dict[str, str]) -> list[dict[str, Any]]:
        from bastion.audit.query import query_from_params

        query = query_from_params(params)
        if not self.dsn:
            from bastion.audit.sqlite_store import search_files

            # Read-only: the cluster may be running and writing this audit log.
            found = await search_files(self.data_dir, query)
        else:
            from bastion.audit.pg_store import PostgresAuditStore

            store = await PostgresAuditStore.open(self.dsn, seal=False)
            try:
                found = await store.search(query)
            finally:
                await store.close()
        # Events of local administration not moved into the log yet (no service running).
        waiting = [e.to_dict() for e in await outbox.pending(self.backend) if matches(query, e)]
        if not waiting:
            return found
        seen = {e["id"] for e in found}
        merged = found + [e for e in waiting if e["id"] not in seen]
        merged.sort(key=lambda e: str(e["time"]), reverse=query.order == "desc")
        return merged[: query.limit]

    async def audit_verify(self, since: str | None = None) -> dict[str, Any]:
        """Check the audit log against its seals (decision 0032): the report, breaks earliest first."""
        from bastion.audit.chain import checker_of
        from bastion.audit.query import parse_when

        when = parse_when(since) if since else None
        checker = checker_of(self.auth.cas["jwt"].public_key_pem)
        if not self.dsn:
            from bastion.audit.sqlite_store import verify_files

            # Read-only: the cluster may be running and writing this audit log.
            return (await verify_files(self.data_dir, checker, when)).to_dict()
        from bastion.audit.pg_store import PostgresAuditStore

        store = await PostgresAuditStore.open(self.dsn, seal=False)
        try:
            return (await store.verify(checker, when)).to_dict()
        finally:
            await store.close()

    @contextlib.asynccontextmanager
    async def audit_reader(self) -> AsyncIterator[StoreReader]:
        """The audit log read-only (streaming search, feed): the data dir's files or PostgreSQL."""
        from bastion.client.auditread import StoreReader

        async def waiting(query: AuditQuery) -> list[dict[str, Any]]:
            # Events of local administration not moved into the log yet (no service running).
            return [e.to_dict() for e in await outbox.pending(self.backend) if matches(query, e)]

        if not self.dsn:
            from bastion.audit.sqlite_store import AuditFiles

            # Read-only: the cluster may be running and writing this audit log.
            yield StoreReader(AuditFiles(self.data_dir), waiting)
            return
        from bastion.audit.pg_store import PostgresAuditStore

        store = await PostgresAuditStore.open(self.dsn, seal=False)
        try:
            yield StoreReader(store, waiting)
        finally:
            await store.close()

    async def ca_pem(self) -> str:
        return self.auth.cas["host"].cert_pem.decode()
