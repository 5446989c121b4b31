"""``proxy/acme``: which kept certificate is served, and when it is renewed (no ACME server)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from cryptography import x509

from bastion.config import ACMEConfig
from bastion.proxy import acme
from tests.testca import make_org_ca


def _cfg(*domains: str) -> ACMEConfig:
    return ACMEConfig(enabled=True, directory_url="https://ca.example/dir", domains=list(domains))


def _keep(data_dir: Path) -> x509.Certificate:
    org = make_org_ca(data_dir / "org")  # a certificate for localhost and 127.0.0.1, 1 day
    d = data_dir / "proxy" / "acme"
    d.mkdir(parents=True)
    (d / "tls.crt").write_bytes(org.cert_file.read_bytes())
    (d / "tls.key").write_bytes(org.key_file.read_bytes())
    return x509.load_pem_x509_certificate(org.cert_file.read_bytes())


def test_renewal_is_due_at_two_thirds_of_the_life(tmp_path: Path) -> None:
    cert = _keep(tmp_path)
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    pem = (tmp_path / "proxy" / "acme" / "tls.crt").read_bytes()
    assert acme.renew_at(pem) == cert.not_valid_before_utc + life * 2 / 3


def test_a_kept_certificate_is_served_while_it_covers_the_names_and_is_not_due(tmp_path: Path) -> None:
    cert = _keep(tmp_path)
    now = cert.not_valid_before_utc + timedelta(minutes=10)
    assert acme.kept(tmp_path, _cfg("LOCALHOST.", "127.0.0.1"), now) is not None
    assert acme.kept(tmp_path, _cfg("mcp.example.com"), now) is None  # another name: order anew
    due = acme.renew_at((tmp_path / "proxy" / "acme" / "tls.crt").read_bytes())
    assert acme.kept(tmp_path, _cfg("localhost"), due) is None
    assert acme.kept(tmp_path / "elsewhere", _cfg("localhost"), now) is None
