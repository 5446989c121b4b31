"""Real processes on loopback: `bastion start` in a subprocess, the CLI as users run it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

START_DEADLINE = 30.0


@dataclass
class Node:
    """A running `bastion start` and an environment to run the CLI against it."""

    root: Path
    config: Path
    addr: str
    proc: subprocess.Popen[bytes]
    log: Path
    #: More environment for every CLI run (e.g. SSL_CERT_FILE).
    env: dict[str, str] = field(default_factory=dict)

    def cli(
        self,
        *args: str,
        input: str | None = None,
        home: Path | None = None,
        local: bool = False,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run `bastion ARGS` as a user would; ``local`` = on the server host (BASTION_CONFIG)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
        env["BASTION_HOME"] = str(home or self.root / "home")
        env["NO_COLOR"] = "1"
        env["COLUMNS"] = "200"
        env.update(self.env)
        if local:
            env["BASTION_CONFIG"] = str(self.config)
        res = subprocess.run(
            [sys.executable, "-m", "bastion.cli.main", *args],
            input=input,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        if check and res.returncode != 0:
            raise AssertionError(
                f"bastion {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
            )
        return res


def bastion_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "bastion.cli.main", *args]


def wait_for_log(log: Path, pattern: str, proc: subprocess.Popen[bytes], deadline: float) -> re.Match[str]:
    """Wait until ``pattern`` appears in ``log`` (or the process dies, or time runs out)."""
    rx = re.compile(pattern)
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        text = log.read_text() if log.exists() else ""
        m = rx.search(text)
        if m:
            return m
        if proc.poll() is not None:
            raise AssertionError(f"bastion start exited with {proc.returncode}:\n{text}")
        time.sleep(0.05)  # polling a file for a condition, bounded by the deadline
    raise AssertionError(f"timed out waiting for {pattern!r} in {log}:\n{log.read_text()}")


def start_node(
    root: Path,
    *,
    extra_config: str = "",
    auth_config: str = "",
    cluster: str = "itest",
    bastion_config: str = "",
) -> Node:
    """``bastion_config``: more lines of the ``bastion:`` section (indented two spaces)."""
    root.mkdir(parents=True, exist_ok=True)
    config = root / "bastion.yaml"
    config.write_text(
        "version: v1\n"
        "bastion:\n"
        f"  data_dir: {root / 'data'}\n"
        f"  cluster_name: {cluster}\n" + bastion_config + "auth_service:\n"
        "  listen_addr: 127.0.0.1:0\n"
        + auth_config
        + "proxy_service:\n  listen_addr: 127.0.0.1:0\n"
        + extra_config
    )
    log = root / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    with log.open("wb") as f:
        proc = subprocess.Popen(
            bastion_cmd("start", "--config", str(config)),
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
        )
    m = wait_for_log(log, r"proxy listening addr=https://([\d.]+:\d+)", proc, START_DEADLINE)
    return Node(root=root, config=config, addr=m.group(1), proc=proc, log=log)


def stop_node(node: Node) -> None:
    node.proc.terminate()
    try:
        node.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        node.proc.kill()
        node.proc.wait()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = start_node(tmp_path_factory.mktemp("node"))
    try:
        yield n
    finally:
        stop_node(n)
