"""No API right becomes a host right (F2, F11, F13), against a real `bastion start` node.

The node serves every dynamic app (``resources: [{labels: {"*": "*"}}]``) but its
``app_service.dynamic_apps`` lets them run only the recording server's Python as
``nobody``, set only ``RECORD_TAG``, and reach only ``127.0.0.1/32``.  User ``maker``
may only *create* apps; ``alice``, ``carol`` and ``dave`` use them.  Each attack is made the way
the review made it, and the test asserts what ran, what was dialled and what reached
a recording upstream.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import Node, start_node, stop_node, wait_for_log
from tests.peers import ROOT
from tests.security.conftest import INIT, Gateway, RawSession, Recording, recording_cmd, recording_http

NOBODY = "nobody"
RECORDER = str(ROOT / "tests" / "fixtures" / "recording_server.py")

MAKER_ROLE = """\
kind: role
version: v1
metadata: {name: app-maker}
spec:
  allow:
    rules: [{resources: [app], verbs: [create]}]
"""


def _nobody() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(NOBODY)
    except KeyError:
        return None


def _python_for_nobody() -> str | None:
    """A Python that ``nobody`` can run (the test's own may live under a private home)."""
    pw = _nobody()
    assert pw is not None
    for candidate in (shutil.which("python3") or "", "/usr/bin/python3", "/usr/local/bin/python3"):
        if not candidate or not os.path.isabs(candidate):
            continue
        try:
            subprocess.run(
                [candidate, "-c", "pass"], user=pw.pw_uid, group=pw.pw_gid, cwd="/", check=True, timeout=30
            )
        except (OSError, subprocess.SubprocessError):
            continue
        return os.path.normpath(candidate)
    return None


PYTHON = _python_for_nobody() if os.geteuid() == 0 and _nobody() is not None else None

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="switching stdio servers to another user needs root"),
    pytest.mark.skipif(_nobody() is None, reason='no "nobody" user on this host'),
    pytest.mark.skipif(PYTHON is None, reason='no Python that "nobody" may run'),
]


@dataclass
class Host:
    gw: Gateway
    maker_ident: Path
    shared: Path  # a directory the stdio servers (nobody) may write their records to
    upstream: str  # the recording HTTP server's URL (loopback)
    upstream_rec: Recording
    diag_port: int

    @property
    def node(self) -> Node:
        return self.gw.node

    def create(self, name: str, spec: dict[str, Any], *, force: bool = False) -> None:
        """``maker`` (role: create on app, nothing else) creates the app through the API."""
        doc = {"kind": "app", "version": "v1", "metadata": {"name": name, "labels": {"env": "dev"}}}
        doc["spec"] = spec
        f = self.shared.parent / f"{name}.json"
        f.write_text(json.dumps(doc))
        if force:  # maker may not update: the cluster's administrator changes it
            self.node.cli("create", "-f", str(f), local=True)
        else:
            self.node.cli("create", str(f), "-i", str(self.maker_ident), "--proxy", self.node.addr)

    def refused(self, name: str) -> str:
        """Wait for the host's refusal of ``name``; its reason."""
        m = wait_for_log(
            self.node.log,
            rf"dynamic app not served: refused by this host app={re.escape(name)} reason=([^\n]*)",
            self.node.proc,
            10.0,
        )
        reason = m.group(1)  # quoted by the log when it holds spaces
        if reason.startswith('"') and reason.endswith('"'):
            reason = reason[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        return reason

    def refused_in_heartbeat(self, name: str) -> str:
        """The reason ``bastion get app_servers`` gives for refusing ``name`` (waits for it)."""
        deadline = time.monotonic() + 10
        while True:
            out = json.loads(self.node.cli("get", "app_servers", "--format=json", local=True).stdout)
            reasons = [s["spec"].get("refused", {}).get(name) for s in out]
            found = [r for r in reasons if r]
            if found or time.monotonic() > deadline:
                assert found, out
                return str(found[0])

    def served(self, name: str) -> None:
        wait_for_log(self.node.log, rf"dynamic app registered app={re.escape(name)}\b", self.node.proc, 10.0)

    def initialize(self, user: str, app: str) -> Any:
        with self.gw.http() as c:
            return c.post(
                f"https://{self.node.addr}/mcp/apps/{app}",
                json=INIT,
                headers={
                    "Authorization": f"Bearer {self.gw.token(user)}",
                    "Accept": "application/json, text/event-stream",
                },
            )

    def recorder_spec(self, record: Path, **mcp: Any) -> dict[str, Any]:
        cmd = recording_cmd("stdio", record)
        return {
            "mcp": {
                "command": PYTHON,
                "args": [RECORDER, *cmd[3:]],
                "run_as_host_user": NOBODY,
                **mcp,
            }
        }

    def children(self) -> list[int]:
        """Processes whose parent is the gateway (the stdio servers it runs)."""
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == self.node.proc.pid:
                out.append(int(entry.name))
        return out


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    # Not under pytest's 0700 temporary directory: the backend-file test must show that
    # the gateway's own file modes, not a parent directory, keep "nobody" out.
    root = Path(tempfile.mkdtemp(prefix="bastion-host-"))
    root.chmod(0o755)
    shared = root / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    http_rec = root / "upstream.jsonl"
    try:
        with recording_http(http_rec) as url:
            extra = f"""\
app_service:
  resources:
  - labels: {{"*": "*"}}
  dynamic_apps:
    commands: [{PYTHON}, /bin/cat]
    run_as: [{NOBODY}]
    env: [RECORD_TAG]
    upstream_networks: [127.0.0.1/32]
  stdio_limits:
    per_user: 3
    per_app: 5
    memory: 2GiB
    address_space: 16GiB
    open_files: 256
    cpu_time: 10m
"""
            node = start_node(root / "node", extra_config=extra, bastion_config="  diag_addr: 127.0.0.1:0\n")
            try:
                (root / "roles.yaml").write_text(MAKER_ROLE)
                node.cli("create", str(root / "roles.yaml"), local=True)
                node.cli("users", "add", "maker", "--roles=app-maker", local=True)
                for user in ("alice", "carol", "dave"):
                    node.cli("users", "add", user, "--roles=mcp-user", local=True)
                ident = root / "maker.id"
                node.cli("auth", "sign", "--user=maker", f"--out={ident}", local=True)
                m = wait_for_log(node.log, r"diag listening addr=http://127\.0\.0\.1:(\d+)", node.proc, 10.0)
                yield Host(Gateway(node, {}), ident, shared, url, Recording(http_rec), int(m.group(1)))
            finally:
                stop_node(node)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------ F2: running code


def test_f2_root_shell_with_ld_preload_from_a_create_only_user_never_runs(host: Host) -> None:
    marker = host.shared / "f2-owned"
    host.create(
        "f2-root-sh",
        {
            "mcp": {
                "command": "/bin/sh",
                "args": ["-c", f"touch {marker}; cp backend.db {host.shared}"],
                "run_as_host_user": "root",
                "env": {"LD_PRELOAD": "/tmp/evil.so"},
            }
        },
    )
    reason = host.refused("f2-root-sh")
    assert "'/bin/sh' is not in app_service.dynamic_apps.commands" in reason
    assert reason in host.refused_in_heartbeat("f2-root-sh")  # `bastion get app_servers` shows it
    r = host.initialize("alice", "f2-root-sh")
    assert r.status_code == 404  # not served: no such app
    assert not marker.exists()
    assert list(host.shared.glob("*.db")) == []


@pytest.mark.parametrize(
    ("name", "mcp", "why"),
    [
        ("f2-as-root", {"run_as_host_user": "root"}, "'root' is not in app_service.dynamic_apps.run_as"),
        ("f2-as-gateway", {"run_as_host_user": ""}, "'root' is not in app_service.dynamic_apps.run_as"),
        ("f2-ld-preload", {"env": {"LD_PRELOAD": "/tmp/x.so"}}, "'LD_PRELOAD' may never be set"),
        ("f2-node-opts", {"env": {"NODE_OPTIONS": "--require /tmp/x"}}, "'NODE_OPTIONS' may never be set"),
        ("f2-other-env", {"env": {"SECRET_SAUCE": "1"}}, "'SECRET_SAUCE' is not in"),
    ],
)
def test_f2_an_allowed_command_with_a_refused_user_or_variable_is_not_served(
    host: Host, name: str, mcp: dict[str, Any], why: str
) -> None:
    record = host.shared / f"{name}.jsonl"
    host.create(name, host.recorder_spec(record, **mcp))
    assert why in host.refused(name)
    assert host.initialize("alice", name).status_code == 404
    assert not record.exists()


def test_f2_what_the_host_allows_runs_as_nobody_with_a_minimal_environment(host: Host) -> None:
    record = host.shared / "f2-ok.jsonl"
    host.create("f2-ok", host.recorder_spec(record, env={"RECORD_TAG": "t1"}))
    host.served("f2-ok")
    with RawSession(host.gw, "alice", "f2-ok") as s:
        r = s.post(
            b'{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"get-env","arguments":{}}}'
        )
        env = json.loads(s.answer(r)["result"]["content"][0]["text"])
    assert env["USER"] == NOBODY and env["RECORD_TAG"] == "t1"
    assert not any(k.startswith(("LD_", "PYTHON", "BASTION")) for k in env)
    assert "tools/call" in Recording(record).methods()

    # Changed through the API into something the host refuses: no longer served.
    host.create("f2-ok", host.recorder_spec(record, env={"LD_PRELOAD": "/tmp/x.so"}), force=True)
    assert "may never be set" in host.refused("f2-ok")
    assert host.initialize("alice", "f2-ok").status_code == 404


def test_f2_the_backend_is_not_readable_by_the_users_stdio_servers_run_as(host: Host) -> None:
    data = host.node.root / "data"
    backend = data / "backend.db"
    assert data.stat().st_mode & 0o777 == 0o700
    for f in data.glob("backend.db*"):  # the database and its -wal / -shm files
        assert f.stat().st_mode & 0o777 == 0o600, f
        assert f.stat().st_uid == 0
    # Even with the data directory opened up (an operator's chmod), the file modes hold.
    data.chmod(0o755)
    try:
        host.create(
            "f2-cat",
            {"mcp": {"command": "/bin/cat", "args": [str(backend)], "run_as_host_user": NOBODY}},
        )
        host.served("f2-cat")
        host.initialize("alice", "f2-cat")  # cat runs as nobody, fails, and the session with it
        wait_for_log(host.node.log, r"stderr: /bin/cat: .*backend\.db: Permission denied", host.node.proc, 10)
    finally:
        data.chmod(0o700)


# ------------------------------------------------------------------ F11: addresses dialled


@pytest.mark.parametrize(
    ("name", "uri", "why"),
    [
        ("f11-diag", "mcp+http://127.0.0.1:{diag}/metrics", "own listeners"),
        ("f11-metadata", "mcp+http://169.254.169.254/latest/meta-data/", "link-local"),
        ("f11-loopback-v6", "mcp+http://[::1]:{diag}/metrics", "a loopback address"),
        ("f11-private", "mcp+https://10.0.0.1/mcp", "not in app_service.dynamic_apps.upstream_networks"),
    ],
)
def test_f11_dynamic_apps_aimed_at_internal_addresses_are_not_served(
    host: Host, name: str, uri: str, why: str
) -> None:
    host.create(name, {"uri": uri.format(diag=host.diag_port)})
    assert why in host.refused(name)
    assert host.initialize("alice", name).status_code == 404


@pytest.mark.parametrize("scheme", ["mcp+http", "mcp+sse+http"])
def test_f11_a_name_is_judged_on_the_address_dialled(host: Host, scheme: str) -> None:
    # "localhost" passes the serve-time check (a name), then resolves to 127.0.0.1,
    # which the host allows, on the port of the gateway's own diagnostics listener.
    name = "f11-name-" + scheme.replace("+", "-")
    host.create(name, {"uri": f"{scheme}://localhost:{host.diag_port}/metrics"})
    host.served(name)
    r = host.initialize("alice", name)
    assert r.status_code == 502
    assert "own listeners" in r.text and "# HELP" not in r.text and "# TYPE" not in r.text


def test_f11_an_allowed_network_is_reached(host: Host) -> None:
    before = len(host.upstream_rec.records())
    host.create("f11-ok", {"uri": f"mcp+{host.upstream}/mcp"})
    host.served("f11-ok")
    with RawSession(host.gw, "alice", "f11-ok") as s:
        r = s.post(b'{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"echo","arguments":{}}}')
        assert r.status_code == 200
    assert len(host.upstream_rec.records()) > before


class _Redirect(BaseHTTPRequestHandler):
    target = ""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        self.do_GET()

    def do_GET(self) -> None:
        self.send_response(307)
        self.send_header("Location", self.target)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.mark.parametrize("scheme", ["mcp+http", "mcp+sse+http"])
def test_f11_redirects_from_an_upstream_are_not_followed(host: Host, scheme: str) -> None:
    # The redirect points at the recording upstream: nothing may reach it through the gateway.
    handler = type("R", (_Redirect,), {"target": f"{host.upstream}/redirected"})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        name = "f11-redirect-" + scheme.replace("+", "-")
        host.create(name, {"uri": f"{scheme}://127.0.0.1:{server.server_address[1]}/mcp"})
        host.served(name)
        r = host.initialize("alice", name)
        assert r.status_code != 200
        assert not [x for x in host.upstream_rec.records() if x.get("path") == "/redirected"]
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------ F13: processes


def _limits(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]:
        name, soft = line[:26].strip(), line[26:47].strip()
        out[name] = soft
    return out


def test_f13_stdio_caps_answer_429_and_bound_the_processes(host: Host) -> None:
    record = host.shared / "f13.jsonl"
    host.create("f13", host.recorder_spec(record))
    host.served("f13")
    before = set(host.children())
    sessions: list[RawSession] = []
    try:
        for _ in range(3):
            sessions.append(RawSession(host.gw, "carol", "f13"))
        r = host.initialize("carol", "f13")
        assert r.status_code == 429
        err = r.json()["error"]
        assert "per_user" in err["message"] and "DELETE" in err["message"]
        assert r.headers.get("x-bastion-error-origin") == "client"
        mine = set(host.children()) - before
        assert len(mine) == 3

        # The children carry the host's rlimits (and no core dumps).
        for pid in mine:
            limits = _limits(pid)
            assert limits["Max data size"] == str(2 << 30)
            assert limits["Max address space"] == str(16 << 30)
            assert limits["Max open files"] == "256"
            assert limits["Max cpu time"] == "600"
            assert limits["Max core file size"] == "0"

        # Per app: dave gets the 4th and 5th; the 6th of the app is refused.
        for _ in range(2):
            sessions.append(RawSession(host.gw, "dave", "f13"))
        r = host.initialize("dave", "f13")
        assert r.status_code == 429 and "per_app" in r.json()["error"]["message"]
        assert len(set(host.children()) - before) == 5

        # Ending a session frees its slot.
        first = sessions.pop(0)
        first.client.delete(
            first.url,
            headers={"Authorization": f"Bearer {host.gw.token('carol')}", "Mcp-Session-Id": first.id},
        )
        first.close()
        deadline = time.monotonic() + 10
        while True:
            again = host.initialize("carol", "f13")
            if again.status_code == 200 or time.monotonic() > deadline:
                break
        assert again.status_code == 200, again.text
    finally:
        for s in sessions:
            s.close()
