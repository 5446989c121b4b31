"""``make demo``: a one-node cluster on SQLite with a demo user, in the foreground.

Idempotent: a second run reuses ``./demo-data`` (cluster, CAs, user and
password) and just starts it again.

Ports: the demo listens on 127.0.0.1 with the proxy on 3080 and the tunnel for
joined app services on 3024.  Each is checked before start; one that is taken
(by whom, when ``/proc`` tells) is replaced by a free port for this run only, and
the choice is printed.  ``demo-data/bastion.yaml`` is the demo's own file,
written on every run with the usual ports, so it never keeps a port a past run
happened to pick.  (It also names ``auth_service.listen_addr`` 3025, which
nothing listens on yet, so it is not checked.)
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import sys
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from bastion import log as logs
from bastion._listen import bind_tcp
from bastion.auth.ca import fingerprint
from bastion.auth.server import Actor
from bastion.config import Config, load_config
from bastion.config_template import render_starter
from bastion.errors import AlreadyExistsError, BastionError, ConfigError
from bastion.service import Cluster

DEMO_USER = "demo"
DEMO_ROLES = ["mcp-user", "editor"]
HOST = "127.0.0.1"
#: What the demo listens on: (what, config key, the usual port).
PORTS = (
    ("proxy", "proxy_service.listen_addr", 3080),
    ("tunnel", "proxy_service.tunnel_listen_addr", 3024),
)
#: Start attempts: a port found free can be taken before the cluster binds it.
_ATTEMPTS = 3


def port_free(port: int, host: str = HOST) -> bool:
    """Whether the cluster could listen on ``host:port`` now (bound the way it binds)."""
    try:
        bind_tcp(host, port).close()
    except OSError:
        return False
    return True


def port_holder(port: int) -> str:
    """Who listens on TCP ``port`` here, as far as ``/proc`` tells: ``pid 12 (nginx)``, or ``""``."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            # sl local_address rem_address st ... inode; st 0A is LISTEN.
            if len(f) > 9 and f[3] == "0A" and int(f[1].rpartition(":")[2], 16) == port:
                inodes.add(f"socket:[{f[9]}]")
    if not inodes:
        return ""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue  # gone, or another user's
        for fd in fds:
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link in inodes:
                try:
                    comm = (proc / "comm").read_text().strip()
                except OSError:
                    comm = "?"
                return f"pid {proc.name} ({comm})"
    return ""


@dataclass(frozen=True)
class PortChoice:
    """One port the demo needs: the usual one, or (when taken) any free one for this run."""

    what: str
    key: str
    usual: int
    #: Who holds the usual port ("" when unknown); ``None`` when it is free.
    taken_by: str | None = None

    @property
    def port(self) -> int:
        return self.usual if self.taken_by is None else 0

    def notice(self, actual: int) -> str:
        who = f"by {self.taken_by}" if self.taken_by else "by another process"
        return f"port {self.usual} ({self.what}) is taken {who}: the demo uses {HOST}:{actual} instead"


def choose_ports(taken: Collection[int] = ()) -> list[PortChoice]:
    """Check each port the demo needs; ``taken`` are ports known to be taken already."""
    out = []
    for what, key, usual in PORTS:
        if usual in taken or not port_free(usual):
            out.append(PortChoice(what, key, usual, taken_by=port_holder(usual)))
        else:
            out.append(PortChoice(what, key, usual))
    return out


def for_this_run(cfg: Config, choices: list[PortChoice]) -> Config:
    """``cfg`` listening where ``choices`` say (port 0: any free one); the file is left as it is."""
    port = {c.what: c.port for c in choices}
    proxy = cfg.proxy_service.model_copy(
        update={
            "listen_addr": f"{HOST}:{port['proxy']}",
            "tunnel_listen_addr": f"{HOST}:{port['tunnel']}",
        }
    )
    return cfg.model_copy(update={"proxy_service": proxy})


async def _main(root: Path) -> None:
    data = root / "demo-data"
    cfg_path = data / "bastion.yaml"
    data.mkdir(mode=0o700, exist_ok=True)
    cfg_path.write_text(
        render_starter(
            cluster_name="demo",
            data_dir=str(data / "state"),
            proxy_listen=f"{HOST}:{PORTS[0][2]}",
            auth_listen=f"{HOST}:3025",
            roles={"auth", "proxy", "app"},
            demo_server=True,
        )
    )
    saved = load_config(cfg_path)
    logs.setup("info", "text", str(data / "bastion.log"))
    taken: set[int] = set()
    for attempt in range(_ATTEMPTS):
        choices = choose_ports(taken)
        try:
            cluster = await Cluster.start(for_this_run(saved, choices))
            break
        except ConfigError as e:  # a port taken between the check and the bind: check again
            lost = [c for c in choices if c.key == e.path and c.taken_by is None]
            if not lost or attempt == _ATTEMPTS - 1:
                raise
            taken.add(lost[0].usual)
    try:
        assert cluster.tunnels is not None and cluster.proxy is not None
        actual = {"proxy": cluster.proxy.port, "tunnel": cluster.tunnels.port}
        for c in choices:
            if c.taken_by is not None:
                print(c.notice(actual[c.what]), flush=True)
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
    tunnel = f"{HOST}:{cluster.tunnels.port}" if cluster.tunnels is not None else "-"
    assert cluster.auth is not None
    fp = fingerprint(cluster.auth.cas["host"].cert_pem)
    bindir = Path(sys.executable).parent
    bastion = shutil.which("bastion", path=str(bindir)) or "bastion"
    print(
        f"""
mcp-bastion demo cluster "{cluster.auth.cluster_name}" is running (SQLite, one node).

  Proxy:        https://{addr}
  Web UI:       https://{addr}/web   (sign in as {DEMO_USER}; the browser will warn about the demo's own CA)
  Tunnel:       {tunnel}   (for joined app services; the proxy tells them)
  CA:           {fp}
  Config:       {cfg_path}   (the demo's own: rewritten on each run)
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
