"""MCP 2026-07-28 on the wire: the per-request envelope, mirrored headers, and results as that
version writes them.  Pure: no I/O.

A 2026-07-28 request is self-contained: ``params._meta`` carries the client's protocol
version, capabilities and (optionally) its name, and the HTTP headers ``MCP-Protocol-Version``,
``Mcp-Method`` and, for ``tools/call``/``prompts/get``/``resources/read``, ``Mcp-Name`` mirror
the body.  :func:`check_request` is the validation ladder the spec asks of a server that reads
bodies (first failure wins): the envelope, then the headers against the body (-32020), then the
version (-32022).  Policy is always decided on the body; the headers only have to agree with it.

The gateway answers older clients too; what it writes for a 2026 client differs only in the
results: every result carries ``resultType``, and the cacheable ones (lists, ``resources/read``,
``server/discover``) carry ``ttlMs`` and ``cacheScope`` (:func:`modern_result`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

from bastion.protocol.headers import NAME_PARAM, decode_header_value, encode_header_value
from bastion.protocol.jsonrpc import HEADER_MISMATCH, INVALID_PARAMS, UNSUPPORTED_PROTOCOL_VERSION

#: The versions whose requests carry their own envelope (no initialize, no session).
MODERN_VERSIONS: Final = ("2026-07-28",)
#: The versions reached through ``initialize`` (oldest first).
HANDSHAKE_VERSIONS: Final = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
#: Every version the gateway speaks to clients, oldest first: it bridges each to any upstream.
ALL_VERSIONS: Final = (*HANDSHAKE_VERSIONS, *MODERN_VERSIONS)
#: The version the gateway asks for when it opens a session for a 2026 client on an older upstream.
LATEST_HANDSHAKE: Final = HANDSHAKE_VERSIONS[-1]

META_VERSION: Final = "io.modelcontextprotocol/protocolVersion"
META_CLIENT_INFO: Final = "io.modelcontextprotocol/clientInfo"
META_CAPABILITIES: Final = "io.modelcontextprotocol/clientCapabilities"
ENVELOPE_KEYS: Final = (META_VERSION, META_CLIENT_INFO, META_CAPABILITIES)

#: Methods 2026-07-28 removed; a 2026 client sending one is told the method does not exist.
REMOVED_METHODS: Final = frozenset(
    {"initialize", "ping", "logging/setLevel", "resources/subscribe", "resources/unsubscribe"}
)
#: Results that carry caching hints (``ttlMs``, ``cacheScope``) in 2026-07-28.
CACHEABLE: Final = frozenset(
    {
        "tools/list",
        "prompts/list",
        "resources/list",
        "resources/templates/list",
        "resources/read",
        "server/discover",
    }
)
#: Client capabilities the gateway does not pass on when it opens an older session for a 2026
#: client: a 2026 client cannot be sent requests (sampling, elicitation, roots) on that path, and
#: tasks left the core protocol.  An upstream told of them would ask and wait.
UNBRIDGED_CAPABILITIES: Final = frozenset({"sampling", "elicitation", "roots", "tasks"})

#: HTTP status of the JSON-RPC errors the ladder and dispatch write (2026-07-28 transports).
ERROR_STATUS: Final[Mapping[int, int]] = {
    -32700: 400,
    -32600: 400,
    -32602: 400,
    HEADER_MISMATCH: 400,
    -32021: 400,
    UNSUPPORTED_PROTOCOL_VERSION: 400,
    -32601: 404,
}

_ROUTING: Final = (b"mcp-protocol-version", b"mcp-method", b"mcp-name")
_QUOTE: Final = 128


@dataclass(frozen=True, slots=True)
class Envelope:
    """What a 2026 request says of its client, from ``params._meta``."""

    version: str
    capabilities: dict[str, Any]
    client_info: dict[str, Any] | None

    def key(self) -> bytes:
        """The client's self-description as canonical bytes: requests with the same one share
        the upstream session the gateway holds for them (decision 0046).  Capabilities the
        gateway does not pass on (``UNBRIDGED_CAPABILITIES``) do not make another session."""
        caps = {k: v for k, v in self.capabilities.items() if k not in UNBRIDGED_CAPABILITIES}
        return orjson.dumps([self.version, self.client_info, caps], option=orjson.OPT_SORT_KEYS)


@dataclass(frozen=True, slots=True)
class Rejection:
    """The first rung of the ladder a request failed, as a JSON-RPC error."""

    code: int
    message: str
    data: Any = None

    @property
    def status(self) -> int:
        return ERROR_STATUS.get(self.code, 400)


def unsupported_version(requested: str) -> Rejection:
    """-32022, naming the versions the gateway speaks (the client picks one of them)."""
    return Rejection(
        UNSUPPORTED_PROTOCOL_VERSION,
        f"unsupported protocol version {_quote(requested)}: the gateway speaks {', '.join(ALL_VERSIONS)}",
        {"supported": list(ALL_VERSIONS), "requested": requested[:_QUOTE]},
    )


def duplicated_routing_header(raw_headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The name of a routing header sent more than once ("" if none): first-copy and last-copy
    readers would disagree, so such a request is refused whatever the copies say."""
    seen: set[bytes] = set()
    for name, _ in raw_headers:
        key = name.lower()
        if key in _ROUTING:
            if key in seen:
                return key.decode()
            seen.add(key)
    return ""


def check_request(
    method: str, params: Mapping[str, Any] | None, headers: Mapping[bytes, bytes]
) -> Envelope | Rejection:
    """The 2026-07-28 ladder for one request: its envelope, or the first rung it fails.

    1. ``params._meta`` holds the protocol version and the client capabilities (-32602);
    2. ``MCP-Protocol-Version`` equals the envelope's version, ``Mcp-Method`` the method and,
       where the method names something, ``Mcp-Name`` that name (``=?base64?...?=`` decoded);
       a header absent where it is required is a mismatch too (-32020);
    3. the version is one the gateway speaks on this path (-32022).
    """
    meta = params.get("_meta") if params is not None else None
    if not isinstance(meta, dict):
        return Rejection(
            INVALID_PARAMS,
            f"params._meta must be an object carrying {META_VERSION!r} and {META_CAPABILITIES!r}",
        )
    missing = [k for k in (META_VERSION, META_CAPABILITIES) if k not in meta]
    if missing:
        return Rejection(INVALID_PARAMS, f"params._meta lacks {', '.join(missing)}")
    version, caps, info = meta[META_VERSION], meta[META_CAPABILITIES], meta.get(META_CLIENT_INFO)
    hv = headers.get(b"mcp-protocol-version")
    if hv is None or not isinstance(version, str) or hv.decode("latin-1").strip() != version:
        return Rejection(
            HEADER_MISMATCH,
            f"MCP-Protocol-Version header {_quote(hv.decode('latin-1') if hv is not None else None)} "
            f"does not match the body's {META_VERSION} {_quote(version)}",
        )
    hm = headers.get(b"mcp-method")
    if hm is None or decode_header_value(hm) != method:
        shown = decode_header_value(hm) if hm is not None else None
        return Rejection(
            HEADER_MISMATCH,
            f"Mcp-Method header {_quote(shown)} does not match the body's method {_quote(method)}",
        )
    key = NAME_PARAM.get(method)
    if key is not None:
        value = params.get(key) if params is not None else None
        hn = headers.get(b"mcp-name")
        got = decode_header_value(hn) if hn is not None else None
        if value is not None and got != value:
            return Rejection(
                HEADER_MISMATCH,
                f"Mcp-Name header {_quote(got)} does not match the body's {key} {_quote(value)}",
            )
    if version not in MODERN_VERSIONS:
        return unsupported_version(version)
    if not isinstance(caps, dict):
        return Rejection(INVALID_PARAMS, f"{META_CAPABILITIES} must be an object")
    return Envelope(version, caps, info if isinstance(info, dict) else None)


def initialize_params(env: Envelope) -> dict[str, Any]:
    """The ``initialize`` params of the older session the gateway opens for a 2026 client: its
    name and capabilities (less those it cannot be asked for on this path)."""
    info = env.client_info if env.client_info is not None else {"name": "mcp-2026-client", "version": "0"}
    caps = {k: v for k, v in env.capabilities.items() if k not in UNBRIDGED_CAPABILITIES}
    return {"protocolVersion": LATEST_HANDSHAKE, "capabilities": caps, "clientInfo": info}


def without_envelope(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` for an older upstream: the envelope keys leave ``_meta`` (the session carries
    them); everything else, ``progressToken`` included, stays as the client sent it."""
    meta = params.get("_meta")
    if not isinstance(meta, dict) or not any(k in meta for k in ENVELOPE_KEYS):
        return params
    rest = {k: v for k, v in meta.items() if k not in ENVELOPE_KEYS}
    out = dict(params)
    if rest:
        out["_meta"] = rest
    else:
        del out["_meta"]
    return out


def modern_capabilities(caps: Mapping[str, Any]) -> dict[str, Any]:
    """An older server's capabilities as a 2026 client may rely on them through the gateway:
    what 2026-07-28 removed or the gateway does not carry (``logging``, tasks, resource
    subscriptions) is left out; ``listChanged`` stays (``subscriptions/listen`` carries it)."""
    out: dict[str, Any] = {}
    for name, value in caps.items():
        if name in ("logging", "tasks"):
            continue
        if name == "resources" and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k != "subscribe"}
        out[name] = value
    return out


def discover_result(
    capabilities: Mapping[str, Any], instructions: Any, server_info: Any, ttl_ms: int
) -> dict[str, Any]:
    """The gateway's ``server/discover`` result for an app: the versions it bridges, the
    upstream's capabilities as the user may use them (per user: never ``public``)."""
    out: dict[str, Any] = {
        "supportedVersions": list(ALL_VERSIONS),
        "capabilities": modern_capabilities(capabilities),
        "resultType": "complete",
        "ttlMs": ttl_ms,
        "cacheScope": "private",
    }
    if isinstance(instructions, str):
        out["instructions"] = instructions
    if isinstance(server_info, dict):
        out["_meta"] = {"io.modelcontextprotocol/serverInfo": server_info}
    return out


def modern_result(method: str, result: dict[str, Any], ttl_ms: int) -> dict[str, Any]:
    """A result from an older upstream as 2026-07-28 writes it: ``resultType`` always; for
    cacheable methods ``cacheScope: "private"`` (the gateway filters per user, so a shared cache
    must never hold it) and a ``ttlMs`` no longer than ``ttl_ms``."""
    out = dict(result)
    out.setdefault("resultType", "complete")
    if method in CACHEABLE:
        ttl = out.get("ttlMs")
        out["ttlMs"] = min(ttl, ttl_ms) if type(ttl) is int and ttl >= 0 else ttl_ms
        out["cacheScope"] = "private"
    return out


def _quote(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _QUOTE else f"{text[:_QUOTE]}… ({len(text)} characters)"


# ------------------------------------------------------------ Mcp-Param-* headers

_TOKEN_CHARS: Final = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
_HEADER_TYPES: Final = frozenset({"string", "integer", "boolean"})
#: The most annotated properties read from one tool's schema (a schema is the upstream's word).
_MAX_PARAMS: Final = 64


def param_header_map(schema: Any) -> dict[tuple[str, ...], str]:
    """The ``x-mcp-header`` annotations of a tool's input schema: property path -> header token.

    Only properties reached from the root through ``properties`` alone count, with a
    string, integer or boolean type and a token name, case-insensitively unique; a schema with
    any other annotation is refused whole (``{}``), as a conforming client does (it then sends no
    ``Mcp-Param-*`` header, and the server, which validates the same way, expects none)."""
    out: dict[tuple[str, ...], str] = {}
    seen: set[str] = set()
    stack: list[tuple[tuple[str, ...], Any]] = [((), schema)]
    while stack:
        path, node = stack.pop()
        if not isinstance(node, dict):
            continue
        token = node.get("x-mcp-header")
        if token is not None:
            if (
                not path
                or not isinstance(token, str)
                or not token
                or not set(token) <= _TOKEN_CHARS
                or node.get("type") not in _HEADER_TYPES
                or token.lower() in seen
                or len(out) >= _MAX_PARAMS
            ):
                return {}
            seen.add(token.lower())
            out[path] = token
        props = node.get("properties")
        if isinstance(props, dict) and len(path) < 8:
            stack.extend(((*path, str(k)), v) for k, v in props.items())
        for key, value in node.items():  # annotations off the properties chain make it invalid
            if key not in ("properties", "x-mcp-header") and _has_annotation(value):
                return {}
    return out


def _has_annotation(value: Any, depth: int = 0) -> bool:
    if depth > 32:
        return False
    if isinstance(value, dict):
        return "x-mcp-header" in value or any(_has_annotation(v, depth + 1) for v in value.values())
    if isinstance(value, list):
        return any(_has_annotation(v, depth + 1) for v in value)
    return False


def param_headers(header_map: Mapping[tuple[str, ...], str], arguments: Any) -> list[tuple[bytes, bytes]]:
    """The ``Mcp-Param-*`` headers a ``tools/call`` mirrors from its arguments (values as the
    body has them: booleans ``true``/``false``, others as text; ``=?base64?`` when needed)."""
    out: list[tuple[bytes, bytes]] = []
    for path, token in header_map.items():
        node: Any = arguments
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, bool):
            text = "true" if node else "false"
        elif isinstance(node, str | int | float):
            text = str(node)
        else:
            continue
        out.append((f"mcp-param-{token}".lower().encode(), encode_header_value(text).encode()))
    return out
