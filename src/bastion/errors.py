"""The exception tree of mcp-bastion.

Every error says what went wrong and whose fault it is (``origin``): the
``client`` (bad input, bad credential, not allowed), the ``gateway`` (our own
failure) or the ``upstream`` (the MCP server or the backend behind us).

    BastionError
    ├── ConfigError                 invalid configuration file (client)
    ├── ValidationError             invalid resource or request (client)
    ├── NotFoundError               no such resource (client)
    ├── AlreadyExistsError          create of an existing resource (client)
    ├── ConflictError               revision mismatch on compare-and-swap (client)
    ├── AuthenticationError         missing, expired or bad credential (client)
    │   └── SecondFactorRequiredError   password right, one-time code missing (client)
    ├── AccessDeniedError           authenticated but not allowed (client)
    ├── LimitExceededError          too much of something (client)
    ├── WatchExpiredError           watch asked for a compacted revision (gateway)
    ├── BackendError                storage failed (gateway)
    ├── HostConfigError             an app cannot run as configured on this host (gateway)
    └── UpstreamError               the upstream MCP server failed (upstream)

HTTP handlers map these to status codes in exactly one place
(``bastion.proxy.errors``); nothing else turns exceptions into wire errors.
"""

from __future__ import annotations

from typing import ClassVar, Literal

Origin = Literal["client", "gateway", "upstream"]


class BastionError(Exception):
    """Base class: a message for humans and the party at fault."""

    origin: ClassVar[Origin] = "gateway"
    http_status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(BastionError):
    """A configuration file is invalid; ``path`` is the key path (``a.b[0].c``)."""

    origin = "client"
    http_status = 400
    code = "bad_config"

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


class ValidationError(BastionError):
    origin = "client"
    http_status = 400
    code = "bad_request"


class NotFoundError(BastionError):
    origin = "client"
    http_status = 404
    code = "not_found"


class AlreadyExistsError(BastionError):
    origin = "client"
    http_status = 409
    code = "already_exists"


class ConflictError(BastionError):
    origin = "client"
    http_status = 409
    code = "conflict"


class AuthenticationError(BastionError):
    origin = "client"
    http_status = 401
    code = "unauthenticated"


class SecondFactorRequiredError(AuthenticationError):
    """The password was right; a one-time code is needed too."""

    code = "otp_required"


class AccessDeniedError(BastionError):
    origin = "client"
    http_status = 403
    code = "access_denied"


class LimitExceededError(BastionError):
    origin = "client"
    http_status = 429
    code = "limit_exceeded"


class WatchExpiredError(BastionError):
    origin = "gateway"
    http_status = 410
    code = "watch_expired"


class BackendError(BastionError):
    origin = "gateway"
    http_status = 503
    code = "backend_unavailable"


class HostConfigError(BastionError):
    """What the gateway's own configuration asks of this host cannot be done.

    A stdio app whose host user does not exist, whose command is not found or not
    executable, that would run as root unasked, or that this host's policy refuses:
    the gateway's fault (its configuration, or an app resource its cluster accepted),
    never the upstream's.  Caught at start (static apps) or when an app is registered
    (dynamic ones) wherever the host can tell; this is what is left for call time.
    """

    origin = "gateway"
    http_status = 500
    code = "app_not_runnable"


class UpstreamError(BastionError):
    origin = "upstream"
    http_status = 502
    code = "upstream_error"
