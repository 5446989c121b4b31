"""Cluster administration through the proxy's web API, as the logged-in user.

The HTTP client itself is ``bastion.apiclient`` (shared with a joining app service); its names
are re-exported here for the CLI.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any
from urllib.parse import quote

from bastion.apiclient import (
    ApiClient,
    ProxyUnreachableError,
    Trust,
    UntrustedProxyError,
    base_url,
    fetch_ca_unverified,
)
from bastion.client.auditread import RemoteReader

__all__ = [
    "ApiClient",
    "ProxyUnreachableError",
    "RemoteAdmin",
    "Trust",
    "UntrustedProxyError",
    "base_url",
    "fetch_ca_unverified",
]


class RemoteAdmin:
    """Cluster administration through the proxy, as the logged-in user (their role rules decide)."""

    def __init__(self, client: ApiClient, cluster_name: str) -> None:
        self.client = client
        self.cluster_name = cluster_name
        self.proxy_addr = client.proxy

    async def close(self) -> None:
        await self.client.close()

    async def whoami(self) -> dict[str, Any]:
        return dict(await self.client.get("/v1/whoami"))

    async def get(self, kind: str, name: str) -> dict[str, Any]:
        return dict(await self.client.get(f"/v1/resources/{kind}/{name}"))

    async def ls(self, kind: str) -> list[dict[str, Any]]:
        return list(await self.client.get(f"/v1/resources/{kind}"))

    async def create(self, doc: dict[str, Any], *, overwrite: bool) -> dict[str, Any]:
        params = {"overwrite": "1"} if overwrite else {}
        return dict(await self.client.post("/v1/resources", doc, params=params))

    async def delete(self, kind: str, name: str) -> None:
        await self.client.request("DELETE", f"/v1/resources/{kind}/{name}")

    async def add_user(self, name: str, roles: list[str], traits: dict[str, list[str]]) -> dict[str, Any]:
        return dict(await self.client.post("/v1/users", {"name": name, "roles": roles, "traits": traits}))

    async def update_user(
        self, name: str, *, roles: list[str] | None, traits: dict[str, list[str]] | None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if roles is not None:
            body["roles"] = roles
        if traits is not None:
            body["traits"] = traits
        return dict(await self.client.request("PATCH", f"/v1/users/{name}", json=body))

    async def reset_user(self, name: str) -> dict[str, Any]:
        return dict(await self.client.post(f"/v1/users/{quote(name, safe='')}/reset", {}))

    async def user_locks(self) -> dict[str, dict[str, Any]]:
        return dict(await self.client.get("/v1/users/locks"))

    async def unlock_user(self, name: str) -> dict[str, Any]:
        return dict(await self.client.post(f"/v1/users/{quote(name, safe='')}/unlock", {}))

    async def add_token(
        self,
        roles: list[str],
        ttl: timedelta | None,
        *,
        apps: list[str] | None = None,
        labels: dict[str, list[str]] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"roles": roles, "apps": apps or [], "labels": labels or {}}
        if ttl:
            body["ttl_seconds"] = ttl.total_seconds()
        return dict(await self.client.post("/v1/tokens", body))

    async def sign(self, user: str, ttl: timedelta) -> dict[str, Any]:
        return dict(
            await self.client.post("/v1/auth/sign", {"user": user, "ttl_seconds": ttl.total_seconds()})
        )

    async def logout(self) -> dict[str, Any]:
        """Revoke the credential this client presents."""
        return dict(await self.client.post("/v1/auth/logout", {}))

    async def audit_search(self, params: dict[str, str]) -> list[dict[str, Any]]:
        return list(await self.client.request("GET", "/v1/audit/events", params=params))

    @contextlib.asynccontextmanager
    async def audit_reader(self) -> AsyncIterator[RemoteReader]:
        """The audit log through the proxy (streaming search, feed)."""
        yield RemoteReader(self.client)

    async def audit_verify(self, since: str | None = None) -> dict[str, Any]:
        params = {"since": since} if since else {}
        return dict(await self.client.request("GET", "/v1/audit/verify", params=params))

    async def mcp_pins(self, app: str) -> list[dict[str, Any]]:
        return list(await self.client.get(f"/v1/mcp/pins/{quote(app, safe='')}"))

    async def mcp_pins_change(self, action: str, app: str, tools: list[str] | None) -> list[str]:
        """``action``: ``approve`` or ``reset``; ``tools`` None: every tool of the app."""
        body: dict[str, Any] = {"all": True} if tools is None else {"tools": tools}
        got = await self.client.post(f"/v1/mcp/pins/{quote(app, safe='')}/{action}", body)
        return [str(t) for t in got["approved" if action == "approve" else "reset"]]

    async def ca_pem(self) -> str:
        data = await self.client.get("/v1/webapi/ca")
        return data.decode() if isinstance(data, bytes) else str(data)
