"""Can this host run a stdio app as written: its host user, its program.

A stdio app names a host user (``mcp.run_as_host_user``) and a program
(``mcp.command``).  Whether they exist is a fact of the host, not of the
configuration, so ``bastion.config`` (which does no I/O) cannot know it; without
this check a mistake was accepted, listed by ``mcp ls`` and failed only when
called.  Here it is caught early:

- :func:`check_static_apps` at start, for the apps of the host's own file: a
  ``ConfigError`` naming the key (``app_service.apps[0].mcp.run_as_host_user``)
  before anything listens;
- :meth:`bastion.appservice.hostpolicy.HostPolicy.refusal`, for dynamic apps, when
  the app service registers them: a refused app, shown by ``bastion get app_servers``.

The rules (decision 6): a gateway running as root needs ``run_as_host_user``
written (``root`` only if meant); the user must exist; a gateway that is not root
can run servers only as itself; the command, looked up on the ``PATH`` the server
gets, must be an executable file.  ``spawn_stdio`` checks again when it starts a
process (the host may change after start); what it finds then is a gateway fault.

What it must not do: judge what the host *allows* dynamic apps to do (that is
``HostPolicy``), or start anything.  It reads only the user database and file
metadata, through a :class:`Host` a test can replace.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from bastion.config import AppService
from bastion.errors import ConfigError
from bastion.resources import MCPCommand

__all__ = ["Host", "Problem", "check_static_apps", "stdio_problem"]

#: Bounds what a message quotes from a configuration value.
_QUOTE = 120


def _q(text: str) -> str:
    return repr(text if len(text) <= _QUOTE else text[:_QUOTE] + "...")


def _uid_of(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def _name_of(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _mode_of(path: str) -> int | None:
    try:
        return os.stat(path).st_mode
    except OSError:
        return None


@dataclass(frozen=True)
class Host:
    """What the checks read from the host.  ``Host.this()`` is the real one."""

    #: The user the gateway runs as.
    euid: int
    #: The gateway's ``PATH`` (what a stdio server gets unless its ``mcp.env`` sets one).
    path: str
    uid_of: Callable[[str], int | None] = _uid_of
    name_of: Callable[[int], str] = _name_of
    #: ``st_mode`` of a path (following links), or ``None`` when it does not exist.
    mode_of: Callable[[str], int | None] = _mode_of

    @classmethod
    def this(cls) -> Host:
        return cls(euid=os.geteuid(), path=os.environ.get("PATH") or os.defpath)


Problem = tuple[str, str]
"""The key at fault (``mcp.command``, ``mcp.run_as_host_user``) and why."""


def stdio_problem(cmd: MCPCommand, host: Host) -> Problem | None:
    """Why ``host`` cannot run ``cmd`` (the key at fault, the reason), or ``None``."""
    return _user_problem(cmd.run_as_host_user, host) or _command_problem(cmd.command, cmd.env, host)


def _user_problem(user: str, host: Host) -> Problem | None:
    key = "mcp.run_as_host_user"
    if not user:
        if host.euid == 0:
            return key, (
                "required when bastion runs as root: name the host user the server runs as "
                "(write root only if you mean it)"
            )
        return None
    uid = host.uid_of(user)
    if uid is None:
        return key, f"{_q(user)} is not a user on this host"
    if host.euid not in (0, uid):
        return key, (
            f"cannot run the server as {_q(user)}: bastion runs as {_q(host.name_of(host.euid))} "
            "and only root can switch users"
        )
    return None


def _command_problem(command: str, env: Mapping[str, str], host: Host) -> Problem | None:
    if not command:
        return "mcp.command", "must not be empty"
    if "/" in command:
        if not command.startswith("/"):
            return None  # relative to the server's working directory: judged when it starts
        return _program_problem(command, host.mode_of(command))
    search = env.get("PATH", host.path)
    found_other: Problem | None = None
    for d in search.split(os.pathsep):
        candidate = os.path.join(d or ".", command)
        mode = host.mode_of(candidate)
        if mode is None:
            continue
        why = _program_problem(candidate, mode)
        if why is None:
            return None
        found_other = found_other or why
    if found_other is not None:
        return found_other
    return "mcp.command", f"{_q(command)} is not found on PATH ({_q(search)})"


def _program_problem(path: str, mode: int | None) -> Problem | None:
    if mode is None:
        return "mcp.command", f"{_q(path)} does not exist"
    if not stat.S_ISREG(mode):
        return "mcp.command", f"{_q(path)} is not a file"
    if not mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH):
        return "mcp.command", f"{_q(path)} is not executable"
    return None


def check_static_apps(apps: AppService, host: Host) -> None:
    """Raise ``ConfigError`` (one ``key: reason`` line per problem) if a stdio app of the file cannot run."""
    problems: list[tuple[str, str]] = []
    for i, app in enumerate(apps.apps):
        cmd = app.to_app().spec.mcp
        if cmd is None:
            continue
        problem = stdio_problem(cmd, host)
        if problem is not None:
            key, reason = problem
            problems.append((f"app_service.apps[{i}].{key}", reason))
    if problems:
        (path, reason), rest = problems[0], problems[1:]
        raise ConfigError(path, "\n".join([reason, *(f"{p}: {r}" for p, r in rest)]))
