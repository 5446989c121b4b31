"""MCP client configuration files: where each client keeps them, and updating them safely.

``bastion mcp config`` either prints a JSON snippet to paste or writes entries
straight into an MCP client's own configuration file.  This module is the
part that knows the clients and touches their files; the command in
``bastion.cli.mcp_config`` only selects apps and prints.

Each entry is named ``bastion-<app>`` and launches ``<this bastion> mcp
connect <app>``, so the client talks stdio to our local bridge and the bridge
carries the user's identity to the proxy.

Updating a file is conservative, because it belongs to another program and
usually holds the user's other servers and settings:

* every other key and entry is kept, in its order; keys a user added to one
  of our entries (``disabled``, ``autoApprove``, ...) are kept too;
* anything we cannot parse losslessly (invalid JSON, comments, duplicate
  keys, a top level that is not an object) is refused and left untouched;
* nothing is written when nothing changes, so a second run is a no-op;
* otherwise the old file is copied to ``<file>.bak`` and the new one replaces
  it atomically (temporary file in the same directory, fsync, rename), with
  the old file's mode (0644 for a new file).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from typing import Any, Literal

from bastion.errors import ValidationError

ENTRY_PREFIX = "bastion-"
JSON_FORMATS = ("pretty", "compact", "auto")
JsonFormat = Literal["pretty", "compact", "auto"]
NEW_FILE_MODE = 0o644
# Editor and agent processes (Claude Code above all) rewrite their files while
# running; we re-read before the rename and start over if the file moved.
_ATTEMPTS = 3


@dataclass(frozen=True)
class Client:
    """One MCP client: its name, where its user-level file lives, and its entry format.

    ``paths`` maps an OS (``linux``, ``darwin``, ``win32``) to a base directory
    name (see :func:`_bases`) followed by the path parts under it.
    """

    key: str
    display: str
    servers_key: str = "mcpServers"
    # VS Code and Claude Code write ``"type": "stdio"`` themselves; others infer it.
    typed: bool = False
    # Claude Code's own ``claude mcp add`` always writes ``"env": {}``; match it.
    always_env: bool = False
    paths: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def _everywhere(*parts: str) -> dict[str, tuple[str, ...]]:
    return {"linux": parts, "darwin": parts, "win32": parts}


def _electron(app_dir: str, *parts: str) -> dict[str, tuple[str, ...]]:
    """Electron apps keep user data under ``app.getPath("userData")``, which differs per OS."""
    return {
        "linux": ("xdg_config", app_dir, *parts),
        "darwin": ("home", "Library", "Application Support", app_dir, *parts),
        "win32": ("appdata", app_dir, *parts),
    }


CLIENTS: dict[str, Client] = {
    c.key: c
    for c in (
        Client("claude", "Claude Desktop", paths=_electron("Claude", "claude_desktop_config.json")),
        Client("cursor", "Cursor", paths=_everywhere("home", ".cursor", "mcp.json")),
        Client(
            "vscode",
            "VS Code",
            servers_key="servers",
            typed=True,
            paths=_electron("Code", "User", "mcp.json"),
        ),
        Client(
            "vscode-insiders",
            "VS Code Insiders",
            servers_key="servers",
            typed=True,
            paths=_electron("Code - Insiders", "User", "mcp.json"),
        ),
        Client(
            "claude-code",
            "Claude Code",
            typed=True,
            always_env=True,
            paths=_everywhere("claude_config_dir", ".claude.json"),
        ),
        Client("windsurf", "Windsurf", paths=_everywhere("home", ".codeium", "windsurf", "mcp_config.json")),
        Client("gemini", "Gemini CLI", paths=_everywhere("home", ".gemini", "settings.json")),
        Client("kiro", "Kiro", paths=_everywhere("home", ".kiro", "settings", "mcp.json")),
        Client("lmstudio", "LM Studio", paths=_everywhere("home", ".lmstudio", "mcp.json")),
    )
}
ALIASES = {"claude-desktop": "claude", "code": "vscode", "vs-code": "vscode", "lm-studio": "lmstudio"}

# A file named by path: the format is inferred from the path (see infer_client).
GENERIC = Client("file", "MCP client")
_VSCODE_DIRS = frozenset({"Code", "Code - Insiders", "Code - OSS", "VSCodium"})


@dataclass(frozen=True)
class Target:
    """The file to update and the client whose format it is in."""

    client: Client
    path: Path


@dataclass
class UpdateResult:
    """What :func:`update_config` did to one file."""

    path: Path
    client: Client
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    backup: Path | None = None
    created: bool = False

    @property
    def changed(self) -> bool:
        """Whether the file was written (a new file, new or changed entries, or a format asked for)."""
        return self.created or self.backup is not None


# ---------------------------------------------------------------- where the files are


def current_os(platform: str | None = None) -> str:
    """``darwin``, ``win32`` or ``linux`` (every other Unix uses the Linux locations)."""
    p = platform or sys.platform
    return p if p in ("darwin", "win32") else "linux"


def _bases(os_name: str, env: Mapping[str, str]) -> dict[str, PurePath]:
    """The base directories the client table refers to, from the environment like the clients do."""
    flavour: type[PurePath] = PureWindowsPath if os_name == "win32" else PurePosixPath
    if os_name == "win32":
        home = flavour(env.get("USERPROFILE") or str(Path.home()))
        appdata = flavour(env["APPDATA"]) if env.get("APPDATA") else home / "AppData" / "Roaming"
    else:
        home = flavour(env.get("HOME") or str(Path.home()))
        appdata = home
    # Electron honours XDG_CONFIG_HOME when it is absolute (the XDG spec says to ignore relative ones).
    xdg = env.get("XDG_CONFIG_HOME", "")
    xdg_config = flavour(xdg) if xdg and flavour(xdg).is_absolute() else home / ".config"
    # Claude Code moves its whole config (``.claude.json`` included) under CLAUDE_CONFIG_DIR when set.
    claude_dir = env.get("CLAUDE_CONFIG_DIR", "")
    return {
        "home": home,
        "appdata": appdata,
        "xdg_config": xdg_config,
        "claude_config_dir": flavour(claude_dir) if claude_dir else home,
    }


def default_path(
    client: Client, *, platform: str | None = None, env: Mapping[str, str] | None = None
) -> PurePath:
    """The user-level configuration file of ``client`` on ``platform`` (default: this machine)."""
    os_name = current_os(platform)
    base, *parts = client.paths[os_name]
    return _bases(os_name, os.environ if env is None else env)[base].joinpath(*parts)


def client_names() -> list[str]:
    return list(CLIENTS)


def _looks_like_path(value: str) -> bool:
    return (
        "/" in value
        or "\\" in value
        or value.startswith(("~", "."))
        or value.lower().endswith((".json", ".jsonc"))
    )


def infer_client(path: Path, *, env: Mapping[str, str] | None = None) -> Client:
    """The format of a file named by path: a known client's file, else guessed from its name."""
    here = os.path.normcase(os.path.abspath(path))
    for client in CLIENTS.values():
        if os.path.normcase(os.path.abspath(default_path(client, env=env))) == here:
            return client
    parts = path.parts
    # A workspace's .vscode/mcp.json (also .vscode-server remotes), or a profile's User/mcp.json.
    if any(p.startswith(".vscode") for p in parts[:-1]) or (
        path.name == "mcp.json" and any(p in _VSCODE_DIRS for p in parts[:-1])
    ):
        return CLIENTS["vscode"]
    # Claude Code's user file, and its project file .mcp.json.
    if path.name in (".claude.json", ".mcp.json"):
        return CLIENTS["claude-code"]
    if ".cursor" in parts[:-1]:
        return CLIENTS["cursor"]
    if ".codeium" in parts[:-1]:
        return CLIENTS["windsurf"]
    return GENERIC


def resolve_target(value: str, *, env: Mapping[str, str] | None = None) -> Target:
    """``--client-config``: a client name (its default file) or a file path (format inferred).

    A bare word that is no client is refused rather than taken as a file in
    the working directory, so a typo (``claud``) does not create a stray file.
    """
    key = ALIASES.get(value.strip().lower(), value.strip().lower())
    if key in CLIENTS:
        client = CLIENTS[key]
        return Target(client, Path(default_path(client, env=env)))
    if not value.strip() or not _looks_like_path(value):
        raise ValidationError(
            f'unknown MCP client "{value}": use one of {", ".join(CLIENTS)}, or a file path '
            f"(such as ./{value or 'mcp'}.json)"
        )
    path = Path(os.path.abspath(Path(value).expanduser()))
    return Target(infer_client(path, env=env), path)


# ---------------------------------------------------------------- the entries


def bastion_command(
    *,
    argv0: str | None = None,
    executable: str | None = None,
    which: Callable[[str], str | None] = shutil.which,
) -> str:
    """The absolute path of the ``bastion`` the client should launch: the one running now.

    ``sys.argv[0]`` when we were started as ``bastion``; under ``python -m``
    the script next to this interpreter (same install as the running code),
    then ``bastion`` on PATH, then that script's path even if it is missing.
    The path is made absolute but symlinks are kept, so an upgrade that moves
    the link's target does not break the client's entry.
    """
    argv0 = sys.argv[0] if argv0 is None else argv0
    executable = sys.executable if executable is None else executable
    names = ("bastion", "bastion.exe")
    if argv0 and os.path.basename(argv0).lower() in names and os.path.isfile(argv0):
        return os.path.abspath(argv0)
    bin_dir = os.path.dirname(os.path.abspath(executable)) if executable else os.getcwd()
    for name in names:
        candidate = os.path.join(bin_dir, name)
        if os.path.isfile(candidate):
            return candidate
    on_path = which("bastion")
    if on_path:
        return os.path.abspath(on_path)
    return os.path.join(bin_dir, names[1] if sys.platform == "win32" else names[0])


def bastion_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment the entry must carry: ``BASTION_HOME`` when set (made absolute, since the
    client starts us from its own working directory)."""
    env = os.environ if env is None else env
    home = env.get("BASTION_HOME")
    return {"BASTION_HOME": os.path.abspath(os.path.expanduser(home))} if home else {}


def parse_header(text: str) -> str:
    """Validate one ``-H "Name: value"`` exactly as ``bastion mcp connect`` will (one rule, in
    ``client.app_endpoint``): an entry whose header the bridge refuses would fail every time the
    client starts it.  Returns ``Name: value``."""
    from bastion.client.app_endpoint import parse_header as bridge_parse_header

    try:
        name, value = bridge_parse_header(text)
    except ValueError as e:
        raise ValidationError(str(e)) from None
    return f"{name}: {value}"


def entry_name(app: str) -> str:
    return ENTRY_PREFIX + app


def build_entry(
    app: str,
    *,
    client: Client = GENERIC,
    command: str,
    headers: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The entry launching ``<command> mcp connect <app>`` in ``client``'s format."""
    entry: dict[str, Any] = {"type": "stdio"} if client.typed else {}
    entry["command"] = command
    args = ["mcp", "connect", app]
    for h in headers:
        args += ["-H", parse_header(h)]
    entry["args"] = args
    if env or client.always_env:
        entry["env"] = dict(env or {})
    return entry


def build_entries(
    apps: Iterable[str],
    *,
    client: Client = GENERIC,
    command: str,
    headers: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    return {
        entry_name(a): build_entry(a, client=client, command=command, headers=headers, env=env) for a in apps
    }


# ---------------------------------------------------------------- JSON text


@dataclass(frozen=True)
class _Style:
    indent: str | None  # None = compact
    newline: str = "\n"
    final_newline: bool = True


def dumps(data: Any, style: _Style | None = None) -> str:
    """JSON text as editors write it: UTF-8 kept, ``JSON.stringify(x, null, indent)`` layout."""
    style = style or _Style("  ")
    if style.indent is None:
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    else:
        text = json.dumps(data, ensure_ascii=False, indent=style.indent)
        if style.newline != "\n":
            text = text.replace("\n", style.newline)
    return text + (style.newline if style.final_newline else "")


def snippet(entries: Mapping[str, Any], *, json_format: str = "pretty") -> str:
    """The ``{"mcpServers": {...}}`` text to paste into a client's file."""
    style = _Style(None) if json_format == "compact" else _Style("  ")
    return dumps({"mcpServers": dict(entries)}, style)


def client_snippet(client: Client, entries: Mapping[str, Any]) -> str:
    """The text to paste into ``client``'s own file: its servers key (``servers`` for VS Code)."""
    return dumps({client.servers_key: dict(entries)})


def _detect_style(text: str) -> _Style:
    """Keep a file's layout: single-line stays compact, else its own indent unit and line ends."""
    newline = "\r\n" if "\r\n" in text else "\n"
    final = text.endswith(("\n", "\r"))
    body = text.strip()
    if "\n" not in body:
        return _Style(None, newline, final)
    # The first indented line is at depth one, so its leading whitespace is one indent unit.
    for line in body.splitlines()[1:]:
        m = re.match(r"[ \t]+", line)
        if m:
            return _Style(m.group(0), newline, final)
    return _Style("  ", newline, final)


def _style_for(json_format: str, old_text: str | None) -> _Style:
    existing = _detect_style(old_text) if old_text and old_text.strip() else None
    newline = existing.newline if existing else "\n"
    final = existing.final_newline if existing else True
    if json_format == "pretty":
        return _Style("  ", newline, final)
    if json_format == "compact":
        return _Style(None, newline, final)
    return existing or _Style("  ")


def _type_name(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


def _has_jsonc(text: str) -> bool:
    """Whether ``text`` has ``//`` or ``/* */`` comments or trailing commas outside strings."""
    in_str = escaped = False
    last_sig = ""  # last significant character outside strings and whitespace
    for i, ch in enumerate(text):
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
            continue
        comment = ch == "/" and text[i + 1 : i + 2] in ("/", "*")
        trailing_comma = ch in "}]" and last_sig == ","
        if comment or trailing_comma:
            return True
        if ch == '"':
            in_str = True
        if not ch.isspace():
            last_sig = ch
    return False


class _DuplicateKeyError(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKeyError(k)
        out[k] = v
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_config(text: str, *, path: Path | str, servers_key: str) -> dict[str, Any]:
    """Parse a client's file; refuse (``ValidationError``) anything we could not write back intact."""
    untouched = "the file was left untouched"
    if not text.strip():
        return {}
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except _DuplicateKeyError as e:
        raise ValidationError(
            f'{path}: the key "{e.args[0]}" appears twice in one object, and rewriting the file would '
            f"drop one of them; remove the duplicate and run again ({untouched})"
        ) from None
    except json.JSONDecodeError as e:
        if _has_jsonc(text):
            raise ValidationError(
                f"{path}: has comments or trailing commas (JSON with comments), which bastion will not "
                "rewrite because they would be lost; remove them, or paste the entries by hand (run "
                f"without --client-config to print them) ({untouched})"
            ) from None
        raise ValidationError(
            f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); fix it or move it "
            f"aside and run again ({untouched})"
        ) from None
    except ValueError as e:
        raise ValidationError(f"{path}: not valid JSON ({e}) ({untouched})") from None
    if not isinstance(data, dict):
        raise ValidationError(f"{path}: the top level is {_type_name(data)}, not a JSON object ({untouched})")
    servers = data.get(servers_key)
    if servers_key in data and not isinstance(servers, dict):
        raise ValidationError(
            f'{path}: "{servers_key}" is {_type_name(servers)}, not a JSON object ({untouched})'
        )
    return data


# ---------------------------------------------------------------- merging and writing

# The keys of an entry that ``bastion mcp config`` owns; any other key in it is the user's.
_OWNED_KEYS = ("type", "command", "args", "env")


def merge_entries(
    data: dict[str, Any], servers_key: str, entries: Mapping[str, dict[str, Any]], result: UpdateResult
) -> dict[str, Any]:
    """A copy of ``data`` with ``entries`` set under ``servers_key``; order and other keys kept."""
    merged = dict(data)
    servers: dict[str, Any] = dict(merged.get(servers_key) or {})
    for name, entry in entries.items():
        existed = name in servers
        old = servers.get(name)
        if not isinstance(old, dict):
            servers[name] = entry
            (result.updated if existed else result.added).append(name)
            continue
        # Set what we own, drop what we own but no longer want (say env once BASTION_HOME is
        # unset), keep keys the user added; an entry already equal keeps its own key order.
        new = {k: v for k, v in old.items() if k not in _OWNED_KEYS or k in entry}
        new.update(entry)
        if new == old:
            result.unchanged.append(name)
        else:
            servers[name] = new
            result.updated.append(name)
    merged[servers_key] = servers
    return merged


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise ValidationError(f"{path}: is a directory, not a configuration file") from None
    except OSError as e:
        raise ValidationError(f"{path}: cannot read it ({e.strerror})") from None


def _decode(raw: bytes, path: Path) -> tuple[str, bool]:
    """Text and whether it had a UTF-8 byte order mark (Windows editors add one; we keep it)."""
    bom = raw.startswith(b"\xef\xbb\xbf")
    try:
        return raw.decode("utf-8-sig"), bom
    except UnicodeDecodeError as e:
        raise ValidationError(
            f"{path}: not UTF-8 text (byte {e.start}); the file was left untouched"
        ) from None


def _write_atomic(path: Path, data: bytes, *, mode: int, owner: tuple[int, int] | None) -> None:
    """Replace ``path`` with ``data``: a temporary file beside it, fsync, rename, fsync the dir."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        if owner is not None and hasattr(os, "fchown"):
            # Run as root on someone's file, keep it theirs; as anyone else this cannot
            # change owner and need not.
            with contextlib.suppress(OSError):
                os.fchown(fd, *owner)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory is synced; Windows has no directory fds.
    if os.name != "posix":
        return
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def update_config(
    target: Target, entries: Mapping[str, dict[str, Any]], *, json_format: str = "auto"
) -> UpdateResult:
    """Merge ``entries`` into the target file; see the module docstring for the guarantees.

    ``json_format``: ``pretty`` (2-space indent), ``compact``, or ``auto``
    (the file's own layout: compact if it is one line, else its indent; pretty
    for a new file).  Raises ``ValidationError`` naming the file and the
    problem, the file untouched, when it cannot be updated safely.
    """
    if json_format not in JSON_FORMATS:
        raise ValidationError(f'unknown JSON format "{json_format}" (use {", ".join(JSON_FORMATS)})')
    path = target.path
    if path.is_symlink():
        # Dotfile managers link these files; write the real file, not over the link.
        path = Path(os.path.realpath(path))
    for _ in range(_ATTEMPTS):
        result = UpdateResult(path=path, client=target.client)
        raw = _read(path)
        old_text, bom = _decode(raw, path) if raw is not None else (None, False)
        data = parse_config(old_text or "", path=path, servers_key=target.client.servers_key)
        merged = merge_entries(data, target.client.servers_key, entries, result)
        style = _style_for(json_format, old_text)
        new_text = dumps(merged, style)
        same_data = raw is not None and dumps(merged, _Style(None)) == dumps(data, _Style(None))
        # Idempotence: the same text, or (under auto) the same content in another layout,
        # means nothing to do — no rewrite, no backup, mtime unchanged.
        if new_text == old_text or (same_data and json_format == "auto"):
            return result
        new_bytes = (b"\xef\xbb\xbf" if bom else b"") + new_text.encode("utf-8")
        st = path.stat() if raw is not None else None
        mode = (st.st_mode & 0o7777) if st is not None else NEW_FILE_MODE
        owner = (st.st_uid, st.st_gid) if st is not None else None
        path.parent.mkdir(parents=True, exist_ok=True)
        if raw is not None:
            backup = path.with_name(path.name + ".bak")
            _write_atomic(backup, raw, mode=mode, owner=owner)
            result.backup = backup
        else:
            result.created = True
        # Start over if the owner program rewrote the file while we worked, rather than
        # replacing its change with ours.
        if _read(path) != raw:
            continue
        _write_atomic(path, new_bytes, mode=mode, owner=owner)
        return result
    raise ValidationError(f"{path}: changed while bastion was updating it; run the command again")
