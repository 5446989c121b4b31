"""``bastion mcp config`` end to end: the real CLI, a real cluster, real client files under a fake HOME.

The cluster serves the built-in demo app and one static app; ``alice`` (role
``mcp-user``) may use both and is logged in through an identity file.  Each
test points HOME at its own directory, so ``--client-config=claude`` and
friends write the very files the clients read on Linux, under ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import Node, start_node, stop_node

APPS = """\
app_service:
  demo_server: true
  apps:
  - name: notes
    description: Team notes
    labels: {env: dev}
    mcp:
      command: /bin/cat
      run_as_host_user: root
"""
OURS = ["bastion-bastion-demo", "bastion-notes"]
# Where each client keeps its user-level file on Linux, relative to HOME.
LINUX_PATHS = {
    "claude": ".config/Claude/claude_desktop_config.json",
    "cursor": ".cursor/mcp.json",
    "vscode": ".config/Code/User/mcp.json",
    "claude-code": ".claude.json",
    "windsurf": ".codeium/windsurf/mcp_config.json",
}
DISPLAY = {
    "claude": "Claude Desktop",
    "cursor": "Cursor",
    "vscode": "VS Code",
    "claude-code": "Claude Code",
    "windsurf": "Windsurf",
}
# Environment that would move the clients' files elsewhere; the tests pin HOME instead.
_MOVERS = ("XDG_CONFIG_HOME", "CLAUDE_CONFIG_DIR", "APPDATA", "USERPROFILE")


@dataclass
class Cluster:
    node: Node
    identity: Path


@dataclass
class User:
    """One user's machine: a HOME, a BASTION_HOME in it, and the CLI run as they would run it."""

    cluster: Cluster
    home: Path

    @property
    def bastion_home(self) -> Path:
        return self.home / ".bastion"

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        # Like Node.cli (no inherited BASTION_* settings), but with our HOME, which Node.cli keeps.
        full = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_") and k not in _MOVERS}
        full.update(HOME=str(self.home), BASTION_HOME=str(self.bastion_home), NO_COLOR="1", COLUMNS="200")
        full.update(env or {})
        return subprocess.run(
            [sys.executable, "-m", "bastion.cli.main", *args],
            capture_output=True,
            text=True,
            env=full,
            cwd=self.home,
            timeout=60,
        )

    def config(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return self.run("mcp", "config", *args, "-i", str(self.cluster.identity), env=env)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("mcpcfg")
    node = start_node(root, extra_config=APPS)
    try:
        node.cli("users", "add", "alice", "--roles=mcp-user", local=True)
        identity = root / "alice.id"
        node.cli("auth", "sign", "--user=alice", f"--out={identity}", local=True)
        yield Cluster(node, identity)
    finally:
        stop_node(node)


@pytest.fixture
def user(cluster: Cluster, tmp_path: Path) -> User:
    home = tmp_path / "home"
    home.mkdir()
    return User(cluster, home)


def ok(res: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


# ---------------------------------------------------------------- printing


def test_prints_the_snippet_to_paste(user: User) -> None:
    res = ok(user.config("--all"))
    data = json.loads(res.stdout)  # stdout is the JSON alone: it can be piped
    assert list(data) == ["mcpServers"]
    assert list(data["mcpServers"]) == OURS
    entry = data["mcpServers"]["bastion-notes"]
    assert os.path.isabs(entry["command"]) and os.path.basename(entry["command"]) == "bastion"
    assert os.access(entry["command"], os.X_OK)
    assert entry["args"] == ["mcp", "connect", "notes"]
    assert entry["env"] == {"BASTION_HOME": str(user.bastion_home)}
    assert "Found MCP servers:" in res.stderr
    assert "  bastion-demo\n" in res.stderr and "  notes\n" in res.stderr
    assert "--client-config=claude|cursor|vscode" in res.stderr and "claude-code" in res.stderr
    assert not list(user.home.iterdir()) or [p.name for p in user.home.iterdir()] == [".bastion"]


def test_prints_one_server_compact_with_headers(user: User) -> None:
    res = ok(user.config("bastion-demo", "--json-format=compact", "-H", "X-Team:  blue"))
    assert res.stdout.count("\n") == 1 and ": " not in res.stdout.replace("X-Team: blue", "")
    entries = json.loads(res.stdout)["mcpServers"]
    assert list(entries) == ["bastion-bastion-demo"]
    assert entries["bastion-bastion-demo"]["args"] == ["mcp", "connect", "bastion-demo", "-H", "X-Team: blue"]


def test_labels_select(user: User) -> None:
    res = ok(user.config("--labels", "env=dev"))
    assert list(json.loads(res.stdout)["mcpServers"]) == ["bastion-notes"]


# ---------------------------------------------------------------- selector and input errors


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ((), 2, "no MCP server selected: name one, or use --all or --labels"),
        (("notes", "--all"), 2, "choose one selector: a name, --all, or --labels"),
        (("--all", "--labels", "env=dev"), 2, "choose one selector"),
        (("notes", "--labels", "env=dev"), 2, "choose one selector"),
        (("--labels", "env=nowhere"), 1, "no MCP servers found with labels env=nowhere"),
        (("nosuch",), 1, 'no MCP servers found named "nosuch"'),
        (("notes", "-H", "no colon"), 2, "malformed header 'no colon'"),
        (("notes", "--client-config=claud"), 2, 'unknown MCP client "claud"'),
        (("notes", "--json-format=yaml"), 2, 'unknown JSON format "yaml"'),
    ],
)
def test_errors(user: User, args: tuple[str, ...], code: int, message: str) -> None:
    res = user.config(*args)
    assert res.returncode == code, res.stderr
    assert message in res.stderr
    assert res.stdout == ""
    if "no MCP servers found" in message:
        assert "bastion mcp ls" in res.stderr
    assert not (user.home / "claud").exists()


# ---------------------------------------------------------------- updating client files

EXISTING: dict[str, dict[str, Any]] = {
    "claude": {
        "globalShortcut": "Alt+Space",
        "mcpServers": {
            "filesystem": {
                "command": "npx",
                "args": ["-y", "@modelcontextprotocol/server-filesystem", "/tmp"],
            },
            "bastion-old": {"command": "/old/bastion", "args": ["mcp", "connect", "old"]},
        },
        "isUsingBuiltInNodeForMcp": True,
    },
    "cursor": {
        "mcpServers": {
            "linear": {"url": "https://mcp.linear.app/sse"},
            "gh": {"command": "gh-mcp", "env": {}},
        }
    },
    "vscode": {
        "inputs": [{"type": "promptString", "id": "pat", "description": "Token", "password": True}],
        "servers": {"github": {"type": "http", "url": "https://api.githubcopilot.com/mcp/"}},
    },
    "claude-code": {
        "numStartups": 7,
        "projects": {"/home/me/app": {"allowedTools": [], "mcpServers": {"local": {"command": "x"}}}},
        "mcpServers": {"sentry": {"type": "http", "url": "https://mcp.sentry.dev/mcp"}},
        "userID": "f00",
    },
    "windsurf": {"mcpServers": {"brave": {"command": "npx", "args": ["brave"], "env": {"KEY": "k"}}}},
}


@pytest.mark.skipif(sys.platform != "linux", reason="checks the Linux locations of the clients' files")
@pytest.mark.parametrize("client", list(LINUX_PATHS))
def test_updates_a_clients_real_file(user: User, client: str) -> None:
    path = user.home / LINUX_PATHS[client]
    path.parent.mkdir(parents=True, exist_ok=True)
    before = EXISTING[client]
    original = json.dumps(before, indent=2) + "\n"
    path.write_text(original)
    path.chmod(0o600)

    res = ok(user.config("--all", f"--client-config={client}"))
    assert f"Updated {DISPLAY[client]} configuration at {path}" in res.stdout
    assert "added: bastion-bastion-demo, bastion-notes" in res.stdout
    assert f"{path}.bak" in res.stdout and '"bastion-<app>"' in res.stdout

    # Ours added...
    after = json.loads(path.read_text())
    key = "servers" if client == "vscode" else "mcpServers"
    theirs = list(before[key])
    assert list(after[key]) == [*theirs, *OURS]
    ours = after[key]["bastion-notes"]
    assert ours["command"].endswith("/bastion") and ours["args"] == ["mcp", "connect", "notes"]
    assert ours["env"] == {"BASTION_HOME": str(user.bastion_home)}
    assert (ours.get("type") == "stdio") == (client in ("vscode", "claude-code"))
    # ...theirs untouched: every other key and entry, in order, same values, same layout.
    assert list(after) == list(before)
    assert {k: v for k, v in after.items() if k != key} == {k: v for k, v in before.items() if k != key}
    for name in theirs:
        assert json.dumps(after[key][name]) == json.dumps(before[key][name])
    assert path.read_text() == json.dumps(after, indent=2) + "\n"
    assert Path(f"{path}.bak").read_text() == original
    assert (path.stat().st_mode & 0o777) == 0o600

    # Second run: a no-op, no rewrite and no new backup.
    Path(f"{path}.bak").unlink()
    text, mtime = path.read_bytes(), path.stat().st_mtime_ns
    again = ok(user.config("--all", f"--client-config={client}"))
    assert f"{path} already up to date" in again.stdout
    assert path.read_bytes() == text and path.stat().st_mtime_ns == mtime
    assert not Path(f"{path}.bak").exists()


def test_creates_a_missing_file(user: User) -> None:
    res = ok(user.config("notes", "--client-config=claude"))
    path = user.home / LINUX_PATHS["claude"]
    assert f"Updated Claude Desktop configuration at {path}" in res.stdout
    assert "Backup" not in res.stdout
    assert list(json.loads(path.read_text())["mcpServers"]) == ["bastion-notes"]
    assert (path.stat().st_mode & 0o777) == 0o644


@pytest.mark.parametrize(
    ("client", "content", "problem"),
    [
        ("claude", '{"mcpServers": {"filesystem": {"command": "npx"}', "not valid JSON"),
        ("cursor", "[]", "the top level is an array"),
        ("vscode", '{\n  // my servers\n  "servers": {}\n}\n', "comments or trailing commas"),
        ("claude-code", '{"mcpServers": "none"}', '"mcpServers" is a string'),
    ],
)
def test_refuses_a_broken_file_and_leaves_it_untouched(
    user: User, client: str, content: str, problem: str
) -> None:
    path = user.home / LINUX_PATHS[client]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    mtime = path.stat().st_mtime_ns
    res = user.config("--all", f"--client-config={client}")
    assert res.returncode == 1
    assert str(path) in res.stderr and problem in res.stderr and "untouched" in res.stderr
    assert path.read_text() == content and path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name)) == [path.name]


def test_client_from_the_environment_and_a_project_path(user: User) -> None:
    ok(user.config("notes", env={"BASTION_MCP_CLIENT_CONFIG": "cursor"}))
    assert "bastion-notes" in json.loads((user.home / ".cursor/mcp.json").read_text())["mcpServers"]

    # A workspace file named by path gets the VS Code format; the env sets the layout.
    project = user.home / "proj" / ".vscode" / "mcp.json"
    res = ok(
        user.config(
            "--labels",
            "env=dev",
            "--client-config=proj/.vscode/mcp.json",
            env={"BASTION_MCP_CONFIG_JSON_FORMAT": "compact"},
        )
    )
    assert f"configuration at {project}" in res.stdout
    text = project.read_text()
    assert text.count("\n") == 1
    assert json.loads(text) == {
        "servers": {
            "bastion-notes": {
                "type": "stdio",
                "command": json.loads(text)["servers"]["bastion-notes"]["command"],
                "args": ["mcp", "connect", "notes"],
                "env": {"BASTION_HOME": str(user.bastion_home)},
            }
        }
    }
