"""``apiclient.Trust``: the client TLS policy, checked with in-memory handshakes (no sockets)."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bastion.apiclient import Trust
from bastion.auth.ca import generate_ca
from tests.testca import OrgCA, make_org_ca


@pytest.fixture(scope="module")
def org(tmp_path_factory: pytest.TempPathFactory) -> OrgCA:
    return make_org_ca(tmp_path_factory.mktemp("org"))


def _handshake(client: ssl.SSLContext, org: OrgCA, name: str) -> None:
    """A TLS handshake over memory BIOs between ``client`` and a server with the org certificate."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(org.cert_file, org.key_file)
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname=name)
    s = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(10):
        for key, end in (("c", c), ("s", s)):
            if not done[key]:
                try:
                    end.do_handshake()
                    done[key] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


def _other_ca_pem() -> str:
    return generate_ca("host", "other", datetime.now(UTC)).cert_pem.decode()


def test_the_system_store_is_trusted(org: OrgCA, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(org.ca_file))
    _handshake(Trust().context(), org, "127.0.0.1")
    # A pinned cluster CA does not take the system store away.
    _handshake(Trust(_other_ca_pem(), pinned_in="pin.pem").context(), org, "localhost")


def test_the_pinned_ca_is_trusted_without_the_system_store(
    org: OrgCA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "none.pem"
    empty.write_text("")
    monkeypatch.setenv("SSL_CERT_FILE", str(empty))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    _handshake(Trust(org.ca_file.read_text()).context(), org, "localhost")
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer certificate"):
        _handshake(Trust(_other_ca_pem()).context(), org, "localhost")


def test_the_name_is_checked(org: OrgCA) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _handshake(Trust(org.ca_file.read_text()).context(), org, "proxy.example.com")


def test_insecure_verifies_nothing(org: OrgCA) -> None:
    ctx = Trust(insecure=True).context()
    assert ctx.verify_mode == ssl.CERT_NONE
    _handshake(ctx, org, "proxy.example.com")


def test_refusal_names_where_the_pin_is() -> None:
    pinned = Trust("PEM", pinned_in="/home/u/.bastion/cas/p_1.pem")
    assert pinned.refusal("p:1", "self-signed certificate") == (
        "the proxy p:1 presented a certificate that neither the system trust store nor the "
        "cluster CA pinned for it in /home/u/.bastion/cas/p_1.pem accepts (self-signed "
        "certificate): someone may be intercepting the connection, or the cluster was re-created "
        "(then check its CA fingerprint and log in again with --ca-fingerprint=SHA256:..., which "
        "re-pins it)"
    )
    assert Trust().refusal("p:1", "") == (
        "the proxy p:1 presented a certificate that the system trust store does not accept: "
        "someone may be intercepting the connection, or the proxy uses the cluster's own "
        "certificate (then log in with --ca-fingerprint=SHA256:... to pin its CA)"
    )
