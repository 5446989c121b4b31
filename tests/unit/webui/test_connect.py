"""The connect dialog's snippets are `bastion mcp config`'s entries; the install links decode."""

from __future__ import annotations

import base64
import json
import urllib.parse

from bastion.client import mcp_config as mc
from bastion.webui import connect


def test_snippets_are_what_mcp_config_writes() -> None:
    got = {s.key: s for s in connect.snippets("notes")}
    assert list(got) == ["claude", "claude-code", "cursor", "vscode", "windsurf", "file"]
    for key, s in got.items():
        client = mc.GENERIC if key == "file" else mc.CLIENTS[key]
        entries = mc.build_entries(["notes"], client=client, command="bastion")
        assert json.loads(s.text) == {client.servers_key: entries}
    assert json.loads(got["file"].text) == json.loads(
        mc.snippet(mc.build_entries(["notes"], command="bastion"))
    )
    assert json.loads(got["vscode"].text)["servers"]["bastion-notes"]["type"] == "stdio"
    assert got["cursor"].where == "~/.cursor/mcp.json"
    assert got["cursor"].command == "bastion mcp config notes --client-config=cursor"


def test_cursor_install_link() -> None:
    url = urllib.parse.urlsplit(connect.cursor_link("notes"))
    assert (url.scheme, url.netloc, url.path) == ("cursor", "anysphere.cursor-deeplink", "/mcp/install")
    q = dict(urllib.parse.parse_qsl(url.query))
    assert q["name"] == "bastion-notes"
    assert json.loads(base64.b64decode(q["config"])) == {
        "command": "bastion",
        "args": ["mcp", "connect", "notes"],
    }


def test_vscode_install_link() -> None:
    link = connect.vscode_link("notes")
    assert link.startswith("vscode:mcp/install?")
    entry = json.loads(urllib.parse.unquote(link.split("?", 1)[1]))
    assert entry == {
        "name": "bastion-notes",
        "type": "stdio",
        "command": "bastion",
        "args": ["mcp", "connect", "notes"],
    }
