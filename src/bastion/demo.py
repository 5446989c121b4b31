"""``make demo``: a one-node cluster on SQLite with a demo user, in the foreground.

Idempotent: a second run reuses ``./demo-data`` (cluster, CAs, user and
password) and just starts it again.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import socket
import sys
from pathlib import Path

from bastion import log as logs
from bastion.auth.ca import fingerprint
from bastion.auth.server import Actor
from bastion.config import load_config
from bastion.config_template import render_starter
from bastion.errors import AlreadyExistsError, BastionError
from bastion.service import Cluster

DEMO_USER = "demo"
DEMO_ROLES = ["mcp-user", "editor"]


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_port(preferred: int) -> int:
    if _free(preferred):
        return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _main(root: Path) -> None:
    data = root / "demo-data"
    cfg_path = data / "bastion.yaml"
    if not cfg_path.exists():
        data.mkdir(mode=0o700, exist_ok=True)
        cfg_path.write_text(
            render_starter(
                cluster_name="demo",
                data_dir=str(data / "state"),
                proxy_listen=f"127.0.0.1:{_pick_port(3080)}",
                auth_listen="127.0.0.1:3025",
                roles={"auth", "proxy", "app"},
                demo_server=True,
            )
        )
    cfg = load_config(cfg_path)
    logs.setup("info", "text", str(data / "bastion.log"))
    cluster = await Cluster.start(cfg)
    try:
        password = await _ensure_user(cluster, data / "demo-password")
        _print_next_steps(cluster, cfg_path, password, root)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("\nStopping the demo cluster.")
    finally:
        await cluster.stop()


async def _ensure_user(cluster: Cluster, pw_file: Path) -> str:
    auth, admin = cluster.auth, Actor.admin()
    assert auth is not None
    password = pw_file.read_text().strip() if pw_file.exists() else secrets.token_urlsafe(12)
    try:
        invite = await auth.add_user(admin, DEMO_USER, DEMO_ROLES, {"mcp_tools": ["*"]})
    except AlreadyExistsError:
        invite = await auth.reset_user(admin, DEMO_USER)
    await auth.accept_invite(invite.code, password)
    fd = os.open(pw_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return password


def _print_next_steps(cluster: Cluster, cfg_path: Path, password: str, root: Path) -> None:
    addr = cluster.proxy_addr
    assert cluster.auth is not None
    fp = fingerprint(cluster.auth.cas["host"].cert_pem)
    bindir = Path(sys.executable).parent
    bastion = shutil.which("bastion", path=str(bindir)) or "bastion"
    print(
        f"""
mcp-bastion demo cluster "{cluster.auth.cluster_name}" is running (SQLite, one node).

  Proxy:        https://{addr}
  CA:           {fp}
  Config:       {cfg_path}
  Logs:         {cfg_path.parent / "bastion.log"}
  Demo user:    {DEMO_USER}   password: {password}   (roles: {", ".join(DEMO_ROLES)})

Next, in another shell:

  export PATH={bindir}:$PATH

  # log in as the demo user (pins the cluster CA shown above)
  bastion login --proxy={addr} --user={DEMO_USER} --ca-fingerprint={fp}
  bastion status
  bastion get roles --format=text

  # administer the cluster from this host, through its data directory
  export BASTION_CONFIG={cfg_path}
  bastion users add alice --roles=mcp-user
  bastion tokens add --type=app

  # use the built-in demo MCP server through the gateway
  bastion mcp ls
  bastion mcp tools bastion-demo
  bastion mcp call bastion-demo bastion_user_info

  # any streamable-HTTP MCP client, through a local authenticated listener
  bastion proxy mcp bastion-demo -p 8888
  npx @modelcontextprotocol/inspector --transport http --cli --method tools/list http://127.0.0.1:8888

  # or directly over HTTPS with a bearer token
  curl -s --cacert <(bastion auth export --type=tls) https://{addr}/v1/webapi/find

  # who did what: the audit log
  bastion audit search --since=1h

Press Ctrl-C to stop.  ({bastion})
""",
        flush=True,
    )


def main() -> None:
    try:
        asyncio.run(_main(Path.cwd()))
    except BastionError as e:
        print(f"error: {e.message}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
