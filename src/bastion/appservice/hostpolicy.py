"""What an app service host lets apps do: run programs, dial addresses, hold processes.

An API right must never become a host right.  Whoever may create an ``app``
resource decides what the app is called and who may use it; only the host's
configuration file decides what runs on the host and what it connects to
(docs/decisions/0013-running-code-is-a-host-decision.md):

- :meth:`HostPolicy.refusal` judges a *dynamic* app (one created through the API)
  against ``app_service.dynamic_apps``: a stdio app's command, host user and
  environment; an HTTP/SSE app's address as far as it can be judged without a
  lookup (the rest is judged at connect time by the :class:`AddressGuard`).
  Given a :class:`~bastion.appservice.hostcheck.Host`, it also refuses a stdio app
  the host cannot run (unknown user, command not found); without one it is pure.
  Apps from the host's own configuration file are trusted (checked at start).
- :class:`StdioSlots` counts the stdio server processes running per user and per
  app and refuses one more past ``app_service.stdio_limits`` (a 429 for the client).
- :attr:`HostPolicy.rlimits` are the per-process limits every stdio server gets.

What it must not do: decide who may use an app (RBAC does), or look anything up
on the network.
"""

from __future__ import annotations

import ipaddress
import os
import posixpath
import pwd
import re
import resource
from collections.abc import Callable
from urllib.parse import urlsplit

from bastion.appservice.hostcheck import Host, stdio_problem
from bastion.config import DynamicAppsPolicy, StdioLimits, refused_env
from bastion.errors import LimitExceededError
from bastion.resources import App
from bastion.transport.guard import AddressGuard

__all__ = ["HostPolicy", "StdioSlots"]

_DEFAULT_PORTS = {"http": 80, "https": 443}
#: What an environment variable an app resource sets may be called: a name the program reads
#: back as that name (no ``=``, no NUL, no space; ``Popen`` refuses the first two outright).
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
#: Bounds what a refusal quotes from an app resource (a command, a variable name).
_QUOTE = 120


def _q(text: str) -> str:
    shown = text if len(text) <= _QUOTE else text[:_QUOTE] + "..."
    return repr(shown)


def _gateway_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


class StdioSlots:
    """Running stdio servers per user and per app, bounded by ``stdio_limits``."""

    def __init__(self, per_user: int, per_app: int) -> None:
        self.per_user = per_user
        self.per_app = per_app
        self._users: dict[str, int] = {}
        self._apps: dict[str, int] = {}

    def running(self, *, user: str | None = None, app: str | None = None) -> int:
        if user is not None:
            return self._users.get(user, 0)
        return self._apps.get(app or "", 0)

    def take(self, user: str, app: str) -> Callable[[], None]:
        """Count one more server for ``user`` and ``app``; returns its (idempotent) release.

        Raises ``LimitExceededError`` (429, the client's) naming the cap and how to free a slot.
        """
        if self._users.get(user, 0) >= self.per_user:
            raise LimitExceededError(
                f"too many stdio MCP servers running for user {user!r} on this host "
                f"(limit {self.per_user}, app_service.stdio_limits.per_user): end one of your "
                "sessions (HTTP DELETE with its Mcp-Session-Id) or wait for an idle one to expire"
            )
        if self._apps.get(app, 0) >= self.per_app:
            raise LimitExceededError(
                f"too many stdio MCP servers running for app {app!r} on this host "
                f"(limit {self.per_app}, app_service.stdio_limits.per_app): try again when other "
                "sessions of this app have ended"
            )
        self._users[user] = self._users.get(user, 0) + 1
        self._apps[app] = self._apps.get(app, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            for counts, key in ((self._users, user), (self._apps, app)):
                left = counts.get(key, 0) - 1
                if left > 0:
                    counts[key] = left
                else:
                    counts.pop(key, None)

        return release


class HostPolicy:
    """The host's rules for apps; see the module docstring.

    ``trusted(name)`` says whether an app of that name comes from the host's own
    configuration (the registry's static apps): those are the host's decision.
    """

    def __init__(
        self,
        dynamic: DynamicAppsPolicy,
        limits: StdioLimits,
        *,
        trusted: Callable[[str], bool],
        gateway_user: str | None = None,
        host: Host | None = None,
    ) -> None:
        self.dynamic = dynamic
        #: What the host has (users, programs); ``None``: judge the rules alone.
        self.host = host
        self.limits = limits
        self.trusted = trusted
        self.gateway_user = gateway_user if gateway_user is not None else _gateway_user()
        self.guard = AddressGuard.from_entries(dynamic.upstream_networks)
        self.slots = StdioSlots(limits.per_user, limits.per_app)
        self._commands = frozenset(c for c in dynamic.commands if not c.endswith("/"))
        self._launcher_dirs = frozenset(c.rstrip("/") for c in dynamic.commands if c.endswith("/"))
        self._env_names = frozenset(e for e in dynamic.env if not e.endswith("*"))
        self._env_prefixes = tuple(e[:-1] for e in dynamic.env if e.endswith("*"))
        self.rlimits: tuple[tuple[int, int], ...] = tuple(
            (res, value)
            for res, value in (
                (resource.RLIMIT_DATA, limits.memory),
                (resource.RLIMIT_AS, limits.address_space),
                (resource.RLIMIT_NOFILE, limits.open_files),
                (resource.RLIMIT_CPU, int(limits.cpu_time.total_seconds())),
                (resource.RLIMIT_NPROC, limits.processes),
            )
            if value > 0
        )

    @classmethod
    def defaults(cls, trusted: Callable[[str], bool]) -> HostPolicy:
        """The policy of a host whose configuration says nothing: no dynamic stdio or HTTP."""
        return cls(DynamicAppsPolicy(), StdioLimits(), trusted=trusted)

    def guard_for(self, app: App) -> AddressGuard | None:
        """The address guard to dial ``app``'s upstream with; ``None`` for a trusted app."""
        return None if self.trusted(app.metadata.name) else self.guard

    # ------------------------------------------------------------ dynamic apps

    def refusal(self, app: App) -> str | None:
        """Why this host will not serve ``app`` as a dynamic app, or ``None``; pure."""
        spec = app.spec
        if spec.transport == "stdio":
            return self._stdio_refusal(app)
        return self._address_refusal(spec.uri)

    def _stdio_refusal(self, app: App) -> str | None:
        cmd = app.spec.mcp
        if cmd is None:
            return "a stdio app needs mcp.command"
        if not self._commands and not self._launcher_dirs:
            return (
                "this host runs no stdio servers for apps created through the API "
                "(app_service.dynamic_apps.commands is empty)"
            )
        command = cmd.command
        if not command.startswith("/") or posixpath.normpath(command) != command:
            return f"mcp.command {_q(command)} must be an absolute path without '.' or '..'"
        if command not in self._commands and posixpath.dirname(command) not in self._launcher_dirs:
            return f"mcp.command {_q(command)} is not in app_service.dynamic_apps.commands"
        user = cmd.run_as_host_user or self.gateway_user
        if user not in self.dynamic.run_as:
            return f"host user {_q(user)} is not in app_service.dynamic_apps.run_as" + (
                "" if cmd.run_as_host_user else " (mcp.run_as_host_user is empty: the gateway's own user)"
            )
        if any("\0" in a for a in cmd.args) or any("\0" in v for v in cmd.env.values()):
            return "mcp.args and mcp.env values may not hold a NUL character"
        for name in cmd.env:
            if refused_env(name):
                return (
                    f"mcp.env {_q(name)} may never be set by an app resource (loader or interpreter variable)"
                )
            if not _ENV_NAME.match(name):
                return f"mcp.env {_q(name)} is not a variable name (letters, digits and '_')"
            by_prefix = bool(self._env_prefixes) and name.startswith(self._env_prefixes)
            if name not in self._env_names and not by_prefix:
                return f"mcp.env {_q(name)} is not in app_service.dynamic_apps.env"
        if self.host is not None:
            problem = stdio_problem(cmd, self.host)
            if problem is not None:
                return f"{problem[0]}: {problem[1]}"
        return None

    def _address_refusal(self, uri: str) -> str | None:
        if not self.dynamic.upstream_networks:
            return (
                "this host connects apps created through the API nowhere "
                "(app_service.dynamic_apps.upstream_networks is empty)"
            )
        url = uri
        for prefix in ("mcp+sse+", "mcp+"):
            if url.startswith(prefix):
                url = url[len(prefix) :]
                break
        parts = urlsplit(url)
        host = parts.hostname or ""
        try:
            port = parts.port or _DEFAULT_PORTS.get(parts.scheme, 0)
        except ValueError:
            return "the app's URI has an invalid port"
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            if self.guard.networks or self.guard.host_allowed(host):
                return None  # judged on the addresses it resolves to, when dialled
            return f"upstream host {_q(host)} is not in app_service.dynamic_apps.upstream_networks"
        why = self.guard.refusal(ip, port, by_name=False)
        return None if why is None else f"upstream {host} port {port}: {why}"
