"""What the connect dialog shows for one app: client snippets, commands, install links.

The snippets are what ``bastion mcp config`` writes (``client/mcp_config``: the same entries,
the same format per client); only the command differs: ``bastion``, since a web page cannot
know where the user installed it (``bastion mcp config`` on their machine writes the full path).
"""

from __future__ import annotations

import base64
import json
import urllib.parse
from dataclasses import dataclass

from bastion.client import mcp_config as mc

COMMAND = "bastion"
#: The clients the dialog shows, in order; ``file`` is the generic ``mcpServers`` JSON.
SHOWN = ("claude", "claude-code", "cursor", "vscode", "windsurf", "file")


@dataclass(frozen=True)
class Snippet:
    key: str
    display: str
    #: Where the client keeps it (Linux and macOS), or "" for the generic one.
    where: str
    text: str
    #: ``bastion mcp config`` writing it for you ("" when there is no such target).
    command: str
    #: A link the client installs the server from ("" when the client defines none).
    install: str = ""
    install_label: str = ""


def _where(client: mc.Client) -> str:
    if client.key == "file":
        return ""
    base, *parts = client.paths["linux"]
    shown = {"home": "~", "xdg_config": "~/.config", "claude_config_dir": "~", "appdata": "%APPDATA%"}[base]
    linux = "/".join([shown, *parts])
    base_mac, *mac_parts = client.paths["darwin"]
    mac = "/".join([{"home": "~"}.get(base_mac, "~"), *mac_parts]) if base_mac == "home" else ""
    return linux if not mac or mac == linux else f"{linux} (macOS: {mac})"


def cursor_link(app: str) -> str:
    """Cursor's install link: ``cursor://anysphere.cursor-deeplink/mcp/install?name=&config=``
    with the entry as base64 JSON."""
    entry = mc.build_entry(app, client=mc.CLIENTS["cursor"], command=COMMAND)
    config = base64.b64encode(json.dumps(entry, separators=(",", ":")).encode()).decode()
    query = urllib.parse.urlencode({"name": mc.entry_name(app), "config": config})
    return f"cursor://anysphere.cursor-deeplink/mcp/install?{query}"


def vscode_link(app: str) -> str:
    """VS Code's install link: ``vscode:mcp/install?`` and the entry, with its name, as JSON."""
    entry = {"name": mc.entry_name(app), **mc.build_entry(app, client=mc.CLIENTS["vscode"], command=COMMAND)}
    return "vscode:mcp/install?" + urllib.parse.quote(json.dumps(entry, separators=(",", ":")), safe="")


def snippets(app: str) -> list[Snippet]:
    out = []
    for key in SHOWN:
        client = mc.GENERIC if key == "file" else mc.CLIENTS[key]
        entries = mc.build_entries([app], client=client, command=COMMAND)
        install, label = "", ""
        if key == "cursor":
            install, label = cursor_link(app), "Add to Cursor"
        elif key == "vscode":
            install, label = vscode_link(app), "Add to VS Code"
        out.append(
            Snippet(
                key=key,
                display="Any MCP client (mcpServers JSON)" if key == "file" else client.display,
                where=_where(client),
                text=mc.client_snippet(client, entries),
                command=f"bastion mcp config {app}"
                + ("" if key == "file" else f" --client-config={client.key}"),
                install=install,
                install_label=label,
            )
        )
    return out
