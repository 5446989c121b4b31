"""The configuration file of ``bastion start``, validated once into frozen models.

What this module is for: reading ``bastion.yaml`` (``load_config``) and building a
configuration in code (``default_config``); the commented starter file is
``bastion.config_template``'s.  The result is a tree of frozen pydantic models that
forbid unknown keys, with every path already resolved (relative paths are taken
against the configuration file's directory) and every default filled in, so the
services never re-check or re-interpret what they are given::

    version: v1
    bastion:        {data_dir, cluster_name, join_params, proxy_server, log, diag_addr}
    auth_service:   {enabled, listen_addr, backend, second_factor, authentication}
    proxy_service:  {enabled, listen_addr, public_addr, tls, acme}
    app_service:    {enabled, demo_server, apps, resources, dynamic_apps, stdio_limits}

Every problem, wherever it is, becomes a ``ConfigError`` whose message is
``key.path: reason`` (one line per problem when there are several).

What it must not do: import any service (auth, proxy, app service, backend
implementations) or start anything.  It may import only ``bastion.resources``
(models and codec), ``bastion.errors`` and ``bastion._time``.  It does not
touch the file system beyond reading the configuration file itself (and, on
request, a join token file): directories are created by the services.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from bastion._time import parse_duration
from bastion.errors import ConfigError
from bastion.resources import (
    LABEL_KEY_RE,
    NAME_RE,
    App,
    AppSpec,
    Duration,
    LabelValues,
    Metadata,
    check_regex_or_glob,
)
from bastion.resources.codec import (
    DecodeError,
    load_documents,
    located_error,
    pydantic_problems,
)

__all__ = [
    "CONFIG_VERSION",
    "DEFAULT_AUTH_LISTEN",
    "DEFAULT_DATA_DIR",
    "DEFAULT_PROXY_LISTEN",
    "DEMO_APP_NAME",
    "AppConfig",
    "AppService",
    "AuthService",
    "Authentication",
    "Backend",
    "BastionSection",
    "Config",
    "DynamicAppsPolicy",
    "JoinParams",
    "LogConfig",
    "ProxyService",
    "ResourceMatcher",
    "StdioLimits",
    "TLSConfig",
    "default_config",
    "load_config",
    "split_addr",
    "validate_config",
]

CONFIG_VERSION = "v1"
DEFAULT_DATA_DIR = Path("/var/lib/bastion")
DEFAULT_AUTH_LISTEN = "127.0.0.1:3025"
DEFAULT_PROXY_LISTEN = "127.0.0.1:3080"
DEFAULT_TUNNEL_PORT = 3024
#: The name of the built-in demo app (``app_service.demo_server``).
DEMO_APP_NAME = "bastion-demo"
ALL_ROLES = frozenset({"auth", "proxy", "app"})

#: Context key (``model_validate(..., context=...)``) naming the directory that
#: relative paths are resolved against; the current directory when absent.
BASE_DIR = "base_dir"


# ------------------------------------------------------------------ helpers


def _none_as_empty(default: Any) -> Any:
    """A before-validator turning YAML ``null`` (``key:`` with no value) into ``default``."""

    def convert(v: Any) -> Any:
        return type(default)() if v is None else v

    return BeforeValidator(convert)


class _Model(BaseModel):
    """Base of every section: frozen, unknown keys are errors, ``key:`` (null) = defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_empty(cls, data: Any) -> Any:
        return {} if data is None else data


_HOST_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def split_addr(addr: str, *, allow_zero: bool = False) -> tuple[str, int]:
    """``host:port`` -> ``(host, port)``; IPv6 hosts are written ``[::1]:3080``.

    The host comes back without brackets.  Raises ``ValueError`` with a reason.
    ``allow_zero`` accepts port 0 ("any free port"), for listen addresses.
    """
    if addr.startswith("["):
        host, sep, port = addr[1:].partition("]:")
        if not sep:
            raise ValueError(f'invalid address "{addr}" (expected [ipv6-address]:port)')
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f'invalid address "{addr}": "{host}" is not an IPv6 address') from None
    else:
        host, sep, port = addr.rpartition(":")
        if not sep:
            raise ValueError(f'invalid address "{addr}" (expected host:port)')
        if ":" in host:
            raise ValueError(f'invalid address "{addr}": write IPv6 addresses in brackets, "[::1]:3080"')
        if not host:
            raise ValueError(f'invalid address "{addr}": missing host (use 0.0.0.0 for all interfaces)')
        labels = host.split(".")
        if all(label.isdigit() for label in labels):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f'invalid address "{addr}": bad IPv4 address "{host}"') from None
        elif not all(_HOST_LABEL.match(label) for label in labels):
            raise ValueError(f'invalid address "{addr}": bad host name "{host}"')
    lowest = 0 if allow_zero else 1
    if not port.isascii() or not port.isdigit() or not lowest <= int(port) <= 65535:
        raise ValueError(f'invalid address "{addr}": port must be a number from {lowest} to 65535')
    return host, int(port)


def _check_addr(v: str) -> str:
    split_addr(v)
    return v


def _check_listen_addr(v: str) -> str:
    split_addr(v, allow_zero=True)
    return v


def _check_optional_addr(v: str) -> str:
    return _check_addr(v) if v else v


#: ``host:port``, required.
Addr = Annotated[str, AfterValidator(_check_addr)]
#: ``host:port`` to listen on; port 0 picks a free port.
ListenAddr = Annotated[str, AfterValidator(_check_listen_addr)]


def _check_optional_listen(v: str) -> str:
    return _check_listen_addr(v) if v else v


#: ``host:port`` or empty.
OptionalAddr = Annotated[str, _none_as_empty(""), AfterValidator(_check_optional_addr)]


def _base_dir(info: ValidationInfo) -> Path:
    ctx = info.context if isinstance(info.context, Mapping) else {}
    base = ctx.get(BASE_DIR)
    return Path(base) if base else Path.cwd()


def _absolute(p: Path, info: ValidationInfo) -> Path:
    p = p.expanduser()
    if not p.is_absolute():
        p = _base_dir(info) / p
    return Path(os.path.normpath(p))


def _not_empty_path(v: Any) -> Any:
    if v is None or (isinstance(v, str) and not v.strip()):
        raise ValueError("must not be empty")
    return v


def _empty_path_is_none(v: Any) -> Any:
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    return v


def _absolute_or_none(p: Path | None, info: ValidationInfo) -> Path | None:
    return None if p is None else _absolute(p, info)


#: A path, made absolute against the configuration file's directory.
AbsPath = Annotated[Path, BeforeValidator(_not_empty_path), AfterValidator(_absolute)]
#: The same, or ``None`` when empty.
OptionalAbsPath = Annotated[
    Path | None, BeforeValidator(_empty_path_is_none), AfterValidator(_absolute_or_none)
]


def _metadata_reason(**fields: Any) -> str | None:
    """Why ``Metadata(**fields)`` would be rejected (so app names follow the resource rules)."""
    try:
        Metadata(name=fields.pop("name", "x"), **fields)
    except pydantic.ValidationError as e:
        return pydantic_problems(e)[0][1]
    return None


# --------------------------------------------------------------- bastion:


class JoinParams(_Model):
    """How an agent (a node running ``app_service`` alone) joins the cluster."""

    #: The join token itself, or the path of a file holding it (any value with a ``/``).
    token_name: Annotated[str, _none_as_empty("")] = ""
    method: Literal["token"] = "token"

    @field_validator("token_name")
    @classmethod
    def _token_path(cls, v: str, info: ValidationInfo) -> str:
        v = v.strip()
        if "/" in v or v.startswith("~"):
            return str(_absolute(Path(v), info))
        return v

    @property
    def token_file(self) -> Path | None:
        """The file holding the token, when ``token_name`` is a path."""
        return Path(self.token_name) if self.token_name.startswith("/") else None

    def read_token(self) -> str:
        """The token: ``token_name`` itself, or the stripped content of its file."""
        path = self.token_file
        if path is None:
            return self.token_name
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ConfigError(
                "bastion.join_params.token_name", f'cannot read token file "{path}": {e.strerror}'
            ) from None
        if not token:
            raise ConfigError("bastion.join_params.token_name", f'token file "{path}" is empty')
        return token


class LogConfig(_Model):
    severity: Literal["debug", "info", "warn", "error"] = "info"
    format: Literal["text", "json"] = "text"
    #: ``stderr``, ``stdout`` or the absolute path of a file.
    output: str = "stderr"

    @field_validator("output")
    @classmethod
    def _output(cls, v: str, info: ValidationInfo) -> str:
        v = v.strip()
        if not v:
            raise ValueError("must not be empty (stderr, stdout or a file path)")
        if v in ("stderr", "stdout"):
            return v
        return str(_absolute(Path(v), info))

    @property
    def file(self) -> Path | None:
        """The log file, or ``None`` for ``stderr``/``stdout``."""
        return None if self.output in ("stderr", "stdout") else Path(self.output)


def _host_name() -> str:
    name = socket.gethostname().split(".")[0]
    return name if NAME_RE.match(name) else "bastion"


def _one_or_many(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


class BastionSection(_Model):
    """The ``bastion:`` section: settings shared by every service of this node."""

    data_dir: AbsPath = DEFAULT_DATA_DIR
    #: Empty in the file means this host's name.
    cluster_name: str = Field(default="", validate_default=True)
    join_params: JoinParams = Field(default_factory=JoinParams)
    #: ``host:port`` of the proxy an agent joins through.
    proxy_server: OptionalAddr = ""
    #: Fingerprints (``SHA256:...``) of the cluster CA an agent accepts when it joins.
    ca_pin: Annotated[list[str], _none_as_empty([]), BeforeValidator(_one_or_many)] = Field(
        default_factory=list
    )
    log: LogConfig = Field(default_factory=LogConfig)
    #: ``host:port`` of the diagnostics listener (plain HTTP, no authentication:
    #: ``/metrics``, ``/healthz``, ``/readyz``); empty = off, port 0 = any free port.
    diag_addr: Annotated[str, _none_as_empty(""), AfterValidator(_check_optional_listen)] = ""

    @field_validator("cluster_name", mode="before")
    @classmethod
    def _cluster_name(cls, v: Any) -> Any:
        if v is None or (isinstance(v, str) and not v.strip()):
            return _host_name()
        if isinstance(v, str) and not NAME_RE.match(v):
            raise ValueError(
                f'invalid cluster name "{v}": use letters, digits, ".", "_", "-" '
                "(at most 128, starting with a letter or digit)"
            )
        return v


# ----------------------------------------------------------- auth_service:


BACKEND_TYPES = ("sqlite", "postgres")


def _empty_dsn_is_none(v: Any) -> Any:
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    return v.strip() if isinstance(v, str) else v


class Backend(_Model):
    """``sqlite`` (a file: ``path``) or ``postgres`` (a server: ``dsn``)."""

    type: str = "sqlite"
    #: sqlite only.  ``None`` means ``<data_dir>/backend.db``; see ``resolved_path``.
    path: OptionalAbsPath = None
    #: postgres only (required): ``postgresql://user:password@host:port/database``.
    #: A secret (it may hold the password): its repr is masked, and no error quotes it.
    dsn: Annotated[pydantic.SecretStr | None, BeforeValidator(_empty_dsn_is_none)] = None

    @field_validator("type")
    @classmethod
    def _type(cls, v: str) -> str:
        if v not in BACKEND_TYPES:
            raise ValueError(f'unknown backend type "{v}" (known: {", ".join(BACKEND_TYPES)})')
        return v

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, v: pydantic.SecretStr | None) -> pydantic.SecretStr | None:
        if v is not None and not v.get_secret_value().startswith(("postgresql://", "postgres://")):
            raise ValueError(
                "must be a URL starting with postgresql:// (postgresql://user:password@host:port/db)"
            )
        return v

    @model_validator(mode="after")
    def _fields_for_type(self) -> Backend:
        if self.type == "postgres":
            if self.dsn is None:
                raise located_error(
                    ("dsn",), "required when type is postgres (postgresql://user:password@host:port/db)"
                )
            if self.path is not None:
                raise located_error(("path",), "not used by the postgres backend (it uses dsn)")
        elif self.dsn is not None:
            raise located_error(("dsn",), f"only used by the postgres backend, not {self.type}")
        return self

    def resolved_path(self, data_dir: Path) -> Path:
        """The SQLite file: ``path`` if set, else ``<data_dir>/backend.db``."""
        return self.path if self.path is not None else data_dir / "backend.db"


def _second_factor(v: Any) -> Any:
    # YAML 1.1 reads unquoted on/off as booleans.
    if isinstance(v, bool):
        return "on" if v else "off"
    return v


class Authentication(_Model):
    #: Failed logins in a row before the account is locked.
    lockout_attempts: int = Field(default=5, ge=1)
    lockout_duration: Duration = timedelta(minutes=20)
    #: How long a user invitation (sign-up link) stays valid.
    invite_ttl: Duration = timedelta(hours=1)


class AuthService(_Model):
    enabled: bool = True
    listen_addr: ListenAddr = DEFAULT_AUTH_LISTEN
    backend: Backend = Field(default_factory=Backend)
    second_factor: Annotated[Literal["off", "optional", "on"], BeforeValidator(_second_factor)] = "optional"
    authentication: Authentication = Field(default_factory=Authentication)
    #: Lifetime of the certificates joined hosts get; they renew at two thirds of it.
    host_cert_ttl: Duration = Field(default=timedelta(hours=24))

    @field_validator("host_cert_ttl")
    @classmethod
    def _host_cert_ttl(cls, v: timedelta) -> timedelta:
        if v < timedelta(seconds=30):
            raise ValueError("must be at least 30s (hosts renew at two thirds of it)")
        return v


# ---------------------------------------------------------- proxy_service:


class TLSConfig(_Model):
    """A certificate for the proxy's listener; neither file = issue one from the cluster CA."""

    cert_file: OptionalAbsPath = None
    key_file: OptionalAbsPath = None

    @model_validator(mode="after")
    def _both_or_neither(self) -> TLSConfig:
        if self.cert_file is not None and self.key_file is None:
            raise located_error(("key_file",), "required when cert_file is set (set both or neither)")
        if self.key_file is not None and self.cert_file is None:
            raise located_error(("cert_file",), "required when key_file is set (set both or neither)")
        return self

    @property
    def provided(self) -> bool:
        """True when the operator supplied a certificate and key."""
        return self.cert_file is not None


class ACMEConfig(_Model):
    """The proxy's certificate ordered over ACME (RFC 8555) with HTTP-01 challenges (ADR 27)."""

    enabled: bool = False
    #: The CA's directory, e.g. https://acme-v02.api.letsencrypt.org/directory.
    directory_url: Annotated[str, _none_as_empty("")] = ""
    #: Contact address given to the CA (optional).
    email: Annotated[str, _none_as_empty("")] = ""
    #: The names (or IP addresses) the certificate is for; clients dial one of them.
    domains: Annotated[list[str], _none_as_empty([])] = Field(default_factory=list)
    #: Where HTTP-01 challenges are answered while an order is open (the CA dials port 80).
    http_addr: ListenAddr = "0.0.0.0:80"
    #: CA certificates for the directory's own TLS; empty = the system trust store.
    ca_file: OptionalAbsPath = None

    @model_validator(mode="after")
    def _complete(self) -> ACMEConfig:
        if not self.enabled:
            return self
        if not self.directory_url.startswith("https://"):
            raise located_error(("directory_url",), "required: the https:// URL of the ACME directory")
        if not self.domains:
            raise located_error(("domains",), "required: the names the certificate is for")
        return self


_UNSPECIFIED_HOSTS = ("0.0.0.0", "::")


class ProxyService(_Model):
    enabled: bool = True
    listen_addr: ListenAddr = DEFAULT_PROXY_LISTEN
    #: ``host:port`` that clients use; empty = derived from ``listen_addr``.
    public_addr: OptionalAddr = ""
    tls: TLSConfig = Field(default_factory=TLSConfig)
    acme: ACMEConfig = Field(default_factory=ACMEConfig)
    #: Browser origins allowed to call MCP endpoints (``Origin`` header), besides the
    #: proxy's own.  Requests without ``Origin`` (non-browser clients) are allowed.
    allowed_origins: Annotated[list[str], _none_as_empty([])] = Field(default_factory=list)
    #: Where joined app services dial in (mutual TLS).  Empty: the listen host, port
    #: 3024 (port 0 when ``listen_addr`` has port 0).
    tunnel_listen_addr: Annotated[str, _none_as_empty(""), AfterValidator(_check_optional_listen)] = ""
    #: ``host:port`` app services should dial, when it differs from the listen address.
    tunnel_public_addr: OptionalAddr = ""
    #: The HTTP/1.1 server under the HTTPS listener: ``bastion`` (our lean asyncio +
    #: httptools server, proxy/h1.py; docs/decisions/0011-lean-http-server.md) or
    #: ``uvicorn`` (the previous one, kept as a fallback).
    http_server: Literal["bastion", "uvicorn"] = "bastion"

    @model_validator(mode="after")
    def _one_certificate_source(self) -> ProxyService:
        if self.acme.enabled and self.tls.provided:
            raise located_error(("acme", "enabled"), "set tls.cert_file/key_file or acme, not both")
        return self

    @property
    def effective_tunnel_listen(self) -> tuple[str, int]:
        if self.tunnel_listen_addr:
            return split_addr(self.tunnel_listen_addr, allow_zero=True)
        host, port = split_addr(self.listen_addr, allow_zero=True)
        return host, (0 if port == 0 else DEFAULT_TUNNEL_PORT)

    @property
    def effective_public_addr(self) -> str:
        """``public_addr``, or ``listen_addr`` (with ``localhost`` for 0.0.0.0 / [::]).

        With port 0 the real port is known only once the proxy listens; the
        running proxy records its address in the backend (``/cluster/proxy_addr``).
        """
        if self.public_addr:
            return self.public_addr
        host, port = split_addr(self.listen_addr, allow_zero=True)
        if host in _UNSPECIFIED_HOSTS:
            return f"localhost:{port}"
        return self.listen_addr


# ------------------------------------------------------------ app_service:


class _AppIdentity(_Model):
    name: str
    description: Annotated[str, _none_as_empty("")] = ""
    labels: Annotated[dict[str, str], _none_as_empty({})] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        reason = _metadata_reason(name=v)
        if reason:
            raise ValueError(reason)
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        reason = _metadata_reason(labels=v)
        if reason:
            raise ValueError(reason)
        return v


class AppConfig(AppSpec, _AppIdentity):
    """One ``app_service.apps[]`` entry: the app's metadata plus every ``AppSpec`` field.

    Fields: ``name``, ``description``, ``labels``, ``uri``, ``mcp``
    (``command``, ``args``, ``run_as_host_user``, ``env``),
    ``insecure_skip_verify``, ``rewrite`` (``headers``, ``jwt_claims``), ``extra_paths``,
    ``protocol``; ``pinning`` (``off``, ``first_use``, ``approve``: decision 0045), ``rate_limit`` (0051).
    """

    def to_app(self) -> App:
        """The ``app`` resource this entry describes."""
        return App(
            metadata=Metadata(name=self.name, description=self.description, labels=self.labels),
            spec=AppSpec(
                uri=self.uri,
                mcp=self.mcp,
                insecure_skip_verify=self.insecure_skip_verify,
                rewrite=self.rewrite,
                extra_paths=self.extra_paths,
                protocol=self.protocol,
                pinning=self.pinning,
                rate_limit=self.rate_limit,
            ),
        )


class ResourceMatcher(_Model):
    """Selects dynamic ``app`` resources (created with ``bastion create``) to serve.

    ``labels`` maps a label key (or ``*``) to a value or list of values; a
    value is ``*``, a literal, or a ``^regex$``.
    """

    labels: dict[str, LabelValues]

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        if not v:
            raise ValueError('at least one label selector is required (use {"*": "*"} for all)')
        for key, values in v.items():
            if not LABEL_KEY_RE.match(key):
                raise ValueError(f'invalid label key "{key}"')
            if not values:
                raise ValueError(f'label "{key}" needs at least one value')
            for value in values:
                check_regex_or_glob(value)
        return v


#: Environment variables an app resource may never set, whatever the host allows: they
#: change what the loader or an interpreter runs (``LD_PRELOAD``, ``NODE_OPTIONS``...),
#: whom the server trusts, or what the gateway itself sets.  Matched ignoring case (npm
#: reads ``npm_config_*`` in any case).  Prefixes first, then exact names.
REFUSED_ENV_PREFIXES = (
    "LD_", "DYLD_", "PYTHON", "PERL", "RUBY", "NODE_", "NPM_CONFIG_", "BUN_", "DENO_",
    "BASH_FUNC_", "MALLOC_", "LUA_", "GEM_", "BUNDLE_", "GIT_", "PIP_", "UV_", "SSL_CERT_",
    "OPENSSL_", "XDG_", "ERL_", "DOTNET_", "CORECLR_", "COMPLUS_", "R_LIBS", "R_PROFILE",
)  # fmt: skip
REFUSED_ENV_NAMES = (
    "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS", "CLASSPATH", "BASH_ENV", "ENV",
    "SHELLOPTS", "BASHOPTS", "PS4", "IFS", "CDPATH", "GLOBIGNORE", "GCONV_PATH",
    "GLIBC_TUNABLES", "LOCPATH", "NLSPATH", "HOSTALIASES", "RES_OPTIONS", "LOCALDOMAIN",
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TMPDIR", "PHPRC", "PHP_INI_SCAN_DIR",
    "TCLLIBPATH", "CURL_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "ELIXIR_ERL_OPTIONS",
)  # fmt: skip
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def refused_env(name: str) -> bool:
    """Whether ``name`` is a variable no app resource may set (see ``REFUSED_ENV_PREFIXES``)."""
    upper = name.upper()
    return upper in REFUSED_ENV_NAMES or upper.startswith(REFUSED_ENV_PREFIXES)


def _check_command_entry(v: str) -> str:
    if not v.startswith("/"):
        raise ValueError(f'"{v}" must be an absolute path (a program, or a directory ending in "/")')
    if os.path.normpath(v) + ("/" if v.endswith("/") and v != "/" else "") != v or "//" in v:
        raise ValueError(f'"{v}" must be written without "..", "." or repeated "/"')
    if v == "/":
        raise ValueError('"/" would allow every program under the root directory; name a directory')
    return v


def _check_env_entry(v: str) -> str:
    name = v[:-1] if v.endswith("*") else v
    if not name or not _ENV_NAME.match(name):
        raise ValueError(f'"{v}" is not a variable name (letters, digits, "_"; "PREFIX_*" for a prefix)')
    covers = (*REFUSED_ENV_PREFIXES, *REFUSED_ENV_NAMES) if v.endswith("*") else ()
    if refused_env(name) or any(r.startswith(name.upper()) for r in covers):
        raise ValueError(
            f'"{v}" would let an app resource set a loader, interpreter or gateway variable '
            "(LD_*, PYTHON*, NODE_OPTIONS, PATH...), which is never allowed"
        )
    return v


def _check_network_entry(v: str) -> str:
    v = v.strip()
    try:
        ipaddress.ip_network(v, strict=False)
        return v
    except ValueError:
        pass
    host = v[2:] if v.startswith("*.") else v
    labels = host.rstrip(".").split(".")
    if "/" in v or not host or not all(_HOST_LABEL.match(label) for label in labels):
        raise ValueError(f'"{v}" is not a CIDR, an IP address, a host name or "*.domain"')
    return v


class DynamicAppsPolicy(_Model):
    """What apps created through the API (``app`` resources) may do on this host.

    The apps in this file are the host's own decision and are not limited by it.
    Everything is refused by default: a dynamic stdio app is served only when its
    command, user and environment are allowed here, a dynamic HTTP/SSE app only when
    its upstream address is (docs/decisions/0013-running-code-is-a-host-decision.md).
    """

    #: Absolute paths of programs a dynamic stdio app may run; an entry ending in ``/``
    #: allows every program directly in that directory (a directory of launchers).
    commands: Annotated[list[Annotated[str, AfterValidator(_check_command_entry)]], _none_as_empty([])] = (
        Field(default_factory=list)
    )
    #: Host users a dynamic stdio app may run as (``root`` only if written here).
    run_as: Annotated[list[str], _none_as_empty([])] = Field(default_factory=list)
    #: Variables a dynamic app may set in ``mcp.env``: names, or ``PREFIX_*``.
    env: Annotated[list[Annotated[str, AfterValidator(_check_env_entry)]], _none_as_empty([])] = Field(
        default_factory=list
    )
    #: Where a dynamic HTTP/SSE app may connect: CIDRs, IP addresses, host names
    #: (``*.example.com``).  Loopback, link-local (cloud metadata), multicast and the
    #: gateway's own listeners stay refused unless a CIDR inside them is named.
    upstream_networks: Annotated[
        list[Annotated[str, AfterValidator(_check_network_entry)]], _none_as_empty([])
    ] = Field(default_factory=list)

    @field_validator("run_as")
    @classmethod
    def _users(cls, v: list[str]) -> list[str]:
        for user in v:
            if not user or not re.match(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\$?$", user):
                raise ValueError(f'"{user}" is not a user name')
        return v


def _cpu_time(v: Any) -> Any:
    if v is None or (isinstance(v, int | str) and str(v).strip() in ("0", "off")):
        return timedelta(0)
    if isinstance(v, int):
        return timedelta(seconds=v)
    if isinstance(v, str):
        return parse_duration(v)
    return v


def _size(v: Any) -> Any:
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+)\s*(|[KMGT]i?B?)\s*", v, re.IGNORECASE)
        if not m:
            raise ValueError(f'invalid size "{v}" (a number of bytes, or like 512MiB, 4GiB; 0 = no limit)')
        unit = m.group(2)[:1].upper()
        return int(m.group(1)) << (10 * " KMGT".index(unit or " "))
    return v


class StdioLimits(_Model):
    """Limits on the stdio server processes this host runs (config file apps and dynamic ones).

    ``0`` means no limit for the rlimits.  A client over a cap is answered 429.
    """

    #: Stdio server processes one user may have running on this host (all apps).
    per_user: int = Field(default=16, ge=1)
    #: Stdio server processes of one app on this host (all users).
    per_app: int = Field(default=64, ge=1)
    #: RLIMIT_DATA of each server: its writable private memory (heap, anonymous mappings),
    #: in bytes or 512MiB / 4GiB.  Address space merely reserved is not counted.
    memory: Annotated[int, BeforeValidator(_size), Field(ge=0)] = 4 << 30
    #: RLIMIT_AS of each server: all its virtual memory.  Off by default: runtimes reserve
    #: far more than they use (WebAssembly in Node needs ~10 GiB, Chromium's V8 sandbox 1 TiB).
    address_space: Annotated[int, BeforeValidator(_size), Field(ge=0)] = 0
    #: RLIMIT_NOFILE of each server.
    open_files: int = Field(default=1024, ge=0)
    #: RLIMIT_CPU of each server: CPU time over its life (SIGXCPU then SIGKILL past it).
    cpu_time: Annotated[timedelta, BeforeValidator(_cpu_time)] = timedelta(hours=1)
    #: RLIMIT_NPROC of each server: processes of its host user, counted by the kernel per uid.
    processes: int = Field(default=0, ge=0)


class AppService(_Model):
    enabled: bool = True
    #: Also serve the built-in demo MCP server.
    demo_server: bool = False
    apps: Annotated[list[AppConfig], _none_as_empty([])] = Field(default_factory=list)
    #: Keys whose values are redacted from audited tool arguments (added to the defaults).
    audit_redact_keys: Annotated[list[str], _none_as_empty([])] = Field(default_factory=list)
    #: Limits of the MCP endpoint.
    max_body: int = Field(default=4 << 20, ge=1024)
    sessions_per_user: int = Field(default=64, ge=1)
    idle_timeout: Duration = timedelta(minutes=30)
    response_timeout: Duration = timedelta(minutes=5)
    resources: Annotated[list[ResourceMatcher], _none_as_empty([])] = Field(default_factory=list)
    dynamic_apps: DynamicAppsPolicy = Field(default_factory=DynamicAppsPolicy)
    stdio_limits: StdioLimits = Field(default_factory=StdioLimits)

    @property
    def static_names(self) -> frozenset[str]:
        """The app names this file owns: its apps and, if served, the demo (decision 8)."""
        names = {a.name for a in self.apps}
        return frozenset(names | {DEMO_APP_NAME} if self.demo_server else names)

    @model_validator(mode="after")
    def _unique_names(self) -> AppService:
        seen: set[str] = set()
        for i, app in enumerate(self.apps):
            if app.name in seen:
                raise located_error(("apps", i, "name"), f'duplicate app name "{app.name}"')
            seen.add(app.name)
        return self


class AuditExportFile(_Model):
    """``audit.export.file``: every event as a JSON line appended to ``path``, rotated by size."""

    path: AbsPath
    #: The file is rotated (``path.1``, ``path.2``...) once it is this big.
    max_bytes: int = Field(default=100 << 20, ge=4096)
    #: Rotated files kept (the oldest is removed).
    keep: int = Field(default=5, ge=1, le=1000)


class AuditExportHttp(_Model):
    """``audit.export.http``: batches of events POSTed to a webhook, retried with backoff."""

    url: str
    #: ``jsonl``: one event per line (application/x-ndjson); ``json``: a JSON array.
    format: Literal["jsonl", "json"] = "jsonl"
    #: Sent with every request (e.g. an ``Authorization`` the receiver checks).
    headers: dict[str, str] = Field(default_factory=dict)
    #: How long one POST may take before it counts as failed (and is retried).
    timeout: Duration = timedelta(seconds=10)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("must be an http:// or https:// URL")
        return v


class AuditExport(_Model):
    """``audit.export``: where every audit event goes, in commit order, at least once (decision 0035)."""

    file: AuditExportFile | None = None
    http: AuditExportHttp | None = None
    #: Events sent at a time, at most.
    batch: int = Field(default=500, ge=1, le=2000)
    #: A forwarded call is held back this long for its outcome (then sent, and sent again
    #: with its outcome when it comes: decision 0034).
    hold: Duration = timedelta(seconds=2)


class AuditSection(_Model):
    """``audit:``: how long the audit log keeps events (decision 0032), where it is exported
    (decision 0035), and when a call whose outcome never arrived is completed as "outcome
    unknown" (decision 0038)."""

    #: Events older than this are pruned in the background; unset: kept forever.
    retention: Duration | None = None
    #: Unset: no export.
    export: AuditExport | None = None
    #: A call recorded this long ago and still without an outcome is completed as failed,
    #: "outcome unknown", with the reason (its app service died before reporting it).
    unknown_outcome_after: Duration = timedelta(hours=1)

    @field_validator("unknown_outcome_after")
    @classmethod
    def _unknown_outcome_after(cls, v: timedelta) -> timedelta:
        if v < timedelta(seconds=1):
            raise ValueError("must be at least 1s")
        return v


# ------------------------------------------------------------------ Config


class Config(_Model):
    """A whole configuration file, validated and resolved."""

    version: str
    bastion: BastionSection = Field(default_factory=BastionSection)
    auth_service: AuthService = Field(default_factory=AuthService)
    proxy_service: ProxyService = Field(default_factory=ProxyService)
    app_service: AppService = Field(default_factory=AppService)
    audit: AuditSection = Field(default_factory=AuditSection)

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if v != CONFIG_VERSION:
            raise ValueError(f'unsupported version "{v}" (this bastion reads "{CONFIG_VERSION}")')
        return v

    @model_validator(mode="after")
    def _services(self) -> Config:
        auth, proxy, app = (
            self.auth_service.enabled,
            self.proxy_service.enabled,
            self.app_service.enabled,
        )
        if not (auth or proxy or app):
            raise located_error(
                (), "no service is enabled (enable auth_service, proxy_service or app_service)"
            )
        if proxy and not auth:
            raise located_error(
                ("proxy_service", "enabled"),
                "the proxy service needs auth_service enabled on the same node "
                "(only app_service can run alone, as an agent)",
            )
        if auth and self.bastion.proxy_server:
            raise located_error(
                ("bastion", "proxy_server"),
                "only for an agent (a node running app_service alone); remove it",
            )
        if not auth:  # an agent: app_service alone
            if not self.bastion.proxy_server:
                raise located_error(
                    ("bastion", "proxy_server"),
                    "required when auth_service is disabled (the address of the proxy to join)",
                )
            if not self.bastion.join_params.token_name:
                raise located_error(
                    ("bastion", "join_params", "token_name"),
                    "required when auth_service is disabled (a join token or a file holding it)",
                )
        return self

    @property
    def data_dir(self) -> Path:
        return self.bastion.data_dir

    @property
    def cluster_name(self) -> str:
        return self.bastion.cluster_name

    @property
    def backend_path(self) -> Path:
        """The SQLite backend file (``<data_dir>/backend.db`` unless set)."""
        return self.auth_service.backend.resolved_path(self.data_dir)

    @property
    def roles(self) -> frozenset[str]:
        """The services this node runs: a subset of ``{"auth", "proxy", "app"}``."""
        enabled = {
            "auth": self.auth_service.enabled,
            "proxy": self.proxy_service.enabled,
            "app": self.app_service.enabled,
        }
        return frozenset(role for role, on in enabled.items() if on)

    @property
    def is_agent(self) -> bool:
        """True for a node that runs app_service alone and joins through ``proxy_server``."""
        return not self.auth_service.enabled


# ---------------------------------------------------------------- loading


def validate_config(data: Mapping[str, Any], *, base_dir: Path | None = None) -> Config:
    """Validate decoded configuration data; relative paths are taken against ``base_dir``.

    Raises ``ConfigError``: its ``path`` is the first problem's key path and its
    message lists every problem found, one ``key.path: reason`` line each.
    """
    base = Path(os.path.abspath(base_dir if base_dir is not None else Path.cwd()))
    try:
        return Config.model_validate(data, context={BASE_DIR: base})
    except pydantic.ValidationError as e:
        problems = pydantic_problems(e)
    first_path, first_reason = problems[0]
    rest = [f"{path}: {reason}" if path else reason for path, reason in problems[1:]]
    raise ConfigError(first_path, "\n".join([first_reason, *rest]))


def load_config(path: str | Path) -> Config:
    """Read, decode and validate a configuration file.

    Problems with the file itself (missing, unreadable, not YAML, not exactly
    one document) are ``ConfigError(<file path>, reason)``; problems with its
    content are ``ConfigError(<key path>, reason)`` as in ``validate_config``.
    """
    file = Path(path)
    where = str(file)
    try:
        text = file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(where, "no such file") from None
    except IsADirectoryError:
        raise ConfigError(where, "is a directory, not a configuration file") from None
    except UnicodeDecodeError:
        raise ConfigError(where, "is not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(where, f"cannot read: {e.strerror or e}") from None
    try:
        docs = load_documents(text, source=where)
    except DecodeError as e:
        raise ConfigError(where, e.location) from None
    if not docs:
        raise ConfigError(where, f"the file is empty (it needs at least: version: {CONFIG_VERSION})")
    if len(docs) > 1:
        raise ConfigError(where, f"found {len(docs)} YAML documents; a configuration file holds exactly one")
    return validate_config(docs[0], base_dir=file.absolute().parent)


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def default_config(
    data_dir: Path,
    *,
    cluster_name: str = "",
    auth_listen: str = DEFAULT_AUTH_LISTEN,
    proxy_listen: str = DEFAULT_PROXY_LISTEN,
    public_addr: str = "",
    second_factor: str = "optional",
    demo_server: bool = False,
    apps: Sequence[AppConfig | Mapping[str, Any]] = (),
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """A single-node configuration (auth + proxy + app) for tests and the demo.

    ``overrides`` is merged key by key into the file-shaped data before
    validation (``{"auth_service": {"authentication": {"lockout_attempts": 3}}}``),
    so anything a file can say can be said here, and it is checked the same way.
    Raises ``ConfigError`` like ``load_config``.
    """
    data: dict[str, Any] = {
        "version": CONFIG_VERSION,
        "bastion": {"data_dir": str(data_dir), "cluster_name": cluster_name},
        "auth_service": {"listen_addr": auth_listen, "second_factor": second_factor},
        "proxy_service": {"listen_addr": proxy_listen, "public_addr": public_addr},
        "app_service": {
            "demo_server": demo_server,
            "apps": [a.model_dump() if isinstance(a, AppConfig) else dict(a) for a in apps],
        },
    }
    if overrides:
        data = _merge(data, overrides)
    return validate_config(data)
