"""HTTP client for the proxy's web API (the CLI's and a joining app service's).

It lives below both ``client/`` and ``tunnel/`` in the layer order (docs/architecture.md) and
imports nothing of the project but ``errors``.

TLS is verified against the CA pinned for the proxy (or the system trust
store when none is pinned); ``insecure`` turns verification off and is meant
for development only.  Error bodies from the proxy become the same
``BastionError`` subclasses the server raised, so the CLI prints one kind of
error whether it talks to the cluster locally or remotely.
"""

from __future__ import annotations

import ssl
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
