"""HTTP client for the proxy's web API (the CLI's and a joining app service's).

It lives below both ``client/`` and ``tunnel/`` in the layer order (docs/architecture.md) and
imports nothing of the project but ``errors``.

:class:`Trust` is the one TLS policy of every client reaching a proxy (the CLI, identity
files, ``bastion mcp connect`` and ``proxy mcp``, a joining app service's web-API calls): the
proxy's certificate is accepted when it chains to the system trust store or to the cluster CA
pinned for it (decision 0027).  Error bodies from the proxy become the same ``BastionError``
subclasses the server raised, so the CLI prints one kind of error whether it talks to the
cluster locally or remotely.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
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


class UntrustedProxyError(ProxyUnreachableError):
    """The proxy's certificate is not accepted by the client's :class:`Trust`."""

    code = "untrusted_proxy"


@dataclass(frozen=True)
class Trust:
    """Which certificates a client accepts from one proxy: the policy every client path uses.

    A certificate for the proxy's name (host name checked) is accepted when it chains to the
    system trust store (``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` honoured) *or* to ``ca_pem``,
    the cluster CA pinned for the proxy, so an operator's own or public certificate works as
    well as the cluster's and either can replace the other without a client change.
    ``pinned_in`` says where the pin was read from (a file path, or a config key), for errors;
    ``hint`` is what to do when the cluster was re-created.  ``insecure`` verifies nothing
    (development only).  Not for the tunnel's mutual TLS: there the pinned cluster CA alone is
    trusted (``tunnel/agent.py``).
    """

    ca_pem: str = ""
    pinned_in: str = ""
    insecure: bool = False
    hint: str = "check its CA fingerprint and log in again with --ca-fingerprint=SHA256:..., which re-pins it"

    def context(self) -> ssl.SSLContext:
        """A new client context (callers may set ALPN on it)."""
        if self.insecure:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx = ssl.create_default_context()  # the system store, SSL_CERT_FILE included
            if self.ca_pem:
                ctx.load_verify_locations(cadata=self.ca_pem)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def refusal(self, proxy: str, reason: str) -> str:
        """The message for a proxy certificate this policy does not accept (``reason``: OpenSSL's)."""
        why = f" ({reason})" if reason else ""
        if not self.ca_pem:
            return (
                f"the proxy {proxy} presented a certificate that the system trust store does not "
                f"accept{why}: someone may be intercepting the connection, or the proxy uses the "
                "cluster's own certificate (then log in with --ca-fingerprint=SHA256:... to pin its CA)"
            )
        where = f" in {self.pinned_in}" if self.pinned_in else ""
        return (
            f"the proxy {proxy} presented a certificate that neither the system trust store nor "
            f"the cluster CA pinned for it{where} accepts{why}: someone may be intercepting the "
            f"connection, or the cluster was re-created (then {self.hint})"
        )

    def refused(self, proxy: str, e: BaseException) -> UntrustedProxyError | None:
        """The error to raise if ``e`` (an httpx error) is this policy refusing the certificate."""
        cause = _verify_failure(e)
        if cause is None and "CERTIFICATE_VERIFY" not in str(e):
            return None
        reason = str(cause.verify_message or "") if cause is not None else ""
        return UntrustedProxyError(self.refusal(proxy, reason))


def _verify_failure(e: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate error behind ``e`` (httpx wraps httpcore's, which wraps ssl's), if any."""
    seen: BaseException | None = e
    for _ in range(5):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def base_url(proxy: str) -> str:
    return proxy if proxy.startswith("https://") else f"https://{proxy}"


class ApiClient:
    """One proxy, optionally one credential."""

    def __init__(
        self,
        proxy: str,
        *,
        trust: Trust,
        token: str = "",
    ) -> None:
        self.proxy = proxy
        self.trust = trust
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(
            base_url=base_url(proxy),
            verify=trust.context(),
            headers=headers,
            timeout=httpx.Timeout(30.0, connect=10.0),
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, **kw: Any) -> Any:
        with self._transport_errors():
            resp = await self._http.request(method, path, **kw)
        if resp.status_code >= 400:
            raise _error_from(resp)
        if resp.headers.get("content-type", "").startswith("application/json"):
            return resp.json()
        return resp.content

    async def get(self, path: str) -> Any:
        return await self.request("GET", path)

    async def stream_lines(self, path: str, **kw: Any) -> AsyncIterator[bytes]:
        """``GET path``, its body read line by line as it arrives (a JSON-lines answer)."""
        timeout = httpx.Timeout(300.0, connect=10.0)
        with self._transport_errors():
            async with self._http.stream("GET", path, timeout=timeout, **kw) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    raise _error_from(resp)
                async for line in resp.aiter_lines():
                    if line:
                        yield line.encode()

    @contextlib.contextmanager
    def _transport_errors(self) -> Iterator[None]:
        """httpx's errors as ours: an untrusted proxy, or an unreachable one."""
        try:
            yield
        except httpx.ConnectError as e:
            refused = self.trust.refused(self.proxy, e)
            if refused is not None:
                raise refused from None
            raise ProxyUnreachableError(f"cannot reach the proxy at {self.proxy}: {e}") from None
        except httpx.HTTPError as e:
            raise ProxyUnreachableError(f"request to the proxy at {self.proxy} failed: {e}") from None

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
    client = ApiClient(proxy, trust=Trust(insecure=True))
    try:
        data = await client.get("/v1/webapi/ca")
    finally:
        await client.close()
    return data.decode() if isinstance(data, bytes) else str(data)
