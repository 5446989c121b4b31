"""Typed resource models: ``user``, ``role``, ``token``, ``app`` (and internal kinds).

Every resource has ``kind``, ``version``, ``metadata`` (name, description,
labels, expires, revision) and ``spec``.  Models are frozen pydantic models
that forbid unknown fields, so a typo is an error, not a silent no-op.
Decoding from YAML/JSON text and turning pydantic errors into
``key.path: reason`` messages lives in ``bastion.resources.codec``.

This module must not import anything above ``bastion.errors``.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    field_validator,
    model_validator,
)

from bastion._time import format_duration, parse_duration
from bastion.resources.expressions import compile_expression

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
#: A trait template (``{{internal.x}}``) inside a pattern.
_TRAIT_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
LABEL_KEY_RE = re.compile(r"^(\*|[A-Za-z0-9][A-Za-z0-9._/-]{0,127})$")

#: Internal label set on every app; the ``mcp-user`` preset role selects on it.
SUB_KIND_LABEL = "bastion.internal/app-sub-kind"
#: Label on preset resources.
RESOURCE_TYPE_LABEL = "bastion.internal/resource-type"

MCP_SCHEMES = ("mcp+http", "mcp+https", "mcp+sse+http", "mcp+sse+https", "mcp+stdio")

VERBS = ("list", "create", "read", "update", "delete")
#: ``mcp_pin``: pinned tool definitions (decision 0045): read = ``bastion mcp pins ls|diff``,
#: update = ``approve|reset``.
RULE_RESOURCES = ("user", "role", "token", "app", "app_server", "event", "cert_authority", "mcp_pin")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _duration(v: Any) -> Any:
    if isinstance(v, str):
        return parse_duration(v)
    if isinstance(v, int | float):
        return timedelta(seconds=v)
    return v


#: A ``timedelta`` read from ``30m``-style text and written back the same way.
Duration = Annotated[
    timedelta,
    BeforeValidator(_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
]


def check_regex_or_glob(pattern: str) -> str:
    """Validate a matcher pattern: ``^regex$`` must compile; anything else is a glob/literal."""
    if pattern.startswith("^") and pattern.endswith("$"):
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f'invalid regular expression "{pattern}": {e}') from None
    return pattern


class Metadata(_Frozen):
    name: str
    description: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    expires: datetime | None = None
    #: Set by the backend when read; ignored on create, checked by ``update``.
    revision: int | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(
                f'invalid name "{v}": use letters, digits, ".", "_", "-", "@" '
                "(at most 128, starting with a letter or digit)"
            )
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if not LABEL_KEY_RE.match(k):
                raise ValueError(f'invalid label key "{k}"')
        return v


# --------------------------------------------------------------------- role


LabelValues = Annotated[list[str], BeforeValidator(lambda v: [v] if isinstance(v, str) else v)]


class Rule(_Frozen):
    resources: list[str]
    verbs: list[str]

    @field_validator("resources")
    @classmethod
    def _resources(cls, v: list[str]) -> list[str]:
        for r in v:
            if r != "*" and r not in RULE_RESOURCES:
                raise ValueError(f'unknown resource "{r}" (known: {", ".join(RULE_RESOURCES)}, or "*")')
        return v

    @field_validator("verbs")
    @classmethod
    def _verbs(cls, v: list[str]) -> list[str]:
        for verb in v:
            if verb != "*" and verb not in VERBS:
                raise ValueError(f'unknown verb "{verb}" (known: {", ".join(VERBS)}, or "*")')
        return v


class ToolRule(_Frozen):
    """An argument rule (decision 0044): for a call to one of ``tools``, the CEL condition ``when``.

    Under ``allow.mcp.tool_rules`` a call to a matching tool is allowed by the
    role only if ``when`` is true; under ``deny.mcp.tool_rules`` it is refused
    if ``when`` is true (or cannot be evaluated).  ``name`` is shown in
    refusals (default: ``ROLE.allow.tool_rules[INDEX]``).
    """

    name: str = ""
    tools: list[str]
    when: str

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v and not NAME_RE.match(v):
            raise ValueError(f'invalid rule name "{v[:130]}": use letters, digits, ".", "_", "-", "@"')
        return v

    @field_validator("tools")
    @classmethod
    def _tools(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("a tool rule needs at least one tool pattern")
        return [check_regex_or_glob(p) for p in v]

    @field_validator("when")
    @classmethod
    def _when(cls, v: str) -> str:
        compile_expression(v)  # raises ExpressionError (a ValueError) with the position
        return v


_RATE_UNITS: Final = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_rate(text: str) -> tuple[float, float]:
    """``"60/m"`` -> (60.0, 60.0): how many calls per how many seconds (``N/s``, ``N/m``, ``N/h``)."""
    count, sep, unit = text.strip().partition("/")
    try:
        n = float(count)
    except ValueError:
        n = 0.0
    if not sep or unit not in _RATE_UNITS or not n > 0 or n > 1e6:
        raise ValueError(f'"{text[:40]}" is not a rate: write N/s, N/m or N/h with N > 0 (e.g. "60/m")')
    return n, _RATE_UNITS[unit]


class RateLimit(_Frozen):
    """A rate limit (decision 0051) on calls of ``tools``: ``per_user`` (a role's
    ``allow.mcp.rate_limits``: each user's calls, on each app the role grants) or ``rate`` (an
    app's ``rate_limit``: every user's calls together); ``burst`` calls at once (default 1).
    ``name`` is shown in refusals (default: ``ROLE.rate_limits[INDEX]``)."""

    name: str = ""
    tools: list[str] = Field(default_factory=lambda: ["*"])
    per_user: str = ""
    rate: str = ""
    burst: int = Field(default=1, ge=1, le=100_000)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v and not NAME_RE.match(v):
            raise ValueError(f'invalid rate limit name "{v[:130]}": use letters, digits, ".", "_", "-", "@"')
        return v

    @field_validator("tools")
    @classmethod
    def _tools(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("a rate limit needs at least one tool pattern")
        return [check_regex_or_glob(p) for p in v]

    @field_validator("per_user", "rate")
    @classmethod
    def _rate(cls, v: str) -> str:
        if v:
            parse_rate(v)
        return v

    @property
    def per_second(self) -> tuple[float, float]:
        """(calls, seconds) of whichever of ``per_user`` / ``rate`` is set."""
        return parse_rate(self.per_user or self.rate)


class MCPPermissions(_Frozen):
    """What a role says about an app's MCP surface.

    ``tools``: nothing listed = no tool.  ``resources`` (URI patterns, which
    may be URI templates) and ``prompts`` (names): ``None`` (not said) = every
    one, for roles written before these fields existed (decision 0043); ``[]``
    = none.  ``tool_rules``: conditions on the arguments of calls (decision 0044).
    """

    tools: list[str] = Field(default_factory=list)
    resources: list[str] | None = None
    prompts: list[str] | None = None
    tool_rules: list[ToolRule] = Field(default_factory=list)
    #: Per-user rate limits on tool calls (decision 0051); only under ``allow``.
    rate_limits: list[RateLimit] = Field(default_factory=list)

    @field_validator("rate_limits")
    @classmethod
    def _rate_limits(cls, v: list[RateLimit]) -> list[RateLimit]:
        for limit in v:
            if not limit.per_user or limit.rate:
                raise ValueError('a role\'s rate limit says "per_user" (e.g. "60/m"), not "rate"')
        return v

    @field_validator("tools")
    @classmethod
    def _tools(cls, v: list[str]) -> list[str]:
        return [check_regex_or_glob(p) for p in v]

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else [check_regex_or_glob(p) for p in v]

    @field_validator("resources")
    @classmethod
    def _resources(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        for p in v:
            check_regex_or_glob(p)
            # A trait template is one "{{...}}" with brace-free text around it, so a URI
            # template expression beside it would make the pattern match nothing, silently.
            rest = _TRAIT_TEMPLATE.sub("", p)
            if rest != p and ("{" in rest or "}" in rest):
                raise ValueError(
                    f'"{p[:200]}": a resource pattern cannot hold both a trait template and a URI template'
                )
        return v


class RoleConditions(_Frozen):
    app_labels: dict[str, LabelValues] = Field(default_factory=dict)
    mcp: MCPPermissions = Field(default_factory=MCPPermissions)
    rules: list[Rule] = Field(default_factory=list)

    @field_validator("app_labels")
    @classmethod
    def _labels(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for k, values in v.items():
            if not LABEL_KEY_RE.match(k) and not k.startswith("{{"):
                raise ValueError(f'invalid label key "{k}" in selector')
            for value in values:
                check_regex_or_glob(value)
        return v


class RoleOptions(_Frozen):
    max_session_ttl: Duration = timedelta(hours=12)


class RoleSpec(_Frozen):
    options: RoleOptions = Field(default_factory=RoleOptions)
    allow: RoleConditions = Field(default_factory=RoleConditions)
    deny: RoleConditions = Field(default_factory=RoleConditions)

    @model_validator(mode="after")
    def _limits_allow_only(self) -> RoleSpec:
        if self.deny.mcp.rate_limits:
            raise ValueError("rate limits go under allow.mcp.rate_limits (a limit is not a denial)")
        return self


class Role(_Frozen):
    kind: Literal["role"] = "role"
    version: Literal["v1"] = "v1"
    metadata: Metadata
    spec: RoleSpec = Field(default_factory=RoleSpec)


# --------------------------------------------------------------------- user


class UserSpec(_Frozen):
    roles: list[str] = Field(default_factory=list)
    #: Trait name -> values, used by ``{{internal.X}}`` / ``{{external.X}}``.
    traits: dict[str, list[str]] = Field(default_factory=dict)


class UserStatus(_Frozen):
    """Written by the cluster, never taken from a file (``create -f`` keeps the stored one)."""

    #: Unique id of this user record, made when it is created.  Credentials name it, so a
    #: user deleted and created again under the same name does not inherit old credentials.
    uid: str = ""
    #: Credentials revoked before they expire (``bastion logout``): credential id -> its expiry.
    #: Entries are dropped once expired.
    revoked: dict[str, datetime] = Field(default_factory=dict)
    #: Credentials issued before this instant are refused (set when ``revoked`` would overflow).
    not_before: datetime | None = None


class User(_Frozen):
    kind: Literal["user"] = "user"
    version: Literal["v1"] = "v1"
    metadata: Metadata
    spec: UserSpec = Field(default_factory=UserSpec)
    status: UserStatus = Field(default_factory=UserStatus)


# --------------------------------------------------------------------- token

TOKEN_TYPES = ("app",)


class TokenSpec(_Frozen):
    #: What the token lets its bearer join as.
    roles: list[str]
    #: SHA-256 (hex) of the secret.  The secret itself is never stored.
    secret_sha256: str = ""
    #: What a host joined with it may serve: app names and an ``app_labels``-style selector
    #: (both empty: any app).  Written into the host's certificate at join.
    apps: list[str] = Field(default_factory=list)
    labels: dict[str, LabelValues] = Field(default_factory=dict)

    @field_validator("apps")
    @classmethod
    def _apps(cls, v: list[str]) -> list[str]:
        for name in v:
            if not NAME_RE.match(name):
                raise ValueError(f'invalid app name "{name[:128]}"')
        return v

    @field_validator("labels")
    @classmethod
    def _scope_labels(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for k, values in v.items():
            if not LABEL_KEY_RE.match(k):
                raise ValueError(f'invalid label key "{k[:128]}"')
            if not values:
                raise ValueError(f'label "{k}" needs at least one value')
            for value in values:
                check_regex_or_glob(value)
        return v

    @field_validator("roles")
    @classmethod
    def _roles(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"at least one join type is required ({', '.join(TOKEN_TYPES)})")
        for r in v:
            if r not in TOKEN_TYPES:
                raise ValueError(f'unknown join type "{r}" (known: {", ".join(TOKEN_TYPES)})')
        return v


class Token(_Frozen):
    kind: Literal["token"] = "token"
    version: Literal["v1"] = "v1"
    metadata: Metadata
    spec: TokenSpec


# ----------------------------------------------------------------------- app


#: Headers a rewrite may not name: the gateway writes them (framing, connection, session).
_GATEWAY_HEADERS: Final = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "proxy-connection",
        "expect",
        "content-type",
        "accept",
    }
)


class Header(_Frozen):
    name: str
    value: str

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.match(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$", v):
            raise ValueError(f'invalid header name "{v[:64]}"')
        folded = v.lower().replace("_", "-")
        if folded in _GATEWAY_HEADERS or folded.startswith("mcp-") or folded.startswith("x-bastion"):
            raise ValueError(
                f'header "{v}" is set by the gateway itself (HTTP framing, the MCP session or '
                "the protocol); a rewrite cannot replace it"
            )
        return v


def _header(v: Any) -> Any:
    """Accept ``"Name: value"`` strings (config-file form) as well as ``{name, value}``."""
    if isinstance(v, str):
        name, sep, value = v.partition(":")
        if not sep or not name.strip():
            raise ValueError(f'malformed header "{v}" (expected "Name: value")')
        return {"name": name.strip(), "value": value.strip()}
    return v


class Rewrite(_Frozen):
    headers: list[Annotated[Header, BeforeValidator(_header)]] = Field(default_factory=list)
    jwt_claims: Literal["roles-and-traits", "roles", "traits", "none"] = "roles-and-traits"


class MCPCommand(_Frozen):
    command: str
    args: list[str] = Field(default_factory=list)
    run_as_host_user: str = ""
    env: dict[str, str] = Field(default_factory=dict)


def transport_of(uri: str) -> str:
    """``stdio``, ``sse`` or ``http`` for an app URI; ``ValueError`` otherwise."""
    if not uri:
        return "stdio"
    scheme, sep, _ = uri.partition("://")
    if not sep:
        raise ValueError(f'invalid URI "{uri}" (expected scheme://...)')
    if scheme == "mcp+stdio":
        return "stdio"
    if scheme in ("mcp+sse+http", "mcp+sse+https"):
        return "sse"
    if scheme in ("mcp+http", "mcp+https"):
        return "http"
    raise ValueError(f'unknown scheme "{scheme}" (known: {", ".join(MCP_SCHEMES)})')


def _extra_path(v: str) -> str:
    """An ``extra_paths`` entry: an absolute path, already in normal form (what the gateway
    compares decoded, dot-resolved request paths with)."""
    from bastion.protocol.paths import PathError, normalise

    if not v.startswith("/") or not v.isascii() or "%" in v or "?" in v or "#" in v:
        raise ValueError(f'extra path "{v}" must be an absolute path without %, ? or #')
    try:
        ok = normalise(v.encode("ascii")) == v
    except PathError as e:
        raise ValueError(f'extra path "{v}": {e.message}') from None
    if not ok:
        raise ValueError(f'extra path "{v}" is not in normal form (no "." or ".." segments)')
    return v


class AppSpec(_Frozen):
    uri: str = ""
    mcp: MCPCommand | None = None
    insecure_skip_verify: bool = False
    rewrite: Rewrite = Field(default_factory=Rewrite)
    #: Streamable HTTP: path prefixes forwarded to the upstream besides the URI's own path
    #: and ``/.well-known/oauth-*`` (decision 0016); nothing else is.
    extra_paths: list[Annotated[str, AfterValidator(_extra_path)]] = Field(default_factory=list)
    #: The MCP era the app's server speaks: ``auto`` (streamable HTTP: probed once per app
    #: definition; stdio and SSE: the handshake), ``handshake`` (``initialize``, 2024-11-05 to
    #: 2025-11-25) or ``2026-07-28`` (sessionless requests only; decision 0047).
    protocol: Literal["auto", "handshake", "2026-07-28"] = "auto"
    #: Pinned tool definitions (decision 0045): ``off``; ``first_use`` (a tool's definition is
    #: pinned when first listed; a changed one is hidden and refused until approved);
    #: ``approve`` (every definition waits for an administrator's approval).
    pinning: Literal["off", "first_use", "approve"] = "off"
    #: Every user's calls of the app together (decision 0051): ``{rate: "100/s", burst: 20}``.
    rate_limit: RateLimit | None = None

    @field_validator("rate_limit")
    @classmethod
    def _app_rate(cls, v: RateLimit | None) -> RateLimit | None:
        if v is not None and (not v.rate or v.per_user):
            raise ValueError('an app\'s rate limit says "rate" (e.g. "100/s"), not "per_user"')
        return v

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        transport = transport_of(v)
        if transport != "stdio":
            rest = v.partition("://")[2]
            if not rest or rest.startswith("/"):
                raise ValueError(f'URI "{v}" has no host')
        return v

    @model_validator(mode="after")
    def _stdio_needs_command(self) -> AppSpec:
        if transport_of(self.uri) == "stdio" and self.mcp is None:
            raise ValueError("a stdio app needs mcp.command (or an mcp+http(s)/mcp+sse+http(s) uri)")
        return self

    @property
    def transport(self) -> str:
        return transport_of(self.uri)


class App(_Frozen):
    kind: Literal["app"] = "app"
    #: ``v3`` is accepted so that files written for Teleport load unchanged.
    version: Literal["v1", "v3"] = "v1"
    metadata: Metadata
    spec: AppSpec


# ----------------------------------------------------------------- app_server


class AppServerSpec(_Frozen):
    #: The host's own name (not unique), its software version and tunnel route tag.
    hostname: str = ""
    version: str = ""
    #: Prefix of the session ids this app service mints; the proxy routes by it.
    tag: str = ""
    #: ``proxy`` for a node's in-process app service, ``tunnel`` for a joined one.
    via: str = ""
    #: The proxies this app service is connected to (``host:port``).
    proxies: list[str] = Field(default_factory=list)
    #: The apps it serves now (static and dynamic).
    apps: list[App] = Field(default_factory=list)
    #: Dynamic apps its host policy refuses to serve: name -> reason (app_service.dynamic_apps).
    refused: dict[str, str] = Field(default_factory=dict)
    #: Names of the apps its host's own configuration file defines (and the demo): an app
    #: resource of such a name would never be served there, so it is refused at create.
    static: list[str] = Field(default_factory=list)


class AppServer(_Frozen):
    """A heartbeat: an app service that is alive and what it serves (read-only, expires)."""

    kind: Literal["app_server"] = "app_server"
    version: Literal["v1"] = "v1"
    metadata: Metadata
    spec: AppServerSpec


Resource = Role | User | Token | App | AppServer

KINDS: dict[str, type[BaseModel]] = {
    "role": Role,
    "user": User,
    "token": Token,
    "app": App,
    "app_server": AppServer,
}

#: Kinds the cluster writes itself; ``bastion create`` refuses them.
READ_ONLY_KINDS = frozenset({"app_server"})

#: Plural and short aliases accepted on the command line (``bastion get roles``).
KIND_ALIASES: dict[str, str] = {
    "role": "role",
    "roles": "role",
    "user": "user",
    "users": "user",
    "token": "token",
    "tokens": "token",
    "app": "app",
    "apps": "app",
    "mcp_server": "app",
    "mcp_servers": "app",
    "app_server": "app_server",
    "app_servers": "app_server",
}


def key_for(kind: str, name: str) -> str:
    """The backend key of a resource."""
    return f"/{kind}s/{name}"


def prefix_for(kind: str) -> str:
    return f"/{kind}s/"
