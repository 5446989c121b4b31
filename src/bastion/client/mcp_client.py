"""A small MCP client over streamable HTTP, for ``bastion mcp tools`` and ``bastion mcp call``.

MCP 2026-07-28 where the gateway offers it: ``server/discover`` on enter, then every request
self-contained (its envelope in ``params._meta``, ``Mcp-Method``/``Mcp-Name`` headers), no
session.  Else (a gateway that answers the discover with an error) one session:
``initialize`` + ``notifications/initialized`` on enter, ``DELETE`` on exit.  A slow start is
reported to ``on_slow_start``; requests are answered as JSON or as an SSE stream
(notifications on the way are skipped).  Errors keep the gateway's message and whose fault it
was.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from types import TracebackType
from typing import Any

import httpx
import orjson

from bastion import __version__
from bastion.client.api import Trust
from bastion.client.slow import notice_if_slow, waiting_message
from bastion.errors import BastionError, UpstreamError
from bastion.protocol import modern as wire
from bastion.protocol.headers import NAME_PARAM, encode_header_value
from bastion.protocol.sse import SSEParser

PROTOCOL_VERSION = "2025-11-25"
MODERN_VERSION = "2026-07-28"


class MCPCallError(BastionError):
    """The server answered a request with a JSON-RPC error."""

    origin = "upstream"

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.rpc_code = code


class MCPClient:
    def __init__(
        self,
        *,
        proxy: str,
        app: str,
        token: str,
        trust: Trust,
        on_slow_start: Callable[[str], None] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``transport``: where requests go instead of the network (the web UI sends them, in
        process, to its own proxy's front: decision 0041)."""
        self.url = f"https://{proxy}/mcp/apps/{app}"
        self.app = app
        self.proxy = proxy
        self.trust = trust
        self._http = httpx.AsyncClient(
            verify=trust.context() if transport is None else True,
            transport=transport,
            timeout=httpx.Timeout(300.0, connect=10.0),
            headers={
                "Authorization": f"Bearer {token}",
                "Accept": "application/json, text/event-stream",
                "Content-Type": "application/json",
            },
        )
        self._ids = itertools.count(1)
        self.session_id = ""
        self.server_info: dict[str, Any] = {}
        #: The version spoken with the gateway (2026-07-28: no session).
        self.protocol_version = ""
        self._meta: dict[str, Any] = {}
        #: Told :func:`~bastion.client.slow.waiting_message` when ``initialize`` is slow.
        self.on_slow_start = on_slow_start

    async def __aenter__(self) -> MCPClient:
        notice = self.on_slow_start
        try:
            with notice_if_slow(lambda: notice(waiting_message(self.app)) if notice else None):
                if await self._discover():
                    return self
                init = await self.request(
                    "initialize",
                    {
                        "protocolVersion": PROTOCOL_VERSION,
                        "capabilities": {},
                        "clientInfo": {"name": "bastion-cli", "version": __version__},
                    },
                )
            self.server_info = init.get("serverInfo") or {}
            self._http.headers["MCP-Protocol-Version"] = str(init.get("protocolVersion", PROTOCOL_VERSION))
            await self._post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        except BaseException:
            await self._http.aclose()
            raise
        return self

    async def _discover(self) -> bool:
        """``server/discover`` as a 2026-07-28 client; True when the gateway speaks it (then
        every request is sent that way), False when it answers with an error (an older gateway:
        a -32022 or -32601 of its own)."""
        self._meta = {
            wire.META_VERSION: MODERN_VERSION,
            wire.META_CAPABILITIES: {},
            wire.META_CLIENT_INFO: {"name": "bastion-cli", "version": __version__},
        }
        self.protocol_version = MODERN_VERSION
        try:
            found = await self.request("server/discover")
        except BastionError:
            found = {}
        if MODERN_VERSION in (found.get("supportedVersions") or ()):
            self.server_info = found.get("serverInfo") or {}
            return True
        self._meta, self.protocol_version = {}, ""
        return False

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self.session_id:
                await self._http.delete(self.url, timeout=5.0)
        except httpx.HTTPError:
            pass  # best effort: the gateway reaps idle sessions anyway
        finally:
            await self._http.aclose()

    async def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        mid = next(self._ids)
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": mid, "method": method}
        headers: dict[str, str] | None = None
        if self._meta:  # 2026-07-28: the envelope in the body, the routing in headers
            params = dict(params or {})
            params["_meta"] = {**(params.get("_meta") or {}), **self._meta}
            headers = {"MCP-Protocol-Version": MODERN_VERSION, "Mcp-Method": method}
            key = NAME_PARAM.get(method)
            if key and isinstance(params.get(key), str):
                headers["Mcp-Name"] = encode_header_value(params[key])
        if params is not None:
            msg["params"] = params
        answer = await self._post(msg, want_id=mid, headers=headers)
        assert answer is not None
        if "error" in answer:
            err = answer["error"]
            raise MCPCallError(str(err.get("message", "error")), int(err.get("code", 0)))
        result = answer.get("result")
        return result if isinstance(result, dict) else {}

    async def list_tools(self, most: int | None = None) -> list[dict[str, Any]]:
        """Every tool the gateway lets the caller see (``tools/list``, all pages); with ``most``,
        no page is asked for once that many are listed (an upstream's pages may never end), and
        at most ``most`` are returned."""
        listed: list[dict[str, Any]] = []
        cursor: str | None = None
        while most is None or len(listed) < most:
            page = await self.request("tools/list", {"cursor": cursor} if cursor else {})
            listed.extend(t for t in page.get("tools") or [] if isinstance(t, dict))
            cursor = page.get("nextCursor")
            if not cursor:
                break
        return listed if most is None else listed[:most]

    async def _post(
        self, msg: dict[str, Any], want_id: int | None = None, headers: dict[str, str] | None = None
    ) -> dict[str, Any] | None:
        try:
            async with self._http.stream(
                "POST", self.url, content=orjson.dumps(msg), headers=headers
            ) as resp:
                if not self.session_id and resp.headers.get("mcp-session-id"):
                    self._http.headers["Mcp-Session-Id"] = self.session_id = resp.headers["mcp-session-id"]
                ctype = resp.headers.get("content-type", "").split(";")[0].strip()
                if resp.status_code == 202 or want_id is None:
                    return None
                if ctype == "text/event-stream" and resp.status_code == 200:
                    parser = SSEParser()
                    async for chunk in resp.aiter_bytes():
                        for ev in parser.feed(chunk):
                            if not ev.data:
                                continue
                            obj = orjson.loads(ev.data)
                            if isinstance(obj, dict) and obj.get("id") == want_id and "method" not in obj:
                                return obj
                    raise UpstreamError(f"{self.app}: the stream ended without an answer")
                body = await resp.aread()
        except httpx.HTTPError as e:
            refused = self.trust.refused(self.proxy, e)
            if refused is not None:
                raise refused from None
            raise BastionError(f"cannot reach the proxy for {self.app}: {e}") from None
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise BastionError(
                f"{self.app}: HTTP {resp.status_code}: {body[:200].decode(errors='replace')}"
            ) from None
        if resp.status_code >= 400 and not (isinstance(obj, dict) and "error" in obj):
            raise BastionError(f"{self.app}: HTTP {resp.status_code}")
        if resp.status_code >= 400:
            origin = resp.headers.get("x-bastion-error-origin", "gateway")
            raise BastionError(f"{obj['error'].get('message')} (HTTP {resp.status_code}, fault: {origin})")
        return obj if isinstance(obj, dict) else None
