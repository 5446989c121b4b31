"""The README's command blocks, run as a new user would, in order, on a fresh directory.

Every ``sh`` block runs line by line in bash (a shared environment: ``export`` carries
over), each command as written, except for these substitutions:

- ``127.0.0.1:3080`` and ``8888`` become free ports (other processes may hold those);
- ``SHA256:...`` and ``--invite=...`` become what ``bastion users add`` printed just before;
- ``npx @modelcontextprotocol/inspector`` becomes the pinned Inspector in tests/node.

``bastion start`` and ``bastion proxy mcp`` run in the background (they serve until
stopped); password prompts get the password on a pseudo-terminal.  The ``yaml`` blocks
that name a file are written to it; the §4 app configuration is merged into
``bastion.yaml`` (its ``everything`` and ``legacy`` pointing at server-everything on free
ports) and the cluster restarted, as an operator would.  The blocks in :data:`SKIPPED`
are not run, each for the reason given; a block this test does not know fails it.
"""

from __future__ import annotations

import os
import pty
import re
import select
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import START_DEADLINE, wait_for_log
from tests.peers import free_port, inspector_cmd, node_env, requires_node_peers, run_everything

pytestmark = requires_node_peers

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PW = "correct horse battery staple"
COMMAND_DEADLINE = 120.0

#: Blocks not run: a phrase of the block -> why.
SKIPPED = {
    "make demo   #": "runs a demo cluster in the foreground until Ctrl-C, on the ports the walkthrough uses",
    "make test        # ruff": "`make test` runs this test: it would run itself",
    "error: invalid configuration bastion.yaml:": "output, not commands (test_cluster covers the message)",
    "dynamic_apps:": "names a program and a host user of an operator's host (/usr/local/bin/mcp-files, mcp)",
    "# app.yaml on the other host": "needs a second machine (test_agents joins app services)",
}
#: The app of the §4 configuration not run, and why.
APP_NOT_RUN = {"files": "needs @modelcontextprotocol/server-filesystem from npm and a host user `mcp`"}


@dataclass
class Block:
    lang: str
    text: str
    line: int

    def has(self, phrase: str) -> bool:
        return phrase in self.text


def readme_blocks() -> list[Block]:
    text = README.read_text()
    found = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S):
        found.append(Block(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1))
    return found


def commands(block: Block) -> list[str]:
    """The block's command lines, comments dropped."""
    out = []
    for raw in block.text.splitlines():
        line = re.sub(r"(^|\s+)#.*$", "", raw).strip()
        if line:
            out.append(line)
    return out


@dataclass
class Shell:
    """A new user's shell in a fresh directory: state kept between commands in ``env.sh``."""

    cwd: Path
    env: dict[str, str]
    addr: str
    local_port: int
    invite: str = ""
    fingerprint: str = ""
    background: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    transcript: list[str] = field(default_factory=list)

    def substitute(self, line: str) -> str:
        line = line.replace("127.0.0.1:3080", self.addr).replace("8888", str(self.local_port))
        if "SHA256:..." in line:
            line = line.replace("SHA256:...", self.fingerprint)
        if "--invite=..." in line:
            line = line.replace("--invite=...", f"--invite={self.invite}")
        inspector = "npx @modelcontextprotocol/inspector"
        if line.startswith(inspector):
            line = shlex.join(inspector_cmd()) + line[len(inspector) :]
        return line

    def script(self, line: str) -> list[str]:
        state = self.cwd / "env.sh"
        return ["bash", "-c", f"set -eo pipefail; source {state}; {line}\nexport -p > {state}"]

    def run(self, written: str) -> str:
        line = self.substitute(written)
        self.transcript.append(f"$ {line}")
        if re.match(r"bastion (users set-password|login) ", line) and "--password-stdin" not in line:
            code, out = self._run_on_tty(line)
        else:
            res = subprocess.run(
                self.script(line),
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=COMMAND_DEADLINE,
            )
            code, out = res.returncode, res.stdout + res.stderr
        self.transcript.append(out)
        assert code == 0, f"README command failed ({code}): {written}\n" + "\n".join(self.transcript[-6:])
        if written.startswith("bastion users add alice"):
            m = re.search(r"--ca-fingerprint=(\S+) --invite=(\S+)", out)
            assert m, out
            self.fingerprint, self.invite = m.group(1), m.group(2)
        return out

    def _run_on_tty(self, line: str) -> tuple[int, str]:
        """Run on a pseudo-terminal, answering password prompts (what a user types)."""
        master, slave = pty.openpty()
        proc = subprocess.Popen(
            self.script(line),
            cwd=self.cwd,
            env=self.env,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=_take_terminal,
        )
        os.close(slave)
        seen = b""
        answered = 0
        end = time.monotonic() + COMMAND_DEADLINE
        try:
            while time.monotonic() < end:
                ready, _, _ = select.select([master], [], [], 0.5)
                if ready:
                    try:
                        chunk = os.read(master, 4096)
                    except OSError:  # EIO: the terminal's other side closed
                        break
                    if not chunk:
                        break
                    seen += chunk
                    prompts = len(re.findall(rb"[Pp]assword[^\n]*: ", seen))
                    if prompts > answered:
                        os.write(master, PW.encode() + b"\n")
                        answered = prompts
                elif proc.poll() is not None:
                    break
            code = proc.wait(timeout=max(1.0, end - time.monotonic()))
        finally:
            os.close(master)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return code, seen.decode(errors="replace")

    def start_background(self, name: str, written: str, ready: str) -> str:
        """A command that serves until stopped; returns its log once ``ready`` appears in it."""
        line = self.substitute(written)
        self.transcript.append(f"$ {line} &")
        log = self.cwd / f"{name}.log"
        with log.open("wb") as f:
            proc = subprocess.Popen(
                self.script(f"exec {line}"),
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        self.background[name] = proc
        wait_for_log(log, ready, proc, START_DEADLINE)  # type: ignore[arg-type]
        return log.read_text()

    def stop_background(self, name: str, sig: int = signal.SIGTERM) -> str:
        proc = self.background.pop(name)
        proc.send_signal(sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return (self.cwd / f"{name}.log").read_text()

    def stop_all(self) -> None:
        for name in list(self.background):
            self.stop_background(name)


def _take_terminal() -> None:
    """In the child (a new session): make the pseudo-terminal on stdin its controlling terminal."""
    import fcntl
    import termios

    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[Shell]:
    work = tmp_path / "work"
    home = tmp_path / "home"
    work.mkdir()
    home.mkdir()
    (work / "env.sh").write_text("")
    env = {k: v for k, v in node_env().items() if not k.startswith("BASTION_") and k != "COLUMNS"}
    env |= {"HOME": str(home), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}
    sh = Shell(cwd=work, env=env, addr=f"127.0.0.1:{free_port()}", local_port=free_port())
    try:
        yield sh
    finally:
        sh.stop_all()


def _free_fixed_ports(config: Path) -> None:
    """Ports the starter config fixes that other processes here may hold: any free one instead."""
    doc: dict[str, Any] = yaml.safe_load(config.read_text())
    doc["auth_service"]["listen_addr"] = "127.0.0.1:0"
    doc["proxy_service"]["tunnel_listen_addr"] = "127.0.0.1:0"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))


def _apply_apps(block: Block, config: Path, urls: dict[str, str]) -> list[str]:
    """Merge the §4 configuration block into ``config``; the app names left out."""
    excerpt: dict[str, Any] = yaml.safe_load(block.text)["app_service"]
    doc: dict[str, Any] = yaml.safe_load(config.read_text())
    apps = []
    for app in excerpt["apps"]:
        if app["name"] in APP_NOT_RUN:
            continue
        apps.append({**app, "uri": app["uri"].replace(_host_part(app["uri"]), urls[app["name"]])})
    doc["app_service"] = {**doc["app_service"], **excerpt, "apps": apps}
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    return [a["name"] for a in excerpt["apps"] if a["name"] in APP_NOT_RUN]


def _host_part(uri: str) -> str:
    """``mcp+http://127.0.0.1:3001/mcp`` -> ``http://127.0.0.1:3001/mcp`` (what is substituted)."""
    return uri.split("+")[-1]


@pytest.mark.timeout(600)  # some forty commands, each a new process
def test_every_readme_command_works_as_written(shell: Shell) -> None:
    blocks = readme_blocks()
    config = shell.cwd / "bastion.yaml"
    skipped: list[str] = []
    with ExitStack() as stack:
        urls = {
            "everything": stack.enter_context(run_everything("streamableHttp")),
            "legacy": stack.enter_context(run_everything("sse")),
        }
        for block in blocks:
            reason = next((why for phrase, why in SKIPPED.items() if block.has(phrase)), None)
            if reason is not None:
                skipped.append(f"README.md:{block.line}: {reason}")
                continue
            if block.lang == "yaml":
                if block.has("kind: role"):
                    (shell.cwd / "role.yaml").write_text(block.text)
                elif block.has("# mcp_server.yaml"):
                    (shell.cwd / "mcp_server.yaml").write_text(block.text)
                elif block.has("demo_server: true"):
                    left_out = _apply_apps(block, config, urls)
                    skipped += [f"README.md:{block.line}: app {n}: {APP_NOT_RUN[n]}" for n in left_out]
                    shell.stop_background("cluster")
                    shell.start_background(
                        "cluster", "bastion start --config bastion.yaml", r"proxy listening addr="
                    )
                else:
                    pytest.fail(
                        f"README.md:{block.line}: a yaml block this test does not know:\n{block.text}"
                    )
                continue
            assert block.lang == "sh", f"README.md:{block.line}: a block this test does not know"
            _run_block(shell, block)
    assert len(skipped) == len(SKIPPED) + len(APP_NOT_RUN), skipped


def _run_block(shell: Shell, block: Block) -> None:
    for line in commands(block):
        if line.startswith("bastion start"):
            _free_fixed_ports(shell.cwd / "bastion.yaml")
            log = shell.start_background("cluster", line, r"proxy listening addr=")
            assert f"proxy listening addr=https://{shell.addr}" in log, log
        elif line.startswith("bastion proxy mcp"):
            out = shell.start_background("proxy-mcp", line, r"Press Ctrl-C to stop")
            assert f"Proxying connections to everything on 127.0.0.1:{shell.local_port}" in out, out
        else:
            out = shell.run(line)
            _check(line, out)
            if line.startswith("npx "):
                log = shell.stop_background("proxy-mcp", signal.SIGINT)
                assert "Traceback" not in log, log


def _check(line: str, out: str) -> None:
    """What the README says these print."""
    if line.startswith("bastion tokens add --type=app --ttl=30m --format=text"):
        assert re.fullmatch(r"[0-9a-f]{32}\n", out), out  # the token alone
    elif line.startswith("curl "):
        assert '"cluster_name":"example"' in out.replace(" ", ""), out
    elif line == "bastion mcp call everything echo --arg message=hi":
        assert "Echo: hi" in out, out
    elif line.startswith("npx "):
        assert '"echo"' in out, out
