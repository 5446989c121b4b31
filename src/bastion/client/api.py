"""HTTP client for the proxy's web API.

TLS is verified against the CA pinned for the proxy (or the system trust
store when none is pinned); ``insecure`` turns verification off and is meant
for development only.  Error bodies from the proxy become the same
``BastionError`` subclasses the server raised, so the CLI prints one kind of
error whether it talks to the cluster locally or remotely.
"""

from __future__ import annotations

import ssl
from datetime import timedelta
from typing import Any

import httpx

from bastion import errors
from bastion.errors import BastionError

_BY_CODE: dict[str, type[BastionError]] = {
    cls.code: cls
    for cls in (
        errors.ValidationError,
        errors.NotFoundError,
        errors.AlreadyExistsError,
        errors.ConflictError,
        errors.AuthenticationError,
        errors.SecondFactorRequiredError,
        errors.AccessDeniedError,
        errors.LimitExceededError,
        errors.BackendError,
        errors.UpstreamError,
    )
}


class ProxyUnreachableError(BastionError):
    origin = "gateway"
    code = "unreachable"


def tls_context(
    ca_pem: str | None, *, insecure: bool = False, system_trust: bool = False
) -> ssl.SSLContext | bool:
    if insecure:
        return False
    ctx = ssl.create_default_context(cadata=ca_pem) if ca_pem else ssl.create_default_context()
    if ca_pem and system_trust:
        # A proxy with an operator's certificate (a public CA) as well as the cluster's own.
        ctx.load_default_certs()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def base_url(proxy: str) -> str:
    return proxy if proxy.startswith("https://") else f"https://{proxy}"


class ApiClient:
    """One proxy, optionally one credential."""

    def __init__(
        self,
        proxy: str,
        *,
        ca_pem: str | None,
        insecure: bool = False,
        token: str = "",
        system_trust: bool = False,
    ) -> None:
        self.proxy = proxy
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(
            base_url=base_url(proxy),
            verify=tls_context(ca_pem, insecure=insecure, system_trust=system_trust),
            headers=headers,
            timeout=httpx.Timeout(30.0, connect=10.0),
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            resp = await self._http.request(method, path, **kw)
        except httpx.ConnectError as e:
            if isinstance(e.__cause__, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY" in str(e):
                raise ProxyUnreachableError(
                    f"the proxy {self.proxy} presented a certificate that is not signed by the "
                    "cluster CA pinned for it: someone may be intercepting the connection, or the "
                    "cluster was re-created (then remove the pin under $BASTION_HOME/cas and log in again)"
                ) from None
            raise ProxyUnreachableError(f"cannot reach the proxy at {self.proxy}: {e}") from None
        except httpx.HTTPError as e:
            raise ProxyUnreachableError(f"request to the proxy at {self.proxy} failed: {e}") from None
        if resp.status_code >= 400:
            raise _error_from(resp)
        if resp.headers.get("content-type", "").startswith("application/json"):
            return resp.json()
        return resp.content

    async def get(self, path: str) -> Any:
        return await self.request("GET", path)

    async def post(self, path: str, body: Any, **kw: Any) -> Any:
        return await self.request("POST", path, json=body, **kw)


def _error_from(resp: httpx.Response) -> BastionError:
    try:
        err = resp.json()["error"]
        cls = _BY_CODE.get(err.get("code", ""), BastionError)
        return cls(str(err.get("message", "")))
    except (ValueError, KeyError, TypeError):
        return BastionError(f"the proxy answered HTTP {resp.status_code}: {resp.text[:200]}")


async def fetch_ca_unverified(proxy: str) -> str:
    """The cluster CA as the proxy reports it, before we trust it (show its fingerprint!)."""
    client = ApiClient(proxy, ca_pem=None, insecure=True)
    try:
        data = await client.get("/v1/webapi/ca")
    finally:
        await client.close()
    return data.decode() if isinstance(data, bytes) else str(data)


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
        return dict(await self.client.post(f"/v1/users/{name}/reset", {}))

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

    async def ca_pem(self) -> str:
        data = await self.client.get("/v1/webapi/ca")
        return data.decode() if isinstance(data, bytes) else str(data)
