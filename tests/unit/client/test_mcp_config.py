"""Client configuration files for ``bastion mcp config``: the client table, entries, and safe updates.

Every update test works on real files in ``tmp_path``, shaped like the ones
the clients themselves write, and checks both what we add and that nothing
of the user's changes.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import pytest

from bastion.client import mcp_config as mc
from bastion.errors import ValidationError

BIN = "/opt/bastion/bin/bastion"


def entries_for(client: mc.Client, *apps: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    return mc.build_entries(apps or ("demo",), client=client, command=BIN, env=env)


def target(path: Path, client: str | None = None) -> mc.Target:
    return mc.Target(mc.CLIENTS[client] if client else mc.infer_client(path), path)


def no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- the client table

LINUX_ENV = {"HOME": "/home/u"}
MAC_ENV = {"HOME": "/Users/u"}
WIN_ENV = {"USERPROFILE": r"C:\Users\u", "APPDATA": r"C:\Users\u\AppData\Roaming"}


@pytest.mark.parametrize(
    ("client", "linux", "darwin", "win32"),
    [
        (
            "claude",
            "/home/u/.config/Claude/claude_desktop_config.json",
            "/Users/u/Library/Application Support/Claude/claude_desktop_config.json",
            r"C:\Users\u\AppData\Roaming\Claude\claude_desktop_config.json",
        ),
        ("cursor", "/home/u/.cursor/mcp.json", "/Users/u/.cursor/mcp.json", r"C:\Users\u\.cursor\mcp.json"),
        (
            "vscode",
            "/home/u/.config/Code/User/mcp.json",
            "/Users/u/Library/Application Support/Code/User/mcp.json",
            r"C:\Users\u\AppData\Roaming\Code\User\mcp.json",
        ),
        ("claude-code", "/home/u/.claude.json", "/Users/u/.claude.json", r"C:\Users\u\.claude.json"),
        (
            "windsurf",
            "/home/u/.codeium/windsurf/mcp_config.json",
            "/Users/u/.codeium/windsurf/mcp_config.json",
            r"C:\Users\u\.codeium\windsurf\mcp_config.json",
        ),
    ],
)
def test_default_paths_per_os(client: str, linux: str, darwin: str, win32: str) -> None:
    c = mc.CLIENTS[client]
    assert mc.default_path(c, platform="linux", env=LINUX_ENV) == PurePosixPath(linux)
    assert mc.default_path(c, platform="freebsd14", env=LINUX_ENV) == PurePosixPath(linux)
    assert mc.default_path(c, platform="darwin", env=MAC_ENV) == PurePosixPath(darwin)
    assert mc.default_path(c, platform="win32", env=WIN_ENV) == PureWindowsPath(win32)


def test_paths_follow_the_environment_like_the_clients_do() -> None:
    claude, vscode, code = mc.CLIENTS["claude"], mc.CLIENTS["vscode"], mc.CLIENTS["claude-code"]
    xdg = {"HOME": "/home/u", "XDG_CONFIG_HOME": "/home/u/cfg"}
    assert (
        str(mc.default_path(claude, platform="linux", env=xdg))
        == "/home/u/cfg/Claude/claude_desktop_config.json"
    )
    assert str(mc.default_path(vscode, platform="linux", env=xdg)) == "/home/u/cfg/Code/User/mcp.json"
    # A relative XDG_CONFIG_HOME is to be ignored (XDG spec).
    rel = {"HOME": "/home/u", "XDG_CONFIG_HOME": "cfg"}
    assert str(mc.default_path(vscode, platform="linux", env=rel)) == "/home/u/.config/Code/User/mcp.json"
    # Claude Code keeps .claude.json in CLAUDE_CONFIG_DIR when that is set.
    cc = {"HOME": "/home/u", "CLAUDE_CONFIG_DIR": "/srv/claude"}
    assert str(mc.default_path(code, platform="linux", env=cc)) == "/srv/claude/.claude.json"
    # No %APPDATA%: the roaming folder under the profile.
    win = {"USERPROFILE": r"C:\Users\u"}
    assert mc.default_path(claude, platform="win32", env=win) == PureWindowsPath(
        r"C:\Users\u\AppData\Roaming\Claude\claude_desktop_config.json"
    )


def test_every_client_has_a_path_on_every_os() -> None:
    for client in mc.CLIENTS.values():
        for platform, env in (("linux", LINUX_ENV), ("darwin", MAC_ENV), ("win32", WIN_ENV)):
            assert mc.default_path(client, platform=platform, env=env).is_absolute()


def test_client_formats() -> None:
    assert mc.CLIENTS["vscode"].servers_key == "servers"
    assert mc.CLIENTS["vscode"].typed
    assert mc.CLIENTS["claude-code"].typed and mc.CLIENTS["claude-code"].always_env
    for key in ("claude", "cursor", "windsurf", "claude-code"):
        assert mc.CLIENTS[key].servers_key == "mcpServers"


def test_resolve_target_names_and_aliases(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    t = mc.resolve_target("claude", env=env)
    assert t.client.key == "claude"
    assert t.path == tmp_path / ".config/Claude/claude_desktop_config.json"
    assert mc.resolve_target("Claude-Desktop", env=env).client.key == "claude"
    assert mc.resolve_target("claude-code", env=env).path == tmp_path / ".claude.json"


@pytest.mark.parametrize(
    ("path", "servers_key", "client"),
    [
        ("proj/.vscode/mcp.json", "servers", "vscode"),
        ("home/.config/Code/User/mcp.json", "servers", "vscode"),
        ("home/.config/VSCodium/User/mcp.json", "servers", "vscode"),
        ("home/.vscode-server/data/User/mcp.json", "servers", "vscode"),
        ("proj/.cursor/mcp.json", "mcpServers", "cursor"),
        ("proj/.mcp.json", "mcpServers", "claude-code"),
        ("somewhere/mcp.json", "mcpServers", "file"),
        ("somewhere/servers.json", "mcpServers", "file"),
    ],
)
def test_resolve_target_infers_a_path_format(
    tmp_path: Path, path: str, servers_key: str, client: str
) -> None:
    t = mc.resolve_target(str(tmp_path / path), env={"HOME": "/nonexistent"})
    assert t.path == tmp_path / path
    assert t.client.servers_key == servers_key
    assert t.client.key == client


def test_resolve_target_knows_a_clients_own_file_by_path(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    t = mc.resolve_target(str(tmp_path / ".codeium/windsurf/mcp_config.json"), env=env)
    assert t.client.key == "windsurf"
    t = mc.resolve_target(str(tmp_path / ".config/Claude/claude_desktop_config.json"), env=env)
    assert t.client.key == "claude"


def test_resolve_target_relative_and_home_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert mc.resolve_target("servers.json").path == tmp_path / "servers.json"
    assert mc.resolve_target("./x").path == tmp_path / "x"
    assert mc.resolve_target("~/m.json").path == tmp_path / "h" / "m.json"


def test_resolve_target_refuses_an_unknown_client_word() -> None:
    with pytest.raises(ValidationError, match=r'unknown MCP client "claud".*claude, cursor.*file path'):
        mc.resolve_target("claud")


# ---------------------------------------------------------------- entries


def test_entry_plain_typed_and_claude_code() -> None:
    plain = mc.build_entry("demo", client=mc.CLIENTS["claude"], command=BIN)
    assert plain == {"command": BIN, "args": ["mcp", "connect", "demo"]}
    assert list(plain) == ["command", "args"]
    typed = mc.build_entry("demo", client=mc.CLIENTS["vscode"], command=BIN)
    assert typed == {"type": "stdio", "command": BIN, "args": ["mcp", "connect", "demo"]}
    assert list(typed) == ["type", "command", "args"]
    code = mc.build_entry("demo", client=mc.CLIENTS["claude-code"], command=BIN)
    assert code == {"type": "stdio", "command": BIN, "args": ["mcp", "connect", "demo"], "env": {}}


def test_entry_headers_and_env() -> None:
    e = mc.build_entry(
        "demo",
        command=BIN,
        headers=["X-Team:  blue ", "X-Api-Key: k:y"],
        env={"BASTION_HOME": "/h"},
    )
    assert e["args"] == ["mcp", "connect", "demo", "-H", "X-Team: blue", "-H", "X-Api-Key: k:y"]
    assert e["env"] == {"BASTION_HOME": "/h"}


@pytest.mark.parametrize("bad", ["nocolon", ": value", "Bad Name: v", "X: a\nb", "X: caf\u00e9"])
def test_malformed_header(bad: str) -> None:
    with pytest.raises(ValidationError, match="malformed header"):
        mc.parse_header(bad)


@pytest.mark.parametrize("reserved", ["Authorization: Bearer x", "mcp-session-id: 1", "Host: h"])
def test_headers_the_bridge_sets_itself_are_refused(reserved: str) -> None:
    with pytest.raises(ValidationError, match="set by `bastion mcp connect` itself"):
        mc.parse_header(reserved)


def test_bastion_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert mc.bastion_env({}) == {}
    assert mc.bastion_env({"BASTION_HOME": "/srv/b"}) == {"BASTION_HOME": "/srv/b"}
    monkeypatch.chdir(tmp_path)
    # Made absolute: the client starts us from its own working directory.
    assert mc.bastion_env({"BASTION_HOME": "rel"}) == {"BASTION_HOME": str(tmp_path / "rel")}


def test_bastion_command(tmp_path: Path) -> None:
    bindir = tmp_path / "venv" / "bin"
    bindir.mkdir(parents=True)
    (bindir / "python").touch()
    script = bindir / "bastion"
    script.touch()
    elsewhere = tmp_path / "other" / "bastion"
    elsewhere.parent.mkdir()
    elsewhere.touch()

    def nowhere(_: str) -> str | None:
        return None

    # Started as `bastion`: that very file.
    assert mc.bastion_command(argv0=str(elsewhere), executable=str(bindir / "python")) == str(elsewhere)
    # Under `python -m bastion.cli.main`: the script beside the interpreter.
    assert mc.bastion_command(argv0="/x/bastion/cli/main.py", executable=str(bindir / "python")) == str(
        script
    )
    # No script beside the interpreter: the one on PATH, else the expected script path.
    script.unlink()
    got = mc.bastion_command(argv0="-m", executable=str(bindir / "python"), which=lambda _: str(elsewhere))
    assert got == str(elsewhere)
    assert mc.bastion_command(argv0="-m", executable=str(bindir / "python"), which=nowhere) == str(script)


def test_snippet() -> None:
    entries = entries_for(mc.GENERIC, "a", "b")
    data = json.loads(mc.snippet(entries))
    assert list(data) == ["mcpServers"]
    assert list(data["mcpServers"]) == ["bastion-a", "bastion-b"]
    compact = mc.snippet(entries, json_format="compact")
    assert compact.count("\n") == 1 and ": " not in compact


# ---------------------------------------------------------------- updating files

CLAUDE_DESKTOP = """\
{
  "globalShortcut": "Ctrl+Space",
  "mcpServers": {
    "filesystem": {
      "command": "npx",
      "args": ["-y", "@modelcontextprotocol/server-filesystem", "/home/u/Desktop"],
      "env": {"DEBUG": "1"}
    },
    "zeta": {"command": "z", "args": []},
    "alpha": {"command": "a"}
  },
  "preferences": {"z": 1.5, "a": [1, 2, {"deep": null}], "name": "caf\\u00e9 ☕"}
}
"""

VSCODE = """\
{
    "inputs": [{"type": "promptString", "id": "token", "password": true}],
    "servers": {
        "github": {"type": "http", "url": "https://api.githubcopilot.com/mcp/"}
    }
}
"""

CLAUDE_CODE = """\
{
  "numStartups": 42,
  "projects": {"/home/u/p": {"allowedTools": [], "mcpServers": {}}},
  "mcpServers": {
    "sentry": {"type": "http", "url": "https://mcp.sentry.dev/mcp"}
  },
  "userID": "abc"
}
"""

CURSOR = '{"mcpServers":{"linear":{"url":"https://mcp.linear.app/sse"}},"z":true}'


@pytest.mark.parametrize(
    ("client", "relpath", "original", "theirs"),
    [
        (
            "claude",
            ".config/Claude/claude_desktop_config.json",
            CLAUDE_DESKTOP,
            ["filesystem", "zeta", "alpha"],
        ),
        ("vscode", ".config/Code/User/mcp.json", VSCODE, ["github"]),
        ("claude-code", ".claude.json", CLAUDE_CODE, ["sentry"]),
        ("cursor", ".cursor/mcp.json", CURSOR, ["linear"]),
        ("windsurf", ".codeium/windsurf/mcp_config.json", CLAUDE_DESKTOP, ["filesystem", "zeta", "alpha"]),
    ],
)
def test_update_keeps_everything_else_and_is_idempotent(
    tmp_path: Path, client: str, relpath: str, original: str, theirs: list[str]
) -> None:
    path = tmp_path / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(original)
    os.chmod(path, 0o600)
    t = mc.resolve_target(client, env={"HOME": str(tmp_path)})
    assert t.path == path
    c = t.client
    entries = entries_for(c, "demo", "db", env={"BASTION_HOME": "/srv/bastion"})

    res = mc.update_config(t, entries)
    assert res.changed and res.added == ["bastion-demo", "bastion-db"] and not res.updated
    assert res.backup == path.with_name(path.name + ".bak")
    assert res.backup.read_text() == original
    assert stat.S_IMODE(res.backup.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert no_temp_files(path.parent)

    before, after = json.loads(original), json.loads(path.read_text())
    # Theirs: same top-level keys in the same order (ours only added), same values, same entry order.
    key = c.servers_key
    assert list(after) == list(before)
    for k in before:
        if k != key:
            assert after[k] == before[k]
    assert list(after[key]) == [*theirs, "bastion-demo", "bastion-db"]
    for name in theirs:
        assert after[key][name] == before[key][name]
        assert json.dumps(after[key][name]) == json.dumps(before[key][name])  # key order too
    ours = after[key]["bastion-demo"]
    assert ours["command"] == BIN and ours["args"] == ["mcp", "connect", "demo"]
    assert ours["env"] == {"BASTION_HOME": "/srv/bastion"}
    assert ("type" in ours) == (client in ("vscode", "claude-code"))

    # Second run: nothing to do, nothing written, not even a backup.
    res.backup.unlink()
    text, mtime = path.read_bytes(), path.stat().st_mtime_ns
    again = mc.update_config(t, entries)
    assert not again.changed and again.unchanged == ["bastion-demo", "bastion-db"]
    assert not again.added and not again.updated and again.backup is None
    assert path.read_bytes() == text and path.stat().st_mtime_ns == mtime
    assert not res.backup.exists()


def test_new_file_and_directory(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "mcp.json"
    res = mc.update_config(target(path, "cursor"), entries_for(mc.CLIENTS["cursor"]))
    assert res.created and res.backup is None and res.added == ["bastion-demo"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    text = path.read_text()
    assert text == json.dumps(json.loads(text), indent=2) + "\n"  # pretty, like JSON.stringify(x, null, 2)
    assert json.loads(text) == {
        "mcpServers": {"bastion-demo": {"command": BIN, "args": ["mcp", "connect", "demo"]}}
    }
    mtime = path.stat().st_mtime_ns
    assert not mc.update_config(target(path, "cursor"), entries_for(mc.CLIENTS["cursor"])).changed
    assert path.stat().st_mtime_ns == mtime
    assert not path.with_name("mcp.json.bak").exists()


@pytest.mark.parametrize("content", ["", "   \n", "\ufeff"])
def test_empty_file_starts_from_an_empty_object(tmp_path: Path, content: str) -> None:
    path = tmp_path / "mcp.json"
    path.write_text(content)
    res = mc.update_config(target(path, "cursor"), entries_for(mc.CLIENTS["cursor"]))
    assert res.added == ["bastion-demo"]
    assert list(json.loads(path.read_text().lstrip("\ufeff"))["mcpServers"]) == ["bastion-demo"]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"mcpServers": {"a": {"command": \'x\'}}}', "not valid JSON"),
        ('{"mcpServers": {', r"not valid JSON \(line 1, column"),
        ("not json at all", "not valid JSON"),
        ('{"a": NaN}', "not valid JSON"),
        ("[1, 2]", "the top level is an array, not a JSON object"),
        ('"text"', "the top level is a string"),
        ('{"mcpServers": []}', '"mcpServers" is an array, not a JSON object'),
        ('{"mcpServers": null}', '"mcpServers" is null, not a JSON object'),
        ('{"mcpServers": {}, "mcpServers": {}}', 'the key "mcpServers" appears twice'),
        ('{"mcpServers": {"a": {"command": "x", "command": "y"}}}', 'the key "command" appears twice'),
    ],
)
def test_refused_files_are_left_untouched(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "claude_desktop_config.json"
    path.write_text(content)
    os.chmod(path, 0o640)
    mtime = path.stat().st_mtime_ns
    with pytest.raises(ValidationError, match=problem) as e:
        mc.update_config(target(path, "claude"), entries_for(mc.CLIENTS["claude"]))
    assert str(path) in e.value.message and "untouched" in e.value.message
    assert path.read_text() == content and path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no backup, no temp file


@pytest.mark.parametrize(
    "content",
    [
        '{\n  // my servers\n  "servers": {}\n}\n',
        '{\n  /* block */ "servers": {}\n}\n',
        '{\n  "servers": {\n    "a": {"type": "stdio", "command": "x"},\n  },\n}\n',
        '{"servers": {"a": {"args": ["x", ]}}}',
    ],
)
def test_jsonc_is_refused_rather_than_losing_comments(tmp_path: Path, content: str) -> None:
    path = tmp_path / ".vscode" / "mcp.json"
    path.parent.mkdir()
    path.write_text(content)
    with pytest.raises(ValidationError, match="comments or trailing commas") as e:
        mc.update_config(target(path), entries_for(mc.CLIENTS["vscode"]))
    assert str(path) in e.value.message and "--client-config" in e.value.message
    assert path.read_text() == content
    assert sorted(p.name for p in path.parent.iterdir()) == ["mcp.json"]


def test_slashes_inside_strings_are_not_comments(tmp_path: Path) -> None:
    path = tmp_path / "mcp.json"
    original = '{"mcpServers": {"web": {"url": "https://x/*y*/", "note": "a // b, }"}}}'
    path.write_text(original)
    res = mc.update_config(target(path, "cursor"), entries_for(mc.CLIENTS["cursor"]))
    assert res.added == ["bastion-demo"]
    assert json.loads(path.read_text())["mcpServers"]["web"] == json.loads(original)["mcpServers"]["web"]


def test_auto_format_keeps_the_files_layout(tmp_path: Path) -> None:
    c = mc.CLIENTS["cursor"]
    compact = tmp_path / "compact.json"
    compact.write_text(CURSOR)  # one line, no final newline
    mc.update_config(target(compact, "cursor"), entries_for(c))
    text = compact.read_text()
    assert "\n" not in text and ": " not in text and json.loads(text)["z"] is True

    four = tmp_path / "four.json"
    four.write_text(json.dumps({"mcpServers": {"x": {"command": "x"}}}, indent=4) + "\n")
    mc.update_config(target(four, "cursor"), entries_for(c))
    data = json.loads(four.read_text())
    assert four.read_text() == json.dumps(data, indent=4) + "\n"

    tabs = tmp_path / "tabs.json"
    tabs.write_text('{\r\n\t"mcpServers": {}\r\n}')
    mc.update_config(target(tabs, "cursor"), entries_for(c))
    raw = tabs.read_bytes().decode()
    # Tabs, CRLF line ends and no final newline, as the file had them.
    assert raw == json.dumps(json.loads(raw), indent="\t").replace("\n", "\r\n")
    assert "bastion-demo" in json.loads(raw)["mcpServers"]


def test_explicit_formats(tmp_path: Path) -> None:
    c = mc.CLIENTS["cursor"]
    path = tmp_path / "mcp.json"
    path.write_text(CURSOR)
    mc.update_config(target(path, "cursor"), entries_for(c), json_format="pretty")
    assert path.read_text().startswith('{\n  "mcpServers": {\n    "linear": {')
    # Already has our entry: "pretty" again changes nothing.
    mtime = path.stat().st_mtime_ns
    assert not mc.update_config(target(path, "cursor"), entries_for(c), json_format="pretty").changed
    assert path.stat().st_mtime_ns == mtime
    # Asking for compact rewrites the layout even though no entry changed.
    res = mc.update_config(target(path, "cursor"), entries_for(c), json_format="compact")
    assert res.changed and res.unchanged == ["bastion-demo"] and res.backup is not None
    assert "\n" not in path.read_text()
    # And auto leaves a file with the same content alone whatever its layout.
    mtime = path.stat().st_mtime_ns
    assert not mc.update_config(target(path, "cursor"), entries_for(c), json_format="auto").changed
    assert path.stat().st_mtime_ns == mtime
    with pytest.raises(ValidationError, match="unknown JSON format"):
        mc.update_config(target(path, "cursor"), entries_for(c), json_format="yaml")


def test_same_content_in_another_layout_is_not_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "mcp.json"
    entry = mc.build_entry("demo", client=mc.CLIENTS["cursor"], command=BIN)
    original = '{ "mcpServers" : { "bastion-demo" : ' + json.dumps(entry) + " } }\n\n"
    path.write_text(original)
    res = mc.update_config(target(path, "cursor"), entries_for(mc.CLIENTS["cursor"]))
    assert not res.changed and res.unchanged == ["bastion-demo"]
    assert path.read_text() == original


def test_existing_entry_is_updated_in_place_keeping_the_users_keys(tmp_path: Path) -> None:
    path = tmp_path / ".claude.json"
    path.write_text(
        json.dumps(
            {
                "mcpServers": {
                    "a": {"command": "a"},
                    "bastion-demo": {
                        "type": "stdio",
                        "command": "/old/bastion",
                        "args": ["mcp", "connect", "demo"],
                        "env": {"BASTION_HOME": "/old"},
                        "alwaysAllow": ["bastion_user_info"],
                    },
                    "z": {"command": "z"},
                }
            },
            indent=2,
        )
    )
    t = target(path, "claude-code")
    res = mc.update_config(t, entries_for(t.client))  # no BASTION_HOME now
    assert res.updated == ["bastion-demo"] and not res.added
    servers = json.loads(path.read_text())["mcpServers"]
    assert list(servers) == ["a", "bastion-demo", "z"]
    assert servers["bastion-demo"] == {
        "type": "stdio",
        "command": BIN,
        "args": ["mcp", "connect", "demo"],
        "env": {},
        "alwaysAllow": ["bastion_user_info"],
    }


def test_non_object_entry_of_ours_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "mcp.json"
    path.write_text('{"mcpServers": {"bastion-demo": "junk"}}')
    res = mc.update_config(target(path, "cursor"), entries_for(mc.CLIENTS["cursor"]))
    assert res.updated == ["bastion-demo"]


def test_servers_key_added_when_missing(tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    path.write_text('{"theme": "dark", "general": {"vimMode": true}}\n')
    mc.update_config(target(path, "claude"), entries_for(mc.CLIENTS["claude"]))
    data = json.loads(path.read_text())
    assert list(data) == ["theme", "general", "mcpServers"]
    assert data["general"] == {"vimMode": True}


def test_unicode_bom_and_numbers_survive(tmp_path: Path) -> None:
    path = tmp_path / "claude_desktop_config.json"
    original = '\ufeff{"name": "café ☕ \\u2603", "big": 12345678901234567890, "f": 0.1, "e": 1e-7}'
    path.write_text(original, encoding="utf-8")
    mc.update_config(target(path, "claude"), entries_for(mc.CLIENTS["claude"]))
    raw = path.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")
    data = json.loads(raw.decode("utf-8-sig"))
    assert data["name"] == "café ☕ \u2603" and data["big"] == 12345678901234567890
    assert data["f"] == 0.1 and data["e"] == 1e-7
    assert "café ☕" in raw.decode("utf-8")  # not escaped to \u00e9


def test_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mcp.json"
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ValidationError, match="not UTF-8"):
        mc.update_config(target(path, "cursor"), entries_for(mc.CLIENTS["cursor"]))
    assert path.read_bytes() == b'{"a": "\xff"}'


def test_a_directory_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mcp.json"
    path.mkdir()
    with pytest.raises(ValidationError, match="is a directory"):
        mc.update_config(target(path, "cursor"), entries_for(mc.CLIENTS["cursor"]))


def test_symlinked_file_is_updated_through_the_link(tmp_path: Path) -> None:
    real = tmp_path / "dotfiles" / "mcp.json"
    real.parent.mkdir()
    real.write_text('{"mcpServers": {}}\n')
    link = tmp_path / ".cursor" / "mcp.json"
    link.parent.mkdir()
    link.symlink_to(real)
    res = mc.update_config(target(link, "cursor"), entries_for(mc.CLIENTS["cursor"]))
    assert link.is_symlink() and res.path == real
    assert "bastion-demo" in json.loads(real.read_text())["mcpServers"]
    assert res.backup == real.with_name("mcp.json.bak")


def test_a_concurrent_rewrite_is_not_overwritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / ".claude.json"
    path.write_text('{"n": 1}\n')
    real_read = mc._read
    calls = {"n": 0}

    def racing_read(p: Path) -> bytes | None:
        # The owner program rewrites the file between our first read and the rename, once.
        calls["n"] += 1
        if calls["n"] == 2:
            path.write_text('{"n": 2}\n')
        return real_read(p)

    monkeypatch.setattr(mc, "_read", racing_read)
    mc.update_config(target(path, "claude-code"), entries_for(mc.CLIENTS["claude-code"]))
    data = json.loads(path.read_text())
    assert data["n"] == 2 and "bastion-demo" in data["mcpServers"]
