"""`make demo` (python -m bastion.demo) starts when its usual ports are held by another process."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bastion.demo import PortChoice, port_holder
from tests.integration.conftest import wait_for_log

USUAL = (3080, 3024, 3025)


@contextlib.contextmanager
def _hold(ports: tuple[int, ...]) -> Iterator[set[int]]:
    """Listen on each port that is free; a port already taken by something else is held too."""
    socks: list[socket.socket] = []
    mine: set[int] = set()
    try:
        for port in ports:
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
                s.listen()
            except OSError:
                s.close()  # taken already: the same condition for the demo
                continue
            socks.append(s)
            mine.add(port)
        yield mine
    finally:
        for s in socks:
            s.close()


def test_port_holder_names_the_listening_process() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        comm = Path("/proc/self/comm").read_text().strip() if Path("/proc/self/comm").exists() else ""
        if comm:
            assert port_holder(port) == f"pid {os.getpid()} ({comm})"
    notice = PortChoice("proxy", "proxy_service.listen_addr", 3080, taken_by="pid 7 (nginx)").notice(41000)
    assert notice == "port 3080 (proxy) is taken by pid 7 (nginx): the demo uses 127.0.0.1:41000 instead"
    unknown = PortChoice("tunnel", "proxy_service.tunnel_listen_addr", 3024, taken_by="").notice(41001)
    assert unknown == "port 3024 (tunnel) is taken by another process: the demo uses 127.0.0.1:41001 instead"


def test_demo_starts_when_its_ports_are_held(tmp_path: Path) -> None:
    out = tmp_path / "demo.out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    with _hold(USUAL) as mine:
        with out.open("wb") as f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bastion.demo"],
                cwd=tmp_path,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env,
            )
        try:
            wait_for_log(out, r"Press Ctrl-C to stop", proc, 60.0)
            text = out.read_text()
            proxy = re.search(r"Proxy: +https://127\.0\.0\.1:(\d+)", text)
            tunnel = re.search(r"Tunnel: +127\.0\.0\.1:(\d+)", text)
            assert proxy and tunnel, text
            proxy_port, tunnel_port = int(proxy.group(1)), int(tunnel.group(1))
            assert proxy_port != 3080 and tunnel_port != 3024
            comm = Path("/proc/self/comm").read_text().strip()
            for port, what, actual in ((3080, "proxy", proxy_port), (3024, "tunnel", tunnel_port)):
                if port in mine:  # held by this test: the notice names it exactly
                    line = f"port {port} ({what}) is taken by pid {os.getpid()} ({comm}): "
                    assert f"{line}the demo uses 127.0.0.1:{actual} instead\n" in text, text
                else:
                    assert f"port {port} ({what}) is taken by " in text, text
            r = httpx.get(f"https://127.0.0.1:{proxy_port}/v1/webapi/find", verify=False, timeout=30)
            assert r.status_code == 200
            # The web address is printed, and the demo user signs in there with the printed password.
            web = re.search(r"Web UI: +(https://127\.0\.0\.1:(\d+)/web) ", text)
            password = re.search(r"Demo user: +demo +password: (\S+)", text)
            assert web and password and int(web.group(2)) == proxy_port, text
            _web_sign_in(web.group(1), "demo", password.group(1))
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                code = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                pytest.fail("the demo did not stop on SIGINT")
    assert code == 0, out.read_text()
    saved = (tmp_path / "demo-data" / "bastion.yaml").read_text()
    assert 'listen_addr: "127.0.0.1:3080"' in saved
    assert str(proxy_port) not in saved  # the port of this run is not kept


def _web_sign_in(url: str, user: str, password: str) -> None:
    with httpx.Client(verify=False, timeout=30) as c:
        page = c.get(url, follow_redirects=True)
        assert page.status_code == 200 and str(page.url).endswith("/web/login"), page.url
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf, page.text
        r = c.post(f"{url}/login", data={"csrf": csrf.group(1), "user": user, "password": password})
        assert r.status_code == 303, r.text
        apps = c.get(f"{url}/apps")
        assert apps.status_code == 200 and "bastion-demo" in apps.text, apps.text
