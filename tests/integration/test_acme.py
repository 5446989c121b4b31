"""`proxy_service.acme`: the proxy orders its certificate from pebble (Let's Encrypt's test
ACME server, a Debian package), answering HTTP-01; clients that trust pebble's root log in
without a fingerprint; a restart keeps the certificate without asking the ACME server again."""

from __future__ import annotations

import json
import os
import shutil
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from tests.integration.conftest import start_node, stop_node
from tests.peers import free_port, run_server
from tests.testca import make_org_ca

pytest.importorskip("acme", reason="the acme package (the `acme` extra) is not installed")
pytestmark = pytest.mark.skipif(
    shutil.which("pebble") is None, reason="pebble (Debian package pebble) is not installed: `make pebble`"
)

PW = "correct horse battery staple"


@dataclass
class Pebble:
    directory: str
    management: str
    ca_file: Path  # the CA of pebble's own listeners (not of what it issues)
    http_port: int  # where pebble dials HTTP-01 challenges

    @property
    def trust(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


@pytest.fixture(scope="module")
def pebble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pebble]:
    root = tmp_path_factory.mktemp("pebble")
    org = make_org_ca(root)  # pebble's listeners need a certificate; its package ships none
    port, mgmt, http_port, tls_port = free_port(), free_port(), free_port(), free_port()
    cfg = root / "pebble.json"
    cfg.write_text(
        json.dumps(
            {
                "pebble": {
                    "listenAddress": f"127.0.0.1:{port}",
                    "managementListenAddress": f"127.0.0.1:{mgmt}",
                    "certificate": str(org.cert_file),
                    "privateKey": str(org.key_file),
                    "httpPort": http_port,
                    "tlsPort": tls_port,
                    "ocspResponderURL": "",
                    "externalAccountBindingRequired": False,
                }
            }
        )
    )
    env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0")
    with run_server(["pebble", "-config", str(cfg)], port, env=env, cwd=root):
        yield Pebble(
            directory=f"https://127.0.0.1:{port}/dir",
            management=f"https://127.0.0.1:{mgmt}",
            ca_file=org.ca_file,
            http_port=http_port,
        )


def _acme_config(pebble: Pebble) -> str:
    return (
        "  acme:\n"
        "    enabled: true\n"
        f"    directory_url: {pebble.directory}\n"
        "    email: ops@example.com\n"
        "    domains: [127.0.0.1, localhost]\n"
        f"    http_addr: 127.0.0.1:{pebble.http_port}\n"
        f"    ca_file: {pebble.ca_file}\n"
        "app_service:\n  demo_server: true\n"
    )


def test_proxy_certificate_over_acme(pebble: Pebble, tmp_path: Path) -> None:
    root_dir = tmp_path / "cluster"
    node = start_node(root_dir, extra_config=_acme_config(pebble))
    try:
        assert "ACME certificate obtained" in node.log.read_text()
        with httpx.Client(verify=pebble.trust) as c:
            acme_root = c.get(f"{pebble.management}/roots/0").text
        roots = tmp_path / "acme-root.pem"
        roots.write_text(acme_root)
        served = x509.load_pem_x509_certificate(
            ssl.get_server_certificate(("127.0.0.1", int(node.addr.split(":")[1]))).encode()
        )
        assert "Pebble" in served.issuer.rfc4514_string()

        # A client that trusts the ACME CA's root: no fingerprint, no prompt.
        node.env["SSL_CERT_FILE"] = str(roots)
        node.cli("users", "add", "erin", "--roles=mcp-user", local=True)
        ident = root_dir / "erin.id"
        node.cli("auth", "sign", "--user=erin", f"--out={ident}", local=True)
        status = node.cli("status", "-i", str(ident), "--proxy", node.addr).stdout
        assert "Logged in as: erin" in status
        listed = json.loads(
            node.cli("mcp", "ls", "--format=json", "-i", str(ident), "--proxy", node.addr).stdout
        )
        assert [a["name"] for a in listed] == ["bastion-demo"]
    finally:
        stop_node(node)

    # A restart serves the kept certificate: the ACME server is not asked again.
    node.log.unlink()
    again = start_node(root_dir, extra_config=_acme_config(pebble))
    try:
        assert "ACME certificate obtained" not in again.log.read_text()
        served2 = ssl.get_server_certificate(("127.0.0.1", int(again.addr.split(":")[1])))
        assert x509.load_pem_x509_certificate(served2.encode()).serial_number == served.serial_number
    finally:
        stop_node(again)
