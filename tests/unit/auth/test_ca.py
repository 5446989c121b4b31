"""Certificate authorities: created once, shared under races, private keys never shown."""

from __future__ import annotations

import asyncio
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from bastion.auth.ca import ensure_cas, fingerprint, generate_ca, issue_server_cert
from bastion.backend.sqlite import SQLiteBackend

NOW = datetime(2026, 11, 22, tzinfo=UTC)


def test_private_key_not_in_repr() -> None:
    ca = generate_ca("host", "c1", NOW)
    assert b"PRIVATE" in ca.private_key_pem
    assert "PRIVATE" not in repr(ca)


def test_server_cert_chains_to_host_ca(tmp_path: Path) -> None:
    ca = generate_ca("host", "c1", NOW)
    issued = issue_server_cert(ca, hosts=["localhost", "127.0.0.1"], now=datetime.now(UTC))
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    (tmp_path / "c.pem").write_bytes(issued.cert_pem)
    (tmp_path / "k.pem").write_bytes(issued.key_pem)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")  # key matches cert
    client = ssl.create_default_context(cadata=ca.cert_pem.decode())
    assert client.verify_mode == ssl.CERT_REQUIRED
    assert fingerprint(ca.cert_pem).startswith("SHA256:")


async def test_ensure_cas_races_agree(tmp_path: Path) -> None:
    a = await SQLiteBackend.open(tmp_path / "b.db")
    b = await SQLiteBackend.open(tmp_path / "b.db")
    try:
        r1, r2 = await asyncio.gather(ensure_cas(a, "c1", NOW), ensure_cas(b, "c1", NOW))
        assert {k: v.key_id for k, v in r1.items()} == {k: v.key_id for k, v in r2.items()}
        again = await ensure_cas(a, "c1", NOW)
        assert again["host"].cert_pem == r1["host"].cert_pem
    finally:
        await a.close()
        await b.close()


def test_host_certificates_carry_role_and_cluster() -> None:
    from cryptography import x509

    from bastion.auth.ca import generate_ca, host_identity, issue_host_cert, new_host_key

    now = datetime.now(UTC)
    ca = generate_ca("host", "c1", now)
    key_pem, pub_pem = new_host_key()
    assert b"PRIVATE KEY" in key_pem and b"PRIVATE" not in pub_pem
    pem = issue_host_cert(
        ca,
        public_key_pem=pub_pem,
        host_id="abc-123",
        role="app",
        hostname="box",
        now=now,
        ttl=timedelta(hours=2),
    )
    cert = x509.load_pem_x509_certificate(pem)
    ident = host_identity(cert)
    assert (ident.host_id, ident.role, ident.cluster_name, ident.hostname) == ("abc-123", "app", "c1", "box")
    assert ident.expires - now <= timedelta(hours=2)
    # Signed by the host CA.
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    cert.verify_directly_issued_by(ca_cert)
    with pytest.raises(ValueError, match="unknown host role"):
        issue_host_cert(
            ca,
            public_key_pem=pub_pem,
            host_id="x",
            role="admin",
            hostname="b",
            now=now,
            ttl=timedelta(hours=1),
        )
